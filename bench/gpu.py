"""Training throughput, peak memory and model FLOPs utilisation (MFU) of a preset on one device, plus sampling images/s.

Training: optimizer steps of one rank of a run (forward + backward per micro-batch, gradient accumulation, clipping,
AdamW, the EMA update), bf16 autocast on CUDA, fp32 on CPU, on random token batches, timed after warm-up. By default
on CUDA one rank's share of the README's run: the global batch 1024 over the README's world size for the preset (B: 8
GPUs, so 128 images per optimizer step) with `micro_batch="auto"` (heptapod-train's own planner: two probe steps,
the largest micro-batch within 80% of the device's memory, the rest by accumulation). Reported: ms per optimizer
step, images/s and tokens/s per GPU, `torch.cuda.max_memory_allocated`, and MFU = counted FLOPs per step / step
time / the device's dense bf16 peak (`PEAK_BF16_TFLOPS`, looked up by device name). FLOPs are *counted*
(`heptapod_nb.cost.count_flops` over one micro-batch's forward + backward, times the accumulation steps: every
matmul and attention of the backbone and the 2D head, any activation-checkpoint recompute included), not estimated.
Sampling: `heptapod_nb.sample.generate` (KV cache), token grids only (the tokenizer's decoder is not timed).

    # B, auto micro-batch:
    .venv/bin/python bench/gpu.py --preset B --device cuda --steps 10 --out bench/results/gpu_B.json
    # a fixed layout:
    .venv/bin/python bench/gpu.py --preset B --device cuda --batch 64 --micro-batch 64 --steps 20
    # smoke test on a laptop:
    .venv/bin/python bench/gpu.py --preset tiny --device cpu --steps 3

The 16x16-grid miniature of issue 16 (bench/grid16.py) at a length the 2-core CPU cannot reach: `bench/gpu.py grid16
[grid16 options]` runs it with GPU_GRID16 (training on the GPU, several runs in parallel; options given after `grid16`
override them), writing bench/results/grid16_gpu.json; it resumes like grid16.py, so a timed-out call can be rerun:

    timeout 540 .venv/bin/python bench/gpu.py grid16 --seeds 0,1,2
"""
import argparse, contextlib, json, sys, time
from pathlib import Path

# dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets; matched against
# torch.cuda.get_device_name, the longest matching key first ("H100 PCIe" before "H100")
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0,
                    "L40S": 362.1, "L4": 121.0}
# the README's runs: global batch 1024 over this many GPUs (B: 8; L: 16; H: 32)
README_WORLD = {"B": 8, "L": 16, "H": 32}
README_GLOBAL_BATCH = 1024


def peak_tflops_for(device_name: str) -> float | None:
    "The dense bf16 peak (TFLOP/s) of a device named `device_name` (as CUDA names it), or None when not in the table."
    for k in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if k.lower() in device_name.lower(): return PEAK_BF16_TFLOPS[k]
    return None


def peak_flops(device, override: float | None) -> float | None:
    "Peak FLOP/s: `override` (TFLOP/s) if given, else the CUDA device's from `PEAK_BF16_TFLOPS`, else None."
    if override: return override * 1e12
    if device.type != "cuda": return None
    import torch
    t = peak_tflops_for(torch.cuda.get_device_name(device))
    return t * 1e12 if t else None


def mfu(flops_per_step: float, sec_per_step: float, peak: float | None) -> float | None:
    "Model FLOPs utilisation: the counted FLOPs of a step / its time / the peak FLOP/s (None without a peak)."
    if not peak: return None
    if sec_per_step <= 0: raise ValueError(f"a step must take some time, got {sec_per_step} s")
    return flops_per_step / sec_per_step / peak


def step_flops(loss_fn, batch: int, accumulation: int = 1) -> int:
    "Counted FLOPs of an optimizer step: forward + backward of `loss_fn(batch)` (one micro-batch) times `accumulation`."
    from heptapod_nb.cost import count_flops
    from heptapod_nb.optim import backward
    return accumulation * count_flops(lambda: backward(loss_fn(batch)))


def sync(device):
    import torch
    if device.type == "cuda": torch.cuda.synchronize(device)


def choose_micro_batch(model, info, device, per_rank: int, amp, budget_bytes: float | None, ema: bool) -> dict:
    """heptapod-train's `micro_batch="auto"` for one process (`cost.auto_micro_batch`: probe steps at 1 and 2 images,
    the largest divisor of `per_rank` within `AUTO_MARGIN` of the budget, confirmed by a step of that size; the budget
    is the device's memory on CUDA); -> dict(micro_batch, ...)."""
    import torch
    from heptapod_nb.cost import AUTO_MARGIN, auto_micro_batch, planned_bytes, probe_peak, resident_bytes
    if budget_bytes is None:
        if device.type != "cuda": raise SystemExit("bench/gpu.py: --micro-batch auto off CUDA needs --memory-budget-gb")
        budget_bytes = torch.cuda.get_device_properties(device).total_memory
    resident = resident_bytes(model, ema)
    plan = auto_micro_batch(lambda b: probe_peak(model, info, device, amp, b), resident, budget_bytes, per_rank)
    mb = plan["micro_batch"]
    return dict(micro_batch=mb, budget_bytes=budget_bytes, margin=AUTO_MARGIN, per_image_bytes=plan["per_image"],
                fixed_bytes=plan["fixed"], resident_bytes=resident,
                probed={str(b): p for b, p in plan["peaks"].items()},
                planned_bytes=planned_bytes(plan, resident, mb))


def bench_train(model, info, batch, steps, warmup, device, bf16, compile_, micro_batch=None, ema=True):
    """Time optimizer steps of `batch` images as `batch // micro_batch` accumulated micro-batches (one rank's share
    of a run), with clipping, AdamW and the EMA update as heptapod-train does them."""
    import torch
    from heptapod_nb.optim import EMA, backward, optimizer_step
    from heptapod_nb.model import LossModule, random_tokens
    from heptapod_nb.optim import param_groups
    mb = micro_batch or batch
    if batch % mb: raise SystemExit(f"bench/gpu.py: micro-batch {mb} does not divide the batch {batch}")
    accum = batch // mb
    net = LossModule(model)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, fused=device.type == "cuda")
    shadow = EMA(model, 0.9999) if ema else None
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    g = torch.Generator().manual_seed(0)
    batches = [random_tokens(info, mb, device, g) for _ in range(2)]

    def loss_fn(b):
        with amp(): return net(*batches[0]) / accum
    flops = step_flops(loss_fn, mb, accum)                               # counted on the eager model
    opt.zero_grad(set_to_none=True)
    step_net = torch.compile(net) if compile_ else net
    params = [p for p in model.parameters() if p.requires_grad]

    def step(i):
        total = 0.0
        for j in range(accum):
            with amp(): loss = step_net(*batches[(i + j) % 2]) / accum
            backward(loss); total = total + loss.detach()
        optimizer_step(opt, params, clip=1.0)
        if shadow is not None: shadow.update(model, i)
        return total

    for i in range(warmup): step(i)
    sync(device)
    if device.type == "cuda": torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for i in range(steps): last = step(i)
    sync(device)
    dt = (time.perf_counter() - t) / steps
    if not torch.isfinite(last): raise FloatingPointError("the benchmark's loss is not finite")
    n_tok = batch * info["grid"][0] * info["grid"][1]
    return dict(batch=batch, micro_batch=mb, accumulation=accum, sec_per_step=dt, tokens_per_s=n_tok / dt,
                images_per_s=batch / dt, flops_per_step=flops, flops_per_image=flops / batch,
                achieved_tflops=flops / dt / 1e12, loss=float(last),
                max_mem_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)


def bench_sample(model, info, n, device, bf16):
    import torch
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


IMAGENET_TRAIN_IMAGES = 1_281_167


def flops_only(a, mc, model, info, params, device, argv=()):
    """Counted FLOPs of one image (forward + backward, including any activation-checkpoint recompute) and the
    images/s and tokens/s per GPU they imply at `a.mfu` of an H100/H200's dense bf16 peak, with the days 800
    ImageNet epochs would take on 8 GPUs. `--out` is a document of presets: this preset's entry is added or replaced,
    the others kept (bench/results/flops_presets.json holds B, L and H)."""
    from heptapod_nb.model import LossModule, random_tokens
    x, y = random_tokens(info, 1, device)
    t = time.perf_counter()
    f = step_flops(lambda b: LossModule(model)(x, y), 1)
    peak = (a.peak_tflops or PEAK_BF16_TFLOPS["H100"]) * 1e12
    img_s = a.mfu * peak / f
    N = info["grid"][0] * info["grid"][1]
    res = dict(preset=a.preset, params=model.num_params(), model=mc.to_dict(),
               grad_checkpoint=getattr(mc, "grad_checkpoint", None), flops_per_image=f,
               flops_6n_per_image=6 * params * N, seconds=time.perf_counter() - t, assumed_mfu=a.mfu, peak_flops=peak,
               projected_images_per_s_per_gpu=img_s, projected_tokens_per_s_per_gpu=img_s * N,
               projected_days_800_epochs_on_8_gpus=800 * IMAGENET_TRAIN_IMAGES / (8 * img_s) / 86400)
    print(f"{a.preset}: {params / 1e6:.0f}M params, counted {f / 1e9:,.0f} GFLOP per image "
          f"(fwd+bwd; 6*N*T = {6 * params * N / 1e9:,.0f}); at {a.mfu:.0%} of {peak / 1e12:.0f} TFLOP/s: "
          f"{img_s:,.0f} images/s = {img_s * N:,.0f} tokens/s per GPU, 800 epochs on 8 GPUs in "
          f"{res['projected_days_800_epochs_on_8_gpus']:.1f} days (projection, not a measurement)")
    if a.out:
        out = Path(a.out)
        doc = json.loads(out.read_text()) if out.exists() else {}
        if not isinstance(doc.get("presets"), dict):
            doc = dict(note="FlopCounterMode over Heptapod(PRESETS[k]).loss(one random image).backward(), "
                            "the computation of `bench/gpu.py --preset K --device cpu --flops-only --out FILE`; "
                            "counts include activation-checkpoint recompute where the preset has it", presets={})
        doc["presets"][a.preset] = dict(res, command=" ".join(["bench/gpu.py", *argv]))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2, default=str))
    return res


# about 8 minutes on one H200 with 16 CPU cores (sized, not yet measured: no GPU was lent when it was written): the
# tokenizer (GPU), then 5 configs x 2 modes x the seeds given, 6 runs at a time; the probe, sampling and scoring of each
# run happen on the CPU (2 threads per run)
GPU_GRID16 = ["--configs", "w1_last,w16_m2_nw8_last,global_m2_nw8_last,w1,global_m2_nw8", "--modes", "uncond,cond",
              "--seeds", "0", "--steps", "1500", "--batch", "64", "--samples", "500", "--curve_samples", "50",
              "--workers", "6", "--threads", "2", "--tokenizer_minutes", "2", "--work", "runs/grid16_gpu",
              "--out", "bench/results/grid16_gpu.json"]


def grid16(argv: list[str]) -> int:
    "`bench/gpu.py grid16 ...`: bench/grid16.py with the GPU defaults `GPU_GRID16`, then `argv`."
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_grid16", Path(__file__).with_name("grid16.py"))
    g = importlib.util.module_from_spec(spec); spec.loader.exec_module(g)
    import torch
    if not torch.cuda.is_available():
        print("bench/gpu.py grid16: warning: no CUDA device; the runs train on the CPU", file=sys.stderr)
    return g.main(GPU_GRID16 + list(argv))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/gpu.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="model preset overrides (model.key=value also accepted)")
    p.add_argument("--preset", default="B")
    p.add_argument("--device", default=None)
    p.add_argument("--batch", type=int, default=None,
                   help="images per optimizer step on this device (default on CUDA: the README's global batch / its "
                        "world size for the preset, B: 1024 / 8 = 128; 4 on CPU)")
    p.add_argument("--global-batch", type=int, default=README_GLOBAL_BATCH,
                   help="the run's global batch (for the default --batch)")
    p.add_argument("--world", type=int, default=None,
                   help="the run's GPUs (default: the README's for the preset, B 8, L 16, H 32)")
    p.add_argument("--micro-batch", default=None,
                   help='images per forward: an int, or "auto" (heptapod-train\'s planner; the default on CUDA); '
                        "default on CPU: the whole batch")
    p.add_argument("--memory-budget-gb", type=float, default=None,
                   help='GiB for --micro-batch auto (default: the CUDA device\'s memory)')
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 on CPU)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast even on CUDA")
    p.add_argument("--no-ema", action="store_true", help="leave out the EMA update heptapod-train does after each step")
    p.add_argument("--sample-n", type=int, default=None,
                   help="images sampled in the timed generate call (default 64 on CUDA, 2 on CPU; 0 = skip)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak (looked up in PEAK_BF16_TFLOPS by name)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--flops-only", action="store_true",
                   help="only count FLOPs of one image's forward + backward and project throughput at --mfu of "
                        "the peak")
    p.add_argument("--mfu", type=float, default=0.4, help="MFU assumed by --flops-only projections")
    p.add_argument("--out")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "grid16": return grid16(argv[1:])
    a = parser().parse_args(argv)
    import torch
    from heptapod_nb.config import apply_overrides, get_device, get_preset
    from heptapod_nb.model import PRESETS, Heptapod
    from heptapod_nb.model import token_info
    dev = get_device(a.device)
    cpu = dev.type == "cpu"
    if cpu: torch.set_num_threads(a.threads)
    else: torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True
    world = a.world or README_WORLD.get(a.preset, 1)
    if a.global_batch % world:
        raise SystemExit(f"bench/gpu.py: --global-batch {a.global_batch} is not divisible by --world {world}")
    batch = a.batch or (4 if cpu else a.global_batch // world)
    warmup = a.warmup if a.warmup is not None else (1 if cpu else 3)
    sample_n = a.sample_n if a.sample_n is not None else (2 if cpu else 64)
    bf16 = dev.type == "cuda" and not a.fp32
    amp = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    mc = apply_overrides(get_preset(PRESETS, a.preset), [o.removeprefix("model.") for o in a.overrides])
    torch.manual_seed(0)
    model = Heptapod(mc).to(dev)
    info = token_info(mc)
    params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    if a.flops_only: return flops_only(a, mc, model, info, params, dev, argv)
    mb_choice = a.micro_batch or ("auto" if not cpu else None)
    plan = None
    if mb_choice == "auto":
        budget = a.memory_budget_gb * 2**30 if a.memory_budget_gb else None
        plan = choose_micro_batch(model, info, dev, batch, amp, budget, ema=not a.no_ema)
        mb = plan["micro_batch"]
    else: mb = int(mb_choice) if mb_choice else batch
    tr = bench_train(model, info, batch, a.steps, warmup, dev, bf16, a.compile, micro_batch=mb, ema=not a.no_ema)
    peak = peak_flops(dev, a.peak_tflops)
    tr["mfu"] = mfu(tr["flops_per_step"], tr["sec_per_step"], peak)
    tr["flops_6n_per_step"] = 6 * params * batch * info["grid"][0] * info["grid"][1]
    sa = bench_sample(model, info, sample_n, dev, bf16) if sample_n else None
    print(f"{a.preset} preset ({params / 1e6:.1f}M params), {name}, {'bf16 autocast' if bf16 else 'fp32'}"
          f"{', compiled' if a.compile else ''}, "
          f"{batch} images per optimizer step = {tr['accumulation']} x micro-batch {mb}"
          + (" (auto: " + format(plan['per_image_bytes'] / 2**20, ',.0f') + " MiB per image measured, "
             + format(plan['planned_bytes'] / 2**30, '.1f') + " of " + format(plan['budget_bytes'] / 2**30, '.1f')
             + " GiB planned)" if plan else "")
          + f", {a.steps} timed steps after {warmup}; peak {f'{peak / 1e12:.1f} TFLOP/s' if peak else 'unknown'}")
    print("| preset | device | images/step | micro-batch | ms/step | images/s | tokens/s | counted TFLOP/step "
          "| achieved TFLOP/s | MFU | max mem GB | sampling images/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    f = lambda v, fmt: "n/a" if v is None else format(v, fmt)
    print(f"| {a.preset} | {name} | {batch} | {mb} | {1000 * tr['sec_per_step']:.1f} | {tr['images_per_s']:,.1f} | "
          f"{tr['tokens_per_s']:,.0f} | {tr['flops_per_step'] / 1e12:.3f} | {tr['achieved_tflops']:.2f} | "
          f"{f(tr['mfu'] and 100 * tr['mfu'], '.1f')}{'%' if tr['mfu'] else ''} | "
          f"{f(tr['max_mem_gb'], '.1f')} | {f(sa and sa['images_per_s'], '.2f')} |")
    if tr["mfu"] is not None: print(f"goal MFU >= 40%: {'met' if tr['mfu'] >= 0.4 else 'NOT met'}")
    res = dict(command=" ".join(sys.argv), preset=a.preset, model_config=mc.to_dict(), params=params, device=name,
               bf16=bf16, compile=a.compile, torch=torch.__version__, peak_flops=peak, world=world,
               global_batch=a.global_batch, micro_batch_plan=plan, train=tr, sample=sa)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2, default=str))
    return res


if __name__ == "__main__":
    r = main()
    sys.exit(r if isinstance(r, int) else 0)
