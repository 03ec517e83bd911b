"""Speed side by side on CPU (issue 8): training tokens/s of the tiny preset (window=1 vs the global head at several
targets_per_step), sampling images/s of the bundled demo models with and without the KV cache and with
tokens_per_step 1/2/4 (with the class accuracy each reaches, over several seeds), and peak memory of each.

Goals on 2 CPU cores, tiny preset: the KV cache >= 3x faster than recomputing the prefix; tokens_per_step=4
>= 3x faster than 1 at <= 10% worse class accuracy.

Timing runs in this process, configs interleaved so a change in machine load hits all alike; peak memory is
measured in a fresh subprocess per config (the peak resident set size of a process only grows).

    .venv/bin/python bench/speed.py --threads 2 --out bench/results/speed.json
"""
from __future__ import annotations
import argparse, multiprocessing as mp, os, statistics, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from speed_train import Runner                                   # the training-step timer of bench/speed_train.py

from heptapod_nb.bundle import load_bundle
from heptapod_nb.config import get_preset, write_json
from heptapod_nb.ablation import mean_std
from heptapod_nb.evaluate import score_samples
from heptapod_nb.classifier import mnist_classifier
from heptapod_nb.model import PRESETS
from heptapod_nb.sample import generate


def rss_mb() -> float:
    with open("/proc/self/statm") as f: return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    "Samples this process's resident memory every `every` s in a thread: `extra_mb` = peak during the block - before."
    def __init__(self, every: float = 0.002): self.every, self.peak, self.stop = every, 0.0, False
    def _run(self):
        while not self.stop: self.peak = max(self.peak, rss_mb()); time.sleep(self.every)
    def __enter__(self):
        import threading
        self.before = self.peak = rss_mb(); self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start(); return self
    def __exit__(self, *exc):
        self.stop = True; self.t.join(); self.peak = max(self.peak, rss_mb())
    def result(self): return dict(rss_before_mb=round(self.before, 1), peak_mb=round(self.peak, 1),
                                  extra_mb=round(self.peak - self.before, 1))


def _model_for(spec):
    if spec["model"] == "tiny":                        # the tiny preset, untrained: speed only
        from heptapod_nb.model import Heptapod
        torch.manual_seed(0); return Heptapod(get_preset(PRESETS, "tiny")).eval()
    b = load_bundle(need_baseline=spec["model"] == "baseline")
    return b.baseline if spec["model"] == "baseline" else b.model


def _peak_job(kind: str, spec: dict, batch: int, threads: int) -> dict:
    "In a fresh process: resident memory before, and its peak during, two training steps / one sampling call."
    torch.set_num_threads(threads)
    if kind == "train":
        r = Runner(spec, batch, torch.device("cpu")); r.step()            # the optimizer state exists from here on
        with PeakRSS() as m: r.step()
    else:
        model = _model_for(spec)
        generate(model, torch.arange(2) % 10, seed=0, tokens_per_step=spec.get("tps", 1), kv_cache=spec.get("kv", True))
        with PeakRSS() as m:
            generate(model, torch.arange(batch) % 10, seed=0, tokens_per_step=spec.get("tps", 1),
                     kv_cache=spec.get("kv", True))
    return m.result()

def peak_memory(kind, spec, batch, threads) -> dict:
    with mp.get_context("spawn").Pool(1) as p: return p.apply(_peak_job, (kind, spec, batch, threads))


def train_speed(a) -> list[dict]:
    specs = [dict(window=1, targets_per_step=1)] + [dict(window="global", targets_per_step=m) for m in a.m]
    runners = [Runner(o, a.batch, torch.device("cpu")) for o in specs]
    for r in runners:
        for _ in range(a.warmup): r.step()
    for _ in range(a.repeats):
        for r in runners: r.time_block(a.train_steps)
    res = [r.result() for r in runners]
    for r in res:
        r["ratio"] = r["sec_per_step"] / res[0]["sec_per_step"]
        r["memory"] = peak_memory("train", r["overrides"], a.batch, a.threads)
    return res


def sample_speed(a, bundle, clf) -> list[dict]:
    "images/s per config (best of interleaved repeats on one batch), class accuracy over seeds x samples."
    models = {"heptapod": bundle.model, "baseline": bundle.baseline, "tiny": _model_for(dict(model="tiny"))}
    T = bundle.meta["recipe"]["temperature"]
    specs = [dict(model="heptapod", tps=1, kv=True), dict(model="heptapod", tps=1, kv=False),
             dict(model="baseline", tps=1, kv=True), dict(model="baseline", tps=1, kv=False),
             dict(model="tiny", tps=1, kv=True), dict(model="tiny", tps=1, kv=False),
             dict(model="heptapod", tps=2, kv=True), dict(model="heptapod", tps=4, kv=True)]
    labels = torch.arange(a.sample_batch) % 10
    times = {i: [] for i in range(len(specs))}
    for i, s in enumerate(specs): generate(models[s["model"]], labels[:10], seed=0, tokens_per_step=s["tps"],
                                           kv_cache=s["kv"])
    for _ in range(a.repeats):
        for i, s in enumerate(specs):
            t = time.perf_counter()
            generate(models[s["model"]], labels, seed=0, temperature=T, tokens_per_step=s["tps"], kv_cache=s["kv"])
            times[i].append(time.perf_counter() - t)
    out = []
    for i, s in enumerate(specs):
        r = dict(s, temperature=T, batch=a.sample_batch, sec=min(times[i]), sec_median=statistics.median(times[i]),
                 images_per_s=a.sample_batch / min(times[i]))
        if s["kv"] and s["model"] != "tiny":           # quality does not depend on the cache (same samples)
            accs = [score_samples(models[s["model"]], bundle.tokenizer, clf, a.samples, seed, fid=False, temperature=T,
                                  tokens_per_step=s["tps"])["class_acc"] for seed in range(a.seeds)]
            r["class_acc"], r["class_acc_std"] = mean_std(accs)
            r["class_acc_seeds"] = accs
        r["memory"] = peak_memory("sample", s, a.sample_batch, a.threads)
        out.append(r)
    return out


def tps_batch_sweep(a, model, T) -> list[dict]:
    """Seconds per generation of the demo Heptapod for tokens_per_step 1/2/4 at several batch sizes (best of
    interleaved repeats)."""
    cfgs = [(b, k) for b in a.tps_batches for k in (1, 2, 4)]
    for b, k in cfgs: generate(model, torch.arange(b) % 10, seed=0, temperature=T, tokens_per_step=k)
    times = {c: [] for c in cfgs}
    for _ in range(a.repeats):
        for b, k in cfgs:
            t = time.perf_counter(); generate(model, torch.arange(b) % 10, seed=0, temperature=T, tokens_per_step=k)
            times[(b, k)].append(time.perf_counter() - t)
    out = []
    for b, k in cfgs:
        sec = min(times[(b, k)])
        out.append(dict(batch=b, tps=k, sec=sec, images_per_s=b / sec, speedup=min(times[(b, 1)]) / sec))
    return out


def print_tps(sw, threads):
    print(f"\ntokens_per_step against batch size: demo Heptapod, KV cache, {threads} threads")
    print("| batch | tokens/step | s per batch | images/s | x tokens_per_step=1 |\n|---|---|---|---|---|")
    for r in sw: print(f"| {r['batch']} | {r['tps']} | {r['sec']:.3f} | {r['images_per_s']:.1f} | {r['speedup']:.2f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="training batch")
    p.add_argument("--train_steps", type=int, default=3, help="training steps per timed block")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--m", default="1,2,3,4,8", help="targets_per_step values of the global head")
    p.add_argument("--sample_batch", type=int, default=50)
    p.add_argument("--samples", type=int, default=500, help="samples per seed for class accuracy")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tps_batches", default="1,10,50", help="batch sizes of the tokens_per_step sweep")
    p.add_argument("--tps_only", action="store_true", help="run only the tokens_per_step x batch sweep (a minute)")
    p.add_argument("--out", help="write the results as JSON")
    a = p.parse_args(argv)
    a.m, a.tps_batches = [int(m) for m in a.m.split(",")], [int(b) for b in a.tps_batches.split(",")]
    torch.set_num_threads(a.threads)
    t0 = time.time()
    cmd = "bench/speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if a.tps_only:
        bundle = load_bundle()
        sw = tps_batch_sweep(a, bundle.model, bundle.meta["recipe"]["temperature"]); print_tps(sw, a.threads)
        if a.out: write_json(a.out, dict(command=cmd, torch=torch.__version__, threads=a.threads, cpus=os.cpu_count(),
                                         tps_batch_sweep=sw), indent=1, default=str)
        return
    tr = train_speed(a)
    bundle, clf = load_bundle(), mnist_classifier()
    sa = sample_speed(a, bundle, clf)
    sw = tps_batch_sweep(a, bundle.model, bundle.meta["recipe"]["temperature"])
    default_m = get_preset(PRESETS, "tiny").targets_per_step
    print(f"\nCPU, {a.threads} threads, torch {torch.__version__}; tiny preset training, batch {a.batch}, "
          f"best of {a.repeats} interleaved blocks")
    print("| head | M | ms/step | tokens/s | x next-token | peak MB (extra) |\n|---|---|---|---|---|---|")
    for r in tr:
        o = r["overrides"]
        print(f"| {'next-token (window=1)' if o['window'] == 1 else 'global'} | {o['targets_per_step']} | "
              f"{1000 * r['sec_per_step']:.0f} | {r['tokens_per_s']:,.0f} | {r['ratio']:.2f} | "
              f"{r['memory']['peak_mb']:.0f} (+{r['memory']['extra_mb']:.0f}) |")
    print(f"\nsampling: the bundled demo models (dim 128, depth 4) and the tiny preset (untrained), "
          f"batch {a.sample_batch}, temperature {sa[0]['temperature']}; class accuracy over "
          f"{a.seeds} seeds x {a.samples} samples")
    print("| model | tokens/step | KV cache | images/s | class accuracy | peak MB (extra) |\n|---|---|---|---|---|---|")
    for r in sa:
        acc = (f"{r['class_acc']:.1%} +- {r['class_acc_std']:.1%}" if "class_acc" in r else
               "untrained (speed only)" if r["model"] == "tiny" else "same samples as with cache")
        print(f"| {r['model']} | {r['tps']} | {'on' if r['kv'] else 'off'} | {r['images_per_s']:.1f} | {acc} | "
              f"{r['memory']['peak_mb']:.0f} (+{r['memory']['extra_mb']:.0f}) |")
    print_tps(sw, a.threads)
    get = lambda **k: next(r for r in sa if all(r[x] == v for x, v in k.items()))
    kv_x = {m: get(model=m, tps=1, kv=True)["images_per_s"] / get(model=m, tps=1, kv=False)["images_per_s"]
            for m in ("heptapod", "baseline", "tiny")}
    h1, h4 = get(model="heptapod", tps=1, kv=True), get(model="heptapod", tps=4, kv=True)
    tps_x, acc_drop = h4["images_per_s"] / h1["images_per_s"], (h1["class_acc"] - h4["class_acc"]) / h1["class_acc"]
    dflt = next(r for r in tr[1:] if r["overrides"]["targets_per_step"] == default_m)
    goals = dict(kv_cache_3x_tiny=kv_x["tiny"] >= 3, tokens_per_step4_3x=tps_x >= 3,
                 tokens_per_step4_acc_within_10pct=acc_drop <= 0.10, global_default_m_le_1p5x=dflt["ratio"] <= 1.5)
    print(f"\nKV cache speed-up: {', '.join(f'{m} {x:.1f}x' for m, x in kv_x.items())}; "
          f"tokens_per_step=4 vs 1: {tps_x:.1f}x faster, class accuracy {acc_drop:+.1%} relative drop; "
          f"global head at default M={default_m}: {dflt['ratio']:.2f}x a next-token step")
    print("goals:", ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in goals.items()))
    if a.out:
        write_json(a.out, dict(command=cmd, torch=torch.__version__, threads=a.threads, cpus=os.cpu_count(),
                               wall_s=round(time.time() - t0, 1), train=tr, sample=sa, tps_batch_sweep=sw,
                               kv_cache_speedup=kv_x, tokens_per_step4_speedup=tps_x,
                               tokens_per_step4_rel_acc_drop=acc_drop, goals=goals), indent=1, default=str)


if __name__ == "__main__":
    main()
