"""Training throughput and model FLOPs utilisation (MFU) of a preset on one device, plus sampling images/s.

Training: forward + backward + AdamW step on random token batches (bf16 autocast on CUDA, fp32 on CPU), timed after
warm-up. FLOPs per step are *counted* (torch.utils.flop_counter over one forward + backward: every matmul and
attention of the backbone and the 2D head), not estimated, so MFU = counted FLOPs / time / the device's dense bf16
peak. Sampling: `heptapod_nb.sample.generate` (KV cache), token grids only (the tokenizer's decoder is not timed).

    .venv/bin/python bench/gpu.py --preset B --device cuda --batch 64 --steps 20 --out bench/results/gpu_B.json
    .venv/bin/python bench/gpu.py --preset tiny --device cpu --steps 3            # smoke test on a laptop

The 16x16-grid miniature of issue 16 (bench/grid16.py) at a length the 2-core CPU cannot reach: `bench/gpu.py grid16
[grid16 options]` runs it with GPU_GRID16 (training on the GPU, several runs in parallel; options given after `grid16`
override them), writing bench/results/grid16_gpu.json; it resumes like grid16.py, so a timed-out call can be rerun:

    timeout 540 .venv/bin/python bench/gpu.py grid16 --seeds 0,1,2
"""
import argparse, contextlib, json, sys, time
from pathlib import Path

import torch

from heptapod_nb.config import apply_overrides, get_device, get_preset
from heptapod_nb.model import PRESETS, Heptapod
from heptapod_nb.train import LossModule, param_groups, random_tokens, token_info

PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}  # dense, SXM where it varies


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override: return override * 1e12
    if device.type != "cuda": return None
    name = torch.cuda.get_device_name(device)
    for k, v in PEAK_BF16_TFLOPS.items():
        if k in name: return v * 1e12
    return None


def sync(device):
    if device.type == "cuda": torch.cuda.synchronize(device)


def bench_train(model, info, batch, steps, warmup, device, bf16, compile_):
    from torch.utils.flop_counter import FlopCounterMode
    net = LossModule(model)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, fused=device.type == "cuda")
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    g = torch.Generator().manual_seed(0)
    batches = [random_tokens(info, batch, device, g) for _ in range(2)]
    with FlopCounterMode(display=False) as fc:                          # counted on the eager model, one fwd+bwd
        with amp(): loss = net(*batches[0])
        loss.backward()
    flops = fc.get_total_flops()
    opt.zero_grad(set_to_none=True)
    step_net = torch.compile(net) if compile_ else net

    def step(i):
        with amp(): loss = step_net(*batches[i % 2])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        return loss

    for i in range(warmup): step(i)
    sync(device)
    if device.type == "cuda": torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for i in range(steps): last = step(i)
    sync(device)
    dt = (time.perf_counter() - t) / steps
    if not torch.isfinite(last.detach()): raise FloatingPointError("the benchmark's loss is not finite")
    n_tok = batch * info["grid"][0] * info["grid"][1]
    return dict(batch=batch, sec_per_step=dt, tokens_per_s=n_tok / dt, images_per_s=batch / dt, flops_per_step=flops,
                achieved_tflops=flops / dt / 1e12, loss=float(last.detach()),
                max_mem_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)


def bench_sample(model, info, n, device, bf16):
    from heptapod_nb.sample import generate
    labels = torch.arange(n, device=device) % (info.get("num_classes") or 1)
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    model.eval()
    with torch.no_grad(), amp():
        generate(model, labels[: min(2, n)], seed=0)                       # warm-up (allocations, kernels)
        sync(device); t = time.perf_counter()
        generate(model, labels, seed=1)
        sync(device); dt = time.perf_counter() - t
    model.train()
    return dict(n=n, seconds=dt, images_per_s=n / dt)


def flops_only(a, mc, model, info, params, device):
    "Counted FLOPs of one image (forward + backward, including any activation-checkpoint recompute) and the images/s and"
    " tokens/s per GPU they imply at `a.mfu` of an H100/H200's dense bf16 peak."
    from torch.utils.flop_counter import FlopCounterMode
    x, y = random_tokens(info, 1, device)
    with FlopCounterMode(display=False) as fc:
        LossModule(model)(x, y).backward()
    f = fc.get_total_flops()
    peak = (a.peak_tflops or PEAK_BF16_TFLOPS["H100"]) * 1e12
    img_s = a.mfu * peak / f
    N = info["grid"][0] * info["grid"][1]
    res = dict(command=" ".join(sys.argv), preset=a.preset, params=params, grad_checkpoint=getattr(mc, "grad_checkpoint", None),
               flops_per_image=f, flops_6n_per_image=6 * params * N, assumed_mfu=a.mfu, peak_flops=peak,
               projected_images_per_s_per_gpu=img_s, projected_tokens_per_s_per_gpu=img_s * N)
    print(f"{a.preset}: {params / 1e6:.0f}M params, counted {f / 1e9:,.0f} GFLOP per image (fwd+bwd; 6*N*T = {6 * params * N / 1e9:,.0f}); "
          f"at {a.mfu:.0%} of {peak / 1e12:.0f} TFLOP/s: {img_s:,.0f} images/s = {img_s * N:,.0f} tokens/s per GPU (projection, not a measurement)")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2, default=str))
    return res


# about 8 minutes on one H200 with 16 CPU cores (sized, not yet measured: no GPU was lent when it was written): the
# tokenizer (GPU), then 5 configs x 2 modes x the seeds given, 6 runs at a time; the probe, sampling and scoring of each
# run happen on the CPU (2 threads per run)
GPU_GRID16 = ["--configs", "w1_last,w16_m2_nw8_last,global_m2_nw8_last,w1,global_m2_nw8", "--modes", "uncond,cond", "--seeds", "0",
              "--steps", "1500", "--batch", "64", "--samples", "500", "--curve_samples", "50", "--workers", "6",
              "--threads", "2", "--tokenizer_minutes", "2", "--work", "runs/grid16_gpu", "--out", "bench/results/grid16_gpu.json"]


def grid16(argv: list[str]) -> int:
    "`bench/gpu.py grid16 ...`: bench/grid16.py with the GPU defaults `GPU_GRID16`, then `argv`."
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_grid16", Path(__file__).with_name("grid16.py"))
    g = importlib.util.module_from_spec(spec); spec.loader.exec_module(g)
    if not torch.cuda.is_available(): print("bench/gpu.py grid16: warning: no CUDA device; the runs train on the CPU", file=sys.stderr)
    return g.main(GPU_GRID16 + list(argv))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "grid16": return grid16(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="model preset overrides (model.key=value also accepted)")
    p.add_argument("--preset", default="B")
    p.add_argument("--device", default=None)
    p.add_argument("--batch", type=int, default=None, help="training batch (default 64 on CUDA, 4 on CPU)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; 1 on CPU)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast even on CUDA")
    p.add_argument("--sample-n", type=int, default=None, help="images sampled in the timed generate call (default 64 on CUDA, 2 on CPU; 0 = skip)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (looked up for H100/H200/A100/L40S/L4)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--flops-only", action="store_true",
                   help="only count FLOPs of one image's forward + backward and project throughput at --mfu of the peak")
    p.add_argument("--mfu", type=float, default=0.4, help="MFU assumed by --flops-only projections")
    p.add_argument("--out")
    a = p.parse_args(argv)
    dev = get_device(a.device)
    cpu = dev.type == "cpu"
    if cpu: torch.set_num_threads(a.threads)
    else: torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True
    batch = a.batch or (4 if cpu else 64); warmup = 1 if cpu and a.warmup is None else (a.warmup if a.warmup is not None else 5)
    sample_n = a.sample_n if a.sample_n is not None else (2 if cpu else 64)
    bf16 = dev.type == "cuda" and not a.fp32
    mc = apply_overrides(get_preset(PRESETS, a.preset), [o.removeprefix("model.") for o in a.overrides])
    torch.manual_seed(0)
    model = Heptapod(mc).to(dev)
    info = token_info(mc)
    params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    if a.flops_only: return flops_only(a, mc, model, info, params, dev)
    tr = bench_train(model, info, batch, a.steps, warmup, dev, bf16, a.compile)
    peak = peak_flops(dev, a.peak_tflops)
    tr["mfu"] = tr["flops_per_step"] / tr["sec_per_step"] / peak if peak else None
    tr["flops_6n_per_step"] = 6 * params * batch * info["grid"][0] * info["grid"][1]
    sa = bench_sample(model, info, sample_n, dev, bf16) if sample_n else None
    print(f"{a.preset} preset ({params / 1e6:.1f}M params), {name}, {'bf16 autocast' if bf16 else 'fp32'}{', compiled' if a.compile else ''}, "
          f"batch {batch}, {a.steps} timed steps after {warmup}")
    print("| preset | device | batch | ms/step | tokens/s | counted TFLOP/step | achieved TFLOP/s | MFU | max mem GB | sampling images/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    f = lambda v, fmt: "n/a" if v is None else format(v, fmt)
    print(f"| {a.preset} | {name} | {batch} | {1000 * tr['sec_per_step']:.1f} | {tr['tokens_per_s']:,.0f} | {tr['flops_per_step'] / 1e12:.3f} | "
          f"{tr['achieved_tflops']:.2f} | {f(tr['mfu'] and 100 * tr['mfu'], '.1f')}{'%' if tr['mfu'] else ''} | {f(tr['max_mem_gb'], '.1f')} | "
          f"{f(sa and sa['images_per_s'], '.2f')} |")
    if tr["mfu"] is not None: print(f"goal MFU >= 40%: {'met' if tr['mfu'] >= 0.4 else 'NOT met'}")
    res = dict(command=" ".join(sys.argv), preset=a.preset, model_config=mc.to_dict(), params=params, device=name, bf16=bf16,
               compile=a.compile, torch=torch.__version__, peak_flops=peak, train=tr, sample=sa)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2, default=str))
    return res


if __name__ == "__main__":
    r = main()
    sys.exit(r if isinstance(r, int) else 0)
