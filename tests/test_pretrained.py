"""Loaders for LlamaGen's VQ-16 and MAR's KL-16: state dicts built here in the *published* layout (names and shapes
enumerated from the public model code, independently of our modules), random weights, and a functional reference
forward pass written against those published names, so a wrong renaming cannot pass by having the right shapes."""
import argparse

import pytest
import torch
import torch.nn.functional as F

from heptapod_nb.config import ConfigError
from heptapod_nb.pretrained import load_llamagen_vq, load_mar_kl, llamagen_to_ours, ours_to_llamagen, read_checkpoint
from heptapod_nb.tokenizer import TOKENIZER_PRESETS, TokenizerConfig


# ---------------------------------------------------------------- published layouts (name -> shape)
def _res(p, cin, cout):
    d = {f"{p}.norm1.weight": (cin,), f"{p}.norm1.bias": (cin,), f"{p}.conv1.weight": (cout, cin, 3, 3),
         f"{p}.conv1.bias": (cout,), f"{p}.norm2.weight": (cout,), f"{p}.norm2.bias": (cout,),
         f"{p}.conv2.weight": (cout, cout, 3, 3), f"{p}.conv2.bias": (cout,)}
    if cin != cout: d.update({f"{p}.nin_shortcut.weight": (cout, cin, 1, 1), f"{p}.nin_shortcut.bias": (cout,)})
    return d


def _attn(p, c):
    d = {f"{p}.norm.weight": (c,), f"{p}.norm.bias": (c,)}
    for n in ("q", "k", "v", "proj_out"): d.update({f"{p}.{n}.weight": (c, c, 1, 1), f"{p}.{n}.bias": (c,)})
    return d


def _conv(p, cout, cin, k): return {f"{p}.weight": (cout, cin, k, k), f"{p}.bias": (cout,)}


def llamagen_layout(ch=128, ch_mult=(1, 1, 2, 2, 4), nrb=2, z=256, K=16384, D=8, cin=3):
    "LlamaGen tokenizer/tokenizer_image/vq_model.py VQModel: encoder/decoder `conv_blocks.i.res.j`, `mid.0/1/2`."
    L, d = len(ch_mult), {}
    d.update(_conv("encoder.conv_in", ch, cin, 3))
    c = ch
    for i, m in enumerate(ch_mult):
        for j in range(nrb):
            d.update(_res(f"encoder.conv_blocks.{i}.res.{j}", c, ch * m)); c = ch * m
            if i == L - 1: d.update(_attn(f"encoder.conv_blocks.{i}.attn.{j}", c))
        if i != L - 1: d.update(_conv(f"encoder.conv_blocks.{i}.downsample.conv", c, c, 3))
    for e in ("encoder", "decoder"):
        cm = ch * ch_mult[-1]
        d.update(_res(f"{e}.mid.0", cm, cm)); d.update(_attn(f"{e}.mid.1", cm)); d.update(_res(f"{e}.mid.2", cm, cm))
    d.update({"encoder.norm_out.weight": (c,), "encoder.norm_out.bias": (c,)}); d.update(_conv("encoder.conv_out", z, c, 3))
    c = ch * ch_mult[-1]
    d.update(_conv("decoder.conv_in", c, z, 3))
    for k, i in enumerate(reversed(range(L))):          # decoder block 0 is the deepest level
        for j in range(nrb + 1):
            d.update(_res(f"decoder.conv_blocks.{k}.res.{j}", c, ch * ch_mult[i])); c = ch * ch_mult[i]
            if i == L - 1: d.update(_attn(f"decoder.conv_blocks.{k}.attn.{j}", c))
        if i != 0: d.update(_conv(f"decoder.conv_blocks.{k}.upsample.conv", c, c, 3))
    d.update({"decoder.norm_out.weight": (c,), "decoder.norm_out.bias": (c,)}); d.update(_conv("decoder.conv_out", cin, c, 3))
    d.update({"quantize.embedding.weight": (K, D), "quantize.codebook_used": (65536,)})
    d.update(_conv("quant_conv", D, z, 1)); d.update(_conv("post_quant_conv", z, D, 1))
    return d


def mar_layout(ch=128, ch_mult=(1, 1, 2, 2, 4), nrb=2, C=16, cin=3):
    "MAR models/vae.py AutoencoderKL (LDM names): attention in the encoder's last level only, double_z."
    L, d = len(ch_mult), {}
    d.update(_conv("encoder.conv_in", ch, cin, 3))
    c = ch
    for i, m in enumerate(ch_mult):
        for j in range(nrb):
            d.update(_res(f"encoder.down.{i}.block.{j}", c, ch * m)); c = ch * m
            if i == L - 1: d.update(_attn(f"encoder.down.{i}.attn.{j}", c))
        if i != L - 1: d.update(_conv(f"encoder.down.{i}.downsample.conv", c, c, 3))
    for e in ("encoder", "decoder"):
        cm = ch * ch_mult[-1]
        d.update(_res(f"{e}.mid.block_1", cm, cm)); d.update(_attn(f"{e}.mid.attn_1", cm)); d.update(_res(f"{e}.mid.block_2", cm, cm))
    d.update({"encoder.norm_out.weight": (c,), "encoder.norm_out.bias": (c,)}); d.update(_conv("encoder.conv_out", 2 * C, c, 3))
    c = ch * ch_mult[-1]
    d.update(_conv("decoder.conv_in", c, C, 3))
    for i in reversed(range(L)):
        for j in range(nrb + 1):
            d.update(_res(f"decoder.up.{i}.block.{j}", c, ch * ch_mult[i])); c = ch * ch_mult[i]
        if i != 0: d.update(_conv(f"decoder.up.{i}.upsample.conv", c, c, 3))
    d.update({"decoder.norm_out.weight": (c,), "decoder.norm_out.bias": (c,)}); d.update(_conv("decoder.conv_out", cin, c, 3))
    d.update(_conv("quant_conv", 2 * C, 2 * C, 1)); d.update(_conv("post_quant_conv", C, C, 1))
    return d


def random_sd(layout, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, s in layout.items():
        if k.endswith("codebook_used"): sd[k] = torch.zeros(s); continue
        if ".norm" in k and k.endswith(".weight"): t = 1 + 0.1 * torch.randn(s, generator=g)
        elif k.endswith(".bias"): t = 0.05 * torch.randn(s, generator=g)
        elif k == "quantize.embedding.weight": t = torch.randn(s, generator=g)
        else: t = torch.randn(s, generator=g) * (1.0 / (s[1] * s[2] * s[3])) ** 0.5
        sd[k] = t.to(dtype)
    return sd


def save_ckpt(path, sd, **extra):
    torch.save({"model": sd, **extra}, path)
    return path


# ---------------------------------------------------------------- functional reference forward (published names)
def _gn(x, sd, p): return F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)
def _c(x, sd, p, **kw): return F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], **kw)


def ref_res(x, sd, p):
    h = _c(F.silu(_gn(x, sd, p + ".norm1")), sd, p + ".conv1", padding=1)
    h = _c(F.silu(_gn(h, sd, p + ".norm2")), sd, p + ".conv2", padding=1)
    return (_c(x, sd, p + ".nin_shortcut") if p + ".nin_shortcut.weight" in sd else x) + h


def ref_attn(x, sd, p):
    B, C, H, W = x.shape
    h = _gn(x, sd, p + ".norm")
    q, k, v = (_c(h, sd, f"{p}.{n}").reshape(B, C, H * W) for n in "qkv")
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * C ** -0.5, dim=-1)
    return x + _c(torch.einsum("bij,bcj->bci", w, v).reshape(B, C, H, W), sd, p + ".proj_out")


def ref_stage(h, sd, p, nblocks):
    for j in range(nblocks):
        h = ref_res(h, sd, f"{p}.{'res' if 'conv_blocks' in p else 'block'}.{j}")
        if f"{p}.attn.{j}.q.weight" in sd: h = ref_attn(h, sd, f"{p}.attn.{j}")
    return h


def ref_llamagen(x, sd, L, nrb):
    "Reconstruction through encoder -> l2-normalised nearest code -> decoder, reading LlamaGen's names."
    h = _c(x, sd, "encoder.conv_in", padding=1)
    for i in range(L):
        h = ref_stage(h, sd, f"encoder.conv_blocks.{i}", nrb)
        if i != L - 1: h = _c(F.pad(h, (0, 1, 0, 1)), sd, f"encoder.conv_blocks.{i}.downsample.conv", stride=2)
    h = ref_res(ref_attn(ref_res(h, sd, "encoder.mid.0"), sd, "encoder.mid.1"), sd, "encoder.mid.2")
    z = _c(_c(F.silu(_gn(h, sd, "encoder.norm_out")), sd, "encoder.conv_out", padding=1), sd, "quant_conv")
    zn = F.normalize(z.permute(0, 2, 3, 1), dim=-1)
    e = F.normalize(sd["quantize.embedding.weight"], dim=-1)
    idx = torch.cdist(zn.reshape(-1, e.shape[1]), e).argmin(-1).reshape(zn.shape[:3])
    h = _c(_c(e[idx].permute(0, 3, 1, 2), sd, "post_quant_conv"), sd, "decoder.conv_in", padding=1)
    h = ref_res(ref_attn(ref_res(h, sd, "decoder.mid.0"), sd, "decoder.mid.1"), sd, "decoder.mid.2")
    for k in range(L):
        h = ref_stage(h, sd, f"decoder.conv_blocks.{k}", nrb + 1)
        if k != L - 1: h = _c(F.interpolate(h, scale_factor=2.0, mode="nearest"), sd, f"decoder.conv_blocks.{k}.upsample.conv", padding=1)
    return idx, _c(F.silu(_gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out", padding=1)


def ref_mar(x, sd, L, nrb):
    "(posterior mean, decoding of the mean), reading LDM / MAR names."
    h = _c(x, sd, "encoder.conv_in", padding=1)
    for i in range(L):
        h = ref_stage(h, sd, f"encoder.down.{i}", nrb)
        if i != L - 1: h = _c(F.pad(h, (0, 1, 0, 1)), sd, f"encoder.down.{i}.downsample.conv", stride=2)
    h = ref_res(ref_attn(ref_res(h, sd, "encoder.mid.block_1"), sd, "encoder.mid.attn_1"), sd, "encoder.mid.block_2")
    moments = _c(_c(F.silu(_gn(h, sd, "encoder.norm_out")), sd, "encoder.conv_out", padding=1), sd, "quant_conv")
    mean = moments.chunk(2, dim=1)[0]
    h = _c(_c(mean, sd, "post_quant_conv"), sd, "decoder.conv_in", padding=1)
    h = ref_res(ref_attn(ref_res(h, sd, "decoder.mid.block_1"), sd, "decoder.mid.attn_1"), sd, "decoder.mid.block_2")
    for i in reversed(range(L)):
        h = ref_stage(h, sd, f"decoder.up.{i}", nrb + 1)
        if i != 0: h = _c(F.interpolate(h, scale_factor=2.0, mode="nearest"), sd, f"decoder.up.{i}.upsample.conv", padding=1)
    return mean, _c(F.silu(_gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out", padding=1)


# small versions of the published architectures (same structure, GroupNorm(32)): 16x16 RGB -> 4x4
SMALL_VQ = TOKENIZER_PRESETS["llamagen-vq16"].replace(image_size=16, ch=32, ch_mult=[1, 1, 2], num_res_blocks=1,
                                                       z_channels=32, codebook_size=64)
SMALL_KL = TOKENIZER_PRESETS["mar-kl16"].replace(image_size=16, ch=32, ch_mult=[1, 1, 2], num_res_blocks=1)


def _small_vq_sd(): return random_sd(llamagen_layout(32, (1, 1, 2), 1, 32, 64, 8), dtype=torch.float64)
def _small_kl_sd(): return random_sd(mar_layout(32, (1, 1, 2), 1, 16), dtype=torch.float64)


def test_key_renaming_round_trip_and_examples():
    assert llamagen_to_ours("decoder.conv_blocks.0.res.2.conv1.weight", 5) == "decoder.up.4.block.2.conv1.weight"
    assert llamagen_to_ours("encoder.conv_blocks.4.attn.1.q.bias", 5) == "encoder.down.4.attn.1.q.bias"
    assert llamagen_to_ours("encoder.mid.1.proj_out.weight", 5) == "encoder.mid.attn_1.proj_out.weight"
    assert llamagen_to_ours("decoder.conv_blocks.3.upsample.conv.weight", 5) == "decoder.up.1.upsample.conv.weight"
    for k in llamagen_layout():
        assert ours_to_llamagen(llamagen_to_ours(k, 5), 5) == k


def test_llamagen_matches_reference_forward(tmp_path):
    sd = _small_vq_sd()
    tok = load_llamagen_vq(save_ckpt(tmp_path / "vq.pt", sd, args=argparse.Namespace(lr=1e-4)), config=SMALL_VQ)
    tok = tok.double()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    idx_ref, rec_ref = ref_llamagen(x, sd, 3, 1)
    idx = tok.encode(x)
    assert idx.shape == (2, 4, 4) and torch.equal(idx, idx_ref)
    torch.testing.assert_close(tok.decode(idx), rec_ref.clamp(-1, 1))   # float64 reference, float64 tolerances (1e-7)
    # probabilities that are one-hot decode exactly like the indices (x*1 + zeros: exact in IEEE arithmetic)
    assert torch.equal(tok.decode(F.one_hot(idx, 64).double()), tok.decode(idx))


def test_mar_matches_reference_forward(tmp_path):
    sd = _small_kl_sd()
    sd_with_loss = {**sd, "loss.discriminator.main.0.weight": torch.zeros(3)}   # LDM training losses are dropped
    tok = load_mar_kl(save_ckpt(tmp_path / "kl.ckpt", sd_with_loss), config=SMALL_KL).double()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1
    mean_ref, rec_ref = ref_mar(x, sd, 3, 1)
    z = tok.encode(x)
    assert z.shape == (2, 16, 4, 4)
    torch.testing.assert_close(z, mean_ref * 0.2325)                   # float64 reference, float64 tolerances (1e-7)
    torch.testing.assert_close(tok.decode(z), rec_ref.clamp(-1, 1))


@pytest.mark.parametrize("which", ["vq", "kl"])
def test_mismatched_checkpoint_lists_every_problem(tmp_path, which):
    sd = _small_vq_sd() if which == "vq" else _small_kl_sd()
    bad = dict(sd)
    missing = "encoder.conv_blocks.1.res.0.conv2.bias" if which == "vq" else "encoder.down.1.block.0.conv2.bias"
    del bad[missing]
    bad["encoder.extra_layer.weight"] = torch.zeros(3)
    bad["quant_conv.weight"] = torch.zeros(7, 7, 1, 1)
    load = load_llamagen_vq if which == "vq" else load_mar_kl
    cfg = SMALL_VQ if which == "vq" else SMALL_KL
    with pytest.raises(ConfigError) as e:
        load(save_ckpt(tmp_path / "bad.pt", bad), config=cfg)
    msg = str(e.value)
    assert "missing keys (1)" in msg and "unexpected keys (1)" in msg and "encoder.extra_layer.weight" in msg
    assert "quant_conv.weight: (7, 7, 1, 1)" in msg
    assert ("encoder.down.1.block.0.conv2.bias" in msg)          # named as our module calls it


def test_checkpoint_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_llamagen_vq(tmp_path / "nope.pt")
    torch.save({"state_dict": {"a": torch.zeros(1)}, "epoch": 3}, tmp_path / "x.pt")
    with pytest.raises(ConfigError, match="no state dict under 'model'"):
        read_checkpoint(tmp_path / "x.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        read_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(ConfigError, match="needs 'vq' tokens"):
        load_llamagen_vq(tmp_path / "x.pt", config=TOKENIZER_PRESETS["tiny-kl"])


@pytest.mark.parametrize("which", ["vq", "kl"])
def test_full_size_published_checkpoint_256(tmp_path, which):
    "The real architecture at 256x256 (batch 1): loads strictly, 16x16 grid, deterministic encode, RGB decode."
    torch.manual_seed(0)
    if which == "vq":
        sd = random_sd(llamagen_layout())
        tok = load_llamagen_vq(save_ckpt(tmp_path / "vq_ds16_c2i.pt", sd))
    else:
        sd = random_sd(mar_layout())
        tok = load_mar_kl(save_ckpt(tmp_path / "kl16.ckpt", sd))
    del sd
    assert tok.grid == (16, 16) and tok.image_shape == (3, 256, 256) and not tok.training
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    t1, t2 = tok.encode(x), tok.encode(x)
    if which == "vq":
        assert t1.shape == (1, 16, 16) and t1.dtype == torch.int64 and tok.vocab_size == 16384
        assert torch.equal(t1, t2)
    else:
        assert t1.shape == (1, 16, 16, 16)[:1] + (16, 16, 16) and tok.channels == 16
        assert torch.equal(t1, t2)
    y = tok.decode(t1)
    assert y.shape == (1, 3, 256, 256) and y.min() >= -1 and y.max() <= 1 and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="expects 256x256"):
        tok.encode(torch.zeros(1, 3, 128, 128))
