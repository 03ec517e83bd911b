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


def test_tokens_bench_keeps_finished_runs_and_tabulates_curves(tmp_path, capsys, monkeypatch):
    tb = _load("tokens")
    monkeypatch.setattr(tb, "ablation_tokens", lambda root, tok, progress=False: Path(root))   # no extraction
    out, png = tmp_path / "tokens.json", tmp_path / "tokens.png"
    args = ["--steps", "6", "--seeds", "0,1,2", "--evals", "2", "--samples", "10", "--out", str(out), "--plot", str(png)]
    curve = lambda s, acc: [dict(step=3, train_s=1.0, val_next_ce=3.0, class_acc=acc / 2, mnist_fid=80.0),
                            dict(step=6, train_s=2.0, val_next_ce=2.5, class_acc=acc, mnist_fid=40.0 + s)]
    runs = [dict(name=k, seed=s, curve=curve(s, 0.5 + 0.1 * s)) for k in ("vq", "kl") for s in (0, 1, 2)]
    settings = vars(tb.argparse.Namespace(vq="runs/tok_vq_tiny_v2/tokenizer.safetensors", kl="runs/tok_kl_tiny_v2/tokenizer.safetensors",
                                          seeds="0,1,2", steps=6, batch=32, lr=2e-3, evals=2, samples=10, diff_draws=None,
                                          workers=2, plot=None, out=str(out)))
    out.write_text(json.dumps(dict(settings=settings, partial=True, runs=runs)))
    tb.main(args)                                           # every run is finished: nothing is trained
    text = capsys.readouterr().out
    assert "keeping its 6 finished runs" in text and "| vq | 6 | 3 | 2 | 60.0% +- 10.0% | 41.0 +- 1.0 |" in text
    doc = json.loads(out.read_text())
    assert "partial" not in doc and len(doc["table"]) == 4 and png.stat().st_size > 10_000
    with pytest.raises(SystemExit, match="other settings"):
        tb.main(args[:1] + ["9"] + args[2:])                # --steps 9: refused, the finished runs are kept
    assert json.loads(out.read_text()) == doc
