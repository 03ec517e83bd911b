"""VQ tokens + cross-entropy vs KL tokens + per-token diffusion (issue 8; the paper: VQ learns faster early, KL is
better late). Same tiny preset, same global head, same steps and seeds; each run is scored at several points along
training (class accuracy and MNIST-FID of class-balanced samples, no CFG), giving quality against steps. One plot.

The two tokenizers are the tiny ones trained by `bench/tokenizer.py` (same data, same time budget):

    # writes runs/tok_vq_tiny_v2, runs/tok_kl_tiny_v2:
    .venv/bin/python bench/tokenizer.py --out bench/results/tokenizer.json
    .venv/bin/python bench/tokens.py --steps 450 --seeds 0,1,2 --workers 2 --evals 3 --samples 200 --diff_draws 1 \\
        --out bench/results/tokens.json --plot bench/results/tokens.png
"""
from __future__ import annotations
import argparse, multiprocessing as mp, os, sys, time
from pathlib import Path

from heptapod_nb.ablation import (ablation_tokens, curve_table, earlier_results, plot_curves, run_ablation,
                                  summarize_curves)
from heptapod_nb.config import ConfigError, write_json


def _job(args):
    kind, seed, kw = args
    r = run_ablation(kind, seed, **kw); r.pop("_images", None)
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vq", default="runs/tok_vq_tiny_v2/tokenizer.safetensors")
    ap.add_argument("--kl", default="runs/tok_kl_tiny_v2/tokenizer.safetensors")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--evals", type=int, default=4, help="scored points along each run")
    ap.add_argument("--samples", type=int, default=200, help="samples per scored point")
    ap.add_argument("--diff_draws", type=int, default=None,
                    help="noise draws per target of the KL diffusion loss "
                         "(default: the preset's 4; 1 is ~3x cheaper on CPU)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--out", default="bench/results/tokens.json")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    toks = {k: (p, ablation_tokens(Path("runs/bench_tokens") / k, p, progress=True))
            for k, p in (("vq", a.vq), ("kl", a.kl))}
    jobs = [(k, s, dict(tokens_root=str(root), tokenizer=p, steps=a.steps, batch_size=a.batch, lr=a.lr, evals=a.evals,
                        samples=a.samples, curve_samples=a.samples,
                        model=dict(window="global", **({"diff_draws": a.diff_draws} if a.diff_draws else {})),
                        threads=1))
            for s in seeds for k, (p, root) in toks.items()]
    out, runs, t0 = Path(a.out), [], time.time()
    cmd = "bench/tokens.py " + " ".join(sys.argv[1:] if argv is None else argv)
    try: old = earlier_results(out, {k: v for k, v in vars(a).items() if k not in ("workers", "plot", "out", "seeds")})
    except ConfigError as e: sys.exit(str(e))
    if old:   # resume: keep the finished runs of an earlier invocation with the same settings
        runs = [r for r in old["runs"] if r["seed"] in seeds]
        print(f"{out}: keeping its {len(runs)} finished runs with the same settings (delete it to train them again)",
              flush=True)
    done = {(r["name"], r["seed"]) for r in runs}
    jobs = [j for j in jobs if (j[0], j[1]) not in done]
    with mp.get_context("spawn").Pool(min(a.workers, len(jobs)) or 1) as pool:
        for r in pool.imap_unordered(_job, jobs):
            runs.append(r)
            # a crash loses one run at most
            write_json(out, dict(command=cmd, settings=vars(a), partial=True, runs=runs), indent=1)
            print(f"[{time.time() - t0:6.0f}s] {r['name']} seed {r['seed']}: " +
                  ", ".join(f"step {c['step']} acc {c['class_acc']:.1%} FID {c['mnist_fid']:.1f}" for c in r["curve"]),
                  flush=True)
    table = summarize_curves(sorted(runs, key=lambda r: (r["name"] != "vq", r["seed"])))
    print(curve_table(table))
    doc = dict(command=cmd, settings=vars(a),
               machine=f"{os.cpu_count()} CPU cores, 1 thread per run, {a.workers} runs in parallel", runs=runs,
               table=table)
    write_json(out, doc, indent=1)
    if a.plot:
        import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
        fig, axs = plt.subplots(1, 2, figsize=(10, 3.8))
        plot_curves(table, axs, labels=dict(vq="VQ tokens (cross-entropy)", kl="KL tokens (diffusion)"))
        fig.suptitle(f"VQ vs KL tokens, tiny preset, global head, mean +- std over {len(seeds)} seeds")
        fig.tight_layout(); fig.savefig(a.plot, dpi=110)

if __name__ == "__main__":
    main()
