"""Gradient modes (exact, Jacobian-free, phantom), the solver options and the diagnostics in solver_stats.

The approximate modes are checked in float64 against the same dense Jacobian the exact gradient is
checked against (tests/test_implicit_grad.py): with J the full Jacobian of f over the batch at the
mechanism's linearisation point and w = ∂L/∂a, y is formed densely and the gradient is y·∂f/∂θ
through one application of f at the state.
"""
import math

import numpy as np
import pytest
import torch

from modules import adjoint_solve, build_model
from tests.test_implicit_grad import (build_case, dense_reference_gradients, gradient_targets, mechanism_gradients,
                                      relative_error)

pytestmark = pytest.mark.usefixtures("single_thread")

CASES = [pytest.param("fc", "IF", False, id="fc-IF-const"), pytest.param("multi", "LIF", True, id="multi-LIF-spike")]


def gradients_for_adjoint(snn, x, rate, y):
    """y·∂f/∂θ for every gradient target, through one application of f at the state (call after the forward)."""
    current = snn.input_layer(snn.average_input(x))
    z = snn.f(rate, current)
    _, targets = gradient_targets(snn, x)
    grads = torch.autograd.grad(z, targets, y.view(rate.shape), allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(targets, grads)]


def phantom_adjoint(J, w, steps, tau):
    """τ Σ_{j<K} w M^j with M = (1 - τ) I + τ J, formed densely (w a row vector)."""
    M = (1 - tau) * torch.eye(J.shape[0], dtype=J.dtype) + tau * J
    y, term = torch.zeros_like(w), w.clone()
    for _ in range(steps):
        y = y + tau * term
        term = term @ M
    return y


@pytest.mark.parametrize("arch, leak, spike", CASES)
@pytest.mark.parametrize("steps, tau", [(5, 0.5), (3, 0.8)])
def test_phantom_gradient_is_the_truncated_series(tiny_snn, tiny_input, arch, leak, spike, steps, tau):
    """grad='phantom' gives y_K = τ Σ_{j<K} v M^j, M = (1 - τ) I + τ J, to 1e-10, in K vector-Jacobian
    products; solver_stats reports K steps stopped by the cap and the residual of y_K."""
    snn, x = build_case(tiny_snn, tiny_input, arch, leak, spike)
    snn.configure_solver(grad="phantom", phantom_k=steps, phantom_tau=tau)
    rate, w, got = mechanism_gradients(snn, x)
    _, J = dense_reference_gradients(snn, x, rate, w)
    y = phantom_adjoint(J, w.flatten(), steps, tau)
    expected = gradients_for_adjoint(snn, x, rate, y)
    assert relative_error(got, expected) <= 1e-10
    stats = snn.solver_stats
    assert (stats["grad"], stats["nstep"], stats["nfev"], stats["stop"]) == ("phantom", steps, steps, "cap")
    residual = float((w.flatten() + y @ J - y).norm())
    assert stats["residual"] == pytest.approx(residual, rel=1e-10)
    assert stats["rel_residual"] == pytest.approx(residual / float(w.norm()), rel=1e-10)


@pytest.mark.parametrize("arch, leak, spike", CASES)
def test_phantom_error_falls_as_k_grows(tiny_snn, tiny_input, arch, leak, spike):
    """The phantom gradient's error against the exact implicit gradient falls with every larger K
    (1, 2, 4, 8, 16 steps of τ = 0.5), by over 100× in all."""
    errors = []
    for steps in (1, 2, 4, 8, 16):
        snn, x = build_case(tiny_snn, tiny_input, arch, leak, spike)
        snn.configure_solver(grad="phantom", phantom_k=steps, phantom_tau=0.5)
        rate, w, got = mechanism_gradients(snn, x)
        exact, _ = dense_reference_gradients(snn, x, rate, w)
        errors.append(relative_error(got, exact))
    print("phantom errors for K = 1, 2, 4, 8, 16: " + ", ".join(f"{e:.1e}" for e in errors))
    assert all(later < earlier for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < errors[0] / 100


@pytest.mark.parametrize("arch, leak, spike", CASES)
def test_jacobian_free_gradient_is_v_through_f(tiny_snn, tiny_input, arch, leak, spike):
    """grad='jfb' gives exactly v·∂f/∂θ (y = v, no solve) and differs from the exact gradient; its one
    vector-Jacobian product measures ‖v·J‖, the residual of y = v."""
    snn, x = build_case(tiny_snn, tiny_input, arch, leak, spike)
    snn.configure_solver(grad="jfb")
    rate, w, got = mechanism_gradients(snn, x)
    expected = gradients_for_adjoint(snn, x, rate, w)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    exact, J = dense_reference_gradients(snn, x, rate, w)
    assert relative_error(got, exact) > 1e-3
    stats = snn.solver_stats
    assert (stats["grad"], stats["nstep"], stats["nfev"]) == ("jfb", 1, 1)
    assert stats["residual"] == pytest.approx(float((w.flatten() @ J).norm()), rel=1e-10)


@pytest.mark.parametrize("solver", ["broyden", "anderson"])
def test_solver_memory_reaches_the_solver(tiny_snn, tiny_input, solver):
    """solver_memory is passed to the solver: memory 1 takes more iterations to the same gradient than
    the default memory on the multi-layer net."""
    nsteps = {}
    for memory in (None, 1):
        snn, x = build_case(tiny_snn, tiny_input, "multi", "IF", False, threshold=200)
        snn.configure_solver(solver=solver, threshold=200, solver_memory=memory)
        rate, w, got = mechanism_gradients(snn, x)
        expected, _ = dense_reference_gradients(snn, x, rate, w)
        assert relative_error(got, expected) <= 1e-6
        nsteps[memory] = snn.solver_stats["nstep"]
    print(f"{solver}: {nsteps[None]} iterations at the default memory, {nsteps[1]} at memory 1")
    assert nsteps[1] > nsteps[None]


@pytest.mark.parametrize("options, message", [
    (dict(grad="exact"), "unknown gradient mode 'exact'"),
    (dict(solver="newton"), "unknown solver 'newton'"),
    (dict(solver="iter", solver_memory=4), "solver 'iter' keeps no memory"),
    (dict(solver_memory=0), "solver_memory must be >= 1"),
    (dict(grad="phantom", solver_memory=4), "solver_memory applies to grad='ide' only"),
    (dict(grad="phantom", phantom_k=0), "phantom_k must be >= 1"),
    (dict(grad="phantom", phantom_tau=1.5), r"phantom_tau must be in \(0, 1\]"),
    (dict(threshold=0), "threshold must be >= 1"),
])
def test_bad_gradient_options_are_errors(options, message):
    """Every option a mode cannot use, or an out-of-range value, is one clear ValueError."""
    with pytest.raises(ValueError, match=message):
        adjoint_solve(**options)


def test_build_model_passes_the_gradient_options():
    """build_model's grad, solver_memory, phantom_k, phantom_tau and forward_residual reach the net."""
    model = build_model("fashion_mlp", time_step=2, grad="phantom", phantom_k=3, phantom_tau=0.25,
                        forward_residual=False)
    snn = model.snn
    assert (snn.grad, snn.phantom_k, snn.phantom_tau, snn.forward_residual) == ("phantom", 3, 0.25, False)
    assert snn.adjoint.max_iter == 3 and dict(snn.adjoint.options) == {"tau": 0.25}
    model = build_model("mnist_conv", time_step=2, solver="anderson", solver_memory=7)
    assert model.snn.adjoint.solver.solve.__name__ == "anderson" and dict(model.snn.adjoint.options) == {"memory": 7}


def test_diagnostics_in_solver_stats(tiny_snn, tiny_input):
    """solver_stats holds the forward residual ‖f(a) - a‖/‖a‖ of the simulated rate; forward_residual=False leaves it out."""
    snn, x = build_case(tiny_snn, tiny_input, "conv", "IF", False)
    with torch.no_grad():
        snn.feedback.spectral.g.fill_(1.5)  # beyond the clamp at 1: W's scale is 1
    rate, w, _ = mechanism_gradients(snn, x)
    stats = snn.solver_stats
    with torch.no_grad():
        current = snn.input_layer(snn.average_input(x))
        expected = float((snn.f(rate, current) - rate).norm() / rate.norm())
    assert stats["forward_residual"] == pytest.approx(expected, rel=1e-12)
    assert {"nstep", "nfev", "residual", "rel_residual", "init_residual", "trace", "stop", "syncs",
            "grad"} <= set(stats)
    snn.forward_residual = False
    mechanism_gradients(snn, x)
    assert "forward_residual" not in snn.solver_stats and "nstep" in snn.solver_stats


def test_forward_residual_falls_as_one_over_t(tiny_snn, tiny_input):
    """For IF neurons on a fixed single-layer net and input, the forward residual ‖f(a) - a‖/‖a‖ of the
    simulated rate falls as O(1/T): its log-log slope over T = 10..160 is -1 ± 0.2."""
    steps = [10, 20, 40, 80, 160]
    residuals = []
    for time_step in steps:
        snn = tiny_snn("conv", leak=1.0, time_step=time_step, seed=0).train()
        x = tiny_input("conv", 8, False, time_step, seed=1)
        snn(x).sum().backward()
        residuals.append(snn.solver_stats["forward_residual"])
    slope = float(np.polyfit(np.log(steps), np.log(residuals), 1)[0])
    print("forward residuals: " + ", ".join(f"T={t}: {r:.2e}" for t, r in zip(steps, residuals))
          + f"; slope {slope:.2f}")
    assert all(math.isfinite(r) and r > 0 for r in residuals)
    assert -1.2 <= slope <= -0.8
