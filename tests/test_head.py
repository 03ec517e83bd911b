"Orders, target selection (exact masks for window 1 / k / global), batched head == per-step loop, diffusion MLP."
import pytest
import torch

torch.set_num_threads(1)   # on the shared 2-core box, 2 spinning OpenMP threads are many times slower (BENCHMARKS.md)
from heptapod_nb.head import (DiffusionMLP, Head2D, cosine_alpha_bar, make_order, num_slots, select_targets,
                              window_size)

N = 16


def _expected_window(order_row, t, W):
    return set(order_row[t:min(t + W, N)].tolist())


@pytest.mark.parametrize("window", [1, 3, "global"])
def test_all_targets_are_exactly_the_window(window):
    order = make_order("random", 3, N, generator=torch.Generator().manual_seed(0))
    tg = select_targets(order, window, "all")
    W = window_size(window, N)
    for b in range(3):
        for t in range(N):
            got = tg.pos_BSM[b, t][tg.valid_BSM[b, t]].tolist()
            assert len(got) == len(set(got))
            assert set(got) == _expected_window(order[b], t, W)
            assert set(got).isdisjoint(order[b, :t].tolist())          # seen positions are never targets


@pytest.mark.parametrize("window,M", [(1, 4), (4, 2), ("global", 5), ("global", 1)])
def test_sampled_targets(window, M):
    order = make_order("random", 4, N, generator=torch.Generator().manual_seed(1))
    tg = select_targets(order, window, M, generator=torch.Generator().manual_seed(2))
    W = window_size(window, N)
    assert tg.pos_BSM.shape == (4, N, min(M, W))
    assert torch.equal(tg.pos_BSM[..., 0], order)                            # next position always slot 0
    assert tg.valid_BSM[..., 0].all()
    for b in range(4):
        for t in range(N):
            got = tg.pos_BSM[b, t][tg.valid_BSM[b, t]].tolist()
            assert len(got) == min(M, W, N - t) == len(set(got))
            assert set(got) <= _expected_window(order[b], t, W)


def test_others_are_uniform():
    order = make_order("raster", 1, N)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(N)
    for _ in range(400):
        tg = select_targets(order, "global", 3, steps=[0], generator=g)
        counts.index_add_(0, tg.pos_BSM[0, 0, 1:], torch.ones(2))
    assert counts[0] == 0
    freq = counts[1:] / counts[1:].sum()
    assert (freq - 1 / 15).abs().max() < 0.03


def test_n_fixed_and_errors():
    order = make_order("raster", 2, N)
    tg = select_targets(order, "global", 2, steps=[5], n_fixed=4, generator=torch.Generator().manual_seed(0))
    assert tg.pos_BSM.shape == (2, 1, 4) and tg.pos_BSM[0, 0].tolist() == [5, 6, 7, 8]
    with pytest.raises(ValueError, match="n_fixed"): select_targets(order, 2, 1, n_fixed=3)
    with pytest.raises(ValueError, match="window"): window_size("local", N)
    with pytest.raises(ValueError, match="targets_per_step"): num_slots("global", "some", N)
    with pytest.raises(ValueError, match="order"): make_order("zigzag", 1, N)
    o = make_order("random", 5, N)
    assert torch.equal(o.sort(-1).values, torch.arange(N).expand(5, N))


@pytest.mark.parametrize("self_attn,M", [(True, 4), (False, 1)])
def test_batched_head_equals_per_step_loop(self_attn, M):
    torch.manual_seed(0)
    B, D = 2, 16
    head = Head2D(D, 16, 2, 2, N, 5, self_attn=self_attn)
    with torch.no_grad():
        for p in head.parameters(): p.normal_(0, 0.2)
    h = torch.randn(B, N, D, requires_grad=True)
    tg = select_targets(make_order("random", B, N), "global" if self_attn else 1, M)
    vm = tg.valid_BSM[..., None].float()
    out = head(h, h, tg.steps_S, tg.pos_BSM, tg.valid_BSM)
    ref = torch.stack([head(h[:, :t + 1], h[:, t:t + 1], torch.tensor([t]), tg.pos_BSM[:, t:t + 1],
                            tg.valid_BSM[:, t:t + 1])[:, 0] for t in range(N)], 1)
    assert ((out - ref) * vm).abs().max() < 1e-5
    params = [h] + list(head.parameters())
    g1 = torch.autograd.grad((out * vm).sin().sum(), params)
    g2 = torch.autograd.grad((ref * vm).sin().sum(), params)
    for a, b in zip(g1, g2): assert torch.allclose(a, b, atol=1e-5)


def test_adaln_zero_init_outputs_zero_logits():
    head = Head2D(16, 16, 2, 2, N, 5)
    tg = select_targets(make_order("raster", 1, N), "global", 3)
    h = torch.randn(1, N, 16)
    assert head(h, h, tg.steps_S, tg.pos_BSM, tg.valid_BSM).abs().max() == 0


def test_diffusion_schedule_and_loss():
    ab = cosine_alpha_bar(1000)
    assert ab.shape == (1000,) and (ab[1:] <= ab[:-1]).all() and ab[0] > 0.99 and ab.min() >= 1e-4
    dm = DiffusionMLP(3, 8, width=32, depth=2)
    l = dm.loss(torch.randn(5, 3), torch.randn(5, 8), draws=4)
    assert l.shape == (5,) and torch.allclose(l, torch.ones(5), atol=1.5)   # zero-init output: MSE of N(0,1) noise
    g = lambda s: torch.Generator().manual_seed(s)
    z = torch.randn(4, 8)
    assert torch.equal(dm.sample(z, steps=4, generator=g(0)), dm.sample(z, steps=4, generator=g(0)))
    assert dm.sample(z, steps=4, generator=g(0)).shape == (4, 3)
