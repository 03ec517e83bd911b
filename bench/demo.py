"""Quality of the demo models (issues 4 and 6): Heptapod (global head) vs the next-token baseline that
`heptapod-demo --retrain` trains for the same number of steps. For each: next-position val CE on MNIST-5k val, and
class accuracy + MNIST-FID of class-balanced samples (no CFG) at several temperatures, mean +- std over seeds.

    .venv/bin/python bench/demo.py --seeds 3 --samples 1000 --temperatures 1.0,0.6 --out bench/results/demo.json
"""
from __future__ import annotations
import argparse, sys, time
from pathlib import Path

import torch

from heptapod_nb.ablation import ablation_tokens, mean_std, next_position_ce, val_grids
from heptapod_nb.bundle import DEMO_FILES, demo_dir, load_bundle
from heptapod_nb.config import write_json
from heptapod_nb.evaluate import score_samples
from heptapod_nb.classifier import mnist_classifier


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="demo weights folder (default: the bundled one)")
    p.add_argument("--tokens", default="runs/demo_tokens", help="cache folder for the val token grids")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--samples", type=int, default=1000, help="samples per seed and temperature")
    p.add_argument("--temperatures", default="1.0,0.6")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    wdir = Path(a.weights) if a.weights else demo_dir()
    bundle, clf = load_bundle(wdir, "cpu"), mnist_classifier("cpu")
    root = ablation_tokens(a.tokens, wdir / DEMO_FILES["tokenizer"], progress=True)
    vx, vy = val_grids(root)
    temps, rows, t0 = [float(t) for t in a.temperatures.split(",")], [], time.time()
    for name, m in (("heptapod", bundle.model), ("baseline", bundle.baseline)):
        ce = next_position_ce(m, vx, vy)
        for T in temps:
            s = [score_samples(m, bundle.tokenizer, clf, a.samples, seed, temperature=T) for seed in range(a.seeds)]
            acc, fid = [x["class_acc"] for x in s], [x["mnist_fid"] for x in s]
            (acc_m, acc_s), (fid_m, fid_s) = mean_std(acc), mean_std(fid)
            rows.append(dict(model=name, window=m.config.window, targets_per_step=m.config.targets_per_step,
                             steps=bundle.meta[name]["steps"], val_next_ce=round(ce, 4), temperature=T, seeds=a.seeds,
                             samples=a.samples, class_acc=acc_m, class_acc_std=acc_s, class_acc_seeds=acc,
                             mnist_fid=fid_m, mnist_fid_std=fid_s, mnist_fid_seeds=fid))
            r = rows[-1]
            print(f"{name} T={T}: CE {ce:.3f}, class accuracy {r['class_acc']:.1%} +- {r['class_acc_std']:.1%}, "
                  f"MNIST-FID {r['mnist_fid']:.1f} +- {r['mnist_fid_std']:.1f}", flush=True)
    print("\n| model | steps | next-position val CE | T | class accuracy | MNIST-FID |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} (window={r['window']}, M={r['targets_per_step']}) | {r['steps']} | "
              f"{r['val_next_ce']:.3f} | {r['temperature']} | {r['class_acc']:.1%} +- {r['class_acc_std']:.1%} | "
              f"{r['mnist_fid']:.1f} +- {r['mnist_fid_std']:.1f} |")
    if a.out:
        write_json(a.out, dict(command="bench/demo.py " + " ".join(sys.argv[1:] if argv is None else argv),
                               weights=str(wdir), threads=a.threads, wall_s=round(time.time() - t0, 1), rows=rows))


if __name__ == "__main__":
    main()
