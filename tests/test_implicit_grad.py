"""The implicit gradient is the exact gradient of the equilibrium (docs/method.md: where J is evaluated).

Every kind of net (fc / conv / multi-layer conv, IF / LIF, constant / spike input, with
and without dropout) is checked in float64, with BN in training mode, against
  (a) an independent dense computation at the state the mechanism linearises at:
      y solves (I - J)ᵀ y = ∂L/∂a with J the full Jacobian of the same f over the whole
      batch (BN couples the samples), and ∂L/∂θ = y·∂f/∂θ through z = f(a);
  (b) central finite differences of L(a*(θ)) at the exact equilibrium a* = f(a*);
  (c) repeatability: a second backward pass gives the same gradient and nothing else
      accumulates into the parameters.
"""
import itertools

import pytest
import torch

pytestmark = pytest.mark.usefixtures("single_thread")

ARCHS = ("fc", "conv", "multi")
LEAKS = {"IF": 1.0, "LIF": 0.9}
KINDS = [pytest.param(arch, leak, spike, id=f"{arch}-{leak}-{'spike' if spike else 'const'}")
         for arch, leak, spike in itertools.product(ARCHS, LEAKS, (False, True))]
TIME_STEP = 10


def batch_size(arch):
    """BatchNorm1d over 4 samples for fc; conv BN also averages over space, 3 samples suffice."""
    return 4 if arch == "fc" else 3


def build_case(tiny_snn, tiny_input, arch, leak, spike, seed=0, **options):
    """A tiny net of the given kind in training mode and an input requiring grad.

    LIF cases also use dropout 0.25 in every layer (input, loop and feedback)."""
    options.setdefault("dropout", 0.25 if leak == "LIF" else 0.0)
    snn = tiny_snn(arch, leak=LEAKS[leak], spike=spike, time_step=TIME_STEP, seed=seed, **options)
    snn.train()
    x = tiny_input(arch, batch_size(arch), spike, TIME_STEP, seed=seed + 1).requires_grad_()
    return snn, x


def loss_weights(shape, seed=5):
    """Fixed random weights w of the loss L = Σ w·rate."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def gradient_targets(snn, x):
    """Names and tensors whose gradients are compared: every parameter, and the input."""
    named = list(snn.named_parameters()) + [("input", x)]
    return [n for n, _ in named], [t for _, t in named]


def mechanism_gradients(snn, x):
    """One training forward and backward of L = Σ w·rate; returns (rate, w, [grad of each target])."""
    rate = snn(x)
    w = loss_weights(rate.shape)
    (w * rate).sum().backward()
    _, targets = gradient_targets(snn, x)
    return rate.detach(), w, [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in targets]


def dense_reference_gradients(snn, x, rate, w, linearise_at_f=None):
    """Implicit gradient by a dense solve, at the forward's state (call after the forward).

    J = ∂f/∂a at the point the method prescribes (z = f(a) for multi-layer nets, a itself for
    single-layer nets) as one (B·n × B·n) matrix, y from (I - J)ᵀ y = w, and the gradient
    y·∂f/∂θ through one application of f at a. f uses the forward's dropout masks (kept in
    the modules) and BN batch statistics without touching the running statistics.
    """
    if linearise_at_f is None:
        linearise_at_f = len(snn.layers) > 0
    shape = rate.shape
    current = snn.input_layer(snn.average_input(x))           # F(x̄), batch-statistics BN
    point = snn.f(rate, current.detach()).detach() if linearise_at_f else rate
    J = torch.autograd.functional.jacobian(
        lambda p: snn.f(p.view(shape), current.detach()).flatten(), point.flatten())
    eye = torch.eye(J.shape[0], dtype=J.dtype)
    y = torch.linalg.solve((eye - J).T, w.flatten())
    z = snn.f(rate, current)
    _, targets = gradient_targets(snn, x)
    grads = torch.autograd.grad(z, targets, y.view(shape), allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(targets, grads)], J


def relative_error(got, expected):
    """‖got - expected‖ / ‖expected‖ over all tensors together."""
    num = torch.cat([(g - e).flatten() for g, e in zip(got, expected)]).norm()
    return float(num / torch.cat([e.flatten() for e in expected]).norm())


def assert_gradients_close(names, got, expected, rtol):
    """Overall relative error ≤ rtol, and every tensor within rtol of its own size (plus a
    tiny allowance for tensors whose gradient vanishes analytically, like a bias before BN)."""
    scale = torch.cat([e.flatten() for e in expected]).norm()
    assert relative_error(got, expected) <= rtol
    for name, g, e in zip(names, got, expected):
        assert float((g - e).norm()) <= rtol * float(e.norm()) + 1e-12 * float(scale), name


# ---------------------------------------------------------------- (a) dense reference
@pytest.mark.parametrize("solver", ["broyden", "anderson", "iter"])
@pytest.mark.parametrize("arch, leak, spike", KINDS)
def test_gradient_matches_dense_adjoint_solve(tiny_snn, tiny_input, arch, leak, spike, solver):
    """Parameter and input gradients equal the dense implicit gradient at the mechanism's own
    state to 1e-6 when the adjoint solver is given enough iterations (threshold 200); the solve
    stops by the paper's rule (a residual of ~0) well before that cap."""
    snn, x = build_case(tiny_snn, tiny_input, arch, leak, spike, solver=solver, threshold=200)
    rate, w, got = mechanism_gradients(snn, x)
    names, _ = gradient_targets(snn, x)
    expected, _ = dense_reference_gradients(snn, x, rate, w)
    assert 0 < rate.mean() < 1, "the state should be neither silent nor saturated"
    assert all(p.grad is not None for p in snn.parameters()), "every parameter is inside f"
    assert float(got[-1].norm()) > 0, "the input receives a gradient"
    assert_gradients_close(names, got, expected, rtol=1e-6)
    stats = snn.solver_stats
    assert stats["rel_residual"] < 1e-8 and stats["stop"] == "tol" and stats["nstep"] < 150


@pytest.mark.parametrize("arch, leak, spike", KINDS)
def test_default_threshold_accuracy(tiny_snn, tiny_input, arch, leak, spike):
    """At the default threshold (30 iterations) Broyden reaches the dense gradient to 1e-6 on
    these nets and the damped iteration to 1e-2 (its rate is (1 + ρ(J))/2 per step). Each solve
    either runs into the cap (exactly 30 iterations, 'cap') or has converged to ~0 ('tol')."""
    errors = {}
    for solver in ("broyden", "iter"):
        snn, x = build_case(tiny_snn, tiny_input, arch, leak, spike, solver=solver)
        rate, w, got = mechanism_gradients(snn, x)
        expected, _ = dense_reference_gradients(snn, x, rate, w)
        errors[solver] = relative_error(got, expected)
        stats = snn.solver_stats
        if stats["stop"] == "cap":
            assert stats["nstep"] == 30, solver
        else:
            assert stats["stop"] == "tol" and stats["nstep"] <= 30 and stats["rel_residual"] < 1e-8, solver
    print(f"[{arch}-{leak}-{'spike' if spike else 'const'}] relative gradient error at threshold 30: "
          f"broyden {errors['broyden']:.1e}, iter {errors['iter']:.1e}")
    assert errors["broyden"] <= 1e-6
    assert errors["iter"] <= 1e-2


@pytest.mark.parametrize("arch, leak, spike", [("multi", "IF", False), ("multi", "LIF", True)])
def test_reference_is_sensitive_to_the_linearisation_point(tiny_snn, tiny_input, arch, leak, spike):
    """For multi-layer nets J is taken at z = f(a), not at a: the two dense references differ
    clearly, and the mechanism matches the one at f(a) (so the comparison above can fail)."""
    snn, x = build_case(tiny_snn, tiny_input, arch, leak, spike, threshold=200)
    rate, w, got = mechanism_gradients(snn, x)
    at_f, _ = dense_reference_gradients(snn, x, rate, w, linearise_at_f=True)
    at_a, _ = dense_reference_gradients(snn, x, rate, w, linearise_at_f=False)
    assert relative_error(at_a, at_f) > 1e-3
    assert relative_error(got, at_f) <= 1e-6


@pytest.mark.parametrize("arch", ARCHS)
def test_jacobian_couples_the_batch_through_bn(tiny_snn, tiny_input, arch):
    """J is the Jacobian of f over the whole batch: BN batch statistics make its off-diagonal
    (sample ≠ sample') blocks nonzero, and the mechanism's gradient includes them."""
    snn, x = build_case(tiny_snn, tiny_input, arch, "IF", False, threshold=200)
    rate, w, got = mechanism_gradients(snn, x)
    expected, J = dense_reference_gradients(snn, x, rate, w)
    B, n = rate.shape[0], rate[0].numel()
    blocks = J.view(B, n, B, n)
    off_diagonal = sum(float(blocks[i, :, j].abs().max()) for i in range(B) for j in range(B) if i != j)
    if arch == "multi":  # BN inside the loop: samples interact through the batch statistics
        assert off_diagonal > 1e-6
    else:                # single-layer: the input BN is outside the state map, J is per sample
        assert off_diagonal == 0.0
    assert relative_error(got, expected) <= 1e-6


# -------------------------------------------------------- (b) exact equilibrium vs FD
def solve_equilibrium(snn, x, max_iter=2000):
    """The exact fixed point a* = f(a*) by plain iteration of f (no autograd), and F(x̄)."""
    with torch.no_grad():
        current = snn.input_layer(snn.average_input(x))
        a = current
        for layer in snn.layers:  # a zero state of the last layer's shape
            a = layer(a)
        a = torch.zeros_like(a)
        for _ in range(max_iter):
            new = snn.f(a, current)
            change = float((new - a).abs().max())
            a = new
            if change <= 1e-15:
                break
    assert change <= 1e-15, f"fixed-point iteration did not converge ({change:.1e})"
    return a, current


def clamp_margin(snn, a, current):
    """Smallest distance of any pre-clamp value inside f(a) from the clamp bounds 0 and 1."""
    with torch.no_grad():
        h = (snn.feedback(a) + current) / snn.vth
        margins = [torch.minimum(h.abs(), (h - 1).abs()).min()]
        for layer in snn.layers:
            h = layer(h.clamp(0, 1)) / snn.vth
            margins.append(torch.minimum(h.abs(), (h - 1).abs()).min())
    return float(min(margins))


FD_CASES = [pytest.param("fc", "IF", False, id="fc-IF-const"),
            pytest.param("fc", "LIF", True, id="fc-LIF-spike"),
            pytest.param("conv", "LIF", True, id="conv-LIF-spike"),
            pytest.param("conv", "IF", False, id="conv-IF-const"),
            pytest.param("multi", "IF", False, id="multi-IF-const"),
            pytest.param("multi", "IF", True, id="multi-IF-spike")]


@pytest.mark.parametrize("arch, leak, spike", FD_CASES)
def test_gradient_at_exact_equilibrium_matches_finite_differences(tiny_snn, tiny_input, monkeypatch,
                                                                   arch, leak, spike):
    """With the simulated rate replaced by the exact equilibrium a*(θ), the mechanism's gradient
    of L = Σ w·a* equals central finite differences of L(a*(θ)) (eps 1e-6, float64) for two
    entries of every parameter tensor and of the input, to relative error 1e-4."""
    snn, x = build_case(tiny_snn, tiny_input, arch, leak, spike, dropout=0.0, gain=0.5, threshold=200)
    # The forward advances the power iteration first; a* must be the fixed point of that same f.
    monkeypatch.setattr(snn, "simulate", lambda inp, all_rates=False: (solve_equilibrium(snn, inp)[0], None))
    rate = snn(x)
    a_star, current = solve_equilibrium(snn, x.detach())
    assert torch.equal(rate.detach(), a_star)
    assert clamp_margin(snn, a_star, current) > 1e-4, "f must be smooth at a*"
    w = loss_weights(rate.shape)
    (w * rate).sum().backward()

    def loss_at_equilibrium(inp):
        return float((w * solve_equilibrium(snn, inp)[0]).sum())

    gen = torch.Generator().manual_seed(3)
    names, targets = gradient_targets(snn, x)
    eps = 1e-6
    got, fd, labels = [], [], []
    with torch.no_grad():
        for name, t in zip(names, targets):
            flat = t.view(-1)
            for i in torch.randperm(flat.numel(), generator=gen)[:2].tolist():
                original = flat[i].item()
                flat[i] = original + eps
                up = loss_at_equilibrium(x.detach())
                flat[i] = original - eps
                down = loss_at_equilibrium(x.detach())
                flat[i] = original
                fd.append((up - down) / (2 * eps))
                got.append(float(t.grad.view(-1)[i]))
                labels.append(f"{name}[{i}]")
    got, fd = torch.tensor(got), torch.tensor(fd)
    err = float((got - fd).norm() / fd.norm())
    print(f"[{arch}-{leak}-{'spike' if spike else 'const'}] finite differences vs implicit: {err:.1e}")
    assert err <= 1e-4
    worst = int((got - fd).abs().argmax())
    assert abs(got[worst] - fd[worst]) <= 1e-4 * (abs(fd[worst]) + 1e-3 * fd.abs().max()), labels[worst]


# ------------------------------------------------------------------ (c) repeatability
@pytest.mark.parametrize("arch, leak, spike", [("fc", "LIF", False), ("multi", "IF", True)])
def test_backward_is_repeatable_and_accumulates_only_the_gradient(tiny_snn, tiny_input, arch, leak, spike):
    """Two backward passes through the same graph give bit-identical gradients and solver
    statistics, and p.grad after them is exactly twice the single-pass gradient, which is the
    dense implicit gradient: the adjoint solve itself deposits nothing into the parameters."""
    snn, x = build_case(tiny_snn, tiny_input, arch, leak, spike, threshold=200)
    names, targets = gradient_targets(snn, x)
    rate = snn(x)
    w = loss_weights(rate.shape)
    loss = (w * rate).sum()
    passes = []
    for _ in range(2):
        for t in targets:
            t.grad = None
        loss.backward(retain_graph=True)
        passes.append(([t.grad.clone() for t in targets], dict(snn.solver_stats)))
    (first, first_stats), (second, second_stats) = passes
    for name, f, s in zip(names, first, second):
        assert torch.equal(f, s), name
    assert second_stats["nstep"] == first_stats["nstep"] and second_stats["trace"] == first_stats["trace"]
    loss.backward()  # accumulates onto the second pass's gradient
    for name, t, f in zip(names, targets, first):
        assert torch.equal(t.grad, 2 * f), name
    expected, _ = dense_reference_gradients(snn, x, rate.detach(), w)
    assert_gradients_close(names, first, expected, rtol=1e-6)


@pytest.mark.parametrize("name", ["mnist_conv", "alexnetf"])
def test_autocast_keeps_the_adjoint_solve_in_float32(name):
    """Under bf16 autocast (--amp) the adjoint solve still differentiates f in float32: with a relative
    tolerance of 1e-5 it stops by that tolerance after as many iterations as without autocast (±1), well
    before the cap of 30, at the same residual level (bf16 products would stall near 1e-3 of v and run
    into the cap)."""
    from modules import build_model

    def solve(amp):
        torch.manual_seed(0)
        model = build_model(name, time_step=6, leaky=0.95, tol=1e-5).train()
        x = torch.randn(4, 3 if name == "alexnetf" else 1, *((32, 32) if name == "alexnetf" else (28, 28)),
                        generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        logits.float().square().sum().backward()
        return model.snn.solver_stats

    full, amp = solve(False), solve(True)
    print(f"[{name}] float32: {full['nstep']} iterations, {full['rel_residual']:.1e}; "
          f"autocast: {amp['nstep']} iterations, {amp['rel_residual']:.1e}")
    assert full["stop"] == amp["stop"] == "tol"
    assert abs(amp["nstep"] - full["nstep"]) <= 1 and amp["nstep"] <= 20
    assert amp["rel_residual"] < 1e-5 and amp["rel_residual"] <= 2 * full["rel_residual"]
