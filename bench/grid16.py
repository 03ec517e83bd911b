"""The 16x16-grid miniature (issue 16 item 4): the paper's ImageNet grid is 16x16 = 256 tokens, the project's MNIST
grid 8x8. This trains a stride-2 VQ tokenizer on MNIST-5k at 32x32 (the `tiny-vq` preset with `ch_mult=(1, 2)`: one
downsampling, 16x16 codes; its reconstruction PSNR and codebook usage are recorded), extracts the token grids, then
trains the probe registry's configurations on them at equal steps and seeds, **unconditional** (`uncond`: linear
probe of backbone states, MNIST-FID / IS, coverage, commitment curves; `heptapod_nb.probe.run_probe`) and
**class-conditional** (`cond`: class accuracy, MNIST-FID; `heptapod_nb.ablation.run_ablation`). Runs are appended to
--out as they finish (`runs` with `mode`, `name`, `seed`, `steps`, `train_s` and the metrics, plus a `summary` per
mode and config), so an interrupted benchmark resumes where it stopped; a file made with other settings is refused.
The tokenizer run in WORK/tokenizer is reused (and its interrupted training resumed) by a later call.

    nice -n 19 .venv/bin/python bench/grid16.py --configs w1,global_m2_nw8 --modes uncond --seeds 0 --steps 300 \\
        --batch 16 --samples 200 --workers 1 --out bench/results/grid16.json
    # on a GPU machine: bench/gpu.py --grid16 (more steps, seeds and workers; training on the GPU)
"""
from __future__ import annotations
import argparse, json, os, sys
from pathlib import Path

MODES = ("uncond", "cond")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/grid16.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="w1,w16,global_m2_nw8",
                    help="comma-separated names of heptapod_nb.probe.PROBE "
                         "(w1 next-token, w16 window 16, global heads)")
    ap.add_argument("--modes", default="uncond,cond",
                    help="comma-separated: uncond (probe, IS) and/or cond (class accuracy)")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--samples", type=int, default=200, help="samples for FID / IS / class accuracy (a multiple of 10)")
    ap.add_argument("--curve_samples", type=int, default=0, help="uncond: samples for the commitment curves (0: none)")
    ap.add_argument("--probe_n", type=int, default=0,
                    help="uncond: fit the probe on this many train grids (0: all 4,500)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=1, help="runs in parallel (processes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--tokenizer", default=None,
                    help="a trained 16x16 VQ tokenizer (default: train one into WORK/tokenizer)")
    ap.add_argument("--tokenizer_minutes", type=float, default=6.0, help="training budget of that tokenizer (minutes)")
    ap.add_argument("--work", default="runs/grid16", help="folder for the tokenizer run and the token grids")
    ap.add_argument("--out", default="bench/results/grid16.json")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return ap


def tokenizer16(a) -> tuple[Path, dict]:
    "The stride-2 tokenizer (trained into WORK/tokenizer unless --tokenizer) and its reconstruction on MNIST-5k val."
    import torch
    from heptapod_nb.config import ConfigError
    from heptapod_nb.data import load_mnist5k
    from heptapod_nb.tokenizer import load_tokenizer
    from heptapod_nb.tokenizer_train import TokenizerTrainConfig, evaluate, train_tokenizer
    from heptapod_nb.tokens import VQTokens, token_kind
    out = Path(a.work) / "tokenizer"
    path = Path(a.tokenizer) if a.tokenizer else out / "tokenizer.safetensors"
    if a.tokenizer and not path.exists(): raise FileNotFoundError(f"--tokenizer {path} does not exist")
    info = {}
    if not a.tokenizer and not (out / "summary.json").exists():    # not trained, or interrupted: (re)start or resume
        resume = (out / "train_state.pt").exists() and path.exists()
        print(f"training the 16x16 tokenizer into {out} ({a.tokenizer_minutes} min{', resumed' if resume else ''})",
              flush=True)
        cfg = TokenizerTrainConfig(preset="tiny-vq", out=str(out), max_minutes=a.tokenizer_minutes, num_workers=0,
                                   seed=0)
        _, info = train_tokenizer(cfg, ["ch_mult=[1, 2]"], resume=resume, overwrite=not resume, progress=False)
    elif (out / "summary.json").exists() and not a.tokenizer:
        info = json.loads((out / "summary.json").read_text())
    tok = load_tokenizer(path).eval()
    grid = tuple(tok.encode(torch.zeros(1, 1, 32, 32)).shape[-2:])
    if not isinstance(token_kind(tok), VQTokens) or grid != (16, 16):
        raise ConfigError(f"{path} is a {tok.kind} tokenizer with a {grid} grid at 32x32; the miniature needs VQ 16x16")
    val = evaluate(tok, load_mnist5k("val"))
    return path, dict(path=str(path), grid=list(grid), steps=info.get("steps"), train_seconds=info.get("train_seconds"),
                      val_psnr=round(val["psnr"], 2), val_usage=round(val["usage"], 4),
                      val_perplexity=round(val["perplexity"], 1))


def _job(args):
    mode, name, seed, kw = args
    import torch
    from heptapod_nb.ablation import ABLATION, run_ablation
    from heptapod_nb.probe import PROBE, run_probe
    if mode == "uncond":
        r = run_probe(name, seed, **kw["common"], **kw["uncond"])
    else:                                                             # the registry's heads, class-conditional
        r = run_ablation(name, seed, model=None if name in ABLATION else dict(PROBE[name]["model"]),
                         **kw["common"], **kw["cond"])
    r = {k: v for k, v in r.items() if not k.startswith("_")}
    r["mode"] = mode
    if torch.cuda.is_available(): r["device"] = torch.cuda.get_device_name()
    return r


_SKIP = ("seed", "steps", "batch_size", "samples", "temperature", "wall_s", "sample_s", "probe_s")

def summarize16(runs: list[dict]) -> list[dict]:
    """Per (mode, config) in order of appearance: seeds, steps, and mean / std over seeds of every numeric metric all
    its runs hold."""
    from heptapod_nb.ablation import mean_std
    rows = []
    for mode, name in dict.fromkeys((r["mode"], r["name"]) for r in runs):
        rs = [r for r in runs if (r["mode"], r["name"]) == (mode, name)]
        row = dict(mode=mode, name=name, seeds=len(rs), steps=rs[0]["steps"])
        for k, v in rs[0].items():
            if k in _SKIP or isinstance(v, bool) or not isinstance(v, (int, float)): continue
            if all(isinstance(r.get(k), (int, float)) for r in rs):
                row[k], row[k + "_std"] = mean_std([r[k] for r in rs])
        rows.append(row)
    return rows


def table16(rows: list[dict]) -> str:
    "A markdown table of `summarize16` rows."
    keys = [("probe_mean", "{:.3f}"), ("class_acc", "{:.3f}"), ("mnist_fid", "{:.1f}"), ("mnist_is", "{:.2f}"),
            ("coverage", "{:.2f}"), ("val_next_ce", "{:.3f}"), ("train_s", "{:.0f}")]
    out = ["| mode | config | steps | seeds | " + " | ".join(k for k, _ in keys) + " |", "|---" * (4 + len(keys)) + "|"]
    for r in rows:
        cells = [(f.format(r[k]) + (f" +- {f.format(r[k + '_std'])}" if r["seeds"] > 1 else "")) if k in r else "-"
                 for k, f in keys]
        out.append(f"| {r['mode']} | {r['name']} | {r['steps']} | {r['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _check(a) -> tuple[list[str], list[str], list[int]]:
    from heptapod_nb.probe import PROBE
    names, modes = [n for n in a.configs.split(",") if n], [m for m in a.modes.split(",") if m]
    unknown = [n for n in names if n not in PROBE]
    if unknown: raise ValueError(f"unknown config(s) {', '.join(unknown)}; known: {', '.join(PROBE)}")
    bad = [m for m in modes if m not in MODES]
    if bad: raise ValueError(f"unknown mode(s) {', '.join(bad)}; known: {', '.join(MODES)}")
    try: seeds = [int(s) for s in a.seeds.split(",") if s]
    except ValueError: raise ValueError(f"--seeds must be comma-separated integers, got {a.seeds!r}") from None
    if not names or not modes or not seeds:
        raise ValueError("--configs, --modes and --seeds must each name at least one")
    for k in ("steps", "batch", "samples", "workers", "threads"):
        if getattr(a, k) < 1: raise ValueError(f"--{k} must be >= 1, got {getattr(a, k)}")
    if a.samples % 10:
        raise ValueError(f"--samples must be a multiple of 10 (class-balanced conditional samples), got {a.samples}")
    if a.tokenizer_minutes <= 0: raise ValueError(f"--tokenizer_minutes must be > 0, got {a.tokenizer_minutes}")
    return names, modes, seeds


def run(a, argv: list[str]) -> dict:
    "Run the missing (mode, config, seed) triples of `a` (parsed arguments); returns the results document."
    import heptapod_nb.ablation as abl
    from heptapod_nb.classifier import mnist_classifier
    import torch
    names, modes, seeds = _check(a)
    mnist_classifier("cpu")                                           # a missing classifier fails before any training
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    tpath, tinfo = tokenizer16(a)
    settings = dict(steps=a.steps, batch=a.batch, lr=a.lr, samples=a.samples, curve_samples=a.curve_samples,
                    probe_n=a.probe_n, temperature=a.temperature, tokenizer=str(tpath.resolve()))
    rr = abl.ResumableRuns(out, settings, "bench/grid16.py " + " ".join(argv))   # ConfigError for other settings
    root = abl.ablation_tokens(Path(a.work) / "tokens", str(tpath), progress=True)
    common = dict(tokens_root=str(root), steps=a.steps, batch_size=a.batch, lr=a.lr, samples=a.samples,
                  temperature=a.temperature, threads=a.threads, tokenizer=str(tpath))
    kw = dict(common=common, uncond=dict(curve_samples=a.curve_samples, probe_n=a.probe_n), cond=dict(evals=2))
    have = rr.done(lambda r: (r["mode"], r["name"], r["seed"]))
    jobs = [(m, n, s, kw) for s in seeds for m in modes for n in names if (m, n, s) not in have]
    print(f"tokenizer: {tinfo}\n{len(jobs)} runs to do ({len(have)} already in {out})", flush=True)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
    machine = rr.doc.get("machine", f"{dev}, {a.threads} thread(s) per run, {a.workers} run(s) in parallel")

    def report(r):
        metric = f"probe mean {r['probe_mean']:.3f}" if r["mode"] == "uncond" else f"class acc {r['class_acc']:.3f}"
        return (f"{r['mode']} {r['name']} seed {r['seed']}: {metric}, FID {r['mnist_fid']:.1f}, "
                f"CE {r['val_next_ce']:.3f}, train {r['train_s']:.0f}s")
    doc = rr.run(_job, jobs, a.workers,
                 lambda: dict(commands=rr.commands, settings=settings, machine=machine, tokenizer=tinfo, runs=rr.runs,
                              summary=summarize16(rr.runs)), report)
    if rr.runs: print(table16(doc["summary"]))
    return doc


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parser().parse_args(argv)                                  # --help and usage errors: before torch is imported
    from heptapod_nb.config import cli_main
    return cli_main("bench/grid16.py", lambda _: run(a, argv), argv)


if __name__ == "__main__":
    sys.exit(main())
