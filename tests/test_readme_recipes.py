"""Every recipe in README.md runs as written on a clean checkout, in order, with tiny step counts.

The README marks each recipe with `<!-- recipe: NAME cpu|gpu -->` before a ```bash block. CPU recipes are run
line by line in a scratch copy of the repository (so relative paths like `runs/...` and `heptapod_nb/assets/...`
resolve as they would for a user) with `.venv/bin` first on PATH; the only changes are the step counts in
`SHRINK` (each one must match, so a recipe edited out of the test's reach fails here). GPU recipes are checked
with `--print-config`: the arguments parse and the resolved config validates.
"""
import os, re, shutil, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# (recipe, pattern, replacement): each must match at least once in its recipe
SHRINK = [
    ("tiny", r"--steps 1500", "--steps 3 --ckpt-every 2"),
    ("tiny", r"epochs=10", "steps=2 ckpt_every=1 log_every=1"),
    ("tiny", r"--per-class 50", "--per-class 1"),
    ("tiny-bundled", r"epochs=10", "steps=2 ckpt_every=1 log_every=1"),
    ("tiny-bundled", r"--per-class 50", "--per-class 1"),
    ("own-images", r"--steps 3000", "--steps 3 --ckpt-every 2"),
    ("own-images", r"steps=2000", "steps=2 ckpt_every=1 log_every=1"),
    ("own-images", r"--per-class 16", "--per-class 1"),
    ("demo", r"--no-launch", "--no-launch --minutes 0.1 --eval-samples 0"),
]


def recipes() -> dict[str, tuple[str, list[str]]]:
    "{name: (kind, [command, ...])} from README.md."
    text = (ROOT / "README.md").read_text()
    out = {}
    for m in re.finditer(r"<!-- recipe: (\S+) (cpu|gpu) -->\s*```bash\n(.*?)```", text, re.S):
        lines = [l for l in m.group(3).replace("\\\n", " ").splitlines() if l.strip() and not l.lstrip().startswith("#")]
        out[m.group(1)] = (m.group(2), lines)
    return out


def test_readme_has_the_recipes():
    r = recipes()
    assert {"tiny", "tiny-bundled", "own-images", "demo", "imagenet"} <= set(r), sorted(r)
    assert r["tiny"][1][0].startswith("heptapod-train-tokenizer"), "the tiny recipe must make its own tokenizer first"
    for name, _, _ in SHRINK: assert name in r, name


def shrink(name: str, lines: list[str]) -> list[str]:
    text = "\n".join(lines)
    for rname, pat, rep in SHRINK:
        if rname != name: continue
        text, n = re.subn(pat, rep, text)
        assert n >= 1, f"README recipe {name!r} no longer contains {pat!r}: update SHRINK with the recipe"
    return text.splitlines()


def make_image_folder(root: Path, n_per_class: int = 20):
    "Two classes of 40x40 grayscale PNGs (a bar and a ring), the kind of folder a user brings."
    yy, xx = np.mgrid[:40, :40]
    for cls, draw in (("bars", lambda i: (abs(xx - 12 - i) < 3)), ("rings", lambda i: abs(np.hypot(yy - 20, xx - 20) - 8 - i % 4) < 2)):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray((draw(i) * 255).astype(np.uint8)).save(root / cls / f"{i}.png")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    "A scratch copy of the repository as a fresh clone has it (no runs/, no caches)."
    d = tmp_path_factory.mktemp("clone")
    for item in ("heptapod_nb", "settings.ini", "README.md"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, d / item)
    make_image_folder(d / "my_images")
    return d


def run_recipe(name: str, cwd: Path, env_extra=None):
    kind, lines = recipes()[name]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "HEPTAPOD_CACHE": str(cwd / ".cache"), **(env_extra or {})}
    for cmd in shrink(name, lines):
        if kind == "gpu":
            cmd = re.sub(r"^torchrun .*?-m heptapod_nb\.train", "heptapod-train", cmd) + " --print-config"
        r = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"recipe {name!r} failed at: {cmd}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
    return lines


def test_recipe_tiny(checkout):
    run_recipe("tiny", checkout)
    assert (checkout / "runs/tiny/samples/samples.npz").exists() and (checkout / "runs/tiny/eval.json").exists()


def test_recipe_tiny_bundled(checkout):
    run_recipe("tiny-bundled", checkout)
    assert (checkout / "runs/tiny_demo/samples/samples.npz").exists()


def test_recipe_own_images(checkout):
    run_recipe("own-images", checkout)
    assert (checkout / "runs/mine/samples/samples.npz").exists()


def test_recipe_demo(checkout):
    run_recipe("demo", checkout)
    assert all((checkout / "runs/demo" / f).exists() for f in ("tokenizer.safetensors", "heptapod.safetensors", "baseline.safetensors"))


def test_recipe_imagenet_configs_validate(checkout):
    run_recipe("imagenet", checkout)
