"""classifier: the bundled MNIST classifier (never retrained at run time) and its training recipe on the training core."""
import copy

import numpy as np
import pytest
import torch

from safetensors.torch import load_file

from heptapod_nb import classifier
from heptapod_nb.classifier import (MNISTClassifierConfig, class_accuracy, mnist_classifier, mnist_features, mnist_fid,
                                    mnist_predictions, save_mnist_classifier, train_mnist_classifier)
from heptapod_nb.config import FAST, ConfigError, save_weights
from heptapod_nb.data import load_mnist5k
from heptapod_nb.metrics import feature_stats, frechet_distance


# ---------------------------------------------------------------- MNIST classifier: the bundled weights, never retrained

@pytest.fixture(scope="session")
def clf():
    return mnist_classifier()                                           # heptapod_nb/assets/mnist_classifier.safetensors


def _float64_copy(clf):
    return copy.deepcopy(clf).double()


def test_bundled_classifier_matches_its_record(clf):
    "Same predictions and MNIST-FID as recorded when the file was made, on any CPU (checked against float64 too)."
    assert classifier.default_classifier_path().is_file() and classifier.default_classifier_path().parent.name == "assets"
    assert MNISTClassifierConfig.from_dict(clf.record["config"]) == MNISTClassifierConfig()   # default config, seed 0
    assert not clf.training and not any(p.requires_grad for p in clf.parameters())
    va, tr = load_mnist5k("val"), load_mnist5k("train")
    recorded = torch.tensor([int(c) for c in clf.record["val_predictions"]])
    assert len(recorded) == len(va) == 500
    pred = mnist_predictions(clf, va.images)
    with torch.no_grad():
        logits64 = _float64_copy(clf)(va.images.double())
    top2 = logits64.topk(2, dim=1).values
    near_tie = (top2[:, 0] - top2[:, 1]) < 1e-3
    # Measured (OMP_NUM_THREADS=1 python /tmp/measure.py, see BENCHMARKS.md "Evaluation metrics"): float32 vs float64
    # logits of the bundled classifier on val differ by at most 2.2e-6 (logits up to 7.3), and the smallest top-2
    # margin on val is 0.094, so no val digit is a near tie (< 1e-3) and a float32 prediction can only flip on a CPU
    # that rounds ~4e4 times worse than float32: the predictions must equal the record (<= 2 flips, near ties only).
    assert (logits64.argmax(1) == recorded)[~near_tie].all()              # the record is the float64 answer
    flips = pred != recorded
    assert not (flips & ~near_tie).any() and flips.sum() <= 2, flips.nonzero().flatten().tolist()
    acc = class_accuracy(clf, va.images, va.labels)
    assert abs(acc - clf.record["val_accuracy"]) <= flips.sum().item() / 500 + 1e-9
    assert clf.record["val_mistakes"] == (recorded != va.labels).sum().item()
    # MNIST-FID of 500 real train digits vs val: float32 features vs a float64 reference, and vs the record.
    # Measured: relative difference float32/float64 7.2e-8 (FID 2.46); tolerance 1e-5 (~100x).
    x = tr.images[::9]
    fid = mnist_fid(x, clf=clf)
    with torch.no_grad():
        c64 = _float64_copy(clf)
        fid64 = frechet_distance(*feature_stats(c64.features(x.double()).numpy()),
                                 *feature_stats(c64.features(va.images.double()).numpy()))
    assert fid == pytest.approx(fid64, rel=1e-5) and fid == pytest.approx(clf.record["mnist_fid_train500"], rel=1e-5)


def test_mnist_classifier_never_trains_and_names_the_fix(tmp_path, monkeypatch):
    bundled = load_file(str(classifier.default_classifier_path()))
    def no_training(*a, **k): raise AssertionError("mnist_classifier must not train")
    monkeypatch.setattr(classifier, "train_mnist_classifier", no_training)
    monkeypatch.setattr(classifier, "default_classifier_path", lambda: tmp_path / "assets" / "mnist_classifier.safetensors")
    with pytest.raises(FileNotFoundError, match="bench/classifier.py") as e:
        mnist_classifier()                                             # the bundled file is missing
    assert "mnist_classifier.safetensors" in str(e.value)
    assert not (tmp_path / "assets").exists()                          # nothing was written either
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="corrupt.*bench/classifier.py"):
        mnist_classifier(path=tmp_path / "junk.safetensors")
    save_weights(tmp_path / "tok.safetensors", {"w": torch.zeros(2)}, {}, kind="tokenizer")
    with pytest.raises(ConfigError, match="expected a 'mnist_classifier'"):
        mnist_classifier(path=tmp_path / "tok.safetensors")
    bundled.pop("head.weight")
    save_weights(tmp_path / "cut.safetensors", bundled, {"config": MNISTClassifierConfig().to_dict()}, kind="mnist_classifier")
    with pytest.raises(ConfigError, match="head.weight"):
        mnist_classifier(path=tmp_path / "cut.safetensors")


def test_save_mnist_classifier_round_trip_and_no_overwrite(clf, tmp_path):
    p = tmp_path / "clf.safetensors"
    save_mnist_classifier(p, clf, note="test")
    again = mnist_classifier(path=p)
    assert again is not clf and again.record["note"] == "test"
    assert again.record["val_predictions"] == clf.record["val_predictions"]
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), clf.state_dict().values()))
    with pytest.raises(FileExistsError, match="overwrite"):
        save_mnist_classifier(p, clf)
    with pytest.raises(ValueError, match=".safetensors"):
        save_mnist_classifier(tmp_path / "clf.pt", clf)


def test_retraining_lands_in_the_measured_band():
    """Training code still works: one seed lands in the val-accuracy band measured over 10 seeds (12 epochs, or the
    4 epochs of HEPTAPOD_FAST=1). Band and command: BENCHMARKS.md "Evaluation metrics"."""
    epochs = 4 if FAST else 12
    # Measured on the 2-core AVX-512 dev box, torch 2.13.0+cpu, one thread (val accuracy of 500 digits, 10 seeds), with
    # the recipe on the training core (optim.param_groups / lr_factor / backward_step, issue 17):
    #   OMP_NUM_THREADS=1 .venv/bin/python bench/classifier.py --seeds 0 1 2 3 4 5 6 7 8 9 --epochs 4 \
    #       --out bench/results/classifier_e4.json       -> 97.2% .. 97.8%, mean 97.52%, std 0.23%
    #   OMP_NUM_THREADS=1 .venv/bin/python bench/classifier.py --seeds 0 1 2 3 4 5 6 7 8 9 \
    #       --out bench/results/classifier.json          -> 97.6% .. 98.2%, mean 97.90%, std 0.17%
    # (the old loop, OneCycleLR and one AdamW group: 97.62% +- 0.29% and 98.04% +- 0.28%). Another CPU rounds
    # differently and lands like another seed, so the accepted band is mean +- 4 std.
    lo, hi = {4: (0.9658, 0.9846), 12: (0.9722, 0.9858)}[epochs]
    _, acc, _ = train_mnist_classifier(MNISTClassifierConfig(seed=0, epochs=epochs), verbose=False)
    assert lo <= acc <= hi, (epochs, acc)


class _Digits:
    "A few real digits in the shape of `load_mnist5k`'s datasets (`images`, `labels`, `len`)."
    def __init__(self, n):
        va = load_mnist5k("val"); self.images, self.labels = va.images[::500 // n][:n], va.labels[::500 // n][:n]
    def __len__(self): return len(self.images)


def test_training_goes_through_the_one_core(monkeypatch):
    "Weight decay by optim.param_groups, the lr of every step from optim.lr_factor, and each step by optim.backward_step."
    from heptapod_nb.optim import lr_factor, step_progress
    monkeypatch.setattr(classifier, "load_mnist5k", lambda split: _Digits(40))
    seen, core_step = [], classifier.backward_step
    def spy(loss, opt, params, **kw):
        seen.append(([g["lr"] for g in opt.param_groups], [g["weight_decay"] for g in opt.param_groups],
                     [{id(p) for p in g["params"]} for g in opt.param_groups]))
        return core_step(loss, opt, params, **kw)
    monkeypatch.setattr(classifier, "backward_step", spy)
    cfg = MNISTClassifierConfig(epochs=5, batch_size=8, width=4, feature_dim=8, lr=1e-2, min_lr=1e-3, warmup_frac=0.2)
    clf, acc, _ = train_mnist_classifier(cfg, verbose=False)
    steps, warmup = 5 * (40 // 8), 5                                      # 20% of 25 steps
    assert len(seen) == steps and 0 <= acc <= 1 and not clf.training
    want = [cfg.lr * lr_factor(step_progress(s, steps, warmup), s, warmup, cfg.min_lr / cfg.lr) for s in range(steps)]
    for s, (lrs, _, _) in enumerate(seen): assert lrs == [want[s]] * 2, (s, lrs, want[s])
    assert seen[0][0][0] == pytest.approx(cfg.lr / warmup) and max(want) == pytest.approx(cfg.lr)
    decay_ids, no_decay_ids = seen[0][2]
    assert seen[0][1] == [cfg.weight_decay, 0.0]
    bn, conv, head = clf.body[0][1], clf.body[0][0], clf.head
    assert {id(conv.weight), id(head.weight)} <= decay_ids and {id(bn.weight), id(bn.bias), id(head.bias)} <= no_decay_ids


def test_classifier_config_errors_name_the_field():
    for bad, field in ((dict(lr=0), "lr"), (dict(warmup_frac=1.0), "warmup_frac"), (dict(min_lr=1.0), "min_lr"),
                       (dict(weight_decay=-1e-4), "weight_decay"), (dict(dropout=1.0), "dropout"), (dict(epochs=0), "epochs")):
        with pytest.raises(ConfigError, match=f"MNISTClassifierConfig.{field}"):
            MNISTClassifierConfig(**bad)


def test_mnist_features_fid_and_accuracy(clf):
    va, tr = load_mnist5k("val"), load_mnist5k("train")
    f = mnist_features(clf, va.images[:20])
    assert f.shape == (20, clf.cfg.feature_dim) and f.dtype == np.float64
    real = mnist_fid(tr.images[::9], clf=clf)                              # 50 per class (sorted by class)
    noise = mnist_fid(torch.rand(500, 1, 32, 32) * 2 - 1, clf=clf)
    assert 0 <= real < noise / 10, (real, noise)
    assert abs(mnist_fid(va.images, clf=clf)) < 1e-6                      # identical sets
    assert class_accuracy(clf, va.images[:100], (va.labels[:100] + 1) % 10) < 0.05
    with pytest.raises(ValueError, match="labels"):
        class_accuracy(clf, va.images[:3], va.labels[:2])
    with pytest.raises(ValueError, match=r"\(B, 1, 32, 32\)"):
        mnist_features(clf, torch.zeros(2, 1, 28, 28))
