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
import argparse, json, os, sys
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/probe.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
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
    ap.add_argument("--keep", default=None, help="also save each trained model to KEEP/NAME_sSEED.safetensors")
    ap.add_argument("--diagnose", default=None, metavar="KEEP",
                    help="instead of training: next-position val CE by grid position "
                         "(heptapod_nb.probe.ce_by_position) of every model saved in KEEP by --keep, written to --out")
    ap.add_argument("--cost", type=int, default=0, metavar="ROUNDS",
                    help="instead of training: time training steps of the configs in ROUNDS interleaved rounds "
                         "(heptapod_nb.probe.step_cost, 5 steps per round) and write the ratios to the first config "
                         "to --out")
    ap.add_argument("--out", default="bench/results/probe.json")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return ap


def _job(args):
    name, seed, kw, keep = args
    from heptapod_nb.probe import run_probe
    from heptapod_nb.model import save_model
    r = run_probe(name, seed, **kw)
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        save_model(r["_model"], Path(keep) / f"{name}_s{seed}.safetensors")
    return {k: v for k, v in r.items() if not k.startswith("_")}


def cost(a, argv: list[str], names: list[str], root) -> dict:
    """The --cost mode: seconds per training step of each config (unconditional, tiny preset), interleaved;
    -> the document."""
    import torch
    from heptapod_nb.config import write_json
    from heptapod_nb.probe import probe_model, step_cost, token_grids
    from heptapod_nb.train_config import TrainConfig, model_config_for
    from heptapod_nb.train_data import TrainData
    if Path(a.out).exists():
        raise FileExistsError(f"{a.out} exists: --cost does not resume; use another --out")
    torch.set_num_threads(1)
    info = TrainData(TrainConfig(data=str(Path(root) / "train")), torch.device("cpu")).info
    cfgs = {n: model_config_for(TrainConfig(preset="tiny", model=probe_model(n)), info) for n in names}
    res = step_cost(cfgs, token_grids(root, "train")[0], batch_size=a.batch, steps=5, rounds=a.cost)
    for n, r in res.items():
        print(f"{n:>20}: {1e3 * r['s_per_step']:7.1f} ms/step, {r['ratio']:.3f}x {names[0]} "
              f"[{r['ratio_min']:.3f}, {r['ratio_max']:.3f}]")
    doc = dict(commands=["bench/probe.py " + " ".join(argv)],
               settings=dict(batch=a.batch, rounds=a.cost, steps_per_round=5),
               machine=f"{os.cpu_count()} CPU cores, 1 thread", cost=res)
    write_json(Path(a.out), doc, indent=1)
    return doc


def diagnose(a, argv: list[str], root) -> dict:
    """The --diagnose mode: CE by position of the models in a --keep folder; -> the document (runs and per-config
    summary)."""
    import numpy as np, torch
    from heptapod_nb.ablation import mean_std
    from heptapod_nb.config import write_json
    from heptapod_nb.model import load_model
    from heptapod_nb.probe import ce_by_position, token_grids
    files = sorted(Path(a.diagnose).glob("*_s*.safetensors"))
    if not files: raise FileNotFoundError(f"no NAME_sSEED.safetensors models in {a.diagnose} (made by --keep)")
    torch.set_num_threads(1)
    vx, _ = token_grids(root, "val")
    out = Path(a.out)
    runs = json.loads(out.read_text())["runs"] if out.exists() else []    # resumes: models already in --out are kept
    if any("ce_by_row" not in r for r in runs): raise ValueError(f"{out} is not a --diagnose result: use another --out")
    have = {(r["name"], r["seed"]) for r in runs}
    for f in files:
        name, seed = f.stem.rsplit("_s", 1)
        if (name, int(seed)) in have: continue
        m = load_model(f).eval()
        ce = ce_by_position(m, vx)
        h, w = m.config.grid
        runs.append(dict(name=name, seed=int(seed), ce_by_position=[round(float(v), 5) for v in ce],
                         ce_by_row=[round(float(v), 5) for v in ce.reshape(h, w).mean(1)],
                         val_next_ce=round(float(ce.mean()), 5)))
        print(f"{name} seed {seed}: CE {ce.mean():.3f}, by row " + " ".join(f"{v:.2f}" for v in runs[-1]["ce_by_row"]),
              flush=True)
    runs.sort(key=lambda r: (r["name"], r["seed"]))
    summary = []
    for name in dict.fromkeys(r["name"] for r in runs):
        rs = [r for r in runs if r["name"] == name]
        rows = np.array([r["ce_by_row"] for r in rs])
        summary.append(dict(name=name, seeds=len(rs), ce_by_row=rows.mean(0).round(5).tolist(),
                            ce_by_row_std=(rows.std(0, ddof=1) if len(rs) > 1 else 0 * rows[0]).round(5).tolist(),
                            val_next_ce=mean_std([r["val_next_ce"] for r in rs])))
    doc = dict(commands=["bench/probe.py " + " ".join(argv)], models=str(a.diagnose), runs=runs, summary=summary)
    write_json(out, doc, indent=1)
    return doc


def run(a, argv: list[str]) -> dict:
    "Run the missing (config, seed) pairs of `a` (parsed arguments); returns the results document."
    import heptapod_nb.ablation as abl
    from heptapod_nb.classifier import mnist_classifier
    from heptapod_nb.probe import PROBE, probe_table, summarize_probe
    names = [n for n in a.configs.split(",") if n]
    unknown = [n for n in names if n not in PROBE]
    if unknown: raise ValueError(f"unknown config(s) {', '.join(unknown)}; known: {', '.join(PROBE)}")
    try: seeds = [int(s) for s in a.seeds.split(",") if s]
    except ValueError: raise ValueError(f"--seeds must be comma-separated integers, got {a.seeds!r}") from None
    if not names or not seeds: raise ValueError("--configs and --seeds must each name at least one")
    for k in ("steps", "batch", "samples", "workers"):
        if getattr(a, k) < 1: raise ValueError(f"--{k} must be >= 1, got {getattr(a, k)}")
    if a.diagnose: return diagnose(a, argv, abl.ablation_tokens(a.tokens, a.tokenizer, progress=True))
    if a.cost: return cost(a, argv, names, abl.ablation_tokens(a.tokens, a.tokenizer, progress=True))
    mnist_classifier("cpu", path=a.classifier)                    # a missing classifier fails before any training
    out = Path(a.out)
    settings = dict(steps=a.steps, batch=a.batch, lr=a.lr, samples=a.samples, curve_samples=a.curve_samples,
                    probe_n=a.probe_n, temperature=a.temperature, tokenizer=a.tokenizer, classifier=a.classifier)
    rr = abl.ResumableRuns(out, settings, "bench/probe.py " + " ".join(argv))   # ConfigError for other settings
    root = abl.ablation_tokens(a.tokens, a.tokenizer, progress=True)
    kw = dict(tokens_root=str(root), steps=a.steps, batch_size=a.batch, lr=a.lr, samples=a.samples,
              curve_samples=a.curve_samples, probe_n=a.probe_n, temperature=a.temperature, threads=1,
              tokenizer=a.tokenizer, classifier=a.classifier)
    have = rr.done(lambda r: (r["name"], r["seed"]))
    jobs = [(n, s, kw, a.keep) for s in seeds for n in names if (n, s) not in have]
    # dearest first, so that the pool ends evenly
    jobs.sort(key=lambda j: -PROBE[j[0]]["steps_mult"] * (1 + (PROBE[j[0]]["model"]["targets_per_step"] != 1)))
    print(f"{len(jobs)} runs to do ({len(have)} already in {out})", flush=True)
    machine = rr.doc.get("machine", f"{os.cpu_count()} CPU cores, 1 thread per run, {a.workers} runs in parallel")
    doc = rr.run(_job, jobs, a.workers,
                 lambda: dict(commands=rr.commands, settings=settings, machine=machine, runs=rr.runs,
                              summary=summarize_probe(rr.runs)),
                 lambda r: (f"{r['name']} seed {r['seed']}: probe mean {r['probe_mean']:.3f} "
                            f"(floor {r['floor_probe_mean']:.3f}), FID {r['mnist_fid']:.1f}, IS {r['mnist_is']:.2f}, "
                            f"CE {r['val_next_ce']:.3f}, train {r['train_s']:.0f}s"))
    runs = rr.runs
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
