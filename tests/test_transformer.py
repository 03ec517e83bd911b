"Causal backbone: cached incremental decoding equals the full pass, causality, init, checkpointing."
import math
import pytest
import torch

torch.set_num_threads(1)   # on the shared 2-core box, 2 spinning OpenMP threads are many times slower (BENCHMARKS.md)
from heptapod_nb.transformer import CausalTransformer, RMSNorm, SwiGLU, init_gpt_, swiglu_hidden


def _net(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    return init_gpt_(CausalTransformer(dim=32, depth=2, n_heads=4, max_len=20, **kw), depth=2).eval().to(dtype)


def _cached(net, x, chunk):
    with torch.no_grad():
        net.setup_cache(len(x))
        inc = torch.cat([net(x[:, i:i + chunk], pos0=i, use_cache=True) for i in range(0, x.shape[1], chunk)], 1)
        net.clear_cache()
    return inc


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_cached_incremental_equals_full(chunk):
    # float64: the cached and full passes agree to rounding (measured 2.4e-16 of max|h|; bound 1e-12)
    net = _net()
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    with torch.no_grad(): full = net(x)
    inc = _cached(net, x, chunk)
    scale = full.abs().max()
    assert (full - inc).abs().max() < 1e-12 * scale
    assert not net.has_cache
    # float32 (what runs) against that float64 reference: measured 1.5e-7 of max|h|; bound 1e-5
    net32 = _net(torch.float32)
    with torch.no_grad(): full32 = net32(x.float())
    for h in (full32, _cached(net32, x.float(), chunk)): assert (h.double() - full).abs().max() < 1e-5 * scale


def test_no_leak_from_future():
    net = _net()
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    x2 = x.clone(); x2[:, 12] += 3.0
    with torch.no_grad(): a, b = net(x), net(x2)
    assert (a[:, :12] - b[:, :12]).abs().max() < 1e-12 * a.abs().max()     # float64: unchanged to rounding
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3 * a.abs().max()


def test_cache_errors():
    net = _net()
    with pytest.raises(RuntimeError, match="setup_cache"): net(torch.randn(1, 1, 32), use_cache=True)
    net.setup_cache(1)
    with pytest.raises(ValueError, match="exceed max_len"): net(torch.randn(1, 2, 32), pos0=19, use_cache=True)
    with pytest.raises(ValueError, match="batch"): net(torch.randn(2, 1, 32), pos0=0, use_cache=True)


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    net = init_gpt_(CausalTransformer(dim=256, depth=8, n_heads=4, max_len=8), depth=8)
    std_qkv = net.blocks[0].attn.wqkv.weight.std().item()
    std_wo = net.blocks[0].attn.wo.weight.std().item()
    # sample std of 196,608 / 65,536 normal draws: relative sampling error ~ 1/sqrt(2n) = 0.16% / 0.28%; bound 10%
    assert abs(std_qkv / 0.02 - 1) < 0.1 and abs(std_wo / (0.02 / math.sqrt(16)) - 1) < 0.1
    assert not any(isinstance(m, torch.nn.Linear) and m.bias is not None for m in net.modules())


def test_grad_checkpoint_same_grads():
    a = _net().train(); b = _net(grad_checkpoint=True).train()                # float64: equal to rounding
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    a(x).pow(2).mean().backward(); b(x).pow(2).mean().backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert (pa.grad - pb.grad).abs().max() <= 1e-12 * pa.grad.abs().max()


def test_blocks():
    n = RMSNorm(8); x = torch.randn(3, 8, dtype=torch.float64) * 5
    with torch.no_grad(): n.weight.copy_(torch.linspace(0.5, 2, 8))
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + n.eps) * n.weight.double()   # float64 formula
    with torch.no_grad():
        assert n(x).dtype == torch.float64 and (n(x) - ref).abs().max() < 1e-12 * ref.abs().max()
        # float32 input against the float64 formula: measured 1.2e-7 of max|ref|; bound 1e-5
        assert (n(x.float()).double() - ref).abs().max() < 1e-5 * ref.abs().max()
    assert swiglu_hidden(256) % 64 == 0 and SwiGLU(8, 16)(torch.randn(2, 8)).shape == (2, 8)
    with pytest.raises(ValueError, match="divisible"): CausalTransformer(dim=30, depth=1, n_heads=4)


def test_meta_device():
    with torch.device("meta"): net = CausalTransformer(dim=64, depth=2, n_heads=4)
    assert next(net.parameters()).is_meta
