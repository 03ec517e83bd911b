"The demo recipe (`heptapod-demo --retrain`) is a call of `train.train`: a whole retrain at toy size, and its config."
import json
from pathlib import Path

import pytest
import torch

from heptapod_nb.bundle import DEMO_FILES
from heptapod_nb.demo import DemoRecipe, demo_train_config, retrain_demo
from heptapod_nb.model import load_model


def test_recipe_keeps_old_keys(capsys):
    r = DemoRecipe.from_dict({"model_steps": 7, "min_lr_ratio": 0.05, "lr": 2e-3})
    assert r.steps == 7 and r.min_lr == pytest.approx(1e-4)
    err = capsys.readouterr().err
    assert "DemoRecipe key 'model_steps' is now 'steps'" in err and err.count("\n") == 2
    c = demo_train_config(DemoRecipe(), "tokens", "out", {"window": 1}, 3.0, "cpu")
    assert (c.steps, c.lr, c.min_lr, c.warmup, c.ema, c.max_minutes, c.model) == (600, 2e-3, 1e-4, 100, 0.995, 3.0, {"window": 1})


def test_retrain_demo_at_toy_size(tmp_path):
    "Tokenizer, encoding, both models through train.train, float16 files, meta; ~20 s on one core."
    n = torch.get_num_threads()
    recipe = DemoRecipe(tokenizer_steps=2, steps=3, warmup=1, batch_size=8, shifts=0, eval_samples=0, threads=1,
                        model=dict(dim=32, depth=1, n_heads=2, head_width=32, head_depth=1, head_heads=2, targets_per_step=2))
    try: meta = retrain_demo(tmp_path, recipe, "cpu")
    finally: torch.set_num_threads(n)
    assert set(DEMO_FILES.values()) <= {p.name for p in tmp_path.iterdir()}
    assert meta["heptapod"]["steps"] == meta["baseline"]["steps"] == 3 and meta["tokenizer"]["steps"] == 2
    m, b = load_model(tmp_path / DEMO_FILES["model"]), load_model(tmp_path / DEMO_FILES["baseline"])
    assert (m.config.dim, m.config.targets_per_step, b.config.window, b.config.targets_per_step) == (32, 2, 1, 1)
    assert json.loads((tmp_path / "demo_meta.json").read_text())["recipe"]["steps"] == 3


def test_retrain_never_replaces_weights_or_writes_into_the_package(tmp_path, monkeypatch, capsys):
    """Issue 24: `heptapod-demo --retrain --no-launch --weights DIR` silently replaced DIR's three weights files, and
    without --weights it wrote into the installed package's assets/demo/. Now an existing weights folder needs
    --overwrite, and a retrain without --weights goes to runs/demo."""
    import heptapod_nb.demo as demo_mod
    from heptapod_nb.bundle import demo_dir, write_untrained_weights
    made = []
    monkeypatch.setattr(demo_mod, "retrain_demo", lambda out, recipe, device: made.append(Path(out)))   # no 30-min run
    d = write_untrained_weights(tmp_path / "w")
    before = {f.name: f.read_bytes() for f in d.iterdir()}
    assert demo_mod.demo_cli(["--retrain", "--no-launch", "--weights", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds demo weights" in err and "--overwrite" in err
    assert {f.name: f.read_bytes() for f in d.iterdir()} == before and made == []
    assert demo_mod.demo_cli(["--retrain", "--no-launch", "--weights", str(d), "--overwrite"]) == 0 and made == [d]
    monkeypatch.chdir(tmp_path)
    assert demo_mod.demo_cli(["--retrain", "--no-launch"]) == 0
    assert made[-1] == Path("runs/demo") and made[-1].resolve() != demo_dir().resolve()
