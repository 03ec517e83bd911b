"""CPU training speed of the tiny preset: the next-token baseline (window=1) against the global head at several
`targets_per_step` (M). One training step = forward + backward + AdamW step on a random token batch, exactly the
work `heptapod-train` does per micro-batch (no data loading).

    flock /tmp/heptapod-bench.lock .venv/bin/python bench/speed_train.py --out bench/results/speed_train.json
"""
import argparse, json, os, statistics, sys, time
from pathlib import Path

import torch

from heptapod_nb.config import get_preset, parse_value
from heptapod_nb.model import PRESETS, Heptapod
from heptapod_nb.train import LossModule, param_groups, random_tokens, token_info


def time_steps(overrides: dict, batch: int, steps: int, warmup: int, repeats: int, device: torch.device, seed: int = 0) -> dict:
    "Median seconds per training step of the tiny preset with `overrides` (median over `repeats` timed blocks)."
    torch.manual_seed(seed)
    mc = get_preset(PRESETS, "tiny", **overrides)
    model = Heptapod(mc).to(device)
    net = LossModule(model)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
    g = torch.Generator().manual_seed(seed)
    info = token_info(mc)
    batches = [random_tokens(info, batch, device, g) for _ in range(4)]

    def step(i):
        x, y = batches[i % len(batches)]
        loss = net(x, y); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        return loss

    for i in range(warmup): step(i)
    block = []
    for r in range(repeats):
        t = time.perf_counter()
        for i in range(steps): step(i)
        block.append((time.perf_counter() - t) / steps)
    s = statistics.median(block)
    n_tok = batch * info["grid"][0] * info["grid"][1]
    return dict(overrides=overrides, sec_per_step=s, tokens_per_s=n_tok / s, blocks=block,
                params=sum(p.numel() for p in model.parameters()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--m", default="1,4,8,16,all", help="targets_per_step values for the global head")
    p.add_argument("--out", help="write the results as JSON")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev = torch.device("cpu")
    default_m = get_preset(PRESETS, "tiny").targets_per_step
    runs = [dict(window=1)] + [dict(window="global", targets_per_step=parse_value(m)) for m in a.m.split(",")]
    if default_m not in [r.get("targets_per_step") for r in runs[1:]]:
        runs.append(dict(window="global", targets_per_step=default_m))
    res = [time_steps(o, a.batch, a.steps, a.warmup, a.repeats, dev) for o in runs]
    base = res[0]["sec_per_step"]
    print(f"tiny preset, CPU, {a.threads} threads, batch {a.batch}, median of {a.repeats} x {a.steps} steps; default targets_per_step={default_m!r}")
    print(f"| head | targets_per_step | ms/step | tokens/s | x next-token |\n|---|---|---|---|---|")
    for r in res:
        o = r["overrides"]; r["ratio"] = r["sec_per_step"] / base
        print(f"| {'next-token (window=1)' if o['window'] == 1 else 'global'} | {o.get('targets_per_step', '-')} | "
              f"{1000 * r['sec_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {r['ratio']:.2f} |")
    d = next(r for r in res[1:] if r["overrides"]["targets_per_step"] == default_m)
    goal = d["ratio"] <= 1.5
    print(f"goal (global head at the default M costs <= 1.5x a next-token step): {d['ratio']:.2f}x -> {'met' if goal else 'NOT met'}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(dict(command=" ".join(sys.argv), torch=torch.__version__, threads=a.threads, batch=a.batch,
                                               default_targets_per_step=default_m, goal_met=goal, results=res), indent=2, default=str))


if __name__ == "__main__":
    main()
