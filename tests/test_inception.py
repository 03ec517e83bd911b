"""inception: the FID InceptionV3 (pytorch-fid's layout, loaded from a local file), FID/IS plumbing, the ADM `.npz`."""
import copy

import numpy as np
import pytest
import torch

from heptapod_nb import inception
from heptapod_nb.config import ConfigError, images_to_uint8
from heptapod_nb.inception import (InceptionV3, inception_metrics, load_inception, load_npz_images, load_ref_stats,
                                   save_npz, save_ref_stats)
from test_metrics import _ref_frechet                     # the float64 Frechet reference (tests/ is on sys.path)


# ---------------------------------------------------------------- Inception: pytorch-fid's layout, independently written

def _conv(cout, cin, kh, kw=None):
    return (cout, cin, kh, kh if kw is None else kw)

def _fid_inception_layout() -> dict:
    "Conv shapes of pytorch-fid's FID InceptionV3 (unit name -> conv weight shape), plus fc, from the published design."
    L = {"Conv2d_1a_3x3": _conv(32, 3, 3), "Conv2d_2a_3x3": _conv(32, 32, 3), "Conv2d_2b_3x3": _conv(64, 32, 3),
         "Conv2d_3b_1x1": _conv(80, 64, 1), "Conv2d_4a_3x3": _conv(192, 80, 3)}
    for name, cin, pf in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        L |= {f"{name}.branch1x1": _conv(64, cin, 1), f"{name}.branch5x5_1": _conv(48, cin, 1),
              f"{name}.branch5x5_2": _conv(64, 48, 5), f"{name}.branch3x3dbl_1": _conv(64, cin, 1),
              f"{name}.branch3x3dbl_2": _conv(96, 64, 3), f"{name}.branch3x3dbl_3": _conv(96, 96, 3),
              f"{name}.branch_pool": _conv(pf, cin, 1)}
    L |= {"Mixed_6a.branch3x3": _conv(384, 288, 3), "Mixed_6a.branch3x3dbl_1": _conv(64, 288, 1),
          "Mixed_6a.branch3x3dbl_2": _conv(96, 64, 3), "Mixed_6a.branch3x3dbl_3": _conv(96, 96, 3)}
    for name, c in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        L |= {f"{name}.branch1x1": _conv(192, 768, 1), f"{name}.branch7x7_1": _conv(c, 768, 1),
              f"{name}.branch7x7_2": _conv(c, c, 1, 7), f"{name}.branch7x7_3": _conv(192, c, 7, 1),
              f"{name}.branch7x7dbl_1": _conv(c, 768, 1), f"{name}.branch7x7dbl_2": _conv(c, c, 7, 1),
              f"{name}.branch7x7dbl_3": _conv(c, c, 1, 7), f"{name}.branch7x7dbl_4": _conv(c, c, 7, 1),
              f"{name}.branch7x7dbl_5": _conv(192, c, 1, 7), f"{name}.branch_pool": _conv(192, 768, 1)}
    L |= {"Mixed_7a.branch3x3_1": _conv(192, 768, 1), "Mixed_7a.branch3x3_2": _conv(320, 192, 3),
          "Mixed_7a.branch7x7x3_1": _conv(192, 768, 1), "Mixed_7a.branch7x7x3_2": _conv(192, 192, 1, 7),
          "Mixed_7a.branch7x7x3_3": _conv(192, 192, 7, 1), "Mixed_7a.branch7x7x3_4": _conv(192, 192, 3)}
    for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        L |= {f"{name}.branch1x1": _conv(320, cin, 1), f"{name}.branch3x3_1": _conv(384, cin, 1),
              f"{name}.branch3x3_2a": _conv(384, 384, 1, 3), f"{name}.branch3x3_2b": _conv(384, 384, 3, 1),
              f"{name}.branch3x3dbl_1": _conv(448, cin, 1), f"{name}.branch3x3dbl_2": _conv(384, 448, 3),
              f"{name}.branch3x3dbl_3a": _conv(384, 384, 1, 3), f"{name}.branch3x3dbl_3b": _conv(384, 384, 3, 1),
              f"{name}.branch_pool": _conv(192, cin, 1)}
    return L

def _random_fid_state_dict(seed=0, counters=True) -> dict:
    "A random state dict in the `pt_inception-2015-12-05` layout (conv.weight + bn.{weight,bias,running_*})."
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for unit, shape in _fid_inception_layout().items():
        fan_in = shape[1] * shape[2] * shape[3]
        sd[f"{unit}.conv.weight"] = torch.randn(shape, generator=g) * (2 / fan_in) ** 0.5
        c = shape[0]
        sd[f"{unit}.bn.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        sd[f"{unit}.bn.bias"] = 0.1 * torch.randn(c, generator=g)
        sd[f"{unit}.bn.running_mean"] = 0.1 * torch.randn(c, generator=g)
        sd[f"{unit}.bn.running_var"] = 1 + 0.1 * torch.rand(c, generator=g)
        if counters: sd[f"{unit}.bn.num_batches_tracked"] = torch.tensor(0)
    sd["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.02
    sd["fc.bias"] = torch.zeros(1008)
    return sd


def test_inception_layout_matches_pytorch_fid():
    net = InceptionV3()
    assert len(_fid_inception_layout()) == 94
    ref = {k for k in _random_fid_state_dict()}
    assert set(net.state_dict()) == ref
    # torchvision's inception_v3 has 27,161,264 parameters; minus AuxLogits (3,326,696), plus 8 more classes (16,392)
    assert sum(p.numel() for p in net.parameters()) == 27_161_264 - 3_326_696 + 16_392


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-test.pth"
    torch.save(_random_fid_state_dict(), p)
    return p


def test_inception_load_round_trip_shapes_determinism(inception_file, tmp_path):
    net = load_inception(inception_file)
    sd = _random_fid_state_dict()
    for k in ("Mixed_7c.branch_pool.conv.weight", "Mixed_6e.branch7x7dbl_5.bn.running_var", "fc.weight"):
        assert torch.equal(net.state_dict()[k], sd[k])
    assert not net.training
    x = torch.rand(2, 3, 64, 64) * 2 - 1                                # resized to 299 x 299 inside
    with torch.no_grad():
        pool1, logits1 = net(x)
        pool2, _ = net(x[:1])                                           # batch-size independent, deterministic
        pool64, logits64 = copy.deepcopy(net).double()(x.double())      # the float64 reference
    assert pool1.shape == (2, 2048) and logits1.shape == (2, 1008) and pool64.dtype == torch.float64
    assert torch.isfinite(pool1).all() and (pool1 >= 0).all()           # pooled ReLU outputs
    # float32 vs float64, relative to the largest value: measured 4.8e-7 (pool, max 1.9) and 7.8e-7 (logits); bound 1e-4
    for got, ref in ((pool1, pool64), (pool2, pool64[:1]), (logits1, logits64)):
        assert (got.double() - ref).abs().max() < 1e-4 * ref.abs().max()
    # IS logits: softmax weights, no bias (the bias is 0 in this file, so check with a nonzero one too)
    assert (logits64 - pool64 @ sd["fc.weight"].double().T).abs().max() < 1e-12 * logits64.abs().max()
    net.fc.bias.data.fill_(5.0)
    with torch.no_grad(): assert torch.equal(net(x)[1], logits1)
    # a file without the BN step counters (older PyTorch) loads as well, as does safetensors
    from safetensors.torch import save_file
    st = tmp_path / "inc.safetensors"; save_file(_random_fid_state_dict(counters=False), str(st))
    assert torch.equal(load_inception(st).state_dict()["fc.weight"], sd["fc.weight"])


def test_inception_refuses_wrong_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_inception(tmp_path / "nowhere.pth")
    sd = _random_fid_state_dict()
    sd["fc.weight"] = torch.zeros(1000, 2048); sd.pop("Mixed_5b.branch1x1.conv.weight"); sd["AuxLogits.fc.weight"] = torch.zeros(1)
    p = tmp_path / "bad.pth"; torch.save(sd, p)
    with pytest.raises(ConfigError) as e:
        load_inception(p)
    msg = str(e.value)
    assert "Mixed_5b.branch1x1.conv.weight" in msg and "AuxLogits.fc.weight" in msg and "fc.weight" in msg
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="unreadable"):
        load_inception(tmp_path / "junk.pth")


def test_inception_metrics_end_to_end(inception_file, tmp_path, monkeypatch):
    # scipy's sqrtm of a 2048 x 2048 matrix takes minutes on a busy 2-core CPU; the Frechet formula itself is tested
    # in tests/test_metrics.py, here the plumbing is: use the eigendecomposition reference inside inception_metrics
    monkeypatch.setattr(inception, "frechet_distance", _ref_frechet)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    samples = save_npz(imgs, tmp_path / "s.npz")
    ref = save_ref_stats(tmp_path / "ref.npz", np.zeros(2048), np.eye(2048))
    out = inception_metrics(samples, ref, inception_file, splits=2)
    assert set(out) == {"fid", "inception_score", "inception_score_std", "n"} and out["n"] == 4
    assert np.isfinite(out["fid"]) and out["inception_score"] >= 1.0
    with pytest.raises(FileNotFoundError, match="no_ref.npz"):
        inception_metrics(samples, tmp_path / "no_ref.npz", inception_file)


# ---------------------------------------------------------------- ADM npz

def test_npz_format(tmp_path):
    grey = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8)
    p = save_npz(grey, tmp_path / "a" / "samples.npz")
    with np.load(p) as z:
        assert z.files == ["arr_0"]
        x = z["arr_0"]
    assert x.dtype == np.uint8 and x.shape == (2, 8, 8, 3)
    assert (x == grey[..., None]).all()
    assert (load_npz_images(p) == x).all()
    f = torch.tensor([[[[-1.0, 1.0], [0.0, 0.5]]]])                     # (1, 1, 2, 2) in [-1, 1]
    u = images_to_uint8(f)
    assert u.shape == (1, 2, 2, 3) and u[0, :, :, 0].tolist() == [[0, 255], [128, 191]]
    with pytest.raises(ValueError, match="uint8"):
        save_npz(x.astype(np.float32), tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", images=x)
    with pytest.raises(ValueError, match="arr_0"):
        load_npz_images(tmp_path / "c.npz")
    assert not list(tmp_path.glob("**/*.tmp"))


def test_ref_stats_from_adm_style_file(tmp_path):
    np.savez(tmp_path / "VIRTUAL_test.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=np.ones(3), sigma=np.eye(3))
    mu, sigma = load_ref_stats(tmp_path / "VIRTUAL_test.npz")
    assert mu.tolist() == [1, 1, 1] and sigma.shape == (3, 3)
    with pytest.raises(FileNotFoundError, match="missing_ref.npz"):
        load_ref_stats(tmp_path / "missing_ref.npz")
