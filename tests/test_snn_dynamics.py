"""IF/LIF dynamics: the simulation is the equations of docs/method.md, and its rate converges
to the equilibrium a* = f(a*) (error O(1/T) for IF, O(1 - λ) for LIF)."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modules.layers import Connection, Feedback
from modules.snn import FeedbackSNN

pytestmark = pytest.mark.usefixtures("single_thread")

T_VALUES = [25, 50, 100, 200, 400, 800]


# ------------------------------------------------------------------ convergence to a*
def interior_fc_net(leak, time_step, gain=0.3, n_in=20, n=60, seed=0):
    """A single-layer fc net without BN, in evaluation, whose equilibrium is well inside (0, 1):
    input currents F(x) ≈ 1 ± 0.7 (half the threshold 2) and a weak feedback (‖W‖ = 0.3)."""
    torch.manual_seed(seed)
    input_layer = Connection(nn.Linear(n_in, n), bn=False, flatten=True)
    feedback = Feedback(nn.Linear(n, n, bias=False))
    snn = FeedbackSNN(input_layer, [], feedback, time_step=time_step, leak=leak).double().eval()
    with torch.no_grad():
        input_layer.linear.weight.mul_(0.15)
        input_layer.linear.bias.fill_(1.0)
        feedback.spectral.g.fill_(gain)
    x = torch.randn(8, n_in, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return snn, x


def equilibrium(snn, x, iterations=300):
    """a* by iterating f (a contraction here: ‖J‖ ≤ ‖W‖ / Vth = 0.15)."""
    f = snn.equilibrium_function(x)
    with torch.no_grad():
        a = torch.zeros_like(snn.simulate(x)[0])
        for _ in range(iterations):
            a = f(a)
        assert float((f(a) - a).abs().max()) < 1e-14
    return a


def test_if_rate_error_falls_like_one_over_t():
    """IF: the mean error |a[T] - a*| of the average rate falls like 1/T: the fitted slope of
    log error against log T over T = 25 … 800 is ≤ -0.8, and T·error stays bounded."""
    snn, x = interior_fc_net(leak=1.0, time_step=T_VALUES[0])
    a_star = equilibrium(snn, x)
    assert 0.05 < float(a_star.min()) and float(a_star.max()) < 0.95
    errors = []
    for T in T_VALUES:
        snn.time_step = T
        errors.append(float((snn.simulate(x)[0] - a_star).abs().mean()))
    slope = np.polyfit(np.log(T_VALUES), np.log(errors), 1)[0]
    print(f"IF rate error vs T: {['%.1e' % e for e in errors]}; log-log slope {slope:.3f}")
    assert slope <= -0.8
    assert max(T * e for T, e in zip(T_VALUES, errors)) < 1.0


@pytest.mark.parametrize("leak", [0.99, 0.999])
def test_lif_weighted_rate_is_close_to_equilibrium(leak):
    """LIF with λ close to 1 and T = 3000: the λ-weighted rate is within 2(1 - λ) of a* in every
    unit, and within (1 - λ) on average.

    Why this tolerance: with reset by subtraction, Vth·λ·Σλ^(T-1-t)s[t] equals the λ-weighted
    input current minus the final potential, so the weighted rate is the weighted current over
    λ·Vth (not Vth), a relative offset 1/λ - 1 ≈ 1 - λ, plus a boundary term u/(Vth·Σλ^k), also
    O(1 - λ). Measured: max gap 1.06e-2 (λ = 0.99) and 1.1e-3 (λ = 0.999), mean gap about half.
    """
    snn, x = interior_fc_net(leak=leak, time_step=3000)
    a_star = equilibrium(snn, x)
    gap = (snn.simulate(x)[0] - a_star).abs()
    print(f"LIF λ={leak}: max gap {float(gap.max()):.2e}, mean gap {float(gap.mean()):.2e}")
    assert float(gap.max()) <= 2 * (1 - leak)
    assert float(gap.mean()) <= 1 - leak


def test_lif_gap_shrinks_with_the_leak():
    """The LIF gap is an O(1 - λ) effect: ten times closer to 1 gives a gap at least five times smaller."""
    gaps = {}
    for leak in (0.99, 0.999):
        snn, x = interior_fc_net(leak=leak, time_step=3000)
        gaps[leak] = float((snn.simulate(x)[0] - equilibrium(snn, x)).abs().mean())
    assert gaps[0.999] <= gaps[0.99] / 5


def constant_current_neurons(currents, time_step, leak=1.0):
    """Independent neurons (no feedback: g = 0) driven by the given constant currents."""
    n = currents.numel()
    input_layer = Connection(nn.Linear(1, n), bn=False, flatten=True)
    feedback = Feedback(nn.Linear(n, n, bias=False))
    snn = FeedbackSNN(input_layer, [], feedback, time_step=time_step, leak=leak).double().eval()
    with torch.no_grad():
        input_layer.linear.weight.copy_(currents.view(n, 1))
        feedback.spectral.g.fill_(0.0)
    return snn, torch.ones(1, 1, dtype=torch.float64)


def test_if_spike_count_is_the_integrated_input_over_threshold():
    """IF with reset by subtraction is an exact integrator: a neuron with constant current
    0 ≤ I < Vth fires floor(T·I/Vth) times in T steps, so its rate is that count over T. The
    currents include exact binary fractions of Vth, whose potential hits Vth exactly: a neuron
    fires at u = Vth (H(0) = 1)."""
    T, vth = 1000, 2.0
    random = torch.rand(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * vth
    currents = torch.cat([random, torch.arange(8, dtype=torch.float64) * vth / 8])
    snn, x = constant_current_neurons(currents, T)
    rate, _ = snn.simulate(x)
    expected = torch.floor(T * currents / vth) / T
    assert torch.equal(rate[0], expected)


# ------------------------------------------------------------- naive reference dynamics
def apply_op(op, h, weight, bias):
    """The linear operator of `op` (fc, conv or transposed conv) with explicit weight and bias."""
    if isinstance(op, nn.Linear):
        return F.linear(h.flatten(1), weight, bias)
    if isinstance(op, nn.ConvTranspose2d):
        return F.conv_transpose2d(h, weight, bias, op.stride, op.padding, op.output_padding)
    return F.conv2d(h, weight, bias, op.stride, op.padding)


def batch_norm(h, mean, var, bn):
    """(h - mean) / sqrt(var + eps) · γ + β, per channel (dim 1)."""
    shape = (1, -1) + (1,) * (h.dim() - 2)
    return (h - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)


def feedback_weight(feedback):
    """W = clamp(g, -1, 1) · V / σ, σ = uᵀ V v with the power-iteration vectors (docs/method.md)."""
    parametrization = feedback.linear.parametrizations.weight
    V, spectral = parametrization.original, parametrization[0]
    sigma = spectral.u @ (V.flatten(1) @ spectral.v)
    return spectral.g.clamp(-1.0, 1.0) * V / sigma


@torch.no_grad()
def naive_simulation(snn, x, training):
    """The equations of docs/method.md written out: returns (state rate, plain rate per layer).

    I_1[t] = F(x[t]) + W_fb s_N[t-1];  I_{l+1}[t] = W_l s_l[t];
    u[t] = λ(u[t-1] - Vth s[t-1]) + I[t];  s[t] = H(u[t] - Vth);  u[-1] = s[-1] = 0.
    Training: the input BN uses the batch statistics of its linear output on x̄ (biased
    variance), loop BNs their running statistics, and every layer's output current is
    multiplied by its dropout mask. Evaluation: running statistics, no dropout.
    """
    T, lam, vth = snn.time_step, snn.leak, snn.vth
    frames = [x[..., t] for t in range(T)] if snn.spike_input else [x] * T
    weights = [lam ** (T - 1 - t) for t in range(T)]
    x_bar = sum(w * fr for w, fr in zip(weights, frames)) / sum(weights)
    conns = [snn.input_layer, *snn.layers]

    def mask(conn):
        return conn.dropout.mask if training and conn.dropout.p > 0 else 1.0

    def linear(conn, h):
        return apply_op(conn.linear, h, conn.linear.weight, conn.linear.bias)

    stats = []
    for l, conn in enumerate(conns):
        if conn.bn is None:
            stats.append(None)
        elif l == 0 and training:
            h = linear(conn, x_bar)
            dims = [0] + list(range(2, h.dim()))
            stats.append((h.mean(dim=dims), h.var(dim=dims, unbiased=False)))
        else:
            stats.append((conn.bn.running_mean, conn.bn.running_var))

    def current(l, h):
        out = linear(conns[l], h)
        if stats[l] is not None:
            out = batch_norm(out, *stats[l], conns[l].bn)
        return out * mask(conns[l])

    W_fb = feedback_weight(snn.feedback)
    n = len(conns)
    u, s, counts = [0.0] * n, [0.0] * n, [0.0] * n
    state = 0.0
    for t in range(T):
        for l in range(n):
            if l == 0:
                I = current(0, frames[t])
                if t > 0:
                    I = I + apply_op(snn.feedback.linear, s[-1], W_fb, None) * mask(snn.feedback)
            else:
                I = current(l, s[l - 1])
            u[l] = lam * (u[l] - vth * s[l]) + I
            s[l] = (u[l] >= vth).to(x.dtype)
            counts[l] = counts[l] + s[l]
        state = state + weights[t] * s[-1]
    return state / sum(weights), [c / T for c in counts]


NAIVE_CASES = [pytest.param(arch, leak, spike, mode, id=f"{arch}-{'IF' if leak == 1 else 'LIF'}-"
                            f"{'spike' if spike else 'const'}-{mode}")
               for arch, leak, spike, mode in itertools.product(("fc", "conv", "multi"), (1.0, 0.9),
                                                                (False, True), ("train", "eval"))]


@pytest.mark.parametrize("arch, leak, spike, mode", NAIVE_CASES)
def test_simulation_matches_naive_reference(tiny_snn, tiny_input, arch, leak, spike, mode):
    """`simulate(x, all_rates=True)` equals a loop-by-loop implementation of the equations:
    same state rate (λ-weighted for LIF) and same plain firing rate of every layer, for IF and
    LIF, single- and multi-layer, constant and spike input (with spare frames beyond T), with
    dropout masks and BN statistics as in training, and in evaluation."""
    T = 12
    snn = tiny_snn(arch, leak=leak, spike=spike, dropout=0.3, time_step=T, gain=1.0)
    getattr(snn, mode)()
    x = tiny_input(arch, 3, spike, T + 2, scale=2.0)
    rate, rates = snn.simulate(x, all_rates=True)   # draws the training dropout masks
    ref_rate, ref_rates = naive_simulation(snn, x, training=(mode == "train"))
    assert torch.allclose(rate, ref_rate, rtol=0, atol=1e-12)
    assert len(rates) == len(ref_rates) == 1 + len(snn.layers)
    for got, ref in zip(rates, ref_rates):
        assert torch.equal(got, ref)
    active = [bool(((r > 0) & (r < 1)).any()) for r in rates]
    assert all(active), "every layer should fire at some but not all steps"


def naive_equilibrium_function(snn, x, a, training):
    """f(a) of docs/method.md written out: clamp((W_fb a + F(x̄)) / Vth, 0, 1), then
    clamp(W_l h / Vth, 0, 1) for each loop layer. Training: every BN normalises with the batch
    statistics of its own input (biased variance), every layer's output is multiplied by its
    dropout mask; evaluation: running statistics, no dropout."""
    T, lam = snn.time_step, snn.leak
    if snn.spike_input:
        weights = torch.tensor([lam ** (T - 1 - t) for t in range(T)], dtype=x.dtype)
        x = (x[..., :T] * weights).sum(-1) / weights.sum()

    def connection(conn, h, weight, bias):
        out = apply_op(conn.linear, h, weight, bias)
        if conn.bn is not None:
            if training:
                dims = [0] + list(range(2, out.dim()))
                stats = out.mean(dim=dims), out.var(dim=dims, unbiased=False)
            else:
                stats = conn.bn.running_mean, conn.bn.running_var
            out = batch_norm(out, *stats, conn.bn)
        if training and conn.dropout.p > 0:
            out = out * conn.dropout.mask
        return out

    input_layer = snn.input_layer
    current = connection(input_layer, x, input_layer.linear.weight, input_layer.linear.bias)
    h = torch.clamp((connection(snn.feedback, a, feedback_weight(snn.feedback), None) + current) / snn.vth, 0, 1)
    for layer in snn.layers:
        h = torch.clamp(connection(layer, h, layer.linear.weight, layer.linear.bias) / snn.vth, 0, 1)
    return h


@pytest.mark.parametrize("arch, leak, spike, mode", NAIVE_CASES)
def test_equilibrium_function_matches_naive_formula(tiny_snn, tiny_input, arch, leak, spike, mode):
    """`equilibrium_function(x)` (the f that the implicit gradient differentiates) equals the
    formula of docs/method.md at a random state: x̄ the rate-weighted input average, BN with
    batch statistics and the forward's dropout masks in training, running statistics in
    evaluation."""
    T = 12
    snn = tiny_snn(arch, leak=leak, spike=spike, dropout=0.3, time_step=T)
    getattr(snn, mode)()
    x = tiny_input(arch, 3, spike, T + 2)
    rate, _ = snn.simulate(x)                        # draws the training dropout masks
    a = torch.rand(rate.shape, generator=torch.Generator().manual_seed(4), dtype=rate.dtype)
    with torch.no_grad():
        got = snn.equilibrium_function(x)(a)
        expected = naive_equilibrium_function(snn, x, a, training=(mode == "train"))
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    assert ((got > 0) & (got < 1)).any()
