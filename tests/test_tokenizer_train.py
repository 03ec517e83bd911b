import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from heptapod_nb.config import ConfigError
from heptapod_nb.data import TokenDataset, load_mnist5k
from heptapod_nb.tokenizer import load_tokenizer
from heptapod_nb.tokenizer_train import (TokenizerTrainConfig, extract_cli, extract_tokens, lr_factor,
                                         train_tokenizer_cli)

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["-o", "ch=8", "-o", "norm_groups=4", "-o", "z_channels=8"]
QUIET = ["--no_progress", "--threads", "1"]


def _summary(out): return json.loads((Path(out) / "summary.json").read_text())


def test_lr_schedule():
    assert lr_factor(0.0, 0, warmup=10, min_ratio=0.1) == pytest.approx(0.1)          # warmup starts small
    assert lr_factor(0.0, 20, warmup=10, min_ratio=0.1) == pytest.approx(1.0)
    assert lr_factor(0.5, 20, warmup=10, min_ratio=0.1) == pytest.approx(0.55)
    assert lr_factor(1.0, 20, warmup=10, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(3.0, 20, warmup=10, min_ratio=0.1) == pytest.approx(0.1)         # past the budget: floor
    with pytest.raises(ConfigError, match="unknown tokenizer preset"):
        TokenizerTrainConfig(preset="big")


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vq") / "run"
    train_tokenizer_cli(["--out", str(out), "--max_steps", "6", "--ckpt_every", "3", "--batch_size", "16",
                         "--restart_every", "2", "--eval_every", "3", "--eval_batches", "1", *SMALL, *QUIET])
    return out


def test_train_vq_writes_checkpoint_summary_and_log(vq_run):
    s = _summary(vq_run)
    assert s["steps"] == 6 and s["kind"] == "vq" and s["val"]["n"] == 500
    assert 0 < s["val"]["usage"] <= 1 and s["val"]["perplexity"] >= 1 and np.isfinite(s["val"]["psnr"])
    tok = load_tokenizer(vq_run / "tokenizer.safetensors")
    assert tok.config.ch == 8 and tok.vocab_size == 512
    log = [json.loads(l) for l in (vq_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3, 6] and "restarted" in log[0] and "usage" in log[0]


def test_resume_continues_and_refuses_other_architecture(vq_run, tmp_path):
    import shutil
    out = tmp_path / "run"; shutil.copytree(vq_run, out)
    train_tokenizer_cli(["--out", str(out), "--max_steps", "8", "--batch_size", "16", "--resume", *SMALL, *QUIET])
    assert _summary(out)["steps"] == 8                  # 6 done before + 2 more
    with pytest.raises(ConfigError, match="--resume"):
        train_tokenizer_cli(["--out", str(out), "--max_steps", "9", "--resume", "-o", "ch=16", *QUIET])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_tokenizer_cli(["--out", str(tmp_path / "empty"), "--resume", *QUIET])


def test_time_budget_stops_training(tmp_path):
    train_tokenizer_cli(["--out", str(tmp_path / "kl"), "--preset", "tiny-kl", "--max_minutes", "0.0001",
                         "--batch_size", "8", *SMALL, *QUIET])
    s = _summary(tmp_path / "kl")
    assert s["kind"] == "kl" and 1 <= s["steps"] <= 3 and np.isfinite(s["val"]["psnr"])


def test_train_on_image_folder_rgb(tmp_path):
    rng = np.random.RandomState(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.randint(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "imgs" / split / c / f"{i}.png")
    out = tmp_path / "run"
    train_tokenizer_cli(["--out", str(out), "--data", str(tmp_path / "imgs"), "--image_size", "16", "--max_steps", "2",
                         "--batch_size", "4", "--num_workers", "0", "-o", "in_channels=3", *SMALL, *QUIET])
    tok = load_tokenizer(out / "tokenizer.safetensors")
    assert tok.image_shape == (3, 16, 16) and tok.grid == (4, 4) and _summary(out)["val"]["n"] == 8
    with pytest.raises(ConfigError, match="mnist5k images are 1x32x32"):
        train_tokenizer_cli(["--out", str(tmp_path / "x"), "-o", "in_channels=3", *QUIET])


def test_extract_matches_encode_flip_and_resume(vq_run, tmp_path):
    tok = load_tokenizer(vq_run / "tokenizer.safetensors")
    out = tmp_path / "tokens"
    extract_cli(["--tokenizer", str(vq_run / "tokenizer.safetensors"), "--split", "val", "--out", str(out),
                 "--augs", "2", "--batch_size", "128", *QUIET])
    ds = TokenDataset(out, aug="first")
    val = load_mnist5k("val")
    assert len(ds) == 500 and ds.kind == "vq" and ds.grid == (8, 8) and ds.vocab_size == 512
    assert ds.meta["augs"] == 2 and ds.meta["done"] == 500 and ds.meta["split"] == "val"
    codes = np.load(out / "codes.npy")
    np.testing.assert_array_equal(codes[:, 0], tok.encode(val.images).numpy())
    np.testing.assert_array_equal(codes[:, 1], tok.encode(val.images.flip(-1)).numpy())
    np.testing.assert_array_equal(np.load(out / "labels.npy"), val.labels.numpy())
    x, y = ds[7]
    assert x.dtype == torch.int64 and x.shape == (8, 8) and y == int(val.labels[7])
    # simulate a run killed after 256 images: resume rewrites only what is missing and ends identical
    meta = json.loads((out / "meta.json").read_text()); meta["done"] = 256
    (out / "meta.json").write_text(json.dumps(meta))
    c = np.load(out / "codes.npy", mmap_mode="r+"); c[256:] = 0; c.flush(); del c
    with pytest.raises(ValueError, match="incomplete"):
        TokenDataset(out)
    extract_tokens(tok, val, out, augs=2, batch_size=100, progress=False,
                   extra={k: meta[k] for k in ("tokenizer", "data", "split", "sample")})
    np.testing.assert_array_equal(np.load(out / "codes.npy"), codes)
    # a different extraction into the same folder is refused, not mixed
    with pytest.raises(ValueError, match="different extraction"):
        extract_cli(["--tokenizer", str(vq_run / "tokenizer.safetensors"), "--split", "val", "--out", str(out),
                     "--augs", "1", *QUIET])


def test_extract_kl_mean_and_sample(tmp_path):
    train_tokenizer_cli(["--out", str(tmp_path / "kl"), "--preset", "tiny-kl", "--max_steps", "1", "--batch_size", "8",
                         *SMALL, *QUIET])
    ck = str(tmp_path / "kl" / "tokenizer.safetensors")
    extract_cli(["--tokenizer", ck, "--split", "val", "--out", str(tmp_path / "mean"), *QUIET])
    extract_cli(["--tokenizer", ck, "--split", "val", "--out", str(tmp_path / "smp"), "--sample", *QUIET])
    m, s = TokenDataset(tmp_path / "mean"), TokenDataset(tmp_path / "smp")
    assert m.kind == "kl" and m.channels == 4 and m[0][0].shape == (4, 8, 8) and m[0][0].dtype == torch.float32
    tok = load_tokenizer(ck)
    np.testing.assert_allclose(np.load(tmp_path / "mean" / "codes.npy")[:, 0],
                               tok.encode(load_mnist5k("val").images).numpy(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(m[0][0], s[0][0]) and s.meta["sample"] is True
    # auto_scale: the scale factor was fitted on train latents, so the stored val latents have about unit std
    assert m.meta["scale_factor"] == tok.scale_factor != 1.0
    assert 0.8 < np.load(tmp_path / "mean" / "codes.npy").std() < 1.25


def _torchrun(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HEPTAPOD_FAST": "1"}
    cmd = [str(ROOT / ".venv/bin/torchrun"), "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
           "-m", *args]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_ddp_two_ranks_keep_codebook_in_sync_and_extract_slices(tmp_path):
    "2 CPU processes (gloo): restarts every step stay identical on both ranks (checked at every checkpoint)."
    code = ("import sys; from heptapod_nb.tokenizer_train import train_tokenizer_cli as t, extract_cli as e; "
            "(t if sys.argv[1] == 'train' else e)(sys.argv[2:])")
    (tmp_path / "ddp_entry.py").write_text(code)
    out = tmp_path / "run"
    _torchrun(["ddp_entry", "train", "--out", str(out), "--max_steps", "4", "--ckpt_every", "2", "--batch_size", "8",
               "--restart_every", "1", "--restart_threshold", "100", "--device", "cpu", *SMALL, *QUIET], tmp_path)
    s = _summary(out)
    assert s["world_size"] == 2 and s["steps"] == 4
    ck = str(out / "tokenizer.safetensors")
    _torchrun(["ddp_entry", "extract", "--tokenizer", ck, "--split", "val", "--out", str(tmp_path / "t2"),
               "--batch_size", "64", "--device", "cpu", *QUIET], tmp_path)
    extract_cli(["--tokenizer", ck, "--split", "val", "--out", str(tmp_path / "t1"), "--batch_size", "500", *QUIET])
    np.testing.assert_array_equal(np.load(tmp_path / "t2" / "codes.npy"), np.load(tmp_path / "t1" / "codes.npy"))
    assert json.loads((tmp_path / "t2" / "meta.json").read_text())["done"] == 500


def test_patchgan_switches_on_after_disc_start(tmp_path):
    out = tmp_path / "gan"
    train_tokenizer_cli(["--out", str(out), "--max_steps", "3", "--batch_size", "8", "--disc_weight", "0.5",
                         "--disc_start", "1", "--eval_every", "3", "--eval_batches", "1", *SMALL, *QUIET])
    log = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert log["adv_w"] > 0 and np.isfinite(log["d_loss"])
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["disc"] is not None and state["step"] == 3
