"Heptapod model: losses, the batched pass vs a per-step loop, no leak, over-fitting, presets, checkpoints, input checks."
import math
import pytest
import torch

torch.set_num_threads(1)   # on the shared 2-core box, 2 spinning OpenMP threads are many times slower (BENCHMARKS.md)
import torch.nn.functional as F
from heptapod_nb.config import ConfigError, save_weights
from heptapod_nb.tokens import DiffusionMLP
from heptapod_nb.targets import Targets, make_order, sampling_targets, select_targets
from heptapod_nb.model import PRESETS, Heptapod, HeptapodConfig, load_model, save_model

SMALL = dict(vocab_size=8, grid=(4, 4), num_classes=8, dim=32, depth=2, n_heads=4, head_width=32, head_depth=2,
             head_heads=4, diff_width=32, diff_depth=2,
             head_context="prefix")   # METHOD.md's first head; the default ("last") and the others are variants below


def _model(**kw):
    torch.manual_seed(0)
    return Heptapod(HeptapodConfig(**{**SMALL, **kw}))


def _open_gates(m):  # adaLN-Zero starts as identity; give every weight some size so tests can see everything
    with torch.no_grad():
        for p in m.head.parameters(): p.add_(torch.randn_like(p) * 0.1)
    return m


def _data(B=4, kind="vq", C=3):
    g = torch.Generator().manual_seed(1)
    if kind == "vq": x = torch.randint(0, 8, (B, 4, 4), generator=g)
    else: x = torch.randn(B, C, 4, 4, generator=g)
    return x, torch.arange(B) % 8


def _f64(m): return m.double()   # numerical comparisons run in float64: differences are then ~1e-15, tolerance 1e-10


def _per_step_loss(m, x, y, order, tg):
    "Slow reference: the head run once per step on h_0..h_t and that step's queries only."
    flat = m.check_tokens(x)
    h = m.states(flat, m.check_labels(y, x.shape[0]), order)
    num, den = 0.0, 0.0
    for t in range(m.config.n_positions):
        pos, val = tg.pos_BSM[:, t:t + 1], tg.valid_BSM[:, t:t + 1]
        out = m.head(h[:, :t + 1], h[:, t:t + 1], torch.tensor([t]), pos, val)[:, 0]
        ce = F.cross_entropy(out.flatten(0, 1), flat.gather(1, pos[:, 0]).flatten(), reduction="none").view(pos[:, 0].shape)
        w = val[:, 0].float(); w[:, 0] *= m.config.next_weight
        num = num + (w * ce).sum(); den = den + w.sum()
    return num / den


MLP = dict(head_type="mlp", head_context="last", head_queries="independent")   # the per-position MLP head (06_head)
VARIANTS = [dict(), dict(head_context="last"), dict(head_context="last", head_queries="independent"), MLP]


@pytest.mark.parametrize("window,M,order,variant", [("global", 3, "raster", {}), (3, "all", "random", {}),
                                                   (1, 1, "random", {}), ("global", 3, "random", VARIANTS[1]),
                                                   ("global", "all", "raster", VARIANTS[2]),
                                                   ("global", "all", "random", MLP), (3, 2, "raster", MLP),
                                                   (1, 1, "raster", MLP)])
def test_batched_pass_equals_per_step_loop(window, M, order, variant):
    m = _f64(_open_gates(_model(window=window, targets_per_step=M, order=order, next_weight=2.0, **variant)))
    x, y = _data()
    o = make_order(order, 4, 16, generator=torch.Generator().manual_seed(0))
    tg = select_targets(o, window, M, generator=torch.Generator().manual_seed(0))
    fast = m(x, y, order=o, targets=tg)["loss"]
    gf = torch.autograd.grad(fast, list(m.parameters()), allow_unused=True)
    slow = _per_step_loss(m, x, y, o, tg)
    gs = torch.autograd.grad(slow, list(m.parameters()), allow_unused=True)
    assert torch.allclose(fast, slow, rtol=1e-10, atol=0)
    for (name, _), a, b in zip(m.named_parameters(), gf, gs):
        if a is None and b is None: continue
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_step_subsets(kind):
    "`targets` may hold any steps (even one step repeated): outputs are those steps' rows of the all-steps pass."
    m = _f64(_open_gates(_model(token_kind=kind, token_channels=3 if kind == "kl" else 0, order="random")))
    x, y = _data(kind=kind)
    x = x.double() if kind == "kl" else x
    o = make_order("random", 4, 16, generator=torch.Generator().manual_seed(2))
    full = select_targets(o, "global", "all")
    ref = m(x, y, order=o, targets=full, return_outputs=True)["outputs"]
    sub = select_targets(o, "global", "all", steps=[5])
    out = m(x, y, order=o, targets=sub, return_outputs=True)
    assert out["outputs"].shape == (4, 1, 16, ref.shape[-1]) and out["n_targets"] == 4 * 11
    v = sub.valid_BSM[..., None]
    assert torch.allclose(out["outputs"] * v, ref[:, 5:6] * v, rtol=1e-10, atol=1e-12)
    rep = Targets(sub.pos_BSM.repeat(1, 2, 1), sub.valid_BSM.repeat(1, 2, 1), sub.offset_BSM.repeat(1, 2, 1),
                  torch.tensor([5, 5]))
    o2 = m(x, y, order=o, targets=rep, return_outputs=True)["outputs"]
    assert torch.allclose(o2 * v, ref[:, [5, 5]] * v, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="target steps"):
        m(x, y, order=o, targets=Targets(sub.pos_BSM, sub.valid_BSM, sub.offset_BSM, torch.tensor([16])))
    with pytest.raises(ValueError, match="shape"):
        m(x, y, order=o, targets=Targets(sub.pos_BSM, sub.valid_BSM, sub.offset_BSM, torch.tensor([5, 6])))
    with pytest.raises(ValueError, match="target positions"):
        m(x, y, order=o, targets=Targets(sub.pos_BSM + 16, sub.valid_BSM, sub.offset_BSM, sub.steps_S))


@pytest.mark.parametrize("variant", [{}, MLP])
def test_grouped_head_out_equals_forward(variant):
    "`head_out` with G query sets at one step (the sampler's call) gives the training forward's outputs for those sets."
    m = _f64(_open_gates(_model(targets_per_step=2, order="random", **variant))).eval()
    x, y = _data()
    o = make_order("random", 4, 16, generator=torch.Generator().manual_seed(3))
    st = sampling_targets(o, "global", 2, 6, 5, generator=torch.Generator().manual_seed(0))   # 4 sets of 2
    ref = m(x, y, order=o, targets=st, return_outputs=True)["outputs"]
    h = m.states(m.check_tokens(x), y, o, n_inputs=7)
    got = m.head_out(h, 6, st.pos_BSM, st.valid_BSM)
    assert got.shape == ref.shape == (4, 4, 2, 8) and torch.allclose(got, ref, rtol=1e-10, atol=1e-12)
    one = m.head_out(h, 6, st.pos_BSM[:, 1], st.valid_BSM[:, 1])
    assert torch.allclose(one, ref[:, 1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_bfloat16_model_trains_and_samples(kind):
    from heptapod_nb.sample import generate
    m = _open_gates(_model(token_kind=kind, token_channels=3 if kind == "kl" else 0, diff_steps=3)).to(torch.bfloat16)
    x, y = _data(kind=kind)
    loss = m.loss(x, y)
    loss.backward()
    assert math.isfinite(loss.item()) and m.head.out.weight.grad.dtype == torch.bfloat16
    out, tr = generate(m.eval(), [1, 2], trace=True, tokens_per_step=2)
    assert torch.isfinite(out.float()).all() and len(tr) == 8
    assert out.dtype == (torch.bfloat16 if kind == "kl" else torch.long)


def test_window1_is_plain_next_token_ce():
    m = _f64(_open_gates(_model(window=1, targets_per_step=4, next_weight=3.0)))
    x, y = _data()
    o = make_order("raster", 4, 16)
    h = m.states(m.check_tokens(x), y, o)
    logits = m.head(h, h, torch.arange(16), o[:, :, None], torch.ones(4, 16, 1, dtype=torch.bool))[:, :, 0]
    ref = F.cross_entropy(logits.reshape(-1, 8), x.flatten(1).reshape(-1))
    out = m(x, y)
    assert torch.allclose(out["loss"], ref, rtol=1e-10, atol=0) and torch.allclose(out["next_loss"], ref, rtol=1e-10, atol=0)
    assert out["n_targets"] == 4 * 16 and not m.head.self_attn


@pytest.mark.parametrize("order,variant", [("raster", {}), ("random", {}), ("raster", VARIANTS[1]),
                                           ("random", VARIANTS[2]), ("raster", MLP), ("random", MLP)])
def test_no_leak_from_future(order, variant):
    m = _f64(_open_gates(_model(order=order, **variant)))
    x, y = _data()
    o = make_order(order, 4, 16, generator=torch.Generator().manual_seed(3))
    tg = select_targets(o, "global", "all")
    j = 9                                                           # change the token at order index j
    x2 = x.flatten(1).clone()
    x2.scatter_(1, o[:, j:j + 1], (x2.gather(1, o[:, j:j + 1]) + 1) % 8)
    x2 = x2.view_as(x)
    outs = []
    for xx in (x, x2):
        h = m.states(m.check_tokens(xx), y, o)
        outs.append(m.head(h, h, tg.steps_S, tg.pos_BSM, tg.valid_BSM).detach())
    vm = tg.valid_BSM[..., None]
    assert ((outs[0] - outs[1]).abs() * vm)[:, :j + 1].max() < 1e-12    # steps that have seen pi(0..j-1) only
    assert ((outs[0] - outs[1]).abs() * vm)[:, j + 1:].max() > 1e-4     # later steps see the change (measured ~0.1)


def test_loss_is_weighted_mean_over_supervised_pairs():
    m = _f64(_open_gates(_model(targets_per_step="all", next_weight=4.0)))
    x, y = _data()
    o = make_order("raster", 4, 16); tg = select_targets(o, "global", "all")
    h = m.states(m.check_tokens(x), y, o)
    out = m.head(h, h, tg.steps_S, tg.pos_BSM, tg.valid_BSM)
    ce = F.cross_entropy(out.flatten(0, 2), x.flatten(1).gather(1, tg.pos_BSM.flatten(1)).flatten(), reduction="none").view(tg.pos_BSM.shape)
    w = tg.valid_BSM.double(); w[..., 0] = 4.0
    assert int(tg.valid_BSM.sum()) == 4 * 16 * 17 // 2                 # every remaining position at every step
    assert torch.allclose(m(x, y, order=o, targets=tg)["loss"], (w * ce).sum() / w.sum(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_overfits_one_batch(kind):
    torch.manual_seed(0)
    m = _model(token_kind=kind, token_channels=3 if kind == "kl" else 0, targets_per_step=3, diff_draws=8)
    x, y = _data(8, kind)
    opt = torch.optim.AdamW(m.parameters(), lr=5e-3, weight_decay=0.0)
    first = None
    for i in range(150 if kind == "vq" else 200):
        torch.manual_seed(100 + i)
        loss = m.loss(x, y); opt.zero_grad(); loss.backward(); opt.step()
        first = first if first is not None else loss.item()
    torch.manual_seed(0)
    with torch.no_grad(): final = sum(m.loss(x, y).item() for _ in range(5)) / 5
    assert final < 0.1 * first, (first, final)   # training, not an identity: measured final/first 3e-5 (VQ), 0.060 (KL)


def test_cached_steps_equal_full_states():
    m = _f64(_open_gates(_model(order="random"))).eval()
    x, y = _data()
    flat = m.check_tokens(x)
    o = make_order("random", 4, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = m.states(flat, y, o)
        for k in (1, 3):
            m.setup_cache(4)
            parts = [m.step(y, flat.gather(1, o[:, :0]), o[:, :0], 0)]
            for i in range(1, 16, k):
                idx = o[:, i - 1:min(i + k, 16) - 1]
                parts.append(m.step(y, flat.gather(1, idx), idx, i))
            m.clear_cache()
            assert torch.allclose(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-12)


def test_presets_and_meta():
    for name, cfg in PRESETS.items():
        with torch.device("meta"): m = Heptapod(cfg)
        n = m.num_params()
        assert n["total"] == n["backbone"] + n["head"] == sum(p.numel() for p in m.parameters())
    with torch.device("meta"): h = Heptapod(PRESETS["H"]).num_params()
    assert abs(h["total"] - 941e6) / 941e6 < 0.05
    assert PRESETS["tiny"].grid == (8, 8) and PRESETS["tiny"].vocab_size == 512
    assert PRESETS["H"].grid == (16, 16) and PRESETS["H"].vocab_size == 16384


@pytest.mark.parametrize("variant", VARIANTS)
def test_head_variant_sees_only_h_t(variant):
    """The sampler's call `head_out(h, n, ...)`: with head_context="last" the step's outputs do not change when the
    earlier states h_0..h_{n-1} are perturbed (h_n kept); with the default "prefix" head they do."""
    m = _f64(_open_gates(_model(targets_per_step=3, **variant))).eval()
    x, y = _data()
    o = make_order("raster", 4, 16)
    h = m.states(m.check_tokens(x), y, o).detach()
    n = 8
    h2 = h.clone(); h2[:, :n] += torch.randn(4, n, h.shape[-1], dtype=h.dtype, generator=torch.Generator().manual_seed(0))
    pos = o[:, n:n + 3]
    d = (m.head_out(h, n, pos) - m.head_out(h2, n, pos)).abs().max()
    if variant.get("head_context") == "last": assert d == 0
    else: assert d > 1e-3                                                # measured ~0.3


def test_head_variant_config():
    "Each variant is a validated config field wired to the head; a bad value names the field and the choices."
    m = _model(targets_per_step=3, head_context="last", head_queries="independent")
    assert m.head.context == "last" and not m.head.self_attn and all(b.context == "last" for b in m.head.blocks)
    assert _model(targets_per_step=3, head_queries="joint").head.self_attn and _model().head.context == "prefix"
    n_pre, n_last = _model(targets_per_step=3).num_params()["head"], m.num_params()["head"]
    assert n_last < n_pre
    with pytest.raises(ConfigError, match="head_context"): HeptapodConfig(head_context="all")
    with pytest.raises(ConfigError, match="head_queries"): HeptapodConfig(head_queries="alone")
    with pytest.raises(ConfigError, match="head_context"): PRESETS["tiny"].replace(head_context="h_t")


def _next_outputs_from_forward(m, toks, labels, tr):
    "For each traced step (one position per step): the training forward's output for the next position, same query set."
    rank, n, outs = tr.order.argsort(-1), 0, []
    for st in tr:
        q, qv = st.queries, st.query_valid
        tg = Targets(q, qv, rank.gather(1, q.flatten(1)).view_as(q) - n, torch.full((q.shape[1],), n))
        outs.append(m(toks, labels, order=tr.order, targets=tg, return_outputs=True)["outputs"][:, 0, 0])
        n += 1
    return torch.stack(outs, 1)


@pytest.mark.parametrize("kind", ["vq", "kl"])
@pytest.mark.parametrize("window,M", [(1, 1), (3, 2), ("global", "all")])
def test_mlp_head_trains_and_samples(kind, window, M):
    """The MLP head with both token kinds, window 1 / 3 / global and M 1 / 2 / "all": the loss is finite and has
    gradients on the head; `generate` with the KV cache gives the same samples as without it, and every step's
    distribution (the head output the sampler drew from) is the training forward's for that prefix (float64)."""
    from heptapod_nb.sample import generate
    kw = dict(token_kind=kind, token_channels=3 if kind == "kl" else 0, window=window, targets_per_step=M, diff_steps=3)
    m = _f64(_open_gates(_model(**kw, **MLP)))
    if m.diffusion is not None:                                          # its zero-init layers would stop the gradient
        with torch.no_grad():
            for p in m.diffusion.parameters(): p.add_(0.1 * torch.randn_like(p))
    assert type(m.head).__name__ == "MLPHead"
    x, y = _data(kind=kind)
    loss = m.loss(x.double() if kind == "kl" else x, y)
    loss.backward()
    assert math.isfinite(loss.item()) and m.head.blocks[0].ada[1].weight.grad.abs().max() > 0
    m.eval()
    toks, tr = generate(m, [1, 6], seed=3, trace=True)
    again = generate(m, [1, 6], seed=3, kv_cache=False)
    assert torch.equal(toks, again) if kind == "vq" else torch.allclose(toks, again, rtol=1e-9, atol=1e-9)
    sampled = torch.cat([st.sampled[:, :1] for st in tr], 1)             # (B, N, O): what each step drew from
    with torch.no_grad(): ref = _next_outputs_from_forward(m, toks, torch.tensor([1, 6]), tr)
    assert torch.allclose(sampled.double(), ref, rtol=1e-9, atol=1e-9)   # float64: measured max diff ~1e-15


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_mlp_head_model_starts_neutral(kind):
    """adaLN-Zero at the model level: a fresh VQ model with the MLP head predicts uniform codes (loss exactly log K);
    a fresh KL model's diffusion conditions do not depend on the tokens or the class."""
    m = _f64(_model(token_kind=kind, token_channels=3 if kind == "kl" else 0, targets_per_step="all", **MLP))
    x, y = _data(kind=kind)
    x = x.double() if kind == "kl" else x
    o = make_order("raster", 4, 16); tg = select_targets(o, "global", "all")
    out = m(x, y, order=o, targets=tg, return_outputs=True)
    if kind == "vq":
        assert out["outputs"].abs().max() == 0 and torch.allclose(out["loss"], torch.tensor(math.log(8), dtype=torch.float64))
    else:
        x2 = x + 1.0
        out2 = m(x2, (y + 1) % 8, order=o, targets=tg, return_outputs=True)["outputs"]
        assert torch.equal(out["outputs"], out2)


def test_mlp_head_config_and_old_checkpoints(tmp_path):
    """head_type is validated (unknown value, "mlp" with a head that would see more: a ConfigError naming the fields);
    an "mlp" model round-trips; a checkpoint saved before head_type existed loads as the transformer head."""
    with pytest.raises(ConfigError, match="head_type must be one of"): HeptapodConfig(head_type="rnn")
    with pytest.raises(ConfigError, match="head_type='mlp'.*head_context='last'.*got head_context='prefix'"):
        HeptapodConfig(head_type="mlp", head_context="prefix")
    with pytest.raises(ConfigError, match="head_queries='joint'"):
        PRESETS["tiny"].replace(head_type="mlp", head_context="last")
    assert HeptapodConfig().head_type == "transformer" and type(_model().head).__name__ == "Head2D"
    m = _open_gates(_model(**MLP)).eval()
    save_model(m, tmp_path / "mlp.safetensors")
    m2 = load_model(tmp_path / "mlp.safetensors")
    assert m2.config.head_type == "mlp" and type(m2.head).__name__ == "MLPHead"
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()): assert torch.equal(a, b), k
    old = _open_gates(_model()).eval()
    cfg = old.config.to_dict(); del cfg["head_type"], cfg["head_context"]  # what a checkpoint from before looks like
    save_weights(tmp_path / "old.safetensors", old, cfg, kind="heptapod")
    o = load_model(tmp_path / "old.safetensors")
    assert o.config.head_type == "transformer" and type(o.head).__name__ == "Head2D"
    assert o.config.head_context == "prefix" and HeptapodConfig().head_context == "last"   # stored before "last" was the default
    x, y = _data()
    r = make_order("raster", 4, 16); tg = select_targets(r, "global", "all")
    with torch.no_grad(): assert torch.equal(o(x, y, order=r, targets=tg)["loss"], old(x, y, order=r, targets=tg)["loss"])


def test_checkpoint_roundtrip_and_mismatch(tmp_path):
    m = _open_gates(_model(token_kind="kl", token_channels=3)).eval()
    p = tmp_path / "m.safetensors"
    save_model(m, p)
    m2 = load_model(p)
    assert m2.config == m.config
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()): assert torch.equal(a, b), k
    assert torch.equal(m2.diffusion.schedule(), m.diffusion.schedule())   # the loaded denoiser computes its own schedule
    with torch.device("meta"): fresh = DiffusionMLP(3, 8, width=8, depth=1)
    fresh = fresh.to_empty(device="cpu"); assert torch.equal(fresh.schedule(), m.diffusion.schedule())   # no buffer to restore
    assert fresh.double().schedule().dtype == torch.float64 and fresh.bfloat16().schedule().dtype == torch.float32
    with pytest.raises(ConfigError, match="different config"): load_model(p, config=m.config.replace(depth=3))
    save_weights(tmp_path / "bad.safetensors", _model(depth=3), m.config, kind="heptapod")
    with pytest.raises(ConfigError, match="does not match"): load_model(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError): load_model(tmp_path / "missing.safetensors")
    save_weights(tmp_path / "tok.safetensors", m, m.config, kind="vq_tokenizer")
    with pytest.raises(ConfigError, match="heptapod"): load_model(tmp_path / "tok.safetensors")
    last = _open_gates(_model(head_context="last")).eval()                # a head variant round-trips too
    save_model(last, tmp_path / "last.safetensors")
    assert load_model(tmp_path / "last.safetensors").config.head_context == "last"
    with pytest.raises(ConfigError, match="head_context"):
        load_model(tmp_path / "last.safetensors", config=last.config.replace(head_context="prefix"))


def test_input_checks():
    m = _model()
    x, y = _data()
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 8\)"): m.loss(x + 8, y)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 8\)"): m.loss(x - 1, y)
    with pytest.raises(ValueError, match="shape"): m.loss(x[:, :3], y)
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 8\)"): m.loss(x, y + 5)
    with pytest.raises(ValueError, match="labels must have shape"): m.loss(x, y[:2])
    with pytest.raises(ValueError, match="labels are required"): m.loss(x, None)
    kl = _model(token_kind="kl", token_channels=3)
    with pytest.raises(ValueError, match="shape"): kl.loss(torch.randn(2, 2, 4, 4), y[:2])
    with pytest.raises(ValueError, match="NaN"): kl.loss(torch.full((2, 3, 4, 4), float("nan")), y[:2])
    with pytest.raises(ConfigError, match="token_channels"): HeptapodConfig(token_kind="kl")
    with pytest.raises(ConfigError, match="next_weight"): HeptapodConfig(next_weight=0.0)
    with pytest.raises(ConfigError): HeptapodConfig(order="spiral")


def test_unconditional_and_grad_checkpoint():
    m = _model(num_classes=0, grad_checkpoint=True)
    x, _ = _data()
    loss = m.loss(x, None); loss.backward()
    assert math.isfinite(loss.item()) and m.cls_emb.weight.shape[0] == 1
    with pytest.raises(ValueError, match="unconditional"): m.loss(x, torch.tensor([1, 0, 0, 0]))


@pytest.mark.parametrize("kind", ["vq", "kl"])
@pytest.mark.parametrize("window,M,variant", [(1, 1, {}), (3, 2, {}), ("global", "all", {}), ("global", 2, VARIANTS[1]),
                                              (1, 1, VARIANTS[1]), ("global", "all", VARIANTS[2]), (3, 2, MLP),
                                              ("global", "all", MLP)])
def test_chunked_loss_equals_plain_path(kind, window, M, variant):
    """The head's loss computed in chunks, each chunk's backward inside the forward (`loss_chunk` > 0, 06_head
    `chunked_loss`), == the plain path (`loss_chunk=0`: every output at once): the same loss, next-position loss and
    gradient of every parameter, in float64 (measured ~1e-16 relative; asserted 1e-10), for VQ (cross-entropy) and KL
    (diffusion loss: the same noise draws), windows 1 / k / global, M = 1 / 2 / all, prefix and h_t-only heads and the
    MLP head, with chunks of one step, a few steps and whole images."""
    kw = dict(token_kind="kl", token_channels=3) if kind == "kl" else {}
    m = _f64(_open_gates(_model(window=window, targets_per_step=M, next_weight=3.0, **kw, **variant)))
    x, y = _data(kind=kind)
    o = make_order("random", 4, 16, generator=torch.Generator().manual_seed(0))
    tg = select_targets(o, window, M, generator=torch.Generator().manual_seed(0))
    params = [p for p in m.parameters()]

    def run(chunk):
        m.config = m.config.replace(loss_chunk=chunk)
        torch.manual_seed(5)                              # the KL loss draws its noise from the global generator
        r = m(x, y, order=o, targets=tg)
        return r["loss"], r["next_loss"].detach(), torch.autograd.grad(r["loss"], params, allow_unused=True)

    ref = run(0)
    M_ = tg.pos_BSM.shape[-1]
    for chunk in (1, 3 * M_, 16 * M_, 2 * 16 * M_, 4096):   # one step, runs of steps, one image, two images, everything
        got = run(chunk)
        assert torch.allclose(got[0], ref[0], rtol=1e-10, atol=0), (chunk, got[0], ref[0])
        assert torch.allclose(got[1], ref[1], rtol=1e-10, atol=0), chunk
        for (name, _), a, b in zip(m.named_parameters(), got[2], ref[2]):
            if a is None and b is None: continue
            assert a is not None and b is not None, name
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-13), (chunk, name)


def test_chunked_loss_keeps_less_for_backward_and_counts_the_same_flops():
    """What the chunked loss is for: far fewer bytes held for backward at the end of the forward than the plain path
    (the logits and head activations are gone; measured here 1.2 MB vs 7.2 MB, 0.17x), for the same counted FLOPs of forward + backward
    (FlopCounterMode; the chunks' backward runs inside the forward, nothing is recomputed)."""
    import weakref
    from torch.utils.flop_counter import FlopCounterMode
    m = _open_gates(_model(vocab_size=512, window="global", targets_per_step=4))
    x = torch.randint(0, 512, (8, 4, 4), generator=torch.Generator().manual_seed(0)); y = torch.arange(8)
    pids = {p.untyped_storage().data_ptr() for p in m.parameters()}

    def held_and_flops(chunk):
        m.config = m.config.replace(loss_chunk=chunk)
        refs = []
        class Held:
            def __init__(self, t): self.t = t
        def pack(t):
            h = Held(t); refs.append(weakref.ref(h)); return h
        with FlopCounterMode(display=False) as fc:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.t):
                torch.manual_seed(0); loss = m.loss(x, y)
            alive = {h.t.untyped_storage().data_ptr(): h.t.untyped_storage().nbytes() for r in refs if (h := r()) is not None}
            loss.backward()
        m.zero_grad()
        return sum(v for k, v in alive.items() if k not in pids), fc.get_total_flops()

    (plain_b, plain_f), (chunk_b, chunk_f) = held_and_flops(0), held_and_flops(64)
    assert chunk_b < 0.5 * plain_b, (chunk_b, plain_b)
    assert chunk_f == plain_f, (chunk_f, plain_f)


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_a_loss_that_fits_one_chunk_takes_the_plain_path(kind):
    """Chunking the head's loss saves memory only with two chunks or more: when every query slot fits one chunk the
    loss and its gradients are the plain path's (`loss_chunk=0`), bit for bit; with several chunks they agree to float
    rounding (the chunked path's own tests, float64 1e-10)."""
    kw = dict(token_kind="kl", token_channels=3) if kind == "kl" else {}
    x, y = _data(kind=kind)
    def run(chunk):
        m = _open_gates(_model(targets_per_step=3, loss_chunk=chunk, **kw))
        torch.manual_seed(5)
        loss = m.loss(x, y); loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]
    slots = 4 * 16 * 3                                       # B x S x M of _data's batch at M=3
    plain, one, several = run(0), run(slots), run(slots // 5)
    assert torch.equal(one[0], plain[0]) and all(torch.equal(a, b) for a, b in zip(one[1], plain[1]))
    assert torch.allclose(several[0], plain[0], rtol=1e-4)
