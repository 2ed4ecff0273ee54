"""The forward residual ‖f(a) - a‖/‖a‖ against T (tools.residual_vs_T): O(1/T) for IF, a positive floor for LIF."""
import numpy as np
import pytest
import torch

from modules.snn import rate_weights
from tools.residual_vs_T import forward_residual, markdown_table

STEPS = [20, 40, 80, 160, 320, 640]


def residuals(tiny_snn, tiny_input, leak):
    """The residual of one tiny single-layer conv net and batch at each T of STEPS, and its log-log slope."""
    snn = tiny_snn("conv", leak=leak, time_step=STEPS[0], seed=0).train()
    x = tiny_input("conv", 8, seed=1)
    values = [forward_residual(snn, x, t) for t in STEPS]
    return values, float(np.polyfit(np.log(STEPS), np.log(values), 1)[0])


def test_if_residual_falls_as_one_over_t(tiny_snn, tiny_input):
    """IF: the residual falls as 1/T (log-log slope -1 ± 0.2) and keeps falling."""
    values, slope = residuals(tiny_snn, tiny_input, 1.0)
    assert -1.2 <= slope <= -0.8
    assert values[-1] < values[0] / 10


@pytest.mark.parametrize("leak, floor", [(0.95, 0.01), (0.99, 0.002)])
def test_lif_residual_stops_at_a_floor(tiny_snn, tiny_input, leak, floor):
    """LIF: past a few 1/(1 - λ) steps the residual stops falling; it stays above a floor of order 1 - λ."""
    values, _ = residuals(tiny_snn, tiny_input, leak)
    late = values[-3:]  # T = 160..640, where IF's falls fourfold
    assert min(late) > floor
    assert max(late) / min(late) < 1.5


def test_the_tool_measures_the_training_diagnostic(tiny_snn, tiny_input):
    """forward_residual is the `forward_residual` that a training step records (same T, batch, statistics)."""
    snn = tiny_snn("multi", leak=0.95, time_step=12).train()
    x = tiny_input("multi", 4)
    running = {name: b.clone() for name, b in snn.named_buffers()}
    snn(x).sum().backward()
    recorded = snn.solver_stats["forward_residual"]
    with torch.no_grad():
        for name, buffer in snn.named_buffers():
            buffer.copy_(running[name])
        snn.feedback.power_iteration()  # the step's power iteration, which the training forward took
    assert forward_residual(snn, x, 12) == pytest.approx(recorded, rel=1e-10)


def test_table():
    """One Markdown row per (net, neuron), with the slope."""
    table = markdown_table([("mnist_conv", "IF", [0.1, 0.05], -1.0)], [8, 16])
    assert table.splitlines()[-1] == "| mnist_conv | IF | 0.1000 | 0.0500 | -1.00 |"


@pytest.mark.parametrize("leak", [1.0, 0.95])
def test_rate_identity(tiny_snn, leak):
    """The network's own step obeys a = Ī/Vth + (Vth s[T−1] − u[T−1]) / (Vth Σ_k λ^k) exactly (rate weights λ^(T−1−t)),
    the identity behind the 1/T fall for IF and the floor of order 1 − λ for LIF (docs/diagnostics.md)."""
    snn = tiny_snn("fc", leak=leak)
    T = 50
    currents = torch.empty(T, 40, dtype=torch.float64).uniform_(-1.0, 3.0, generator=torch.Generator().manual_seed(0))
    u, s, spikes = torch.zeros(40, dtype=torch.float64), torch.zeros(40, dtype=torch.float64), []
    for current in currents:
        u, s = snn._fire_(u, s, current)
        spikes.append(s.clone())
    weights = rate_weights(T, snn.leak, torch.float64)
    a = weights @ torch.stack(spikes)
    norm = sum(snn.leak ** k for k in range(T))
    expected = (weights @ currents) / snn.vth + (snn.vth * s - u) / (snn.vth * norm)
    torch.testing.assert_close(a, expected, rtol=0, atol=1e-12)
