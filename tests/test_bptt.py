"""BPTT with surrogate gradients, the baseline to IDE (modules/bptt.py).

  (a) its gradient equals that of an independent unrolled loop written here (BN by its
      formula, with the loop layers' running statistics or each step's batch statistics,
      the spike as H(x) + P(x) - P(x).detach() with P the surrogate's primitive),
      in float64 for every kind of tiny net, and differs from it when α or the reset path
      is changed;
  (b) each surrogate's derivative matches its formula and finite differences of its primitive;
  (c) with bn='running', a BPTT training step computes IDE's values bit for bit: output and
      buffers after the step;
  (d) build_model's options, evaluation, rates and gradients of every parameter.
"""
import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from modules import BPTT, SURROGATES, build_model, gradient_method
from modules.bptt import SurrogateSpike

pytestmark = pytest.mark.usefixtures("single_thread")

TIME_STEP = 8
LEAKS = {"IF": 1.0, "LIF": 0.9}
KINDS = [pytest.param(arch, leak, spike, id=f"{arch}-{leak}-{'spike' if spike else 'const'}")
         for arch, leak, spike in itertools.product(("fc", "conv", "multi"), LEAKS, (False, True))]

# The surrogates' primitives and derivatives as SpikingJelly defines them (spikingjelly.activation_based.
# surrogate: Sigmoid, ATan, Rect), written out independently of modules/bptt.py.
PRIMITIVES = {
    "sigmoid": lambda x, a: torch.sigmoid(a * x),
    "atan": lambda x, a: torch.atan(math.pi / 2 * a * x) / math.pi + 0.5,
    "rect": lambda x, a: torch.clamp(a * x + 0.5, 0.0, 1.0),
}
DERIVATIVES = {
    "sigmoid": lambda x, a: a / (4 * torch.cosh(a * x / 2) ** 2),
    "atan": lambda x, a: a / 2 / (1.0 + (math.pi / 2 * a * x) ** 2),
    "rect": lambda x, a: torch.where(x.abs() < 0.5 / a, a, 0.0).to(x.dtype),
}


# ----------------------------------------------------------------------- a naive reference
def naive_bn(h, mean, var, bn):
    """BN by its formula with the given per-channel statistics."""
    shape = (1, -1) + (1,) * (h.dim() - 2)
    return (h - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)


def with_mask(h, conn):
    """The connection's dropout mask of the last forward (none when dropout is off)."""
    return h if conn.dropout.mask is None else h * conn.dropout.mask


def naive_rate(snn, x, running, surrogate, alpha, detach_reset=False, loop_inputs=None):
    """The training-mode state rate by a plain unrolled loop with autograd.

    Call after a training forward of snn (its dropout masks and power-iteration
    vectors are reused); `running` are the loop layers' running statistics
    before that forward, or None for BN by each step's batch statistics (then
    `loop_inputs`, a list per loop layer, collects the linear outputs BN saw).
    """
    T, lam, vth = snn.time_step, snn.leak, snn.vth
    weights = [lam ** (T - 1 - t) for t in range(T)]
    weights = [w / sum(weights) for w in weights]
    conn_in = snn.input_layer

    def linear_in(frame):
        return conn_in.linear(frame.flatten(1) if conn_in.flatten else frame)

    x_bar = sum(w * x[..., t] for t, w in enumerate(weights)) if snn.spike_input else x
    h_bar = linear_in(x_bar)
    dims = [0] + list(range(2, h_bar.dim()))
    mean, var = h_bar.mean(dims), ((h_bar - h_bar.mean(dims, keepdim=True)) ** 2).mean(dims)
    n = len(snn.layers) + 1
    u, s = [0.0] * n, [0.0] * n
    rate = 0.0
    for t in range(T):
        frame = x[..., t] if snn.spike_input else x
        current = with_mask(naive_bn(linear_in(frame), mean, var, conn_in.bn), conn_in)
        if t > 0:
            current = current + with_mask(snn.feedback.linear(s[-1]), snn.feedback)
        for l in range(n):
            if l > 0:
                conn = snn.layers[l - 1]
                h = conn.linear(s[l - 1])
                if running is None:
                    h_dims = [0] + list(range(2, h.dim()))
                    stats = h.mean(h_dims), ((h - h.mean(h_dims, keepdim=True)) ** 2).mean(h_dims)
                    if loop_inputs is not None:
                        loop_inputs[l - 1].append(h.detach())
                else:
                    stats = running[l - 1]
                current = with_mask(naive_bn(h, *stats, conn.bn), conn)
            reset = s[l].detach() if detach_reset and torch.is_tensor(s[l]) else s[l]
            u[l] = lam * (u[l] - vth * reset) + current
            p = PRIMITIVES[surrogate](u[l] - vth, alpha)
            s[l] = (u[l] >= vth).to(x.dtype) + p - p.detach()
        rate = rate + weights[t] * s[-1]
    return rate


def loss_weights(shape, seed=5):
    """Fixed random weights w of the loss L = Σ w·rate."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def gradients(snn, x, rate, w):
    """Gradients of Σ w·rate with respect to every parameter and the input, flattened into one vector."""
    targets = list(snn.parameters()) + [x]
    grads = torch.autograd.grad((w * rate).sum(), targets, allow_unused=True)
    return torch.cat([torch.zeros_like(t).flatten() if g is None else g.flatten() for t, g in zip(targets, grads)])


def bptt_and_naive(tiny_snn, tiny_input, arch, leak, spike, surrogate="sigmoid", alpha=4.0, detach_reset=False,
                   dropout=0.0, bn="running"):
    """(BPTT gradient, its rate, the snn, x, w, running statistics before the step) of one training forward."""
    snn = tiny_snn(arch, leak=LEAKS[leak], spike=spike, time_step=TIME_STEP, dropout=dropout, gain=0.8).train()
    snn.bptt = BPTT(surrogate, alpha, detach_reset, bn)
    x = tiny_input(arch, 4 if arch == "fc" else 3, spike, TIME_STEP, seed=1, scale=2.0).requires_grad_()
    running = [(c.bn.running_mean.clone(), c.bn.running_var.clone()) for c in snn.layers]
    rate = snn(x)
    w = loss_weights(rate.shape)
    return gradients(snn, x, rate, w), rate.detach(), snn, x, w, running


@pytest.mark.parametrize("bn", ("running", "batch"))
@pytest.mark.parametrize("arch,leak,spike", KINDS)
def test_gradient_equals_naive_unrolled_loop(tiny_snn, tiny_input, arch, leak, spike, bn):
    """BPTT's gradient (every parameter and the input) equals the naive loop's to 1e-10 in float64."""
    dropout = 0.25 if leak == "LIF" else 0.0
    grad, rate, snn, x, w, running = bptt_and_naive(tiny_snn, tiny_input, arch, leak, spike, dropout=dropout, bn=bn)
    reference = naive_rate(snn, x, running if bn == "running" else None, "sigmoid", 4.0)
    torch.testing.assert_close(reference.detach(), rate, rtol=0, atol=1e-12)
    assert 0 < rate.mean() < 1, "the net must spike, or the check says little"
    ref_grad = gradients(snn, x, reference, w)
    assert ref_grad.norm() > 1e-3
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("surrogate", sorted(SURROGATES))
@pytest.mark.parametrize("detach_reset", (False, True))
def test_every_surrogate_and_reset_option(tiny_snn, tiny_input, surrogate, detach_reset):
    """Each surrogate, with and without the reset's gradient, on the multi-layer LIF net."""
    alpha = {"sigmoid": 4.0, "atan": 2.0, "rect": 1.5}[surrogate]
    grad, _, snn, x, w, running = bptt_and_naive(tiny_snn, tiny_input, "multi", "LIF", False, surrogate, alpha,
                                                 detach_reset)
    ref_grad = gradients(snn, x, naive_rate(snn, x, running, surrogate, alpha, detach_reset), w)
    assert ref_grad.norm() > 1e-3
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("arch", ("conv", "multi"))
def test_check_fails_for_a_wrong_alpha_or_reset_path(tiny_snn, tiny_input, arch):
    """The comparison can fail: a 5% different α, or a reference without the reset path, is far off."""
    grad, _, snn, x, w, running = bptt_and_naive(tiny_snn, tiny_input, arch, "LIF", False)
    other_alpha = gradients(snn, x, naive_rate(snn, x, running, "sigmoid", 4.2), w)
    no_reset = gradients(snn, x, naive_rate(snn, x, running, "sigmoid", 4.0, detach_reset=True), w)
    assert (grad - other_alpha).abs().max() > 1e-4
    assert (grad - no_reset).abs().max() > 1e-4


# ----------------------------------------------------------------------------- surrogates
@pytest.mark.parametrize("name", sorted(SURROGATES))
@pytest.mark.parametrize("alpha", (0.5, 1.0, 2.0, 4.0))
def test_surrogate_derivative_matches_formula_and_primitive(name, alpha):
    """P' equals SpikingJelly's formula and central differences of P; P is the formula and goes from 0 to 1;
    the peak P'(0) is SpikingJelly's (sigmoid α/4, atan α/2, rect α: the height, not the width)."""
    surrogate = SURROGATES[name]
    x = torch.linspace(-3, 3, 601, dtype=torch.float64)
    if name == "rect":  # P is not differentiable at the window's edges
        x = x[((x.abs() - 0.5 / alpha).abs() > 1e-3)]
    peak = {"sigmoid": alpha / 4, "atan": alpha / 2, "rect": alpha}[name]
    assert surrogate.derivative(torch.zeros(1, dtype=torch.float64), alpha).item() == pytest.approx(peak, rel=1e-15)
    torch.testing.assert_close(surrogate.primitive(x, alpha), PRIMITIVES[name](x, alpha), rtol=0, atol=1e-14)
    torch.testing.assert_close(surrogate.derivative(x, alpha), DERIVATIVES[name](x, alpha), rtol=0, atol=1e-14)
    h = 1e-6
    fd = (surrogate.primitive(x + h, alpha) - surrogate.primitive(x - h, alpha)) / (2 * h)
    torch.testing.assert_close(surrogate.derivative(x, alpha), fd, rtol=0, atol=1e-8)
    far = torch.tensor([-1e3, 1e3], dtype=torch.float64)
    torch.testing.assert_close(surrogate.primitive(far, alpha), torch.tensor([0.0, 1.0], dtype=torch.float64),
                               rtol=0, atol=1e-3)


def test_surrogate_defaults_are_spikingjelly_s():
    """Sigmoid α = 4 and ATan α = 2 as in SpikingJelly; `alpha=None` takes the default."""
    assert SURROGATES["sigmoid"].default_alpha == 4.0 and SURROGATES["atan"].default_alpha == 2.0
    assert BPTT("atan").alpha == 2.0 and BPTT("rect", 3).alpha == 3.0


@pytest.mark.parametrize("name", sorted(SURROGATES))
def test_spike_function_forward_is_heaviside_backward_is_derivative(name):
    """Forward 1{x ≥ 0} (1 at x = 0); backward grad · P'(x)."""
    x = torch.tensor([-1.0, -1e-9, 0.0, 1e-9, 0.3], dtype=torch.float64, requires_grad=True)
    s = SurrogateSpike.apply(x, SURROGATES[name].derivative, 2.0)
    assert s.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    g = torch.arange(1.0, 6.0, dtype=torch.float64)
    (gx,) = torch.autograd.grad(s, x, g)
    torch.testing.assert_close(gx, g * DERIVATIVES[name](x.detach(), 2.0), rtol=0, atol=1e-15)


# ---------------------------------------------------------------- the same values as IDE
def twin_models(name, time_step, dropout=0.2, leaky=0.95, **bptt_options):
    """An IDE model and a BPTT copy of it with identical weights and buffers."""
    torch.manual_seed(0)
    ide = build_model(name, time_step=time_step, leaky=leaky, dropout=dropout, threshold=3).train()
    bptt = build_model(name, time_step=time_step, leaky=leaky, dropout=dropout, threshold=3, method="bptt",
                       **bptt_options).train()
    bptt.load_state_dict(ide.state_dict())
    return ide, bptt


def paper_input(model, batch, time_step, seed=1):
    """A random input at the net's input size (spike frames with the time axis last for spike input)."""
    gen = torch.Generator().manual_seed(seed)
    shape = model.arch.input_shape
    if model.arch.spike_input:
        return (torch.rand(batch, *shape, time_step, generator=gen) < 0.3).float()
    return torch.randn(batch, *shape, generator=gen)


def training_step(model, x, target, amp=False, seed=3):
    """Forward and backward of a training step (dropout masks from `seed`); returns the logits."""
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = model(x)
        loss = F.cross_entropy(out, target)
    loss.backward()
    return out.detach()


@pytest.mark.parametrize("name,amp", [("mnist_conv", False), ("fashion_mlp", False), ("nmnist_conv", False),
                                      ("alexnetf", False), ("alexnetf", True), ("mnist_conv", True)])
def test_training_step_values_equal_ide_bit_for_bit(name, amp):
    """With bn='running': output and every buffer after the step (BN running statistics, power iteration)
    are IDE's exactly."""
    time_step = 3
    ide, bptt = twin_models(name, time_step, bptt_bn="running")
    x, target = paper_input(ide, 2, time_step), torch.tensor([3, 7])
    out_ide, out_bptt = training_step(ide, x, target, amp), training_step(bptt, x, target, amp)
    assert torch.equal(out_ide, out_bptt)
    for (key, a), b in zip(ide.state_dict().items(), bptt.state_dict().values()):
        assert torch.equal(a, b), key
    moved = [k for k, v in ide.state_dict().items() if k.endswith("running_mean")]
    assert moved and not torch.equal(ide.state_dict()[moved[0]], torch.zeros_like(ide.state_dict()[moved[0]]))


def test_bptt_gradient_differs_from_ide_s():
    """The two methods share values, not gradients (a guard that the BPTT path really runs)."""
    ide, bptt = twin_models("mnist_conv", 4, dropout=0.0)
    x, target = paper_input(ide, 2, 4), torch.tensor([3, 7])
    training_step(ide, x, target), training_step(bptt, x, target)
    g_ide = torch.cat([p.grad.flatten() for p in ide.snn.parameters()])
    g_bptt = torch.cat([p.grad.flatten() for p in bptt.snn.parameters()])
    assert not torch.allclose(g_ide, g_bptt)
    assert bptt.solver_stats is None


# ------------------------------------------------------------------------- build_model
def test_build_model_options_and_errors():
    """method/surrogate/surrogate_alpha/detach_reset reach the net; bad values fail with one message."""
    model = build_model("fashion_mlp", time_step=2, method="bptt", surrogate="atan", surrogate_alpha=3.0,
                        detach_reset=True)
    assert repr(model.snn.bptt) == "BPTT(surrogate='atan', alpha=3.0, detach_reset=True, bn='batch')"
    assert build_model("fashion_mlp", time_step=2, method="bptt", bptt_bn="running").snn.bptt.bn == "running"
    assert build_model("fashion_mlp", time_step=2).snn.bptt is None
    with pytest.raises(ValueError, match="unknown training method 'tbptt'"):
        build_model("fashion_mlp", method="tbptt")
    with pytest.raises(ValueError, match="unknown surrogate 'relu'"):
        gradient_method("bptt", surrogate="relu")
    with pytest.raises(ValueError, match="alpha must be > 0"):
        gradient_method("bptt", surrogate_alpha=0.0)
    with pytest.raises(ValueError, match="unknown BPTT batch-norm mode 'mean'"):
        gradient_method("bptt", bptt_bn="mean")


def test_checkpoint_arguments_rebuild_the_same_model():
    """A state_dict carries nothing new, and build_model(**model_args) gives the same BPTT net."""
    args = dict(num_classes=10, time_step=2, leaky=0.95, method="bptt", surrogate="rect", surrogate_alpha=None,
                detach_reset=True, bptt_bn="running")
    model = build_model("mnist_conv", **args)
    assert set(model.state_dict()) == set(build_model("mnist_conv", time_step=2).state_dict())
    rebuilt = build_model("mnist_conv", **copy.deepcopy(args))
    rebuilt.load_state_dict(model.state_dict())
    assert repr(rebuilt.snn.bptt) == repr(model.snn.bptt) == ("BPTT(surrogate='rect', alpha=1.0, "
                                                            "detach_reset=True, bn='running')")


def test_evaluation_and_rates_are_ide_s():
    """Evaluation and get_all_rate are the same simulation for both methods (and move no buffer)."""
    ide, bptt = twin_models("alexnetf", 3)
    ide.eval(), bptt.eval()
    x = paper_input(ide, 2, 3)
    before = copy.deepcopy(bptt.state_dict())
    assert torch.equal(ide(x), bptt(x))
    for a, b in zip(ide.get_all_rate(x), bptt.get_all_rate(x)):
        assert torch.equal(a, b)
    assert all(torch.equal(before[k], v) for k, v in bptt.state_dict().items())


@pytest.mark.parametrize("name", ("nmnist_conv", "alexnetf"))
def test_every_parameter_gets_a_gradient(name):
    """As DistributedDataParallel requires: every parameter of the BPTT net gets a finite gradient.

    (A layer whose input layer never spiked in the step gets an exact zero weight gradient.)
    """
    _, bptt = twin_models(name, 3)
    training_step(bptt, paper_input(bptt, 2, 3), torch.tensor([1, 2]))
    for key, p in bptt.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), key
    assert sum(bool(p.grad.abs().sum() > 0) for p in bptt.parameters()) > len(list(bptt.parameters())) // 2
