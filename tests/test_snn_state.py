"""What a training forward, an evaluation forward and a training step do to the model's state
(docs/method.md: the BN rules): values, BN statistics, power iteration, dropout masks, inputs, dtypes, errors."""
import copy

import pytest
import torch
import torch.nn.functional as F

from modules import build_model
from modules.layers import VariationalDropout

pytestmark = pytest.mark.usefixtures("single_thread")


def snapshot(module):
    """A deep copy of every entry of the state dict (parameters and buffers)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(before, after):
    """Identical keys and bit-identical values."""
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


@pytest.mark.parametrize("arch", ["fc", "conv", "multi"])
@pytest.mark.parametrize("spike", [False, True])
def test_training_forward_value_is_the_simulated_rate(tiny_snn, tiny_input, arch, spike):
    """In training the forward's value is exactly the simulated rate (with the forward's power
    iteration step and the same dropout masks), not f(a): the two differ on these nets."""
    snn = tiny_snn(arch, leak=0.9, spike=spike, dropout=0.2)
    x = tiny_input(arch, 3, spike, snn.time_step)
    twin = copy.deepcopy(snn)
    torch.manual_seed(7)
    out = snn(x)
    torch.manual_seed(7)          # the twin draws the same masks in the same order
    twin.begin_forward()
    rate, _ = twin.simulate(x)
    assert torch.equal(out.detach(), rate)
    current = snn.input_layer(snn.average_input(x))
    assert not torch.allclose(out.detach(), snn.f(out.detach(), current))


def dropout_modules(snn):
    """Every VariationalDropout of the net (input, loop and feedback layers)."""
    return [m for m in snn.modules() if isinstance(m, VariationalDropout)]


# input layer, loop layers, feedback: each mask has its layer's output shape (batch of 3)
MASK_SHAPES = {"fc": [(3, 5), (3, 5)], "multi": [(3, 2, 4, 4), (3, 3, 2, 2), (3, 3, 2, 2), (3, 2, 4, 4)]}


@pytest.mark.parametrize("arch", ["fc", "multi"])
def test_dropout_masks_are_drawn_once_per_forward_and_shared(tiny_snn, tiny_input, arch):
    """Variational dropout: one mask per sample and neuron (the whole activation shape), values
    0 or 1/(1-p), drawn once per training forward and shared by every time step and by f: the
    masks left after the forward reproduce its value when the simulation is re-run with them,
    and f/backward draw no new ones. The next training forward draws fresh masks."""
    p = 0.4
    snn = tiny_snn(arch, leak=0.9, dropout=p)
    x = tiny_input(arch, 3)
    bns = [c.bn for c in bn_connections(snn)]
    stats_before = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
    out = snn(x)
    dropouts = dropout_modules(snn)
    masks = [m.mask.clone() for m in dropouts]
    assert [tuple(m.shape) for m in masks] == MASK_SHAPES[arch]
    for mask in masks:
        values = mask.unique()
        assert len(values) == 2 and values[0] == 0 and values[1] == pytest.approx(1 / (1 - p), rel=1e-6)
        assert not torch.equal(mask[0], mask[1])     # per sample
    out.sum().backward()
    with torch.no_grad():          # the simulation ran before f moved the running statistics
        for bn, (mean, var) in zip(bns, stats_before):
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
    again, _ = snn.simulate(x)     # no reset: the forward's masks
    assert torch.equal(again, out.detach())
    for m, mask in zip(dropouts, masks):
        assert torch.equal(m.mask, mask)
    snn(x)
    assert not any(torch.equal(m.mask, mask) for m, mask in zip(dropouts, masks))


def test_dropout_scale_is_exact_in_the_activation_dtype():
    """The kept units are scaled by exactly 1/(1-p) in the activation's dtype (float64 here),
    not by 1/(1-p) rounded to float32."""
    dropout = VariationalDropout(0.4).train()
    out = dropout(torch.ones(4, 50, dtype=torch.float64))
    assert out.dtype == torch.float64
    assert set(out.unique().tolist()) == {0.0, 1 / (1 - 0.4)}


def test_evaluation_is_deterministic_and_changes_no_state(tiny_snn, tiny_input):
    """Two evaluation forwards give identical outputs and leave every parameter and buffer
    (BN running statistics, num_batches_tracked, the power-iteration vectors u, v) untouched."""
    snn = tiny_snn("multi", leak=0.9, dropout=0.3)
    x = tiny_input("multi", 3)
    snn.train()
    snn(x).sum().backward()       # a realistic state: moved statistics, stored masks
    snn.eval()
    before = snapshot(snn)
    first, second = snn(x), snn(x)
    with torch.no_grad():
        third = snn(x)
    assert torch.equal(first, second) and torch.equal(first, third)
    assert not first.requires_grad
    assert_same_state(before, snapshot(snn))


def test_model_evaluation_changes_no_state():
    """The same at model level (SNNClassifier): logits and get_all_rate in evaluation."""
    torch.manual_seed(0)
    model = build_model("fashion_mlp", time_step=4, leaky=0.95, dropout=0.2).eval()
    x = torch.randn(2, 1, 28, 28)
    before = snapshot(model)
    assert torch.equal(model(x), model(x))
    model.get_all_rate(x)
    assert_same_state(before, snapshot(model))


def bn_connections(snn):
    """Every Connection with BN, in input-flow order."""
    return [c for c in [snn.input_layer, *snn.layers] if c.bn is not None]


def expected_running_stats(snn, x, rate, before):
    """Running statistics after one step, by hand: momentum 0.1 towards the batch statistics of
    each BN's input inside f at the forward's rate (unbiased variance, as BatchNorm stores)."""
    inputs = [snn.input_layer.linear_part(snn.average_input(x))]
    h = torch.clamp((snn.feedback(rate) + snn.input_layer(snn.average_input(x))) / snn.vth, 0, 1)
    for layer in snn.layers:
        inputs.append(layer.linear_part(h))
        h = torch.clamp(layer(h) / snn.vth, 0, 1)
    expected = []
    for (mean, var, count), h in zip(before, inputs):
        dims = [0] + list(range(2, h.dim()))
        m = 0.1
        expected.append(((1 - m) * mean + m * h.mean(dim=dims),
                         (1 - m) * var + m * h.var(dim=dims, unbiased=True), count + 1))
    return expected


@pytest.mark.parametrize("arch, spike", [("fc", False), ("conv", True), ("multi", False), ("multi", True)])
def test_training_step_updates_bn_statistics_once(tiny_snn, tiny_input, arch, spike):
    """One training step (forward + backward) moves every BN's running statistics exactly once:
    num_batches_tracked + 1, and mean/var equal the momentum update from the batch statistics
    that f uses (input BN on x̄; loop BNs on f's rates at the simulated state). The backward
    pass (the adjoint solve) changes none of them."""
    snn = tiny_snn(arch, leak=0.9, spike=spike, dropout=0.2)
    x = tiny_input(arch, 3, spike, snn.time_step)
    conns = bn_connections(snn)
    before = [(c.bn.running_mean.clone(), c.bn.running_var.clone(), int(c.bn.num_batches_tracked))
              for c in conns]
    out = snn(x)
    after_forward = snapshot(snn)
    with torch.no_grad():  # masks and power-iteration state are those of the forward
        expected = expected_running_stats(snn, x, out.detach(), before)
    for conn, (mean, var, count) in zip(conns, expected):
        assert int(conn.bn.num_batches_tracked) == count
        assert torch.allclose(conn.bn.running_mean, mean, rtol=0, atol=1e-13)
        assert torch.allclose(conn.bn.running_var, var, rtol=0, atol=1e-13)
    out.sum().backward()
    assert_same_state(after_forward, snapshot(snn))


def test_model_backward_is_repeatable():
    """At model level, two identical backward passes of a cross-entropy loss give bit-identical
    gradients for every parameter."""
    torch.manual_seed(0)
    model = build_model("mnist_conv", time_step=6, leaky=0.95, dropout=0.2).train()
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([3, 7])
    loss = F.cross_entropy(model(x), y)
    grads = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def spectral_norm(weight):
    """Exact spectral norm of a weight reshaped to (dim 0, rest)."""
    return float(torch.linalg.matrix_norm(weight.detach().flatten(1), 2))


@pytest.mark.parametrize("arch", ["conv", "multi"])
def test_feedback_spectral_norm_stays_bounded(tiny_snn, tiny_input, arch):
    """SGD steps that reward a large feedback weight push the scale g above 1, yet the effective
    feedback weight keeps spectral norm ≤ 1: by the power-iteration estimate after a few
    forwards, and by the exact SVD (≤ 1 + 1e-3)."""
    snn = tiny_snn(arch, gain=0.5)
    x = tiny_input(arch, 3)
    feedback = snn.feedback
    spectral = feedback.spectral
    optimizer = torch.optim.SGD(snn.parameters(), lr=2.0)
    for _ in range(5):
        optimizer.zero_grad()
        out = snn(x)
        reward = feedback.linear.weight.abs().sum()   # larger feedback weight, lower loss
        (out.sum() - reward).backward()
        optimizer.step()
    with torch.no_grad():
        assert float(spectral.g) > 1.0
        for _ in range(30):       # training forwards re-converge the power iteration
            snn(x)
        V = feedback.linear.parametrizations.weight.original
        estimate = float(spectral.u @ (V.flatten(1) @ spectral.v))
        W = feedback.linear.weight
    assert estimate == pytest.approx(spectral_norm(V), rel=1e-3)
    assert spectral_norm(W) <= 1 + 1e-3
    assert spectral_norm(W) >= 1 - 1e-3    # g is clamped to 1, not to a smaller value


@pytest.mark.parametrize("leak", [1.0, 0.9])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_spike_input_is_not_modified(tiny_snn, tiny_input, leak, mode):
    """A forward (and backward) on spike input leaves the input tensor unchanged, for IF and LIF,
    in training and evaluation (the release averaged LIF input in place)."""
    snn = tiny_snn("conv", leak=leak, spike=True)
    getattr(snn, mode)()
    x = tiny_input("conv", 3, spike=True, time_step=snn.time_step)
    original = x.clone()
    out = snn(x)
    if mode == "train":
        out.sum().backward()
    snn.simulate(x, all_rates=True)
    snn.average_input(x)
    assert torch.equal(x, original)


def test_model_spike_input_is_not_modified():
    """The same for the N-MNIST net at model level, LIF, training and evaluation."""
    torch.manual_seed(0)
    model = build_model("nmnist_conv", time_step=5, leaky=0.95)
    x = (torch.rand(2, 2, 34, 34, 5) < 0.2).float()
    original = x.clone()
    model(x).sum().backward()
    model.eval()
    model(x)
    model.get_all_rate(x)
    assert torch.equal(x, original)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("arch", ["fc", "multi"])
def test_float32_and_float64(tiny_snn, tiny_input, arch, dtype):
    """Forward, backward (both solvers) and evaluation run in float32 and float64: outputs and
    gradients have the model's dtype and are finite, and the solve converges."""
    for solver in ("broyden", "iter"):
        snn = tiny_snn(arch, leak=0.9, dropout=0.2, solver=solver, dtype=dtype)
        x = tiny_input(arch, 3, dtype=dtype).requires_grad_()
        out = snn(x)
        assert out.dtype == dtype
        out.square().sum().backward()
        for name, p in [*snn.named_parameters(), ("input", x)]:
            assert p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all(), name
        assert snn.solver_stats["rel_residual"] < 1e-3
        snn.eval()
        assert snn(x).dtype == dtype


def test_model_runs_in_float64():
    """A paper net converted with .double() trains and evaluates in float64."""
    torch.manual_seed(0)
    model = build_model("fashion_mlp", time_step=4).double()
    x = torch.randn(2, 784, dtype=torch.float64)
    loss = F.cross_entropy(model(x), torch.tensor([1, 2]))
    loss.backward()
    assert all(p.grad.dtype == torch.float64 for p in model.parameters())
    model.eval()
    assert model(x).dtype == torch.float64


@pytest.mark.parametrize("name, shape, expected", [
    ("mnist_conv", (2, 1, 32, 32), "(B, 1, 28, 28)"),
    ("mnist_conv", (2, 28, 28), "(B, 1, 28, 28)"),
    ("fashion_mlp", (2, 100), "(B, 1, 28, 28)"),
    ("nmnist_conv", (2, 2, 34, 34), "(B, 2, 34, 34, T)"),
    ("nmnist_conv", (2, 2, 28, 28, 4), "(B, 2, 34, 34, T)"),
])
def test_wrong_input_shape_raises(name, shape, expected):
    """An input of the wrong shape raises ValueError naming the expected shape, in training and
    evaluation, for logits and for get_all_rate."""
    model = build_model(name, time_step=2)
    x = torch.zeros(shape)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            model(x)
        with pytest.raises(ValueError, match=r"\(B, "):
            model.get_all_rate(x)


def test_too_few_spike_frames_raise(tiny_snn, tiny_input):
    """Spike input with fewer frames than time steps raises ValueError naming both numbers."""
    snn = tiny_snn("conv", spike=True, time_step=10)
    x = tiny_input("conv", 2, spike=True, time_step=6)
    with pytest.raises(ValueError, match="6 frames.*10 time steps"):
        snn(x)
