"""The paper's five nets (and the CIFAR-100 heads) at their paper sizes: one training step on
the CPU, and the per-layer firing rates."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modules import build_model
from tools.smoke import calibrate_bn

pytestmark = pytest.mark.usefixtures("single_thread")

ALEXNETF_WIDTHS = [96 * 16 * 16, 256 * 16 * 16, 384 * 8 * 8, 384 * 8 * 8, 256 * 8 * 8]
CIFARNETF_WIDTHS = [128 * 16 * 16, 256 * 16 * 16, 512 * 8 * 8, 1024 * 8 * 8, 512 * 8 * 8]
# (net, classes, time steps, leak, solver, input shape, spiking-layer widths n_l): the paper's
# leak and solver (modules/settings.py); T = 30 for mnist_conv, 4 elsewhere to stay quick.
PAPER_NETS = [
    ("mnist_conv", 10, 30, 0.95, "broyden", (1, 28, 28), [64 * 14 * 14]),
    ("fashion_mlp", 10, 4, 0.95, "broyden", (1, 28, 28), [400]),
    ("nmnist_conv", 10, 4, 0.95, "iter", (2, 34, 34), [64 * 17 * 17]),
    ("alexnetf", 10, 4, 0.99, "broyden", (3, 32, 32), ALEXNETF_WIDTHS),
    ("alexnetf", 100, 4, 0.99, "broyden", (3, 32, 32), ALEXNETF_WIDTHS),
    ("cifarnetf", 10, 4, 0.99, "broyden", (3, 32, 32), CIFARNETF_WIDTHS),
    ("cifarnetf", 100, 4, 0.99, "broyden", (3, 32, 32), CIFARNETF_WIDTHS),
]
BATCH = 2


def paper_input(name, shape, time_step, seed=0):
    """A small batch: Gaussian images, or sparse spike frames (time last) for N-MNIST."""
    gen = torch.Generator().manual_seed(seed)
    if name == "nmnist_conv":
        return (torch.rand(BATCH, *shape, time_step, generator=gen) < 0.2).float()
    return torch.randn(BATCH, *shape, generator=gen)



def spectral_norm(matrix):
    """Largest singular value, from the eigenvalues of the smaller Gram matrix (float64)."""
    m = matrix.detach().double()
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return float(torch.linalg.eigvalsh(gram)[-1].sqrt())


def assert_paper_initialisation(model):
    """The paper's initialisation (docs/method.md): every conv/linear/convT weight of the SNN has unit-norm fan-in slices
    (for ConvTranspose the slice [:, i]) with entries in [-1, 1]; biases 0; BN γ = 1, β = 0;
    the feedback scale g equals σ(V) of the raw feedback weight reshaped to (dim 0, rest)."""
    snn = model.snn
    for conn in [snn.input_layer, *snn.layers, snn.feedback]:
        op = conn.linear
        weight = op.parametrizations.weight.original if conn is snn.feedback else op.weight
        out_dim = 1 if isinstance(op, nn.ConvTranspose2d) else 0
        dims = [d for d in range(weight.dim()) if d != out_dim]
        norms = torch.linalg.vector_norm(weight.detach(), dim=dims)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
        assert weight.abs().max() <= 1
        if op.bias is not None:
            assert not op.bias.any()
        if conn.bn is not None:
            assert torch.equal(conn.bn.weight, torch.ones_like(conn.bn.weight))
            assert not conn.bn.bias.any()
    V = snn.feedback.linear.parametrizations.weight.original
    assert snn.feedback.spectral.g.item() == pytest.approx(spectral_norm(V.flatten(1)), rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name, classes, time_step, leak, solver, shape, widths", PAPER_NETS,
                         ids=[f"{row[0]}-C{row[1]}" for row in PAPER_NETS])
def test_training_step_and_rates(name, classes, time_step, leak, solver, shape, widths):
    """A training step (forward, cross-entropy, backward, SGD with the paper's momentum and weight
    decay) at paper size: finite loss; every parameter gets a finite gradient, nonzero except the
    biases of linear ops followed by BN (BN cancels them) and the feedback scale g when it is
    above the bound 1 (initialised to σ(V), ≥ 1 for the same-size conv/fc feedback, then
    clamped: gradient 0); every parameter except those zero-gradient biases (zero-initialised)
    changes. Then get_all_rate gives one (B, n_l) tensor per spiking layer with the
    paper widths, holding spike counts / T in [0, 1]. The adjoint solve (the paper's solver and
    threshold 30) reaches a small relative residual at this size. The fresh net is initialised
    as docs/method.md says."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=classes, time_step=time_step, leaky=leak, dropout=0.2,
                        solver=solver).train()
    assert model.snn.solver == solver and model.snn.threshold == 30
    assert_paper_initialisation(model)
    x = paper_input(name, shape, time_step)
    target = torch.arange(BATCH) % classes
    if model.snn.layers:
        calibrate_bn(model, x)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    logits = model(x)
    assert logits.shape == (BATCH, classes)
    loss = F.cross_entropy(logits, target)
    assert math.isfinite(loss.item())
    loss.backward()
    stats = model.solver_stats
    print(f"[{name}-C{classes}] adjoint solve ({model.snn.solver}): {stats['nstep']} steps, "
          f"relative residual {stats['rel_residual']:.1e}")
    # Either the solve reached the paper's stopping level, or it ran to the cap of 30 iterations;
    # the trace holds the start and one residual per iteration.
    assert stats["stop"] == "tol" or stats["nstep"] == 30
    assert len(stats["trace"]) == stats["nstep"] + 1 and stats["rel_residual"] < 1e-3

    g_name = "snn.feedback.linear.parametrizations.weight.0.g"
    cancelled_by_bn = {n for n, _ in model.named_parameters()
                       if n.endswith("linear.bias") and not n.startswith("classifier")}
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        if n == g_name and abs(p.item()) > 1.0:   # clamped to the bound: no gradient
            assert p.grad.item() == 0.0
        elif n not in cancelled_by_bn:        # those are zero up to rounding
            assert p.grad.abs().max().item() > 0, f"{n} receives no gradient"
    optimizer.step()
    for n, p in model.named_parameters():
        if n not in cancelled_by_bn:
            assert not torch.equal(p.detach(), before[n]), f"{n} did not change"

    model.eval()
    rates = model.get_all_rate(x)
    assert [tuple(r.shape) for r in rates] == [(BATCH, n) for n in widths]
    for r in rates:
        assert r.min() >= 0 and r.max() <= 1
        counts = r * time_step
        assert torch.allclose(counts, counts.round(), atol=1e-4)
    assert rates[0].max() > 0


@pytest.mark.parametrize("name, solver", [(row[0], row[4]) for row in PAPER_NETS if row[1] == 10])
def test_default_solver_is_the_papers(name, solver):
    """build_model without a solver argument uses the paper's solver for the net (modules/settings.py):
    the damped iteration for N-MNIST (as its Architecture entry says), Broyden otherwise."""
    assert build_model(name, time_step=2).snn.solver == solver
