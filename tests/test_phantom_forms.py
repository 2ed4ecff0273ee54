"""The two forms of the phantom gradient (Geng et al., NeurIPS 2021), in float64 on tiny nets.

  (a) phantom_form='unroll' (UPG) is its formula: with z_0 = a, z_{k+1} = (1 - τ) z_k + τ f(z_k),
      g_K = w and g_k = g_{k+1} ((1 - τ) I + τ J(z_k)) (J dense), the gradient is
      Σ_k τ g_{k+1} · ∂f/∂θ at z_k; the output's value is the simulated rate itself;
  (b) at an exact fixed point the two forms agree; at the simulated rate they differ;
  (c) the option reaches the network, and misuse is an error.
"""
import pytest
import torch

from modules import adjoint_solve, build_model
from tests.test_implicit_grad import build_case, gradient_targets, mechanism_gradients, relative_error

pytestmark = pytest.mark.usefixtures("single_thread")

CASES = [pytest.param("fc", "IF", False, id="fc-IF-const"), pytest.param("multi", "LIF", True, id="multi-LIF-spike")]


def unrolled_formula(snn, x, rate, w, steps, tau):
    """The UPG gradient of L = Σ w·z_K for every target, by dense Jacobians (call after the forward)."""
    shape = rate.shape
    current = snn.input_layer(snn.average_input(x))      # F(x̄) with the forward's masks, batch statistics
    iterates = [rate]
    with torch.no_grad():
        for _ in range(steps):
            z = iterates[-1]
            iterates.append((1 - tau) * z + tau * snn.f(z, current))
    _, targets = gradient_targets(snn, x)
    total = [torch.zeros_like(t) for t in targets]
    g = w.flatten()
    eye = torch.eye(g.numel(), dtype=g.dtype)
    for z in reversed(iterates[:-1]):
        grads = torch.autograd.grad(snn.f(z, current), targets, (tau * g).view(shape), retain_graph=True,
                                    allow_unused=True)
        total = [t if d is None else t + d for t, d in zip(total, grads)]
        J = torch.autograd.functional.jacobian(lambda p: snn.f(p.view(shape), current.detach()).flatten(),
                                               z.flatten())
        g = g @ ((1 - tau) * eye + tau * J)
    return total


@pytest.mark.parametrize("arch, leak, spike", CASES)
@pytest.mark.parametrize("steps, tau", [(5, 0.5), (3, 0.8)])
def test_unrolled_phantom_gradient_is_its_formula(tiny_snn, tiny_input, arch, leak, spike, steps, tau):
    snn, x = build_case(tiny_snn, tiny_input, arch, leak, spike)
    snn.configure_solver(grad="phantom", phantom_k=steps, phantom_tau=tau, phantom_form="unroll")
    simulated = snn.simulate
    seen = []
    snn.simulate = lambda x_, all_rates=False: seen.append(simulated(x_, all_rates)) or seen[-1]
    rate, w, got = mechanism_gradients(snn, x)
    assert torch.equal(rate, seen[0][0])   # the value is the simulated rate, not z_K
    expected = unrolled_formula(snn, x, rate, w, steps, tau)
    assert relative_error(got, expected) <= 1e-10
    stats = snn.solver_stats
    assert (stats["grad"], stats["nstep"], stats["stop"]) == ("phantom", steps, "cap")
    assert "residual" not in stats and stats["forward_residual"] > 0


def exact_fixed_point(snn, x, start):
    """a* = f(a*) for input x, by iterating f in float64 from `start` (with the modules' dropout masks)."""
    current = snn.input_layer(snn.average_input(x))
    a = start
    with torch.no_grad():
        for _ in range(2000):
            a = snn.f(a, current)
        assert float((snn.f(a, current) - a).norm()) <= 1e-14 * max(float(a.norm()), 1.0)
    return a


@pytest.mark.parametrize("arch, leak, spike", CASES)
def test_forms_agree_at_an_exact_fixed_point_only(tiny_snn, tiny_input, arch, leak, spike):
    """With the state replaced by an exact fixed point the Neumann and unrolled forms agree to 1e-12; at
    the simulated rate (a ≠ f(a)) they differ."""
    grads = {}
    for at_fixed_point in (True, False):
        for form in ("neumann", "unroll"):
            snn, x = build_case(tiny_snn, tiny_input, arch, leak, spike, gain=0.5)
            snn.configure_solver(grad="phantom", phantom_k=4, phantom_tau=0.6, phantom_form=form)
            if at_fixed_point:
                simulated = snn.simulate
                snn.simulate = lambda x_, all_rates=False, snn=snn, simulated=simulated: (
                    exact_fixed_point(snn, x_, simulated(x_)[0]), None)
            rate, _, grads[(at_fixed_point, form)] = mechanism_gradients(snn, x)
            if at_fixed_point:
                assert 0 < float(rate.mean()) < 1
    assert relative_error(grads[(True, "unroll")], grads[(True, "neumann")]) <= 1e-12
    assert relative_error(grads[(False, "unroll")], grads[(False, "neumann")]) >= 1e-3


def test_phantom_form_option_and_errors():
    model = build_model("fashion_mlp", time_step=2, grad="phantom", phantom_form="unroll")
    assert model.snn.phantom_form == "unroll"
    assert build_model("fashion_mlp", time_step=2).snn.phantom_form == "neumann"
    with pytest.raises(ValueError, match="phantom_form='unroll' applies to grad='phantom' only"):
        adjoint_solve("ide", phantom_form="unroll")
    with pytest.raises(ValueError, match="unknown phantom form 'series'"):
        adjoint_solve("phantom", phantom_form="series")


def test_flags_reach_the_model():
    """--phantom-form and --bptt-bn (defaults neumann and batch) reach build_model through the training run;
    --phantom-form unroll with another --grad is one line of error."""
    from utils import flags
    from utils.training.run import model_args_of
    args, _, _ = flags.parse_args("alexnetf", [])
    assert (args.phantom_form, args.bptt_bn) == ("neumann", "batch")
    args, _, _ = flags.parse_args("alexnetf", ["--grad", "phantom", "--phantom-form", "unroll"])
    assert model_args_of(args, 10)["phantom_form"] == "unroll"
    args, _, _ = flags.parse_args("alexnetf", ["--method", "bptt", "--bptt-bn", "running"])
    assert model_args_of(args, 10)["bptt_bn"] == "running"
    with pytest.raises(SystemExit):
        flags.parse_args("alexnetf", ["--phantom-form", "unroll"])
