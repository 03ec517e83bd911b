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
from heptapod_nb import tokenizer_train
from heptapod_nb.extract import extract_cli, extract_main, extract_tokens
from heptapod_nb.tokenizer_train import (TokenizerTrainConfig, default_workers, lr_factor, train_tokenizer_cli,
                                         train_tokenizer_main)

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["-o", "ch=8", "-o", "norm_groups=4", "-o", "z_channels=8"]
QUIET = ["--no-progress", "--threads", "1"]


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
    train_tokenizer_main(["--out", str(out), "--steps", "6", "--ckpt-every", "3", "--batch-size", "16",
                         "--restart-every", "2", "--eval-every", "3", "--eval-batches", "1", *SMALL, *QUIET])
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
    train_tokenizer_main(["--out", str(out), "--steps", "8", "--batch-size", "16", "--resume", *SMALL, *QUIET])
    assert _summary(out)["steps"] == 8                  # 6 done before + 2 more
    with pytest.raises(ConfigError, match="--resume"):
        train_tokenizer_main(["--out", str(out), "--steps", "9", "--resume", "-o", "ch=16", *QUIET])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_tokenizer_main(["--out", str(tmp_path / "empty"), "--resume", *QUIET])


def test_time_budget_stops_training(tmp_path):
    train_tokenizer_main(["--out", str(tmp_path / "kl"), "--preset", "tiny-kl", "--max-minutes", "0.0001",
                         "--batch-size", "8", *SMALL, *QUIET])
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
    train_tokenizer_main(["--out", str(out), "--data", str(tmp_path / "imgs"), "--image-size", "16", "--steps", "2",
                         "--batch-size", "4", "--num-workers", "0", "-o", "in_channels=3", *SMALL, *QUIET])
    tok = load_tokenizer(out / "tokenizer.safetensors")
    assert tok.image_shape == (3, 16, 16) and tok.grid == (4, 4) and _summary(out)["val"]["n"] == 8
    with pytest.raises(ConfigError, match="mnist5k/train images have 1 channel"):
        train_tokenizer_main(["--out", str(tmp_path / "x"), "-o", "in_channels=3", *QUIET])


def test_extract_matches_encode_flip_and_resume(vq_run, tmp_path):
    tok = load_tokenizer(vq_run / "tokenizer.safetensors")
    out = tmp_path / "tokens"
    extract_main(["--tokenizer", str(vq_run / "tokenizer.safetensors"), "--split", "val", "--out", str(out),
                 "--augs", "2", "--batch-size", "128", *QUIET])
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
        extract_main(["--tokenizer", str(vq_run / "tokenizer.safetensors"), "--split", "val", "--out", str(out),
                     "--augs", "1", "--resume", *QUIET])


def test_extract_kl_mean_and_sample(tmp_path):
    train_tokenizer_main(["--out", str(tmp_path / "kl"), "--preset", "tiny-kl", "--steps", "1", "--batch-size", "8",
                         *SMALL, *QUIET])
    ck = str(tmp_path / "kl" / "tokenizer.safetensors")
    extract_main(["--tokenizer", ck, "--split", "val", "--out", str(tmp_path / "mean"), *QUIET])
    extract_main(["--tokenizer", ck, "--split", "val", "--out", str(tmp_path / "smp"), "--sample", *QUIET])
    m, s = TokenDataset(tmp_path / "mean"), TokenDataset(tmp_path / "smp")
    assert m.kind == "kl" and m.channels == 4 and m[0][0].shape == (4, 8, 8) and m[0][0].dtype == torch.float32
    tok = load_tokenizer(ck)
    # stored latents (encoded in batches of 256) vs one batch of 500: identical on the machine that wrote this test
    # (max difference 0.0, latents up to 5 in size); other CPUs may pick other float32 kernels per batch size, so
    # allow ~100 float32 ulps (rtol 1e-5) -- a wrong latent (another image, the sample instead of the mean) is O(1) off
    np.testing.assert_allclose(np.load(tmp_path / "mean" / "codes.npy")[:, 0],
                               tok.encode(load_mnist5k("val").images).numpy(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(m[0][0], s[0][0]) and s.meta["sample"] is True
    # auto_scale: the scale factor was fitted on train latents, so the stored val latents have about unit std
    assert m.meta["scale_factor"] == tok.scale_factor != 1.0
    assert 0.8 < np.load(tmp_path / "mean" / "codes.npy").std() < 1.25


def _torchrun(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HEPTAPOD_FAST": "1"}
    cmd = [str(ROOT / ".venv/bin/torchrun"), "--nproc-per-node", "2", "--master-port", str(29500 + os.getpid() % 1000),
           "-m", *args]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_ddp_two_ranks_keep_codebook_in_sync_and_extract_slices(tmp_path):
    "2 CPU processes (gloo): restarts every step stay identical on both ranks (checked at every checkpoint)."
    code = ("import sys; from heptapod_nb.tokenizer_train import train_tokenizer_cli as t; from heptapod_nb.extract import extract_cli as e; "
            "sys.exit((t if sys.argv[1] == 'train' else e)(sys.argv[2:]))")
    (tmp_path / "ddp_entry.py").write_text(code)
    out = tmp_path / "run"
    _torchrun(["ddp_entry", "train", "--out", str(out), "--steps", "4", "--ckpt-every", "2", "--batch-size", "8",
               "--restart-every", "1", "--restart-threshold", "100", "--device", "cpu", *SMALL, *QUIET], tmp_path)
    s = _summary(out)
    assert s["world_size"] == 2 and s["steps"] == 4
    ck = str(out / "tokenizer.safetensors")
    _torchrun(["ddp_entry", "extract", "--tokenizer", ck, "--split", "val", "--out", str(tmp_path / "t2"),
               "--batch-size", "64", "--device", "cpu", *QUIET], tmp_path)
    extract_main(["--tokenizer", ck, "--split", "val", "--out", str(tmp_path / "t1"), "--batch-size", "500", *QUIET])
    np.testing.assert_array_equal(np.load(tmp_path / "t2" / "codes.npy"), np.load(tmp_path / "t1" / "codes.npy"))
    assert json.loads((tmp_path / "t2" / "meta.json").read_text())["done"] == 500


def test_patchgan_switches_on_after_disc_start(tmp_path):
    out = tmp_path / "gan"
    train_tokenizer_main(["--out", str(out), "--steps", "3", "--batch-size", "8", "--disc-weight", "0.5",
                         "--disc-start", "1", "--eval-every", "3", "--eval-batches", "1", *SMALL, *QUIET])
    log = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert log["adv_w"] > 0 and np.isfinite(log["d_loss"])
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["disc"] is not None and state["step"] == 3


# ---- console-script convention, own image folders (issues 15 and 18) ----

def _images(root, mode="RGB", n=4, size=(20, 24), classes=("a", "b")):
    "A tiny class folder of random images: mode 'RGB' or 'L'."
    rng = np.random.RandomState(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = size + ((3,) if mode == "RGB" else ())
            Image.fromarray(rng.randint(0, 255, shape, dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _run(fn, argv, capsys):
    capsys.readouterr()
    rc = fn(argv)
    return rc, capsys.readouterr().err


def _assert_user_error(fn, prog, argv, capsys, fragment):
    rc, err = _run(fn, argv, capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1, (rc, err)
    assert lines[0].startswith(f"{prog}: error: ") and fragment in lines[0], lines[0]
    return lines[0]


def test_train_cli_user_errors_are_one_line_and_exit_2(vq_run, tmp_path, capsys):
    import shutil
    (tmp_path / "file").write_text("x")
    bad = _images(tmp_path / "bad"); (bad / "b" / "corrupt.png").write_bytes(b"\x89PNG garbage")
    rgb = _images(tmp_path / "rgb")
    damaged = tmp_path / "damaged"; shutil.copytree(vq_run, damaged)
    (damaged / "train_state.pt").write_bytes(b"not a torch file")
    flipped = tmp_path / "flipped"; shutil.copytree(vq_run, flipped)     # same size, one bit changed: the SHA-256 tells
    st = bytearray((flipped / "train_state.pt").read_bytes()); st[len(st) // 2] ^= 1
    (flipped / "train_state.pt").write_bytes(bytes(st))
    no_side = tmp_path / "no_side"; shutil.copytree(vq_run, no_side); (no_side / "train_state.json").unlink()
    broken_ck = tmp_path / "broken_ck"; shutil.copytree(vq_run, broken_ck)
    (broken_ck / "tokenizer.safetensors").write_bytes(b"garbage")
    out = ["--out", str(tmp_path / "new")]
    cases = [
        (["--batch-size", "0", *out], "batch_size must be positive"),
        (["--channels", "2", *out], "channels must be 1 (grayscale), 3 (RGB) or 0"),
        (["--data", str(tmp_path / "nope"), *out], "not found"),
        (["--data", str(tmp_path / "file"), *out], "is a file"),
        (["--out", str(tmp_path / "file" / "run")], f"{tmp_path / 'file'} is a file, not a folder"),
        (["--out", str(tmp_path / "file")], "is a file, not a folder"),
        (["--out", str(vq_run)], "already holds a tokenizer run"),
        (["--resume", "--overwrite", *out], "pass one of them"),
        (["--resume", *out], "no checkpoint"),
        (["--data", str(bad), "--image-size", "16", *out], "corrupt.png"),
        (["--data", str(rgb), "--image-size", "16", "-o", "in_channels=1", *out], "pass --channels 1"),
        (["--data", str(rgb), "--channels", "3", "-o", "in_channels=1", *out], "disagree"),
        (["--data", str(rgb), "--image-size", "16", "--batch-size", "64", *out], "fewer than one batch"),   # used to loop forever
        (["--channels", "3", *out], "mnist5k is grayscale"),
        (["-o", "nosuchfield=1", *out], "nosuchfield"),
        (["--out", str(damaged), "--resume", *SMALL], "train_state.pt is truncated or corrupt"),
        (["--out", str(flipped), "--resume", *SMALL], "SHA-256 does not match"),
        (["--out", str(no_side), "--resume", *SMALL], "no sidecar train_state.json"),
        (["--out", str(broken_ck), "--resume", *SMALL], "corrupt"),
    ]
    for argv, fragment in cases:
        line = _assert_user_error(train_tokenizer_cli, "heptapod-train-tokenizer", [*argv, *QUIET], capsys, fragment)
        assert "Traceback" not in line
    assert not (tmp_path / "new").exists()                      # nothing was made by the failed runs
    rc, err = _run(train_tokenizer_cli, ["--flip", "maybe", *out], capsys)       # argparse usage error
    assert rc == 2 and "expected true or false" in err


def test_debug_shows_the_traceback(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    argv = ["--out", str(tmp_path / "file" / "run"), *QUIET]
    rc, err = _run(train_tokenizer_cli, [*argv, "--debug"], capsys)
    assert rc == 2 and "Traceback (most recent call last)" in err and "check_out_dir" in err
    assert err.strip().splitlines()[-1].startswith("heptapod-train-tokenizer: error: ")
    rc, err = _run(extract_cli, ["--tokenizer", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "t"), "--debug"], capsys)
    assert rc == 2 and "Traceback (most recent call last)" in err and "checkpoint not found" in err.strip().splitlines()[-1]


def test_unwritable_output_is_a_user_error(tmp_path, capsys, monkeypatch):
    def refuse(*a, **k): raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tokenizer_train.tempfile, "TemporaryFile", refuse)      # a read-only folder, even for root
    _assert_user_error(train_tokenizer_cli, "heptapod-train-tokenizer", ["--out", str(tmp_path / "run"), *QUIET], capsys,
                       f"--out {tmp_path / 'run'}: cannot write in {tmp_path} (Permission denied)")
    _assert_user_error(extract_cli, "heptapod-extract", ["--tokenizer", "x", "--out", str(tmp_path / "t"), *QUIET], capsys,
                       "cannot write in")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path, capsys):
    ro = tmp_path / "ro"; ro.mkdir(); ro.chmod(0o500)
    try:
        _assert_user_error(train_tokenizer_cli, "heptapod-train-tokenizer", ["--out", str(ro / "run"), *QUIET], capsys,
                           "cannot write in")
    finally: ro.chmod(0o700)


def test_extract_cli_errors_refusal_resume_overwrite_and_channels(vq_run, tmp_path, capsys):
    ck = str(vq_run / "tokenizer.safetensors")
    (tmp_path / "file").write_text("x")
    (tmp_path / "broken.safetensors").write_bytes(b"garbage")
    rgb = _images(tmp_path / "rgb", size=(32, 32))
    E = lambda argv, frag: _assert_user_error(extract_cli, "heptapod-extract", [*argv, *QUIET], capsys, frag)
    E(["--tokenizer", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "t")], "checkpoint not found")
    E(["--tokenizer", str(tmp_path / "broken.safetensors"), "--out", str(tmp_path / "t")], "corrupt")
    E(["--tokenizer", ck, "--out", str(tmp_path / "file" / "t")], "is a file, not a folder")
    E(["--tokenizer", ck, "--data", str(rgb), "--out", str(tmp_path / "t")], "pass --channels 1")
    E(["--tokenizer", ck, "--channels", "3", "--out", str(tmp_path / "t")], "mnist5k is grayscale")
    E(["--tokenizer", ck, "--resume", "--out", str(tmp_path / "t")], "no extraction to continue")
    E(["--tokenizer", ck, "--resume", "--overwrite", "--out", str(tmp_path / "t")], "pass one of them")
    # issue 24: --sample with a VQ tokenizer was accepted (and did nothing); a model file given as the tokenizer said
    # "unknown TokenizerConfig keys"; a bad meta.json was not named
    E(["--tokenizer", ck, "--sample", "--out", str(tmp_path / "t")], "is a vq tokenizer, whose codes are deterministic")
    from heptapod_nb.model import Heptapod, HeptapodConfig, save_model
    model_file = save_model(Heptapod(HeptapodConfig(dim=32, depth=1, n_heads=2, head_width=32, head_heads=2, head_depth=1)),
                            tmp_path / "model.safetensors")
    E(["--tokenizer", str(model_file), "--out", str(tmp_path / "t")], "holds a 'heptapod', expected a 'tokenizer-vq' or a 'tokenizer-kl'")
    assert not (tmp_path / "t").exists()
    from heptapod_nb.data import TokenDataset
    (tmp_path / "m").mkdir(); (tmp_path / "m" / "meta.json").write_text("{oops")
    with pytest.raises(ValueError, match=f"{tmp_path / 'm' / 'meta.json'} is not valid JSON"): TokenDataset(tmp_path / "m")
    (tmp_path / "m" / "meta.json").write_text('{"kind": "vq"}')
    with pytest.raises(ValueError, match="is not a token dataset's meta.json: missing \\['n', 'grid', 'num_classes'\\]"):
        TokenDataset(tmp_path / "m")
    # --channels 1: the RGB folder is converted to grayscale for the 1-channel tokenizer
    t = tmp_path / "t"
    assert _run(extract_cli, ["--tokenizer", ck, "--data", str(rgb), "--channels", "1", "--out", str(t), *QUIET], capsys)[0] == 0
    codes = np.load(t / "codes.npy").copy()
    tok = load_tokenizer(ck)
    from heptapod_nb.data import ImageFolderDataset
    ds = ImageFolderDataset(rgb, size=32, channels=1)
    np.testing.assert_array_equal(codes[:, 0], tok.encode(torch.stack([ds[i][0] for i in range(len(ds))])).numpy())
    # a folder holding tokens: refused, --resume keeps it (already complete), --overwrite replaces it
    line = E(["--tokenizer", ck, "--data", str(rgb), "--channels", "1", "--out", str(t)], "already holds tokens (8/8 images done)")
    assert "--resume" in line and "--overwrite" in line
    assert _run(extract_cli, ["--tokenizer", ck, "--data", str(rgb), "--channels", "1", "--out", str(t), "--resume", *QUIET], capsys)[0] == 0
    np.testing.assert_array_equal(np.load(t / "codes.npy"), codes)
    E(["--tokenizer", ck, "--data", str(rgb), "--channels", "1", "--out", str(t), "--augs", "2", "--resume"], "different extraction")
    assert _run(extract_cli, ["--tokenizer", ck, "--data", str(rgb), "--channels", "1", "--out", str(t), "--augs", "2",
                              "--overwrite", *QUIET], capsys)[0] == 0
    meta = json.loads((t / "meta.json").read_text())
    assert meta["augs"] == 2 and meta["done"] == 8 and np.load(t / "codes.npy").shape == (8, 2, 8, 8)
    np.testing.assert_array_equal(np.load(t / "codes.npy")[:, 0], codes[:, 0])


def test_train_refuses_existing_run_overwrite_starts_again(tmp_path, capsys):
    root = tmp_path / "imgs"; _images(root / "train", size=(16, 16)); _images(root / "val", size=(16, 16))
    out = tmp_path / "run"
    common = ["--data", str(root), "--out", str(out), "--image-size", "16", "--batch-size", "4", "--num-workers", "0",
              "--eval-batches", "1", *SMALL, *QUIET]
    assert _run(train_tokenizer_cli, [*common, "--steps", "2", "--eval-every", "1"], capsys)[0] == 0
    before = (out / "tokenizer.safetensors").read_bytes()
    assert [json.loads(l)["step"] for l in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    line = _assert_user_error(train_tokenizer_cli, "heptapod-train-tokenizer", [*common, "--steps", "1"], capsys,
                              "already holds a tokenizer run")
    assert "--resume" in line and "--overwrite" in line
    assert (out / "tokenizer.safetensors").read_bytes() == before and _summary(out)["steps"] == 2
    assert _run(train_tokenizer_cli, [*common, "--steps", "1", "--overwrite"], capsys)[0] == 0
    assert _summary(out)["steps"] == 1 and torch.load(out / "train_state.pt", weights_only=True)["step"] == 1
    assert not (out / "log.jsonl").exists()                   # the old run's log (steps 1, 2) went with it
    assert (out / "tokenizer.safetensors").read_bytes() != before
    assert _run(train_tokenizer_cli, [*common, "--steps", "3", "--resume"], capsys)[0] == 0
    assert _summary(out)["steps"] == 3


def test_own_images_channels_follow_the_folder(tmp_path, capsys):
    gray, rgb = _images(tmp_path / "gray", mode="L"), _images(tmp_path / "rgb")
    common = ["--image-size", "16", "--steps", "1", "--batch-size", "4", "--num-workers", "0", *SMALL, *QUIET]
    for data, extra, want in [(gray, [], 1), (rgb, [], 3), (rgb, ["--channels", "1"], 1)]:
        out = tmp_path / f"run_{data.name}_{want}"
        rc, err = _run(train_tokenizer_cli, ["--data", str(data), "--out", str(out), *extra, *common], capsys)
        assert rc == 0, err
        tok = load_tokenizer(out / "tokenizer.safetensors")
        assert tok.config.in_channels == want and tok.image_shape == (want, 16, 16) and _summary(out)["image_channels"] == want
    # --resume reads the folder as the checkpoint was trained, and refuses a --channels that disagrees with it
    out = tmp_path / "run_rgb_1"
    assert _run(train_tokenizer_cli, ["--data", str(rgb), "--out", str(out), "--resume", *common[:2], "--steps", "2",
                                      *common[4:]], capsys)[0] == 0
    assert _summary(out)["steps"] == 2
    _assert_user_error(train_tokenizer_cli, "heptapod-train-tokenizer",
                       ["--data", str(rgb), "--out", str(out), "--resume", "--channels", "3", *common[:2], "--steps", "3", *common[4:]],
                       capsys, "pass --channels 1")


def test_skip_bad_counts_and_lists_skipped_files(vq_run, tmp_path, capsys):
    data = _images(tmp_path / "imgs", mode="L", size=(32, 32))
    (data / "a" / "zz_corrupt.png").write_bytes(b"\x89PNG garbage")
    (data / "b" / "empty.jpg").write_bytes(b"")
    common = ["--data", str(data), "--steps", "1", "--batch-size", "4", "--num-workers", "0", *SMALL, *QUIET]
    _assert_user_error(train_tokenizer_cli, "heptapod-train-tokenizer", ["--out", str(tmp_path / "r0"), *common], capsys,
                       "zz_corrupt.png")
    rc, err = _run(train_tokenizer_cli, ["--out", str(tmp_path / "r1"), "--skip-bad", *common], capsys)
    assert rc == 0, err
    assert "skipped 2 unreadable image(s)" in err and "zz_corrupt.png" in err and "empty.jpg" in err
    assert [Path(p).name for p in _summary(tmp_path / "r1")["skipped_images"]] == ["zz_corrupt.png", "empty.jpg"]
    ck = str(vq_run / "tokenizer.safetensors")
    rc, err = _run(extract_cli, ["--tokenizer", ck, "--data", str(data), "--out", str(tmp_path / "t"), "--skip-bad", *QUIET], capsys)
    assert rc == 0 and "skipped 2 unreadable image(s)" in err
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    assert meta["n"] == meta["done"] == 8 and len(meta["skipped_images"]) == 2


def test_decode_failure_in_a_dataloader_worker_is_one_line(tmp_path, capsys):
    import io
    data = _images(tmp_path / "imgs", size=(16, 16), n=2)
    buf = io.BytesIO(); Image.fromarray(np.zeros((16, 16, 3), np.uint8) + 7).save(buf, "PNG")
    (data / "a" / "trunc.png").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])   # header fine, pixels cut
    common = ["--data", str(data), "--image-size", "16", "--steps", "2", "--batch-size", "5", "--num-workers", "1",
              "--flip", "false", *SMALL, *QUIET]
    line = _assert_user_error(train_tokenizer_cli, "heptapod-train-tokenizer", ["--out", str(tmp_path / "r"), *common],
                              capsys, "cannot read image")
    assert "trunc.png" in line and "Original Traceback" not in line and "DataLoader worker" not in line
    assert _run(train_tokenizer_cli, ["--out", str(tmp_path / "r2"), "--skip-bad", *common], capsys)[0] == 0


def test_default_workers_follow_the_machine(monkeypatch):
    for cpus, world, want in [(1, 1, 0), (2, 1, 0), (3, 1, 2), (4, 1, 3), (16, 1, 4), (8, 2, 3), (4, 2, 0)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)), raising=False)
        assert default_workers(world) == want, (cpus, world)
    assert TokenizerTrainConfig().num_workers == -1
    with pytest.raises(ConfigError, match="num_workers"):
        TokenizerTrainConfig(num_workers=-2)


def test_bool_flags():
    import argparse
    p = argparse.ArgumentParser(); tokenizer_train._add_config_args(p, TokenizerTrainConfig)
    assert p.parse_args(["--skip-bad"]).skip_bad is True and p.parse_args([]).skip_bad is False
    assert p.parse_args(["--flip", "no"]).flip is False and p.parse_args(["--flip", "--steps", "3"]).flip is True


def test_one_run_per_folder_and_a_failed_run_blocks_no_retry(tmp_path, capsys, monkeypatch):
    """Issue 24: two runs on one --out mixed their files, and a run that failed before writing weights (a NaN loss)
    left tokenizer_config.json, which then refused its own retry without --overwrite. A run holds an OS lock on its
    folder (a second one is refused naming the first's pid), and a failed fresh run leaves nothing behind."""
    import heptapod_nb.tokenizer_train as tt
    from heptapod_nb.config import RunLock
    root = tmp_path / "imgs"; _images(root / "train", size=(16, 16)); _images(root / "val", size=(16, 16))
    out = tmp_path / "run"
    common = ["--data", str(root), "--out", str(out), "--image-size", "16", "--batch-size", "4", "--num-workers", "0",
              "--eval-batches", "1", "--steps", "1", *SMALL, *QUIET]
    with RunLock(out):                                        # another run holds the folder
        _assert_user_error(train_tokenizer_cli, "heptapod-train-tokenizer", common, capsys, f"is in use by another run (pid {os.getpid()})")
        _assert_user_error(extract_cli, "heptapod-extract", ["--tokenizer", "x", "--out", str(out), *QUIET], capsys, "in use by another run")
    def diverge(self, x, p): raise FloatingPointError("loss is nan at step 1")
    with monkeypatch.context() as m:
        m.setattr(tt._TokenizerRun, "train_step", diverge)
        _assert_user_error(train_tokenizer_cli, "heptapod-train-tokenizer", common, capsys, "loss is nan")
    assert not out.exists() or not any(f for f in out.iterdir() if f.name in tt.TOKENIZER_RUN_FILES), list(out.iterdir())
    assert _run(train_tokenizer_cli, common, capsys)[0] == 0  # the retry needs no --overwrite
    assert (out / "tokenizer.safetensors").exists()


def test_skip_bad_leaves_out_a_truncated_image_without_a_duplicate_row(vq_run, tmp_path, capsys):
    """Issue 24: `heptapod-extract --skip-bad` on a PNG whose header reads but whose data is truncated listed it twice
    and kept a duplicate row (the next image, written in its place). Now it is found up front, listed once, and the
    token set holds each readable image once, in order."""
    import io
    data = _images(tmp_path / "imgs", mode="L", size=(32, 32))
    buf = io.BytesIO(); Image.fromarray(np.full((32, 32), 90, np.uint8)).save(buf, "PNG")
    (data / "a" / "1b_trunc.png").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])   # between 1.png and 2.png
    ck = str(vq_run / "tokenizer.safetensors")
    rc, err = _run(extract_cli, ["--tokenizer", ck, "--data", str(data), "--out", str(tmp_path / "t"), "--skip-bad", "--augs", "2",
                                 *QUIET], capsys)
    assert rc == 0, err
    assert err.count("1b_trunc.png") == 1 and "skipped 1 unreadable image(s)" in err, err
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    assert meta["n"] == meta["done"] == 8 and [Path(p).name for p in meta["skipped_images"]] == ["1b_trunc.png"]
    codes = np.load(tmp_path / "t" / "codes.npy")
    tok = load_tokenizer(ck)
    from heptapod_nb.data import ImageFolderDataset
    good = ImageFolderDataset(data, size=32, channels=1, skip_bad=True, verify=True)
    assert [p.name for p, _ in good.samples][:4] == ["0.png", "1.png", "2.png", "3.png"]
    np.testing.assert_array_equal(codes[:, 0], tok.encode(torch.stack([good.load(i) for i in range(8)])).numpy())
    assert len({c.tobytes() for c in codes[:, 0]}) == 8                  # no row twice
