"tools/lint.py (make lint): a long line or an unused import fails; only nbdev's own __all__ first line is let through."
import subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lint(*paths):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "lint.py"), *map(str, paths)], capture_output=True,
                          text=True, timeout=120)


def test_lint_flags_long_lines_and_unused_imports_but_not_nbdevs_all_line(tmp_path):
    ok = tmp_path / "ok.py"
    names = ", ".join(f"'name_{i:03d}'" for i in range(10))             # 118 characters of names, as nbdev wraps them
    defs = "".join(f"name_{i:03d} = {i}\n" for i in range(10))
    ok.write_text(f"__all__ = [{names},\n           'x']\nx = 1\n{defs}")
    assert 120 < len(ok.read_text().splitlines()[0]) <= 130
    r = lint(ok)
    assert r.returncode == 0, r.stdout + r.stderr
    long = tmp_path / "long.py"
    long.write_text("x = '" + "a" * 130 + "'\n")
    unused = tmp_path / "unused.py"
    unused.write_text("import os\n")
    r = lint(long, unused)
    assert r.returncode == 1 and "E501" in r.stdout and "F401" in r.stdout, r.stdout
