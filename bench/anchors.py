"""Bit-identity anchors for refactorings (issue 26): sha256 of what the library computes, to compare two checkouts.

Each anchor runs a public entry point and hashes every tensor / array / image it returns (or the files it writes):
the sampler's samples and traces on the shipped demo weights for many settings (both models), the app's pictures
(generation frames, the click panel, a completion, a comparison), 8-step training runs of `heptapod-train` (VQ and
KL token sets, with EMA and a checkpoint), a 4-step tokenizer training run, the data loaders. Run it on the commit
before a refactoring and after it (one thread, same machine); every hash must match:

    PYTHONPATH=<checkout> OMP_NUM_THREADS=1 .venv/bin/python bench/anchors.py --out OUT/anchors.json
"""
from __future__ import annotations
import argparse, hashlib, json, os, sys, tempfile, time
from pathlib import Path

os.environ.setdefault("HEPTAPOD_FAST", "1")
import numpy as np
import torch
from PIL import Image


def digest(x, h=None):
    "sha256 over every tensor / array / image / number / string in a nested structure (dataclasses by their fields)."
    h = h or hashlib.sha256()
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().contiguous(); h.update(str((x.dtype, tuple(x.shape))).encode())
        h.update(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    elif isinstance(x, np.ndarray):
        h.update(str((x.dtype, x.shape)).encode()); h.update(np.ascontiguousarray(x).tobytes())
    elif isinstance(x, Image.Image): digest(np.asarray(x), h)
    elif isinstance(x, dict):
        for k in sorted(x, key=str): h.update(str(k).encode()); digest(x[k], h)
    elif isinstance(x, (list, tuple)):
        for v in x: digest(v, h)
    elif hasattr(x, "__dataclass_fields__"): digest({k: getattr(x, k) for k in x.__dataclass_fields__}, h)
    elif isinstance(x, (int, float, str, bool)) or x is None: h.update(repr(x).encode())
    elif hasattr(x, "steps") and hasattr(x, "tokens"): digest((x.steps, x.order, x.tokens, x.kind), h)
    elif hasattr(x, "images") and hasattr(x, "labels"): digest((x.images, x.labels, x.num_classes, x.name), h)
    else: h.update(type(x).__name__.encode())       # opaque objects (a Run, a Live) by name only
    return h


def sha(x) -> str: return digest(x).hexdigest()[:16]


def files_sha(folder: Path, names) -> dict:
    "Hash of each written file's contents (safetensors by tensors, json logs without wall-clock fields)."
    from safetensors.torch import load_file
    out = {}
    for n in names:
        p = folder / n
        if n.endswith(".safetensors"): out[n] = sha(load_file(str(p)))
        elif n.endswith(".jsonl"):
            rows = [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
            out[n] = sha([{k: v for k, v in r.items()
                           if not any(w in k for w in ("time", "sec", "_s", "wall", "elapsed", "per_s"))}
                          for r in rows])
    return out


def sampler_anchors(bundle) -> dict:
    from heptapod_nb.sample import generate
    settings = [dict(), dict(temperature=0.6), dict(top_k=5), dict(top_p=0.8), dict(order="random"),
                dict(order="confidence"), dict(tokens_per_step=2), dict(trace=True), dict(trace="full", order="random"),
                dict(trace=True, tokens_per_step=2, order="confidence"), dict(kv_cache=False, trace=True)]
    out = {}
    for name, m in (("heptapod", bundle.model), ("baseline", bundle.baseline)):
        for i, s in enumerate(settings):
            if name == "baseline" and s.get("tokens_per_step", 1) > 1: continue
            try: r = sha(generate(m, torch.arange(4) % m.config.num_classes, seed=i, device="cpu", **s))
            except ValueError as e: r = f"refused: {e}"                  # the refusal is behaviour too
            out[f"{name} {s or 'default'}"] = r
        prompt = generate(m, torch.tensor([3]), seed=9, device="cpu").expand(3, -1, -1).contiguous()
        out[f"{name} prompt"] = sha(generate(m, torch.tensor([3, 3, 3]), seed=1, prompt=prompt, prompt_len=20,
                                            trace=True, device="cpu"))
    return out


def app_anchors(bundle) -> dict:
    from heptapod_nb.app import HeptapodApp
    app = HeptapodApp(bundle, workers=1, frame_s=0)
    out = {}
    frames = list(app.generate_stream(3, 1, 1.0, 0, "raster", 1, "entropy", False))
    out["generate_stream"] = sha([f[1:] for f in frames])
    run = frames[-1][0]
    out["frames"] = sha([app.frame(run, t, heat, ov) for t in (0, 10, len(run)) for heat in app.heatmaps()
                         for ov in (False, True)])
    out["cell_topk"] = sha([app.cell_topk(run, t, x, y, "entropy", False)
                            for t, x, y in ((0, 0.5, 0.5), (20, 0.3, 0.7))])
    out["final_image"] = sha(app.final_image(run))
    img = np.zeros((64, 64), np.uint8); img[16:48, 28:36] = 255
    out["complete"] = sha(app.complete(img, 1, 24, 2, 0, 1.0, True))
    frames = list(app.compare_stream(7, 2, 1.0, 1, "entropy"))
    out["compare_stream"] = sha([f[1:] for f in frames])
    out["compare_frame"] = sha(app.compare_frame(frames[-1][0], 5, "entropy"))
    try: app.close()
    except AttributeError: pass
    return out


def train_anchors(tmp: Path) -> dict:
    from heptapod_nb.data import TokenDataset
    from heptapod_nb.train import main
    out = {}
    for kind, extra in (("vq", dict(vocab_size=16)), ("kl", dict(channels=4))):
        root = tmp / f"tok_{kind}"
        meta = TokenDataset.create(root, 48, kind, (4, 4), 4, augs=2, **extra)
        rng = np.random.default_rng(0)
        c = np.load(root / "codes.npy", mmap_mode="r+")
        c[:] = rng.integers(0, 16, c.shape) if kind == "vq" else rng.normal(size=c.shape); c.flush()
        lab = np.load(root / "labels.npy", mmap_mode="r+"); lab[:] = rng.integers(0, 4, 48); lab.flush()
        TokenDataset.write_meta(root, {**meta, "done": 48})
        run = tmp / f"run_{kind}"
        argv = ["--preset", "tiny", "--data", str(root), "--out", str(run), "--no-progress", "batch_size=8",
                "num_workers=0", "warmup=2", "log_every=2", "steps=8", "ckpt_every=4", "model.dim=32", "model.depth=1",
                "model.n_heads=2", "model.head_width=32", "model.head_depth=1", "model.head_heads=2", "model.window=4",
                'model.order="random"']
        if kind == "kl": argv += ["model.diff_width=16", "model.diff_depth=1"]
        assert main(argv) == 0, f"heptapod-train failed on the {kind} token set"
        out[f"train {kind}"] = files_sha(run, ["model.safetensors", "ema.safetensors", "metrics.jsonl"])
        from heptapod_nb.model import load_model
        m = load_model(run / "ema.safetensors")
        out[f"generate {kind}"] = sha(generate_any(m))
    return out


def generate_any(m):
    "Random and confidence orders, two tokens per step, full traces: the paths the raster demo weights cannot take."
    from heptapod_nb.sample import generate
    labels = torch.arange(3) % m.config.num_classes
    return [generate(m, labels, seed=0, trace="full", device="cpu", order="random"),
            generate(m, labels, seed=1, trace=True, device="cpu", order="confidence", tokens_per_step=2)]


def tokenizer_anchors(tmp: Path) -> dict:
    from heptapod_nb.tokenizer_train import train_tokenizer_main
    run = tmp / "tok_run"
    train_tokenizer_main(["--out", str(run), "--steps", "4", "--ckpt-every", "2", "--batch-size", "8",
                          "--eval-every", "4", "--eval-batches", "1", "-o", "ch=8", "-o", "norm_groups=4",
                          "-o", "z_channels=8", "--no-progress", "--threads", "1"])
    return {"tokenizer train": files_sha(run, ["tokenizer.safetensors"])}


def data_anchors() -> dict:
    from heptapod_nb import data
    out = {}
    for name in ("load_mnist5k", "load_digits8"):
        for split in ("train", "val"): out[f"{name} {split}"] = sha(getattr(data, name)(split))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--skip", default="", help="comma-separated groups to skip: sampler,app,train,tokenizer,data")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from heptapod_nb.bundle import load_bundle
    skip, res, t0 = set(filter(None, a.skip.split(","))), {}, time.time()
    bundle = load_bundle(None, "cpu")
    with tempfile.TemporaryDirectory() as d:
        groups = dict(sampler=lambda: sampler_anchors(bundle), app=lambda: app_anchors(bundle),
                      train=lambda: train_anchors(Path(d)), tokenizer=lambda: tokenizer_anchors(Path(d)),
                      data=data_anchors)
        for g, f in groups.items():
            if g in skip: continue
            t = time.time(); res[g] = f()
            print(f"{g}: {len(res[g])} anchors in {time.time() - t:.0f}s", flush=True)
    print("\n| anchor | sha256 (16 hex) |\n|---|---|")
    for g, d in res.items():
        for k, v in d.items(): print(f"| {g}: {k} | {v if isinstance(v, str) else json.dumps(v)} |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(dict(command="bench/anchors.py "
                                               + " ".join(sys.argv[1:] if argv is None else argv),
                                               wall_s=round(time.time() - t0, 1), anchors=res), indent=1))


if __name__ == "__main__":
    main()
