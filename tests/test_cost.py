"""heptapod_nb.cost: the FLOP counter against the analytic count, saved bytes against a graph counted by hand, the CPU
peak tracker against a known allocation sequence, per-image slopes; bench/scale.py on the tiny preset."""
import importlib.util, json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from heptapod_nb.cost import FlopCounter, PeakMemory, SavedBytes, count_flops, line, measure_step, per_image
from heptapod_nb.optim import backward

ROOT = Path(__file__).resolve().parents[1]


def test_flops_of_a_linear_are_the_analytic_count():
    "2 n D_in D_out forward; backward adds the input gradient and the weight gradient (twice the forward)."
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 24, bias=False)
    x = torch.randn(5, 7, 48, requires_grad=True)
    n = 5 * 7
    assert count_flops(lambda: lin(x)) == 2 * n * 48 * 24
    assert count_flops(lambda: backward(lin(x).sum())) == 3 * 2 * n * 48 * 24
    frozen = torch.randn(5, 7, 48)                          # no input gradient: the backward is the weight's only
    assert count_flops(lambda: backward(lin(frozen).sum())) == 2 * 2 * n * 48 * 24
    assert count_flops(lambda: (x * 2).exp().sum()) == 0    # elementwise work is not counted


def test_saved_bytes_of_a_small_graph_by_hand():
    """y = relu(x W^T); loss = sum(y * y) + sum(x[:3] * x[3:6]). Saved: x (for W's gradient), W (a parameter: left
    out), relu's output y (for relu's and the product's backward: one storage), and the two views of x (x's
    storage, counted already). By hand: x (6 x 16) + y (6 x 8) float32."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(6, 16, requires_grad=True)
    with SavedBytes(lin.parameters()) as sb:
        y = F.relu(lin(x)); loss = (y * y).sum() + (x[:3] * x[3:6]).sum()
    assert sb.bytes == 4 * (6 * 16 + 6 * 8)
    with SavedBytes() as sb: y = F.relu(lin(x))            # parameters not excluded: W counts (8 x 16)
    assert sb.bytes == 4 * (6 * 16 + 8 * 16 + 6 * 8)
    with SavedBytes(lin.parameters()) as sb, torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)                                          # bf16 copies of x and W are saved (W's copy is not W)
    assert sb.bytes == 2 * (6 * 16 + 8 * 16)
    with SavedBytes(lin.parameters()) as sb:
        keep = x.exp()                                      # exp saves its output: 6 x 16
        gone = (x * 3).sin().sum(); del gone                # a graph freed inside the block holds nothing
    assert (sb.bytes, sb.packed_bytes) == (4 * 6 * 16, 4 * 6 * 16 + 4 * 6 * 16)


def test_saved_bytes_hooks_change_no_gradient():
    "The pack hook hands autograd a detached view of the same data: gradients are bit-identical with and without it."
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
    x = torch.randn(4, 8)
    backward(net(x).exp().sum()); ref = [p.grad.clone() for p in net.parameters()]; net.zero_grad()
    with SavedBytes(net.parameters()): loss = net(x).exp().sum()
    backward(loss)
    assert all(torch.equal(p.grad, r) for p, r in zip(net.parameters(), ref))


def test_peak_tracker_follows_a_known_allocation_sequence():
    pre = torch.zeros(64)
    with PeakMemory() as pm:
        a = torch.empty(1000, dtype=torch.float32)          # 4,000 bytes
        b = torch.empty(1000, dtype=torch.float64)          # 8,000: 12,000 live
        assert (pm.live, pm.peak) == (12_000, 12_000)
        del a
        assert pm.live == 8_000
        c = torch.empty(250, dtype=torch.int64)             # 2,000: 10,000 live, peak stays 12,000
        v = b[10:20]; del b                                 # a view keeps b's storage alive
        assert (pm.live, pm.peak) == (10_000, 12_000)
        del v
        assert pm.live == 2_000
        pre.add_(1); pre[:8].mul_(2); w = pre.view(8, 8)    # in-place and views of an older tensor: not allocations
        d = torch.empty(3000, dtype=torch.uint8)            # 3,000: 5,000 live
        assert (pm.live, pm.peak, pm.allocations) == (5_000, 12_000, 4)
        del c, d
    assert (pm.live, pm.peak) == (0, 12_000)


def test_peak_of_a_step_holds_what_is_saved_and_the_gradients():
    "Peak of forward + backward of a linear layer: at least the saved input, and after it the weight's gradient."
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 128, bias=False)
    x = torch.randn(64, 256)
    c = measure_step(lambda b: F.relu(lin(x[:b])).square().sum(), 64, lin.parameters())
    assert c.flops == 2 * 2 * 64 * 256 * 128                    # forward + the weight's gradient (x needs none)
    assert c.saved_bytes == 4 * 64 * (256 + 128)                # x (for W's gradient) and relu's output (relu, square)
    assert c.peak_bytes >= 4 * (64 * 128 + 256 * 128)           # that output and the weight's gradient at the end
    assert lin.weight.grad is None                              # the measurement leaves no trace


def test_per_image_is_the_slope_between_two_batches():
    assert line(1, 10.0, 3, 16.0) == (3.0, 7.0)
    with pytest.raises(ValueError, match="two different batch sizes"): line(2, 1.0, 2, 2.0)
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16)
    x = torch.randn(8, 32)
    c = per_image(lambda b: lin(x[:b]).square().sum(), lin.parameters(), batches=(2, 6))
    assert c["flops"]["per_image"] == 2 * 2 * 32 * 16 and c["flops"]["fixed"] == 0   # bias gradients are not matmuls
    # square saves lin's output (16 floats per image); lin saves its input x[:b], a view: all of x's storage, fixed
    assert c["saved_bytes"]["per_image"] == 4 * 16 and c["saved_bytes"]["fixed"] == 4 * 8 * 32
    with pytest.raises(ValueError, match="batch must be an int >= 1"): measure_step(lambda b: x.sum(), 0)


def _scale():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench" / "scale.py")
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m


def test_scale_bench_measures_the_tiny_preset_and_its_reference(tmp_path, capsys, monkeypatch):
    sc, out = _scale(), tmp_path / "scale.json"
    args = ["--presets", "tiny", "--variants", "preset,ref,last:1", "--precisions", "fp32", "--threads", "1",
            "--llamagen", str(tmp_path / "absent"), "--out", str(out)]
    assert sc.main(args + ["--variants", "preset,ref,last:1,llamagen"]) == 0
    text = capsys.readouterr().out
    assert "llamagen: skipped" in text and "| tiny | ref | fp32 |" in text
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"preset", "ref", "last:1"}
    ref, ours = rows["ref"], rows["preset"]
    # the reference's backbone is ours (same embeddings and CausalTransformer); its head is one Linear(D, K)
    assert ref["params"]["backbone"] == ours["params"]["backbone"] and ref["params"]["head"] == 192 * 512
    assert ours["flops_per_image"] > ref["flops_per_image"] > 0 and rows["last:1"]["config"]["targets_per_step"] == 1
    assert sc.main(args) == 0                                 # everything is there: nothing is measured again
    assert "tiny preset fp32" not in capsys.readouterr().out and len(json.loads(out.read_text())["rows"]) == 3
    # a changed preset is a different model: measured again; the old rows stay as history, out of the table; the
    # reference (built from the backbone's fields only) is not measured again for a head change
    from heptapod_nb import model as hm
    monkeypatch.setitem(hm.PRESETS, "tiny", hm.PRESETS["tiny"].replace(head_width=64))
    assert sc.main(args) == 0
    text = capsys.readouterr().out
    assert "tiny preset fp32" in text and "tiny last:1 fp32" in text and "tiny ref fp32" not in text
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 5 and sorted(r["model"].get("head_width", 0) for r in rows) == [0, 64, 64, 128, 128]
    assert text.count("| tiny | preset | fp32 |") == 1 and text.count("| tiny | ref | fp32 |") == 1
    with pytest.raises(SystemExit, match="unknown variant"): sc.main(args[:2] + ["--variants", "middle:3"])


def test_peak_per_image_sees_the_activations_when_gradients_dominate():
    """Eight Linear(256, 256) + ReLU on 64 rows per image: each image saves ~512 KiB, the weights' gradients are 2 MiB.
    Allocated inside the step, the gradients complete at the end of the backward pass are the peak at batch 1 and 2
    alike, and the slope misses the activations. Ready before the step (as in a run: every micro-batch after the
    first), the peak grows by what each image keeps, so it is at least what is saved per image."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[m for _ in range(8) for m in (torch.nn.Linear(256, 256, bias=False), torch.nn.ReLU())])
    x = torch.randn(2, 64, 256)
    loss_fn = lambda b: net(x[:b]).sum()
    warm = per_image(loss_fn, net.parameters(), flops=False)
    saved = warm["saved_bytes"]["per_image"]
    assert saved >= 8 * 64 * 256 * 4                             # each layer's input (a ReLU's output): 64 KiB
    assert warm["peak_bytes"]["per_image"] >= saved
    cold = [measure_step(loss_fn, b, net.parameters(), flops=False, grads_ready=False).peak_bytes for b in (1, 2)]
    assert cold[1] - cold[0] < saved / 2 and cold[0] >= 8 * 256 * 256 * 4


def test_scale_bench_help_does_not_import_torch():
    import subprocess, sys
    code = ("import runpy, sys; sys.argv = ['bench/scale.py', '--help']\n"
            "try: runpy.run_path('bench/scale.py', run_name='__main__')\nexcept SystemExit as e: assert e.code == 0\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage:" in out.stdout and out.stdout.strip().endswith("False"), out.stderr
