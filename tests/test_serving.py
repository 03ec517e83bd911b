"""Serving many callers (issue 24): generations computed in model processes of their own equal the calls alone, a
live stream still sees every step, and a model process that dies fails its jobs in words, not by hanging."""
import os, queue, signal
import numpy as np
import pytest
import torch

from heptapod_nb.app import HeptapodApp
from heptapod_nb.bundle import load_bundle, write_untrained_weights
from heptapod_nb.model import Heptapod, HeptapodConfig
from heptapod_nb.sample import Rows, TraceRecorder, generate
from heptapod_nb.serving import Batcher, Job, LiveRecorder, ModelProcess, trace_spec


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Heptapod(HeptapodConfig(vocab_size=16, grid=(4, 4), num_classes=4, dim=32, depth=2, n_heads=4, head_width=32,
                                   head_depth=1, head_heads=4)).double().eval()


def test_app_in_model_processes_equals_the_app_in_threads(tmp_path):
    """The app's generations computed in 2 model processes (as `heptapod-app` serves) give what the same calls give
    computed in this process: Generate (tokens, every step's distributions, a frame), its live stream's frames,
    Compare (both models) and Complete (figure and completions), pixel for pixel (float64 models)."""
    bundle = load_bundle(write_untrained_weights(tmp_path / "w"), "cpu")
    img = np.full((64, 64, 3), 255, np.uint8); img[10:50, 30:34] = 0
    def calls(app):
        run = app.generate(3, 7, 1.0, 0, "random", 2)
        stream = list(app.generate_stream(4, 8, 1.0, 0, "raster", 4))
        a, b = app.compare(5, 9, 1.0, 1)
        fig, gallery = app.complete(img, 6, 24, 2, 11, 1.0)
        return ([run.tokens, run.probs, app.frame(run, 3)[0]] + [f for _, _, f, _ in stream]
                + [x for r in (a, b) for x in (r.tokens, r.probs, app.frame(r, 5)[0])] + [fig] + [g for g, _ in gallery])
    here = calls(HeptapodApp(bundle, frame_s=0))
    app = HeptapodApp(bundle, frame_s=0, workers=2, processes=True)
    try:
        assert len(app.procs) == 2 and all(p.proc.is_alive() for p in app.procs)
        there = calls(app)
    finally: app.close()
    assert all(p.proc is None for p in app.procs)
    eq = lambda x, y: torch.equal(x, y) if isinstance(x, torch.Tensor) else np.array_equal(x, y)
    assert len(here) == len(there) and all(eq(x, y) for x, y in zip(here, there))


def test_a_model_process_that_dies_fails_its_jobs_in_words_and_the_next_call_starts_a_new_one(tiny):
    """Killed mid-generation (SIGKILL at its third step), a model process fails the job it was computing with a
    sentence instead of leaving it waiting forever; the next job starts a new process and equals the call alone."""
    mp_ = ModelProcess({"model": tiny}, "cpu")
    batcher = Batcher([mp_], gather_s=0)
    class Killer(LiveRecorder):
        def on_step(self, step, n_seen):
            super().on_step(step, n_seen)
            if self.q.qsize() == 3: os.kill(mp_.proc.pid, signal.SIGKILL)
    try:
        job = batcher.submit(Job(tiny, Rows(torch.tensor([1]), seed=3, trace=Killer(tiny, queue.Queue(), "model"))))
        with pytest.raises(RuntimeError, match="model process ended during a generation"): job.wait()
        got = batcher.submit(Job(tiny, Rows(torch.tensor([2]), seed=4))).wait()
        assert torch.equal(got, generate(tiny, torch.tensor([2]), seed=4))
    finally: mp_.close()


def test_a_recorder_that_cannot_cross_a_process_is_refused_by_name(tiny):
    "Only recorders a model process knows cross the pipe (a custom one holds the caller's state): TypeError, named."
    class Mine(TraceRecorder): pass
    with pytest.raises(TypeError, match="cannot run a Mine"): trace_spec(Mine(tiny))
    assert trace_spec("full") == "full" and trace_spec(False) is False
    assert trace_spec(LiveRecorder(tiny, queue.Queue(), "model")) == "live"
