"""The measured norms (modules.jacobian) against dense Jacobians, their diagnostics, and the Jacobian regulariser.

Exact references: torch.autograd.functional.jacobian formed densely and
torch.linalg.matrix_norm (ord 2 or 'fro') on tiny float64 nets.
"""
import math

import pytest
import torch

from modules.jacobian import hutchinson_frobenius, jacobian_norm, operator_norm
from tests.conftest import TINY, log_rows, run_main
from utils import flags
from utils.training.epoch import train_step

ARCHS = ["fc", "conv", "multi"]


def dense(func, point, create_graph=False):
    """The Jacobian of func at point as an (outputs, inputs) matrix."""
    J = torch.autograd.functional.jacobian(func, point, create_graph=create_graph)
    return J.reshape(-1, point.numel())


def backward_point(snn, x):
    """(f as a function of the state, the point where the backward takes J) after a simulation of x."""
    rate, _ = snn.simulate(x)
    with torch.no_grad():
        current = snn.input_layer(snn.average_input(x))
    func = lambda a: snn.f(a, current)  # noqa: E731
    with torch.no_grad():
        point = func(rate) if snn.jacobian_at_f else rate
    return func, point


@torch.no_grad()
def restore(snn, running):
    """Put back BN running statistics saved before a training step (which moved them after its simulation)."""
    for name, buffer in snn.named_buffers():
        buffer.copy_(running.get(name, buffer))


@pytest.mark.parametrize("arch", ARCHS)
def test_jacobian_norm_is_the_dense_spectral_norm(tiny_snn, tiny_input, arch):
    """‖J‖₂ from products alone equals the dense Jacobian's largest singular value, batch coupling by BN included."""
    snn = tiny_snn(arch).train()
    func, point = backward_point(snn, tiny_input(arch, 3))
    exact = float(torch.linalg.matrix_norm(dense(func, point), 2))
    point = point.clone().requires_grad_()
    assert exact > 0.1
    assert jacobian_norm(func(point), point, tol=1e-10) == pytest.approx(exact, rel=1e-8)


@pytest.mark.parametrize("arch", ARCHS)
def test_operator_norm_is_the_dense_operator_norm(tiny_snn, arch):
    """The feedback operator's norm (fc, same-size conv, stride-2 transposed conv) is that of the operator on the
    state's size, not of the kernel reshaped to a matrix."""
    snn = tiny_snn(arch, gain=1.0)
    shape = {"fc": (1, 5), "conv": (1, 2, 4, 4), "multi": (1, 3, 2, 2)}[arch]
    op = snn.feedback.linear_part
    exact = float(torch.linalg.matrix_norm(dense(op, torch.zeros(shape, dtype=torch.float64)), 2))
    assert operator_norm(op, shape, tol=1e-10, dtype=torch.float64) == pytest.approx(exact, rel=1e-8)
    if arch != "fc":  # a conv's operator norm is not its kernel's
        kernel = float(torch.linalg.matrix_norm(snn.feedback.linear.weight.detach().flatten(1), 2))
        assert abs(exact - kernel) > 0.05


def test_a_larger_conv_operator_converges(single_thread):
    """Lanczos on a 5x5 conv of 8 channels on 10x10 (800 inputs, close top singular values) meets the dense norm."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 5, padding=2, bias=False).double()
    shape = (1, 8, 10, 10)
    exact = float(torch.linalg.matrix_norm(dense(conv, torch.zeros(shape, dtype=torch.float64)), 2))
    assert operator_norm(conv, shape, tol=1e-6, dtype=torch.float64) == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("shape", [(40, 3), (3, 40), (60, 50)])
def test_rectangular_maps(shape):
    """Wide and tall matrices, formed densely from either side or by Lanczos, have their largest singular value."""
    A = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = float(torch.linalg.matrix_norm(A, 2))
    assert operator_norm(lambda v: v @ A.T, (1, shape[1]), tol=1e-10, dtype=torch.float64) == pytest.approx(exact)


def test_zero_jacobian_has_norm_zero():
    """A silent point (every clamp saturated) has J = 0: the norm is 0, not a Lanczos breakdown."""
    point = torch.full((2, 30), -5.0, dtype=torch.float64, requires_grad=True)
    assert jacobian_norm(torch.clamp(point, 0, 1), point) == 0.0


@pytest.mark.parametrize("arch", ["fc", "multi"])
def test_diagnostics_measure_the_operator_and_the_jacobian(tiny_snn, tiny_input, arch):
    """After a change of the raw feedback weight (its power-iteration estimate σ of V now stale), the feedback
    diagnostic is the true ‖W_fb‖₂/Vth of the dense operator, not the clamped |g|/Vth that u·(W v)/Vth gave;
    the Jacobian diagnostic is ‖J‖₂ at the point the backward uses (a, or z = f(a) for a multi-layer net)."""
    snn = tiny_snn(arch, gain=1.0).train()
    x = tiny_input(arch, 3)
    with torch.no_grad():
        V = snn.feedback.linear.parametrizations.weight.original
        V.add_(1.5 * torch.randn(V.shape, generator=torch.Generator().manual_seed(3), dtype=V.dtype))
    snn.measure_norms = True
    snn.norm_tol = 1e-10
    running = {name: b.clone() for name, b in snn.named_buffers() if "running" in name}
    snn(x).sum().backward()
    stats = snn.solver_stats
    assert not snn.measure_norms  # one measurement per request
    shape = (1, 5) if arch == "fc" else (1, 3, 2, 2)
    W = dense(snn.feedback.linear_part, torch.zeros(shape, dtype=torch.float64))
    expected = float(torch.linalg.matrix_norm(W, 2)) / snn.vth
    assert stats["feedback_norm"] == pytest.approx(expected, rel=1e-8)
    assert abs(stats["feedback_norm"] - 1.0 / snn.vth) > 0.02
    restore(snn, running)
    func, point = backward_point(snn, x)
    assert stats["jacobian_norm"] == pytest.approx(float(torch.linalg.matrix_norm(dense(func, point), 2)), rel=1e-8)
    snn(x).sum().backward()
    assert "feedback_norm" not in snn.solver_stats and "jacobian_norm" not in snn.solver_stats


@pytest.mark.parametrize("arch", ARCHS)
def test_hutchinson_mean_is_the_frobenius_norm(tiny_snn, tiny_input, arch):
    """The mean of ‖εᵀJ‖² over 4000 Gaussian ε is ‖J‖_F² within 4 standard errors (variance 2‖JJᵀ‖_F²)."""
    snn = tiny_snn(arch).train()
    func, point = backward_point(snn, tiny_input(arch, 2))
    J = dense(func, point)
    exact, spread = float(J.pow(2).sum()), math.sqrt(2) * float((J @ J.T).norm())
    point = point.clone().requires_grad_()
    output = func(point)
    gen, n = torch.Generator().manual_seed(0), 4000
    mean = sum(float(hutchinson_frobenius(output, point, gen).detach()) for _ in range(n)) / n
    assert abs(mean - exact) < 4 * spread / math.sqrt(n)
    assert exact > 0.1


@pytest.mark.parametrize("arch", ["fc", "multi"])
def test_the_penalty_is_the_differentiable_estimate(tiny_snn, tiny_input, arch):
    """jacobian_penalty = γ‖εᵀJ‖²/d at the backward's point for the step's ε, and its parameter gradient is that
    of the same expression on the dense Jacobian."""
    snn = tiny_snn(arch).train()
    snn.jac_reg = 0.3
    x = tiny_input(arch, 3)
    running = {name: b.clone() for name, b in snn.named_buffers() if "running" in name}
    torch.manual_seed(7)  # no dropout, no frequency draw: ε is the first normal draw after the seed
    rate = snn(x)
    penalty = snn.jacobian_penalty
    weight = snn.feedback.linear.parametrizations.weight.original
    (grad,) = torch.autograd.grad(penalty, weight)
    restore(snn, running)
    func, point = backward_point(snn, x)
    torch.manual_seed(7)
    epsilon = torch.randn(point.shape, dtype=point.dtype).reshape(-1)
    J = dense(func, point, create_graph=True)
    expected = 0.3 * (epsilon @ J).pow(2).sum() / point.numel()
    (expected_grad,) = torch.autograd.grad(expected, weight)
    assert float(penalty.detach()) == pytest.approx(float(expected.detach()), rel=1e-10)
    assert grad.abs().max() > 0
    torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-12)
    assert rate.shape == point.shape


def test_the_penalty_is_drawn_on_a_fraction_of_steps(tiny_snn, tiny_input):
    """jac_reg_freq p applies the regulariser on about p of the forwards; none when γ = 0 or in evaluation."""
    snn = tiny_snn("fc").train()
    x = tiny_input("fc", 3)
    snn.jac_reg, snn.jac_reg_freq = 0.5, 0.25
    torch.manual_seed(0)
    applied = sum(snn(x) is not None and snn.jacobian_penalty is not None for _ in range(200))
    assert 30 <= applied <= 70
    snn.jac_reg = 0.0
    snn(x)
    assert snn.jacobian_penalty is None
    snn.jac_reg = 0.5
    snn.eval()
    snn(x)
    assert snn.jacobian_penalty is None


def test_jacobian_flags(capsys):
    """--jac-norm-every, --jac-reg and --jac-reg-freq reach the model and are checked; BPTT has no point to use."""
    args, _, _ = flags.parse_args('fashion_mlp', ['--jac-norm-every', '5', '--jac-reg', '0.5', '--jac-reg-freq', '0.3'])
    assert (args.jac_norm_every, args.jac_reg, args.jac_reg_freq) == (5, 0.5, 0.3)
    for argv, line in ((['--jac-reg-freq', '0'], "--jac-reg-freq: expected a number in (0, 1], got '0'"),
                       (['--jac-reg', '-1'], "--jac-reg: expected a number >= 0, got '-1'"),
                       (['--jac-norm-every', '2', '--method', 'bptt'],
                        '--jac-norm-every: has no effect unless --method ide; leave it out'),
                       (['--jac-reg-freq', '0.5'],
                        '--jac-reg-freq: has no effect unless --method ide --jac-reg γ (γ > 0); leave it out')):
        with pytest.raises(SystemExit):
            flags.parse_args('fashion_mlp', argv)
        assert capsys.readouterr().err.strip() == f'fashion_mlp.py: error: {line}'


def test_norms_and_penalty_reach_the_log(data_root, tmp_path, single_thread):
    """--jac-norm-every 1 logs the feedback and Jacobian norms, --jac-reg the regulariser's estimate."""
    folder = tmp_path / 'run'
    run_main('fashion_mlp', TINY + ['--path', data_root, '--epochs', '1', '-c', folder, '--jac-norm-every', '1',
                                    '--jac-reg', '0.5', '--drop', '0'])
    (row,) = log_rows(folder)
    assert 0 < row['Fb Norm'] <= 0.5 + 1e-4  # |g| ≤ 1 and a fully connected W: ‖W‖₂ = |g| over Vth = 2
    assert 0 < row['Jac Norm'] <= row['Fb Norm'] + 1e-4  # single layer, no dropout: J = D W / Vth, D 0/1
    assert row['Jac Reg'] > 0


class Penalised(torch.nn.Module):
    """A linear classifier whose forward leaves a penalty ‖w‖² behind, as SNNClassifier leaves its regulariser."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)
        self.jacobian_penalty = None

    def forward(self, x):
        self.jacobian_penalty = self.fc.weight.pow(2).sum()
        return self.fc(x)


def test_train_step_adds_the_penalty_to_the_gradient_not_to_the_loss():
    """The step's gradient is that of loss + penalty; the loss it reports (and logs) is the criterion's."""
    torch.manual_seed(0)
    model, x, y = Penalised(), torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _, loss = train_step(model, model, x, y, criterion, optimizer, torch.device('cpu'), False)
    expected_loss = criterion(model.fc(x), y)
    (expected,) = torch.autograd.grad(expected_loss + model.fc.weight.pow(2).sum(), model.fc.weight)
    assert float(loss.detach()) == pytest.approx(float(expected_loss.detach()))
    torch.testing.assert_close(model.fc.weight.grad, expected)
