"""Back-propagation through time (BPTT) with surrogate gradients: the baseline to IDE.

BPTT differentiates the T-step simulation of `FeedbackSNN.simulate` itself
(same IF/LIF dynamics, reset by subtraction, feedback, spike input). The
Heaviside spike s = H(u - Vth) has derivative zero almost everywhere, so its
backward pass uses the derivative P' of a smooth primitive P (the surrogate)
evaluated at x = u - Vth. Every surrogate and its parameter α are
SpikingJelly's (spikingjelly.activation_based.surrogate: Sigmoid, ATan, Rect),
α and its default included:

    sigmoid:  P(x) = σ(αx),                           P'(x) = α σ(αx) (1 - σ(αx)),         α = 4
    atan:     P(x) = arctan((π/2) α x) / π + 1/2,      P'(x) = (α/2) / (1 + ((π/2) α x)²),  α = 2
    rect:     P(x) = clamp(αx + 1/2, 0, 1),           P'(x) = α · 1{|x| < 1/(2α)},          α = 1

(α is the sharpness: the peak of P' grows with it, its width shrinks; rect is
a rectangle of height α, width 1/α, unit area). Reset by subtraction keeps the
gradient of its spike term, u[t] = λ (u[t-1] - Vth s[t-1]) + I[t];
`detach_reset` cuts it, as SpikingJelly's option of that name does.

Batch normalisation of the input layer is that of IDE in both modes below:
the batch statistics of its linear output on x̄ (constant over time for static
input), carrying their gradient as BN's batch statistics do in training. The
layers inside the feedback loop follow `bn`:

- 'batch' (the default, the usual choice for training an SNN by BPTT): each
  loop layer normalises, at every time step, with the batch statistics of the
  B inputs it sees at that step, and the gradient flows through them, as a
  BN layer run once per step does (SpikingJelly's single-step BatchNorm;
  Recurrent Batch Normalization, Cooijmans et al., ICLR 2017, normalises per
  time step too). Per step rather than over all T×B inputs (SpikingJelly's
  multi-step BatchNorm, which folds [T, B] into one batch): the feedback
  makes layer 1 at step t depend on the last layer at step t - 1, so the
  T×B statistics of a loop layer would need its inputs at later steps before
  they exist. The running statistics move once per training step, by the
  pooled statistics of all T×B inputs (equal-sized steps: the mean of the
  step means, and the mean of the step variances plus the variance of the
  step means), which is what evaluation then normalises with.
- 'running': the loop layers normalise with their running statistics, as
  IDE's simulation does, constants of the step; the running statistics move
  once, by the same application of f with `update_stats` that IDE
  differentiates. One training forward then gives exactly the values of
  IDE's (same dropout masks, power-iteration step, simulation and buffers),
  for a bit-exact comparison of the two gradients. From initialisation
  (running mean 0, variance 1) deep nets can be silent in this mode, so
  their classifier and feedback get no gradient at all.

Single-layer nets have no loop layer: both modes are the same there.
"""
import functools
import math
from dataclasses import dataclass

import torch

from .layers import batch_stats, sync_group
from .precision import forward_precision

METHODS = ("ide", "bptt")
BN_MODES = ("batch", "running")


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
    """P(x) = clamp(αx + 1/2, 0, 1), linear across the window |x| < 1/(2α)."""
    return torch.clamp(alpha * x + 0.5, 0.0, 1.0)


def rect_derivative(x, alpha):
    """P'(x) = α · 1{|x| < 1/(2α)}: a rectangle of height α and unit area."""
    return alpha * (x.abs() < 0.5 / alpha).to(x.dtype)


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
    """The loop layers' BN statistics for the unrolled simulation in 'running' mode, as copies.

    Copies, because the running statistics are updated in place later in the
    same step while the graph still holds what the simulation normalised with.
    """
    return [None if stats is None else tuple(s.clone() for s in stats) for stats in snn.loop_stats()]


class StepStatistics:
    """The loop layers' currents in 'batch' mode: BN by each step's batch statistics, which are kept.

    Calling it as (l, s) gives loop layer l's current on spikes s (B, ...), BN
    normalised with the batch statistics of its linear output at this step
    (with their gradient), and records them, detached, for `update_running`.
    """

    def __init__(self, layers):
        self.layers = layers
        self.moments = [[] for _ in layers]   # per layer: (mean, var, count) of every step

    def __call__(self, l, s):
        layer = self.layers[l]
        h = layer.linear_part(s)
        if layer.bn is None:
            return layer.dropout(h)
        group = sync_group(layer.bn)
        # Under autocast h is bf16; statistics in the parameters' dtype, as BN keeps them.
        mean, var = batch_stats(h.to(layer.bn.weight.dtype), group)
        # Values per channel behind the statistics (under --sync-bn every process holds an equal share).
        count = h.numel() // h.shape[1] * (1 if group is None else group.size())
        self.moments[l].append((mean.detach(), var.detach(), count))
        return layer.dropout(layer.normalize(h, stats=(mean, var)))

    @torch.no_grad()
    def update_running(self):
        """Move each loop BN's running statistics once, by the pooled statistics of all its T×B inputs."""
        for layer, moments in zip(self.layers, self.moments):
            if layer.bn is None or not moments:
                continue
            means = torch.stack([m for m, _, _ in moments])
            variances = torch.stack([v for _, v, _ in moments])
            count = sum(n for _, _, n in moments)
            mean = means.mean(0)
            # Steps of equal size: total variance = mean within-step variance + variance of the step means.
            var = variances.mean(0) + ((means - mean) ** 2).mean(0)
            update_running_stats(layer.bn, mean, var, count)


@torch.no_grad()
def update_running_stats(bn, mean, var, count):
    """BN's own update of its running statistics from batch statistics (mean, biased var) of `count` values.

    As torch.nn.BatchNorm does in training: the unbiased variance var·n/(n - 1),
    an exponential average with `momentum`, or the cumulative average when
    momentum is None.
    """
    if not bn.track_running_stats:
        return
    bn.num_batches_tracked.add_(1)
    factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    unbiased = var * (count / max(count - 1, 1))
    bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
    bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), factor)


class BPTT:
    """Training by back-propagation through the T-step simulation (module docstring).

    `surrogate` names an entry of SURROGATES; `alpha` None takes its default;
    `detach_reset` cuts the gradient of the reset term Vth·s[t-1]; `bn`
    ('batch' or 'running', see the module docstring) is how the loop layers
    normalise during training.
    """

    def __init__(self, surrogate="sigmoid", alpha=None, detach_reset=False, bn="batch"):
        if surrogate not in SURROGATES:
            raise ValueError(f"unknown surrogate {surrogate!r}; choose one of {sorted(SURROGATES)}")
        if bn not in BN_MODES:
            raise ValueError(f"unknown BPTT batch-norm mode {bn!r}; choose one of {list(BN_MODES)}")
        self.surrogate = surrogate
        self.alpha = float(SURROGATES[surrogate].default_alpha if alpha is None else alpha)
        if not self.alpha > 0:
            raise ValueError(f"surrogate alpha must be > 0, got {alpha}")
        self.detach_reset = bool(detach_reset)
        self.bn = bn

    def __repr__(self):
        return (f"BPTT(surrogate={self.surrogate!r}, alpha={self.alpha}, detach_reset={self.detach_reset}, "
                f"bn={self.bn!r})")

    def spike(self, x):
        """s = H(x), x = u - Vth, with the surrogate's derivative in the backward pass."""
        return SurrogateSpike.apply(x, SURROGATES[self.surrogate].derivative, self.alpha)

    def unrolled_rate(self, snn, x, all_rates=False):
        """The training simulation with autograd through all T steps: (state rate, per-layer firing rates
        or None, StepStatistics in 'batch' mode or None)."""
        in_stats = snn.input_stats(x)
        if self.bn == "batch":
            layer_current = StepStatistics(snn.layers)
        else:
            stats = loop_constants(snn)
            layer_current = lambda l, s: snn.layers[l](s, stats=stats[l])  # noqa: E731
        rate, rates = snn.unroll(x, lambda h: input_current(snn.input_layer, h, in_stats), layer_current,
                                 functools.partial(self.step, snn), all_rates)
        return rate, rates, layer_current if self.bn == "batch" else None

    @torch.no_grad()
    def layer_rates(self, snn, x):
        """Firing rate of every spiking layer in the training simulation BPTT differentiates, each (B, n_l).

        With this forward's dropout masks and statistics; no buffer moves.
        """
        with forward_precision():
            _, rates, _ = self.unrolled_rate(snn, x, all_rates=True)
        return [r.flatten(1) for r in rates]

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
    def update_running_stats(snn, x, rate, step_stats=None):
        """Move BN running statistics once: the input layer's by F(x̄); the loop layers' by f(a) as IDE's
        training forward does ('running'), or by the simulation's pooled step statistics ('batch')."""
        current = snn.input_layer(snn.average_input(x), update_stats=True)
        if step_stats is not None:
            step_stats.update_running()
        elif snn.layers:
            snn.f(rate, current, update_stats=True)

    def __call__(self, snn, x):
        """The training forward of `snn` by BPTT: the state rate, differentiable through the simulation."""
        snn.begin_forward()
        with forward_precision():  # TF32 or not, as in IDE's simulation and f
            rate, _, step_stats = self.unrolled_rate(snn, x)
            self.update_running_stats(snn, x, rate.detach(), step_stats)
        return rate


def gradient_method(method="ide", surrogate="sigmoid", surrogate_alpha=None, detach_reset=False, bptt_bn="batch"):
    """None for IDE (the network's own implicit gradient), a BPTT for 'bptt'."""
    if method not in METHODS:
        raise ValueError(f"unknown training method {method!r}; choose one of {list(METHODS)}")
    bptt = BPTT(surrogate, surrogate_alpha, detach_reset, bptt_bn)  # checked for IDE too: a typo fails either way
    return bptt if method == "bptt" else None
