"""The semantics probe (heptapod_nb.probe, bench/probe.py): the linear probe reads a label that the features hold and
not one they do not; the IS analogue and coverage have their textbook values; backbone states are the model's own
and see no later token; the commitment curves keep the prefix and end at 1; the benchmark resumes and refuses; the
equal-FLOPs benchmark (bench/equal_flops.py) counts, allots and records training FLOPs."""
import importlib.util, json, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from heptapod_nb.sample import generate
from heptapod_nb.model import Heptapod, HeptapodConfig
from heptapod_nb.ablation import next_position_ce
from heptapod_nb.targets import select_targets
from heptapod_nb.probe import (backbone_states, ce_by_position, class_coverage, commitment_curves, mnist_is, probe_accuracy,
                               probe_model, probe_steps, probe_table, quality_metrics, step_cost, summarize_probe)

ROOT = Path(__file__).resolve().parents[1]


def _model(window="global", M=2, num_classes=0, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = HeptapodConfig(vocab_size=16, grid=(8, 8), num_classes=num_classes, dim=32, depth=2, n_heads=2, head_width=32,
                         head_depth=1, head_heads=2, window=window, targets_per_step=M, **kw)
    return Heptapod(cfg).eval()


# ---- the probe ------------------------------------------------------------------------------------------------
def _features(n, d, rng, labels=None):
    X = rng.normal(size=(n, d))
    if labels is not None: X[np.arange(n), labels] += 4.0               # the label as a bump on one coordinate
    return X

def test_probe_reads_a_label_the_features_hold_and_not_noise():
    rng = np.random.default_rng(0)
    ytr, yva = rng.integers(0, 10, 600), rng.integers(0, 10, 500)
    acc = probe_accuracy(_features(600, 32, rng, ytr), ytr, _features(500, 32, rng, yva), yva)
    # a bump of 4 sd on the label's coordinate: a linear read-out is near perfect (measured 1.000)
    assert acc > 0.95
    chance = probe_accuracy(_features(600, 32, rng), ytr, _features(500, 32, rng), yva)
    # noise: chance is 0.1 and the sd of a val accuracy over 500 digits is sqrt(.1 * .9 / 500) = 0.013; 0.2 is 7 sd
    assert chance < 0.2
    with pytest.raises(ValueError, match="labels"): probe_accuracy(np.zeros((5, 2)), [0, 1], np.zeros((3, 2)), [0, 1, 0])
    with pytest.raises(ValueError, match="same d"): probe_accuracy(np.zeros((5, 2)), [0, 1, 0, 1, 0], np.zeros((3, 4)), [0, 1, 0])
    with pytest.raises(ValueError, match="NaN"):
        probe_accuracy(np.full((4, 2), np.nan), [0, 1, 0, 1], np.zeros((2, 2)), [0, 1])


def test_is_analogue_and_coverage_have_their_textbook_values():
    for C in (4, 10):
        eye = torch.eye(C, dtype=torch.float64)
        assert mnist_is(eye.repeat(5, 1)) == pytest.approx(C, rel=1e-12)            # confident and balanced: C
        assert mnist_is(eye[[1] * 7]) == pytest.approx(1.0, rel=1e-12)               # one class: 1
        assert mnist_is(torch.full((6, C), 1 / C, dtype=torch.float64)) == pytest.approx(1.0, rel=1e-12)
        assert class_coverage(eye.repeat(3, 1)) == pytest.approx(1.0) and class_coverage(eye[[2] * 4]) == pytest.approx(1 / C)
    # random rows against a float64 reference written another way: exp(H(mean p) - mean H(p))
    p = torch.rand(50, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) ** 3
    p /= p.sum(1, keepdim=True)
    H = lambda q: -(q * q.log()).sum(-1)
    assert mnist_is(p) == pytest.approx(float((H(p.mean(0)) - H(p).mean()).exp()), rel=1e-12)
    # coverage: two classes read 3:1 -> exp(entropy) = exp(-(.75 ln .75 + .25 ln .25)) of 4 classes
    q = torch.eye(4, dtype=torch.float64)[[0, 0, 0, 1]]
    assert class_coverage(q) == pytest.approx(float(np.exp(-(.75 * np.log(.75) + .25 * np.log(.25)))) / 4, rel=1e-12)
    with pytest.raises(ValueError, match="sum to 1"): mnist_is(torch.ones(3, 4))


class _ReadOnePosition(nn.Module):
    "A stand-in classifier: class = the token at flat position `pos` of a (B, 1, 8, 8) 'image' of token ids, mod C."
    def __init__(self, pos: int, C: int = 4):
        super().__init__(); self.pos, self.C, self.dummy = pos, C, nn.Parameter(torch.zeros(()))
    def forward(self, x):
        return 10.0 * nn.functional.one_hot(x.flatten(1)[:, self.pos].long() % self.C, self.C).float()

class _TokensAsImage:
    "A stand-in decoder: the token grid itself as a one-channel image."
    def decode(self, tokens): return tokens[:, None].float()


def test_quality_metrics_without_fid_use_the_classifier_readings():
    imgs = torch.arange(8)[:, None, None, None].expand(8, 1, 8, 8).float()      # token 0..7 everywhere -> classes 0..3 twice
    q = quality_metrics(_ReadOnePosition(0), imgs, fid=False)
    assert set(q) == {"mnist_is", "mean_conf", "coverage"}
    # logits 10 vs 0: p(y|x) is one-hot to 1.4e-4, so the IS is 4 to 0.2% (measured 3.9943)
    assert q["coverage"] == pytest.approx(1.0) and q["mnist_is"] == pytest.approx(4.0, rel=5e-3)
    assert 0.99 < q["mean_conf"] <= 1.0


# ---- states ---------------------------------------------------------------------------------------------------
def test_states_are_the_models_own_and_see_no_later_token():
    m = _model()
    x = torch.randint(16, (7, 8, 8), generator=torch.Generator().manual_seed(1))
    st = backbone_states(m, x, steps=[0, 8, 16, 32, 63], batch_size=3)          # batches of 3: the batching is checked too
    with torch.no_grad():
        ref = m.states(x.flatten(1), torch.zeros(7, dtype=torch.long), torch.arange(64).expand(7, 64)).double()
    # float32 states of norm ~1 computed in batches of 3 vs 7: equal to float32 rounding (measured max 0 to 3e-7)
    for t in (0, 8, 16, 32, 63): np.testing.assert_allclose(st[f"t{t}"], ref[:, t].numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(st["mean"], ref.mean(1).numpy(), atol=1e-5, rtol=0)
    # h_t has seen the first t tokens: changing token t (raster) leaves h_t as it was and moves h_{t+1}
    t = 8
    y = x.clone(); y.view(7, 64)[:, t] = (y.view(7, 64)[:, t] + 1) % 16
    sy = backbone_states(m, y, steps=[t, t + 1], batch_size=3)
    np.testing.assert_allclose(sy[f"t{t}"], st[f"t{t}"], atol=1e-5, rtol=0)
    assert np.abs(sy[f"t{t + 1}"] - backbone_states(m, x, steps=[t + 1])[f"t{t + 1}"]).max() > 1e-3
    assert probe_steps(64) == [8, 16, 32, 63]
    with pytest.raises(ValueError, match="unconditional"): backbone_states(_model(num_classes=10), x)
    with pytest.raises(ValueError, match=r"\[0, 63\]"): backbone_states(m, x, steps=[64])


# ---- commitment curves ----------------------------------------------------------------------------------------
def _random_head(m, seed=5):
    "Random head weights instead of the zero-initialised output (whose tied logits make argmax meaningless)."
    g = torch.Generator().manual_seed(seed)
    for p in m.head.parameters(): p.data.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m

def test_commitment_curves_keep_the_prefix_and_end_at_one():
    dec = _TokensAsImage()
    # the classifier reads position 0: once the first token is seen, guess and greedy completion both hold it (and
    # before it, the greedy completion draws the same first token for every sample: agreement below 1)
    for m in (_random_head(_model("global", 2)), _random_head(_model(1, 1))):
        cv = commitment_curves(m, dec, _ReadOnePosition(0), n=12, seed=3, steps=[0, 1, 2])
        assert cv["steps"] == [0, 1, 2, 64] and cv["n"] == 12
        x = generate(m, batch=12, seed=3).flatten(1)                      # the same samples: the majority share of their readings
        assert cv["majority"] == pytest.approx(float(torch.bincount(x[:, 0] % 4).max()) / 12, abs=5e-5)   # stored to 4 decimals
        assert cv["greedy"][1:] == [1.0, 1.0, 1.0] and cv["greedy"][0] < 1
        if m.config.window == "global": assert cv["guess"][1:] == [1.0, 1.0, 1.0]
        else: assert cv["guess"] is None                                   # next-token: no whole-image guess
        assert cv["plain_s"] >= 0 and cv["greedy_s"] >= 0 and (cv["trace_s"] is not None) == (cv["guess"] is not None)
    # reading the last position, with a head made non-degenerate (random weights instead of its zero-initialised
    # output): the guess after t tokens is the argmax of the head's prediction there, which `predict_remaining`
    # computes another way (a full causal pass instead of the sampler's KV cache)
    from heptapod_nb.sample import predict_remaining
    m = _random_head(_model("global", 2))
    cv = commitment_curves(m, dec, _ReadOnePosition(63), n=40, seed=0, steps=[0, 30, 62], greedy=False)
    x = generate(m, batch=40, seed=0).flatten(1)
    want = []
    for t in (0, 30, 62):
        pred = predict_remaining(m, x.view(40, 8, 8), t)
        assert (pred.positions[:, -1] == 63).all()
        want.append(float((pred.logits[:, -1].argmax(-1) % 4 == x[:, 63] % 4).double().mean()))
    assert 0 < min(want) and max(want) < 1                           # the check can fail both ways
    assert cv["guess"] == [pytest.approx(w) for w in want] + [1.0] and cv["greedy"] is None
    with pytest.raises(ValueError, match="steps"): commitment_curves(m, dec, _ReadOnePosition(0), n=2, steps=[64])


# ---- diagnosis ------------------------------------------------------------------------------------------------
def test_ce_by_position_against_a_float64_reference_one_step_at_a_time():
    # next-token head with random weights (non-degenerate logits), in float64: position p's CE recomputed from a
    # forward pass that supervises step p alone, and the token read from the grid directly
    m = _random_head(_model(1, 1)).double()
    x = torch.randint(16, (6, 8, 8), generator=torch.Generator().manual_seed(2))
    got = ce_by_position(m, x, batch_size=4)
    order = torch.arange(64).expand(6, 64)
    want = []
    for p in range(64):
        with torch.no_grad():
            logits = m(x, None, order=order, targets=select_targets(order, 1, 1, steps=[p]), return_outputs=True)["outputs"]
        want.append(float(nn.functional.cross_entropy(logits[:, 0, 0], x.flatten(1)[:, p]).double()))
    assert got.shape == (64,) and got.dtype == np.float64
    assert np.ptp(want) > 0.5                                       # the positions differ: a shuffled result would fail
    np.testing.assert_allclose(got, want, rtol=1e-10)               # float64 both ways (measured max rel 2e-16)
    # a global head with random extra targets: same draws as next_position_ce, so the mean is its value
    g = _random_head(_model("global", 2)).double()
    zeros = torch.zeros(6, dtype=torch.long)
    assert ce_by_position(g, x, batch_size=4).mean() == pytest.approx(next_position_ce(g, x, zeros, batch_size=4), rel=1e-10)
    with pytest.raises(ValueError, match="batch_size"): ce_by_position(m, x, batch_size=0)
    kl = _model(1, 1, token_kind="kl", token_channels=4)
    with pytest.raises(ValueError, match="needs VQ tokens"): ce_by_position(kl, torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="needs VQ tokens"): commitment_curves(kl, _TokensAsImage(), _ReadOnePosition(0), n=2)


def test_step_cost_ranks_a_dearer_config_and_checks_its_input():
    cfg = lambda **kw: _model(**kw).config
    x = torch.randint(16, (8, 8, 8), generator=torch.Generator().manual_seed(0))
    c = step_cost({"w1": cfg(window=1, M=1), "wide": cfg(window=1, M=1).replace(dim=256, head_width=256)}, x,
                  batch_size=8, steps=2, rounds=3)
    assert c["w1"]["ratio"] == 1.0 and c["w1"]["ratio_min"] == 1.0
    # dim 32 -> 256: ~50x the backbone FLOPs; measured ratio 6-12x on one busy core (small kernels), so 2x is safe
    assert c["wide"]["ratio"] > 2 and c["wide"]["ratio_min"] <= c["wide"]["ratio"] <= c["wide"]["ratio_max"]
    assert c["wide"]["s_per_step"] > c["w1"]["s_per_step"] > 0
    with pytest.raises(ValueError, match="at least one"): step_cost({}, x)
    with pytest.raises(ValueError, match="token grids"): step_cost({"w1": cfg(window=1, M=1)}, x, batch_size=9)


# ---- registry, tables, benchmark ------------------------------------------------------------------------------
def test_probe_configs_are_unconditional_and_named_like_the_ablation():
    # the registry's configs were measured with the prefix head (before "last" became the default): pinned unless named
    assert probe_model("w1") == dict(next_weight=1.0, head_context="prefix", window=1, targets_per_step=1, num_classes=0)
    assert probe_model("w1_last")["head_context"] == "last" and probe_model("global_m2_nw8_mlp")["head_type"] == "mlp"
    assert probe_model("global_m2_nw8")["next_weight"] == 8.0 and probe_model("global_nw8")["targets_per_step"] == 4
    with pytest.raises(ValueError, match="unknown probe config"): probe_model("w3")
    with pytest.raises(ValueError, match="unconditional"): probe_model("x", dict(window=1, num_classes=10))


def _run(name, seed, probe):
    r = dict(name=name, seed=seed, steps=3, train_s=1.0, val_next_ce=3.0, mnist_fid=40.0 + seed, mnist_is=2.0,
             mean_conf=0.8, coverage=0.9, greedy_mean=0.5)
    for k in ("t8", "t16", "t32", "t63", "mean"): r[f"probe_{k}"], r[f"floor_probe_{k}"] = probe, 0.5
    return r


def test_summary_and_table():
    rows = summarize_probe([_run("global", 0, 0.6), _run("w1", 0, 0.7), _run("my_head", 0, 0.6), _run("w1", 1, 0.8)])
    assert [(r["name"], r["seeds"]) for r in rows] == [("w1", 2), ("global", 1), ("my_head", 1)]    # registry order
    assert rows[0]["probe_mean"] == pytest.approx(0.75) and rows[0]["probe_mean_std"] == pytest.approx(np.std([0.7, 0.8], ddof=1))
    assert rows[0]["floor_probe_t8"] == 0.5 and "guess_mean" not in rows[0]
    t = probe_table(rows)
    assert "probe t8" in t and "0.750 +- 0.071 (0.50)" in t and t.count("\n") == 4
    with pytest.raises(ValueError, match="different step counts"): summarize_probe([_run("w1", 0, 0.7), dict(_run("w1", 1, 0.7), steps=4)])


def _bench():
    spec = importlib.util.spec_from_file_location("bench_probe", ROOT / "bench" / "probe.py")
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m


@pytest.mark.parametrize("script", ["bench/probe.py", "bench/grid16.py", "bench/equal_flops.py"])
def test_bench_help_does_not_import_torch(script):
    code = (f"import runpy, sys; sys.argv = ['{script}', '--help']\n"
            f"try: runpy.run_path('{script}', run_name='__main__')\nexcept SystemExit as e: assert e.code == 0\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage:" in out.stdout and out.stdout.strip().endswith("False"), out.stderr


def test_bench_resumes_and_refuses_other_settings(tmp_path, capsys, monkeypatch):
    import heptapod_nb.ablation as abl
    monkeypatch.setattr(abl, "ablation_tokens", lambda root, tok, progress=False: Path(root))     # no extraction
    pb, out = _bench(), tmp_path / "p.json"
    settings = dict(steps=3, batch=4, lr=2e-3, samples=10, curve_samples=0, probe_n=0, temperature=1.0, tokenizer=None,
                    classifier=None)
    out.write_text(json.dumps(dict(settings=settings, runs=[_run(n, s, 0.6) for n in ("w1", "global") for s in (0, 1)])))
    args = ["--steps", "3", "--batch", "4", "--samples", "10", "--curve_samples", "0", "--configs", "w1,global",
            "--seeds", "0,1", "--tokens", str(tmp_path / "tok"), "--out", str(out)]
    assert pb.main(args) == 0                                     # everything is done already: nothing is trained
    text = capsys.readouterr().out
    assert "0 runs to do (4 already" in text and "| w1 | 3 | 2 |" in text
    before = out.read_text()
    assert pb.main([a if a != "3" else "5" for a in args]) == 2   # other steps: refused in one line, file untouched
    err = capsys.readouterr().err
    assert err.startswith("bench/probe.py: error:") and "other settings" in err and err.count("\n") == 1
    assert out.read_text() == before
    assert pb.main(args[:-4] + ["--configs", "w3", "--out", str(out)]) == 2 and "unknown config" in capsys.readouterr().err


def test_bench_diagnose_writes_ce_by_row_of_kept_models(tmp_path, capsys, monkeypatch):
    import heptapod_nb.ablation as abl, heptapod_nb.probe as pr
    from heptapod_nb.model import save_model
    monkeypatch.setattr(abl, "ablation_tokens", lambda root, tok, progress=False: Path(root))
    x = torch.randint(16, (5, 8, 8), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(pr, "token_grids", lambda root, split: (x, torch.zeros(5, dtype=torch.long)))
    keep = tmp_path / "keep"; keep.mkdir()
    models = {("w1_last", 0): _random_head(_model(1, 1), 1), ("w1_last", 1): _random_head(_model(1, 1), 2),
              ("global_m2_nw8", 0): _random_head(_model("global", 2), 3)}
    for (n, s), m in models.items(): save_model(m, keep / f"{n}_s{s}.safetensors")
    out = tmp_path / "d.json"
    assert _bench().main(["--diagnose", str(keep), "--tokens", str(tmp_path / "tok"), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [(r["name"], r["seed"]) for r in doc["runs"]] == [("global_m2_nw8", 0), ("w1_last", 0), ("w1_last", 1)]
    for r in doc["runs"]:
        ce = ce_by_position(models[(r["name"], r["seed"])], x)
        # the file holds the library's numbers rounded to 5 decimals; rows are means of 8 positions
        np.testing.assert_allclose(r["ce_by_position"], ce, atol=1e-5)
        np.testing.assert_allclose(r["ce_by_row"], ce.reshape(8, 8).mean(1), atol=1e-5)
    s = {r["name"]: r for r in doc["summary"]}
    assert s["w1_last"]["seeds"] == 2 and s["w1_last"]["ce_by_row"] == pytest.approx(
        np.mean([doc["runs"][1]["ce_by_row"], doc["runs"][2]["ce_by_row"]], 0), abs=1e-5)
    # a second call resumes: the runs in the file are kept (not recomputed), a new model is added
    doc["runs"][0]["ce_by_row"][0] = 99.0; out.write_text(json.dumps(doc))
    save_model(models[("w1_last", 0)], keep / "w1_s0.safetensors")
    assert _bench().main(["--diagnose", str(keep), "--tokens", str(tmp_path / "tok"), "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["runs"][0]["ce_by_row"][0] == 99.0 and [r["name"] for r in again["runs"]] == ["global_m2_nw8", "w1", "w1_last", "w1_last"]
    empty = tmp_path / "empty"; empty.mkdir()
    assert _bench().main(["--diagnose", str(empty), "--tokens", str(tmp_path / "tok"), "--out", str(out)]) == 2
    assert "no NAME_sSEED" in capsys.readouterr().err


# ---- the 16x16-grid miniature (bench/grid16.py) ---------------------------------------------------------------
def _grid16():
    spec = importlib.util.spec_from_file_location("bench_grid16", ROOT / "bench" / "grid16.py")
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m


def test_grid16_summary_groups_mode_and_config_and_checks_its_arguments(capsys):
    g = _grid16()
    runs = [dict(mode="uncond", name="w1", seed=s, steps=3, train_s=10.0 + s, probe_mean=0.5 + 0.1 * s, mnist_fid=30.0) for s in (0, 1)]
    runs += [dict(mode="cond", name="w1", seed=0, steps=3, train_s=9.0, class_acc=0.8, mnist_fid=20.0, params={"total": 1})]
    rows = g.summarize16(runs)
    assert [(r["mode"], r["name"], r["seeds"]) for r in rows] == [("uncond", "w1", 2), ("cond", "w1", 1)]
    assert rows[0]["probe_mean"] == pytest.approx(0.55) and rows[0]["probe_mean_std"] == pytest.approx(np.std([0.5, 0.6], ddof=1))
    assert "seed" not in rows[0] and "params" not in rows[1] and rows[1]["class_acc"] == 0.8
    t = g.table16(rows)
    assert "| uncond | w1 | 3 | 2 | 0.550 +- 0.071 | - |" in t and "| cond | w1 | 3 | 1 | - | 0.800 |" in t
    for bad, msg in ((["--modes", "both"], "unknown mode"), (["--configs", "w3"], "unknown config"), (["--samples", "15"], "multiple of 10")):
        assert g.main(bad) == 2 and msg in capsys.readouterr().err


def test_gpu_bench_grid16_section_passes_its_defaults_and_the_users_options(capsys):
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec); spec.loader.exec_module(gpu)
    assert gpu.main(["grid16", "--modes", "both"]) == 2                  # the user's option reaches grid16's checks
    assert "unknown mode(s) both" in capsys.readouterr().err
    assert "--out" in gpu.GPU_GRID16 and gpu.GPU_GRID16[gpu.GPU_GRID16.index("--out") + 1] == "bench/results/grid16_gpu.json"


def test_grid16_jobs_dispatch_modes_and_pass_registry_heads_to_the_conditional_ablation(monkeypatch):
    import heptapod_nb.ablation as abl, heptapod_nb.probe as pr
    calls = []
    monkeypatch.setattr(pr, "run_probe", lambda name, seed, **kw: calls.append(("probe", name, seed, kw)) or dict(name=name, _model=1))
    monkeypatch.setattr(abl, "run_ablation", lambda name, seed, model=None, **kw: calls.append(("abl", name, model, kw)) or dict(name=name))
    kw = dict(common=dict(steps=3), uncond=dict(probe_n=7), cond=dict(evals=2))
    g = _grid16()
    r = g._job(("uncond", "w1", 0, kw)); r.pop("device", None)                     # (the GPU's name, on a GPU machine)
    assert r == dict(name="w1", mode="uncond")                                         # private keys dropped, mode added
    assert g._job(("cond", "w16", 1, kw))["mode"] == "cond"
    g._job(("cond", "global_m2_nw8_d96", 1, kw))
    assert calls[0] == ("probe", "w1", 0, dict(steps=3, probe_n=7))
    assert calls[1] == ("abl", "w16", None, dict(steps=3, evals=2))                     # an ablation name: its own registry
    assert calls[2][2] == dict(window="global", targets_per_step=2, next_weight=8.0, dim=96)   # a probe-only config


def test_bench_cost_mode_refuses_to_overwrite(tmp_path, capsys, monkeypatch):
    import heptapod_nb.ablation as abl
    monkeypatch.setattr(abl, "ablation_tokens", lambda root, tok, progress=False: Path(root))
    out = tmp_path / "c.json"; out.write_text("{}")
    assert _bench().main(["--configs", "w1,global", "--cost", "2", "--tokens", str(tmp_path), "--out", str(out)]) == 2
    assert "does not resume" in capsys.readouterr().err and out.read_text() == "{}"


# ---- equal training FLOPs (bench/equal_flops.py; issue 23 part 4) ------------------------------------------------
def _eqf():
    spec = importlib.util.spec_from_file_location("bench_equal_flops", ROOT / "bench" / "equal_flops.py")
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m


def test_equal_flops_configs_are_registered_and_differ_only_in_m_and_head_width():
    from heptapod_nb.ablation import ABLATION, ablation_label
    from heptapod_nb.model import PRESETS
    names = _eqf().CONFIGS.split(",")
    assert len(names) == 8 and all(n in ABLATION for n in names)
    tiny = PRESETS["tiny"]
    for n in names:
        m = probe_model(n)                                              # the unconditional model as run_probe builds it
        cfg = tiny.replace(**m)                                         # a valid tiny-preset config (validate raises otherwise)
        assert cfg.head_context == "last" and cfg.head_width == (64 if n.endswith("_hw64") else 128) and cfg.head_heads == 4, n
        if n.startswith("w1"): assert (cfg.window, cfg.targets_per_step) == (1, 1), n
        else:
            M = int(n.split("_")[1][1:])
            assert (cfg.window, cfg.targets_per_step, cfg.next_weight) == ("global", M, 8.0), n
        assert set(m) - {"window", "targets_per_step", "next_weight", "head_context", "head_width", "num_classes"} == set(), n
        assert ("head_width=64" in ablation_label(n)) == n.endswith("_hw64")
    assert tiny.next_weight == 8.0 and tiny.head_context == "last" and tiny.head_width == 128   # the values the names copy


def test_flops_per_step_is_linear_in_batch_and_ranks_the_heads():
    eq = _eqf()
    info = dict(kind="vq", grid=(8, 8), num_classes=10, vocab_size=16)
    cfg = lambda **kw: HeptapodConfig(vocab_size=16, grid=(8, 8), num_classes=0, dim=32, depth=2, n_heads=2, head_width=32,
                                      head_depth=1, head_heads=2, head_context="last", **kw)
    f = lambda c, b=4: eq.flops_per_step(c, info, b)
    w1, g2, g16 = cfg(window=1, targets_per_step=1), cfg(window="global", targets_per_step=2), cfg(window="global", targets_per_step=16)
    assert f(w1, 4) == 2 * f(w1, 2) and f(g16, 4) == 2 * f(g16, 2)      # matmul FLOPs: proportional to the batch
    assert 0 < f(w1) < f(g2) < f(g16) and f(g2.replace(head_width=16, head_heads=2)) < f(g2)
    assert f(g2.replace(num_classes=10)) == f(g2)                       # a class token instead of a start token: same work


def test_allot_gives_each_config_the_base_budget():
    eq = _eqf()
    p = eq.allot({"w1": 40, "g2": 50, "g16": 135, "w1h": 36}, "w1", 600, 30)
    assert p["w1"] == dict(flops_per_step=40, flops_ratio=1.0, steps=600, warmup=30)
    assert [p[n]["steps"] for n in ("g2", "g16", "w1h")] == [480, 178, 667]      # round(24000 / f)
    assert [p[n]["warmup"] for n in ("g2", "g16", "w1h")] == [24, 9, 33]         # 5% of each run, as the base's 30 of 600
    assert all(abs(q["steps"] * q["flops_per_step"] - 24000) <= q["flops_per_step"] / 2 for q in p.values())
    assert eq.allot({"w1": 40, "huge": 10 ** 9}, "w1", 600, 30)["huge"]["steps"] == 1


def test_equal_flops_jobs_record_flops_beside_every_measure(monkeypatch):
    import heptapod_nb.ablation as abl, heptapod_nb.probe as pr
    calls = []
    monkeypatch.setattr(pr, "run_probe", lambda name, seed, **kw: calls.append(("probe", kw)) or dict(
        name=name, seed=seed, steps=kw["steps"], _model=1, checkpoints=[dict(step=2, val_next_ce=3.0), dict(step=4, val_next_ce=2.5)]))
    monkeypatch.setattr(abl, "run_ablation", lambda name, seed, **kw: calls.append(("abl", kw)) or dict(
        name=name, seed=seed, steps=kw["steps"], _images=1, curve=[dict(step=4, val_next_ce=2.0)]))
    p = dict(flops_per_step=10, flops_ratio=1.25, steps=4, warmup=1)
    kw = dict(common=dict(lr=1.0), uncond=dict(probe_n=7), cond=dict(curve_samples=20))
    eq = _eqf()
    u, c = eq._job(("uncond", "g2", 0, p, kw)), eq._job(("cond", "g2", 1, p, kw))
    assert calls == [("probe", dict(lr=1.0, steps=4, warmup=1, probe_n=7)), ("abl", dict(lr=1.0, steps=4, warmup=1, curve_samples=20))]
    assert u["mode"] == "uncond" and c["mode"] == "cond" and "_model" not in u and "_images" not in c and "curve" not in c
    assert (u["train_flops"], u["flops_per_step"], u["flops_ratio"]) == (40, 10, 1.25)
    assert [q["train_flops"] for q in u["checkpoints"]] == [20, 40] and c["checkpoints"] == [dict(step=4, val_next_ce=2.0, train_flops=40)]


def test_equal_flops_bench_resumes_and_refuses_other_settings_or_flops(tmp_path, capsys, monkeypatch):
    import heptapod_nb.ablation as abl
    monkeypatch.setattr(abl, "ablation_tokens", lambda root, tok, progress=False: Path(root))     # no extraction
    eq, out = _eqf(), tmp_path / "e.json"
    plan = {m: {"w1_last": dict(flops_per_step=10, flops_ratio=1.0, steps=6, warmup=1),
                "global_m4_nw8_last": dict(flops_per_step=15, flops_ratio=1.5, steps=4, warmup=1)} for m in ("uncond", "cond")}
    monkeypatch.setattr(eq, "plan", lambda a, names, modes, root: {m: {n: plan[m][n] for n in names} for m in modes})
    args = ["--configs", "w1_last,global_m4_nw8_last", "--seeds", "0", "--base-steps", "6", "--samples", "10", "--evals", "2",
            "--eval-samples", "10", "--tokens", str(tmp_path / "tok"), "--out", str(out)]
    a = eq.parser().parse_args(args)
    settings = dict(base="w1_last", base_steps=6, batch=32, lr=2e-3, warmup=30, samples=10, probe_n=0, evals=2, eval_samples=10,
                    temperature=1.0, tokenizer=None)
    assert settings == {k: getattr(a, k) for k in settings}
    run = lambda mode, n, v: dict(mode=mode, name=n, seed=0, steps=plan[mode][n]["steps"], train_s=1.0, wall_s=1.0, mnist_fid=40.0,
                                  val_next_ce=v, **({"probe_mean": 0.7} if mode == "uncond" else {"class_acc": 0.5}),
                                  **{k: plan[mode][n][k] for k in ("flops_per_step", "flops_ratio")},
                                  train_flops=plan[mode][n]["flops_per_step"] * plan[mode][n]["steps"])
    runs = [run(m, n, 3.0) for m in ("uncond", "cond") for n in ("w1_last", "global_m4_nw8_last")]
    out.write_text(json.dumps(dict(settings=settings, plan=plan, runs=runs)))
    assert eq.main(args) == 0                                       # everything is done already: nothing is trained
    text = capsys.readouterr().out
    assert "0 runs to do (4 already" in text and "| uncond | global_m4_nw8_last | 1.500 | 4 | 0.0 | 1 | 0.700 | - | 40.0 |" in text
    before = out.read_text()
    assert eq.main([x if x != "6" else "5" for x in args]) == 2     # another budget: refused in one line, file untouched
    err = capsys.readouterr().err
    assert err.startswith("bench/equal_flops.py: error:") and "other settings" in err and err.count("\n") == 1
    plan["cond"]["w1_last"] = dict(plan["cond"]["w1_last"], flops_per_step=11)           # the FLOP count moved under the runs
    assert eq.main(args) == 2 and "FLOP count changed" in capsys.readouterr().err and out.read_text() == before
    for bad, msg in ((["--modes", "both"], "unknown mode"), (["--configs", "w3"], "unknown config"), (["--samples", "15"], "multiples of 10")):
        assert eq.main(args + bad) == 2 and msg in capsys.readouterr().err
