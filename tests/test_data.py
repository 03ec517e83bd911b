import warnings
import numpy as np
import pytest
import torch
from PIL import Image

from heptapod_nb.data import (ImageFolderDataset, TokenDataset, load_digits8, load_mnist5k, stratified_split,
                              image_grid)


def test_mnist5k_shapes_ranges_labels():
    tr, va = load_mnist5k("train"), load_mnist5k("val")
    assert (len(tr), len(va)) == (4500, 500)
    for ds in (tr, va):
        assert ds.images.shape[1:] == (1, 32, 32) and ds.images.dtype == torch.float32
        assert ds.images.min().item() == -1.0 and ds.images.max().item() <= 1.0
        assert ds.labels.dtype == torch.int64
    assert torch.bincount(tr.labels).tolist() == [450] * 10
    assert torch.bincount(va.labels).tolist() == [50] * 10


def test_mnist5k_split_deterministic_and_disjoint():
    a, b = load_mnist5k("val"), load_mnist5k("val")
    assert torch.equal(a.images, b.images)
    full = load_mnist5k("all").images.flatten(1)
    tr, va = stratified_split(load_mnist5k("all").labels.numpy(), 50)
    assert len(np.intersect1d(tr, va)) == 0 and len(np.union1d(tr, va)) == 5000
    assert torch.equal(full[va], a.images.flatten(1))


def test_digits8():
    tr, va = load_digits8("train"), load_digits8("val")
    assert tr.images.shape[1:] == (1, 8, 8) and len(tr) + len(va) == 1797 and len(va) == 150
    assert tr.images.min() >= -1 and tr.images.max() <= 1
    with pytest.raises(ValueError, match="split must be"):
        load_digits8("test")


def _folder(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.fromarray(np.random.RandomState(0).randint(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / c / "x.jpg")
    return tmp_path


def test_image_folder_crop_and_labels(tmp_path):
    ds = ImageFolderDataset(_folder(tmp_path), size=32, flip=True)
    assert ds.classes == ["a", "b"] and len(ds) == 2
    x, y = ds[1]
    assert x.shape == (3, 32, 32) and y == 1 and -1 <= x.min() and x.max() <= 1


def test_corrupt_jpeg_is_reported_by_name(tmp_path):
    root = _folder(tmp_path)
    (root / "b" / "corrupt_123.JPEG").write_bytes(b"\xff\xd8\xff\xe0garbage")
    ds = ImageFolderDataset(root, size=32)
    i = [k for k, (p, _) in enumerate(ds.samples) if p.name == "corrupt_123.JPEG"][0]
    with pytest.raises(OSError, match="corrupt_123.JPEG"):
        ds[i]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        x, _ = ImageFolderDataset(root, size=32, skip_bad=True)[i]
    assert x.shape == (3, 32, 32) and any("corrupt_123.JPEG" in str(m.message) for m in w)


def test_empty_folder_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "cls").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageFolderDataset(tmp_path / "nope")


def test_token_dataset_roundtrip_and_incomplete(tmp_path):
    meta = TokenDataset.create(tmp_path, n=4, kind="kl", grid=(2, 2), num_classes=3, channels=5)
    with pytest.raises(ValueError, match="incomplete"):
        TokenDataset(tmp_path)
    codes = np.load(tmp_path / "codes.npy", mmap_mode="r+"); codes[:] = 1.5; codes.flush()
    TokenDataset.write_meta(tmp_path, {**meta, "done": 4})
    ds = TokenDataset(tmp_path)
    x, y = ds[2]
    assert x.shape == (5, 2, 2) and x.dtype == torch.float32 and float(x[0, 0, 0]) == 1.5
    assert ds.kind == "kl" and ds.grid == (2, 2) and ds.channels == 5


def test_image_grid():
    g = image_grid(torch.zeros(5, 1, 4, 4), nrow=3, pad=1)
    assert g.shape == (2 * 5 + 1, 3 * 5 + 1, 3) and g.dtype == np.uint8
