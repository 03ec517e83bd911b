from dataclasses import dataclass

import pytest
import torch

from heptapod_nb.config import (Config, ConfigError, apply_overrides, check_state_dict, get_preset, load_weights,
                                save_weights)


@dataclass
class C(Config):
    n: int = 2
    window: int | str = "global"
    def validate(self):
        if self.n < 1: raise ConfigError("n must be >= 1")


def test_strict_config():
    with pytest.raises(ConfigError, match=r"unknown C keys \['m'\]"):
        C.from_dict({"m": 1})
    with pytest.raises(ConfigError, match="C.n"):
        C(n=1.5)
    with pytest.raises(ConfigError, match="n must be"):
        apply_overrides(C(), ["n=0"])
    assert apply_overrides(C(), ["window=4"]).window == 4


def test_config_file_roundtrip(tmp_path):
    C(n=5).save(tmp_path / "c.json")
    assert C.load(tmp_path / "c.json") == C(n=5)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        C.load(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text('["steps=5"]')       # issue 24: a JSON list gave a traceback
    with pytest.raises(ConfigError, match="holds a JSON list, not an object of C keys"):
        C.load(tmp_path / "list.json")
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset({"a": C()}, "z")


def test_weights_atomic_and_checked(tmp_path):
    m = torch.nn.Linear(4, 3)
    p = save_weights(tmp_path / "w.safetensors", m, C(), kind="lin")
    first = p.read_bytes()
    sd, cfg = load_weights(p, kind="lin")
    assert C.from_dict(cfg) == C() and torch.equal(sd["bias"], m.bias)
    with pytest.raises(ConfigError, match=r"missing keys \(1\): bias"):
        check_state_dict(m, {"weight": sd["weight"]})
    with pytest.raises(ConfigError, match="unexpected keys"):
        check_state_dict(m, {**sd, "extra": torch.zeros(1)})
    # a truncated file is refused with a clear error
    (tmp_path / "t.safetensors").write_bytes(first[: len(first) // 2])
    with pytest.raises(ConfigError, match="corrupt"):
        load_weights(tmp_path / "t.safetensors")
    assert not list(tmp_path.glob("*.tmp"))


def test_atomic_save_keeps_the_old_file_on_error(tmp_path):
    from heptapod_nb.config import atomic_save
    p = atomic_save(tmp_path / "d" / "f.pt", lambda f: torch.save({"a": torch.ones(2)}, f))
    assert torch.equal(torch.load(p, weights_only=True)["a"], torch.ones(2))
    def half(f): f.write(b"partial"); raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"): atomic_save(p, half)
    assert torch.equal(torch.load(p, weights_only=True)["a"], torch.ones(2)) and sorted(x.name for x in p.parent.iterdir()) == ["f.pt"]


def test_to_uint8_matches_the_float64_rounding():
    from heptapod_nb.config import to_uint8
    x = torch.linspace(-1.2, 1.2, 1001)
    ref = ((x.double().clamp(-1, 1) + 1) * 127.5).round()
    got = to_uint8(x)
    assert got.dtype == torch.uint8 and (got.double() - ref).abs().max() <= 1    # float32 vs float64 at exact .5 ties only
    assert to_uint8(torch.tensor([-1.0, 1.0])).tolist() == [0, 255]


def test_renamed_keys_load_with_one_line_each(capsys):
    from dataclasses import dataclass
    from heptapod_nb.config import Config, apply_overrides
    @dataclass
    class C(Config):
        steps: int = 1
        lr: float = 1.0
        min_lr: float = 0.0
        RENAMED = {"max_steps": "steps", "min_lr_ratio": ("min_lr", lambda v, d: v * d["lr"])}
    c = apply_overrides(C(lr=2.0), ["max_steps=5", "min_lr_ratio=0.25"])
    assert (c.steps, c.lr, c.min_lr) == (5, 2.0, 0.5)
    err = capsys.readouterr().err.splitlines()
    assert err == ["heptapod_nb: deprecated: C key 'max_steps' is now 'steps'",
                   "heptapod_nb: deprecated: C key 'min_lr_ratio' is now 'min_lr' (converted)"]


def _rewrite(path, fn):
    "Rewrite a safetensors file's JSON header with `fn(header)` (the data bytes untouched), as a hand edit would."
    import json, struct
    from pathlib import Path
    blob = Path(path).read_bytes(); n = struct.unpack("<Q", blob[:8])[0]
    hdr = json.loads(blob[8:8 + n]); fn(hdr)
    new = json.dumps(hdr).encode(); new += b" " * (-len(new) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(new)) + new + blob[8 + n:])


def test_model_files_that_lie_are_refused(tmp_path):
    """Issue 24: a model file whose stored config was edited (n_heads 6 -> 3: the same weights read as another
    network), or whose header swaps two tensors' offsets (every data byte intact), loaded cleanly and sampled other
    images when the checksum covered tensor bytes only; both are refused now, and so are NaN weights (save and load)."""
    import json
    from heptapod_nb.model import Heptapod, HeptapodConfig, load_model, save_model
    torch.manual_seed(0)
    m = Heptapod(HeptapodConfig(dim=48, depth=1, n_heads=6, head_width=32, head_heads=4, head_depth=1))
    p = save_model(m, tmp_path / "m.safetensors")
    load_model(p)                                                            # the file as saved loads

    def edit_config(h):
        cfg = json.loads(h["__metadata__"]["config"]); cfg["n_heads"] = 3; h["__metadata__"]["config"] = json.dumps(cfg)
    _rewrite(p, edit_config)
    with pytest.raises(ConfigError, match="fails its checksum"): load_model(p)

    p = save_model(m, tmp_path / "m.safetensors")
    sd = m.state_dict()
    pairs = [(x, y) for x in sd for y in sd if x < y and sd[x].shape == sd[y].shape and sd[x].dtype == sd[y].dtype
             and not torch.equal(sd[x], sd[y])]
    a, b = pairs[0]

    def swap(h): h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]
    _rewrite(p, swap)
    assert torch.equal(load_weights(p, verify=False)[0][a], sd[b])           # the swap took: the names now lie
    with pytest.raises(ConfigError, match="fails its checksum"): load_model(p)

    with torch.no_grad(): m.head.out.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="head.out.weight holds NaN"): save_model(m, tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()
