"""Every console script of settings.ini, run as the installed program: `--help` exits 0; a missing or bad input
file exits 2 with exactly one line `prog: error: ...` on stderr; `--debug` puts the traceback before that line.
The scripts run as subprocesses of `.venv/bin/heptapod-*` (another folder with HEPTAPOD_BIN, e.g. a wheel's venv)."""
import configparser, os, socket, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(os.environ.get("HEPTAPOD_BIN") or Path(sys.executable).parent)


def settings_scripts() -> dict:
    "console_scripts of settings.ini: {name: 'module:function'}."
    cp = configparser.ConfigParser(); cp.read(ROOT / "settings.ini")
    lines = [l.strip() for l in cp["DEFAULT"]["console_scripts"].splitlines() if l.strip()]
    return dict(l.split("=", 1) for l in lines)


SCRIPTS = settings_scripts()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def bad_input(name: str, tmp: Path) -> tuple[list[str], str]:
    "Arguments that name a missing (or, for heptapod-demo, wrong-kind) input file, and the path the error must name."
    miss = tmp / "missing"
    table = {
        "heptapod-train-tokenizer": (["--data", str(miss / "images"), "--out", str(tmp / "tok")], miss / "images"),
        "heptapod-extract": (["--tokenizer", str(miss / "tok.safetensors"), "--out", str(tmp / "tokens")], miss / "tok.safetensors"),
        "heptapod-train": (["--data", "mnist5k", "--tokenizer", str(miss / "tok.safetensors"), "--out", str(tmp / "run"),
                            "--no-progress"], miss / "tok.safetensors"),
        "heptapod-sample": (["--model", str(miss / "model.safetensors"), "--tokenizer", str(miss / "tok.safetensors"),
                             "--out-dir", str(tmp / "samples")], miss / "model.safetensors"),
        "heptapod-eval": (["--samples", str(miss / "samples.npz")], miss / "samples.npz"),
        "heptapod-app": (["--weights", str(miss / "weights"), "--port", str(free_port())], miss / "weights"),
        # a missing demo folder means "make the weights" (30 minutes): a file where the folder should be is the bad input
        "heptapod-demo": (["--weights", str(tmp / "a_file"), "--no-launch", "--no-browser"], tmp / "a_file"),
    }
    assert set(table) == set(SCRIPTS), f"settings.ini has scripts this test does not know: {set(SCRIPTS) ^ set(table)}"
    args, path = table[name]
    return args, str(path)


def run(cmd, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", HEPTAPOD_FAST="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GRADIO_SERVER_PORT"): env.pop(k, None)
    t0 = time.time()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return r, time.time() - t0


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """All 21 runs (7 scripts x help / bad input / bad input --debug), 3 at a time: each is mostly the ~2 s import
    of torch, so running them side by side keeps this module at ~15 s on 2 cores instead of ~50 s."""
    jobs = {}
    for name in SCRIPTS:
        exe = str(BIN / name)
        for kind, extra in (("help", None), ("bad", []), ("debug", ["--debug"])):
            tmp = tmp_path_factory.mktemp(f"{name}-{kind}")   # its own folders: runs side by side never share an --out
            (tmp / "a_file").write_text("not a folder")      # (one run per folder: a second would be refused)
            args, path = bad_input(name, tmp)
            jobs[name, kind] = ([exe, "--help"], tmp, None) if extra is None else ([exe, *args, *extra], tmp, path)
    with ThreadPoolExecutor(3) as ex:
        futs = {k: ex.submit(run, cmd, cwd) for k, (cmd, cwd, _) in jobs.items()}
        return {k: (*f.result(), jobs[k][2]) for k, f in futs.items()}


def test_installed_scripts_match_settings():
    "The installed entry points are the ones settings.ini names (else: `pip install -e .` is due)."
    from importlib.metadata import entry_points
    installed = {e.name: e.value for e in entry_points(group="console_scripts") if e.name in SCRIPTS}
    assert installed == SCRIPTS, "installed console scripts differ from settings.ini: reinstall with `pip install -e .`"
    for name in SCRIPTS: assert (BIN / name).is_file(), f"{BIN / name} is not installed"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_exits_0(results, name):
    r, secs, _ = results[name, "help"]
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: {name}") and "--debug" in r.stdout, r.stdout[:300]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_bad_input_is_one_line_exit_2(results, name):
    r, secs, path = results[name, "bad"]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith(f"{name}: error: ") and path in lines[0], lines[0]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_debug_adds_the_traceback(results, name):
    r, secs, path = results[name, "debug"]
    plain = results[name, "bad"][0].stderr.splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):" and len(lines) > 3, r.stderr[-2000:]
    assert lines[-1] == plain[0].replace(results[name, "bad"][2], path)   # the same one-line message, last (its own folder)


# ---- one CLI convention: long options with dashes; the old underscore spellings still work, with a warning ----

@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_documents_dashed_options_only(results, name):
    "Every long option in every script's --help is spelled with dashes (CONTRIBUTING.md, 'Console scripts')."
    import re
    r = results[name, "help"][0]
    usage, _, rest = r.stdout.partition("\n\n")
    declared = usage + "\n".join(l for l in rest.splitlines() if re.match(r"\s{2}-", l))   # the usage and the option list
    underscored = sorted(set(re.findall(r"(?<![\w-])--[a-z0-9]+_[a-z0-9_]+", declared)))
    assert not underscored, f"{name} --help shows {underscored}: spell them with dashes"


def test_old_spellings_work_with_one_deprecation_line_each(tmp_path, capsys):
    "The pre-convention spellings keep working for a release: same result, one `deprecated:` line on stderr per flag."
    import json
    from heptapod_nb.train import main as train_main
    from heptapod_nb.tokenizer_train import train_tokenizer_main
    base = ["--data", "mnist5k", "--out", str(tmp_path / "r")]
    assert train_main([*base, "--batch-size", "4", "--print-config"]) == 0
    new = capsys.readouterr()
    assert new.err == "" and json.loads(new.out)["batch_size"] == 4
    assert train_main([*base, "--batch_size", "4", "--print_config"]) == 0
    old = capsys.readouterr()
    assert json.loads(old.out) == json.loads(new.out)
    assert old.err.splitlines() == [
        "heptapod-train: deprecated: --batch_size is now spelled --batch-size (the old spelling goes away in the next release)",
        "heptapod-train: deprecated: --print_config is now spelled --print-config (the old spelling goes away in the next release)"]
    # a renamed option (--max_steps -> --steps) and an old config key in -o / key=value form
    with pytest.raises(FileExistsError, match="already holds"):             # fails after parsing, before any training
        (tmp_path / "t").mkdir(); (tmp_path / "t" / "log.jsonl").write_text("")
        train_tokenizer_main(["--out", str(tmp_path / "t"), "--max_steps", "3", "--no_progress"])
    err = capsys.readouterr().err
    assert "--max_steps is now spelled --steps" in err and "--no_progress is now spelled --no-progress" in err


def test_old_config_keys_load_with_a_deprecation_line(capsys):
    from heptapod_nb.tokenizer_train import TokenizerTrainConfig
    from heptapod_nb.config import apply_overrides
    c = apply_overrides(TokenizerTrainConfig(), ["max_steps=7", "warmup_steps=3", "min_lr_ratio=0.1"])
    assert (c.steps, c.warmup, c.min_lr) == (7, 3, pytest.approx(0.1 * c.lr))
    assert TokenizerTrainConfig(max_steps=5).steps == 5                  # the old constructor keyword too
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all(": deprecated: TokenizerTrainConfig key" in l for l in err)


def _one_line_exit_2(main, argv, capsys, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for n in needles: assert n in err[0], err[0]
    return err[0]


def test_sizes_and_counts_are_range_checked_up_front(tmp_path, capsys):
    """Issue 24: `heptapod-extract --batch-size 0` hung for minutes rewriting meta.json and `heptapod-eval --batch-size 0`
    was accepted; every size/count is now refused by the parser, in one line naming the option, before any work."""
    from heptapod_nb.evaluate import eval_main, sample_main
    from heptapod_nb.extract import extract_cli
    t0 = time.time()
    for main, argv, opt in ((extract_cli, ["--tokenizer", "x", "--out", str(tmp_path / "t"), "--batch-size", "0"], "--batch-size"),
                            (extract_cli, ["--tokenizer", "x", "--out", str(tmp_path / "t"), "--batch-size", "-4"], "--batch-size"),
                            (extract_cli, ["--tokenizer", "x", "--out", str(tmp_path / "t"), "--augs", "3"], "--augs"),
                            (eval_main, ["--samples", "x", "--batch-size", "0"], "--batch-size"),
                            (sample_main, ["--model", "m", "--tokenizer", "t", "--out-dir", "o", "--temperature", "nan"], "--temperature"),
                            (sample_main, ["--model", "m", "--tokenizer", "t", "--out-dir", "o", "--top-p", "0"], "--top-p")):
        line = _one_line_exit_2(main, argv, capsys, f"argument {opt}", "(see ")
        assert "usage:" not in line
    assert time.time() - t0 < 30


def test_eval_names_what_is_wrong_with_its_inputs(tmp_path, capsys):
    """Issue 24: an empty .npz said "torch.cat(): expected a non-empty list"; `--out afile/x.json` said "File exists:
    afile"; labels outside the 10 MNIST classes were scored. Each is one line naming the problem now."""
    import numpy as np
    from heptapod_nb.evaluate import eval_main
    empty = tmp_path / "empty.npz"; np.savez(empty, arr_0=np.zeros((0, 28, 28, 3), np.uint8))
    _one_line_exit_2(eval_main, ["--samples", str(empty)], capsys, "holds no images")
    good = tmp_path / "s.npz"; np.savez(good, arr_0=np.zeros((4, 28, 28, 3), np.uint8), arr_1=np.array([0, 1, 2, 12]))
    _one_line_exit_2(eval_main, ["--samples", str(good)], capsys, "class id in [0, 10)", "range [0, 12]")
    (tmp_path / "afile").write_text("not a folder")
    _one_line_exit_2(eval_main, ["--samples", str(good), "--out", str(tmp_path / "afile" / "x.json")], capsys,
                     f"{tmp_path / 'afile'} is a file")
