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
