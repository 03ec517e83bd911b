"""CPU training speed beside LlamaGen (issue 23 part 5): LlamaGen's own GPT (its `autoregressive/models/gpt.py`, read
from a local copy that is never part of this repository), this project's next-token model (window 1) and its global
head at M=2, all at one config (6 layers, dim 256, vocab 512, 8x8 grid, batch 64, 2 threads by default). One
training step = forward + backward + gradient clipping + AdamW step on a fixed random batch.

The configs are timed in one process, interleaved: each round runs one block of `--steps` steps of every config in
turn, so a change in the machine's load hits all of them alike; the table gives each config's median and range
over the rounds, and each ratio is the median (and range) of the per-round ratios. `--compile` adds each model
under `torch.compile` (inductor, C++ on the CPU) as rows of its own, its compile time reported apart.

LlamaGen is built at the same width, depth, heads, vocabulary, grid and SwiGLU width as ours (its `multiple_of` set
so that its FFN width equals ours), dropout 0 (ours has none; `--llamagen-dropout 0.1` times its training default).
Get its model file once (outside the repository):

    mkdir -p /tmp/llamagen && git --git-dir=<LlamaGen mirror> show HEAD:autoregressive/models/gpt.py \\
        > /tmp/llamagen/gpt.py
    flock /tmp/heptapod-bench.lock .venv/bin/python bench/speed_llamagen.py --llamagen /tmp/llamagen --rounds 10 \\
        --out bench/results/speed_llamagen.json

Goals: our next-token step at least as fast as LlamaGen's (speed ratio >= 1.0); the global head at M=2 at most
1.15x our next-token step.
"""
from __future__ import annotations
import argparse, json, os, statistics, sys, time
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/speed_llamagen.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llamagen", default="/tmp/llamagen",
                   help="folder holding LlamaGen's gpt.py (or a LlamaGen checkout); absent: that row is skipped")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--grid", type=int, default=8, help="token grid side")
    p.add_argument("--m", default="2", help="comma-separated targets_per_step of the global head rows")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds (one timed block of every config each)")
    p.add_argument("--steps", type=int, default=2, help="training steps per timed block")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of every config first")
    p.add_argument("--compile", action="store_true", help="also time every model under torch.compile")
    p.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                   help="time the eager models (--no-eager with --compile: compiled rows only)")
    p.add_argument("--llamagen-dropout", type=float, default=0.0, help="LlamaGen's token/residual/FFN dropout")
    p.add_argument("--also", default="", metavar="KEY=VALUE,...",
                   help="also time each of our models with these model config overrides (e.g. loss_chunk=0), "
                        "as rows of their own")
    p.add_argument("--out", help="write the results as JSON")
    return p


def find_llamagen(folder) -> Path | None:
    "LlamaGen's gpt.py in `folder` (a copy of the file, or a checkout), or None."
    if not folder: return None
    for rel in ("gpt.py", "autoregressive/models/gpt.py"):
        if (Path(folder) / rel).is_file(): return Path(folder) / rel
    return None


def load_llamagen(path: Path):
    """Import LlamaGen's gpt.py from `path`. Its only import from the rest of LlamaGen is `utils.drop_path.DropPath`,
    built only for drop_path_rate > 0 (never here): when LlamaGen's utils package is not beside it, a stand-in that
    refuses any drop rate is registered instead."""
    import importlib.util, types
    import torch
    root = path.parent.parent.parent if path.parent.name == "models" else path.parent
    if (root / "utils" / "drop_path.py").is_file(): sys.path.insert(0, str(root))
    elif "utils.drop_path" not in sys.modules:
        class DropPath(torch.nn.Identity):
            def __init__(self, drop_prob: float = 0.0, *a, **k):
                super().__init__()
                if drop_prob: raise ValueError("the DropPath stand-in only does drop_prob=0")
        utils, dp = types.ModuleType("utils"), types.ModuleType("utils.drop_path")
        dp.DropPath, utils.drop_path = DropPath, dp
        sys.modules.update({"utils": utils, "utils.drop_path": dp})
    spec = importlib.util.spec_from_file_location("llamagen_gpt", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["llamagen_gpt"] = mod                    # torch.compile looks modules up by name
    spec.loader.exec_module(mod)
    return mod


def multiple_of_for(dim: int, hidden: int) -> int:
    "LlamaGen's `multiple_of` that makes its SwiGLU width find_multiple(int(8 * dim / 3), multiple_of) equal `hidden`."
    h = int(2 * 4 * dim / 3)
    for m in (hidden, 256, 128, 64, 32, 16, 8, 1):
        if hidden % m == 0 and hidden - m < h <= hidden: return m
    raise ValueError(f"no multiple_of gives LlamaGen an FFN width of {hidden} at dim {dim}")


def build_models(a, lg_path):
    "[(name, kind, model, loss_fn)]: LlamaGen (if found), our next-token (window 1), our global head at each M."
    import torch
    from heptapod_nb.config import apply_overrides, get_preset
    from heptapod_nb.model import PRESETS, Heptapod
    from heptapod_nb.transformer import swiglu_hidden
    base = dict(dim=a.dim, depth=a.depth, n_heads=a.heads, vocab_size=a.vocab, grid=(a.grid, a.grid))
    out = []
    if lg_path is not None:
        g = load_llamagen(lg_path)
        hidden = swiglu_hidden(a.dim)
        d = a.llamagen_dropout
        args = g.ModelArgs(dim=a.dim, n_layer=a.depth, n_head=a.heads, multiple_of=multiple_of_for(a.dim, hidden),
                           vocab_size=a.vocab, block_size=a.grid * a.grid, num_classes=10, cls_token_num=1,
                           token_dropout_p=d, resid_dropout_p=d, ffn_dropout_p=d)
        torch.manual_seed(0)
        lg = g.Transformer(args)
        assert lg.layers[0].feed_forward.w1.out_features == hidden, "LlamaGen's FFN width differs from ours"

        # as LlamaGen's train_c2i.py: inputs z[:, :-1] after the class token, targets z
        def lg_loss(model, x, y):
            z = x.flatten(1)
            return model(idx=z[:, :-1], cond_idx=y, targets=z)[1]
        out.append(("LlamaGen GPT (its gpt.py)", "llamagen", lg, lg_loss))
    ours = lambda model, x, y: model.loss(x, y)
    variants = [({}, "")] + ([(a.also_overrides, f" ({a.also})")] if a.also else [])
    for extra, tag in variants:
        for kind, name, kw in [("w1", "ours, next-token (window 1)", dict(window=1, targets_per_step=1))] + \
                [(f"global_m{m}", f"ours, global head M={m}", dict(window="global", targets_per_step=m)) for m in a.m]:
            torch.manual_seed(0)
            mc = apply_overrides(get_preset(PRESETS, "tiny", **base, **kw), [f"{k}={v}" for k, v in extra.items()])
            out.append((name + tag, kind + tag.replace(" ", "_"), Heptapod(mc), ours))
    return out


class Runner:
    "One model with its AdamW and fixed random batches; `block(n)` times n training steps."
    def __init__(self, name, kind, model, loss_fn, batches, compiled: bool):
        import torch
        from heptapod_nb.optim import param_groups
        self.name, self.kind, self.compiled = name, kind, compiled
        self.model, self.batches, self.i, self.times, self.cpu = model.train(), batches, 0, [], []
        self.opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
        self.params = sum(p.numel() for p in model.parameters())

        class Loss(torch.nn.Module):                   # the loss as a module's forward: what torch.compile wraps
            def __init__(s): super().__init__(); s.model = model
            def forward(s, x, y): return loss_fn(s.model, x, y)
        self.net = torch.compile(Loss()) if compiled else Loss()
        self.compile_s = None

    def step(self):
        import torch
        x, y = self.batches[self.i % len(self.batches)]; self.i += 1
        loss = self.net(x, y); loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step(); self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def block(self, n: int):
        t, c = time.perf_counter(), time.process_time()
        for _ in range(n): self.step()
        self.times.append((time.perf_counter() - t) / n)
        self.cpu.append((time.process_time() - c) / n)     # this process's CPU time: less sensitive to other load


def spread(xs) -> dict:
    return dict(median=statistics.median(xs), min=min(xs), max=max(xs))


def ratios(num, den) -> dict:
    "Per-round ratios num/den of two configs timed in the same rounds: median and range."
    return spread([a / b for a, b in zip(num.times, den.times)])


def main(argv=None) -> dict:
    a = parser().parse_args(argv)
    a.m = [int(m) for m in a.m.split(",") if m]
    a.also_overrides = dict(kv.split("=", 1) for kv in a.also.split(",") if kv)
    if not (a.eager or a.compile): raise SystemExit("bench/speed_llamagen.py: --no-eager needs --compile")
    import torch
    torch.set_num_threads(a.threads)
    lg_path = find_llamagen(a.llamagen)
    if lg_path is None:
        print(f"bench/speed_llamagen.py: LlamaGen's gpt.py not found in {a.llamagen!r}: its row is skipped "
              f"(copy autoregressive/models/gpt.py from a LlamaGen checkout there)", file=sys.stderr)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(a.vocab, (a.batch, a.grid, a.grid), generator=g),
                torch.randint(10, (a.batch,), generator=g)) for _ in range(2)]
    runners = []
    for compiled in [False] * a.eager + [True] * a.compile:
        for name, kind, model, fn in build_models(a, lg_path):   # fresh models per mode: same init, own optimizer
            runners.append(Runner(name, kind, model, fn, batches, compiled))
    for r in runners:
        t = time.perf_counter(); r.step()
        if r.compiled: r.compile_s = time.perf_counter() - t      # the first compiled step: tracing + inductor
        for _ in range(a.warmup - 1): r.step()
    for _ in range(a.rounds):
        for r in runners: r.block(a.steps)
    rows = []
    for r in runners:
        ref = lambda kind: next((o for o in runners if o.kind == kind and o.compiled == r.compiled), None)
        tag = r.kind[r.kind.index("("):] if "(" in r.kind else ""
        lg, w1 = ref("llamagen"), ref("w1" + ("_" + tag if tag else ""))
        eager = next(o for o in runners if o.kind == r.kind)
        row = dict(name=r.name, kind=r.kind, compiled=r.compiled, params=r.params,
                   ms_per_step=spread([1e3 * t for t in r.times]), cpu_ms_per_step=spread([1e3 * t for t in r.cpu]),
                   tokens_per_s=a.batch * a.grid * a.grid / statistics.median(r.times), compile_s=r.compile_s)
        if lg is not None: row["time_vs_llamagen"] = ratios(r, lg)
        row["time_vs_our_next_token"] = ratios(r, w1)
        if r.compiled and a.eager: row["time_vs_eager"] = ratios(r, eager)
        rows.append(row)
    res = dict(command="bench/speed_llamagen.py " + " ".join(sys.argv[1:] if argv is None else argv),
               torch=torch.__version__, threads=a.threads, cpus=os.cpu_count(), batch=a.batch, rounds=a.rounds,
               steps_per_block=a.steps, llamagen=str(lg_path) if lg_path else None, rows=rows, goals=goals(rows))
    print_table(res)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    return res


def goals(rows) -> dict:
    "The issue's two goals for each mode (eager, compiled) that has the rows they need."
    out = {}
    for compiled in (False, True):
        rs = {r["kind"]: r for r in rows if r["compiled"] == compiled}
        mode = "compiled" if compiled else "eager"
        if "w1" in rs and "llamagen" in rs:
            speed = 1 / rs["w1"]["time_vs_llamagen"]["median"]
            out[f"{mode}: next-token speed >= 1.0x LlamaGen"] = dict(value=speed, met=speed >= 1.0)
        if "global_m2" in rs:
            x = rs["global_m2"]["time_vs_our_next_token"]["median"]
            out[f"{mode}: global M=2 <= 1.15x our next-token step"] = dict(value=x, met=x <= 1.15)
    return out


def print_table(res):
    f = lambda d: f"{d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f})"
    print(f"\nCPU training step (fwd + bwd + AdamW), {res['threads']} threads, batch {res['batch']}, "
          f"torch {res['torch']}; {res['rounds']} interleaved rounds of {res['steps_per_block']} steps: median (range)")
    print("| model | mode | params | ms/step | CPU ms/step | tokens/s | time / LlamaGen's | time / our next-token's "
          "| compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        ms = r["ms_per_step"]
        print(f"| {r['name']} | {'compiled' if r['compiled'] else 'eager'} | {r['params'] / 1e6:.2f}M | "
              f"{ms['median']:.0f} ({ms['min']:.0f}-{ms['max']:.0f}) | {r['cpu_ms_per_step']['median']:.0f} | "
              f"{r['tokens_per_s']:,.0f} | {f(r['time_vs_llamagen']) if 'time_vs_llamagen' in r else '-'} | "
              f"{f(r['time_vs_our_next_token'])} | {'-' if r['compile_s'] is None else round(r['compile_s'])} |")
    for k, v in res["goals"].items(): print(f"goal {k}: {v['value']:.2f} -> {'met' if v['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
