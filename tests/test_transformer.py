"Causal backbone: cached incremental decoding equals the full pass, causality, init, checkpointing."
import math
import pytest
import torch

torch.set_num_threads(1)   # on the shared 2-core box, 2 spinning OpenMP threads are many times slower (BENCHMARKS.md)
from heptapod_nb.transformer import CausalTransformer, RMSNorm, SwiGLU, init_gpt_, swiglu_hidden


def _net(**kw):
    torch.manual_seed(0)
    return init_gpt_(CausalTransformer(dim=32, depth=2, n_heads=4, max_len=20, **kw), depth=2).eval()


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_cached_incremental_equals_full(chunk):
    net = _net()
    x = torch.randn(2, 20, 32)
    with torch.no_grad():
        full = net(x)
        net.setup_cache(2)
        inc = torch.cat([net(x[:, i:i + chunk], pos0=i, use_cache=True) for i in range(0, 20, chunk)], 1)
        net.clear_cache()
    assert (full - inc).abs().max() < 1e-5
    assert not net.has_cache


def test_no_leak_from_future():
    net = _net()
    x = torch.randn(2, 20, 32)
    x2 = x.clone(); x2[:, 12] += 3.0
    with torch.no_grad(): a, b = net(x), net(x2)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


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
    assert abs(std_qkv - 0.02) < 0.002 and abs(std_wo - 0.02 / math.sqrt(16)) < 0.001
    assert not any(isinstance(m, torch.nn.Linear) and m.bias is not None for m in net.modules())


def test_grad_checkpoint_same_grads():
    a = _net().train(); b = _net(grad_checkpoint=True).train()
    x = torch.randn(2, 20, 32)
    a(x).pow(2).mean().backward(); b(x).pow(2).mean().backward()
    for pa, pb in zip(a.parameters(), b.parameters()): assert torch.allclose(pa.grad, pb.grad, atol=1e-6)


def test_blocks():
    n = RMSNorm(8); x = torch.randn(3, 8) * 5
    assert torch.allclose(n(x).pow(2).mean(-1), torch.ones(3), atol=1e-3)
    assert swiglu_hidden(256) % 64 == 0 and SwiGLU(8, 16)(torch.randn(2, 8)).shape == (2, 8)
    with pytest.raises(ValueError, match="divisible"): CausalTransformer(dim=30, depth=1, n_heads=4)


def test_meta_device():
    with torch.device("meta"): net = CausalTransformer(dim=64, depth=2, n_heads=4)
    assert next(net.parameters()).is_meta
