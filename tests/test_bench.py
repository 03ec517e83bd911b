"Benchmark scripts: bench/window_ablation.py resumes from its JSON and refuses to mix settings (no training here)."
import importlib.util, json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m


def _run(name, seed, acc):
    return dict(name=name, seed=seed, steps=3, class_acc=acc, mnist_fid=50.0 + seed, val_next_ce=3.0, train_s=1.0,
                curve=[dict(step=3, train_s=1.0, val_next_ce=3.0)])


def test_window_ablation_resumes_and_refuses_other_settings(tmp_path, capsys, monkeypatch):
    wa = _load("window_ablation")
    monkeypatch.setattr(wa, "ablation_tokens", lambda root, tok, progress=False: Path(root))   # no extraction
    out = tmp_path / "abl.json"
    settings = dict(steps=3, batch=4, lr=2e-3, samples=10, temperature=1.0, tokenizer=None)
    runs = [_run(n, s, 0.5 + 0.1 * s) for n in ("w1", "global") for s in (0, 1, 2)]
    out.write_text(json.dumps(dict(settings=settings, runs=runs)))
    args = ["--steps", "3", "--batch", "4", "--samples", "10", "--configs", "w1,global", "--seeds", "0,1,2",
            "--tokens", str(tmp_path / "tok"), "--out", str(out)]
    wa.main(args)                                           # everything is done already: nothing is trained
    text = capsys.readouterr().out
    assert "0 runs to do (6 already" in text and "window=global, M=4" in text and "60.0% +- 10.0%" in text
    with pytest.raises(SystemExit, match="other settings"):
        wa.main(args[:1] + ["5"] + args[2:])                # --steps 5 would mix runs of different lengths
    with pytest.raises(SystemExit, match="unknown config"):
        wa.main(args[:-6] + ["--configs", "w3", "--seeds", "0"] + args[-4:])
