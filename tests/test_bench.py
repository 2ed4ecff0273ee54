"""The training-step benchmark: its command runs, and its parts add up to the training step."""
import copy
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from tools.bench import COLUMNS, TrainingStep, build_training, cpu_peak_mb, make_batch



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
def test_parts_make_the_training_step(name, amp):
    """Simulation, f forward/backward with the adjoint solve, and the optimizer step, run as parts,
    give the same loss, gradients, parameters and buffers as the step the training loop runs."""
    whole, parts = twin_steps(name, amp)
    torch.manual_seed(7)
    loss = whole.full()
    grads = {n: p.grad.clone() for n, p in whole.model.named_parameters() if p.grad is not None}
    torch.manual_seed(7)
    parts_loss = parts.by_parts()
    assert torch.equal(loss, parts_loss)
    assert grads.keys() == {n for n, p in parts.model.named_parameters() if p.grad is not None}
    for n, p in parts.model.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, grads[n]), n
    for (n, a), b in zip(whole.model.state_dict().items(), parts.model.state_dict().values()):
        assert torch.equal(a, b), n
    assert whole.model.solver_stats["trace"] == parts.info["trace"]


@pytest.mark.parametrize("name", ["mnist_conv", "alexnetf"])
def test_timed_f_part_gives_the_steps_gradients(name):
    """The f part as timed (adjoint solution given) leaves the same gradients as with the solve inside,
    and the solve timed alone on a captured graph reproduces the step's adjoint solution."""
    _, step = twin_steps(name)
    step.simulate()
    step.forward_backward(step.solve_and_keep)
    grads = [p.grad.clone() for p in step.model.parameters()]
    y, trace = step.y.clone(), step.info["trace"]
    step.forward_backward(step.given_solution)
    assert all(torch.equal(p.grad, g) for p, g in zip(step.model.parameters(), grads))
    step.capture()
    info = step.solve()
    assert info["trace"] == trace
    assert torch.equal(step.net_solve(step.adjoint_map, step.y0, f0=step.f0)[0], y)


def test_parts_leave_the_model_as_it_was():
    """After the parts ran, the net's own simulate, begin_forward and solve are in place again."""
    _, step = twin_steps("fashion_mlp")
    step.by_parts()
    step.capture()
    step.solve()
    assert not {"simulate", "begin_forward", "_solve"} & set(vars(step.snn))
    step.release()
    torch.manual_seed(3)
    assert torch.isfinite(step.full())


def test_cpu_peak_counts_live_tensor_memory():
    """The CPU peak is the most memory alive at once: two 4 MiB tensors, one freed before the other is made."""
    def fn():
        a = torch.ones(2 ** 20)
        del a
        b = torch.ones(2 ** 20)
        c = torch.ones(2 ** 20)
        return b, c

    assert cpu_peak_mb(fn) == pytest.approx(8.0, abs=0.1)
