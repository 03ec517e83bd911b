"""Benchmark scripts: every bench/*.py imports and answers --help; bench/window_ablation.py and bench/tokens.py resume
from their JSON and refuse to mix settings; bench/classifier.py refuses to overwrite (no training here)."""
import importlib.util, json, os, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m


def test_every_bench_script_answers_help():
    "A bench script that does not parse, import or start fails here (each in its own process, all at once)."
    scripts = sorted((ROOT / "bench").glob("*.py"))
    assert len(scripts) >= 10 and ROOT / "bench" / "classifier.py" in scripts
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {s.name: subprocess.Popen([sys.executable, str(s), "--help"], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for s in scripts}
    failed = []
    for name, p in procs.items():
        out, err = p.communicate(timeout=600)                           # a hang guard, not a speed check
        if p.returncode != 0 or "usage:" not in out: failed.append(f"{name}: exit {p.returncode}\n{err[-2000:]}")
    assert not failed, "\n".join(failed)


def test_classifier_bench_refuses_overwrite_and_odd_settings(tmp_path, capsys):
    cb = _load("classifier")
    out = tmp_path / "c.json"; out.write_text("{}")
    assert cb.main(["--seeds", "0", "--out", str(out)]) == 2              # an existing result: not overwritten
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "{}"
    assert cb.main(["--seeds", "1", "--save", str(tmp_path / "c.safetensors")]) == 2   # the asset is seed 0
    assert "seed 0" in capsys.readouterr().err
    assert cb.main(["--seeds", "0", "--epochs", "4", "--save", str(tmp_path / "c.safetensors")]) == 2
    assert cb.main(["--seeds", "0", "0"]) == 2 and "repeats" in capsys.readouterr().err
    assert not (tmp_path / "c.safetensors").exists()


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
