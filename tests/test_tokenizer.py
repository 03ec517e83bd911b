import math

import pytest
import torch
import torch.nn.functional as F

from heptapod_nb.config import ConfigError
from heptapod_nb.data import load_mnist5k
from heptapod_nb.tokenizer import (TOKENIZER_PRESETS, KLTokenizer, TokenizerConfig, VQTokenizer, VectorQuantizer,
                                   build_tokenizer, codebook_stats, load_tokenizer, psnr, save_tokenizer)
from heptapod_nb.tokenizer_losses import LPIPS, PatchDiscriminator, adaptive_weight, hinge_d_loss, recon_loss

# a narrower tiny architecture keeps these tests fast; the presets themselves are checked separately
SMALL = dict(ch=8, norm_groups=4, z_channels=8)


def small(kind="vq", **kw):
    torch.manual_seed(0)
    return build_tokenizer(TOKENIZER_PRESETS[f"tiny-{kind}"].replace(**SMALL, **kw))


@pytest.fixture(scope="module")
def mnist():
    return load_mnist5k("val").images[:8]


def test_presets_interface():
    vq, kl = build_tokenizer("tiny-vq"), build_tokenizer("tiny-kl")
    assert (vq.kind, vq.grid, vq.vocab_size, vq.image_shape) == ("vq", (8, 8), 512, (1, 32, 32))
    assert (kl.kind, kl.grid, kl.channels, kl.image_shape) == ("kl", (8, 8), 4, (1, 32, 32))
    assert isinstance(vq, VQTokenizer) and isinstance(kl, KLTokenizer)
    assert TOKENIZER_PRESETS["llamagen-vq16"].grid == (16, 16) and TOKENIZER_PRESETS["mar-kl16"].grid == (16, 16)


def test_config_errors():
    with pytest.raises(ConfigError, match="kind must be"):
        TokenizerConfig(kind="vae")
    with pytest.raises(ConfigError, match="norm_groups=8 does not divide"):
        TokenizerConfig(ch=12)
    with pytest.raises(ConfigError, match="not divisible"):
        TokenizerConfig(image_size=30)
    with pytest.raises(ConfigError, match="unknown preset"):
        build_tokenizer("tiny-vqq")
    with pytest.raises(ConfigError, match="needs kind='vq'"):
        VQTokenizer(TokenizerConfig(kind="kl"))


def test_vq_encode_decode_shapes_and_validation(mnist):
    tok = small("vq").eval()
    idx = tok.encode(mnist)
    assert idx.shape == (8, 8, 8) and idx.dtype == torch.int64 and 0 <= idx.min() and idx.max() < 512
    y = tok.decode(idx)
    assert y.shape == (8, 1, 32, 32) and y.min() >= -1 and y.max() <= 1
    with pytest.raises(ValueError, match="3 channels, this vq tokenizer expects 1"):
        tok.encode(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="28x28, this vq tokenizer expects 32x32"):
        tok.encode(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"scaled to \[-1, 1\]"):
        tok.encode(torch.full((1, 1, 32, 32), 255.0))
    with pytest.raises(ValueError, match="float tensor"):
        tok.encode(torch.zeros(1, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):
        tok.decode(torch.full((1, 8, 8), 512))
    with pytest.raises(ValueError, match=r"token grid must be \(B, 8, 8\)"):
        tok.decode(torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="probabilities must be"):
        tok.decode(torch.zeros(1, 8, 8))


def test_vq_decode_probabilities_is_expectation_in_code_space(mnist):
    tok = small("vq").eval()
    idx = tok.encode(mnist[:2])
    # exact on any IEEE CPU: p @ codebook with one-hot (or two 0.5) weights is a sum of at most two nonzero exact
    # products (x*1, x*0.5) and zeros, so it rounds like the direct expression, and the same decoder follows
    assert torch.equal(tok.decode(F.one_hot(idx, 512).float()), tok.decode(idx))
    # a 50/50 mixture decodes the mean of the two (normalised) code vectors
    p = 0.5 * F.one_hot(idx, 512).float() + 0.5 * F.one_hot((idx + 1) % 512, 512).float()
    e = tok.quantize.codebook()
    z = (0.5 * e[idx] + 0.5 * e[(idx + 1) % 512]).permute(0, 3, 1, 2)
    assert torch.equal(tok.decode(p), tok.decoder(tok.post_quant_conv(z)).clamp(-1, 1))


def test_straight_through_gradient_reaches_encoder(mnist):
    tok = small("vq").train()
    x_hat, info, idx = tok(mnist)
    F.mse_loss(x_hat, mnist).backward()             # reconstruction only: no codebook / commitment term
    g = tok.encoder.conv_in.weight.grad
    assert g is not None and g.abs().sum() > 0 and tok.quant_conv.weight.grad.abs().sum() > 0
    assert tok.quantize.embedding.weight.grad is None or tok.quantize.embedding.weight.grad.abs().sum() == 0
    # the codebook learns from the codebook loss, the encoder from the commitment loss
    tok.zero_grad()
    x_hat, info, idx = tok(mnist)
    info["codebook"].backward(retain_graph=True)
    assert tok.quantize.embedding.weight.grad.abs().sum() > 0 and tok.encoder.conv_in.weight.grad is None
    info["commit"].backward()
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0


def test_quantizer_nearest_forward_value_and_stats():
    torch.manual_seed(0)
    q = VectorQuantizer(K=16, D=4, l2_norm=True).train().double()      # float64: the reference is the code itself
    e = q.codebook().detach()
    z = (3.0 * e[[5, 5, 2, 9]]).reshape(1, 2, 2, 4).permute(0, 3, 1, 2)     # scaled codes: same directions
    zq, losses, idx = q(z)
    assert idx.flatten().tolist() == [5, 5, 2, 9]
    assert (zq.permute(0, 2, 3, 1).reshape(-1, 4) - e[[5, 5, 2, 9]]).abs().max() < 1e-12   # unit vectors
    assert losses["codebook"].item() < 1e-20                                # measured 4e-34 (float32: 1e-15) and q.counts.sum().item() == 4 and q.counts[5].item() == 2
    s = codebook_stats(torch.tensor([0, 0, 1, 1]), K=4)
    assert s["usage"] == 0.5 and math.isclose(s["perplexity"], 2.0, rel_tol=1e-6)
    s = codebook_stats(torch.arange(8), K=8)
    assert s["usage"] == 1.0 and math.isclose(s["perplexity"], 8.0, rel_tol=1e-6)


def test_dead_code_restart():
    torch.manual_seed(0)
    q = VectorQuantizer(K=8, D=4).train()
    q.counts[:] = torch.tensor([5.0, 3, 0, 0, 1, 0, 2, 0])
    before = q.embedding.weight.detach().clone()
    z = F.normalize(torch.randn(1, 4, 4, 4), dim=1) * 2
    n = q.restart_dead_codes(z, threshold=1.0)
    assert n == 4 and q.counts.sum() == 0
    w = q.embedding.weight.detach()
    live, dead = [0, 1, 4, 6], [2, 3, 5, 7]
    assert torch.equal(w[live], before[live]) and not torch.allclose(w[dead], before[dead])
    # re-seeded codes sit (up to 1% noise) on encoder outputs
    zs = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 4), dim=-1)
    cos = F.normalize(w[dead], dim=-1) @ zs.t()
    assert (cos.max(1).values > 0.99).all()


def test_kl_encode_mean_sample_and_scale(mnist):
    tok = small("kl").eval()
    z1, z2 = tok.encode(mnist), tok.encode(mnist)
    assert z1.shape == (8, 4, 8, 8) and z1.dtype == torch.float32 and torch.equal(z1, z2)
    s1 = tok.encode(mnist, sample=True, generator=torch.Generator().manual_seed(3))
    s2 = tok.encode(mnist, sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2) and not torch.equal(s1, z1)
    scaled = KLTokenizer(tok.config.replace(scale_factor=0.5)).eval()
    scaled.load_state_dict(tok.state_dict())
    assert torch.equal(scaled.encode(mnist), 0.5 * z1)                   # exact: scaling by 0.5 is exact in IEEE
    assert torch.equal(scaled.decode(scaled.encode(mnist)), tok.decode(z1))
    x_hat, info, z = tok.train()(mnist)
    assert x_hat.shape == mnist.shape and info["kl"].item() > 0
    with pytest.raises(ValueError, match=r"latents must be a float tensor \(B, 4, 8, 8\)"):
        tok.decode(torch.zeros(1, 8, 8, 8))


def test_save_load_round_trip_and_mismatch(tmp_path, mnist):
    for kind in ("vq", "kl"):
        tok = small(kind).eval()
        p = save_tokenizer(tok, tmp_path / f"{kind}.safetensors")
        assert p.with_suffix(".json").exists()
        tok2 = load_tokenizer(p)
        assert tok2.config == tok.config and not tok2.training
        assert torch.equal(tok2.decode(tok2.encode(mnist)), tok.decode(tok.encode(mnist)))   # same weights, same ops
    # a file whose tensors do not fit its config: every problem is listed
    from heptapod_nb.config import save_weights
    tok = small("vq")
    sd = dict(tok.state_dict()); sd.pop("decoder.conv_out.bias"); sd["bogus"] = torch.zeros(1)
    save_weights(tmp_path / "bad.safetensors", sd, tok.config, kind="tokenizer-vq")
    with pytest.raises(ConfigError, match=r"missing keys \(1\): decoder.conv_out.bias"):
        load_tokenizer(tmp_path / "bad.safetensors")
    save_weights(tmp_path / "nocfg.safetensors", tok.state_dict(), kind="tokenizer-vq")
    with pytest.raises(ConfigError, match="no tokenizer config"):
        load_tokenizer(tmp_path / "nocfg.safetensors")
    save_weights(tmp_path / "nokind.safetensors", tok.state_dict())            # not written as a tokenizer at all
    with pytest.raises(ConfigError, match="holds a '', expected a 'tokenizer-vq' or a 'tokenizer-kl'"):
        load_tokenizer(tmp_path / "nokind.safetensors")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.safetensors")


def test_losses_and_psnr():
    x = torch.zeros(2, 1, 4, 4)
    y = x.clone(); y[1] += 0.2                    # 0.1 on the [0, 1] scale -> MSE 0.01 -> 20 dB
    p = psnr(y, x)
    assert p[0] > 90 and math.isclose(p[1].item(), 20.0, rel_tol=1e-5)
    assert math.isclose(recon_loss(y, x, "l1").item(), 0.1, rel_tol=1e-5)
    assert math.isclose(recon_loss(y, x, "l2").item(), 0.02, rel_tol=1e-5)
    assert math.isclose(recon_loss(y, x, "l1+l2").item(), 0.12, rel_tol=1e-5)
    with pytest.raises(ValueError, match="reconstruction loss must be"):
        recon_loss(y, x, "huber")


def test_patchgan_and_adaptive_weight(mnist):
    torch.manual_seed(0)
    d = PatchDiscriminator(1, ch=8)
    logits = d(mnist)
    assert logits.shape[:2] == (8, 1) and logits.shape[2] > 1       # one logit per patch
    assert hinge_d_loss(torch.full((2,), 5.0), torch.full((2,), -5.0)).item() == 0.0
    tok = small("vq").train()
    x_hat, info, _ = tok(mnist)
    rec, g = recon_loss(x_hat, mnist), -d(x_hat).mean()
    w = adaptive_weight(rec, g, tok.decoder.last_layer)
    assert w.item() > 0 and not w.requires_grad


def _vgg_lpips_weights(path):
    "A random file in the torchvision vgg16 `features.*` + LPIPS `linN.model.1.weight` layout."
    g = torch.Generator().manual_seed(0)
    sd, c, i = {}, 3, 0
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]:
        if v == "M": i += 1; continue
        sd[f"features.{i}.weight"] = torch.randn(v, c, 3, 3, generator=g) * (2 / (9 * c)) ** 0.5
        sd[f"features.{i}.bias"] = torch.zeros(v); c = v; i += 2
    for k, w in enumerate((64, 128, 256, 512, 512)):
        sd[f"lin{k}.model.1.weight"] = torch.rand(1, w, 1, 1, generator=g)
    torch.save(sd, path)
    return path


def test_lpips_from_local_weights(tmp_path, mnist):
    lp = LPIPS(_vgg_lpips_weights(tmp_path / "vgg_lpips.pth"))
    d_same, d_diff = lp(mnist[:2], mnist[:2]), lp(mnist[:2], mnist[2:4])
    assert d_same.shape == (2,) and (d_same == 0).all() and (d_diff > 0).all()   # identical features: exactly 0
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        LPIPS(tmp_path / "none.pth")
    sd = torch.load(tmp_path / "vgg_lpips.pth"); sd.pop("lin4.model.1.weight")
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(ConfigError, match="lins.4.weight"):
        LPIPS(tmp_path / "partial.pth")


def test_each_kind_answers_for_itself_in_training(mnist):
    "What the trainers ask a tokenizer (objective, stats, restarts, DDP fingerprint), answered by the class: no kind ladders."
    from heptapod_nb.tokenizer import TOKENIZERS
    assert TOKENIZERS == {"vq": VQTokenizer, "kl": KLTokenizer}
    small = dict(ch=8, norm_groups=4, z_channels=8)
    vq, kl = build_tokenizer(TOKENIZER_PRESETS["tiny-vq"].replace(**small)), build_tokenizer(TOKENIZER_PRESETS["tiny-kl"].replace(**small))
    x = mnist[:4]
    x_hat, info, idx = vq(x)
    rec = F.mse_loss(x_hat, x)
    assert vq.training_loss(rec, info, x).item() == (rec + info["codebook"] + info["commit"]).item()
    assert vq.batch_stats(idx) == {"batch_usage": codebook_stats(idx, 512)["usage"]}
    assert vq.token_stats(idx) == codebook_stats(idx, 512) and vq.fingerprint_weight() is vq.quantize.embedding.weight
    assert isinstance(vq.restart_dead_codes(info, 1.0), int) and not vq.has_scale_factor
    vq.reset_code_counts(); assert vq.quantize.counts.sum() == 0
    torch.manual_seed(0); x_hat, info, z = kl(x)
    rec = F.mse_loss(x_hat, x)
    assert kl.training_loss(rec, info, x).item() == (rec + kl.config.kl_weight * info["kl"] / x[0].numel()).item()
    assert kl.batch_stats(z) == {} and kl.token_stats(z) == {} and kl.restart_dead_codes(info) is None
    assert kl.has_scale_factor and kl.fingerprint_weight() is kl.encoder.conv_in.weight
    assert torch.equal(vq.encode(x, sample=True), vq.encode(x))          # VQ codes do not depend on `sample`
