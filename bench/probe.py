"""The semantics probe (issue 16): unconditional models (num_classes=0) of the probe registry trained on MNIST-5k VQ
tokens without labels, same steps and seeds; per run: a linear probe (logistic regression, train -> val accuracy)
on frozen backbone states h_t (t = N/8, N/4, N/2, N-1) and their mean, with the random-init floor; MNIST-FID,
MNIST-IS, mean confidence and class coverage of unconditional samples; and the commitment curves (holistic guess
and greedy completion). Runs go to a process pool (one thread each) and are appended to --out as they finish, so
an interrupted benchmark resumes where it stopped; a results file made with other settings is refused.

    nice -n 19 .venv/bin/python bench/probe.py --configs w1,global,global_m2_nw8 --seeds 0 --steps 400 \\
        --workers 2 --out bench/results/probe_screen.json
"""
from __future__ import annotations
import argparse, contextlib, os, sys, time
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/probe.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="w1,global,global_m2_nw8",
                    help="comma-separated names of heptapod_nb.probe.PROBE (the ablation registry's, plus global_nw8)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--samples", type=int, default=1000, help="unconditional samples for FID / IS / coverage")
    ap.add_argument("--curve_samples", type=int, default=100, help="samples for the commitment curves (0: none)")
    ap.add_argument("--probe_n", type=int, default=0, help="fit the probe on this many train grids (0: all 4,500)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=2, help="runs in parallel (one thread each)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer checkpoint (default: the bundled demo VQ tokenizer)")
    ap.add_argument("--classifier", default=None, help="MNIST classifier .safetensors (default: the bundled one)")
    ap.add_argument("--tokens", default="runs/ablation_tokens", help="cache folder for the extracted token grids")
    ap.add_argument("--plot", default=None, help="write the plot to this PNG")
    ap.add_argument("--out", default="bench/results/probe.json")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return ap


def _job(args):
    name, seed, kw = args
    from heptapod_nb.probe import run_probe
    r = run_probe(name, seed, **kw)
    return {k: v for k, v in r.items() if not k.startswith("_")}


def run(a, argv: list[str]) -> dict:
    "Run the missing (config, seed) pairs of `a` (parsed arguments); returns the results document."
    import multiprocessing as mp
    import heptapod_nb.ablation as abl
    from heptapod_nb.config import write_json
    from heptapod_nb.metrics import mnist_classifier
    from heptapod_nb.probe import PROBE, probe_table, summarize_probe
    names = [n for n in a.configs.split(",") if n]
    unknown = [n for n in names if n not in PROBE]
    if unknown: raise ValueError(f"unknown config(s) {', '.join(unknown)}; known: {', '.join(PROBE)}")
    try: seeds = [int(s) for s in a.seeds.split(",") if s]
    except ValueError: raise ValueError(f"--seeds must be comma-separated integers, got {a.seeds!r}") from None
    if not names or not seeds: raise ValueError("--configs and --seeds must each name at least one")
    for k in ("steps", "batch", "samples", "workers"):
        if getattr(a, k) < 1: raise ValueError(f"--{k} must be >= 1, got {getattr(a, k)}")
    mnist_classifier("cpu", path=a.classifier)                    # a missing classifier fails before any training
    out = Path(a.out)
    settings = dict(steps=a.steps, batch=a.batch, lr=a.lr, samples=a.samples, curve_samples=a.curve_samples,
                    probe_n=a.probe_n, temperature=a.temperature, tokenizer=a.tokenizer, classifier=a.classifier)
    doc = abl.earlier_results(out, settings)                           # ConfigError (a ValueError) for other settings
    root = abl.ablation_tokens(a.tokens, a.tokenizer, progress=True)
    kw = dict(tokens_root=str(root), steps=a.steps, batch_size=a.batch, lr=a.lr, samples=a.samples,
              curve_samples=a.curve_samples, probe_n=a.probe_n, temperature=a.temperature, threads=1,
              tokenizer=a.tokenizer, classifier=a.classifier)
    runs = doc.get("runs", [])
    this = "bench/probe.py " + " ".join(argv)
    commands = doc.get("commands", [])
    commands += [this] if this not in commands else []             # the runs of one file may come from several calls
    have = {(r["name"], r["seed"]) for r in runs}
    jobs = [(n, s, kw) for s in seeds for n in names if (n, s) not in have]
    jobs.sort(key=lambda j: -PROBE[j[0]]["steps_mult"] * (1 + (PROBE[j[0]]["model"]["targets_per_step"] != 1)))  # dearest first
    print(f"{len(jobs)} runs to do ({len(have)} already in {out})", flush=True)
    machine = f"{os.cpu_count()} CPU cores, 1 thread per run, {a.workers} runs in parallel"
    t0 = time.time()
    with mp.get_context("spawn").Pool(min(a.workers, len(jobs))) if jobs else contextlib.nullcontext() as pool:
        for r in (pool.imap_unordered(_job, jobs) if jobs else ()):
            runs.append(r)
            print(f"[{time.time() - t0:6.0f}s] {r['name']} seed {r['seed']}: probe mean {r['probe_mean']:.3f} "
                  f"(floor {r['floor_probe_mean']:.3f}), FID {r['mnist_fid']:.1f}, IS {r['mnist_is']:.2f}, "
                  f"CE {r['val_next_ce']:.3f}, train {r['train_s']:.0f}s", flush=True)
            doc = dict(commands=commands, settings=settings, machine=machine, runs=runs, summary=summarize_probe(runs))
            write_json(out, doc, indent=1)
    doc = dict(commands=commands, settings=settings, machine=doc.get("machine", machine), runs=runs, summary=summarize_probe(runs))
    if runs: print(probe_table(doc["summary"]))
    if a.plot and runs:
        import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
        from heptapod_nb.probe import plot_probe
        plot_probe(runs); plt.tight_layout(); plt.savefig(a.plot, dpi=110)
    return doc


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parser().parse_args(argv)                                  # --help and usage errors: before torch is imported
    from heptapod_nb.config import cli_main
    return cli_main("bench/probe.py", lambda _: run(a, argv), argv)


if __name__ == "__main__":
    sys.exit(main())
