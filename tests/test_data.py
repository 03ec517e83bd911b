import warnings
import numpy as np
import pytest
import torch
from PIL import Image

from heptapod_nb.config import ConfigError
from heptapod_nb.data import (ImageFolderDataset, TokenDataset, check_image_channels, load_digits8, load_mnist5k,
                              stratified_split, image_grid)


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
        (tmp_path / c).mkdir(parents=True)
        Image.fromarray(np.random.RandomState(0).randint(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / c / "x.jpg")
    return tmp_path


def test_image_folder_crop_and_labels(tmp_path):
    ds = ImageFolderDataset(_folder(tmp_path), size=32, flip=True)
    assert ds.classes == ["a", "b"] and len(ds) == 2
    x, y = ds[1]
    assert x.shape == (3, 32, 32) and y == 1 and -1 <= x.min() and x.max() <= 1


def _truncated_png(path):
    "A PNG whose header is fine but whose pixel data stops half-way (fails only when decoded)."
    import io
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(1).randint(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    path.write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])


def test_unreadable_file_stops_at_construction_by_name_or_is_skipped_and_listed(tmp_path):
    root = _folder(tmp_path)
    (root / "b" / "corrupt_123.JPEG").write_bytes(b"\xff\xd8\xff\xe0garbage")
    (root / "b" / "empty.png").write_bytes(b"")
    with pytest.raises(OSError, match="corrupt_123.JPEG.*1 more unreadable.*skip_bad"):
        ImageFolderDataset(root, size=32)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = ImageFolderDataset(root, size=32, skip_bad=True)
    assert len(ds) == 2 and sorted(p.split("/")[-1] for p in ds.skipped) == ["corrupt_123.JPEG", "empty.png"]
    assert any("skipping 2 unreadable" in str(m.message) and "corrupt_123.JPEG" in str(m.message) for m in w)
    assert ds[1][0].shape == (3, 32, 32)


def test_file_that_fails_only_when_decoded(tmp_path):
    root = _folder(tmp_path)
    _truncated_png(root / "b" / "trunc.png")
    ds = ImageFolderDataset(root, size=32)                      # the header reads fine
    i = [k for k, (p, _) in enumerate(ds.samples) if p.name == "trunc.png"][0]
    with pytest.raises(OSError, match="trunc.png"):
        ds[i]
    ds = ImageFolderDataset(root, size=32, skip_bad=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        x, y = ds[i]
    assert x.shape == (3, 32, 32) and ds.skipped == [str(root / "b" / "trunc.png")]
    assert any("trunc.png" in str(m.message) for m in w)


def test_hidden_folders_and_files_are_ignored(tmp_path):
    root = _folder(tmp_path)
    (root / ".ipynb_checkpoints").mkdir()
    (root / "a" / "._x.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    ds = ImageFolderDataset(root, size=32)
    assert ds.classes == ["a", "b"] and len(ds) == 2


def test_empty_class_folder_warns_by_name_and_keeps_labels(tmp_path):
    root = _folder(tmp_path)
    (root / "a_empty").mkdir()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = ImageFolderDataset(root, size=32)
    assert ds.classes == ["a", "a_empty", "b"] and ds.num_classes == 3 and ds.empty_classes == ["a_empty"]
    assert [y for _, y in ds.samples] == [0, 2]                  # b keeps label 2, as in a folder where a_empty has images
    msgs = [str(m.message) for m in w]
    assert any("a_empty" in m and "no readable images" in m for m in msgs)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ImageFolderDataset(_folder(tmp_path / "full"), size=32)
    assert not [m for m in w if "no readable images" in str(m.message)]


def _save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_16bit_grayscale_scaled_to_8bit(tmp_path):
    v = np.array([0, 257, 1000, 32768, 65279, 65535], dtype=np.uint16)
    img = np.tile(np.repeat(v, 4), (24, 1))                                     # 24 x 24, six 4-pixel columns
    _save(tmp_path / "c" / "x16.png", img)
    _save(tmp_path / "c" / "x16.tif", img.astype(">u2"))                         # big-endian I;16B
    _save(tmp_path / "c" / "xi.tif", img.astype(np.int32))                       # mode I (older Pillow's 16-bit PNG)
    with Image.open(tmp_path / "c" / "x16.png") as im:
        assert im.mode == "I;16" and np.array(im.convert("L")).max() == 255     # PIL alone: clipped (white)
    ds = ImageFolderDataset(tmp_path, size=24)
    assert ds.channels == 1 and len(ds) == 3
    want = np.round(v.astype(np.float64) / 257)                                 # float64 reference: 0 1 4 128 254 255
    for i in range(3):
        x, _ = ds[i]
        assert x.shape == (1, 24, 24)
        levels = ((x[0, 0, ::4].double() + 1) * 127.5).round().numpy()
        np.testing.assert_array_equal(levels, want)


def test_channel_detection_and_conversion(tmp_path):
    g = tmp_path / "gray"
    _save(g / "a" / "l.png", np.full((20, 20), 100, np.uint8))
    _save(g / "a" / "la.png", np.full((20, 20, 2), 100, np.uint8))             # grey + alpha
    pal = Image.fromarray(np.zeros((20, 20), np.uint8)).convert("P")       # palette of greys
    (g / "b").mkdir(); pal.save(g / "b" / "p.png")
    _save(g / "b" / "x16.png", np.full((20, 20), 40000, np.uint16))
    ds = ImageFolderDataset(g, size=16)
    assert ds.detected_channels == ds.channels == 1 and all(ds[i][0].shape == (1, 16, 16) for i in range(len(ds)))
    assert ImageFolderDataset(g, size=16, channels=3)[0][0].shape == (3, 16, 16)
    _save(g / "b" / "red.png", np.full((20, 20, 3), [255, 0, 0], np.uint8))   # one RGB image makes the folder RGB
    ds = ImageFolderDataset(g, size=16)
    assert ds.channels == 3 and ds.examples[3].name == "red.png" and ds[0][0].shape == (3, 16, 16)
    ds1 = ImageFolderDataset(g, size=16, channels=1)
    i = [k for k, (p, _) in enumerate(ds1.samples) if p.name == "red.png"][0]
    assert ds1[i][0].shape == (1, 16, 16) and round((ds1[i][0][0, 0, 0].item() + 1) * 127.5) == 76   # ITU-R 601 luma of red
    with pytest.raises(ValueError, match="channels must be 1"):
        ImageFolderDataset(g, channels=2)


def test_check_image_channels_names_the_option(tmp_path):
    rgb = ImageFolderDataset(_folder(tmp_path), size=16)
    check_image_channels(rgb, 3)
    with pytest.raises(ConfigError, match=r"holds RGB images \(e\.g\. .*x\.jpg\) but the tokenizer takes 1 channel.*--channels 1"):
        check_image_channels(rgb, 1)
    with pytest.raises(ConfigError, match=r"\(--channels 1\) but the tokenizer takes 3: pass --channels 3"):
        check_image_channels(ImageFolderDataset(tmp_path, size=16, channels=1), 3)
    with pytest.raises(ConfigError, match="mnist5k/val images have 1 channel"):
        check_image_channels(load_mnist5k("val"), 3)


def test_empty_folder_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "cls").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "f.png").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="got a file"):
        ImageFolderDataset(tmp_path / "f.png")


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


def test_worker_error_keeps_the_last_line_and_the_type():
    "A DataLoader worker's re-raised error (its message is the worker's traceback) -> its last line, same type."
    from heptapod_nb.data import worker_error
    tb = ("Caught OSError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
          "  File \"x.py\", line 3, in f\n    raise OSError(...)\nOSError: cannot read img/trunc.png: truncated\n")
    e = worker_error(OSError(tb))
    assert type(e) is OSError and str(e) == "cannot read img/trunc.png: truncated"
    plain = ValueError("Caught nothing: no worker here")
    assert worker_error(plain) is plain
