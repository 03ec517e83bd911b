"""Make the README's three pictures in docs/images/ (committed PNGs):

- `filmstrip.png`: tutorial 4's filmstrip of one generation by the bundled demo model (what it has seen, its
  holistic guess of the whole image, the entropy of every unseen position), made with `heptapod_nb.viz`;
- `window_ablation.png`: `heptapod_nb.ablation.plot_ablation` over the committed `bench/results/window_ablation_900.json`;
- `app.png`: a 1400x1600 screenshot of `heptapod-app` in headless Chromium (system `chromium`: `apt-get install -y
  chromium`). With the `playwright` package it generates a 3 (the panels stream in), scrubs back to step 24 and
  clicks a cell of the holistic guess so that its top codes show; without it, `chromium --headless --screenshot`
  takes the page as it opens.

Usage: `.venv/bin/python tools/make_pictures.py [--only filmstrip,ablation,app] [--out docs/images] [--port 7871]`.
Re-run it whenever the app or the demo weights change. Exit status 0 when every picture was written.
"""
from __future__ import annotations

import argparse, os, shutil, signal, socket, subprocess, sys, tempfile, time, urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PICTURES = ("filmstrip", "ablation", "app")
APP_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}


class PictureError(Exception):
    "A picture that cannot be made, with the reason for the user."


def _savefig(fig, path: Path, dpi: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight", facecolor="white")
    os.replace(tmp, path)
    return path


def make_filmstrip(out: Path, cls: int = 3, seed: int = 1, n: int = 8) -> Path:
    "Tutorial 4's filmstrip: the bundled demo model generating class `cls`, `n` steps from the first to the finished image."
    import matplotlib; matplotlib.use("Agg")
    import torch
    from heptapod_nb.bundle import load_bundle
    from heptapod_nb.sample import generate
    from heptapod_nb.viz import filmstrip, view_for_model
    demo = load_bundle(need_baseline=False)
    temperature = demo.meta.get("recipe", {}).get("temperature", 1.0)   # the temperature the demo recipe found best
    _, trace = generate(demo.model, torch.tensor([cls]), seed=seed, temperature=temperature, trace=True)
    view = view_for_model(demo.model, trace, demo.tokenizer)
    which = ("seen", "guess", "entropy")
    fig = filmstrip(view, n=n, which=which)
    # the entropy row gets its scale (viz draws it with magma from 0 to the view's entropy_max, in nats)
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    ent_axes = fig.axes[len(fig.axes) // len(which) * which.index("entropy"):][:len(fig.axes) // len(which)]
    fig.subplots_adjust(right=0.955)                       # room for the scale, every column keeps its width
    box = ent_axes[-1].get_position()
    cax = fig.add_axes([box.x1 + 0.008, box.y0, 0.008, box.height])
    fig.colorbar(ScalarMappable(Normalize(0, view.entropy_max), "magma"), cax=cax, label="entropy (nats)")
    fig.suptitle(f"Heptapod drawing a {cls}: at every step it guesses the whole image (middle row) and says where it "
                 "is still unsure (bottom row)", fontsize=9, y=1.0)
    return _savefig(fig, out / "filmstrip.png", dpi=130)


def make_ablation(out: Path, results: Path = ROOT / "bench" / "results" / "window_ablation_900.json") -> Path:
    "The window-ablation plot over committed results (`bench/window_ablation.py --out ...`)."
    import json, matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from heptapod_nb.ablation import ablation_label, plot_ablation, summarize
    if not results.is_file(): raise PictureError(f"ablation results {results} not found (made by bench/window_ablation.py --out)")
    data = json.loads(results.read_text())
    runs = data.get("runs")
    if not runs: raise PictureError(f"{results} holds no runs")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    plot_ablation(runs, axes)
    # labels that cannot collide: the right panel's names beside its points overlap where the means are close, so
    # they become a legend (the colours match the left panel's); both legends sit below their panels, off the data
    for t in list(axes[1].texts): t.remove()
    for cont, row in zip(axes[1].containers, summarize(runs)): cont.set_label(ablation_label(row["name"]))
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(0, -0.16), ncol=2, frameon=False)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(0, -0.16), ncol=2, frameon=False)
    s = data.get("settings", {})
    seeds = len({r["seed"] for r in runs})
    fig.suptitle(f"Window ablation on MNIST-5k: {s.get('steps', '?')} training steps, {seeds} seeds per setting "
                 f"({results.relative_to(ROOT) if results.is_relative_to(ROOT) else results})", fontsize=10)
    fig.tight_layout()
    return _savefig(fig, out / "window_ablation.png", dpi=110)


def _free_port(port: int) -> int:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0: raise PictureError(f"port {port} is already in use: pass --port")
    return port


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None: raise PictureError(f"heptapod-app exited with status {proc.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200: return
        except OSError: pass
        time.sleep(0.5)
    raise PictureError(f"heptapod-app did not answer on {url} within {timeout:.0f} s")


def find_chromium(explicit: str | None = None) -> str:
    for c in ([explicit] if explicit else []) + ["chromium", "chromium-browser", "google-chrome"]:
        p = shutil.which(c) if c else None
        if p: return p
    raise PictureError("no chromium found: `apt-get install -y chromium` (or pass --chromium PATH)")


def _wait_stable(page, selector: str, quiet_s: float = 2.0, timeout_s: float = 120) -> None:
    "Wait until the src of `selector` has not changed for `quiet_s` seconds."
    t0, last, since = time.time(), None, time.time()
    while time.time() - t0 < timeout_s:
        src = page.locator(selector).get_attribute("src")
        if src != last: last, since = src, time.time()
        elif time.time() - since >= quiet_s: return
        page.wait_for_timeout(200)
    raise PictureError(f"{selector} kept changing for {timeout_s:.0f} s")


def _shot_playwright(chromium: str, url: str, path: Path, size=(1400, 1600), cls: int = 3, step: int = 24) -> bool:
    """Open the app, generate a `cls` (the panels stream in), move the step slider back to `step`, click a cell of
    the holistic guess (its top codes appear), screenshot. False when playwright is not installed."""
    try: from playwright.sync_api import sync_playwright, Error as PlaywrightError
    except ImportError: return False
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu",
                                                                         "--disable-background-networking"])
            try:
                page = browser.new_page(viewport={"width": size[0], "height": size[1]})
                page.set_default_timeout(120_000)
                page.goto(url, wait_until="load", timeout=60_000)   # not networkidle: Gradio keeps a stream open
                page.locator("#generate-btn").wait_for(state="visible")
                page.get_by_label("class (0-9)").first.fill(str(cls))
                page.locator("#generate-btn").click()
                page.wait_for_function("() => { const s = document.querySelector('#step input[type=number]');"
                                       " return s && s.value !== '0' && s.value === document.querySelector("
                                       "'#step input[type=range]').max; }")                   # the stream ended
                old = page.locator("#panels img").get_attribute("src")
                page.locator("#step input[type=range]").focus(); page.keyboard.press("Home")
                for _ in range(step): page.keyboard.press("ArrowRight")
                page.wait_for_function(f"() => document.querySelector('#step input[type=number]').value === '{step}'"
                                       " && document.querySelector('#panels img').src !== " + repr(old))
                _wait_stable(page, "#panels img")                    # every queued scrub has drawn: the last one shows
                img = page.locator("#panels img"); box = img.bounding_box()
                f = box["width"] / img.evaluate("i => i.naturalWidth")
                x, y = 12 + 224 + 20 + 4.5 * 28, 38 + 28 + 4.5 * 28   # app.layout(): the guess panel, row 4, column 4
                page.mouse.click(box["x"] + x * f, box["y"] + y * f)
                page.wait_for_function("() => document.querySelectorAll('#topk img').length >= 5")
                page.wait_for_timeout(1000)
                page.screenshot(path=str(path))
            finally:
                browser.close()
    except PlaywrightError as e:
        raise PictureError(f"browser: {str(e).splitlines()[0]}") from None
    return True


def _shot_cli(chromium: str, url: str, path: Path, size=(1400, 1400)) -> None:
    with tempfile.TemporaryDirectory() as prof:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               f"--user-data-dir={prof}", "--hide-scrollbars", "--virtual-time-budget=15000",
               f"--window-size={size[0]},{size[1]}", f"--screenshot={path}", url]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if p.returncode != 0 or not path.is_file():
        raise PictureError(f"chromium screenshot failed (status {p.returncode}): {p.stderr.strip()[-500:]}")


def make_app_screenshot(out: Path, port: int = 7871, chromium: str | None = None, start_timeout: float = 180) -> Path:
    "Start `heptapod-app --port PORT` in the background, screenshot it in headless Chromium, stop it."
    chromium = find_chromium(chromium)
    app = ROOT / ".venv" / "bin" / "heptapod-app"
    if not app.is_file(): app = Path(shutil.which("heptapod-app") or app)
    if not app.is_file(): raise PictureError("heptapod-app not found: run `make setup` first")
    _free_port(port)
    env = dict(os.environ, **APP_ENV)
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen([str(app), "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)          # own process group: stopped as one below
    url = f"http://127.0.0.1:{port}/"
    out.mkdir(parents=True, exist_ok=True)
    path, tmp = out / "app.png", out / "app.tmp.png"
    try:
        _wait_http(url, proc, start_timeout)
        if not _shot_playwright(chromium, url, tmp):
            print("  (playwright not installed: screenshot of the app as it opens, before Generate)")
            _shot_cli(chromium, url, tmp)
        os.replace(tmp, path)
    except PictureError as e:
        log.seek(0)
        raise PictureError(f"{e}\n--- heptapod-app log (last lines) ---\n{log.read()[-2000:]}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try: proc.wait(10)
            except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL); proc.wait()
        log.close(); os.unlink(log.name)
        tmp.unlink(missing_ok=True)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="make_pictures.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(PICTURES), help=f"comma-separated subset of {','.join(PICTURES)}")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="folder for the PNGs (default docs/images)")
    ap.add_argument("--port", type=int, default=7871, help="port for the app while it is screenshotted (default 7871)")
    ap.add_argument("--chromium", default=None, help="chromium executable (default: found on PATH)")
    ap.add_argument("--ablation-results", type=Path, default=ROOT / "bench" / "results" / "window_ablation_900.json")
    a = ap.parse_args(argv)
    which = [w.strip() for w in a.only.split(",") if w.strip()]
    bad = [w for w in which if w not in PICTURES]
    if bad or not which: ap.error(f"--only takes names from {', '.join(PICTURES)}, got {a.only!r}")
    makers = {"filmstrip": lambda: make_filmstrip(a.out), "ablation": lambda: make_ablation(a.out, a.ablation_results),
              "app": lambda: make_app_screenshot(a.out, a.port, a.chromium)}
    failed = 0
    for w in which:
        t0 = time.time()
        try:
            p = makers[w]()
            print(f"{w:10s} -> {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}  ({time.time() - t0:.1f} s)")
        except (PictureError, OSError, ValueError) as e:
            print(f"make_pictures.py: error: {w}: {e}", file=sys.stderr); failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
