"Trace pictures and the ipywidgets explorer, on a real (tiny, untrained) model and a hand-made trace."
import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from heptapod_nb.config import images_to_uint8
from heptapod_nb.viz import (PANELS, GREY, Explorer, TraceView, filmstrip, plot_step, save_gif, trace_summary,
                             view_for_model)


class Levels:
    "4x4-patch grey-level 'tokenizer' (K levels): enough to check what the panels show."
    kind, vocab_size, grid = "vq", 16, (8, 8)
    def decode(self, z):
        v = (z.float() * torch.linspace(-1, 1, 16)).sum(-1) if z.dtype.is_floating_point else z.float() / 15 * 2 - 1
        return v[:, None].repeat_interleave(4, -2).repeat_interleave(4, -1)


def hand_trace(tokens_per_step=1):
    g = torch.Generator().manual_seed(0)
    final = torch.randint(16, (1, 8, 8), generator=g); N = 64
    steps, known = [], torch.zeros(1, N, dtype=torch.bool)
    for t, s in enumerate(range(0, N, tokens_per_step)):
        probs = torch.softmax(torch.randn(1, N, 16, generator=g) * (1 + s / 8), -1)
        ent = -(probs * probs.log()).sum(-1)
        nan = lambda x: torch.where(known, torch.nan, x).view(1, 8, 8)
        chosen = torch.zeros(1, N, dtype=torch.bool); chosen[:, s:s + tokens_per_step] = True
        steps.append(SimpleNamespace(t=t, seen=known.view(1, 8, 8).clone(), chosen=chosen.view(1, 8, 8),
                                     entropy=nan(ent), maxprob=nan(probs.max(-1).values),
                                     final_prob=nan(probs.gather(2, final.view(1, N, 1))[..., 0]),
                                     guess=torch.where(known, final.view(1, N), probs.argmax(-1)).view(1, 8, 8),
                                     probs=probs.view(1, 8, 8, 16).half()))
        known = known | chosen
    return SimpleNamespace(steps=steps, tokens=final, order=torch.arange(N)[None], kind="vq")


def test_panels_show_seen_guess_and_heatmaps():
    v = TraceView(hand_trace(), Levels(), scale=2)
    assert len(v) == 65
    p = v.panels(16)                                                   # two token rows seen
    assert set(p) == set(PANELS) and all(a.shape == (64, 64, 3) for a in p.values())
    final = images_to_uint8(Levels().decode(hand_trace().tokens))[0]
    assert (p["seen"][24:] == GREY).all() and (p["seen"][16:24, 8:] == GREY).all()   # unseen greyed
    assert (p["seen"][16, :8] == (0, 200, 255)).all()                  # the cell chosen at this step is outlined
    assert np.array_equal(p["seen"][:16 - 1, 2:-2], np.repeat(np.repeat(final, 2, 0), 2, 1)[:15, 2:-2])
    assert (p["entropy"][:16] == GREY).all() and not (p["entropy"][20:] == GREY).all()
    assert not np.array_equal(v.panels(3)["guess"], v.panels(40)["guess"])
    assert np.array_equal(v.panels(64)["seen"], np.repeat(np.repeat(final, 2, 0), 2, 1))


def test_expectation_overlay_baseline_and_errors():
    tr = hand_trace()
    a, e = TraceView(tr, Levels()), TraceView(tr, Levels(), expectation=True)
    assert not np.array_equal(a.guess_img[5], e.guess_img[5])
    assert not np.array_equal(a.panels(5, overlay=True)["entropy"], a.panels(5)["entropy"])
    b = TraceView(tr, Levels(), only_next=True)
    assert all(np.isfinite(b.heat(t)).sum() == 1 for t in range(64))
    with pytest.raises(IndexError, match="out of range"): a.panels(65)
    with pytest.raises(ValueError, match="unknown heatmap"): a.heat(1, "nope")
    with pytest.raises(ValueError, match="out of range"): TraceView(tr, Levels(), b=1)
    tr.steps[0].probs = None
    for s in tr.steps: s.probs = None
    with pytest.raises(ValueError, match="trace='full'"): TraceView(tr, Levels(), expectation=True)


def test_figures_and_gif():
    import matplotlib.pyplot as plt
    v = TraceView(hand_trace(4), Levels())
    assert len(plot_step(v, 3).axes) >= 4 and len(filmstrip(v, n=5).axes) == 15
    gif = Image.open(io.BytesIO(save_gif(v, fps=10)))
    assert gif.format == "GIF" and gif.n_frames == len(v) == 17
    plt.close("all")


@pytest.fixture(scope="module")
def real():
    from heptapod_nb.model import PRESETS, Heptapod
    from heptapod_nb.tokenizer import TOKENIZER_PRESETS, build_tokenizer
    torch.manual_seed(0)
    tok = build_tokenizer(TOKENIZER_PRESETS["tiny-vq"], "cpu").eval()
    cfg = PRESETS["tiny"].replace(dim=64, depth=2, n_heads=2, head_width=64, head_depth=1, head_heads=2)
    return tok, Heptapod(cfg).eval(), Heptapod(cfg.replace(window=1, targets_per_step=1)).eval()


def test_real_trace_view(real):
    from heptapod_nb.sample import generate
    tok, model, base = real
    _, tr = generate(model, torch.tensor([3, 4]), seed=1, trace="full", tokens_per_step=2)
    v = view_for_model(model, tr, tok, b=1)
    assert v.T == 32 and v.label == "Heptapod" and [int(s.sum()) for s in v.seen[:3]] == [0, 2, 4]
    s = trace_summary(v)
    assert s["steps"] == 32 and all(x is not None for x in s["mean_entropy"])
    assert not np.array_equal(v.compose(1), v.compose(20))
    _, trb = generate(base, torch.tensor([3]), seed=1, trace=True)
    assert view_for_model(base, trb, tok).only_next


def test_explorer_generate_and_scrub(real):
    tok, model, base = real
    ex = Explorer(model, tok, baseline=base, device="cpu")
    assert ex.views == {} and ex.image.value == b""
    ex.cls.value, ex.seed.value, ex.tokens_per_step.value = 7, 3, 4
    ex.button.click()                                                  # Generate fills the trace
    assert set(ex.views) == {"model", "baseline"} and ex.step.max == 16
    first = ex.image.value; assert first[:4] == b"\x89PNG"
    ex.step.value = 9; assert ex.image.value != first                  # the slider changes the panels
    calls = []
    ex.generate_fn = lambda *a, **k: calls.append(1)                   # scrubbing must not sample again
    ex.step.value = 2; ex.heatmap.value = "final_prob"; ex.overlay.value = True
    assert calls == [] and ex.base_image.value[:4] == b"\x89PNG"
    ex.show_baseline.value = False; assert ex.base_image.value == b""
    ex.temperature.value = 0.05
    ex.generate_fn = None; ex.top_k.value = 5; ex.generate()
    assert ex.step.max == 16


def test_kl_pixel_variance_of_the_draws(tmp_path):
    """Issue 25: continuous (KL) tokens get a pixel-space uncertainty map too: each step's diffusion draws decoded,
    the variance of each pixel over the draws (unbiased) averaged per cell. It equals a float64 reference that
    decodes every draw grid alone (float32 decoder, a batch of 1 vs 32: measured 4e-9 on values 2e-3..5e-2, 1e-5
    allowed; a biased variance would be off by ~1e-2); NaN exactly where nothing is predicted; 0 when the draws agree. (Before: no pixel map for KL.)"""
    from heptapod_nb.bundle import load_bundle, write_untrained_weights
    from heptapod_nb.sample import generate
    from heptapod_nb.viz import draws_pixel_variance
    b = load_bundle(write_untrained_weights(tmp_path, tokenizer="tiny-kl"), "cpu")
    toks, tr = generate(b.model, [2], seed=1, trace="full", tokens_per_step=8)
    v = TraceView(tr, b.tokenizer)
    h, w = v.grid
    assert v.pixel_var is not None and v.pixel_var.shape == (len(tr.steps), h, w)
    assert np.array_equal(np.isnan(v.pixel_var), np.isnan(v.entropy))
    assert tr.steps[0].draws.shape[:2] == (1, 4) and tr.steps[0].draws.dtype == torch.float16
    for t in (0, 3):
        d = tr.steps[t].draws[0]                                          # (S, C, h, w)
        with torch.no_grad():
            x = torch.stack([b.tokenizer.decode(d[s:s + 1].float())[0] for s in range(len(d))]).double()
        ref = ((x + 1) / 2).clamp(0, 1).var(0).mean(0)                   # (H, W)
        c = ref.shape[-1] // w
        ref = ref.unflatten(0, (h, c)).unflatten(2, (w, c)).mean((1, 3)).numpy()
        ok = ~np.isnan(v.pixel_var[t])
        err = np.abs(v.pixel_var[t][ok] - ref[ok]).max()
        assert ok.any() and err < 1e-5 and (v.pixel_var[t][ok] > 0).all(), f"step {t}: max error {err:.2e}"
    same = tr.steps[0].draws[0, :1].expand(3, -1, -1, -1)[None]          # one step, three equal draws
    assert np.allclose(draws_pixel_variance(same, b.tokenizer), 0, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2 draws"): draws_pixel_variance(same[:, :1], b.tokenizer)
