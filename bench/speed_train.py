"""CPU training speed of the tiny preset: the next-token baseline (window=1) against the global head at several
`targets_per_step` (M). One training step = forward + backward + AdamW step on a random token batch, exactly the
work `heptapod-train` does per micro-batch (no data loading). The configs are timed in interleaved blocks and the
best block counts (the machine is shared: the median is printed too).

    flock /tmp/heptapod-bench.lock .venv/bin/python bench/speed_train.py --out bench/results/speed_train.json
"""
import argparse, json, statistics, sys, time
from pathlib import Path

import torch

from heptapod_nb.config import get_preset, parse_value
from heptapod_nb.model import PRESETS, Heptapod
from heptapod_nb.model import LossModule, random_tokens, token_info
from heptapod_nb.optim import param_groups


class Runner:
    "One config of the tiny preset with its optimizer and a few random batches, ready to time training steps."
    def __init__(self, overrides: dict, batch: int, device: torch.device, seed: int = 0):
        torch.manual_seed(seed)
        self.overrides, self.mc = overrides, get_preset(PRESETS, "tiny", **overrides)
        self.model = Heptapod(self.mc).to(device)
        self.net = LossModule(self.model)
        self.opt = torch.optim.AdamW(param_groups(self.model, 0.05), lr=1e-4)
        g = torch.Generator().manual_seed(seed)
        self.info = token_info(self.mc)
        self.batches = [random_tokens(self.info, batch, device, g) for _ in range(4)]
        self.i, self.blocks = 0, []
        self.tokens_per_step = batch * self.info["grid"][0] * self.info["grid"][1]

    def step(self):
        x, y = self.batches[self.i % len(self.batches)]; self.i += 1
        loss = self.net(x, y); loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step(); self.opt.zero_grad(set_to_none=True)

    def time_block(self, steps: int):
        t = time.perf_counter()
        for _ in range(steps): self.step()
        self.blocks.append((time.perf_counter() - t) / steps)

    def result(self) -> dict:
        best, med = min(self.blocks), statistics.median(self.blocks)
        return dict(overrides=self.overrides, sec_per_step=best, sec_per_step_median=med,
                    tokens_per_s=self.tokens_per_step / best, blocks=self.blocks,
                    params=sum(p.numel() for p in self.model.parameters()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    runners = [Runner(o, a.batch, dev) for o in runs]
    for r in runners:
        for _ in range(a.warmup): r.step()
    for _ in range(a.repeats):                       # interleaved, so a change in the machine's load hits every config
        for r in runners: r.time_block(a.steps)
    res = [r.result() for r in runners]
    base = res[0]["sec_per_step"]
    print(f"tiny preset, CPU, {a.threads} threads, batch {a.batch}, best of {a.repeats} interleaved blocks of "
          f"{a.steps} steps; default targets_per_step={default_m!r}")
    print("| head | targets_per_step | ms/step (best) | ms/step (median) | tokens/s | x next-token |"
          "\n|---|---|---|---|---|---|")
    for r in res:
        o = r["overrides"]; r["ratio"] = r["sec_per_step"] / base
        print(f"| {'next-token (window=1)' if o['window'] == 1 else 'global'} | {o.get('targets_per_step', '-')} | "
              f"{1000 * r['sec_per_step']:.1f} | {1000 * r['sec_per_step_median']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['ratio']:.2f} |")
    d = next(r for r in res[1:] if r["overrides"]["targets_per_step"] == default_m)
    goal = d["ratio"] <= 1.5
    print(f"goal (global head at the default M costs <= 1.5x a next-token step): {d['ratio']:.2f}x -> "
          f"{'met' if goal else 'NOT met'}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(dict(command=" ".join(sys.argv), torch=torch.__version__, threads=a.threads,
                                               batch=a.batch, default_targets_per_step=default_m, goal_met=goal,
                                               results=res), indent=2, default=str))


if __name__ == "__main__":
    main()
