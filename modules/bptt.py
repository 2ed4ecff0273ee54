"""Back-propagation through time (BPTT) with surrogate gradients: the baseline to IDE.

BPTT differentiates the T-step simulation of `FeedbackSNN.simulate` itself
(same IF/LIF dynamics, reset by subtraction, feedback, spike input, BN rules).
The Heaviside spike s = H(u - Vth) has derivative zero almost everywhere, so
its backward pass uses the derivative P' of a smooth primitive P (the
surrogate) evaluated at x = u - Vth, as SpikingJelly does:

    sigmoid:  P(x) = σ(αx),                           P'(x) = α σ(αx) (1 - σ(αx)),         α = 4
    atan:     P(x) = arctan((π/2) α x) / π + 1/2,      P'(x) = (α/2) / (1 + ((π/2) α x)²),  α = 2
    rect:     P(x) = clamp(x/α + 1/2, 0, 1),          P'(x) = (1/α) · 1{|x| < α/2},        α = 1

(α: the surrogate's sharpness; the right column is its default.) Reset by
subtraction keeps the gradient of its spike term, u[t] = λ (u[t-1] - Vth s[t-1]) + I[t];
`detach_reset` cuts it, as SpikingJelly's option of that name does.

One training forward gives exactly the values of IDE's: the same dropout masks,
power-iteration step and simulation (so the same output), and BN running
statistics moved once, by the same application of f with `update_stats` that
IDE differentiates. In the unrolled graph the input layer's BN statistics (the
batch statistics of its linear output on x̄) carry gradient, as BN's batch
statistics do in training; the loop layers normalise with their running
statistics, constants of the step.
"""
import functools
import math
from dataclasses import dataclass

import torch

from .precision import forward_precision

METHODS = ("ide", "bptt")


def sigmoid_primitive(x, alpha):
    """P(x) = σ(αx)."""
    return torch.sigmoid(alpha * x)


def sigmoid_derivative(x, alpha):
    """P'(x) = α σ(αx) (1 - σ(αx))."""
    sig = torch.sigmoid(alpha * x)
    return alpha * sig * (1.0 - sig)


def atan_primitive(x, alpha):
    """P(x) = arctan((π/2) α x) / π + 1/2."""
    return torch.atan((math.pi / 2) * alpha * x) / math.pi + 0.5


def atan_derivative(x, alpha):
    """P'(x) = (α/2) / (1 + ((π/2) α x)²)."""
    return (alpha / 2) / (1.0 + ((math.pi / 2) * alpha * x) ** 2)


def rect_primitive(x, alpha):
    """P(x) = clamp(x/α + 1/2, 0, 1), linear across the window |x| < α/2."""
    return torch.clamp(x / alpha + 0.5, 0.0, 1.0)


def rect_derivative(x, alpha):
    """P'(x) = (1/α) · 1{|x| < α/2}: a rectangle of unit area."""
    return (x.abs() < alpha / 2).to(x.dtype) / alpha


@dataclass(frozen=True)
class Surrogate:
    """A surrogate of the Heaviside step: its smooth primitive P, P' and the default sharpness α."""
    primitive: object
    derivative: object
    default_alpha: float


SURROGATES = {
    "sigmoid": Surrogate(sigmoid_primitive, sigmoid_derivative, 4.0),
    "atan": Surrogate(atan_primitive, atan_derivative, 2.0),
    "rect": Surrogate(rect_primitive, rect_derivative, 1.0),
}


class SurrogateSpike(torch.autograd.Function):
    """Forward: H(x) = 1{x ≥ 0} in x's dtype. Backward: grad · derivative(x, alpha)."""

    @staticmethod
    def forward(ctx, x, derivative, alpha):
        ctx.save_for_backward(x)
        ctx.derivative, ctx.alpha = derivative, alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * ctx.derivative(x, ctx.alpha), None, None


def _channel_view(t, like):
    """A per-channel vector (C,) shaped to broadcast over `like` (B, C, ...)."""
    return t.view(1, -1, *[1] * (like.dim() - 2))


class StatisticsGradient(torch.autograd.Function):
    """Identity on BN's output `out`, adding its gradient with respect to the statistics (mean, var).

    F.batch_norm given statistics does not differentiate them. With
    k = γ / sqrt(var + ε) per channel, BN(h) = (h - mean)·k + β gives

        ∂L/∂mean = -k Σ g,      ∂L/∂var = -k / (2 (var + ε)) Σ g (h - mean),

    sums over the batch and space, g = ∂L/∂BN(h). Only h (which BN keeps for
    its own backward anyway) and per-channel vectors are saved.
    """

    @staticmethod
    def forward(ctx, out, h, mean, var, weight, eps):
        ctx.save_for_backward(h, mean, var, weight)
        ctx.eps = eps
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        h, mean, var, weight = ctx.saved_tensors
        dims = [0] + list(range(2, h.dim()))
        g32 = g.to(mean.dtype)
        k = weight.to(mean.dtype) * torch.rsqrt(var + ctx.eps)
        centred = h.to(mean.dtype) - _channel_view(mean, h)
        grad_mean = -k * g32.sum(dims)
        grad_var = -k / (2 * (var + ctx.eps)) * (g32 * centred).sum(dims)
        return g, None, grad_mean, grad_var, None, None


def input_current(layer, x, stats):
    """The input layer's current on x, BN normalised with `stats` that keep their gradient.

    As `Connection.forward(x, stats=stats)` in value; stats None means no BN
    normalisation by given statistics (no BN, or evaluation).
    """
    h = layer.linear_part(x)
    if layer.bn is not None:
        if stats is None:
            h = layer.normalize(h)
        else:
            mean, var = stats
            out = layer.normalize(h, stats=(mean.detach(), var.detach()))
            h = StatisticsGradient.apply(out, h, mean, var, layer.bn.weight.detach(), layer.bn.eps)
    return layer.dropout(h)


def loop_constants(snn):
    """The loop layers' BN statistics for the unrolled simulation, as copies.

    Copies, because the running statistics are updated in place later in the
    same step while the graph still holds what the simulation normalised with.
    """
    return [None if stats is None else tuple(s.clone() for s in stats) for stats in snn.loop_stats()]


class BPTT:
    """Training by back-propagation through the T-step simulation (module docstring).

    `surrogate` names an entry of SURROGATES; `alpha` None takes its default;
    `detach_reset` cuts the gradient of the reset term Vth·s[t-1].
    """

    def __init__(self, surrogate="sigmoid", alpha=None, detach_reset=False):
        if surrogate not in SURROGATES:
            raise ValueError(f"unknown surrogate {surrogate!r}; choose one of {sorted(SURROGATES)}")
        self.surrogate = surrogate
        self.alpha = float(SURROGATES[surrogate].default_alpha if alpha is None else alpha)
        if not self.alpha > 0:
            raise ValueError(f"surrogate alpha must be > 0, got {alpha}")
        self.detach_reset = bool(detach_reset)

    def __repr__(self):
        return f"BPTT(surrogate={self.surrogate!r}, alpha={self.alpha}, detach_reset={self.detach_reset})"

    def spike(self, x):
        """s = H(x), x = u - Vth, with the surrogate's derivative in the backward pass."""
        return SurrogateSpike.apply(x, SURROGATES[self.surrogate].derivative, self.alpha)

    def unrolled_rate(self, snn, x):
        """The state rate of `snn.simulate(x)` in training, computed with autograd through all T steps."""
        in_stats = snn.input_stats(x)
        rate, _ = snn.unroll(x, lambda h: input_current(snn.input_layer, h, in_stats), loop_constants(snn),
                             functools.partial(self.step, snn))
        return rate

    def step(self, snn, u, s, current):
        """One time step of one layer, out of place, with the surrogate gradient: (new u, new s)."""
        reset = s.detach() if self.detach_reset else s
        # The simulation's in-place ops, out of place: the same values, bit for bit.
        u = self._leak(snn, torch.sub(u, reset, alpha=snn.vth)).add(current)
        return u, self.spike(u - snn.vth)

    @staticmethod
    def _leak(snn, h):
        """λ·h (h itself for IF)."""
        return h.mul(snn.leak) if snn.leak != 1.0 else h

    @staticmethod
    @torch.no_grad()
    def update_running_stats(snn, x, rate):
        """Move BN running statistics as IDE's training forward does: once, by F(x̄) and f(a)."""
        current = snn.input_layer(snn.average_input(x), update_stats=True)
        if snn.layers:
            snn.f(rate, current, update_stats=True)

    def __call__(self, snn, x):
        """The training forward of `snn` by BPTT: the state rate, differentiable through the simulation."""
        snn.begin_forward()
        with forward_precision():  # TF32 or not, as in IDE's simulation and f
            rate = self.unrolled_rate(snn, x)
            self.update_running_stats(snn, x, rate.detach())
        return rate


def gradient_method(method="ide", surrogate="sigmoid", surrogate_alpha=None, detach_reset=False):
    """None for IDE (the network's own implicit gradient), a BPTT for 'bptt'."""
    if method not in METHODS:
        raise ValueError(f"unknown training method {method!r}; choose one of {list(METHODS)}")
    bptt = BPTT(surrogate, surrogate_alpha, detach_reset)  # checked for IDE too: a typo fails either way
    return bptt if method == "bptt" else None
