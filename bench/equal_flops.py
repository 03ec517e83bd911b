"""What the head costs, at equal training FLOPs (issue 23 part 4): next-token against the global head at M = 2, 4, 16
and head width 128 / 64 (tiny preset, the h_t-only head `head_context="last"` for all, next_weight 8 for the global
head), on MNIST-5k VQ tokens, unconditional (`uncond`: linear probe, MNIST-FID, next-position CE;
`heptapod_nb.probe.run_probe`) and class-conditional (`cond`: class accuracy, MNIST-FID;
`heptapod_nb.ablation.run_ablation`).

The budget is --base (next-token) at --base-steps steps of --batch: FLOPs of one training step (forward + backward,
counted by torch's FlopCounterMode on the model as trained) of each config give its steps, round(budget / FLOPs per
step). Every run has the same lr and a cosine to lr/10 over its own steps, with warmup --warmup x its steps /
--base-steps (the same 5% of the run as the base). Each run records `flops_per_step`, `train_flops`, `flops_ratio`
(its FLOPs per image over the base's) and `checkpoints` (--evals points along the run: step, train_flops, val CE,
MNIST-FID of --eval-samples samples, and class accuracy when conditional). Runs are appended to --out as they finish,
so an interrupted benchmark resumes; a file made with other settings, or whose FLOP count for a config differs, is
refused. Runs go in the order seed, mode, config (seed 0 of everything first).

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python bench/equal_flops.py --seeds 0,1,2 --workers 1 \\
        --out bench/results/equal_flops.json --plot bench/results/equal_flops.png
"""
from __future__ import annotations
import argparse, os, sys
from pathlib import Path

MODES = ("uncond", "cond")
CONFIGS = ("w1_last,global_m2_nw8_last,global_m4_nw8_last,global_m16_nw8_last,"
           "global_m2_nw8_last_hw64,global_m4_nw8_last_hw64,global_m16_nw8_last_hw64,w1_last_hw64")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/equal_flops.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=CONFIGS, help="comma-separated names of heptapod_nb.ablation.ABLATION")
    ap.add_argument("--base", default="w1_last", help="the config whose --base-steps steps set the FLOPs budget")
    ap.add_argument("--base-steps", type=int, default=600)
    ap.add_argument("--modes", default="uncond,cond",
                    help="comma-separated: uncond (probe) and/or cond (class accuracy)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=30,
                    help="warmup steps of the base run; each run gets warmup x steps / base steps")
    ap.add_argument("--samples", type=int, default=500,
                    help="samples for the final FID / class accuracy (a multiple of 10)")
    ap.add_argument("--probe-n", type=int, default=0,
                    help="uncond: fit the probe on this many train grids (0: all 4,500)")
    ap.add_argument("--evals", type=int, default=4, help="checkpoints scored along each run")
    ap.add_argument("--eval-samples", type=int, default=200,
                    help="samples for the FID (and class accuracy) at each checkpoint")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=1, help="runs in parallel (processes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--tokenizer", default=None, help="tokenizer checkpoint (default: the bundled demo VQ tokenizer)")
    ap.add_argument("--tokens", default="runs/ablation_tokens", help="cache folder for the extracted token grids")
    ap.add_argument("--plot", default=None, help="write the plot of quality against training FLOPs to this PNG")
    ap.add_argument("--out", default="bench/results/equal_flops.json")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return ap


def _check(a) -> tuple[list[str], list[str], list[int]]:
    from heptapod_nb.ablation import ABLATION
    names, modes = [n for n in a.configs.split(",") if n], [m for m in a.modes.split(",") if m]
    unknown = [n for n in names + [a.base] if n not in ABLATION]
    if unknown: raise ValueError(f"unknown config(s) {', '.join(unknown)}; known: {', '.join(ABLATION)}")
    bad = [m for m in modes if m not in MODES]
    if bad: raise ValueError(f"unknown mode(s) {', '.join(bad)}; known: {', '.join(MODES)}")
    try: seeds = [int(s) for s in a.seeds.split(",") if s]
    except ValueError: raise ValueError(f"--seeds must be comma-separated integers, got {a.seeds!r}") from None
    if not names or not modes or not seeds:
        raise ValueError("--configs, --modes and --seeds must each name at least one")
    for k in ("base_steps", "batch", "samples", "evals", "workers", "threads"):
        if getattr(a, k) < 1: raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(a, k)}")
    if a.samples % 10 or a.eval_samples % 10:
        raise ValueError(f"--samples and --eval-samples must be multiples of 10, got {a.samples}, {a.eval_samples}")
    return names, modes, seeds


def flops_per_step(model_config, info: dict, batch: int) -> int:
    "FLOPs of one training step (forward + backward of the loss) of a fresh model, counted by FlopCounterMode."
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from heptapod_nb.model import Heptapod
    from heptapod_nb.model import random_tokens
    m = Heptapod(model_config).train()
    x, y = random_tokens(info, batch, "cpu", torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as fc:
        m(x, m.check_labels(y if model_config.num_classes else None, batch))["loss"].backward()
    return int(fc.get_total_flops())


def allot(flops: dict, base: str, base_steps: int, warmup: int) -> dict:
    """{config: dict(flops_per_step, flops_ratio, steps, warmup)} from FLOPs per step `flops` ({config: int}, holding
    `base`): steps = round(budget / FLOPs per step) for the budget `base` x `base_steps`, warmup scaled alike."""
    budget = flops[base] * base_steps
    return {n: dict(flops_per_step=f, flops_ratio=round(f / flops[base], 4), steps=max(1, round(budget / f)),
                    warmup=max(1, round(warmup * budget / f / base_steps))) for n, f in flops.items()}


def plan(a, names: list[str], modes: list[str], root) -> dict:
    "{mode: allot(...)} for the configs `names` as `run_probe` (uncond) and `run_ablation` (cond) build them."
    import torch
    from heptapod_nb.probe import probe_model
    from heptapod_nb.train_config import TrainConfig, model_config_for
    from heptapod_nb.train_data import TrainData
    torch.set_num_threads(a.threads)
    info = TrainData(TrainConfig(data=str(Path(root) / "train")), torch.device("cpu")).info
    out = {}
    for mode in modes:
        # both pin next_weight 1 and the prefix head unless set
        nc = 0 if mode == "uncond" else info["num_classes"]
        f = {n: flops_per_step(model_config_for(TrainConfig(preset="tiny", model=dict(probe_model(n), num_classes=nc)),
                                                info), info, a.batch)
             for n in dict.fromkeys([a.base] + names)}
        print(f"{mode}: budget {f[a.base] * a.base_steps / 1e12:.2f} TFLOP "
              f"({a.base}: {f[a.base] / 1e9:.2f} GFLOP per step of {a.batch} x {a.base_steps} steps)")
        out[mode] = {n: p for n, p in allot(f, a.base, a.base_steps, a.warmup).items() if n in names}
    return out


def _job(args):
    mode, name, seed, p, kw = args
    from heptapod_nb.ablation import run_ablation
    from heptapod_nb.probe import run_probe
    common = dict(kw["common"], steps=p["steps"], warmup=p["warmup"])
    if mode == "uncond": r = run_probe(name, seed, **common, **kw["uncond"])
    else:
        r = run_ablation(name, seed, **common, **kw["cond"])
        # (step, train_s, val CE, class acc, FID) along the run
        r["checkpoints"] = r.pop("curve")
    r = {k: v for k, v in r.items() if not k.startswith("_")}
    r.update(mode=mode, flops_per_step=p["flops_per_step"], train_flops=p["flops_per_step"] * r["steps"],
             flops_ratio=p["flops_ratio"])
    for pt in r.get("checkpoints", []): pt["train_flops"] = p["flops_per_step"] * pt["step"]
    return r


def run(a, argv: list[str]) -> dict:
    "Run the missing (seed, mode, config) triples of `a` (parsed arguments); returns the results document."
    import heptapod_nb.ablation as abl
    from heptapod_nb.config import ConfigError
    from heptapod_nb.classifier import mnist_classifier
    from heptapod_nb.probe import equal_flops_table, summarize_equal_flops
    names, modes, seeds = _check(a)
    mnist_classifier("cpu")                                           # a missing classifier fails before any training
    out = Path(a.out)
    settings = dict(base=a.base, base_steps=a.base_steps, batch=a.batch, lr=a.lr, warmup=a.warmup, samples=a.samples,
                    probe_n=a.probe_n, evals=a.evals, eval_samples=a.eval_samples, temperature=a.temperature,
                    tokenizer=a.tokenizer)
    rr = abl.ResumableRuns(out, settings, "bench/equal_flops.py " + " ".join(argv))   # ConfigError for other settings
    doc = rr.doc
    root = abl.ablation_tokens(a.tokens, a.tokenizer, progress=True)
    steps = plan(a, names, modes, root)
    # the FLOP count must not have changed under the runs
    for mode, ps in doc.get("plan", {}).items():
        for n, p in ps.items():
            if n in steps.get(mode, {}) and p != steps[mode][n]:
                raise ConfigError(f"{out} ran {mode} {n} with {p}, now {steps[mode][n]}: "
                                  "the FLOP count changed, use another --out")
    merged = {m: {**doc.get("plan", {}).get(m, {}), **steps.get(m, {})}
              for m in dict.fromkeys([*doc.get("plan", {}), *steps])}
    for mode in modes:
        print(f"{mode}:")
        for n, p in steps[mode].items():
            print(f"  {n:>26}: {p['flops_per_step'] / 1e9:7.2f} GFLOP/step ({p['flops_ratio']:.3f}x {a.base}) -> "
                  f"{p['steps']} steps, warmup {p['warmup']}", flush=True)
    common = dict(tokens_root=str(root), batch_size=a.batch, lr=a.lr, samples=a.samples, temperature=a.temperature,
                  threads=a.threads, tokenizer=a.tokenizer, evals=a.evals)
    kw = dict(common=common, uncond=dict(probe_n=a.probe_n, curve_samples=0, eval_samples=a.eval_samples),
              cond=dict(curve_samples=a.eval_samples))
    have = rr.done(lambda r: (r["mode"], r["name"], r["seed"]))
    jobs = [(m, n, s, steps[m][n], kw) for s in seeds for m in modes for n in names if (m, n, s) not in have]
    print(f"{len(jobs)} runs to do ({len(have)} already in {out})", flush=True)
    machine = doc.get("machine",
                      f"{os.cpu_count()} CPU cores, {a.threads} thread(s) per run, {a.workers} run(s) in parallel")

    def report(r):
        metric = f"probe mean {r['probe_mean']:.3f}" if r["mode"] == "uncond" else f"class acc {r['class_acc']:.3f}"
        return (f"{r['mode']} {r['name']} seed {r['seed']} ({r['steps']} steps): {metric}, FID {r['mnist_fid']:.1f}, "
                f"CE {r['val_next_ce']:.3f}, train {r['train_s']:.0f}s, wall {r['wall_s']:.0f}s")
    doc = rr.run(_job, jobs, a.workers,                                # in order: seed 0 of everything first
                 lambda: dict(commands=rr.commands, settings=settings, machine=machine, plan=merged, runs=rr.runs,
                              summary=summarize_equal_flops(rr.runs)), report, ordered=True)
    runs = rr.runs
    if runs: print(equal_flops_table(doc["summary"]))
    if a.plot and runs:
        import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
        from heptapod_nb.probe import plot_equal_flops
        plot_equal_flops(runs); plt.tight_layout(); plt.savefig(a.plot, dpi=110, bbox_inches="tight")
    return doc


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parser().parse_args(argv)                                  # --help and usage errors: before torch is imported
    from heptapod_nb.config import cli_main
    return cli_main("bench/equal_flops.py", lambda _: run(a, argv), argv)


if __name__ == "__main__":
    sys.exit(main())
