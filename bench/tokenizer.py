"""Tiny tokenizers on MNIST-5k, CPU: train each preset under a wall-clock budget with `heptapod-train-tokenizer`'s
own code (`train_tokenizer`), then report val PSNR (mean of per-image dB on the [0, 1] scale, 500 val images), the
share of the K codes used on val and their perplexity (VQ), steps, wall and CPU seconds.

    flock /tmp/heptapod-bench.lock .venv/bin/python bench/tokenizer.py --out bench/results/tokenizer.json

The machine is shared: other processes may run at the same time, so the number of steps that fit in the budget
(and hence the PSNR) varies from run to run; `--max_steps` (the trainer's `steps`) fixes the work instead of the time.
"""
import argparse, os, platform, sys, tempfile, time
from pathlib import Path

import torch

from heptapod_nb.tokenizer_train import TokenizerTrainConfig, train_tokenizer
from heptapod_nb.config import write_json

GOALS = {"tiny-vq": "PSNR >= 25.5 dB and usage >= 95% in <= 3 min", "tiny-kl": "PSNR >= 29 dB in <= 3 min"}


def check(preset: str, r: dict) -> bool:
    v = r["val"]
    if preset == "tiny-vq": return v["psnr"] >= 25.5 and v["usage"] >= 0.95
    return v["psnr"] >= 29.0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="tiny-vq,tiny-kl")
    p.add_argument("--max_minutes", type=float, default=3.0)
    p.add_argument("--max_steps", type=int, default=100000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--override", action="append", default=[], help="tokenizer override for every preset")
    p.add_argument("--keep", help="folder to keep the trained tokenizers in (default: a temporary folder)")
    p.add_argument("--out", help="write the results as JSON")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench_tok_"))
    load0 = os.getloadavg()[0]
    rows = []
    for preset in a.presets.split(","):
        cfg = TokenizerTrainConfig(preset=preset, out=str(root / preset), max_minutes=a.max_minutes,
                                   steps=a.max_steps, seed=a.seed, device="cpu")
        t = time.time()
        _, s = train_tokenizer(cfg, a.override, progress=False)
        s["total_seconds"] = time.time() - t
        s["meets_goal"] = check(preset, s)
        s["goal"] = GOALS.get(preset, "")
        rows.append(s)
        v = s["val"]
        print(f"{preset:8s} steps {s['steps']:5d}  train {s['train_seconds']:6.1f} s  "
              f"cpu {s['cpu_seconds_this_process']:6.1f} s  val PSNR {v['psnr']:6.2f} dB"
              + (f"  usage {v['usage']:.1%}  perplexity {v['perplexity']:.0f}" if "usage" in v else "")
              + f"  goal {'met' if s['meets_goal'] else 'NOT met'}", flush=True)
    out = {"command": " ".join(["bench/tokenizer.py"] + (argv if argv is not None else sys.argv[1:])),
           "threads": a.threads,
           "loadavg_1min_before": load0, "loadavg_1min_after": os.getloadavg()[0], "torch": torch.__version__,
           "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "results": rows}
    print("\n| preset | steps | train s | val PSNR (dB) | codes used | perplexity | goal |"
          "\n|---|---|---|---|---|---|---|")
    for s in rows:
        v = s["val"]
        print(f"| {s['preset']} | {s['steps']} | {s['train_seconds']:.0f} | {v['psnr']:.2f} | "
              f"{v.get('usage', float('nan')):.1%} | {v.get('perplexity', float('nan')):.0f} | "
              f"{'met' if s['meets_goal'] else 'not met'} |"
              .replace("nan%", "-").replace("| nan |", "| - |"))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(a.out, out)
    return out


if __name__ == "__main__":
    main()
