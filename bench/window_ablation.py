"""The window ablation (issue 8): window=1 (next token), 4, 16 and global, plus global with other targets_per_step,
on MNIST-5k VQ tokens, tiny preset, same steps and seeds, no CFG. Each run: train time, next-position val CE,
class accuracy and MNIST-FID of `--samples` class-balanced samples. Runs go to a process pool (one thread each)
and are appended to `--out` as they finish, so an interrupted benchmark resumes where it stopped.

    .venv/bin/python bench/window_ablation.py --steps 300 --seeds 0,1,2 --workers 2 \\
        --out bench/results/window_ablation.json
"""
from __future__ import annotations
import argparse, os, sys
from pathlib import Path

from heptapod_nb.ablation import (ABLATION, ResumableRuns, ablation_table, ablation_tokens, plot_ablation, run_ablation,
                                  summarize)
from heptapod_nb.config import ConfigError


def _job(args):
    name, seed, kw = args
    r = run_ablation(name, seed, **kw)
    r.pop("_images", None)
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="w1,w4,w16,global_m2,global,w1_long,global_nw3",
                    help=f"comma-separated names from {', '.join(ABLATION)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--evals", type=int, default=4, help="val-CE points along each run")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=2, help="runs in parallel (one thread each)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer checkpoint (default: the bundled demo VQ tokenizer)")
    ap.add_argument("--tokens", default="runs/ablation_tokens", help="cache folder for the extracted token grids")
    ap.add_argument("--plot", default=None, help="write the plot to this PNG")
    ap.add_argument("--out", default="bench/results/window_ablation.json")
    a = ap.parse_args(argv)
    names, seeds = a.configs.split(","), [int(s) for s in a.seeds.split(",")]
    for n in names:
        if n not in ABLATION: sys.exit(f"unknown config {n!r}; known: {', '.join(ABLATION)}")
    root = ablation_tokens(a.tokens, a.tokenizer, progress=True)
    kw = dict(tokens_root=str(root), steps=a.steps, batch_size=a.batch, lr=a.lr, evals=a.evals, samples=a.samples,
              temperature=a.temperature, threads=1, tokenizer=a.tokenizer)
    out = Path(a.out)
    settings = dict(steps=a.steps, batch=a.batch, lr=a.lr, samples=a.samples, temperature=a.temperature,
                    tokenizer=a.tokenizer)
    try: rr = ResumableRuns(out, settings,
                            "bench/window_ablation.py " + " ".join(sys.argv[1:] if argv is None else argv))
    except ConfigError as e: sys.exit(str(e))
    have = rr.done(lambda r: (r["name"], r["seed"]))
    jobs = [(n, s, kw) for s in seeds for n in names if (n, s) not in have]
    # dearest first, so the pool ends evenly
    jobs.sort(key=lambda j: -ABLATION[j[0]]["steps_mult"] * (1 + (ABLATION[j[0]]["model"]["targets_per_step"] > 1)))
    print(f"{len(jobs)} runs to do ({len(have)} already in {out})", flush=True)
    machine = f"{os.cpu_count()} CPU cores, 1 thread per run, {a.workers} runs in parallel"
    rr.run(_job, jobs, a.workers,
           lambda: dict(commands=rr.commands, settings=settings, machine=machine, runs=rr.runs,
                        summary=summarize(rr.runs)),
           lambda r: (f"{r['name']} seed {r['seed']}: CE {r['val_next_ce']:.3f}, acc {r['class_acc']:.1%}, "
                      f"FID {r['mnist_fid']:.1f}, train {r['train_s']:.0f}s"))
    runs = rr.runs
    print(ablation_table(summarize(runs)))
    if a.plot:
        import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
        plot_ablation(runs); plt.tight_layout(); plt.savefig(a.plot, dpi=110)


if __name__ == "__main__":
    main()
