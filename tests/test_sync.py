"The notebooks are the source of truth: an edit that was not exported must fail `make test`'s sync check."
import json
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _copy(tmp_path):
    dst = tmp_path / "repo"
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "runs", "tests", "bench",
                                                              "*.safetensors", "_artifacts"))
    (dst / ".venv").symlink_to(ROOT / ".venv")
    return dst


def _run(repo):
    return subprocess.run(["bash", "tools/check_sync.sh"], cwd=repo, capture_output=True, text=True)


def test_repo_is_in_sync(tmp_path):
    r = _run(_copy(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr


def test_unexported_notebook_edit_fails(tmp_path):
    repo = _copy(tmp_path)
    nb_path = repo / "nbs" / "00_config.ipynb"
    nb = json.loads(nb_path.read_text())
    cell = next(c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).startswith("#| export"))
    cell["source"] = "".join(cell["source"]) + "\nEDITED_BUT_NOT_EXPORTED = 1"
    nb_path.write_text(json.dumps(nb, indent=1))
    r = _run(repo)
    assert r.returncode != 0
    assert "out of sync with nbs/" in r.stdout
