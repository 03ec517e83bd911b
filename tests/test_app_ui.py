"""The app in a real browser: Playwright drives headless Chromium through the page as a user would (Generate, the
step slider, a click on a cell, the tabs, a drawing on the sketchpad, Compare), checks that the pictures change and
that no error toast appears, and keeps screenshots in tests/_artifacts/ (git-ignored).

Skipped, with the reason, where the `playwright` package or a `chromium` executable is missing
(`pip install playwright`, `apt-get install chromium`). The app runs in-process on a free 127.0.0.1 port with small
untrained weights (the page's code paths are the same; the pictures are noise)."""
import shutil, socket
from pathlib import Path

import pytest

import io

import numpy as np
from PIL import Image

from heptapod_nb.app import HeptapodApp
from heptapod_nb.app_cli import launch
from heptapod_nb.bundle import load_bundle, write_untrained_weights

ART = Path(__file__).parent / "_artifacts"
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
try:
    from playwright.sync_api import sync_playwright
except ImportError:                                   # an optional dev dependency: skip, do not fail
    sync_playwright = None

pytestmark = [pytest.mark.skipif(sync_playwright is None, reason="playwright is not installed (pip install playwright)"),
              pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")]
TIMEOUT_MS = 60_000                                   # a loaded 2-core machine: generous waits, never fixed sleeps


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(write_untrained_weights(tmp_path_factory.mktemp("weights")), "cpu")


@pytest.fixture(scope="module")
def page(bundle):
    port = _free_port()
    blocks = launch(bundle, "127.0.0.1", port, block=False)
    ART.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(TIMEOUT_MS)
        pg.goto(f"http://127.0.0.1:{port}/", wait_until="load")
        pg.locator("#generate-btn").wait_for()
        yield pg
        browser.close()
    blocks.close()


def _src(page, elem_id: str) -> str:
    "The src of the image shown in component `elem_id` ('' when none)."
    loc = page.locator(f"#{elem_id} img")
    return loc.first.get_attribute("src") or "" if loc.count() else ""


def _wait_src_change(page, elem_id: str, old: str) -> str:
    page.wait_for_function("([id, old]) => { const i = document.querySelector(`#${id} img`);"
                           " return i && i.src && i.src !== old && i.complete; }", arg=[elem_id, old])
    return _src(page, elem_id)


def _shown(page, elem_id: str) -> np.ndarray:
    "The pixels of the image shown in component `elem_id`, once no queued update changes it for 1.5 s."
    src, since = None, 0.0
    for _ in range(600):
        now = _src(page, elem_id)
        if now != src: src, since = now, 0.0
        elif since >= 1.5: break
        page.wait_for_timeout(100); since += 0.1
    return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))


def _slider(page, elem_id: str) -> int:
    return int(page.locator(f"#{elem_id} input[type=number]").input_value())


def _no_error_toast(page):
    errors = page.locator(".toast-body.error, [data-testid='toast-body'].error")
    assert errors.count() == 0, f"error toast: {errors.first.inner_text()}"


def _shot(page, name: str):
    page.screenshot(path=str(ART / f"ui_{name}.png"), full_page=True)


def test_generate_streams_then_slider_scrubs(page, bundle):
    """Generate: the panels change while streaming and the slider ends on the last step; moving the slider
    redraws the panels and the entropy plot, and once the drag's events are drawn the page shows exactly step 20."""
    old = _src(page, "panels")
    page.locator("#generate-btn").click()
    _wait_src_change(page, "panels", old)
    page.wait_for_function("() => document.querySelector('#step input[type=number]').value === "
                           "document.querySelector('#step input[type=range]').max")      # the stream ended
    last, plot = _src(page, "panels"), _src(page, "entropy-plot")
    assert _slider(page, "step") == 64 and last != old
    rng = page.locator("#step input[type=range]")
    rng.focus(); page.keyboard.press("Home")
    for _ in range(20): page.keyboard.press("ArrowRight")          # a user's keyboard/drag: the `input` event
    _wait_src_change(page, "panels", last)
    page.wait_for_function("() => document.querySelector('#step input[type=number]').value === '20'")
    _wait_src_change(page, "entropy-plot", plot)                    # the red marker moved
    app = HeptapodApp(bundle, frame_s=0)                             # the page's run, remade: seeds make it the same
    want_panels, want_plot = app.frame(app.generate(0, 0, app.temperature), 20, "pixel_var")   # the page's default map
    assert np.array_equal(_shown(page, "panels"), want_panels), "the panels do not show the slider's step"
    assert np.array_equal(_shown(page, "entropy-plot"), want_plot)
    _no_error_toast(page); _shot(page, "generate")


def test_click_a_cell_shows_top_codes(page):
    "A click on a cell of the holistic-guess panel lists the top codes there, each drawn."
    img = page.locator("#panels img")
    box = img.bounding_box()
    nat_w = img.evaluate("i => i.naturalWidth")
    f = box["width"] / nat_w                                        # the page may scale the picture down
    x, y = 12 + 224 + 20 + 6.5 * 28, 38 + 28 + 5.5 * 28            # layout(): guess panel, row 5 column 6
    page.mouse.click(box["x"] + x * f, box["y"] + y * f)
    page.wait_for_function("() => document.querySelectorAll('#topk img').length >= 5")
    assert "row 5, column 6" in page.locator("#topk-text").inner_text()
    _no_error_toast(page); _shot(page, "click")


def test_draw_and_complete(page):
    """Switch tab, draw a stroke on the sketchpad with the mouse, Complete: the prediction and completions appear.
    The brush is picked when the tab opens (Gradio's sketchpad opens with no tool: a first stroke drew nothing)."""
    page.get_by_role("tab", name="Complete my drawing").click()
    page.wait_for_timeout(500)                                     # the tab's script picks the brush
    canvas = page.locator("#sketch canvas").last
    canvas.wait_for()
    b = canvas.bounding_box()
    cx, cy = b["x"] + b["width"] / 2, b["y"] + b["height"] / 2
    page.mouse.move(cx, cy - 0.3 * b["height"]); page.mouse.down()
    for i in range(1, 13): page.mouse.move(cx + 0.02 * b["width"] * (i % 2), cy - 0.3 * b["height"] + 0.05 * b["height"] * i)
    page.mouse.up()
    page.locator("#complete-btn").click()
    _wait_src_change(page, "prediction", "")
    page.wait_for_function("() => document.querySelectorAll('#completions img').length >= 4")
    _no_error_toast(page); _shot(page, "complete")


def test_compare_side_by_side(page):
    "Compare: both models' panels and the entropy curves appear, then the step slider moves both."
    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare-btn").click()
    a = _wait_src_change(page, "compare-heptapod", "")
    page.wait_for_function("() => document.querySelector('#kstep input[type=number]').value === "
                           "document.querySelector('#kstep input[type=range]').max")
    a, b = _src(page, "compare-heptapod"), _src(page, "compare-baseline")
    assert b and _src(page, "compare-plot")
    wa = page.locator("#compare-heptapod img").bounding_box()["width"]
    assert wa > 500, f"compare panels are {wa:.0f} px wide"        # readable, not a thumbnail
    page.locator("#kstep input[type=range]").focus(); page.keyboard.press("Home")
    _wait_src_change(page, "compare-heptapod", a); _wait_src_change(page, "compare-baseline", b)
    _no_error_toast(page); _shot(page, "compare")
