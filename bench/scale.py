"""Scale: what one training step (forward + backward) costs per image, for the presets and head variants, against a
next-token model with a plain linear output at the same backbone (the LlamaGen-equivalent reference, defined here),
on the CPU (issue 23). Per run (preset x variant x precision): parameters (backbone, head), counted FLOPs per image
(torch.utils.flop_counter), bytes autograd saves for backward per image (parameters left out, each storage once)
and the step's peak memory per image (bytes of live tensors, heptapod_nb.cost.PeakMemory), each the slope between
two batch sizes (heptapod_nb.cost.per_image). Results are added to --out as each run finishes; rerunning with the
same settings and the same model skips what is there (so presets can be run one at a time). Each row records the
model it measured (`model`: every size and head field); when a preset changes, its old rows stay in the file as
history and the table shows the rows of the presets as they are now.

    flock /tmp/heptapod-bench.lock .venv/bin/python bench/scale.py --presets tiny,B --out bench/results/scale.json
    flock /tmp/heptapod-bench.lock .venv/bin/python bench/scale.py --presets B --variants preset,ref,llamagen \\
        --precisions bf16 --llamagen /tmp/llamagen --out bench/results/scale.json

Variants: `preset` (the preset as it is), `CONTEXT:M` (head_context prefix/last, targets_per_step M, e.g. `last:16`),
`ref` (the next-token reference) and `llamagen` (LlamaGen's own GPT at the preset's size, imported from the folder
that --llamagen names, holding autoregressive/models/gpt.py's `gpt.py` and `utils/drop_path.py`; skipped with a
message when absent; only B is checked: GPT-B).
"""
from __future__ import annotations
import argparse, json, sys, time
from pathlib import Path

DEFAULT_VARIANTS = "preset,prefix:1,prefix:2,prefix:4,prefix:16,last:16,ref"
LLAMAGEN = {"B": "GPT_B", "L": "GPT_L"}       # our preset -> LlamaGen's model of the same width and depth


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/scale.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,B,L,H", help="comma-separated keys of heptapod_nb.model.PRESETS")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated: preset, CONTEXT:M, ref, llamagen")
    p.add_argument("--precisions", default="bf16,fp32", help="bf16 (CPU autocast) and/or fp32")
    p.add_argument("--batches", default="1,2", help="the two batch sizes whose difference gives the per-image slope")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--loss-chunk", default=None,
                   help="override HeptapodConfig.loss_chunk (0: the plain path, every logit at once)")
    p.add_argument("-o", "--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other model override (repeatable)")
    p.add_argument("--llamagen", default="/tmp/llamagen", help="folder with LlamaGen's gpt.py (the llamagen variant)")
    p.add_argument("--out", default=None, help="JSON results file (added to; runs with the same settings are skipped)")
    return p


# ---- the reference: a next-token model with a plain linear output ------------------------------------------------
def reference_model(mc):
    """LlamaGen's training model at our backbone: [class] + token embeddings (+ our learned position embeddings; it
    uses 2D RoPE, no parameters) -> the same `CausalTransformer` -> Linear(D, K) -> float32 logits -> cross-entropy."""
    import torch, torch.nn as nn, torch.nn.functional as F
    from heptapod_nb.transformer import CausalTransformer, init_gpt_

    class NextTokenReference(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.config, N, D = c, c.grid[0] * c.grid[1], c.dim
            self.cls_emb, self.tok_emb = nn.Embedding(max(c.num_classes, 1), D), nn.Embedding(c.vocab_size, D)
            self.pos_emb = nn.Embedding(N, D)
            self.backbone = CausalTransformer(D, c.depth, c.n_heads, max_len=N, grad_checkpoint=c.grad_checkpoint)
            self.out = nn.Linear(D, c.vocab_size, bias=False)
            init_gpt_(self.backbone, c.depth)

        def num_params(self) -> dict:
            hd = sum(p.numel() for p in self.out.parameters())
            tot = sum(p.numel() for p in self.parameters())
            return {"backbone": tot - hd, "head": hd, "total": tot}

        def loss(self, tokens_BHW, labels_B):
            x_BN = tokens_BHW.flatten(1)
            N = x_BN.shape[1]
            e_BLD = self.tok_emb(x_BN[:, :-1]) + self.pos_emb(torch.arange(N - 1, device=x_BN.device))
            e_BLD = torch.cat([self.cls_emb(labels_B)[:, None].to(e_BLD.dtype), e_BLD], 1)
            logits_BNK = self.out(self.backbone(e_BLD)).float()
            return F.cross_entropy(logits_BNK.flatten(0, 1), x_BN.flatten())

    return NextTokenReference(mc)


def llamagen_model(folder: str, preset: str, mc):
    "LlamaGen's own class-conditional GPT at the preset's size (its training defaults: dropout 0.1, token dropout 0.1)."
    if preset not in LLAMAGEN: raise KeyError(f"no LlamaGen model of preset {preset}'s size (only {sorted(LLAMAGEN)})")
    if str(folder) not in sys.path: sys.path.insert(0, str(folder))
    import gpt                                                       # LlamaGen's autoregressive/models/gpt.py, not ours
    m = getattr(gpt, LLAMAGEN[preset])(vocab_size=mc.vocab_size, block_size=mc.grid[0] * mc.grid[1],
                                       num_classes=mc.num_classes, cls_token_num=1, model_type="c2i",
                                       resid_dropout_p=0.1, ffn_dropout_p=0.1, token_dropout_p=0.1)
    hd = sum(p.numel() for p in m.output.parameters()); tot = sum(p.numel() for p in m.parameters())
    m.num_params = lambda: {"backbone": tot - hd, "head": hd, "total": tot}
    m.loss = lambda tokens, labels: m(idx=tokens.flatten(1)[:, :-1], cond_idx=labels, targets=tokens.flatten(1))[1]
    return m


# ---- runs --------------------------------------------------------------------------------------------------------
def model_overrides(a, fields) -> dict:
    "The model overrides of the command line (`--loss-chunk` only where HeptapodConfig has the field)."
    from heptapod_nb.config import parse_value
    ov = {}
    for kv in a.set:
        if "=" not in kv: raise SystemExit(f"bench/scale.py: error: -o {kv!r} is not KEY=VALUE")
        k, v = kv.split("=", 1); ov[k.strip()] = parse_value(v.strip())
    for flag, key in ((a.loss_chunk, "loss_chunk"),):
        if flag is None: continue
        if key not in fields:
            raise SystemExit(f"bench/scale.py: error: this HeptapodConfig has no field {key!r} "
                             f"(--{key.replace('_', '-')})")
        ov[key] = parse_value(flag)
    return ov


def variant_overrides(v: str) -> dict:
    if v in ("preset", "ref", "llamagen"): return {}
    try:
        ctx, m = v.split(":")
        if ctx not in ("prefix", "last"): raise ValueError
        return dict(head_context=ctx, targets_per_step=m if m == "all" else int(m))
    except ValueError:
        raise SystemExit(f"bench/scale.py: error: unknown variant {v!r} "
                         f"(preset, ref, llamagen or CONTEXT:M, e.g. last:16)") from None


MEMORY_PATH = ("loss_chunk", "grad_checkpoint")
# what the reference model is built from (ref_model); a Heptapod row records every field of its config
REF_FIELDS = ("vocab_size", "grid", "num_classes", "dim", "depth", "n_heads", "grad_checkpoint")


def model_of(preset: str, variant: str, extra: dict) -> dict:
    "The model a run measures, as the JSON row records it (the part of the config that variant builds from)."
    from heptapod_nb.config import get_preset
    from heptapod_nb.model import PRESETS
    mc = get_preset(PRESETS, preset, **{**extra, **variant_overrides(variant)})
    d = mc.to_dict()                      # JSON-shaped already (tuples as lists)
    return {k: d[k] for k in REF_FIELDS} if variant in ("ref", "llamagen") else d


def run_one(preset: str, variant: str, precision: str, batches, extra: dict, llamagen_dir: str) -> dict:
    import contextlib, torch
    from heptapod_nb.config import get_preset
    from heptapod_nb.cost import per_image
    from heptapod_nb.model import PRESETS, Heptapod
    from heptapod_nb.model import random_tokens, token_info
    mc = get_preset(PRESETS, preset, **{**extra, **variant_overrides(variant)})
    torch.manual_seed(0)
    if variant == "ref": model = reference_model(mc)
    elif variant == "llamagen": model = llamagen_model(llamagen_dir, preset, mc)
    else: model = Heptapod(mc)
    model.train()
    info, g = token_info(mc), torch.Generator().manual_seed(0)
    data = random_tokens(info, max(batches), "cpu", g)
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def loss_fn(b):
        with amp(): return model.loss(data[0][:b], data[1][:b])

    t = time.perf_counter()
    c = per_image(loss_fn, model.parameters(), "cpu", batches)
    cfg = {k: getattr(mc, k) for k in MEMORY_PATH if hasattr(mc, k)} if variant not in ("ref", "llamagen") else \
          {"grad_checkpoint": mc.grad_checkpoint} if variant == "ref" else {}
    if variant not in ("ref", "llamagen"):
        cfg.update(head_context=mc.head_context, targets_per_step=mc.targets_per_step, window=mc.window)
    return dict(preset=preset, variant=variant, precision=precision, params=model.num_params(), config=cfg,
                flops_per_image=c["flops"]["per_image"], saved_bytes_per_image=c["saved_bytes"]["per_image"],
                saved_bytes_fixed=c["saved_bytes"]["fixed"], peak_bytes_per_image=c["peak_bytes"]["per_image"],
                peak_bytes_fixed=c["peak_bytes"]["fixed"], steps=c["steps"], seconds=time.perf_counter() - t)


def table(rows: list[dict]) -> str:
    "The markdown table; ratios to the reference of the same preset and precision."
    ref = {(r["preset"], r["precision"]): r for r in rows if r["variant"] == "ref"}
    out = ["| preset | variant | precision | params M (backbone + head) | GFLOP/image | saved MB/image | peak MB/image "
           "| peak fixed MB | x ref (FLOPs / saved / peak) | memory path |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, b = r["params"], ref.get((r["preset"], r["precision"]))
        x = (f"{r['flops_per_image'] / b['flops_per_image']:.2f} / "
             f"{r['saved_bytes_per_image'] / b['saved_bytes_per_image']:.2f} / "
             f"{r['peak_bytes_per_image'] / b['peak_bytes_per_image']:.2f}") if b and r is not b else "-"
        path = ", ".join(f"{k}={v}" for k, v in r["config"].items() if k in MEMORY_PATH) or "-"
        out.append(f"| {r['preset']} | {r['variant']} | {r['precision']} | "
                   f"{p['total'] / 1e6:.1f} ({p['backbone'] / 1e6:.1f} + {p['head'] / 1e6:.1f}) | "
                   f"{r['flops_per_image'] / 1e9:,.1f} | {r['saved_bytes_per_image'] / 1e6:,.1f} | "
                   f"{r['peak_bytes_per_image'] / 1e6:,.1f} | {r['peak_bytes_fixed'] / 1e6:,.1f} | {x} | {path} |")
    return "\n".join(out)


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    import torch
    from heptapod_nb.config import write_json
    from heptapod_nb.model import PRESETS, HeptapodConfig
    torch.set_num_threads(a.threads)
    presets, variants = a.presets.split(","), a.variants.split(",")
    precisions, batches = a.precisions.split(","), tuple(int(b) for b in a.batches.split(","))
    for p in presets:
        if p not in PRESETS: raise SystemExit(f"bench/scale.py: error: unknown preset {p!r} (one of {sorted(PRESETS)})")
    for p in precisions:
        if p not in ("bf16", "fp32"): raise SystemExit(f"bench/scale.py: error: precision {p!r} is not bf16 or fp32")
    if len(batches) != 2 or batches[0] == batches[1] or min(batches) < 1:
        raise SystemExit(f"bench/scale.py: error: --batches needs two different sizes >= 1, got {a.batches}")
    for v in variants: variant_overrides(v)
    extra = model_overrides(a, set(HeptapodConfig.field_names()))
    if "llamagen" in variants and not (Path(a.llamagen) / "gpt.py").exists():
        print(f"llamagen: skipped ({Path(a.llamagen) / 'gpt.py'} is absent: copy LlamaGen's "
              f"autoregressive/models/gpt.py and utils/drop_path.py there, see BENCHMARKS.md)")
        variants = [v for v in variants if v != "llamagen"]
    settings = dict(batches=list(batches), threads=a.threads, overrides=extra)
    plain = dict(batches=list(batches), threads=a.threads)          # ref and llamagen take no model overrides
    settings_for = lambda v: plain if v in ("ref", "llamagen") else settings
    doc = dict(command="bench/scale.py", rows=[])
    if a.out and Path(a.out).exists(): doc = json.loads(Path(a.out).read_text())
    key = lambda r: (r["preset"], r["variant"], r["precision"], json.dumps(r.get("settings"), sort_keys=True),
                     json.dumps(r.get("model"), sort_keys=True))
    done = {key(r) for r in doc["rows"]}
    for preset in presets:
        for variant in variants:
            if variant == "llamagen" and preset not in LLAMAGEN:
                print(f"llamagen: no LlamaGen model of preset {preset}'s size: skipped"); continue
            model = model_of(preset, variant, extra)
            for prec in precisions:
                if key(dict(preset=preset, variant=variant, precision=prec, settings=settings_for(variant),
                            model=model)) in done:
                    continue
                r = dict(run_one(preset, variant, prec, batches, extra, a.llamagen), settings=settings_for(variant),
                         model=model)
                print(f"{preset} {variant} {prec}: {r['flops_per_image'] / 1e9:,.1f} GFLOP, "
                      f"saved {r['saved_bytes_per_image'] / 1e6:,.1f} MB, "
                      f"peak {r['peak_bytes_per_image'] / 1e6:,.1f} MB per image ({r['seconds']:.0f} s)", flush=True)
                doc["rows"] = [x for x in doc["rows"] if key(x) != key(r)] + [r]
                if a.out: write_json(a.out, doc)
    now = lambda r: r.get("model") == model_of(r["preset"], r["variant"], extra)
    rows = [r for r in doc["rows"] if r["preset"] in presets and r.get("settings") == settings_for(r["variant"])
            and now(r)]
    print(f"\nper image, one forward + backward on the CPU ({a.threads} threads), "
          f"slope between batch {batches[0]} and {batches[1]}; "
          f"MB = 1e6 bytes; peak = live tensor bytes (heptapod_nb.cost.PeakMemory)")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
