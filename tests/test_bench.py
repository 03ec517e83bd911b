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


@pytest.mark.parametrize("script", ["bench/gpu.py", "bench/speed_llamagen.py"])
def test_gpu_and_llamagen_benches_answer_help_without_torch(script):
    "--help parses and prints without importing torch (a GPU box's first check, and seconds here)."
    code = (f"import runpy, sys; sys.argv = ['{script}', '--help']\n"
            f"try: runpy.run_path('{script}', run_name='__main__')\nexcept SystemExit as e: assert e.code == 0\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage:" in out.stdout and out.stdout.strip().endswith("False"), out.stderr


def test_gpu_bench_peaks_mfu_and_counted_flops():
    "bench/gpu.py's CPU-safe parts: the peak table by device name, the MFU formula, FLOPs counted per optimizer step."
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from heptapod_nb.model import HeptapodConfig, Heptapod
    from heptapod_nb.model import LossModule, random_tokens, token_info
    gpu = _load("gpu")
    for name, tf in [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
                     ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
                     ("NVIDIA GeForce RTX 4090", None)]:
        assert gpu.peak_tflops_for(name) == tf, name
    assert gpu.mfu(3e15, 2.0, 1e15 * 3) == pytest.approx(0.5) and gpu.mfu(1e15, 1.0, None) is None
    with pytest.raises(ValueError, match="some time"): gpu.mfu(1e15, 0.0, 1e15)
    # one linear layer, input without gradient: forward x @ W^T and backward's weight gradient, 2*B*I*O each
    torch.manual_seed(0)
    lin, x = torch.nn.Linear(8, 4, bias=False), torch.randn(3, 8)
    assert gpu.step_flops(lambda b: lin(x[:b]).sum(), 3) == 2 * (2 * 3 * 8 * 4)
    assert gpu.step_flops(lambda b: lin(x[:b]).sum(), 3, accumulation=4) == 4 * 2 * (2 * 3 * 8 * 4)
    # a Heptapod: FLOPs grow with the batch exactly, and equal torch's own FlopCounterMode (an independent count)
    mc = HeptapodConfig(dim=32, depth=1, n_heads=2, head_width=32, head_depth=1, head_heads=2, vocab_size=16, grid=(4, 4),
                        num_classes=4, loss_chunk=0)
    net, info = LossModule(Heptapod(mc)), token_info(mc)
    loss = lambda b: net(*random_tokens(info, b, "cpu", torch.Generator().manual_seed(b)))
    f1, f2 = gpu.step_flops(loss, 1), gpu.step_flops(loss, 2)
    with FlopCounterMode(display=False) as fc: loss(2).backward()
    assert f1 > 0 and f2 == 2 * f1 == fc.get_total_flops()


def test_gpu_bench_auto_micro_batch_fits_the_budget(capsys):
    "bench/gpu.py --micro-batch auto on the CPU with a budget: heptapod-train's planner, a divisor that fits (and too small a budget refused)."
    import torch
    from heptapod_nb.config import ConfigError
    gpu = _load("gpu")
    tiny = ["--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--sample-n", "0", "--threads", "1",
            "dim=32", "depth=1", "n_heads=2", "head_width=32", "head_depth=1", "head_heads=2"]
    r = gpu.main([*tiny, "--batch", "8", "--micro-batch", "auto", "--memory-budget-gb", "0.05"])
    plan, tr = r["micro_batch_plan"], r["train"]
    assert 8 % tr["micro_batch"] == 0 and tr["micro_batch"] * tr["accumulation"] == 8 and tr["micro_batch"] == plan["micro_batch"]
    assert plan["planned_bytes"] <= plan["margin"] * plan["budget_bytes"] and plan["per_image_bytes"] > 0
    assert tr["images_per_s"] == pytest.approx(8 / tr["sec_per_step"]) and tr["tokens_per_s"] == pytest.approx(64 * tr["images_per_s"])
    assert tr["flops_per_step"] == pytest.approx(8 * tr["flops_per_image"]) and tr["mfu"] is None
    # a budget with room for 2.5 images (as measured): micro-batch 2, 4 accumulated
    gb = (plan["resident_bytes"] + plan["fixed_bytes"] + 2.5 * plan["per_image_bytes"]) / plan["margin"] / 2**30
    two = gpu.main([*tiny, "--batch", "8", "--micro-batch", "auto", "--memory-budget-gb", str(gb)])
    assert two["micro_batch_plan"]["micro_batch"] in (2, 4) and two["train"]["accumulation"] == 8 // two["train"]["micro_batch"]
    fixed = gpu.main([*tiny, "--batch", "8", "--micro-batch", "2"])["train"]
    assert (fixed["micro_batch"], fixed["accumulation"]) == (2, 4) and fixed["flops_per_step"] == tr["flops_per_step"]
    with pytest.raises(ConfigError, match="does not fit"):
        gpu.main([*tiny, "--batch", "8", "--micro-batch", "auto", "--memory-budget-gb", "1e-6"])


FAKE_GPT = '''
"A stand-in for LlamaGen's gpt.py with its interface (ModelArgs, Transformer(idx, cond_idx, targets) -> (logits, loss))."
from dataclasses import dataclass
import torch, torch.nn as nn, torch.nn.functional as F
from utils.drop_path import DropPath          # as LlamaGen's file does

@dataclass
class ModelArgs:
    dim: int = 64; n_layer: int = 1; n_head: int = 2; multiple_of: int = 256; vocab_size: int = 16; block_size: int = 16
    num_classes: int = 10; cls_token_num: int = 1; token_dropout_p: float = 0.1; resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1

class FF(nn.Module):
    def __init__(self, a):
        super().__init__(); h = int(2 * 4 * a.dim / 3); h = h if h % a.multiple_of == 0 else h + a.multiple_of - h % a.multiple_of
        self.w1 = nn.Linear(a.dim, h, bias=False); self.w2 = nn.Linear(h, a.dim, bias=False)

class Layer(nn.Module):
    def __init__(self, a): super().__init__(); self.feed_forward = FF(a); self.drop_path = DropPath(0.0)

class Transformer(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.tok, self.cls = nn.Embedding(a.vocab_size, a.dim), nn.Embedding(a.num_classes, a.dim)
        self.layers = nn.ModuleList([Layer(a)]); self.out = nn.Linear(a.dim, a.vocab_size)
    def forward(self, idx, cond_idx, targets=None):
        h = torch.cat([self.cls(cond_idx)[:, None], self.tok(idx)], 1)
        ff = self.layers[0].feed_forward
        logits = self.out(h + ff.w2(F.silu(ff.w1(h))))
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())
'''


def test_llamagen_speed_bench_rows_and_skip(tmp_path, capsys):
    "bench/speed_llamagen.py: LlamaGen's row from a gpt.py with its interface (its utils import stood in for), "
    "skipped with a message when absent; LlamaGen's FFN width is made ours."
    from heptapod_nb.transformer import swiglu_hidden
    sl = _load("speed_llamagen")
    find_multiple = lambda n, k: n if n % k == 0 else n + k - n % k            # LlamaGen's rounding of the FFN width
    for dim in (64, 192, 256, 768, 1024, 1280):
        assert find_multiple(int(2 * 4 * dim / 3), sl.multiple_of_for(dim, swiglu_hidden(dim))) == swiglu_hidden(dim)
    tiny = ["--dim", "32", "--depth", "1", "--heads", "2", "--vocab", "16", "--grid", "4", "--batch", "2", "--rounds", "2",
            "--steps", "1", "--warmup", "1", "--threads", "1"]
    r = sl.main([*tiny, "--llamagen", str(tmp_path / "absent")])
    assert "not found" in capsys.readouterr().err and [x["kind"] for x in r["rows"]] == ["w1", "global_m2"]
    assert list(r["goals"]) == ["eager: global M=2 <= 1.15x our next-token step"]
    (tmp_path / "lg").mkdir(); (tmp_path / "lg" / "gpt.py").write_text(FAKE_GPT)
    r = sl.main([*tiny, "--llamagen", str(tmp_path / "lg"), "--also", "loss_chunk=0", "--out", str(tmp_path / "s.json")])
    rows = {x["kind"]: x for x in r["rows"]}
    assert list(rows) == ["llamagen", "w1", "global_m2", "w1_(loss_chunk=0)", "global_m2_(loss_chunk=0)"]
    assert rows["llamagen"]["time_vs_llamagen"]["median"] == 1.0 and rows["w1_(loss_chunk=0)"]["time_vs_our_next_token"]["median"] == 1.0
    assert rows["w1"]["time_vs_llamagen"]["median"] > 0 and len(r["goals"]) == 2
    assert json.loads((tmp_path / "s.json").read_text())["rows"][0]["name"].startswith("LlamaGen")
    assert "| LlamaGen GPT (its gpt.py) | eager |" in capsys.readouterr().out
