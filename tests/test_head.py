"Orders, target selection (exact masks for window 1 / k / global), sampler query sets, batched head == per-step loop, diffusion MLP."
import pytest
import torch

torch.set_num_threads(1)   # on the shared 2-core box, 2 spinning OpenMP threads are many times slower (BENCHMARKS.md)
from heptapod_nb.config import ConfigError
from heptapod_nb.head import HEAD_CONTEXTS, HEADS, Head2D, MLPHead, check_head_variant
from heptapod_nb.targets import commit_supported, make_order, num_slots, sampling_targets, select_targets, window_size
from heptapod_nb.tokens import DiffusionMLP, cosine_alpha_bar, timestep_embedding

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
    # 800 draws over 15 bins: std of one bin's frequency sqrt(p(1-p)/800) = 0.0088; measured max |dev| 0.0096 (seeded)
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


def test_step_subset_is_rows_of_full_selection():
    order = make_order("random", 2, N, generator=torch.Generator().manual_seed(4))
    for window in (1, 5, "global"):
        full, sub = select_targets(order, window, "all"), select_targets(order, window, "all", steps=[5, 15])
        assert torch.equal(sub.pos_BSM, full.pos_BSM[:, [5, 15]]) and torch.equal(sub.valid_BSM, full.valid_BSM[:, [5, 15]])
        assert sub.steps_S.tolist() == [5, 15]


def test_commit_supported_table():
    "Which (window, M, tokens_per_step) the sampler may commit at once: refused exactly where offsets >= 1 were never supervised."
    assert commit_supported(1, 1, N, 1) is None and "window" in commit_supported(1, 1, N, 2)
    assert "window" in commit_supported(4, "all", N, 5)
    for w in (4, "global"):
        assert "only the next position" in commit_supported(w, 1, N, 2)
        assert commit_supported(w, 1, N, 1) is None
        for M in (2, 3, "all"):
            assert all(commit_supported(w, M, N, k) is None for k in range(1, window_size(w, N) + 1))


@pytest.mark.parametrize("window,M,k", [("global", 4, 3), ("global", 2, 5), (6, 3, 6), (5, "all", 4), (4, 2, 2),
                                        ("global", 3, 1)])
def test_sampling_targets_are_training_query_sets(window, M, k):
    "Every query set is one training could draw (next position in slot 0, M slots, distinct, in the window), and the committed slots hold offsets 0..k-1."
    B, t = 3, 7
    order = make_order("random", B, N, generator=torch.Generator().manual_seed(5))
    st = sampling_targets(order, window, M, t, k, generator=torch.Generator().manual_seed(6))
    W, Ms = window_size(window, N), num_slots(window, M, N)
    G = 1 if M == "all" or k <= M else -(-(k - 1) // (M - 1))
    assert st.pos_BSM.shape == (B, G, Ms) and st.steps_S.tolist() == [t] * G
    assert torch.equal(st.pos_BSM.flatten(1)[:, st.commit_K], order[:, t:t + k])
    rank = order.argsort(-1).gather(1, st.pos_BSM.flatten(1)).view(B, G, Ms)    # index of each query in the order
    for b in range(B):
        for g in range(G):
            v = st.valid_BSM[b, g]
            assert rank[b, g, 0] == t and v[0]                                 # slot 0: the next position
            r = rank[b, g][v].tolist()
            assert len(set(r)) == len(r) == min(Ms, N - t, W) and all(t <= x < t + W for x in r)
    if G == 1 and M != "all":   # one group: exactly select_targets with the next k fixed, same random draws
        ref = select_targets(order, window, M, steps=[t], n_fixed=k, generator=torch.Generator().manual_seed(6))
        assert torch.equal(ref.pos_BSM, st.pos_BSM) and torch.equal(ref.valid_BSM, st.valid_BSM)


def test_sampling_targets_end_of_sequence_and_errors():
    order = make_order("raster", 1, N)
    st = sampling_targets(order, "global", 2, N - 2, 5)                       # only 2 positions left: k shrinks to 2
    assert st.commit_K.tolist() == [0, 1] and st.pos_BSM[0, 0].tolist() == [N - 2, N - 1]
    st = sampling_targets(order, "global", 3, N - 4, 4)                       # groups {0,1,2}, {0,3,1 or 2}
    assert st.pos_BSM[0, 0].tolist() == [N - 4, N - 3, N - 2] and st.pos_BSM[0, 1, :2].tolist() == [N - 4, N - 1]
    assert int(st.pos_BSM[0, 1, 2]) in (N - 3, N - 2) and st.valid_BSM.all() and st.commit_K.tolist() == [0, 1, 2, 4]
    with pytest.raises(ValueError, match="only the next position"): sampling_targets(order, 4, 1, 0, 2)
    with pytest.raises(ValueError, match="window"): sampling_targets(order, 2, "all", 0, 3)
    with pytest.raises(ValueError, match="step"): sampling_targets(order, "global", 2, N, 1)


@pytest.mark.parametrize("self_attn,M,context", [(True, 4, "prefix"), (False, 1, "prefix"), (True, 4, "last"),
                                                 (False, 3, "last")])
def test_batched_head_equals_per_step_loop(self_attn, M, context):
    # float64: in float32 the two summation orders differ by up to 1.9e-5 absolute (rel 5e-7) on AVX-512 in the
    # adaLN weight gradient; in float64 they agree to ~7e-14, so 1e-10 (relative) has a wide margin on any CPU
    torch.manual_seed(0)
    B, D = 2, 16
    head = Head2D(D, 16, 2, 2, N, 5, self_attn=self_attn, context=context).double()
    with torch.no_grad():
        for p in head.parameters(): p.normal_(0, 0.2)
    h = torch.randn(B, N, D, dtype=torch.float64, requires_grad=True)
    tg = select_targets(make_order("random", B, N), "global" if self_attn or M > 1 else 1, M)
    vm = tg.valid_BSM[..., None].double()
    out = head(h, h, tg.steps_S, tg.pos_BSM, tg.valid_BSM)
    ref = torch.stack([head(h[:, :t + 1], h[:, t:t + 1], torch.tensor([t]), tg.pos_BSM[:, t:t + 1],
                            tg.valid_BSM[:, t:t + 1])[:, 0] for t in range(N)], 1)
    assert torch.allclose(out * vm, ref * vm, rtol=1e-10, atol=1e-10)
    params = [h] + list(head.parameters())
    g1 = torch.autograd.grad((out * vm).sin().sum(), params)
    g2 = torch.autograd.grad((ref * vm).sin().sum(), params)
    for a, b in zip(g1, g2): assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("context", HEAD_CONTEXTS)
def test_adaln_zero_init_outputs_zero_logits(context):
    head = Head2D(16, 16, 2, 2, N, 5, context=context)
    tg = select_targets(make_order("raster", 1, N), "global", 3)
    h = torch.randn(1, N, 16)
    assert head(h, h, tg.steps_S, tg.pos_BSM, tg.valid_BSM).abs().max() == 0


def _open(head):
    with torch.no_grad():
        for p in head.parameters(): p.normal_(0, 0.2)
    return head


@pytest.mark.parametrize("self_attn", [True, False])
def test_last_context_is_the_prefix_head_given_only_key_h_t(self_attn):
    """`context="last"` is by definition the prefix head whose cross-attention sees the step's own state h_t alone
    (how issue 16 measured it: a mask). Copy the prefix head's weights into the cheaper implementation (value rows of
    `ckv` through `co` -> `cv`; the adaLN rows of the query's shift/scale dropped) and compare in float64."""
    torch.manual_seed(0)
    B, D, W, H = 2, 12, 16, 2
    pre = _open(Head2D(D, W, 2, H, N, 5, self_attn=self_attn)).double()
    last = Head2D(D, W, 2, H, N, 5, self_attn=self_attn, context="last").double()
    sd = {k: v for k, v in pre.state_dict().items() if ".cq." not in k and ".ckv." not in k and ".co." not in k}
    for i, b in enumerate(pre.blocks):
        wv = b.ckv.weight.view(H, 2, W // H, D)[:, 1].reshape(W, D)        # per head: [k | v] rows, take v
        sd[f"blocks.{i}.cv.weight"] = b.co.weight @ wv
        sd[f"blocks.{i}.ada.1.weight"] = b.ada[1].weight[2 * W:]          # chunks: shift_c, scale_c, gate_c, ...
        sd[f"blocks.{i}.ada.1.bias"] = b.ada[1].bias[2 * W:]
    last.load_state_dict(sd)
    h = torch.randn(B, N, D, dtype=torch.float64)
    tg = select_targets(make_order("random", B, N), "global", 4 if self_attn else 1)
    got = last(h, h, tg.steps_S, tg.pos_BSM, tg.valid_BSM)
    ref = torch.stack([pre(h[:, t:t + 1], h[:, t:t + 1], torch.tensor([0]), tg.pos_BSM[:, t:t + 1],
                           tg.valid_BSM[:, t:t + 1])[:, 0] for t in range(N)], 1)
    vm = tg.valid_BSM[..., None]
    assert torch.allclose(got * vm, ref * vm, rtol=1e-10, atol=1e-12)   # float64: measured max diff ~1e-16
    full = pre(h, h, tg.steps_S, tg.pos_BSM, tg.valid_BSM)             # the prefix head proper is different
    assert ((full - ref).abs() * vm)[:, 1:].max() > 1e-3


@pytest.mark.parametrize("context", HEAD_CONTEXTS)
def test_earlier_states_reach_only_the_prefix_head(context):
    "Perturbing h_0..h_{t-1} (h_t kept) changes step t's outputs for the prefix head, and not at all for 'last'."
    torch.manual_seed(1)
    D = 16
    head = _open(Head2D(D, 16, 2, 2, N, 5, context=context)).double()
    h = torch.randn(2, N, D, dtype=torch.float64)
    tg = select_targets(make_order("random", 2, N), "global", 3)
    t = 9
    h2 = h.clone(); h2[:, :t] += torch.randn(2, t, D, dtype=torch.float64)
    outs = [head(hh, hh[:, t:t + 1], tg.steps_S[t:t + 1], tg.pos_BSM[:, t:t + 1], tg.valid_BSM[:, t:t + 1])
            for hh in (h, h2)]
    diff = (outs[0] - outs[1]).abs().max()
    if context == "last": assert diff == 0
    else: assert diff > 1e-3                                            # measured ~0.5


def test_independent_queries_do_not_see_each_other():
    "Without self-attention a position's output does not depend on which other positions share its query set."
    torch.manual_seed(2)
    for self_attn in (True, False):
        head = _open(Head2D(16, 16, 2, 2, N, 5, self_attn=self_attn, context="last")).double()
        h = torch.randn(1, N, 16, dtype=torch.float64)
        a = head(h, h[:, 3:4], torch.tensor([3]), torch.tensor([[[3, 7, 9]]]), torch.ones(1, 1, 3, dtype=torch.bool))
        b = head(h, h[:, 3:4], torch.tensor([3]), torch.tensor([[[3, 12, 15]]]), torch.ones(1, 1, 3, dtype=torch.bool))
        d = (a[0, 0, 0] - b[0, 0, 0]).abs().max()
        assert d == 0 if not self_attn else d > 1e-3


def test_head_variant_errors():
    with pytest.raises(ValueError, match="head_context must be one of"): Head2D(16, 16, 1, 2, N, 5, context="all")
    with pytest.raises(ValueError, match="head_queries must be one of"): check_head_variant("last", "alone")
    check_head_variant("last", "independent")


@pytest.mark.parametrize("window,M", [(1, 1), (3, 2), ("global", "all")])
def test_mlp_head_batched_equals_per_step_loop(window, M):
    "MLPHead on all N steps at once == once per step with h_0..h_t and that step's queries: outputs and gradients."
    # float64: the two paths agree to ~1e-16 (same ops, different batching); 1e-10 relative leaves a wide margin
    torch.manual_seed(0)
    B, D = 2, 12
    head = _open(MLPHead(D, 16, 2, N, 5)).double()
    h = torch.randn(B, N, D, dtype=torch.float64, requires_grad=True)
    tg = select_targets(make_order("random", B, N), window, M, generator=torch.Generator().manual_seed(1))
    vm = tg.valid_BSM[..., None].double()
    out = head(h, h, tg.steps_S, tg.pos_BSM, tg.valid_BSM)
    ref = torch.stack([head(h[:, :t + 1], h[:, t:t + 1], torch.tensor([t]), tg.pos_BSM[:, t:t + 1],
                            tg.valid_BSM[:, t:t + 1])[:, 0] for t in range(N)], 1)
    assert out.shape == (B, N, tg.pos_BSM.shape[-1], 5)
    assert torch.allclose(out * vm, ref * vm, rtol=1e-10, atol=1e-12)
    params = [h] + list(head.parameters())
    g1 = torch.autograd.grad((out * vm).sin().sum(), params)
    g2 = torch.autograd.grad((ref * vm).sin().sum(), params)
    for a, b in zip(g1, g2): assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_mlp_head_output_is_a_function_of_h_t_and_p_only():
    """A position's output depends on the step's state h_t and the position p, nothing else: not on the earlier states,
    not on the other queries of its set; and it does depend on both (the head is not a constant)."""
    torch.manual_seed(3)
    D = 12
    head = _open(MLPHead(D, 16, 2, N, 5)).double()
    h = torch.randn(1, N, D, dtype=torch.float64)
    run = lambda hh, pos, t=6: head(hh, hh[:, t:t + 1], torch.tensor([t]), torch.tensor([[pos]]),
                                    torch.ones(1, 1, len(pos), dtype=torch.bool))[0, 0]
    a = run(h, [6, 9, 12])
    h_early = h.clone(); h_early[:, :6] += 1
    assert torch.equal(run(h_early, [6, 9, 12]), a)                     # earlier states: not seen at all
    assert torch.equal(run(h, [6, 13, 15])[0], a[0])                    # other queries: not seen at all
    h_t = h.clone(); h_t[:, 6] += 1
    assert (run(h_t, [6, 9, 12]) - a).abs().max() > 1e-3                # h_t is (measured ~0.5)
    assert (a[1] - a[2]).abs().max() > 1e-3                             # and so is the position


@pytest.mark.parametrize("window,M", [("global", "all"), (5, "all"), ("global", 2)])
def test_mlp_head_packed_equals_dense(window, M):
    """With many empty slots (M="all") the head computes only the valid queries, packed: the same outputs and
    gradients on the valid slots as computing every slot (all marked valid), and exactly 0 on the empty ones."""
    # float64: the same per-row ops in differently shaped batches agree to ~1e-16; 1e-10 relative has a wide margin
    torch.manual_seed(4)
    head = _open(MLPHead(12, 16, 2, N, 5)).double()
    h = torch.randn(2, N, 12, dtype=torch.float64, requires_grad=True)
    tg = select_targets(make_order("random", 2, N), window, M, generator=torch.Generator().manual_seed(0))
    vm = tg.valid_BSM[..., None].double()
    packed = head(h, h, tg.steps_S, tg.pos_BSM, tg.valid_BSM)
    dense = head(h, h, tg.steps_S, tg.pos_BSM, torch.ones_like(tg.valid_BSM))
    assert torch.allclose(packed * vm, dense * vm, rtol=1e-10, atol=1e-12)
    if window == "global" and M == "all":                               # 120 of 256 slots per sample empty: packed
        assert packed[~tg.valid_BSM].abs().max() == 0 and dense[~tg.valid_BSM].abs().max() > 0
    else: assert torch.equal(packed, dense)                            # few empty slots (10 of 80; 1 of 32): dense
    params = [h] + list(head.parameters())
    for a, b in zip(torch.autograd.grad((packed * vm).sin().sum(), params), torch.autograd.grad((dense * vm).sin().sum(), params)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("zero_out", [True, False])
def test_mlp_head_adaln_zero_start(zero_out):
    """At initialisation every block is the identity and the final modulation is zero: VQ logits are exactly zero (a
    uniform first guess); a KL head's condition z does not depend on h_t (only on the queried position)."""
    head = MLPHead(16, 16, 2, N, 5, zero_out=zero_out)
    tg = select_targets(make_order("raster", 1, N), "global", "all")
    outs = [head(h, h, tg.steps_S, tg.pos_BSM, tg.valid_BSM) for h in (torch.randn(1, N, 16), torch.randn(1, N, 16))]
    if zero_out: assert outs[0].abs().max() == 0
    else:
        assert torch.equal(outs[0], outs[1]) and outs[0].abs().max() > 0
        assert torch.equal(outs[0][0, 0, 3], outs[0][0, 3, 0])          # position 3 at steps 0 and 3: same z


def test_head_registry_and_mlp_config_check():
    "`HEADS` maps head_type to the class; MLPHead refuses a config that asks it to see the prefix or other queries."
    assert HEADS == {"transformer": Head2D, "mlp": MLPHead} and (MLPHead.context, MLPHead.self_attn) == ("last", False)
    class C: head_context, head_queries = "last", "independent"
    MLPHead.check_config(C)
    for ctx, q in [("prefix", "independent"), ("last", "joint"), ("prefix", "joint")]:
        C.head_context, C.head_queries = ctx, q
        with pytest.raises(ConfigError, match=f"head_context={ctx!r}, head_queries={q!r}"): MLPHead.check_config(C)
    Head2D.check_config(C)                                              # the transformer head takes every variant


def test_diffusion_schedule_and_loss():
    ab = cosine_alpha_bar(1000)
    assert ab.shape == (1000,) and (ab[1:] <= ab[:-1]).all() and ab[0] > 0.99 and ab.min() >= 1e-4
    dm = DiffusionMLP(3, 8, width=32, depth=2)
    g = lambda s: torch.Generator().manual_seed(s)
    x0, z = torch.randn(5, 3), torch.randn(5, 8)
    l = dm.loss(x0, z, draws=4, generator=g(0))
    gr = g(0); t = torch.randint(0, dm.T, (20,), generator=gr); eps = torch.randn(20, 3, generator=gr)
    assert l.shape == (5,) and torch.equal(l, eps.pow(2).mean(-1).view(4, 5).mean(0))   # zero-init output predicts 0
    # with every weight open, the loss is the epsilon MSE of the denoiser at the drawn (t, x_t): float64 reference
    with torch.no_grad():
        for p in dm.parameters(): p.normal_(0, 0.3)
    dd = dm.double()
    ab = dd.schedule()[t][:, None].double()
    x0d, zd = x0.double().repeat(4, 1), z.double().repeat(4, 1)
    gr = g(0); t = torch.randint(0, dm.T, (20,), generator=gr); eps = torch.randn(20, 3, generator=gr, dtype=torch.float64)
    ref = (dd(ab.sqrt() * x0d + (1 - ab).sqrt() * eps, t, zd) - eps).pow(2).mean(-1).view(4, 5).mean(0)
    assert torch.allclose(dd.loss(x0.double(), z.double(), draws=4, generator=g(0)), ref, rtol=1e-12, atol=0)
    dm = DiffusionMLP(3, 8, width=32, depth=2)
    z = torch.randn(4, 8)
    assert torch.equal(dm.sample(z, steps=4, generator=g(0)), dm.sample(z, steps=4, generator=g(0)))
    assert dm.sample(z, steps=4, generator=g(0)).shape == (4, 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_diffusion_mlp_in_other_dtypes(dtype):
    "The float32 timestep embedding is cast to the weights' dtype: bf16 / float64 models train and sample."
    assert timestep_embedding(torch.tensor([3, 999]), 8).dtype == torch.float32
    dm = DiffusionMLP(3, 8, width=32, depth=2).to(dtype)
    with torch.no_grad():
        for p in dm.parameters(): p.normal_(0, 0.1)
    l = dm.loss(torch.randn(5, 3), torch.randn(5, 8, dtype=dtype), draws=2)
    l.mean().backward()
    assert l.shape == (5,) and torch.isfinite(l).all() and dm.inp.weight.grad.dtype == dtype
    s = dm.sample(torch.randn(4, 8, dtype=dtype), steps=3, generator=torch.Generator().manual_seed(0))
    assert s.shape == (4, 3) and s.dtype == dtype and torch.isfinite(s).all()
