"""Building blocks of a feedback spiking network.

Every synaptic operator of the network (the input layer F, the feed-forward
layers W_l inside the feedback loop and the feedback operator W_fb) is a
`Connection`: a linear operator (fc, conv or transposed conv), optionally
followed by batch normalisation, then variational dropout.
The feedback operator's weight is reparameterised by `SpectralScale`.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize


@torch.no_grad()
def unit_fanin_init_(linear):
    """U(-1, 1) weights, each output unit's fan-in slice scaled to unit L2 norm; zero bias."""
    weight = linear.weight
    weight.uniform_(-1.0, 1.0)
    # ConvTranspose stores (in, out, kh, kw): output unit i owns the slice [:, i].
    out_dim = 1 if isinstance(linear, nn.ConvTranspose2d) else 0
    dims = [d for d in range(weight.dim()) if d != out_dim]
    weight.div_(torch.linalg.vector_norm(weight, dim=dims, keepdim=True).clamp_min(1e-12))
    if linear.bias is not None:
        linear.bias.zero_()


def top_singular(matrix):
    """(u, σ, v): the largest singular value of a matrix and its singular vectors.

    From the eigendecomposition of the smaller Gram matrix, in float64: a full
    SVD of a wide feedback matrix costs far more and is not needed.
    """
    m = matrix.double()
    wide = m.shape[0] <= m.shape[1]
    gram = m @ m.t() if wide else m.t() @ m
    eigvals, eigvecs = torch.linalg.eigh(gram)
    sigma = eigvals[-1].clamp_min(0).sqrt()
    first = eigvecs[:, -1]
    second = (m.t() @ first if wide else m @ first) / sigma.clamp_min(1e-30)
    u, v = (first, second) if wide else (second, first)
    return u.to(matrix.dtype), sigma.to(matrix.dtype), v.to(matrix.dtype)


class SpectralScale(nn.Module):
    """Parametrization W = clamp(g, -1, 1) · V / σ(V), σ the spectral norm of V as (dim 0, rest).

    σ is estimated as u·(V v) with power-iteration vectors u, v (buffers). They
    advance by one step per training forward (`power_iteration`), never in
    evaluation, so evaluating a model changes none of its state. Both σ and the
    power iteration run in V's dtype even under autocast: bf16 products would
    round u, v and σ to 8 bits of mantissa.
    """

    def __init__(self, weight):
        super().__init__()
        u, sigma, v = top_singular(weight.detach().flatten(1))
        self.g = nn.Parameter(sigma)
        self.register_buffer("u", u)
        self.register_buffer("v", v)

    def forward(self, V):
        """Effective weight from the raw weight V."""
        with torch.autocast(V.device.type, enabled=False):
            sigma = torch.dot(self.u, V.flatten(1) @ self.v)
        return self.g.clamp(-1.0, 1.0) * V / sigma

    @torch.no_grad()
    def power_iteration(self, V):
        """One power-iteration step on V reshaped to (dim 0, rest): v ← Vᵀu / ‖Vᵀu‖, u ← V v / ‖V v‖."""
        matrix = V.flatten(1)
        with torch.autocast(V.device.type, enabled=False):
            self.v.copy_(F.normalize(matrix.t() @ self.u, dim=0, eps=1e-12))
            self.u.copy_(F.normalize(matrix @ self.v, dim=0, eps=1e-12))


class VariationalDropout(nn.Module):
    """Dropout with one Bernoulli(1-p) mask per sample and neuron, scaled by 1/(1-p).

    The mask is drawn at its first use after `reset()` and then reused, so all
    time steps of a simulation and the equilibrium function f see the same one.
    """

    def __init__(self, p=0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.mask = None

    def reset(self):
        """Forget the mask; the next training call draws a new one."""
        self.mask = None

    def forward(self, h):
        """Apply the current mask (identity in evaluation)."""
        if not self.training or self.p == 0.0:
            return h
        if self.mask is None or self.mask.shape != h.shape:
            # Draws in float32 (the same masks for a seed in any dtype), scale exact in h's dtype.
            keep = torch.full_like(h, 1.0 - self.p, dtype=torch.float32)
            self.mask = torch.bernoulli(keep).to(h.dtype).div_(1.0 - self.p)
        return h * self.mask


def batch_stats(h, group=None):
    """Per-channel (mean, biased variance) of h, channels on dim 1, as BN uses them.

    With a process group (see sync_group) their values are those of the whole
    batch spread over its processes, as SyncBatchNorm computes them, and their
    gradient is that with respect to this process's share of the batch (the
    other shares are constants here, so no backward pass communicates).
    """
    dims = [0] + list(range(2, h.dim()))
    mean, var = h.mean(dim=dims), h.var(dim=dims, unbiased=False)
    if group is None:
        return mean, var
    count = h.numel() // h.shape[1]
    with torch.no_grad():
        # Exact pooling of per-process moments: N M = Σ n_i m_i, then N V = Σ n_i (v_i + (m_i - M)²).
        totals = torch.cat([count * mean, mean.new_tensor([count])])
        dist.all_reduce(totals, group=group)
        total_mean, total = totals[:-1] / totals[-1], totals[-1]
        spread = count * (var + (mean - total_mean) ** 2)
        dist.all_reduce(spread, group=group)
        total_var = spread / total
    # d M / d x = 1/N and d V / d x = 2 (x - M) / N for this share's x (Σ (x - M) = 0 removes M's own term).
    own_mean = mean * (count / total)
    own_spread = ((h - total_mean.view(1, -1, *[1] * (h.dim() - 2))) ** 2).mean(dim=dims) * (count / total)
    return total_mean + own_mean - own_mean.detach(), total_var + own_spread - own_spread.detach()


def normalize_with(h, mean, var, bn):
    """(h - mean) / sqrt(var + ε) · γ + β per channel (dim 1), with BN bn's ε, γ and β.

    F.batch_norm refuses statistics that require a gradient (it treats them as
    running statistics), so statistics that carry one are applied by the formula.
    """
    if not (mean.requires_grad or var.requires_grad):
        return F.batch_norm(h, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)
    shape = (1, -1) + (1,) * (h.dim() - 2)
    scale = bn.weight * torch.rsqrt(var + bn.eps)
    return (h - mean.view(shape)) * scale.view(shape) + bn.bias.view(shape)


def sync_group(bn):
    """The process group over which a SyncBatchNorm normalises, or None (plain BN, or no process group)."""
    if not (isinstance(bn, nn.SyncBatchNorm) and dist.is_available() and dist.is_initialized()):
        return None
    return bn.process_group or dist.group.WORLD


class Connection(nn.Module):
    """A synaptic operator: linear op (+ BN) + variational dropout.

    BN is applied in one of three ways, chosen by the caller:
    `stats=(mean, var)` normalises with given statistics (the simulation);
    otherwise in training the batch statistics are used (under SyncBatchNorm,
    the whole batch's across processes), and the running statistics move only
    if `update_stats` (once per training step, in f);
    in evaluation the running statistics are used.
    """

    def __init__(self, linear, bn=False, dropout=0.0, flatten=False):
        super().__init__()
        self.flatten = flatten
        self.linear = linear
        unit_fanin_init_(linear)
        if bn:
            channels = linear.weight.shape[1 if isinstance(linear, nn.ConvTranspose2d) else 0]
            self.bn = (nn.BatchNorm2d if isinstance(linear, (nn.Conv2d, nn.ConvTranspose2d)) else nn.BatchNorm1d)(channels)
        else:
            self.bn = None
        self.dropout = VariationalDropout(dropout)

    def linear_part(self, h):
        """The linear operator alone (no BN or dropout)."""
        return self.linear(h.flatten(1) if self.flatten else h)

    def running_stats(self):
        """The BN running statistics, as a (mean, var) pair."""
        return self.bn.running_mean, self.bn.running_var

    def normalize(self, h, stats=None, update_stats=False):
        """Batch-normalise h following the rule in the class docstring."""
        bn = self.bn
        if stats is not None:
            return normalize_with(h, *stats, bn)
        if self.training and update_stats:
            return bn(h)
        if self.training:
            group = sync_group(bn)
            if group is not None:  # --sync-bn: the whole batch's statistics, as bn(h) takes them
                return normalize_with(h, *batch_stats(h, group), bn)
            return F.batch_norm(h, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        return F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)

    def forward(self, h, stats=None, update_stats=False):
        """Output current of the operator for input h (spikes, rates or images)."""
        h = self.linear_part(h)
        if self.bn is not None:
            h = self.normalize(h, stats, update_stats)
        return self.dropout(h)


class Feedback(Connection):
    """The feedback operator W (single-layer nets) or W_fb (multi-layer nets).

    No bias and no BN; its weight is reparameterised with `SpectralScale` so that
    its spectral norm stays at most 1, keeping the equilibrium contractive.
    """

    def __init__(self, linear, dropout=0.0):
        if linear.bias is not None:
            raise ValueError("the feedback operator has no bias")
        super().__init__(linear, bn=False, dropout=dropout)
        parametrize.register_parametrization(linear, "weight", SpectralScale(linear.weight))

    @property
    def spectral(self):
        """The SpectralScale parametrization of the weight."""
        return self.linear.parametrizations.weight[0]

    @torch.no_grad()
    def power_iteration(self):
        """Advance the spectral-norm estimate by one step."""
        self.spectral.power_iteration(self.linear.parametrizations.weight.original)
