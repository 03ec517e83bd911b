"""tools/build_docs.py: notebooks executed as nbdev_test does (flagged cells skipped), rendered for reading, cached,
and a site that loads nothing from the network. The whole site is built by `make docs` (CI, fast mode)."""
import importlib.util, json, sys, time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("build_docs", ROOT / "tools" / "build_docs.py")
bd = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(bd)


def _nb(path: Path, cells: list[tuple[str, str]]) -> Path:
    "Write a minimal notebook of (cell_type, source) pairs."
    nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {"kernelspec": {"name": "python3", "language": "python",
          "display_name": "Python 3"}, "language_info": {"name": "python"}},
          "cells": [{"cell_type": t, "id": f"c{i}", "metadata": {}, "source": s,
                     **({"outputs": [], "execution_count": None} if t == "code" else {})}
                    for i, (t, s) in enumerate(cells)]}
    path.write_text(json.dumps(nb))
    return path


def _code(src): return {"cell_type": "code", "source": src}


def test_skip_rule_is_nbdev_tests():
    "Same cells skipped as nbdev_test with settings.ini's tst_flags (slow gpu); directives only at the top of a cell."
    flags = bd.skip_flags()
    assert flags == {"slow", "gpu"}
    assert bd.skip_reason(_code("#| slow\nx = 1"), flags) == "slow"
    assert bd.skip_reason(_code("#| export\n#| gpu\nx = 1"), flags) == "gpu"
    assert bd.skip_reason(_code("#| eval: false\nx = 1"), flags) == "eval: false"
    assert bd.skip_reason(_code("#|eval: False\nx = 1"), flags) == "eval: false"
    assert bd.skip_reason(_code("#| hide\nx = 1"), flags) is None        # hidden cells run (imports), only not shown
    assert bd.skip_reason(_code("#| export\ndef f(): pass"), flags) is None
    assert bd.skip_reason(_code("x = 1\n#| slow"), flags) is None         # not a directive below code
    assert bd.skip_reason(_code("import nbdev; nbdev.nbdev_export()"), flags) == "nbdev_export"
    # nbdev's own parser agrees on the directive names
    from nbdev.process import extract_directives
    from fastcore.basics import AttrDict
    for src in ("#| export\n#| gpu\nx = 1", "#| eval: false\ny", "#| hide\n\nz = 2"):
        cell = AttrDict(cell_type="code", source=src)
        assert set(extract_directives(cell)) == set(bd.parse_directives(src)), src


def test_execute_and_render(tmp_path):
    "A notebook runs in its own folder with flagged cells skipped; the reader's copy hides nbdev plumbing."
    (tmp_path / "data.txt").write_text("41")
    src = _nb(tmp_path / "demo.ipynb", [
        ("markdown", "# My title\n\n> one line"),
        ("code", "#| default_exp demo"),
        ("code", "#| hide\nimport sys, matplotlib.pyplot as plt\nsecret = int(open('data.txt').read())"),
        ("code", "#| slow\nraise RuntimeError('the slow cell ran')"),
        ("code", "#| eval: false\nraise RuntimeError('the eval: false cell ran')"),
        ("code", "#| export\ndef f(): return secret + 1\nprint(f())"),
        ("code", "for i in range(4): sys.stderr.write(f'\\r{i}/3 \\x1b[32mok\\x1b[0m')\nsys.stderr.write('\\n')"),
        ("code", "#| output: false\nprint('not shown')"),
        ("code", "plt.figure(figsize=(2, 2)); plt.plot([0, 1, 0]);"),
        ("code", "print('printed beside a figure'); plt.figure(figsize=(2, 2)); plt.plot([1, 0]);"),
        ("code", "import ipywidgets\nipywidgets.IntSlider(3)"),
        ("code", "class Quiet:\n    def _ipython_display_(self): pass\nQuiet()"),
    ])
    done = bd.execute_all([src], jobs=1, use_cache=True, timeout=300, cache_dir=tmp_path / "exec")
    out = tmp_path / "site" / "demo.ipynb"
    title = bd.render_nb(done[src], out, bd.skip_flags())
    assert title == "My title"
    cells = json.loads(out.read_text())["cells"]
    text = [c["source"] for c in cells]
    assert not any("#|" in t for t in text)
    assert not any("secret = int" in t or "default_exp" in t for t in text)          # hidden cells dropped
    slow = next(c for c in cells if "slow cell ran" in c["source"])
    assert slow["source"].startswith("# not run when these docs were built (slow)") and slow["outputs"] == []
    assert any("built (eval: false)" in t for t in text)
    export = next(c for c in cells if "def f()" in c["source"])
    assert export["outputs"][0]["text"].strip() == "42"                                 # ran, in the notebook's folder
    bar = next(c for c in cells if "range(4)" in c["source"])["outputs"][0]["text"]
    assert bar.strip() == "3/3 ok"                                                      # progress bar: last state, no ANSI
    assert next(c for c in cells if "not shown" in c["source"])["outputs"] == []
    fig = next(c for c in cells if "plt.plot" in c["source"])
    assert any("image/png" in o.get("data", {}) for o in fig["outputs"])
    both = next(c for c in cells if "printed beside" in c["source"])["outputs"]           # a quiet cell keeps its print
    assert [o["output_type"] for o in both] == ["stream", "display_data"]
    assert both[0]["text"].strip() == "printed beside a figure" and "image/png" in both[1]["data"]
    widget = next(c for c in cells if "IntSlider" in c["source"])["outputs"]
    assert [o["data"] for o in widget] == [{"text/plain": bd.WIDGET_NOTE}]
    assert next(c for c in cells if "Quiet()" in c["source"])["outputs"] == []      # nothing empty left to render


def test_execution_cache_and_failure(tmp_path, capsys, monkeypatch):
    "An unchanged notebook is not run twice; a failing one stops the build naming the notebook and the error."
    src = _nb(tmp_path / "ok.ipynb", [("code", "x = 1")])
    # the key covers the notebook, the library and the mode
    monkeypatch.setenv("HEPTAPOD_FAST", "1")
    k = bd.cache_key(src, "lib-a")
    assert k != bd.cache_key(src, "lib-b")
    monkeypatch.setenv("HEPTAPOD_FAST", "")
    assert k != bd.cache_key(src, "lib-a")
    monkeypatch.setattr(bd, "_lib_digest", lambda: "lib-a")   # others may be re-exporting heptapod_nb meanwhile
    cache = tmp_path / "exec"
    bd.execute_all([src], 1, True, 300, cache)
    assert "executed" in capsys.readouterr().out
    bd.execute_all([src], 1, True, 300, cache)
    assert "cached" in capsys.readouterr().out
    _nb(src, [("markdown", "# New prose"), ("code", "x = 1")])                           # prose alone: kept
    bd.execute_all([src], 1, True, 300, cache)
    assert "cached" in capsys.readouterr().out
    page = tmp_path / "page.ipynb"
    assert bd.render_nb(cache / "ok.ipynb", page, set(), src) == "New prose"            # the page has today's prose
    assert [c["cell_type"] for c in json.loads(page.read_text())["cells"]] == ["markdown", "code"]
    _nb(src, [("code", "x = 2")])                                                       # changed -> runs again
    bad = _nb(tmp_path / "bad.ipynb", [("code", "x = 1"), ("code", "raise ValueError('broken on purpose')")])
    with pytest.raises(bd.DocsError, match="1 notebook") as e:
        bd.execute_all([src, bad], 2, True, 300, cache)
    out = capsys.readouterr().out
    assert "executed  ok.ipynb" in out and "FAILED    bad.ipynb" in out
    assert "bad.ipynb" in str(e.value) and "broken on purpose" in str(e.value)
    assert not (cache / "bad.key").exists()                                            # a failure is never cached
    slow = _nb(tmp_path / "slow.ipynb", [("code", "import time; time.sleep(120)")])
    t0 = time.time()
    with pytest.raises(bd.DocsError, match=r"slow.ipynb took over 1 s \(--timeout\)"):
        bd.execute_all([slow], 1, True, 1, cache)
    assert time.time() - t0 < 30                                                        # stopped, not waited for


def test_offline_check(tmp_path):
    "Pages that would fetch a script, stylesheet or font from the network are found; links to other sites are fine."
    site = tmp_path / "site"; (site / "nbs").mkdir(parents=True)
    (site / "index.html").write_text('<a href="https://arxiv.org/abs/2510.06673">paper</a>'
                                     '<script src="assets/javascripts/bundle.js"></script><img src="docs/images/a.png">')
    assert bd.network_references(site) == []
    (site / "fonts.html").write_text('<link rel="stylesheet" href="https://fonts.googleapis.com/css?family=Roboto">')
    (site / "x.css").write_text('@import url("https://example.org/a.css");')
    found = bd.network_references(site)
    assert len(found) == 2 and any("fonts.html" in f for f in found) and any("x.css" in f for f in found)
    mathjax = ('<!-- Load mathjax -->\n<script src="https://cdnjs.cloudflare.com/ajax/libs/mathjax/2.7.7/latest.js?'
               'config=TeX-AMS_CHTML-full,Safe"> </script>\n<!-- MathJax configuration -->\n<script type="text/x-mathjax'
               '-config">\ninit_mathjax = function() {};\n</script>\n<!-- End of mathjax configuration -->')
    (site / "nbs" / "a.html").write_text(f"<head>{mathjax}</head><body>ok</body>")
    assert any("mathjax" in f for f in bd.network_references(site))
    assert bd.strip_mathjax(site) == 1
    assert "mathjax" not in (site / "nbs" / "a.html").read_text() and "ok" in (site / "nbs" / "a.html").read_text()


def test_mkdocs_config_is_offline():
    "mkdocs.yml turns off web fonts, points at the staged pages and uses the plugins the build relies on."
    yaml = pytest.importorskip("yaml")
    cfg = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert cfg["theme"]["name"] == "material" and cfg["theme"]["font"] is False
    assert (ROOT / cfg["docs_dir"]).resolve() == bd.STAGE and (ROOT / cfg["site_dir"]).resolve() == bd.SITE
    plugins = {next(iter(p)) if isinstance(p, dict) else p: p for p in cfg["plugins"]}
    assert {"search", "mkdocs-jupyter", "mkdocstrings"} <= set(plugins)
    assert plugins["mkdocs-jupyter"]["mkdocs-jupyter"]["execute"] is False      # build_docs.py executes, with skips


def test_fast_build_never_replaces_the_full_site(monkeypatch):
    "The fast build (make test) stages, caches and writes its site apart from the full one (`_docs/`, make docs)."
    full, fast = bd.build_paths(False), bd.build_paths(True)
    assert full == (bd.STAGE, bd.EXEC_CACHE, ROOT / "_docs")
    assert not set(full) & set(fast) and all(p.is_relative_to(ROOT / "build") for p in fast)
    for value, expected in (("1", True), ("", False), ("0", False)):
        monkeypatch.setenv("HEPTAPOD_FAST", value)
        assert bd.is_fast() is expected
    monkeypatch.delenv("HEPTAPOD_FAST")
    assert bd.is_fast() is False


def test_fast_banner_on_every_page(tmp_path):
    "A fast build's theme override puts the banner on every page; a full build's shows none."
    pytest.importorskip("material")
    from mkdocs.commands.build import build as mkdocs_build
    from mkdocs.config import load_config
    docs = tmp_path / "docs"; (docs / "sub").mkdir(parents=True)
    (docs / "index.md").write_text("# Home\n\ntext")
    (docs / "sub" / "page.md").write_text("# Page\n\nmore text")
    cfg_file = tmp_path / "mkdocs.yml"
    cfg_file.write_text("site_name: t\ntheme: {name: material, font: false}\nuse_directory_urls: false\n")
    for banner in (bd.FAST_BANNER, None):
        site = tmp_path / ("site-fast" if banner else "site")
        cfg = load_config(str(cfg_file), docs_dir=str(docs), site_dir=str(site))
        cfg.theme.dirs.insert(0, str(bd.write_theme_overrides(tmp_path / ("theme-fast" if banner else "theme"), banner)))
        cfg.plugins.on_startup(command="build", dirty=False)
        try: mkdocs_build(cfg)
        finally: cfg.plugins.on_shutdown()
        pages = [site / "index.html", site / "sub" / "page.html"]
        for p in pages:
            html = p.read_text()
            assert ("heptapod-fast-banner" in html and "Fast build, not the results" in html) is bool(banner), p
