"""torch.compile on the CPU (issue 23 part 5): the backbone compiled by inductor (C++ kernels) computes what the eager
one computes, in float64, forward and backward; and `heptapod-train compile=true` trains on the CPU with the same
losses as without it.

Compiling the whole model with inductor costs 2-3 minutes of a loaded 2-core machine (the input checks in
`Heptapod.forward` split it into ~15 graphs, each compiled forward and backward); the backbone alone, one graph, is
~30-60 s here. So inductor is tested on the backbone, the part compiling speeds up (BENCHMARKS.md, "CPU speed beside
LlamaGen"), and the training loop's compile path is tested whole with the `aot_eager` backend (dynamo's tracing,
graph breaks and AOT autograd, without code generation: ~30 s)."""
import functools, shutil

import numpy as np
import pytest
import torch

from heptapod_nb.data import TokenDataset
from heptapod_nb.train import main, read_metrics
from heptapod_nb.transformer import CausalTransformer


def _cpp_compiler():
    try:
        from torch._inductor import cpp_builder
        return cpp_builder.get_cpp_compiler()
    except Exception:                                   # noqa: BLE001 - any failure means: no usable toolchain
        return shutil.which("g++") or shutil.which("c++")


@pytest.mark.skipif(not _cpp_compiler(), reason="no C++ compiler for torch inductor's CPU kernels (apt-get install g++)")
def test_inductor_backbone_equals_eager_in_float64():
    torch.manual_seed(0)
    net = CausalTransformer(32, 1, 2).double().train()
    x = torch.randn(3, 10, 32, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 10, 32, dtype=torch.float64)
    def run(f):
        net.zero_grad(); x.grad = None
        y = f(x); (y * w).sum().backward()
        return y.detach(), x.grad.clone(), [p.grad.clone() for p in net.parameters()]
    ref = run(net)
    compiled = torch.compile(net)                       # default backend: inductor, C++ on the CPU
    got = run(compiled)
    # measured: max |difference| 9e-16 (outputs) and 4e-15 (gradients), float64 rounding of reordered sums
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-12, atol=1e-12)
    for g, r in zip(got[2], ref[2]): torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    with torch.no_grad(): net.blocks[0].ffn.w2.weight.mul_(1.001)   # the compiled code reads the live weights:
    with pytest.raises(AssertionError):                             # a perturbed one changes its gradients
        torch.testing.assert_close(run(compiled)[2][0], ref[2][0], rtol=1e-12, atol=1e-12)


@pytest.fixture
def tokens(tmp_path):
    root = tmp_path / "tokens"
    meta = TokenDataset.create(root, 32, "vq", (4, 4), 4, augs=1, vocab_size=16)
    rng = np.random.default_rng(0)
    codes = np.load(root / "codes.npy", mmap_mode="r+"); codes[:] = rng.integers(0, 16, codes.shape); codes.flush()
    labels = np.load(root / "labels.npy", mmap_mode="r+"); labels[:] = rng.integers(0, 4, 32); labels.flush()
    TokenDataset.write_meta(root, {**meta, "done": 32})
    return str(root)


def test_train_with_compile_on_cpu_matches_eager(tokens, tmp_path, monkeypatch):
    "heptapod-train compile=true on the CPU: the compiled loss module trains with the eager losses (float64)."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    compiled = []
    real_compile = torch.compile
    def spy(model, **kw):                               # aot_eager: the whole compile path but code generation
        compiled.append(type(model).__name__)
        return real_compile(model, **{**kw, "backend": "aot_eager"})
    monkeypatch.setattr(torch, "compile", spy)
    model = ["model.dim=32", "model.depth=1", "model.n_heads=2", "model.head_width=32", "model.head_depth=1",
             "model.head_heads=2", "model.window=4", "model.targets_per_step=2"]
    common = ["--preset", "tiny", "--data", tokens, "--no-progress", "batch_size=8", "num_workers=0", "warmup=1",
              "log_every=1", "steps=3", "precision=fp64", "ema=0", *model]
    try:
        assert main([*common, "--out", str(tmp_path / "eager")]) == 0 and compiled == []
        assert main([*common, "--out", str(tmp_path / "compiled"), "compile=true"]) == 0
    finally: torch.set_num_threads(n)
    assert compiled == ["LossModule"]
    eager, comp = (np.array([m["loss"] for m in read_metrics(tmp_path / k) if "loss" in m]) for k in ("eager", "compiled"))
    assert len(eager) == 3 and np.isfinite(comp).all()
    np.testing.assert_allclose(comp, eager, rtol=1e-10)   # measured: equal to the last bit in float64
