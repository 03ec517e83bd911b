"""App benchmark: start time with the bundled weights, one generation with a full trace, scrubbing one step, the
streamed generation (time to the first and to the last yielded step, in-process and through HTTP), and
20 concurrent generations through the web API (throughput, p50/max latency) served two ways.

    flock /tmp/heptapod-bench.lock .venv/bin/python bench/app.py --threads 2 --out bench/results/app.json

Targets (issue 6, 2 CPU cores): start <= 20 s, generation with full trace <= 2 s, scrubbing a step <= 0.2 s.
Streaming (issue 18): `/generate` is live: a worker thread generates under the model set's lock and hands each
step over as it is recorded; the stream yields `stream_frames` of them (at least `frame_s` apart) while the model
is still drawing, then the finished image. The first step must arrive <= 2 s; `stream_first_frame_steps_recorded`
says how many of the 64 steps the worker had recorded when the first frame was yielded (64: not live).
Concurrency (issue 15): `--workers 1` is the app's default (one lock per bundle + one Gradio queue for the endpoints
that compute: requests run one at a time, in arrival order); `--workers W` serves W at once, each on its own copy of
the models (its own KV cache); W = the number of calls is a copy per request. Every concurrent result is checked
against the same call made alone.
"""
import argparse, json, math, os, platform, socket, statistics, subprocess, sys, threading, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def concurrent_generations(bundle, workers: int, n: int = 20) -> dict:
    "Serve the app with `workers` model sets, send `n` /generate calls at once from `n` clients; latency per call."
    from gradio_client import Client
    from PIL import Image
    import numpy as np
    from heptapod_nb.app import HeptapodApp
    from heptapod_nb.app_ui import build_blocks
    blocks = build_blocks(HeptapodApp(bundle, workers=workers), first_image=False)
    port = free_port()
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, show_error=False)
    try:
        clients = [Client(f"http://127.0.0.1:{port}/", verbose=False) for _ in range(n)]
        args = [(i % 10, 100 + i, 1.0, 0, "raster", 1, "entropy", False) for i in range(n)]
        pix = lambda out: np.asarray(Image.open(out[0]))
        alone, alone_s = [], []
        for a in args:                                               # the same calls, one at a time
            t0 = time.perf_counter(); alone.append(pix(clients[0].predict(*a, api_name="/generate")))
            alone_s.append(time.perf_counter() - t0)
        go, lat, same = threading.Barrier(n + 1), [None] * n, [False] * n
        def call(i):
            go.wait(); t0 = time.perf_counter()
            out = clients[i].predict(*args[i], api_name="/generate")
            lat[i] = time.perf_counter() - t0
            same[i] = bool(np.array_equal(pix(out), alone[i]))
        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(call, i) for i in range(n)]
            go.wait(); t0 = time.perf_counter()
            for f in futures: f.result()
            wall = time.perf_counter() - t0
    finally:
        blocks.close()
    return {"workers": workers, "calls": n, "wall_s": round(wall, 2), "throughput_per_s": round(n / wall, 3),
            "p50_s": round(statistics.median(lat), 2), "max_s": round(max(lat), 2), "min_s": round(min(lat), 2),
            "alone_p50_s": round(statistics.median(alone_s), 3), "identical_to_alone": sum(same)}


def classroom_calls(n: int, upload: str) -> list:
    """`n` mixed calls as a class would press them: Generate, Compare, Complete (about 1/2, 1/4, 1/4), each student
    a class and seed of their own, mostly the page's defaults (raster, 1 token per step, 32 tokens seen, 4
    completions), a few changing one setting (random order, 2 tokens per step, 16 tokens seen)."""
    from gradio_client import handle_file
    calls = []
    for i in range(n):
        c, s = i % 10, 1000 + i
        if i % 4 in (0, 2):
            calls.append(("/generate", (c, s, 0.6, 0, "random" if i % 12 == 2 else "raster", 2 if i % 12 == 6 else 1,
                                        "entropy", False)))
        elif i % 4 == 1: calls.append(("/compare", (c, s, 0.6, 1, "entropy")))
        else: calls.append(("/complete", (None, handle_file(upload), c, 16 if i % 12 == 7 else 32, 4, s, 0.6, False)))
    return calls


def _pixels(out) -> list:
    """Every image in an endpoint's result (files, gallery items) as one list of pixel arrays; a file the client did
    not download (`download_files=False`) is fetched from the server's URL, as the page fetches what it shows."""
    import io
    import numpy as np
    from PIL import Image
    if isinstance(out, (list, tuple)): return [a for o in out for a in _pixels(o)]
    if isinstance(out, dict) and "image" in out: return _pixels(out["image"])
    if isinstance(out, dict) and out.get("url"):
        with urllib.request.urlopen(out["url"], timeout=60) as r:
            return [np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))]
    if isinstance(out, str) and os.path.isfile(out): return [np.asarray(Image.open(out).convert("RGB"))]
    return []


def _pct(xs, q: float) -> float:
    xs = sorted(xs); return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def cpu_seconds(pid: int, tree: bool = True) -> float:
    """User + system CPU seconds a process has used so far, with (`tree`) those of its live child processes (the
    app's model processes); Linux /proc, NaN elsewhere."""
    def stat(p):
        return Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
    try: f = stat(pid)
    except OSError: return float("nan")
    total = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    if tree:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or d.name == str(pid): continue
            try: g = stat(d.name)
            except OSError: continue
            if int(g[1]) == pid: total += cpu_seconds(int(d.name))
    return total


def serve_app(port: int, weights: str | None, workers: int, log, in_process: bool = False) -> "subprocess.Popen":
    """`heptapod-app` as a teacher starts it, in its own process (the package on this interpreter's path, e.g.
    `PYTHONPATH`); returns once the page answers."""
    cmd = [sys.executable, "-c", "import sys; from heptapod_nb.app_cli import main; sys.exit(main(sys.argv[1:]))",
           "--port", str(port), "--workers", str(workers)] + (["--weights", weights] if weights else []) \
        + (["--in-process"] if in_process else [])
    server = subprocess.Popen(cmd, stdout=log, stderr=log)
    t0 = time.perf_counter()
    while True:
        try: urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read(); return server
        except OSError:
            if server.poll() is not None or time.perf_counter() - t0 > 300:
                server.kill(); raise RuntimeError(f"heptapod-app did not start (exit {server.poll()}); see its log")
            time.sleep(0.5)


BAD_CALL = """import sys, time
from gradio_client import Client
from gradio_client.exceptions import AppError
c = Client(sys.argv[1], verbose=False, download_files=False)
sys.stdin.readline(); t0 = time.perf_counter()
try: c.predict(11, 0, 0.6, 0, "raster", 1, "entropy", False, api_name="/generate"); msg = "accepted"
except AppError as e: msg = str(e).replace(chr(10), " ")
print(f"{time.perf_counter() - t0}\t{msg}", flush=True)
"""


def classroom(n: int = 30, weights: str | None = None, workers: int = 2, client_nice: int = 10,
              tmp: str | None = None, in_process: bool = False) -> dict:
    """Issue 24: `n` students press Generate / Compare / Complete at once, each from their own client (a thread);
    latency per call (p50 / p90 / max), throughput, every result checked against the same call made alone; and a
    bad call (class 11) sent a second into the burst, from a process of its own at the server's priority: seconds
    until it is refused.

    The server is `heptapod-app` in its own process. The students' browsers run on their own machines; here the
    clients share the server's 2 cores, so they are made light and run `client_nice` steps below it: each streams
    the frames (the server still makes, encodes and sends every one) without downloading them
    (`download_files=False`), and only the final images are fetched and compared."""
    import tempfile
    import numpy as np
    from PIL import Image
    from gradio_client import Client
    tmp = tmp or tempfile.mkdtemp(prefix="heptapod-classroom-")
    img = np.full((64, 64, 3), 255, np.uint8); img[10:50, 28:35] = 0; img[10:16, 22:35] = 0     # a "7"-ish stroke
    upload = str(Path(tmp) / "digit.png"); Image.fromarray(img).save(upload)
    calls = classroom_calls(n, upload)
    port = free_port()
    with open(Path(tmp) / "server.log", "w") as log:
        server = serve_app(port, weights, workers, log, in_process)
    url = f"http://127.0.0.1:{port}/"
    # the bad call's student sits at the server's priority, in a process of their own (a browser on another laptop
    # does not wait for 30 other clients' threads): started before this process lowers its own priority
    bad_proc = subprocess.Popen([sys.executable, "-c", BAD_CALL, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
    try:
        if client_nice: os.nice(client_nice)                      # this process only: the clients, not the server
        clients = [Client(url, verbose=False, download_files=False) for _ in range(n)]
        alone, alone_s = [], []
        for api, args in calls:                                       # the same calls, one at a time
            t0 = time.perf_counter(); out = clients[0].predict(*args, api_name=api)
            alone_s.append(time.perf_counter() - t0); alone.append(_pixels(out))
        go, lat, same, errors = threading.Barrier(n + 2), [None] * n, [False] * n, []
        def call(i):
            api, args = calls[i]
            go.wait(); t0 = time.perf_counter()
            try: out = clients[i].predict(*args, api_name=api)
            except Exception as e: errors.append(f"{api}: {type(e).__name__}: {e}"); return
            lat[i] = time.perf_counter() - t0
            got = _pixels(out)
            same[i] = len(alone[i]) > 0 and len(got) == len(alone[i]) and all(np.array_equal(a, b)
                                                                              for a, b in zip(got, alone[i]))
        bad = {}
        def bad_call():
            go.wait(); time.sleep(1.0)
            bad_proc.stdin.write("go\n"); bad_proc.stdin.flush()
            seconds, msg = bad_proc.stdout.readline().rstrip("\n").split("\t", 1)
            bad["s"], bad["msg"] = float(seconds), msg
        with ThreadPoolExecutor(n + 1) as pool:
            futures = [pool.submit(call, i) for i in range(n)] + [pool.submit(bad_call)]
            cpu0, mine0 = cpu_seconds(server.pid), time.process_time()
            go.wait(); t0 = time.perf_counter()
            for f in futures[:n]: f.result()
            wall = time.perf_counter() - t0
            server_cpu, client_cpu = cpu_seconds(server.pid) - cpu0, time.process_time() - mine0
            futures[n].result()
    finally:
        bad_proc.kill()
        server.terminate()
        try: server.wait(30)
        except Exception: server.kill()
    ok = [x for x in lat if x is not None]
    kinds = {api: sum(a == api for a, _ in calls) for api in ("/generate", "/compare", "/complete")}
    return {"calls": n, "mix": kinds, "wall_s": round(wall, 2), "throughput_per_s": round(n / wall, 3),
            "p50_s": round(statistics.median(ok), 2) if ok else None, "p90_s": round(_pct(ok, 0.9), 2) if ok else None,
            "max_s": round(max(ok), 2) if ok else None, "min_s": round(min(ok), 2) if ok else None,
            "alone_p50_s": round(statistics.median(alone_s), 3), "alone_max_s": round(max(alone_s), 3),
            "identical_to_alone": sum(same), "errors": errors,
            "bad_input_refused_s": round(bad.get("s", float("nan")), 3), "bad_input_message": bad.get("msg"),
            "server": "heptapod-app in its own process" + (" (--in-process)" if in_process else " (model processes)"),
            "workers": workers, "client_nice": client_nice,
            "server_cpu_s": round(server_cpu, 2), "clients_cpu_s": round(client_cpu, 2),
            "load_avg_1min_after": round(os.getloadavg()[0], 2)}


def stream_in_process(app, r: int) -> tuple[float, float, int, int]:
    """`app.generate_stream` (the /generate callback): seconds to the first and to the last yielded step, frames,
    and the steps the model had recorded when the first frame was yielded."""
    feeds, start = [], app._start
    app._start = lambda jobs: feeds.append(start(jobs)) or feeds[-1]     # to look at the worker's queue
    try:
        t0 = time.perf_counter(); it = app.generate_stream(cls=r % 10, seed=200 + r)
        live = next(it)[0]; first = time.perf_counter() - t0
    finally: del app._start
    alive = feeds[0].thread.is_alive()                          # (approximate: the worker goes on meanwhile)
    recorded = len(live.steps) + feeds[0].q.qsize() - (not alive)   # taken + waiting in the queue (- the finished run)
    n = 1 + sum(1 for _ in it)
    return first, time.perf_counter() - t0, n, recorded


def stream_via_http(client, r: int) -> tuple[float, float]:
    "/generate through gradio_client: seconds until the first streamed output arrives, and until the last."
    t0 = time.perf_counter()
    job = client.submit(r % 10, 300 + r, 1.0, 0, "raster", 1, "entropy", False, api_name="/generate")
    while not job.outputs() and not job.done(): time.sleep(0.005)
    first = time.perf_counter() - t0
    job.result()
    return first, time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="weights folder (default: the bundled demo weights)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--concurrent", type=int, default=20, help="concurrent /generate calls (0: skip that part)")
    p.add_argument("--workers", default="1,2,20", help="designs to serve them with: comma-separated numbers of model "
                   "sets (1: the lock, one at a time; 20 = --concurrent: a copy per request)")
    p.add_argument("--classroom", type=int, default=30, help="issue 24: this many mixed /generate, /compare, /complete "
                   "calls at once, one client each, plus a bad call during the burst (0: skip that part)")
    p.add_argument("--classroom-only", action="store_true", help="measure only the classroom burst")
    p.add_argument("--app-workers", type=int, default=2,
                   help="the classroom server's --workers (heptapod-app's default 2)")
    p.add_argument("--in-process", action="store_true", help="serve the classroom with heptapod-app --in-process "
                   "(generations computed in the server's process, not in model processes)")
    p.add_argument("--client-nice", type=int, default=10, help="the classroom clients' niceness above the server's "
                   "(their browsers would run elsewhere; 0: as the server)")
    a = p.parse_args(argv)
    if a.classroom_only: return classroom_main(a)

    t_start = time.perf_counter()
    import torch
    torch.set_num_threads(a.threads)
    from heptapod_nb.app import HeptapodApp
    from heptapod_nb.app_ui import build_blocks
    from heptapod_nb.bundle import demo_dir, load_bundle
    bundle = load_bundle(a.weights, "cpu")
    app = HeptapodApp(bundle)
    blocks = build_blocks(app)                                     # includes the first generation the page opens on
    port = free_port()
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60).read()
    start_s = time.perf_counter() - t_start                          # python start -> page served (imports included)

    gen, scrub, scrub_api = [], [], []
    for r in range(a.repeats):
        t0 = time.perf_counter(); run = app.generate(cls=r % 10, seed=r); gen.append(time.perf_counter() - t0)
        for t in (0, run.T // 3, run.T // 2, run.T - 1, run.T):
            t0 = time.perf_counter(); app.frame(run, t, "entropy", overlay=True); scrub.append(time.perf_counter() - t0)
    view = run.view
    stream = [stream_in_process(app, r) for r in range(a.repeats)]
    from gradio_client import Client
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    client.predict(1, 0, 1.0, 0, "raster", 1, "entropy", False, api_name="/generate")
    for t in (3, 30, 60, 10, 50):
        t0 = time.perf_counter(); client.predict(t, "entropy", False, api_name="/scrub")
        scrub_api.append(time.perf_counter() - t0)
    stream_api = [stream_via_http(client, r) for r in range(a.repeats)]
    blocks.close()
    conc = [concurrent_generations(bundle, int(w), a.concurrent) for w in a.workers.split(",")] if a.concurrent else []
    room = classroom(a.classroom, a.weights) if a.classroom else None

    wdir = Path(a.weights) if a.weights else demo_dir()
    res = {
        "app_start_s": round(start_s, 3),
        "generate_full_trace_s": round(statistics.median(gen), 3),
        "generate_full_trace_s_all": [round(x, 3) for x in gen],
        "view_decode_s": round(view.decode_s, 4),
        "scrub_step_s": round(statistics.median(scrub), 5),
        "scrub_step_s_max": round(max(scrub), 5),
        "scrub_step_via_http_s": round(statistics.median(scrub_api), 4),
        "stream_first_step_s": round(statistics.median(s[0] for s in stream), 3),
        "stream_last_step_s": round(statistics.median(s[1] for s in stream), 3),
        "stream_first_step_via_http_s": round(statistics.median(s[0] for s in stream_api), 3),
        "stream_last_step_via_http_s": round(statistics.median(s[1] for s in stream_api), 3),
        "stream_frames": stream[0][2], "frame_s": app.frame_s,
        "stream_first_frame_steps_recorded": [s[3] for s in stream],
        "steps": view.T, "grid": list(bundle.grid), "concurrent": conc, "classroom": room,
        "weights": str(wdir), "weights_bytes": sum(f.stat().st_size for f in wdir.glob("*.safetensors")),
        "model_params": sum(p.numel() for p in bundle.model.parameters()),
        "threads": a.threads, "torch": torch.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
        "time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    targets = {"app_start_s": 20.0, "generate_full_trace_s": 2.0, "scrub_step_s": 0.2, "stream_first_step_s": 2.0,
               "stream_first_step_via_http_s": 2.0}
    print(f"{'measure':28s} {'value':>10s} {'target':>8s}")
    for k in ("app_start_s", "generate_full_trace_s", "view_decode_s", "scrub_step_s", "scrub_step_s_max",
              "scrub_step_via_http_s", "stream_first_step_s", "stream_last_step_s", "stream_first_step_via_http_s",
              "stream_last_step_via_http_s"):
        tgt = targets.get(k)
        print(f"{k:28s} {res[k]:10.4f} {('<= %g' % tgt) if tgt else '':>8s}"
              + ("" if tgt is None or res[k] <= tgt else "  MISSED"))
    if conc:
        print(f"\n{a.concurrent} concurrent /generate calls (full trace, 64 steps), each from its own client:")
        print(f"{'workers':8s} {'wall s':>7s} {'gen/s':>6s} {'p50 s':>6s} {'max s':>6s} {'min s':>6s} {'alone s':>8s} "
              f"{'same as alone':>14s}")
        for c in conc:
            print(f"{c['workers']:<8d} {c['wall_s']:7.2f} {c['throughput_per_s']:6.3f} {c['p50_s']:6.2f} "
                  f"{c['max_s']:6.2f} {c['min_s']:6.2f} {c['alone_p50_s']:8.3f} {c['identical_to_alone']:>8d} "
                  f"of {c['calls']}")
    if room: print_classroom(room)
    print(f"steps recorded when the first frame was yielded: {res['stream_first_frame_steps_recorded']} "
          f"of {res['steps']}")
    print(f"(1-minute load average while measuring: {res['load_avg_1min']} on {res['cpu_count']} cores)")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        from heptapod_nb.config import write_json
        write_json(a.out, res)
    return res


def print_classroom(c: dict) -> None:
    print(f"\n{c['calls']} students at once ({c['mix']}), each from its own client:")
    print(f"{'wall s':>7s} {'calls/s':>7s} {'p50 s':>6s} {'p90 s':>6s} {'max s':>6s} {'alone p50':>9s} "
          f"{'same as alone':>14s} {'bad call refused':>16s}")
    print(f"{c['wall_s']:7.2f} {c['throughput_per_s']:7.3f} {c['p50_s']:6.2f} {c['p90_s']:6.2f} {c['max_s']:6.2f} "
          f"{c['alone_p50_s']:9.3f} {c['identical_to_alone']:>8d} of {c['calls']} {c['bad_input_refused_s']:14.3f} s")
    if "server_cpu_s" in c:
        print(f"CPU during the burst: server {c['server_cpu_s']} s, clients {c['clients_cpu_s']} s "
              f"({c['wall_s']} s wall on {os.cpu_count()} cores)")
    print("goal (issue 24, 2 cores): p50 <= 5 s, max <= 15 s, every result identical to the call alone, a bad call "
          "refused in < 0.5 s" + ("" if c["p50_s"] <= 5 and c["max_s"] <= 15 and c["identical_to_alone"] == c["calls"]
                                  and c["bad_input_refused_s"] < 0.5 else "  -> MISSED"))
    if c["errors"]: print("errors:", *c["errors"][:5], sep="\n  ")


def classroom_main(a) -> dict:
    "--classroom-only: load the weights, serve, measure the burst; print and write the results."
    import torch
    import heptapod_nb
    load0 = os.getloadavg()[0]
    c = classroom(a.classroom, a.weights, a.app_workers, a.client_nice, in_process=a.in_process)
    res = {"classroom": c, "torch": torch.__version__, "cpu_count": os.cpu_count(),
           "load_avg_1min_before": round(load0, 2), "code": str(Path(heptapod_nb.__file__).parent),
           "time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    print_classroom(c)
    print(f"(1-minute load average {res['load_avg_1min_before']} before, {c['load_avg_1min_after']} after, on "
          f"{res['cpu_count']} cores; code from {res['code']})")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
    sys.exit(0)
