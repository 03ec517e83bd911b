"""Token kinds (`heptapod_nb.tokens`): the registry, the per-kind operations against float64 references written
here, the tokenizer protocols (our trained tokenizers and the LlamaGen / MAR loaders meet them), and that a new
kind plugs into the model and the sampler through the registry alone."""
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import heptapod_nb
from heptapod_nb.config import ConfigError
from heptapod_nb.data import TokenDataset
from heptapod_nb.tokens import DiffusionMLP
from heptapod_nb.model import Heptapod, HeptapodConfig
from heptapod_nb.pretrained import TOKENIZER_FORMATS, load_llamagen_vq, load_mar_kl, load_tokenizer_as
from heptapod_nb.sample import generate
from heptapod_nb.tokenizer import build_tokenizer, save_tokenizer
from heptapod_nb.tokens import (TOKEN_KINDS, ContinuousTokenizer, DiscreteTokenizer, DrawSettings, KLTokens, Prediction,
                                Tokenizer, VQTokens, token_kind)
from test_pretrained import SMALL_KL, SMALL_VQ, _small_kl_sd, _small_vq_sd, save_ckpt

G = lambda s=0: torch.Generator().manual_seed(s)


def test_registry_builds_kinds_from_names_configs_tokenizers_datasets(tmp_path):
    assert set(TOKEN_KINDS) == {"vq", "kl"} and type(token_kind("vq")) is VQTokens and type(token_kind("kl")) is KLTokens
    assert token_kind(HeptapodConfig(vocab_size=17)) == VQTokens(17)
    assert token_kind(HeptapodConfig(token_kind="kl", token_channels=3, diff_draws=2, diff_steps=7)) == KLTokens(3, 2, 7)
    assert token_kind(build_tokenizer("tiny-vq")) == VQTokens(512) and token_kind(build_tokenizer("tiny-kl")).channels == 4
    TokenDataset.create(tmp_path / "d", n=1, kind="kl", grid=(2, 2), num_classes=1, channels=3)
    TokenDataset.write_meta(tmp_path / "d", {**TokenDataset(tmp_path / "d", allow_partial=True).meta, "done": 1})
    ds = TokenDataset(tmp_path / "d")
    assert type(ds.token_kind) is KLTokens and ds[0][0].dtype == torch.float32
    for bad in ("fsq", None, SimpleNamespace(kind="rgb")):
        with pytest.raises(ConfigError, match="token kind must be one of"): token_kind(bad)
    with pytest.raises(ConfigError, match="token_kind must be one of"): HeptapodConfig(token_kind="fsq")
    with pytest.raises(ValueError, match="without vocab_size"): token_kind("vq").check_grid(torch.zeros(1, 2, 2).long(), (2, 2))


def test_grids_flatten_gather_scatter_and_storage():
    vq, kl = VQTokens(10), KLTokens(3)
    codes = torch.randint(10, (2, 3, 4), generator=G())
    lat = torch.randn(2, 3, 3, 4, generator=G(1))
    fc, fl = vq.check_grid(codes, (3, 4)), kl.check_grid(lat, (3, 4))
    assert fc.shape == (2, 12) and fl.shape == (2, 12, 3)
    assert torch.equal(fl[1, 5], lat[1, :, 1, 1])                      # position p = row * w + col, channels last
    assert torch.equal(vq.to_grid(fc, (3, 4)), codes) and torch.equal(kl.to_grid(fl, (3, 4)), lat)
    idx = torch.tensor([[11, 0], [4, 7]])
    assert torch.equal(vq.gather(fc, idx), torch.stack([fc[0, [11, 0]], fc[1, [4, 7]]]))
    assert torch.equal(kl.gather(fl, idx), torch.stack([fl[0, [11, 0]], fl[1, [4, 7]]]))
    empty = kl.empty(2, 12, "cpu", torch.float64)
    kl.scatter_(empty, idx, kl.gather(fl, idx))
    assert empty.dtype == torch.float64 and torch.equal(kl.gather(empty, idx), kl.gather(fl, idx).double())
    assert empty.abs().sum(-1).ne(0).sum() == 4                         # nothing else written
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 10\)"): vq.check_grid(codes + 10, (3, 4))
    with pytest.raises(ValueError, match="NaN or inf"): kl.check_grid(lat.masked_fill(lat > 1, float("nan")), (3, 4))
    assert vq.storage(5, 2, (3, 4), vocab_size=40000) == (np.int32, (5, 2, 3, 4))
    assert kl.storage(5, 2, (3, 4), channels=3) == (np.float32, (5, 2, 3, 3, 4))
    with pytest.raises(ValueError, match="needs channels"): kl.storage(5, 2, (3, 4))
    assert vq.cast(torch.zeros(2, dtype=torch.int16)).dtype == torch.long and kl.cast(torch.zeros(2, dtype=torch.float16)).dtype == torch.float32


def test_vq_loss_draw_confidence_stats_against_float64_references():
    vq = VQTokens(6)
    logits = torch.randn(2, 5, 6, generator=G(2), dtype=torch.float64)
    flat = torch.randint(6, (2, 9), generator=G(3))
    pos = torch.tensor([[[1, 4], [2, 8]], [[0, 3], [5, 6]]])            # (B, S=2, M=2)
    out = torch.randn(2, 2, 2, 6, generator=G(4), dtype=torch.float64)
    per = vq.loss(out, flat, pos, torch.ones_like(pos, dtype=torch.bool), torch.float64)
    ref = -torch.stack([out[b, s, m].log_softmax(-1)[flat[b, pos[b, s, m]]] for b in range(2) for s in range(2)
                        for m in range(2)]).view(2, 2, 2)
    torch.testing.assert_close(per, ref, rtol=1e-12, atol=1e-12)
    # top_k=1 is the argmax, whatever the temperature and the generator
    assert torch.equal(vq.draw(logits, DrawSettings(temperature=3.0, top_k=1), G(5)), logits.argmax(-1))
    pred = Prediction(torch.tensor([[0, 2, 3, 6, 7], [1, 4, 5, 7, 8]]), logits=logits)
    p = logits.softmax(-1)
    torch.testing.assert_close(vq.confidence(pred), p.amax(-1))
    tokens_BR = torch.randint(6, (2, 5), generator=G(6))
    torch.testing.assert_close(vq.likelihood(logits, tokens_BR), p.gather(-1, tokens_BR[..., None])[..., 0].float())
    nan = torch.full((2, 9), float("nan"), dtype=torch.float64)
    ent, maxp, guess, probs = vq.trace_stats(pred, flat, nan, (3, 3), full=True)
    for b in range(2):
        for r, q in enumerate(pred.positions[b].tolist()):
            assert math.isclose(ent[b, q], -(p[b, r] * p[b, r].log()).sum().item(), rel_tol=1e-12)
            assert math.isclose(maxp[b, q], p[b, r].max().item(), rel_tol=1e-12) and guess.flatten(1)[b, q] == p[b, r].argmax()
            torch.testing.assert_close(probs.flatten(1, 2)[b, q].float(), p[b, r].float(), rtol=1e-3, atol=1e-3)  # float16
        seen = [q for q in range(9) if q not in pred.positions[b].tolist()]
        assert torch.isnan(ent[b, seen]).all() and torch.equal(guess.flatten(1)[b, seen], flat[b, seen])
        assert probs.flatten(1, 2)[b, seen].eq(0).all()


def test_kl_loss_draw_confidence_stats_against_references():
    torch.manual_seed(0)
    kl, dm = KLTokens(3, diff_draws=2, diff_steps=4), DiffusionMLP(3, 8, 16, 2).double()
    flat = torch.randn(2, 6, 3, generator=G(1), dtype=torch.float64)
    pos = torch.tensor([[[1, 4]], [[0, 3]]])
    valid = torch.tensor([[[True, False]], [[True, True]]])
    z = torch.randn(2, 1, 2, 8, generator=G(2), dtype=torch.float64)
    torch.manual_seed(3); per = kl.loss(z, flat, pos, valid, torch.float64, dm)
    x0 = torch.stack([flat[0, 1], flat[1, 0], flat[1, 3]])
    torch.manual_seed(3); ref = dm.loss(x0, torch.stack([z[0, 0, 0], z[1, 0, 0], z[1, 0, 1]]), 2)
    torch.testing.assert_close(per[valid], ref, rtol=1e-12, atol=1e-12)
    assert per[~valid].eq(0).all()
    x = kl.draw(z[:, 0], DrawSettings(temperature=0.5), G(4), dm)       # the diffusion chain, default steps
    torch.testing.assert_close(x, dm.sample(z[:, 0].reshape(4, 8), steps=4, temperature=0.5, generator=G(4)).view(2, 2, 3))
    draws = torch.randn(2, 2, 5, 3, generator=G(5))        # (B, R, S, C) float32, as `KLTokens.predict` returns them
    pred = Prediction(torch.tensor([[1, 4], [0, 3]]), draws=draws)
    var = draws.double().var(2)
    # float32 statistics against float64 references: rel error ~1e-7 measured, 1e-5 allowed
    torch.testing.assert_close(kl.confidence(pred).double(), -var.log().sum(-1), rtol=1e-5, atol=1e-5)
    nan = torch.full((2, 6), float("nan"))
    ent, maxp, guess, probs = kl.trace_stats(pred, flat.float(), nan, (2, 3))
    gauss = 0.5 * (1 + torch.log(2 * math.pi * var)).sum(-1)                # entropy of N(mean, diag(var))
    torch.testing.assert_close(ent.gather(1, pred.positions).double(), gauss, rtol=1e-5, atol=1e-5)
    assert torch.isnan(maxp).all() and probs is None and kl.likelihood(z, flat) is None
    torch.testing.assert_close(guess.flatten(2).transpose(1, 2).gather(1, pred.positions[..., None].expand(-1, -1, 3)),
                               draws.mean(2))
    seen = torch.tensor([[0, 2, 3, 5], [1, 2, 4, 5]])
    assert torch.equal(guess.flatten(2).transpose(1, 2).gather(1, seen[..., None].expand(-1, -1, 3)),
                       flat.float().gather(1, seen[..., None].expand(-1, -1, 3)))
    assert guess.shape == (2, 3, 2, 3)


def test_tokenizer_compatibility_problems():
    mc = HeptapodConfig(vocab_size=512, grid=(8, 8))
    assert VQTokens(512).tokenizer_problems(build_tokenizer("tiny-vq"), mc) == []
    assert "vocabulary" in VQTokens(512).tokenizer_problems(SimpleNamespace(vocab_size=1024), mc)[0]
    kc = HeptapodConfig(token_kind="kl", token_channels=4)
    assert KLTokens(4).tokenizer_problems(build_tokenizer("tiny-kl"), kc) == []
    assert "channels" in KLTokens(4).tokenizer_problems(SimpleNamespace(channels=16), kc)[0]
    assert KLTokens().tokenizer_meta(build_tokenizer("tiny-kl")) == {"scale_factor": build_tokenizer("tiny-kl").scale_factor}


def test_tokenizers_and_loaders_meet_the_protocol(tmp_path):
    "Our trained tokenizers, a checkpoint loaded back, and the LlamaGen / MAR loaders' outputs meet `Tokenizer`."
    vq, kl = build_tokenizer("tiny-vq"), build_tokenizer("tiny-kl")
    save_tokenizer(vq, tmp_path / "vq.safetensors")
    llama = load_llamagen_vq(save_ckpt(tmp_path / "l.pt", _small_vq_sd()), config=SMALL_VQ)
    mar = load_mar_kl(save_ckpt(tmp_path / "m.ckpt", _small_kl_sd()), config=SMALL_KL)
    for tok, proto in ((vq, DiscreteTokenizer), (kl, ContinuousTokenizer), (llama, DiscreteTokenizer),
                       (mar, ContinuousTokenizer), (load_tokenizer_as(tmp_path / "vq.safetensors"), DiscreteTokenizer)):
        assert isinstance(tok, Tokenizer) and isinstance(tok, proto), type(tok).__name__
        other = ContinuousTokenizer if proto is DiscreteTokenizer else DiscreteTokenizer
        assert not isinstance(tok, other)
        kind = token_kind(tok)
        assert kind.tokenizer_protocol is proto
        images = torch.rand(2, *tok.image_shape, generator=G()) * 2 - 1
        t = tok.encode(images)
        assert torch.equal(kind.to_grid(kind.check_grid(t, tok.grid), tok.grid), t)   # encode gives the kind's grids
        assert tok.decode(t).shape == images.shape
    assert not isinstance(SimpleNamespace(kind="vq", grid=(2, 2), image_shape=(1, 8, 8), device="cpu",
                                          encode=lambda x: x), Tokenizer)            # no decode
    assert set(TOKENIZER_FORMATS) == {"heptapod", "llamagen", "mar"}
    with pytest.raises(ValueError, match="tokenizer format must be one of"): load_tokenizer_as(tmp_path / "vq.safetensors", "ldm")


class _OffsetCodes(VQTokens):
    "A test-only third kind: codes like VQ, embedded through a table shifted by one (proves the registry is the only switch)."
    name = "vq-shifted"
    def embed(self, tok_emb, tok_BL): return tok_emb((tok_BL + 1) % self.vocab_size)


def test_a_new_kind_plugs_in_through_the_registry(monkeypatch):
    monkeypatch.setitem(TOKEN_KINDS, _OffsetCodes.name, _OffsetCodes)
    cfg = HeptapodConfig(token_kind=_OffsetCodes.name, vocab_size=7, grid=(2, 3), num_classes=2, dim=16, depth=1,
                         n_heads=2, head_width=16, head_depth=1, head_heads=2, order="random")
    torch.manual_seed(0); m = Heptapod(cfg).double()
    ref = Heptapod(cfg.replace(token_kind="vq")).double()
    assert type(m.kind) is _OffsetCodes
    with torch.no_grad():
        for p in m.head.parameters(): p.add_(0.1 * torch.randn_like(p))        # the head starts at zero: outputs would not depend on inputs
        ref.load_state_dict(m.state_dict())
        ref.tok_emb.weight.copy_(m.tok_emb.weight.roll(-1, 0))                 # ref embeds j as m embeds j + 1
    x = torch.randint(7, (3, 2, 3), generator=G())
    order = torch.stack([torch.randperm(6, generator=G(i)) for i in range(3)])
    torch.manual_seed(1); loss = m(x, [0, 1, 0], order=order)["loss"]
    torch.manual_seed(1); loss_ref = ref(x, [0, 1, 0], order=order)["loss"]
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)          # float64: the same sums
    tokens, tr = generate(m, [0, 1], seed=1, order="confidence", trace=True)
    assert tokens.shape == (2, 2, 3) and tr.kind == _OffsetCodes.name and torch.isfinite(tr[0].final_prob[~tr[0].seen]).all()


def test_no_kind_string_comparisons_outside_the_kind_module():
    "Model, sampler, evaluators, pictures, data and loaders ask the kind object; only tokens.py names the kinds."
    pkg = Path(heptapod_nb.__file__).parent
    # every module but tokens.py; tokenizer.py may name its kinds where it declares and validates them (the class
    # attribute `kind`, the presets, the TOKENIZERS registry, TokenizerConfig.validate), and the KL loss's "kl" entry
    for p in sorted(pkg.glob("*.py")):
        if p.name in ("tokens.py", "_modidx.py"): continue
        hits = [l for l in p.read_text().splitlines() if re.search(r"""(==|!=|\bin\b)\s*\(?\s*["'](vq|kl)["']""", l)]
        if p.name == "tokenizer.py": hits = [l for l in hits if "raise ConfigError" not in l]
        assert not hits, (p.name, hits)
