"""Evaluation metrics on CPU: the bundled MNIST classifier's accuracy, MNIST-FID floors, Inception speed.

    flock /tmp/heptapod-bench.lock .venv/bin/python bench/eval_metrics.py --out bench/results/eval_metrics.json

MNIST-FID and class accuracy use the classifier shipped in heptapod_nb/assets (`--fresh` only adds the time and val
accuracy of training one anew on this machine; its val-accuracy band over seeds is bench/classifier.py's job).
"""
import argparse, platform, sys, time
from pathlib import Path

import numpy as np
import torch

from heptapod_nb.data import load_mnist5k
from heptapod_nb.config import add_debug_arg, arg_int, cli_main, write_json
from heptapod_nb.classifier import class_accuracy, mnist_classifier, mnist_fid, train_mnist_classifier
from heptapod_nb.inception import InceptionV3
from heptapod_nb.metrics import feature_stats, frechet_distance


def run(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="bench/eval_metrics.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=arg_int(1), default=1)
    p.add_argument("--inception_images", type=arg_int(1), default=8,
                   help="images for the (random-weight) Inception timing")
    p.add_argument("--fresh", action="store_true",
                   help="also train a classifier anew (default config) and report its time")
    p.add_argument("--sqrtm", action="store_true", help="also time frechet_distance on 2048-d statistics (slow on CPU)")
    p.add_argument("--out", default=None, help="write the table as JSON")
    p.add_argument("--overwrite", action="store_true", help="allow --out to replace an existing file")
    add_debug_arg(p)
    args = p.parse_args(argv)
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists: pass --overwrite to replace it")
    torch.set_num_threads(args.threads)
    rows = {}
    clf = mnist_classifier()
    rows["bundled classifier: train seconds when it was made"] = clf.record["train_seconds"]
    if args.fresh:
        _, acc, secs = train_mnist_classifier(verbose=False)
        rows["fresh classifier (default config, seed 0): train seconds"] = secs
        rows["fresh classifier (default config, seed 0): val accuracy"] = acc
    tr, va = load_mnist5k("train"), load_mnist5k("val")
    rows["bundled classifier val accuracy"] = class_accuracy(clf, va.images, va.labels)
    rows["bundled classifier train accuracy"] = class_accuracy(clf, tr.images, tr.labels)
    for step in (9, 1):                                   # MNIST-5k is sorted by class: strided subsets stay balanced
        rows[f"MNIST-FID real train ({len(tr.images[::step])}) vs val (floor)"] = mnist_fid(tr.images[::step], clf=clf)
    rows["MNIST-FID only zeros (450, mode collapse) vs val"] = mnist_fid(tr.images[tr.labels == 0], clf=clf)
    noise = torch.rand(500, 1, 32, 32) * 2 - 1
    rows["MNIST-FID uniform noise (500) vs val"] = mnist_fid(noise, clf=clf)
    net = InceptionV3().eval()
    x = torch.rand(args.inception_images, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        net(x[:1]); t0 = time.time(); net(x)
    rows["Inception forward images/s (CPU, 299x299)"] = args.inception_images / (time.time() - t0)
    if args.sqrtm:
        rng = np.random.default_rng(0)
        f1, f2 = rng.normal(size=(4096, 2048)), rng.normal(size=(4096, 2048)) + 0.1
        (m1, s1), (m2, s2) = feature_stats(f1), feature_stats(f2)
        t0 = time.time(); frechet_distance(m1, s1, m2, s2)
        rows["frechet_distance 2048-d seconds (scipy sqrtm)"] = time.time() - t0
    w = max(map(len, rows))
    print(f"| {'metric':<{w}} | value |\n|{'-' * (w + 2)}|-------|")
    for k, v in rows.items(): print(f"| {k:<{w}} | {v:.4g} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, dict(results=rows, threads=args.threads, torch=torch.__version__,
                                  machine=platform.processor() or platform.machine(),
                                  note="shared machine: other processes may have been running"))
    return rows


def main(argv=None) -> int:
    return cli_main("bench/eval_metrics.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
