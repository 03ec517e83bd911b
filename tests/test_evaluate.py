import json

import numpy as np
import pytest
import torch

from heptapod_nb.data import load_mnist5k
from heptapod_nb.evaluate import (balanced_labels, block_seed, eval_cli, gather_parts, rank_blocks, sample_cli,
                                  sample_to_dir)
from heptapod_nb.metrics import load_npz_images, mnist_classifier, save_npz, to_uint8


@pytest.fixture(scope="module")
def clf_path(tmp_path_factory):
    p = tmp_path_factory.getbasetemp() / "mnist_classifier.safetensors"   # shared by the session
    mnist_classifier(path=p)
    return p


def test_labels_blocks_seeds():
    lab = balanced_labels(10, 5)
    assert torch.bincount(lab).tolist() == [5] * 10 and lab[:10].tolist() == list(range(10))
    for world in (1, 2, 3):
        got = sorted(b for r in range(world) for b in rank_blocks(103, 10, r, world))
        assert got == list(range(11))
    assert block_seed(0, 3) == block_seed(0, 3) != block_seed(1, 3)
    with pytest.raises(ValueError, match="rank"):
        rank_blocks(10, 2, 2, 2)


def test_eval_cli_mnist(tmp_path, clf_path, capsys):
    va = load_mnist5k("val")
    idx = torch.arange(0, 500, 25)                                           # 20 real digits, 2 per class
    p = save_npz(to_uint8(va.images[idx]), tmp_path / "s.npz", arr_1=va.labels[idx].numpy())
    out = tmp_path / "r" / "eval.json"
    res = eval_cli(["--samples", str(p), "--classifier", str(clf_path), "--out", str(out)])
    assert "mnist_fid" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["n"] == 20 and saved["dataset"] == "mnist" and saved["class_accuracy"] >= 0.9
    assert np.isfinite(saved["mnist_fid"]) and saved["mnist_fid"] == pytest.approx(res["mnist_fid"])
    noise = save_npz(np.random.default_rng(0).integers(0, 256, (20, 32, 32), dtype=np.uint8), tmp_path / "n.npz")
    res_n = eval_cli(["--samples", str(noise), "--classifier", str(clf_path)])
    assert "class_accuracy" not in res_n and res_n["mnist_fid"] > 5 * res["mnist_fid"]
    with pytest.raises(FileNotFoundError, match="--inception"):
        eval_cli(["--samples", str(p), "--dataset", "imagenet"])
    bad = save_npz(np.zeros((2, 16, 16, 3), np.uint8), tmp_path / "small.npz")
    with pytest.raises(ValueError, match="32 x 32"):
        eval_cli(["--samples", str(bad), "--classifier", str(clf_path)])


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    from heptapod_nb.model import Heptapod, HeptapodConfig, save_model
    from heptapod_nb.tokenizer import build_tokenizer, save_tokenizer
    d = tmp_path_factory.mktemp("tiny")
    tok = build_tokenizer("tiny-vq")
    cfg = HeptapodConfig(vocab_size=tok.config.codebook_size, grid=tok.grid, dim=32, depth=1, n_heads=2,
                         head_width=32, head_depth=1, head_heads=2, num_classes=3)
    torch.manual_seed(0)
    save_model(Heptapod(cfg), d / "model.safetensors"); save_tokenizer(tok, d / "tok.safetensors")
    return d


def test_sample_cli_world_size_independent_and_resumable(tiny_files, tmp_path):
    from heptapod_nb.model import load_model
    from heptapod_nb.tokenizer import load_tokenizer
    args = ["--model", str(tiny_files / "model.safetensors"), "--tokenizer", str(tiny_files / "tok.safetensors"),
            "--per_class", "1", "--batch_size", "2", "--seed", "7", "--no_progress"]
    s = sample_cli(args + ["--out_dir", str(tmp_path / "one")])
    assert s["n"] == 3 and s["images"] == 3
    x = load_npz_images(tmp_path / "one" / "samples.npz")
    with np.load(tmp_path / "one" / "samples.npz") as z:
        assert z["arr_1"].tolist() == [0, 1, 2]
    assert x.shape == (3, 32, 32, 3) and x.dtype == np.uint8 and (x[..., 0] == x[..., 2]).all()
    assert len(list((tmp_path / "one" / "png").glob("*_class*.png"))) == 3
    # two "ranks" (run one after the other) make the same images
    model, dec = load_model(tiny_files / "model.safetensors"), load_tokenizer(tiny_files / "tok.safetensors")
    for r in (1, 0):
        sample_to_dir(model, dec, balanced_labels(3, 1), tmp_path / "two", batch_size=2, seed=7, rank=r, world=2,
                      progress=False)
    assert (load_npz_images(gather_parts(tmp_path / "two", 3, 2, png=False)) == x).all()
    # resume: a lost block is remade identically, the other is kept
    (tmp_path / "one" / "parts" / "block_000001.npz").unlink()
    again = sample_cli(args + ["--out_dir", str(tmp_path / "one")])
    assert again["images"] == 1 and again["skipped"] == 1
    assert (load_npz_images(tmp_path / "one" / "samples.npz") == x).all()
    # another seed gives other images; changed settings in the same folder are refused
    other = sample_cli(args[:-2] + ["7000", "--no_progress", "--out_dir", str(tmp_path / "three")])
    assert other["n"] == 3 and not (load_npz_images(tmp_path / "three" / "samples.npz") == x).all()
    with pytest.raises(Exception, match="other settings"):
        sample_cli(args[:-2] + ["8", "--no_progress", "--out_dir", str(tmp_path / "one")])
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        sample_cli(["--model", str(tiny_files / "model.safetensors"), "--tokenizer", str(tmp_path / "nope.safetensors"),
                    "--out_dir", str(tmp_path / "x")])
