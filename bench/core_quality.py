"""Global head vs window=1 on MNIST-5k VQ tokens (tiny preset): cost per training step, next-position val CE and
sample class accuracy, at equal steps and at equal wall time.

Both models are trained in one process, one step each in turn (so machine load hits both alike), with the same
AdamW settings and the same batches. After `--steps` steps each is evaluated ("equal steps"); then the cheaper one
keeps training until its own accumulated step time reaches the other's, and is evaluated again ("equal wall time").

    flock /tmp/heptapod-bench.lock .venv/bin/python bench/core_quality.py --steps 300 --out bench/results/core_quality.json
"""
from __future__ import annotations
import argparse, json, math, statistics, time
from pathlib import Path

import torch

from heptapod_nb.data import TokenDataset
from heptapod_nb.head import make_order, select_targets
from heptapod_nb.model import PRESETS, Heptapod
from heptapod_nb.sample import generate


def load_tokens(root):
    ds = TokenDataset(root, aug="first")
    return torch.from_numpy(ds.codes[:, 0].astype("int64")), torch.from_numpy(ds.labels[:].astype("int64")), ds


@torch.no_grad()
def next_ce(model, tok, lab, bs=100):
    "Next-position val CE, the next position queried with the training-time query set (fixed target draw)."
    model.eval()
    g = torch.Generator().manual_seed(0)
    tot, n = 0.0, 0
    c = model.config
    for i in range(0, len(tok), bs):
        x, y = tok[i:i + bs], lab[i:i + bs]
        o = make_order(c.order, len(x), c.n_positions, generator=g)
        tg = select_targets(o, c.window, c.targets_per_step, generator=g)
        tot += model(x, y, order=o, targets=tg)["next_loss"].item() * len(x); n += len(x)
    model.train()
    return tot / n


def class_acc(model, tokenizer, clf, per_class, seed=0):
    from heptapod_nb.metrics import class_accuracy
    labels = torch.arange(10).repeat_interleave(per_class)
    toks = generate(model, labels, seed=seed, temperature=1.0)
    with torch.no_grad(): imgs = tokenizer.decode(toks)
    return class_accuracy(clf, imgs, labels)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="runs/tokens_vq_tiny")
    ap.add_argument("--tokenizer", default="runs/tok_vq_tiny/tokenizer.safetensors")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--per_class", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--global_tps", default=None, help="targets_per_step of the global model (default: the preset's)")
    ap.add_argument("--cost_only", action="store_true", help="only time the interleaved training steps (no evaluation)")
    ap.add_argument("--out", default="bench/results/core_quality.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tr_tok, tr_lab, ds = load_tokens(Path(a.tokens) / "train")
    va_tok, va_lab, _ = load_tokens(Path(a.tokens) / "val")
    from heptapod_nb.tokenizer import load_tokenizer
    from heptapod_nb.metrics import mnist_classifier
    tokenizer, clf = load_tokenizer(a.tokenizer).eval(), mnist_classifier("cpu", verbose=False)
    base = PRESETS["tiny"].replace(vocab_size=ds.vocab_size, num_classes=ds.num_classes)
    gcfg = base if a.global_tps is None else base.replace(targets_per_step=int(a.global_tps) if a.global_tps.isdigit() else a.global_tps)
    cfgs = {"global": gcfg, "window1": base.replace(window=1, targets_per_step=1)}
    runs = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        m = Heptapod(cfg)
        opt = torch.optim.AdamW(m.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.05)
        runs[name] = dict(model=m, opt=opt, steps=0, time=0.0, step_times=[], results={}, config=cfg.to_dict(),
                          params=m.num_params())
    data_g = torch.Generator().manual_seed(0)

    def lr_at(step):  # linear warmup 30 steps, then cosine to 10% over 2 * steps (the equal-time phase stays high)
        if step < 30: return a.lr * (step + 1) / 30
        return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / (2 * a.steps)))))

    def train_step(r, x, y):
        for pg in r["opt"].param_groups: pg["lr"] = lr_at(r["steps"])
        t = time.perf_counter()
        loss = r["model"].loss(x, y)
        r["opt"].zero_grad(set_to_none=True); loss.backward(); r["opt"].step()
        dt = time.perf_counter() - t
        r["time"] += dt; r["step_times"].append(dt); r["steps"] += 1
        return loss.item()

    def evaluate(name, tag):
        r = runs[name]; t = time.perf_counter()
        res = dict(steps=r["steps"], train_s=round(r["time"], 1), val_next_ce=round(next_ce(r["model"], va_tok, va_lab), 4),
                   class_acc=round(class_acc(r["model"], tokenizer, clf, a.per_class), 4))
        res["eval_s"] = round(time.perf_counter() - t, 1)
        r["results"][tag] = res
        print(f"[{tag}] {name}: {res}", flush=True)

    t0 = time.time()
    for s in range(a.steps):
        i = torch.randint(0, len(tr_tok), (a.batch,), generator=data_g)
        losses = {n: train_step(r, tr_tok[i], tr_lab[i]) for n, r in runs.items()}
        if s % 25 == 0 or s == a.steps - 1:
            print(f"step {s}: " + ", ".join(f"{n} loss {l:.3f} ({runs[n]['time']:.0f}s)" for n, l in losses.items()), flush=True)
    med = {n: statistics.median(r["step_times"][min(5, a.steps - 1):a.steps]) for n, r in runs.items()}
    if a.cost_only:
        out = dict(command="bench/core_quality.py " + " ".join(f"--{k} {v}" for k, v in vars(a).items()),
                   batch=a.batch, steps=a.steps, median_step_s=med,
                   cost_ratio_global_over_window1=round(med["global"] / med["window1"], 3),
                   params={n: r["params"] for n, r in runs.items()})
        print(json.dumps(out, indent=1)); Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1)); return
    for n in runs: evaluate(n, "equal_steps")
    # equal wall time: the cheaper model continues until its step time matches the dearer one's
    slow, fast = sorted(runs, key=lambda n: -runs[n]["time"])
    target = runs[slow]["time"]
    while runs[fast]["time"] < target:
        i = torch.randint(0, len(tr_tok), (a.batch,), generator=data_g)
        train_step(runs[fast], tr_tok[i], tr_lab[i])
    evaluate(fast, "equal_time"); runs[slow]["results"]["equal_time"] = runs[slow]["results"]["equal_steps"]
    out = dict(command="bench/core_quality.py " + " ".join(f"--{k} {v}" for k, v in vars(a).items()),
               batch=a.batch, steps=a.steps, total_wall_s=round(time.time() - t0, 1),
               median_step_s=med, cost_ratio_global_over_window1=round(med["global"] / med["window1"], 3),
               runs={n: dict(config=r["config"], params=r["params"], results=r["results"]) for n, r in runs.items()})
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=1))
    print(f"{'model':>8} | {'params':>7} | {'step s':>6} | equal steps: CE / acc | equal time: steps / CE / acc")
    for n, r in runs.items():
        e, w = r["results"]["equal_steps"], r["results"]["equal_time"]
        print(f"{n:>8} | {r['params']['total'] / 1e6:6.2f}M | {med[n]:6.3f} | {e['val_next_ce']:.3f} / {e['class_acc']:.2f}"
              f" | {w['steps']} / {w['val_next_ce']:.3f} / {w['class_acc']:.2f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
