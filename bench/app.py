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
import argparse, json, os, platform, socket, statistics, sys, threading, time, urllib.request
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
    from heptapod_nb.app import HeptapodApp, build_blocks
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
    a = p.parse_args(argv)

    t_start = time.perf_counter()
    import torch
    torch.set_num_threads(a.threads)
    from heptapod_nb.app import HeptapodApp, build_blocks, load_bundle, demo_dir
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
        t0 = time.perf_counter(); client.predict(t, "entropy", False, api_name="/scrub"); scrub_api.append(time.perf_counter() - t0)
    stream_api = [stream_via_http(client, r) for r in range(a.repeats)]
    blocks.close()
    conc = [concurrent_generations(bundle, int(w), a.concurrent) for w in a.workers.split(",")] if a.concurrent else []

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
        "steps": view.T, "grid": list(bundle.grid), "concurrent": conc,
        "weights": str(wdir), "weights_bytes": sum(f.stat().st_size for f in wdir.glob("*.safetensors")),
        "model_params": sum(p.numel() for p in bundle.model.parameters()),
        "threads": a.threads, "torch": torch.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
        "time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    targets = {"app_start_s": 20.0, "generate_full_trace_s": 2.0, "scrub_step_s": 0.2, "stream_first_step_s": 2.0,
               "stream_first_step_via_http_s": 2.0}
    print(f"{'measure':28s} {'value':>10s} {'target':>8s}")
    for k in ("app_start_s", "generate_full_trace_s", "view_decode_s", "scrub_step_s", "scrub_step_s_max", "scrub_step_via_http_s",
              "stream_first_step_s", "stream_last_step_s", "stream_first_step_via_http_s", "stream_last_step_via_http_s"):
        tgt = targets.get(k)
        print(f"{k:28s} {res[k]:10.4f} {('<= %g' % tgt) if tgt else '':>8s}" + ("" if tgt is None or res[k] <= tgt else "  MISSED"))
    if conc:
        print(f"\n{a.concurrent} concurrent /generate calls (full trace, 64 steps), each from its own client:")
        print(f"{'workers':8s} {'wall s':>7s} {'gen/s':>6s} {'p50 s':>6s} {'max s':>6s} {'min s':>6s} {'alone s':>8s} {'same as alone':>14s}")
        for c in conc:
            print(f"{c['workers']:<8d} {c['wall_s']:7.2f} {c['throughput_per_s']:6.3f} {c['p50_s']:6.2f} {c['max_s']:6.2f} "
                  f"{c['min_s']:6.2f} {c['alone_p50_s']:8.3f} {c['identical_to_alone']:>8d} of {c['calls']}")
    print(f"steps recorded when the first frame was yielded: {res['stream_first_frame_steps_recorded']} of {res['steps']}")
    print(f"(1-minute load average while measuring: {res['load_avg_1min']} on {res['cpu_count']} cores)")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        from heptapod_nb.config import write_json
        write_json(a.out, res)
    return res


if __name__ == "__main__":
    main()
    sys.exit(0)
