"""The training-step benchmark: its command runs, and timing a step part by part leaves the step as it is."""
import copy
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from tools.bench import COLUMNS, RegionTimer, TrainingStep, build_training, cpu_peak_mb, make_batch



@pytest.mark.slow
def test_command_prints_the_table():
    """`python -m tools.bench` on a tiny configuration prints one Markdown table with every column."""
    result = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--nets", "fashion_mlp", "--time-steps", "2", "--batch", "2",
         "--repeats", "1"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = "| " + " | ".join(COLUMNS) + " |"
    assert header in lines
    table = lines[lines.index(header):]
    assert table[1] == "|" + "---|" * len(COLUMNS)
    row = [cell.strip() for cell in table[2].strip("|").split("|")]
    assert len(row) == len(COLUMNS)
    assert row[:4] == ["fashion_mlp", "2", "fp32", "2"]
    assert float(row[COLUMNS.index("step ms")]) > 0
    assert float(row[COLUMNS.index("peak MB")]) > 0
    # One host sync per solver iteration plus one (two when Broyden re-evaluates a mixed batch).
    iters, syncs = int(row[COLUMNS.index("n iters")]), int(row[COLUMNS.index("syncs")])
    assert iters + 1 <= syncs <= iters + 2


def twin_steps(name, amp=False, time_step=3, batch=2):
    """Two TrainingSteps on identical copies of a net, optimizer and batch."""
    model, optimizer = build_training(name, time_step, torch.device("cpu"))
    twin = copy.deepcopy(model)
    twin_optimizer = type(optimizer)(twin.parameters(), **optimizer.defaults)
    x, target = make_batch(name, batch, time_step, "cpu")
    return TrainingStep(model, optimizer, x, target, amp), TrainingStep(twin, twin_optimizer, x, target, amp)


@pytest.mark.parametrize("name, amp", [("fashion_mlp", False), ("nmnist_conv", False), ("alexnetf", False),
                                       ("mnist_conv", True)])
def test_a_timed_step_is_the_training_step(name, amp):
    """Timing a step through the net's timer changes nothing it computes (loss, gradients, parameters, buffers),
    its regions lie inside the step, one VJP region per evaluation of the adjoint map, and the timer is unset after."""
    whole, timed = twin_steps(name, amp)
    torch.manual_seed(7)
    loss = whole.full()
    torch.manual_seed(7)
    timer = RegionTimer(torch.device("cpu"))
    assert torch.equal(timed.full(timer), loss)
    for (n, p), q in zip(whole.model.named_parameters(), timed.model.parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), n
    for (n, a), b in zip(whole.model.state_dict().items(), timed.model.state_dict().values()):
        assert torch.equal(a, b), n
    assert whole.model.solver_stats["trace"] == timed.model.solver_stats["trace"]
    assert {name: len(ms) for name, ms in timer.ms.items() if name != "ide.vjp"} == {
        "step": 1, "ide.simulate": 1, "ide.f": 1, "ide.solve": 1, "optim": 1}
    assert len(timer.ms["ide.vjp"]) == timed.model.solver_stats["nfev"]
    parts = sum(timer.ms[name][0] for name in ("ide.simulate", "ide.f", "ide.solve", "optim"))
    assert parts <= timer.ms["step"][0] and sum(timer.ms["ide.vjp"]) <= timer.ms["ide.solve"][0]
    assert timed.model.snn.timer is None


def test_cpu_peak_counts_live_tensor_memory():
    """The CPU peak is the most memory alive at once: two 4 MiB tensors, one freed before the other is made."""
    def fn():
        a = torch.ones(2 ** 20)
        del a
        b = torch.ones(2 ** 20)
        c = torch.ones(2 ** 20)
        return b, c

    assert cpu_peak_mb(fn) == pytest.approx(8.0, abs=0.1)
