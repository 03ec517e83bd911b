"""The MNIST classifier behind MNIST-FID and class accuracy: val-accuracy band over seeds, and the bundled weights.

    # the band of the default config (12 epochs) over 10 seeds, and the bundled asset (seed 0):
    OMP_NUM_THREADS=1 .venv/bin/python bench/classifier.py --seeds 0 1 2 3 4 5 6 7 8 9 \
        --out bench/results/classifier.json --save heptapod_nb/assets/mnist_classifier.safetensors
    # the band of the shortened retraining that tests/test_classifier.py runs under HEPTAPOD_FAST=1:
    OMP_NUM_THREADS=1 .venv/bin/python bench/classifier.py --seeds 0 1 2 3 4 5 6 7 8 9 --epochs 4 \
        --out bench/results/classifier_e4.json

Each seed trains `MNISTClassifierConfig(seed=s, epochs=...)` on MNIST-5k train (CPU, one thread) and scores the 500
val digits. `--save PATH` writes the seed-0 classifier with its record (val accuracy, val predictions, MNIST-FID of
real train digits): only with the default config, and never over an existing file without `--overwrite`.
"""
import argparse, os, platform, statistics, sys
from pathlib import Path

import torch

from heptapod_nb.classifier import MNISTClassifierConfig, save_mnist_classifier, train_mnist_classifier
from heptapod_nb.config import ConfigError, add_debug_arg, arg_int, cli_main, write_json


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench/classifier.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=arg_int(0), nargs="+", default=[0, 1, 2, 3, 4], help="training seeds (default 0..4)")
    p.add_argument("--epochs", type=arg_int(1), default=None, help="epochs per run (default: the config's, 12)")
    p.add_argument("--threads", type=arg_int(1), default=1, help="torch threads (default 1)")
    p.add_argument("--out", default=None, help="write the per-seed results and the band as JSON")
    p.add_argument("--save", default=None, help="write the seed-0 classifier (default config) to this .safetensors")
    p.add_argument("--overwrite", action="store_true", help="allow --save / --out to replace an existing file")
    add_debug_arg(p)
    a = p.parse_args(argv)
    if a.threads < 1: p.error(f"--threads must be >= 1, got {a.threads}")
    if a.epochs is not None and a.epochs < 1: p.error(f"--epochs must be >= 1, got {a.epochs}")
    if len(set(a.seeds)) != len(a.seeds): p.error(f"--seeds has repeats: {a.seeds}")
    return a


def run(argv=None) -> dict:
    "Train one classifier per seed; returns the results dict (also written to `--out`)."
    a = parse_args(argv)
    default_epochs = MNISTClassifierConfig().epochs
    epochs = a.epochs or default_epochs
    for f in (a.out, a.save):
        if f and Path(f).exists() and not a.overwrite:
            raise FileExistsError(f"{f} exists: pass --overwrite to replace it")
    if a.save:
        if epochs != default_epochs or 0 not in a.seeds:
            raise ConfigError(f"--save writes the default classifier (seed 0, {default_epochs} epochs): "
                              f"got --epochs {epochs}, --seeds {a.seeds}")
        if not str(a.save).endswith(".safetensors"):
            raise ValueError(f"--save must name a .safetensors file, got {a.save}")
    torch.set_num_threads(a.threads)
    cmd = "bench/classifier.py " + " ".join(sys.argv[1:] if argv is None else argv)
    runs = []
    for s in a.seeds:
        cfg = MNISTClassifierConfig(seed=s, epochs=epochs)
        clf, acc, secs = train_mnist_classifier(cfg, device="cpu", verbose=False)
        runs.append(dict(seed=s, val_accuracy=acc, val_mistakes=round((1 - acc) * 500), seconds=round(secs, 1)))
        print(f"seed {s}: val accuracy {acc:.2%} ({runs[-1]['val_mistakes']} mistakes of 500), {secs:.0f}s", flush=True)
        if a.save and s == 0:
            save_mnist_classifier(a.save, clf, train_seconds=round(secs, 1), command=cmd, overwrite=a.overwrite)
            print(f"saved {a.save}", flush=True)
    accs = [r["val_accuracy"] for r in runs]
    band = dict(min=min(accs), max=max(accs), mean=statistics.mean(accs),
                std=statistics.stdev(accs) if len(accs) > 1 else 0.0, n=len(accs))
    print("\n| seed | val accuracy | mistakes (of 500) | train s |\n|---|---|---|---|")
    for r in runs: print(f"| {r['seed']} | {r['val_accuracy']:.2%} | {r['val_mistakes']} | {r['seconds']:.0f} |")
    print(f"| band ({band['n']} seeds) | {band['min']:.2%} .. {band['max']:.2%} (mean {band['mean']:.2%}, "
          f"std {band['std']:.2%}) | | |")
    doc = dict(command=cmd, epochs=epochs, threads=a.threads, torch=torch.__version__,
               machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       f"cpu capability {torch.backends.cpu.get_cpu_capability()}",
               note="shared machine: other processes may have been running (times are not benchmarks)",
               runs=runs, band=band)
    if a.out: write_json(a.out, doc)
    return doc


def main(argv=None) -> int:
    return cli_main("bench/classifier.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
