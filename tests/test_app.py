"The Gradio app driven through gradio_client (streaming included), and a real headless Chromium screenshot."
import json, os, shutil, socket, subprocess, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from heptapod_nb.app import HeptapodApp
from heptapod_nb.app_cli import build_parser, launch, main
from heptapod_nb.app_ui import build_blocks
from heptapod_nb.bundle import load_bundle, missing_demo_files, write_untrained_weights
from heptapod_nb.inputs import InputError, image_to_input
from heptapod_nb.streaming import stream_steps
from heptapod_nb.demo import demo_cli

ART = Path(__file__).parent / "_artifacts"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_untrained_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def server(weights):
    bundle = load_bundle(weights, "cpu")
    port = _free_port()
    blocks = launch(bundle, "127.0.0.1", port, block=False)          # as heptapod-app serves it (show_error=False)
    yield f"http://127.0.0.1:{port}/", bundle
    blocks.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client
    return Client(server[0], verbose=False)


def _img(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_returns_images_and_trace(client, server):
    panels, plot, step, final, strip, summary = client.predict(3, 0, 1.0, 0, "raster", 1, "entropy", False,
                                                               api_name="/generate")
    f, p = _img(final), _img(panels)
    assert f.shape[1] >= 256 and f.std() > 0
    assert p.shape[1] > 3 * p.shape[0] and p.shape[0] >= 224      # four large panels side by side
    assert _img(plot).std() > 0 and _img(strip).shape[1] > 800
    n = server[1].n_positions
    assert summary["steps"] == n and summary["seen"][:3] == [0, 1, 2] and len(summary["mean_entropy"]) == n
    assert all(e is not None and e >= 0 for e in summary["mean_entropy"])


def test_step_slider_scrubs_the_trace(client):
    client.predict(1, 7, 1.0, 0, "raster", 2, "entropy", False, api_name="/generate")
    (a, pa), (b, pb), (c, pc) = [[_img(x) for x in client.predict(t, "entropy", False, api_name="/scrub")] for t in (2, 20, 2)]
    assert a.shape == b.shape and not np.array_equal(a, b) and not np.array_equal(pa, pb)   # the plot marks the step
    assert np.array_equal(a, c) and np.array_equal(pa, pc)          # the same step gives the same picture (cached)
    d = _img(client.predict(2, "final_prob", True, api_name="/scrub")[0])
    assert not np.array_equal(a, d) and d.shape == a.shape          # still four panels with the overlay


@pytest.mark.parametrize("args, msg", [
    ((10, 0, 1.0, 0, "raster", 1), "class must be an integer from 0 to 9"),
    ((-3, 0, 1.0, 0, "raster", 1), "class must be an integer from 0 to 9"),
    ((0, 0, 0.0, 0, "raster", 1), "temperature must be a number > 0"),
    ((0, 0, -2.0, 0, "raster", 1), "temperature must be a number > 0"),
    ((0, 0, 1.0, 0, "raster", 0), "tokens per step must be"),
])
def test_bad_generate_inputs_give_errors(client, args, msg):
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError, match=msg):
        client.predict(*args, "entropy", False, api_name="/generate")


def _png(tmp_path, arr, name):
    p = tmp_path / name; Image.fromarray(arr).save(p); return str(p)


def test_complete_my_drawing(client, tmp_path):
    from gradio_client import handle_file
    from heptapod_nb.data import load_mnist5k
    x = load_mnist5k("val").images[0, 0].numpy()
    paper = (255 - (x + 1) * 127.5).astype(np.uint8)               # black ink on white paper
    up = handle_file(_png(tmp_path, np.asarray(Image.fromarray(paper).resize((200, 200))), "digit.png"))
    pred, gallery = client.predict(None, up, 0, 24, 3, 0, 1.0, False, api_name="/complete")
    assert _img(pred).shape[1] > 4 * 224 and _img(pred).shape[0] >= 224
    assert len(gallery) == 3


def test_bad_drawings_give_errors(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError
    blank = handle_file(_png(tmp_path, np.full((280, 280, 3), 255, np.uint8), "blank.png"))
    with pytest.raises(AppError, match="the drawing is empty"):
        client.predict(None, blank, 0, 24, 2, 0, 1.0, False, api_name="/complete")
    with pytest.raises(AppError, match="the drawing is empty"):
        client.predict(None, None, 0, 24, 2, 0, 1.0, False, api_name="/complete")
    huge = np.zeros((1500, 1500, 3), np.uint8); huge[600:900, 700:800] = 255
    with pytest.raises(AppError, match="too large"):
        client.predict(None, handle_file(_png(tmp_path, huge, "huge.png")), 0, 24, 2, 0, 1.0, False, api_name="/complete")
    pen = handle_file(_png(tmp_path, np.asarray(Image.new("RGB", (64, 64), "white")).copy(), "p.png"))
    with pytest.raises(AppError, match="class must be"):
        img = np.full((64, 64, 3), 255, np.uint8); img[10:50, 30:34] = 0
        client.predict(None, handle_file(_png(tmp_path, img, "one.png")), 11, 24, 2, 0, 1.0, False, api_name="/complete")


def test_compare_same_step(client):
    a, b, plot, step = client.predict(2, 5, 1.0, 1, "entropy", api_name="/compare")
    a2, b2, plot2 = client.predict(30, "entropy", api_name="/compare_scrub")
    for x, y in ((a, a2), (b, b2), (plot, plot2)): assert not np.array_equal(_img(x), _img(y))
    assert not np.array_equal(_img(a2), _img(b2)) and _img(a2).shape == _img(b2).shape      # side by side, same size


def _val(x):
    "A component's value from a streamed output (Gradio sends a slider's update as a dict)."
    return x["value"] if isinstance(x, dict) and "value" in x else x


def _frames(job, timeout=300):
    "Every output a streaming job yielded, in order (waits for the end)."
    job.result(timeout=timeout)
    return job.outputs()


def test_generate_streams_each_step_then_play_replays(client, server):
    """/generate yields its steps one by one (the slider follows), the guess changing as the model draws, and ends
    on the finished image; /play replays the same frames from the session's cached run."""
    outs = _frames(client.submit(3, 0, 1.0, 0, "raster", 8, "entropy", False, api_name="/generate"))
    want = stream_steps(server[1].n_positions // 8 + 1, 17)                 # 8 steps of 8 tokens, then the image
    assert [_val(o[2]) for o in outs] == want == list(range(9))
    pan = [_img(o[0]) for o in outs]
    assert all(not np.array_equal(a, b) for a, b in zip(pan, pan[1:]))      # every frame shows a new step
    assert len({p.shape for p in pan}) == 1
    assert outs[-1][5]["steps"] == 8 and _img(outs[-1][3]).std() > 0       # the last frame brings image and trace
    replay = _frames(client.submit("entropy", False, api_name="/play"))
    assert [_val(o[2]) for o in replay] == want
    # the stream was live: its frames are the replay's but for p(final token) (the 4th panel, known only at the end)
    # and the guess decoded alone instead of in one batch of every step (float32 rounding: a pixel at most 1 level)
    x3 = 12 + 3 * (224 + 20) + 62                                      # layout(): where the 4th panel starts
    rep = [_img(r[0]) for r in replay]
    assert all(np.abs(r[:, :x3 - 1].astype(int) - p[:, :x3 - 1]).max() <= 1 for r, p in zip(rep, pan))
    assert not any(np.array_equal(r, p) for r, p in zip(rep[:-1], pan[:-1])) and np.array_equal(rep[-1], pan[-1])


def test_compare_streams_both_models_in_step(client):
    outs = _frames(client.submit(4, 1, 1.0, 8, "entropy", api_name="/compare"))
    assert [_val(o[3]) for o in outs] == list(range(9))
    a, b = [_img(o[0]) for o in outs], [_img(o[1]) for o in outs]
    assert not np.array_equal(a[1], a[-2]) and not np.array_equal(b[1], b[-2])   # both sides move
    assert a[0].shape == b[0].shape


def test_streams_yield_outside_the_lock(server):
    """While a stream is suspended at a yield (a slow browser), the model set is free: another generation runs.
    (Holding `using` across the yield deadlocks this check: the lock is never released.)"""
    app = HeptapodApp(server[1], workers=1, frame_s=0)
    for stream in (app.generate_stream(1, 1, 1.0, 0, "raster", 8), app.compare_stream(1, 1, 1.0, 8)):
        next(stream)
        done = []
        th = threading.Thread(target=lambda: done.append(app.generate(2, 2, 1.0, 0, "raster", 16)), daemon=True)
        th.start(); th.join(timeout=60)
        assert done, "a suspended stream still holds the model set"
        assert len(list(stream)) > 1


def _gate(model, after: int):
    "Make `model` block in its backbone (`model.step`) after `after` calls, until the returned event is set."
    gate, calls, real = threading.Event(), [], model.step
    def gated(*a, **k):
        calls.append(1)
        if len(calls) > after: gate.wait()
        return real(*a, **k)
    model.step = gated                                                  # an instance attribute: this model only
    return gate, calls


def _late_first_frame(app, what):
    "The first frame of a stream drawn only once the worker has recorded every step (a slow reader)."
    feeds, start, figure = [], app._start, app.live_figure
    def late_figure(live, t, *a, **k):
        for key in feeds[-1].lives: feeds[-1].run(key)                 # every step in, the Runs made
        return figure(live, t, *a, **k)
    app._start = lambda jobs: feeds.append(start(jobs)) or feeds[-1]
    app.live_figure = late_figure
    try:
        s = app.generate_stream(1, 1, 1.0, 0, "raster", 1) if what == "generate" else app.compare_stream(1, 1, 1.0, 1)
        out = next(s); s.close()
    finally: del app._start, app.live_figure
    assert all(len(live.steps) == 64 for live in feeds[-1].lives.values())
    return out


@pytest.mark.parametrize("what", ["generate", "compare"])
def test_first_frame_arrives_while_the_model_still_generates(weights, what):
    """The stream is live: its first frame is yielded while the model is still generating. The backbone is gated
    after its third call (the prefill and two steps), so the generation cannot end before the gate opens: the first
    frame must arrive with the worker held there, fewer than T steps recorded. (The old "generate, then replay"
    stream waits for the whole generation before its first frame: it never comes here.) Then closing the stream
    (a browser that left) leaves the worker to finish and release the model set: the next generation runs."""
    bundle = load_bundle(weights, "cpu")                                # its own models: the gate touches no other test
    app = HeptapodApp(bundle, workers=1, frame_s=0)
    gates = [_gate(m, 3) for m in (bundle.model, bundle.baseline)]
    stream = app.generate_stream(1, 1, 1.0, 0, "raster", 1) if what == "generate" else app.compare_stream(1, 1, 1.0, 1)
    got = []
    try:
        th = threading.Thread(target=lambda: got.append(next(stream)), daemon=True)
        th.start(); th.join(timeout=120)                                # on the failure path only: it never arrives
        first, calls = list(got), [len(c) for _, c in gates]
    finally:
        for g, _ in gates: g.set()
    assert first, "no frame before the generation ended: the stream is not live"
    lives, t = first[0][:2]
    for live, n in zip(lives if what == "compare" else [lives], calls):
        assert t == 0 and 1 <= len(live.steps) <= 3 < live.T == 64 and n <= 4     # the worker: at most at its gate
    late = _late_first_frame(app, what)            # the same stream read after the whole generation: the same frame
    assert all(np.array_equal(x, y) for x, y in zip(first[0][2:], late[2:]))
    stream.close()                                                      # the browser left
    done = []
    th = threading.Thread(target=lambda: done.append(app.generate(2, 2, 1.0, 0, "raster", 16)), daemon=True)
    th.start(); th.join(timeout=120)
    assert done and done[0].T == 4, "a closed stream left the model set held"


def test_concurrent_streams_equal_the_same_streams_alone(server):
    """6 streaming calls (/generate and /compare) at once from 3 clients: their generations are batched, and under
    load a stream may skip intermediate frames (issue 24), but its first and final frames always come, its steps
    only move forward, and every frame that comes equals the same call's frame at that step made alone."""
    from gradio_client import Client
    calls = ([("/generate", (c, 30 + c, 1.0, 0, "raster", 16, "entropy", False)) for c in range(4)]
             + [("/compare", (c, 40 + c, 1.0, 16, "entropy")) for c in range(2)])
    clients = [Client(server[0], verbose=False) for _ in range(3)]
    def by_step(outs, api):
        i = 2 if api == "/generate" else 3                          # the step slider among the outputs
        return [(_val(o[i]), _pixels(o)) for o in outs]
    alone = [by_step(_frames(clients[0].submit(*args, api_name=api)), api) for api, args in calls]
    jobs = [clients[i % 3].submit(*args, api_name=api) for i, (api, args) in enumerate(calls)]
    together = [by_step(_frames(j), api) for j, (api, _) in zip(jobs, calls)]
    for i, (got, want) in enumerate(zip(together, alone)):
        want = dict(want)
        steps = [t for t, _ in got]
        assert steps[0] == 0 and steps[-1] == max(want) and steps == sorted(set(steps)), (i, steps)
        for t, pics in got:
            assert len(pics) == len(want[t]) > 0 and all(np.array_equal(a, b) for a, b in zip(pics, want[t])), \
                f"call {i} {calls[i][0]} differs at step {t}"


def _first_code(caption: str) -> int:
    "The most likely code of a click caption: 'p = 0.300, code 12' or 'p = 0.600, 5 codes alike: 12, 40, 7, ...'."
    import re
    return int(re.search(r"(?:code |alike: )(\d+)", caption).group(1))


def _p(caption: str) -> float:
    import re
    return float(re.match(r"p = ([0-9.]+)", caption).group(1))


def test_click_groups_codes_that_decode_alike():
    """Issue 25: the click panel showed the top five codes, often five names of one black patch (of the bundled
    tokenizer's 512 codes, 271 decode darker than 5% grey). It now shows up to five most likely *looks*: no two shown
    looks decode alike (their patches differ by >= ALIKE_TOL on average), every code of a look decodes like its
    first, and a look's probability is its codes' sum (float16 probabilities: 1e-3). Bundled demo weights, a
    background cell of a generation (before: the first two codes shown decoded alike)."""
    import torch
    from heptapod_nb.charts import layout, which_panels
    from heptapod_nb.viz import ALIKE_TOL, code_patches, group_alike
    app = HeptapodApp(load_bundle(None, "cpu"), frame_s=0)
    run = app.generate(1, 0, 0.6, 0, "raster", 1)
    v, t = run.view, 8                                              # step 8: the first token row seen
    P = v.image_size[0] * v.scale
    lay = layout(which_panels(v, "entropy"), (P, P))
    tbl = code_patches(app.b.tokenizer)
    for r, c in ((7, 0), (6, 7)):                                   # bottom corners: background
        x, y = lay.boxes[1][0] + (c + 0.5) * P / v.grid[1], lay.boxes[1][1] + (r + 0.5) * P / v.grid[0]
        text, pics = app.cell_topk(run, t, x, y)
        firsts = [_first_code(cap) for _, cap in pics]
        assert 1 <= len(pics) <= 5 and "grouped" in text             # fewer when the top 64 codes make fewer looks
        assert all((tbl[a] - tbl[b]).abs().mean() >= ALIKE_TOL for i, a in enumerate(firsts) for b in firsts[i + 1:])
        groups = dict((g[0], g) for g, _ in group_alike(run.probs[t, r, c].float(), tbl))
        p = run.probs[t, r, c].float()
        for k, (_, cap) in zip(firsts, pics):
            assert all((tbl[j] - tbl[k]).abs().mean() < ALIKE_TOL for j in groups[k])
            assert abs(_p(cap) - float(p[groups[k]].sum())) < 1e-3
        assert len(groups[firsts[0]]) > 1                              # a background cell: many codes, one look


def test_click_on_a_cell_vq_codes_and_kl_draws(server, tmp_path):
    """A click maps to its grid cell: VQ lists the top codes with the trace's probabilities (sorted, the first the
    cell's max), each drawn in place; KL shows draws of the diffusion head; seen cells and clicks outside say so."""
    import torch
    from heptapod_nb.charts import layout, which_panels, outlined, heatmaps_for
    from heptapod_nb.config import images_to_uint8
    for bundle in (server[1], load_bundle(write_untrained_weights(tmp_path, tokenizer="tiny-kl"), "cpu")):
        app = HeptapodApp(bundle, frame_s=0)
        run = app.generate(2, 3, 1.0, 0, "raster", 8)
        v = run.view; P = v.image_size[0] * v.scale
        lay = layout(which_panels(v, "entropy"), (P, P))
        x, y = lay.boxes[1][0] + 6.5 * P / v.grid[1], lay.boxes[1][1] + 5.5 * P / v.grid[0]
        text, pics = app.cell_topk(run, 2, x, y)                   # step 2 of 8: 16 tokens seen, (5, 6) unseen
        assert "row 5, column 6" in text and len(pics) == 5
        grids = [p.astype(float) for p, _ in pics]
        assert all(not np.array_equal(grids[0], g) for g in grids[1:]), "the candidates draw the same picture"
        if v.kind == "vq":
            ps = [_p(c) for _, c in pics]
            assert ps == sorted(ps, reverse=True) and ps[0] >= float(run.probs[2, 5, 6].float().max()) - 1e-3
            codes = torch.tensor([_first_code(c) for _, c in pics])
            g = run.guess[2].expand(5, -1, -1).clone(); g[:, 5, 6] = codes       # each code at the clicked cell
            with torch.no_grad(): want = images_to_uint8(bundle.tokenizer.decode(g).float())
            assert all(np.array_equal(outlined(a, 5, 6, v.cell), p) for a, (p, _) in zip(want, pics))
        else:
            assert run.probs is None and "diffusion" in text
            assert app.heatmaps() == heatmaps_for(v) == ["pixel_var", "entropy"]      # KL: variance of its draws first
            assert np.isfinite(v.heat(2, "pixel_var")).sum() == 48 and app.frame(run, 2, "pixel_var")[0].ndim == 3
        assert "already seen" in app.cell_topk(run, 2, lay.boxes[0][0] + 2, lay.boxes[0][1] + 2)[0]
        assert "inside one of the panels" in app.cell_topk(run, 2, 1, 1)[0]
        assert "finished image" in app.cell_topk(run, run.T, x, y)[0]


def test_cli_defaults_and_missing_weights(tmp_path, capsys, monkeypatch):
    args = build_parser("heptapod-app").parse_args([])
    assert args.host == "127.0.0.1"
    held, port = _port_in_use()                # issue 24: another app holding the port must not change the answer
    monkeypatch.setenv("GRADIO_SERVER_PORT", str(port))
    with held: assert main(["--weights", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("heptapod-app: error: weights folder") and "heptapod-demo --retrain" in err and err.count("\n") == 1
    assert set(missing_demo_files(tmp_path)) == {"tokenizer.safetensors", "heptapod.safetensors", "baseline.safetensors"}


def _port_in_use():
    "A listening socket on a free port (held until closed): a port another program holds."
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1)
    return s, s.getsockname()[1]


@pytest.mark.parametrize("cli, argv, msg", [
    (main, ["--device", "tpu"], "--device: device 'tpu' is not a device torch knows"),
    (main, ["--port", "0"], "argument --port: must be an integer from 1 to 65535, got 0"),
    (main, ["--workers", "0"], "argument --workers: must be an integer >= 1, got 0"),
    (demo_cli, ["--device", "tpu", "--no-launch"], "--device: device 'tpu' is not a device torch knows"),
    (demo_cli, ["--weights", __file__, "--no-launch"], "is a file, not a folder"),
    (demo_cli, ["--minutes", "-1", "--no-launch"], "argument --minutes: must be a finite number > 0, got -1"),
])
def test_cli_user_errors_exit_2_with_one_line(cli, argv, msg, capsys):
    assert cli(argv) == 2
    err = capsys.readouterr().err
    prog = "heptapod-app" if cli is main else "heptapod-demo"
    assert msg in err and err.splitlines()[-1].startswith(f"{prog}: error: ") and "Traceback" not in err, err


def test_cli_port_in_use_and_gradio_server_port(weights, capsys, monkeypatch):
    sock, port = _port_in_use()
    with sock:
        assert main(["--weights", str(weights), "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert err == f"heptapod-app: error: cannot serve on 127.0.0.1:{port}: Address already in use (another program holds it? choose another with --port or GRADIO_SERVER_PORT)\n", err
        monkeypatch.setenv("GRADIO_SERVER_PORT", str(port))        # no --port: the environment's port is the one used
        for cli in (main, demo_cli):
            assert cli(["--weights", str(weights)]) == 2
            assert f"cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err
    monkeypatch.setenv("GRADIO_SERVER_PORT", "http")
    assert main(["--weights", str(weights)]) == 2
    assert capsys.readouterr().err == "heptapod-app: error: GRADIO_SERVER_PORT must be an integer from 1 to 65535, got 'http'\n"
    assert demo_cli(["--weights", str(weights), "--no-launch"]) == 0    # --no-launch needs no port; the weights exist
    for prog in ("heptapod-app", "heptapod-demo"):
        h = " ".join(build_parser(prog).format_help().split())
        assert "--port PORT port to serve on (default: the GRADIO_SERVER_PORT environment variable, else 7860)" in h
        assert "--debug" in h


def test_console_script_exit_status(tmp_path):
    "The installed `heptapod-app` exits 2 with one line (no traceback) for a missing weights folder; --debug shows it."
    exe = Path(sys.executable).parent / "heptapod-app"
    if not exe.exists(): pytest.skip("heptapod-app is not installed in this environment (pip install -e .)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(exe), "--weights", str(tmp_path / "nope"), "--port", str(_free_port())],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("heptapod-app: error: weights folder"), r.stderr


@pytest.mark.parametrize("api, args, msg", [
    ("/generate", ("abc", 0, 1.0, 0, "raster", 1, "entropy", False), "class must be an integer from 0 to 9, got 'abc'"),
    ("/generate", (3.5, 0, 1.0, 0, "raster", 1, "entropy", False), "class must be an integer from 0 to 9, got 3.5"),
    ("/generate", (3, 0, "hot", 0, "raster", 1, "entropy", False), "temperature must be a number > 0, got 'hot'"),
    ("/generate", (3, 0.5, 1.0, 0, "raster", 1, "entropy", False), "seed must be an integer"),
    ("/generate", (3, 0, 1.0, 0, "zigzag", 1, "entropy", False), "order must be one of ('raster', 'random'), got 'zigzag'"),
    ("/compare", (3.5, 0, 1.0, 1, "entropy"), "class must be an integer from 0 to 9, got 3.5"),
    ("/compare", (3, 0, 1.0, 1, "hot"), "heatmap must be one of"),
    ("/scrub", ("abc", "entropy", False), "step must be an integer"),
])
def test_bad_values_refused_in_words_with_one_log_line(client, api, args, msg, capfd):
    from gradio_client.exceptions import AppError
    capfd.readouterr()
    with pytest.raises(AppError) as e:
        client.predict(*args, api_name=api)
    assert str(e.value) == msg or str(e.value).startswith(msg), str(e.value)    # never rounded, never Python's own words
    err = capfd.readouterr().err
    assert [l for l in err.splitlines() if l.strip()] == [f"heptapod-app: refused input: {e.value}"], err


_FILE = lambda path: {"path": path, "meta": {"_type": "gradio.FileData"}}
_UPLOAD = "(upload it first: POST /gradio_api/upload, or gradio_client's handle_file)"


@pytest.mark.parametrize("api, data, msg", [
    ("generate", [3], "/generate takes 8 input values, got 1"),
    ("scrub", [], "/scrub takes 4 input values, got 0"),
    ("complete", [None, _FILE("/etc/passwd"), 0, 24, 2, 0, 1.0, False],
     f"/complete: a file in the request was not uploaded to this app {_UPLOAD}"),
    ("complete", [{"background": _FILE("/nonexistent/digit.png"), "layers": [], "composite": None}, None, 0, 24, 2, 0, 1.0, False],
     f"/complete: a file in the request was not uploaded to this app {_UPLOAD}"),
    ("complete", [None, "digit.png", 0, 24, 2, 0, 1.0, False], f"/complete: an image input is not a file {_UPLOAD}"),
])
def test_malformed_requests_refused_in_words_with_one_log_line(server, api, data, msg, capfd):
    """Issue 24: a request (plain HTTP, as any client may send) with too few input values or a file path that was never
    uploaded is refused with a sentence and one log line. (Before: Gradio's generic error, `null` on the wire, and a
    traceback on the server's log.)"""
    import httpx
    url = f"{server[0]}gradio_api/call/{api}"
    capfd.readouterr()
    event = httpx.post(url, json={"data": data}, timeout=60).json()["event_id"]
    lines = httpx.get(f"{url}/{event}", timeout=120).text.splitlines()
    assert lines[0] == "event: error" and json.loads(lines[1].removeprefix("data: "))["error"] == msg, lines
    err = capfd.readouterr().err
    assert [l for l in err.splitlines() if l.strip()] == [f"heptapod-app: refused input: {msg}"], err


def test_fake_png_and_fractional_values_refused(client, tmp_path, capfd):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError
    fake = tmp_path / "digit.png"; fake.write_bytes(b"this is not a png, only its name says so" * 10)
    capfd.readouterr()
    with pytest.raises(AppError) as e:
        client.predict(None, handle_file(str(fake)), 0, 24, 2, 0, 1.0, False, api_name="/complete")
    assert str(e.value) == "the upload is not an image this app can read (PNG, JPEG, WebP): UnidentifiedImageError"
    err = capfd.readouterr().err
    assert "/tmp" not in str(e.value) and "Traceback" not in err and err.count("refused input") == 1, err
    ok = tmp_path / "one.png"; img = np.full((64, 64, 3), 255, np.uint8); img[10:50, 30:34] = 0
    Image.fromarray(img).save(ok)
    for args, msg in [((3.5, 24, 2), "class must be an integer from 0 to 9, got 3.5"),
                      ((3, 24.5, 2), "tokens seen must be an integer from 0 to 63, got 24.5"),
                      ((3, 24, 2.5), "number of completions must be an integer from 1 to 8, got 2.5")]:
        with pytest.raises(AppError, match=msg.replace(".", r"\.")):
            client.predict(None, handle_file(str(ok)), *args, 0, 1.0, False, api_name="/complete")


def test_compute_endpoints_share_one_queue(server):
    """/generate, /complete, /compare share one Gradio queue whose limit is the app's `admit` (they batch their
    generations, issue 24), not the model sets nor the rows of a batch; scrubbing stays outside it."""
    for workers in (1, 2):
        app = HeptapodApp(server[1], workers=workers, max_rows=4, admit=40)
        blocks = build_blocks(app, first_image=False)
        fns = {f.api_name: f for f in blocks.fns.values() if f.api_name}
        for name in ("generate", "complete", "compare"):
            assert fns[name].concurrency_id == "model" and fns[name].concurrency_limit == 40, name
        for name in ("scrub", "compare_scrub", "play"): assert fns[name].concurrency_id != "model"
    cfg = blocks.get_config_file()                                  # the checked inputs keep their frontend
    types = {c["type"] for c in cfg["components"]}
    assert {"number", "slider", "dropdown", "radio", "checkbox", "image", "imageeditor"} <= types, types
    assert not any(t.startswith("checked") for t in types)


def _pixels(out):
    "Every image in an endpoint's result (file paths, gallery items) as one list of pixel arrays."
    if isinstance(out, (list, tuple)): return [a for o in out for a in _pixels(o)]
    if isinstance(out, dict) and "image" in out: return _pixels(out["image"])
    if isinstance(out, str) and os.path.isfile(out): return [_img(out)]
    return []


def test_twenty_mixed_concurrent_calls_equal_the_same_calls_alone(server, tmp_path):
    """20 mixed /generate, /compare, /complete calls (10 kinds, twice) at once from 4 clients: each result is the same
    call's alone.
    (Before the lock and the shared queue: 0 of 20 succeeded, or wrong images with no error.)"""
    from gradio_client import Client, handle_file
    img = np.full((64, 64, 3), 255, np.uint8); img[10:50, 30:34] = 0
    up = tmp_path / "one.png"; Image.fromarray(img).save(up)
    calls = ([("/generate", (c, c, 1.0, 0, "raster", 8, "entropy", False)) for c in range(5)]
             + [("/compare", (c, 10 + c, 1.0, 8, "entropy")) for c in range(2)]     # the baseline takes all 64 steps
             + [("/complete", (None, handle_file(str(up)), c, 56, 2, 20 + c, 1.0, False)) for c in range(3)])
    clients = [Client(server[0], verbose=False) for _ in range(4)]
    alone = [_pixels(clients[0].predict(*args, api_name=api)) for api, args in calls]
    jobs = [(clients[i % 4], calls[i % len(calls)]) for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(lambda cl, c: _pixels(cl.predict(*c[1], api_name=c[0])), cl, c) for cl, c in jobs]
        together = [f.result(timeout=300) for f in futures]
    for i, got in enumerate(together):
        want = alone[i % len(calls)]
        assert len(got) == len(want) > 0 and all(np.array_equal(a, b) for a, b in zip(got, want)), f"call {i} {jobs[i][1][0]} differs"


def test_a_picture_rewritten_while_read_is_read_whole(tmp_path):
    """Two sessions showing the same picture at once (generations of one class share their first frames) make Gradio
    write it again at the same path while the other session's page fetches it: every read gets the whole file.
    (Before, Gradio 6.31 rewrote it in place: about half of such reads were short, and a page showed an empty image.)"""
    import gradio.processing_utils as pu
    from heptapod_nb.app_ui import _atomic_picture_cache
    _atomic_picture_cache()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    path = pu.save_pil_to_cache(img, str(tmp_path), format="png")
    whole, done, sizes = Path(path).read_bytes(), threading.Event(), []
    def write():
        for _ in range(300): pu.save_pil_to_cache(img, str(tmp_path), format="png")
        done.set()
    writer = threading.Thread(target=write); writer.start()
    while not done.is_set(): sizes.append(len(Path(path).read_bytes()))
    writer.join()
    assert sizes and set(sizes) == {len(whole)} and Path(path).read_bytes() == whole
    assert [p.name for p in Path(path).parent.iterdir()] == [Path(path).name]     # no temporary file left behind


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name): return shutil.which(name)


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_browser_shows_generated_image(server):
    url = server[0]
    ART.mkdir(exist_ok=True)
    shot = ART / "app_screenshot.png"; shot.unlink(missing_ok=True)
    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1280,1000", "--virtual-time-budget=15000"]
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=240).stdout
    subprocess.run(flags + [f"--screenshot={shot}", url], capture_output=True, timeout=240)
    # the page loaded the app and the generated image (made at page load) is in the final-image component
    assert "Heptapod" in dom and 'id="final-image"' in dom
    final = dom.split('id="final-image"', 1)[1][:4000]
    assert "<img" in final and ("/file=" in final or "gradio_api/file" in final), "no generated image in the page"
    im = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert im.shape[0] > 500 and im.std() > 10                    # not a blank page


def test_bundled_demo_weights_fit_and_load():
    from heptapod_nb.bundle import demo_dir, DEMO_FILES
    d = demo_dir()
    if missing_demo_files(d): pytest.skip(f"demo weights not made yet in {d} (heptapod-demo --retrain)")
    assert sum((d / f).stat().st_size for f in DEMO_FILES.values()) <= 12 * 2**20
    b = load_bundle(d, "cpu")
    assert b.baseline is not None and b.baseline.config.window == 1 and b.model.config.window == "global"
    assert b.grid == tuple(b.tokenizer.grid) and 0 < HeptapodApp(b).temperature <= 2


def test_mismatched_tokenizer_is_refused_before_serving(tmp_path, capsys):
    """Issue 24: a weights folder whose model makes codes the tokenizer cannot decode printed "serving on" and then
    failed on the first generation with a token-id range error; it is refused before serving, naming both files."""
    from heptapod_nb.model import PRESETS, Heptapod, save_model
    d = write_untrained_weights(tmp_path / "w")
    save_model(Heptapod(PRESETS["tiny"].replace(vocab_size=700, dim=32, depth=1, n_heads=2, head_width=32, head_heads=2)),
               d / "heptapod.safetensors")                    # the tokenizer has 512 codes
    assert main(["--weights", str(d), "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot decode model" in err and "700 codes" in err and "serving on" not in err


def test_waiting_generations_share_model_calls_and_equal_the_calls_alone(weights, tmp_path):
    """Issue 24: generations waiting at the same time run as one batched generation (the batcher's batches hold
    several requests), each identical to the same call alone: Generate (its Run: tokens, every step's
    distributions, the pictures), Compare (both models) and Complete (its figure and completions)."""
    import torch
    bundle = load_bundle(weights, "cpu")
    app = HeptapodApp(bundle, frame_s=0, gather_s=0.5)          # a long gather: the threads below arrive together
    img = np.full((64, 64, 3), 255, np.uint8); img[10:50, 30:34] = 0
    calls = ([("generate", (c, 50 + c, 1.0, 0, "raster" if c % 2 else "random", 1)) for c in range(4)]
             + [("compare", (c, 60 + c, 1.0, 1)) for c in range(2)] + [("complete", (img, c, 24, 2, 70 + c, 1.0)) for c in range(2)])
    def call(c):
        name, args = c
        out = getattr(app, name)(*args)
        if name == "generate": return [out.tokens, out.probs, app.frame(out, 5)[0], app.final_image(out)]
        if name == "compare": return [x for r in out for x in (r.tokens, r.probs, app.frame(r, 5)[0])]
        return [out[0]] + [g for g, _ in out[1]]
    alone = [call(c) for c in calls]
    assert max(app.batcher.sizes) == 2                           # alone: one request a batch (complete: its 2 rows)
    n0 = len(app.batcher.sizes)
    with ThreadPoolExecutor(len(calls)) as pool: together = list(pool.map(call, calls))
    sizes = app.batcher.sizes[n0:]
    assert max(sizes) >= 5 and len(sizes) <= 4, sizes             # 6 Heptapod runs at 1 token a step share one batch
    eq = lambda a, b: torch.equal(a, b) if isinstance(a, torch.Tensor) else np.array_equal(a, b)
    for i, (got, want) in enumerate(zip(together, alone)):
        assert len(got) == len(want) and all(eq(a, b) for a, b in zip(got, want)), f"call {i} {calls[i][0]} differs"


def test_a_burst_runs_in_batches_of_max_rows_in_arrival_order(weights):
    """Issue 24 (p50 latency): a burst larger than `max_rows` (default 8) is cut into batches taken in arrival order,
    so the first calls end after the first batch, not all at the end of the burst (before: one batch of up to 64
    rows); each result is still the call alone's."""
    app = HeptapodApp(load_bundle(weights, "cpu"), frame_s=0, gather_s=1.0)                 # one model set
    alone = [app.generate(c % 10, 80 + c, 1.0).tokens for c in range(9)]
    runner = app.batcher.runners[0]
    batches, compute = [], runner.compute
    def spy(batch, model):                                         # the seeds of each batch, in the order they ran
        batches.append([j.rows.seed for j in batch]); compute(batch, model)
    runner.compute = spy
    def call(c):
        time.sleep(0.05 * c)                                       # arrival order 0..8, all within the gather
        return app.generate(c % 10, 80 + c, 1.0).tokens
    with ThreadPoolExecutor(9) as pool: got = list(pool.map(call, range(9)))
    assert batches == [list(range(80, 88)), [88]], batches
    assert all(torch.equal(a, b) for a, b in zip(got, alone))


def test_streams_skip_intermediate_frames_under_load(weights):
    """Issue 24: under load (another stream in progress) a stream skips intermediate frames, as a video player does,
    but its first and final frames come, and each frame equals the one the same call alone shows at that step."""
    app = HeptapodApp(load_bundle(weights, "cpu"), frame_s=0, load_frame_s=30)
    alone = {t: f for _, t, f, _ in app.generate_stream(2, 5, 1.0, 0, "raster", 4)}
    other = app.generate_stream(1, 1, 1.0, 0, "raster", 4)
    next(other)                                                   # a second stream in progress: the app is loaded
    got = list(app.generate_stream(2, 5, 1.0, 0, "raster", 4))
    other.close()
    assert [t for _, t, _, _ in got] == [0, 16] and len(alone) == 17
    assert all(np.array_equal(f, alone[t]) for _, t, f, _ in got)
    assert app.active == 0                                        # closed and finished streams are counted out


def test_bad_call_refused_while_the_model_is_busy(weights, capfd):
    """Issue 24: inputs are checked before any queue: with the model held busy (its backbone gated) by more
    generations than there are model sets, a bad call is still refused at once, in words, with one log line.
    (Before, the computing endpoints' queue admitted `workers` calls at a time: the bad call waited behind them.)"""
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    bundle = load_bundle(weights, "cpu")
    port = _free_port()
    blocks = build_blocks(HeptapodApp(bundle, workers=1), first_image=False)   # one model set: the gated one
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, show_error=False)
    gates, busy = [_gate(m, 1) for m in (bundle.model, bundle.baseline)], []
    try:
        clients = [Client(f"http://127.0.0.1:{port}/", verbose=False) for _ in range(4)]
        busy = [c.submit(i, i, 1.0, 0, "raster", 16, "entropy", False, api_name="/generate") for i, c in enumerate(clients[:3])]
        capfd.readouterr()
        with pytest.raises(AppError, match="class must be an integer from 0 to 9, got 11"):
            clients[3].submit(11, 0, 1.0, 0, "raster", 1, "entropy", False, api_name="/generate").result(timeout=60)
        assert not any(j.done() for j in busy)                      # the model was busy all along
        assert capfd.readouterr().err.count("refused input") == 1
    finally:
        for g, _ in gates: g.set()
        for j in busy: j.result(timeout=300)                        # the gated generations end before the server
        blocks.close()


def test_the_page_says_what_it_shows(weights):
    """Issue 25, item 1 (smaller): the baseline's middle panel is not called a holistic guess (nor is the finished image;
    the last frame's heatmaps say why they are empty); a clicked cell says how
    cells are counted; the top-k gallery is hidden until a click; the order choice says what the model was trained on;
    a new generation's first frame clears the previous filmstrip."""
    from heptapod_nb.charts import _panel_title, layout, which_panels
    app = HeptapodApp(load_bundle(weights, "cpu"), frame_s=0)
    heptapod, baseline = app.compare(2, 7, 1.0)
    assert _panel_title(heptapod.view, 3, "guess") == "holistic guess"
    assert _panel_title(baseline.view, 3, "guess") == "seen + next (no guess)"
    for r in (heptapod, baseline):            # the last frame: the finished image, heatmaps said to be empty (a walk
        T = r.view.T                          # found "holistic guess" over the baseline's finished image, blank maps)
        assert _panel_title(r.view, T, "guess") == "finished image"
        assert _panel_title(r.view, T, "entropy") == "entropy (nats): all drawn, none left"
    v = heptapod.view
    lay = layout(which_panels(v, "entropy"), (v.image_size[0] * v.scale, v.image_size[1] * v.scale))
    x0, y0, w, h = lay.boxes[1]
    text, pics = app.cell_topk(heptapod, 3, x0 + w - 2, y0 + h - 2)          # the bottom-right cell
    assert f"row {v.grid[0] - 1}, column {v.grid[1] - 1}; counted from 0 at the top left" in text and pics
    blocks = build_blocks(app, first_image=False)
    comps = {c.elem_id: c for c in blocks.blocks.values() if getattr(c, "elem_id", None)}
    assert comps["topk"].visible is False
    assert comps["heat"].value == "pixel_var"                                # issue 25: pixels first, then code entropy
    pv = heptapod.view.pixel_var
    assert np.isnan(pv[3][heptapod.view.seen[3]]).all() and np.isfinite(pv[3][~heptapod.view.seen[3]]).all()
    order = next(c for c in blocks.blocks.values() if getattr(c, "label", None) == "order")
    assert order.value == "raster" and "trained on raster; random is off its training" in order.info
    gen = blocks.fns[next(i for i, f in blocks.fns.items() if f.api_name == "generate")].fn
    frames = list(gen(1, 0, 1.0, 0, "raster", 1, "entropy", False))         # (to the end: no thread left running)
    assert frames[0][5] is None and isinstance(frames[-1][5], np.ndarray)    # the last digit's filmstrip goes at once


def test_serve_your_own_model_files(weights, tmp_path, capsys, monkeypatch):
    """Issue 25, item 1: heptapod-app serves any trained model with its tokenizer (--model, --tokenizer, optional
    --baseline); without a baseline, Compare says why it is off. Bad combinations are one line and exit 2, before
    the port is looked at."""
    from heptapod_nb.bundle import model_files
    own = dict(model=str(weights / "heptapod.safetensors"), tokenizer=str(weights / "tokenizer.safetensors"))
    b = load_bundle(**own)
    assert b.baseline is None and b.meta == {}
    app = HeptapodApp(b, frame_s=0)
    assert app.generate(1, 0, 1.0).T == b.n_positions
    with pytest.raises(InputError, match="Compare is off: this app serves no next-token baseline"): app.compare(1, 0, 1.0)
    blocks = build_blocks(app, first_image=False)
    comps = {c.elem_id: c for c in blocks.blocks.values() if getattr(c, "elem_id", None)}
    assert comps["compare-btn"].interactive is False and "Compare is off" in comps["compare-off"].value
    with_base = load_bundle(**own, baseline=str(weights / "baseline.safetensors"))
    assert with_base.baseline is not None and model_files(None, **own)["baseline"] is None
    held, port = _port_in_use()                  # held: these are refused before the port is looked at
    monkeypatch.setenv("GRADIO_SERVER_PORT", str(port))
    m, t = own["model"], own["tokenizer"]
    cases = [(["--model", m], "--tokenizer is needed with --model"),
             (["--tokenizer", t, "--baseline", m], "--model is needed with --tokenizer"),
             (["--weights", str(weights), "--model", m, "--tokenizer", t],
              "give either --weights (a folder of demo files) or --model and --tokenizer (files), not both"),
             (["--model", str(tmp_path / "nope.safetensors"), "--tokenizer", t], "nope.safetensors: no such file")]
    with held:
        for argv, msg in cases:
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert err.startswith("heptapod-app: error: ") and msg in err and err.count("\n") == 1, err
    monkeypatch.setenv("GRADIO_SERVER_PORT", str(_free_port()))  # a Heptapod given as the baseline: refused on loading
    assert main(["--model", m, "--tokenizer", t, "--baseline", m]) == 2
    err = capsys.readouterr().err
    assert "is not a next-token model (its window is" in err and err.count("\n") == 1, err
