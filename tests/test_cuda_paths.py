"""The paths a GPU run takes, reproduced on the CPU: --sync-bn (SyncBatchNorm in a process group),
--amp (bf16 autocast and its weight cache), TF32 around the simulation and the adjoint solve, and
the power iteration under autocast."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from modules import build_model, precision
from modules.layers import SpectralScale, sync_group
from tests.test_paper_nets import PAPER_NETS, calibrate_bn, paper_input

pytestmark = pytest.mark.usefixtures("single_thread")

# One row per net (10 classes): name, time steps, leak, input shape.
NETS = [pytest.param(row[0], row[3], row[5], id=row[0]) for row in PAPER_NETS if row[1] == 10]
TIME_STEP = 3
THRESHOLD = 6
G_NAME = "snn.feedback.linear.parametrizations.weight.0.g"


def tf32_enabled():
    """True where matrix products and cuDNN convolutions may both run in TF32 right now."""
    return all(flag in (True, "tf32") for flag in precision.tf32_flags()[:2])


def paper_net(name, leak, dtype=torch.float32, seed=0):
    """A paper net at T = TIME_STEP in training mode, its feedback scale g inside the clamp (so it has a gradient)."""
    torch.manual_seed(seed)
    model = build_model(name, time_step=TIME_STEP, leaky=leak, threshold=THRESHOLD).to(dtype).train()
    with torch.no_grad():
        model.snn.feedback.spectral.g.fill_(0.9)
    return model


def net_input(name, shape, dtype=torch.float32):
    """paper_input's batch of 2 in dtype (spike frames for N-MNIST)."""
    return paper_input(name, shape, TIME_STEP).to(dtype)


def cancelled_by_bn(model):
    """Biases of the linear ops followed by BN: BN removes them, so their gradient is zero up to rounding."""
    return {n for n, _ in model.named_parameters() if n.endswith("linear.bias") and not n.startswith("classifier")}


def training_step_gradients(model, x, amp=False):
    """{name: gradient} of one cross-entropy training step (bf16 autocast around the forward when amp)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = F.cross_entropy(model(x), torch.arange(x.shape[0]) % 10)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def assert_every_parameter_learns(model, grads):
    """Every parameter has a finite gradient, non-zero except the biases that BN cancels."""
    zero_ok = cancelled_by_bn(model)
    for name, grad in grads.items():
        assert grad is not None, f"{name} got no gradient"
        assert torch.isfinite(grad).all(), f"{name}: non-finite gradient"
        assert name in zero_ok or grad.abs().max() > 0, f"{name}: zero gradient"


# ------------------------------------------------------------------------------- --sync-bn
@pytest.fixture
def gloo_group_of_one(tmp_path, monkeypatch):
    """A one-process Gloo group, with SyncBatchNorm's refusal of CPU tensors lifted.

    SyncBatchNorm checks the device before it sees that a group of one needs no
    synchronisation; everything after that check (and the model's own synced
    statistics, `layers.batch_stats` with a group) runs as on GPUs.
    """
    real_forward = nn.SyncBatchNorm.forward

    def forward_on_any_device(self, input):
        # The check accepts the device named by the private-use backend hook: name the input's own device.
        with monkeypatch.context() as patch:
            patch.setattr(torch._C, "_get_privateuse1_backend_name", lambda: input.device.type)
            return real_forward(self, input)

    monkeypatch.setattr(nn.SyncBatchNorm, "forward", forward_on_any_device)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("name, leak, shape", NETS)
def test_sync_bn_training_step_matches_plain_bn(gloo_group_of_one, name, leak, shape):
    """Every paper net converted to SyncBatchNorm as utils.training.distributed.wrap does under --sync-bn takes a
    training step in a process group (DDP itself refuses CPU modules with SyncBatchNorm), and with one process its gradients equal plain BN's: the synced
    statistics at a multi-layer net's Jacobian point carry their gradient (F.batch_norm refuses such
    statistics, which crashed AlexNet-F and CIFARNet-F on the first step)."""
    plain = paper_net(name, leak)
    x = net_input(name, shape)
    if plain.snn.layers:
        calibrate_bn(plain, x)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    bns = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(sync_group(bn) is not None for bn in bns)
    torch.manual_seed(1)
    expected = training_step_gradients(plain, x)
    torch.manual_seed(1)
    got = training_step_gradients(synced, x)
    assert_every_parameter_learns(synced, got)
    for key, grad in got.items():
        torch.testing.assert_close(grad, expected[key], rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")
    assert synced.solver_stats["nstep"] == plain.solver_stats["nstep"]


# ------------------------------------------------------------------------------- --amp
@pytest.mark.parametrize("name, leak, shape", NETS)
def test_every_parameter_learns_under_bf16_autocast(name, leak, shape):
    """A training step under bf16 autocast (--amp) gives every parameter of every paper net a finite,
    non-zero gradient (PyTorch before the fix of pytorch#112583 handed f the weight copies cached by the
    simulation without autograd, leaving the input-layer and loop weights without one)."""
    model = paper_net(name, leak)
    x = net_input(name, shape)
    if model.snn.layers:
        calibrate_bn(model, x)
    assert_every_parameter_learns(model, training_step_gradients(model, x, amp=True))
    assert model.solver_stats["nstep"] >= 1


def test_simulation_leaves_no_autocast_weight_copies(tiny_snn, tiny_input):
    """After a simulation under autocast, an operator sees its weight's current value: autocast's cache,
    keyed by the weight tensor, holds no bf16 copy made during the simulation (an in-place change of the
    weight, which the cache cannot notice, shows a stale copy)."""
    snn = tiny_snn("multi", dtype=torch.float32).train()
    x = tiny_input("multi", 3, dtype=torch.float32)
    layer = snn.layers[0]
    h = torch.rand(3, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        snn.simulate(x)
        with torch.no_grad():
            layer.linear.weight.mul_(-2.0)
        after = layer.linear(h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = layer.linear(h)
    assert torch.equal(after, fresh)


# ------------------------------------------------------------------------------- TF32
@pytest.fixture
def restore_precision():
    """Put the TF32 flags and the model's TF32 policy back after the test."""
    flags, allowed = precision.tf32_flags(), precision.tf32_allowed()
    yield
    precision.allow_tf32(allowed)
    precision.set_tf32_flags(flags)


def record_tf32(snn):
    """Record TF32 state on every use of the feedback operator: [(phase, TF32 on)], phase 'forward' for its
    applications (simulation and f), 'backward' for each product through it in f's graph."""
    log = []

    def on_forward(module, inputs, output):
        log.append(("forward", tf32_enabled()))
        if output.requires_grad:
            output.register_hook(lambda grad: log.append(("backward", tf32_enabled())))

    snn.feedback.register_forward_hook(on_forward)
    return log


@pytest.mark.parametrize("arch", ["conv", "multi"])
@pytest.mark.parametrize("allowed", [False, True])
def test_tf32_policy(tiny_snn, tiny_input, restore_precision, arch, allowed):
    """With TF32 on in PyTorch's flags (cuDNN's default on recent GPUs), the simulation and f run with TF32
    exactly when allow_tf32(True) allowed it, every vector–Jacobian product of the adjoint solve runs with
    TF32 off whatever the policy, and after the step the flags are as before. Single-layer nets take J at
    the state (through z's own graph), multi-layer nets at f(a) (a graph of its own)."""
    snn = tiny_snn(arch, dtype=torch.float32, threshold=8)
    x = tiny_input(arch, 3, dtype=torch.float32)
    precision.allow_tf32(allowed)
    log = record_tf32(snn)
    with precision.tf32(True):
        before = precision.tf32_flags()
        out = snn(x)
        forward = [on for phase, on in log if phase == "forward"]
        assert len(forward) >= snn.time_step and all(on == allowed for on in forward)
        assert precision.tf32_flags() == before
        out.square().sum().backward()
        assert precision.tf32_flags() == before
    # The last product through the feedback is the parameter gradient's (z's graph), under the flags.
    *solve, parameters = [on for phase, on in log if phase == "backward"]
    assert len(solve) >= 2 and not any(solve)
    assert parameters


def test_allow_tf32_sets_the_flags(restore_precision):
    """allow_tf32 sets PyTorch's flags for matmul and cuDNN and the policy; tf32(...) restores them on exit."""
    precision.allow_tf32(True)
    assert precision.tf32_allowed() and tf32_enabled()
    with precision.tf32(False):
        assert not tf32_enabled()
    assert tf32_enabled()
    precision.allow_tf32(False)
    assert not precision.tf32_allowed() and not tf32_enabled()


# ------------------------------------------------------------------------------- power iteration
def test_power_iteration_runs_in_float32_under_autocast():
    """Under bf16 autocast the power-iteration vectors stay float32 and equal the float32 step's."""
    torch.manual_seed(0)
    V = torch.randn(40, 24)
    scale = SpectralScale(V)
    with torch.no_grad():
        scale.u.copy_(torch.randn(40))
        scale.v.copy_(torch.randn(24))
    twin = copy.deepcopy(scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scale.power_iteration(V)
    twin.power_iteration(V)
    assert scale.u.dtype == scale.v.dtype == torch.float32
    assert torch.equal(scale.u, twin.u) and torch.equal(scale.v, twin.v)
