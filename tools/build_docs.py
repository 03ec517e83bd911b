"""Build the docs site offline: every notebook and tutorial executed with its pictures, the README as the landing
page, an API reference from docstrings. `make docs` runs it in full mode into `_docs/`, the site readers are sent to;
`HEPTAPOD_FAST=1` (what `make test` runs) is the quick check, built into `build/site-fast/` with a banner on every
page, so it never replaces the full site and no reader mistakes its shrunk runs for the results.

Pipeline (nbdev's own `nbdev_docs` needs Quarto, which cannot be installed offline):
1. stage the repository's pages in `build/docs/` (fast: `build/docs-fast/`) with the repo layout (README.md ->
   index.md, docs/, BENCHMARKS.md, bench/results/*.png), so every relative link in them resolves as on GitHub;
2. execute each notebook of `nbs/` and `tutorials/` in its own process (at most `--jobs` at once, 2 by default),
   in its own folder, exactly as `nbdev_test` does: execnb's CaptureShell, cells flagged `#| slow` / `#| gpu`
   (settings.ini's tst_flags) or `#| eval: false` are not run. Executed copies are kept per mode (`build/docs_exec/`,
   fast: `build/docs_exec-fast/`), keyed by the notebook's code cells, the library sources and the mode, so a build
   reuses every executed copy that is still current (a fast build never overwrites the full one) and only re-runs
   what changed; a change of prose alone re-runs nothing (the page takes the current markdown);
3. render for reading: `#| hide` / `#| default_exp` cells dropped, `#| ...` directive lines removed, skipped cells
   marked as such, progress bars collapsed to their last state;
4. write one API page per module (`::: heptapod_nb.<module>`, rendered by mkdocstrings from the docstrings);
5. `mkdocs build` (material theme, mkdocs-jupyter) into `_docs/` (fast: `build/site-fast/`, every page under a
   "fast build" banner), then check that no page loads anything from the network (a script, stylesheet or font
   from a CDN): the site must be readable offline.

Usage: `python tools/build_docs.py [--jobs 2] [--only GLOB] [--no-cache] [--reuse-executed] [--strict] [--serve]`.
"""
from __future__ import annotations

import argparse, concurrent.futures as cf, configparser, hashlib, json, os, re, shutil, signal, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "build" / "docs"        # mkdocs docs_dir (made by this script, git-ignored)
EXEC_CACHE = ROOT / "build" / "docs_exec"
SITE = ROOT / "_docs"                  # settings.ini doc_path: the full-mode site, the one readers are sent to
FAST_STAGE, FAST_EXEC_CACHE, FAST_SITE = ROOT / "build" / "docs-fast", ROOT / "build" / "docs_exec-fast", ROOT / "build" / "site-fast"
FAST_BANNER = ("<strong>Fast build, not the results.</strong> This copy of the site was built with "
               "<code>HEPTAPOD_FAST=1</code> (what <code>make test</code> runs): the notebooks ran with shrunk loops "
               "and tiny training runs, so their numbers and pictures are smoke-test values that the prose does not "
               "describe. <code>make docs</code> builds the full site into <code>_docs/</code>.")


def is_fast() -> bool:
    "The mode of this build: `HEPTAPOD_FAST` set to anything but '' or '0' (what `heptapod_nb.config.FAST` reads)."
    return os.environ.get("HEPTAPOD_FAST", "") not in ("", "0")


def build_paths(fast: bool) -> tuple[Path, Path, Path]:
    "(staging folder, executed-notebook cache, site folder) of a build: the two modes never share one."
    return (FAST_STAGE, FAST_EXEC_CACHE, FAST_SITE) if fast else (STAGE, EXEC_CACHE, SITE)


def write_theme_overrides(folder: Path, banner: str | None) -> Path:
    """A material theme override folder whose `main.html` puts `banner` (HTML) in the announce bar at the top of every
    page (markdown pages, notebooks and the API reference alike); no banner: the plain theme. Returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    main = '{% extends "base.html" %}\n'
    if banner: main += '{% block announce %}<div class="heptapod-fast-banner">' + banner + '</div>{% endblock %}\n'
    (folder / "main.html").write_text(main)
    return folder
NB_DIRS = ("nbs", "tutorials")
DIRECTIVE_RE = re.compile(r"^\s*#\|\s*(.*?)\s*$")
ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class DocsError(Exception):
    "A docs build failure with a message for the user (a notebook that fails, a page that needs the network)."


def parse_directives(source: str) -> dict[str, list[str]]:
    "nbdev's `#| name args` lines at the top of a cell -> {'name': [args...]}; `#| eval: false` -> {'eval:': ['false']}."
    out = {}
    for line in source.splitlines():
        m = DIRECTIVE_RE.match(line)
        if not m:
            if line.strip(): break
            continue
        words = m.group(1).split()
        if words: out[words[0]] = words[1:]
    return out


def strip_directives(source: str) -> str:
    "Drop the leading `#| ...` lines of a cell (what nbdev's docs show)."
    lines = source.splitlines()
    i = 0
    while i < len(lines) and (DIRECTIVE_RE.match(lines[i]) or not lines[i].strip()): i += 1
    return "\n".join(lines[i:])


def skip_flags() -> set[str]:
    "settings.ini's `tst_flags` (slow gpu): cells carrying one are skipped by nbdev_test, and so here."
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "settings.ini")
    return set(cfg["DEFAULT"].get("tst_flags", "").split())


def cell_source(cell: dict) -> str:
    "A cell's source as one string (notebook files store it as a string or a list of lines)."
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def skip_reason(cell: dict, flags: set[str]) -> str | None:
    "Why `nbdev_test` would not run this cell (None: it runs). Same rule as nbdev.test.test_nb._no_eval."
    if cell["cell_type"] != "code": return "markdown"
    src = cell_source(cell)
    if "nbdev_export" + "(" in src: return "nbdev_export"
    d = parse_directives(src)
    if d.get("eval:", [""])[0].lower() == "false": return "eval: false"
    hit = sorted(flags & d.keys())
    return hit[0] if hit else None


# ---------------------------------------------------------------- execution (one process per notebook)
def _shell(src: Path):
    """execnb's CaptureShell, except that a cell ending in ';' keeps what it printed: execnb drops a quiet cell's
    stdout, where Jupyter hides only its result (`print(x); plt.plot(y);` would lose the print on the page)."""
    from execnb.shell import CaptureShell
    from fastcore.basics import AttrDict
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    class Shell(CaptureShell):
        def _run(self, raw_cell, store_history=False, silent=False, shell_futures=True, cell_id=None,
                 stdout=True, stderr=True, display=True, verbose=False):
            quiet = raw_cell.rstrip().endswith(";")
            with capture_output(display=display, stdout=stdout and not verbose, stderr=stderr and not verbose) as c:
                result = InteractiveShell.run_cell(self, raw_cell, store_history, silent, shell_futures=shell_futures,
                                                   cell_id=cell_id)
            return AttrDict(result=result, stdout=c.stdout, stderr=c.stderr, display_objects=c.outputs,
                            exception=result.error_in_exec or result.error_before_exec, quiet=quiet)
    return Shell(src, mpl_format="png")


def exec_one(src: Path, dst: Path) -> None:
    "Execute notebook `src` as nbdev_test does (in its folder, flagged cells skipped) and write it with outputs to `dst`."
    from execnb.nbio import read_nb, write_nb
    flags = skip_flags()
    os.environ.setdefault("IN_TEST", "1")  # what nbdev_test sets: notebooks may shorten interactive bits
    nb = read_nb(src)
    shell = _shell(src)
    cwd = os.getcwd()
    os.chdir(src.parent)
    try:
        shell.run_all(nb, exc_stop=True, preproc=lambda c: skip_reason(c, flags) is not None)
    except Exception as e:
        sys.stderr.write(shell.prettytb(fname=src) + "\n")
        raise DocsError(f"{_rel(src)} failed while executing: {type(e).__name__}: {e}") from None
    finally:
        os.chdir(cwd)
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_nb(nb, dst)


def _lib_digest() -> str:
    h = hashlib.sha256()
    for p in sorted((ROOT / "heptapod_nb").rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts: h.update(p.name.encode()); h.update(p.read_bytes())
    return h.hexdigest()


def code_cells(nb: dict) -> list[str]:
    "The sources of a notebook's code cells, in order: what its execution depends on (its prose does not)."
    return [cell_source(c) for c in nb["cells"] if c["cell_type"] == "code"]


EXECUTOR = "2"      # raised when exec_one's outputs change (2: a cell ending in ';' keeps its printed output)


def cache_key(src: Path, lib: str) -> str:
    """What an executed copy depends on: the notebook's code cells, the library (code and bundled assets), the mode
    and the executor's version. Prose is left out: a notebook whose markdown alone changed keeps its executed copy,
    and the page takes the current prose (`with_prose`)."""
    h = hashlib.sha256(json.dumps(code_cells(json.loads(src.read_text()))).encode())
    h.update(EXECUTOR.encode())
    h.update(lib.encode()); h.update(os.environ.get("HEPTAPOD_FAST", "").encode())
    return h.hexdigest()


def with_prose(executed: dict, src: dict) -> dict:
    """The executed notebook with the source's cells (current prose, cell order) and the executed outputs, when the
    two have the same code cells; otherwise the executed notebook as it is (a stale copy taken by --reuse-executed)."""
    if code_cells(executed) != code_cells(src): return executed
    ran = iter(c for c in executed["cells"] if c["cell_type"] == "code")
    cells = []
    for c in src["cells"]:
        if c["cell_type"] == "code":
            e = next(ran)
            c = dict(c, outputs=e.get("outputs", []), execution_count=e.get("execution_count"))
        cells.append(c)
    return dict(executed, cells=cells)


def _rel(p: Path) -> Path:
    "`p` relative to the repository when inside it (how pages and messages name notebooks)."
    p = Path(p).resolve()
    return p.relative_to(ROOT) if p.is_relative_to(ROOT) else Path(p.name)


def _kill(p: subprocess.Popen) -> None:
    "Stop a notebook's process group (the notebook and whatever it started)."
    try: os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError: pass


def execute_all(notebooks: list[Path], jobs: int, use_cache: bool, timeout: float,
                cache_dir: Path = EXEC_CACHE, reuse: bool = False) -> dict[Path, Path]:
    """Execute every notebook (cached in `cache_dir`), `jobs` processes at a time. Returns {source: executed copy};
    raises DocsError. `reuse`: take any executed copy there is, even if stale (to iterate on the site's looks)."""
    lib = _lib_digest()
    env = dict(os.environ)
    # `jobs` notebooks share the cores: one BLAS/torch pool each of cores//jobs threads, unless the caller chose.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    env.setdefault("MPLBACKEND", "Agg")
    todo, done = [], {}
    for src in notebooks:
        dst = cache_dir / _rel(src)
        key = cache_key(src, lib)
        keyf = dst.with_suffix(".key")
        if use_cache and dst.exists() and keyf.exists() and (reuse or keyf.read_text() == key):
            print(f"  cached    {_rel(src)}")
            done[src] = dst
        else: todo.append((src, dst, keyf, key))

    def run(item):
        src, dst, keyf, key = item
        keyf.unlink(missing_ok=True)
        t0 = time.time()
        # own process group, so a timeout or Ctrl-C also stops what the notebook started (DataLoader workers, CLIs)
        p = subprocess.Popen([sys.executable, __file__, "--exec-one", str(src), str(dst)], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        live.add(p)
        try:
            _, err = p.communicate(timeout=timeout or None)
        except subprocess.TimeoutExpired:
            _kill(p); p.communicate()
            return src, None, time.time() - t0, f"{_rel(src)} took over {timeout:.0f} s (--timeout)"
        finally:
            live.discard(p)
        if p.returncode != 0:
            return src, None, time.time() - t0, (err.strip()[-4000:] or f"exit status {p.returncode}")
        keyf.write_text(key)
        return src, dst, time.time() - t0, None

    errors, live = [], set()
    with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
        try:
            for fut in cf.as_completed([pool.submit(run, item) for item in todo]):
                src, dst, secs, err = fut.result()
                print(f"  {'executed' if err is None else 'FAILED  '}  {_rel(src)}  {secs:6.1f} s", flush=True)
                if err: errors.append(err)
                else: done[src] = dst
        except BaseException:                     # Ctrl-C: stop the running notebooks too, not only this process
            pool.shutdown(wait=False, cancel_futures=True)
            for p in list(live): _kill(p)
            raise
    if errors:
        raise DocsError(f"{len(errors)} notebook(s) failed to execute:\n\n" + "\n\n".join(errors))
    return done


# ---------------------------------------------------------------- rendering
def _collapse_cr(text: str) -> str:
    "A progress bar's '\\r' rewrites -> its last state per line; ANSI colours removed."
    text = ANSI_RE.sub("", text)
    return "\n".join(line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r")
                     for line in text.split("\n"))


WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = "[an interactive widget: open this notebook in Jupyter (.venv/bin/jupyter lab) to use it]"


def render_nb(executed: Path, dst: Path, flags: set[str], notebook: Path | None = None) -> str:
    """Write the reader's copy of an executed notebook to `dst` (with the source `notebook`'s current prose where its
    code is the same); returns its title (first '# ' heading)."""
    nb = json.loads(executed.read_text())
    if notebook is not None: nb = with_prose(nb, json.loads(Path(notebook).read_text()))
    cells, title = [], None
    for cell in nb["cells"]:
        src = cell_source(cell)
        if cell["cell_type"] == "markdown":
            if title is None:
                m = re.search(r"^#\s+(.+)$", src, re.M)
                if m: title = m.group(1).strip()
            cells.append(cell); continue
        if cell["cell_type"] != "code": continue
        d = parse_directives(src)
        if "hide" in d or "default_exp" in d or "nbdev_export" + "(" in src: continue
        reason = skip_reason(cell, flags)
        body = strip_directives(src)
        if not body.strip(): continue
        if reason: body = f"# not run when these docs were built ({reason}): run the notebook to see its output\n" + body
        cell = dict(cell, source=body)
        outs = []
        if d.get("output:", [""])[0].lower() != "false":
            for o in cell.get("outputs", []):
                if o.get("output_type") == "stream":
                    t = o["text"] if isinstance(o["text"], str) else "".join(o["text"])
                    o = dict(o, text=_collapse_cr(t))
                elif o.get("output_type") == "error":
                    o = dict(o, traceback=[ANSI_RE.sub("", l) for l in o.get("traceback", [])])
                elif o.get("output_type") in ("display_data", "execute_result"):
                    data = o.get("data", {})
                    if not data: continue                    # an object that displayed itself elsewhere
                    if WIDGET_MIME in data:                  # a live ipywidget has no static form: say so
                        o = dict(o, data={"text/plain": WIDGET_NOTE}, metadata={})
                outs.append(o)
        cell["outputs"] = outs
        meta = dict(cell.get("metadata", {}))
        if d.get("echo:", [""])[0].lower() == "false": meta["tags"] = list(meta.get("tags", [])) + ["hide_code"]
        cell["metadata"] = meta
        cells.append(cell)
    nb["cells"] = cells
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(nb, indent=1))
    return title or dst.stem


def module_docstring(path: Path) -> str:
    "The first line of a module's docstring ('' when it has none)."
    import ast
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def write_api_pages(stage: Path = STAGE) -> list[tuple[str, str]]:
    "One page per exported module, `::: heptapod_nb.<module>` for mkdocstrings. Returns [(title, page)]."
    pages = []
    (stage / "api").mkdir(parents=True, exist_ok=True)
    mods = sorted(p for p in (ROOT / "heptapod_nb").glob("*.py") if not p.name.startswith("_"))
    rows = []
    for p in mods:
        mod = p.stem
        first = module_docstring(p) or ""
        (stage / "api" / f"{mod}.md").write_text(f"# heptapod_nb.{mod}\n\n::: heptapod_nb.{mod}\n")
        pages.append((mod, f"api/{mod}.md"))
        rows.append(f"| [`heptapod_nb.{mod}`]({mod}.md) | {first} |")
    (stage / "api" / "index.md").write_text(
        "# API reference\n\nMade from the docstrings of the exported modules (`heptapod_nb/*.py`, written by "
        "`nbdev_export` from `nbs/`). Each notebook page shows the same code at work.\n\n"
        "| module | what it holds |\n|---|---|\n" + "\n".join(rows) + "\n")
    return [("Overview", "api/index.md")] + pages


def stage_pages(stage: Path = STAGE) -> list:
    "Copy README (as index.md), docs/, BENCHMARKS.md and bench/results pictures into the staging folder."
    readme = (ROOT / "README.md").read_text()
    readme = re.sub(r"^<!--.*?-->\s*", "", readme, flags=re.S)
    (stage / "index.md").write_text(readme)
    extra = []
    for p in sorted((ROOT / "docs").rglob("*")):
        if p.is_file():
            (stage / p.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, stage / p.relative_to(ROOT))
            if p.suffix == ".md": extra.append((_md_title(p), str(p.relative_to(ROOT))))
    if (ROOT / "BENCHMARKS.md").exists():
        shutil.copy2(ROOT / "BENCHMARKS.md", stage / "BENCHMARKS.md")
        extra.append(("Benchmarks", "BENCHMARKS.md"))
    for p in sorted((ROOT / "bench" / "results").glob("*.png")):
        (stage / "bench" / "results").mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, stage / "bench" / "results" / p.name)
    return extra


def _md_title(p: Path) -> str:
    m = re.search(r"^#\s+(.+)$", p.read_text(), re.M)
    return m.group(1).strip() if m else p.stem


# ---------------------------------------------------------------- offline check
EXTERNAL_RE = re.compile(r"""<(script|link|img|iframe|source)\b[^>]*?\b(?:src|href)\s*=\s*["'](https?:)?//[^"']+["']""", re.I)
CSS_URL_RE = re.compile(r"""(@import\s+url\(|url\()\s*["']?(https?:)?//""", re.I)


def network_references(site: Path) -> list[str]:
    "Every resource a built page or stylesheet would fetch from the network (links to other sites are fine)."
    found = []
    for p in sorted(site.rglob("*")):
        if p.suffix not in (".html", ".css") or not p.is_file(): continue
        text = p.read_text(errors="replace")
        for m in EXTERNAL_RE.finditer(text):
            tag = m.group(0)
            if m.group(1).lower() == "link" and not re.search(r"rel\s*=\s*[\"']?(stylesheet|preload|icon|preconnect)", tag, re.I):
                continue
            found.append(f"{p.relative_to(site)}: {tag[:160]}")
        for m in CSS_URL_RE.finditer(text):
            found.append(f"{p.relative_to(site)}: {text[m.start():m.start() + 120]}")
    return found


def strip_mathjax(site: Path) -> int:
    """mkdocs-jupyter puts a MathJax loader and its config in every notebook page (its URL a CDN's unless
    configured). No notebook here has TeX, so remove the block: no page may try the network. Returns pages changed."""
    pat = re.compile(r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->", re.S)
    n = 0
    for p in site.rglob("*.html"):
        t = p.read_text()
        new, k = pat.subn("", t)
        if k: p.write_text(new); n += 1
    return n


# ---------------------------------------------------------------- main
def build(jobs: int = 2, only: str | None = None, use_cache: bool = True, timeout: float = 3600, strict: bool = False,
          reuse: bool = False) -> dict:
    "Stage, execute, render and build the site into `_docs/` (fast mode: `build/site-fast/`, with a banner). Returns timings and counts; raises DocsError."
    t0 = time.time()
    os.chdir(ROOT)                     # mkdocs.yml's relative paths (docs_dir, site_dir, cache_dir) are from here
    fast = is_fast()
    stage, cache, site = build_paths(fast)
    if jobs < 1: raise DocsError(f"--jobs must be >= 1, got {jobs}")
    if timeout < 0: raise DocsError(f"--timeout must be >= 0 (0: no limit), got {timeout}")
    if stage.exists(): shutil.rmtree(stage)
    stage.mkdir(parents=True)
    extra = stage_pages(stage)
    notebooks = [p for d in NB_DIRS for p in sorted((ROOT / d).glob("*.ipynb")) if p.name != "index.ipynb"]
    if only:
        globs = [g.strip() for g in only.split(",") if g.strip()]
        notebooks = [p for p in notebooks if any(p.match(g) for g in globs)]
        if not notebooks: raise DocsError(f"--only {only!r} matches no notebook in {', '.join(NB_DIRS)}")
    print(f"executing {len(notebooks)} notebooks ({'fast' if fast else 'full'} mode, {jobs} at a time)", flush=True)
    executed = execute_all(notebooks, jobs, use_cache, timeout, cache_dir=cache, reuse=reuse)
    t_exec = time.time() - t0
    flags = skip_flags()
    sections = {d: [] for d in NB_DIRS}
    for src in notebooks:
        rel = src.relative_to(ROOT)
        title = render_nb(executed[src], stage / rel, flags, src)
        num = re.match(r"(\d+)_", src.name)
        if num and not title[:1].isdigit(): title = f"{int(num.group(1))}. {title}"    # nav keeps the notebook order
        sections[rel.parts[0]].append({title: str(rel)})
    nav = [{"Home": "index.md"}] + [{t: p} for t, p in extra if p != "BENCHMARKS.md"]
    nav += [{"Tutorials": sections["tutorials"]}, {"Notebooks (the library)": sections["nbs"]},
            {"API reference": [{t: p} for t, p in write_api_pages(stage)]}]
    nav += [{t: p} for t, p in extra if p == "BENCHMARKS.md"]

    from mkdocs.commands.build import build as mkdocs_build
    from mkdocs.config import load_config
    cfg = load_config(str(ROOT / "mkdocs.yml"), docs_dir=str(stage), site_dir=str(site), nav=nav, strict=strict)
    overrides = write_theme_overrides(stage.with_name(stage.name + "-theme"), FAST_BANNER if fast else None)
    cfg.theme.dirs.insert(0, str(overrides))      # first in the template search path: its main.html wins
    cfg.plugins.on_startup(command="build", dirty=False)
    try:
        mkdocs_build(cfg)
    finally:
        cfg.plugins.on_shutdown()
    stripped = strip_mathjax(site)
    bad = network_references(site)
    if bad:
        raise DocsError("the site would load these from the network (it must work offline):\n  " + "\n  ".join(bad[:20]))
    pages = sum(1 for p in site.rglob("*.html") if p.name != "404.html")
    return dict(notebooks=len(notebooks), pages=pages, exec_s=round(t_exec, 1), total_s=round(time.time() - t0, 1),
                mathjax_removed=stripped, fast=fast, site=str(site.relative_to(ROOT)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="build_docs.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=2, help="notebooks executed at once (default 2)")
    ap.add_argument("--only", help="build only notebooks matching these comma-separated globs, e.g. 'tutorials/04*,nbs/12*' (quick look)")
    ap.add_argument("--no-cache", action="store_true", help="re-execute every notebook")
    ap.add_argument("--timeout", type=float, default=3600,
                    help="seconds one notebook may run, 0 for no limit (default 3600: a busy 2-core box is slow)")
    ap.add_argument("--reuse-executed", action="store_true",
                    help="render the executed notebooks already in this mode's cache (build/docs_exec, fast: build/docs_exec-fast) even if stale (quick, for looks)")
    ap.add_argument("--strict", action="store_true", help="mkdocs --strict: warnings (e.g. broken links) fail")
    ap.add_argument("--serve", action="store_true", help="after building, serve _docs/ on http://127.0.0.1:8000")
    ap.add_argument("--exec-one", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    # `timeout`, CI or kill send SIGTERM: exit through Python so the running notebooks are stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if a.exec_one:
            exec_one(Path(a.exec_one[0]).resolve(), Path(a.exec_one[1]).resolve())
            return 0
        res = build(a.jobs, a.only, not a.no_cache, a.timeout, a.strict, a.reuse_executed)
    except DocsError as e:
        print(f"build_docs.py: error: {e}", file=sys.stderr)
        return 1
    print(f"docs built: {res['pages']} pages in {res['site']}/ ({res['notebooks']} notebooks executed or cached, "
          f"{res['exec_s']} s executing, {res['total_s']} s in all). Open {res['site']}/index.html in a browser.")
    if a.serve:
        import functools, http.server
        h = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(build_paths(is_fast())[2]))
        print("serving on http://127.0.0.1:8000 (Ctrl-C to stop)")
        http.server.ThreadingHTTPServer(("127.0.0.1", 8000), h).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
