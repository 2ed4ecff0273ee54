"""Batched fixed-point solvers for the adjoint equation y = v + y·J.

Contract shared by every solver: `solve(func, y0, max_iter, tol, f0=None) -> (y, info)`
finds a fixed point y = func(y) of a batched map on (B, n) tensors; `f0`, when
the caller knows it, is func(y0) (e.g. v for the adjoint map at y0 = 0), which
saves one evaluation. `info` holds

- `nstep`: iterations taken; `nfev`: calls of func;
- `residual`: ‖func(y) - y‖ over the whole batch at the returned y itself,
  the map evaluated at that batch (a map may couple the samples, as batch
  normalisation does, so per-sample residuals of different batches do not
  add up to it);
- `init_residual`: the same at y0; `trace`: after each iteration (index 0:
  y0), the whole-batch residual of the best iterate so far as the solver
  measured it; Broyden measures per sample, so when the samples' best
  iterates come from different iterations the last entry can differ from
  `residual`;
- `stop`: 'tol' when the residual fell below the stopping level, 'cap' when
  the solver ran out of iterations;
- `syncs`: how many times the solver copied values to the host, each a wait
  for the device: one per iteration (the stop test) plus one (Broyden: one
  more when it evaluates a mixed batch), or a single one for a solver without
  a stop test (`phantom_steps`).

`tol=None` keeps the paper's stopping rule: run `max_iter` iterations unless the
whole-batch residual falls below 2e-10·sqrt(numel), i.e. practically never stop
early. A float `tol` stops as soon as the residual has fallen below `tol` times
its initial value (an option that saves iterations on easy batches).

What is returned: `broyden` each sample's lowest-residual iterate (a batch
mixing iterations, whose residual it then evaluates), `anderson` the
lowest-residual iterate of the whole batch, `fixed_point_iter` and
`phantom_steps` the last iterate.

`SOLVERS` maps a name to a `Solver`: the function and what the adjoint solve
needs to know about it (where it starts, which options it takes).
"""
import math
from dataclasses import dataclass
from typing import Callable

import torch


class _HostReads:
    """Copies of device values to the host, counted: each waits for the device's queued work."""

    def __init__(self):
        self.count = 0

    def floats(self, tensor):
        """tensor's values as Python floats (nested lists as tolist gives them); non-finite ones as +inf."""
        self.count += 1
        return _map_finite_or_inf(tensor.tolist())


def _map_finite_or_inf(values):
    """_finite_or_inf of a float, or of every float in nested lists."""
    if isinstance(values, list):
        return [_map_finite_or_inf(v) for v in values]
    return _finite_or_inf(values)


def _finite_or_inf(value):
    """value, or +inf where it is NaN or infinite."""
    return value if math.isfinite(value) else math.inf


def _stop_level(init_residual, numel, tol):
    """Whole-batch residual under which a solver stops."""
    if tol is None:
        return 2e-10 * math.sqrt(numel)
    return tol * init_residual


def _info(nstep, nfev, trace, stopped, syncs, residual=None):
    """The info dict every solver returns (residual: that of the returned y when it is not trace[-1])."""
    return {"nstep": nstep, "nfev": nfev, "residual": trace[-1] if residual is None else residual,
            "init_residual": trace[0], "trace": trace, "stop": "tol" if stopped else "cap", "syncs": syncs}


def _dots(x, rows):
    """Per-sample dot products of x (B, n) with a stack of rows (k, B, n): (B, k)."""
    # (B, 1, n) @ (B, n, k): the batched layout that CPU BLAS runs at memory speed.
    return torch.bmm(x[:, None], rows.permute(1, 2, 0)).squeeze(1)


class _LowRankInverse:
    """H = -I + Σ_k u_k d_k w_kᵀ, with u_k and w_k held as coefficients over a basis of stored vectors.

    Every vector the method forms is a combination of the residuals it has seen,
    so the basis starts as those residuals (the coefficient vectors are
    (B, capacity), one entry per basis vector), and H and Hᵀ act on coefficients
    through the basis' Gram matrix gram[j, l] = b_j·b_l alone. Unused slots have
    d = 0.
    """

    # Devices on which H's products run as batched matrix products (three kernels per product with H);
    # elsewhere as broadcast products (eight kernels), which on a CPU run without waking a thread pool.
    MATMUL_DEVICES = ("cuda",)

    def __init__(self, gram, memory):
        B, capacity, _ = gram.shape
        self.gram = gram
        self.u = gram.new_zeros(B, memory, capacity)
        self.w = gram.new_zeros(B, memory, capacity)
        self.d = gram.new_zeros(B, memory)
        self.matmul = gram.device.type in self.MATMUL_DEVICES

    def apply(self, coeff, transpose=False, gram_coeff=None):
        """Coefficients of H x (Hᵀ x when transpose) for x with coefficients coeff (B, capacity).

        gram_coeff, if the caller has it, is gram·coeff (x's dot products with the basis), (B, capacity).
        """
        # H x = -x + Σ_k u_k d_k (w_k·x), with w_k·x = w_kᵀ gram x in coefficients: a few thousand numbers.
        left, right = (self.u, self.w) if transpose else (self.w, self.u)
        if self.matmul:
            if gram_coeff is None:
                gram_coeff = torch.bmm(self.gram, coeff[:, :, None]).squeeze(2)
            dots = torch.bmm(left, gram_coeff[:, :, None]).squeeze(2)  # (B, memory)
            # -coeff + (d ∘ dots)ᵀ right, as (B, 1, memory) @ (B, memory, capacity)
            return torch.baddbmm(coeff[:, None], (self.d * dots)[:, None], right, beta=-1.0).squeeze(1)
        if gram_coeff is None:
            gram_coeff = (self.gram * coeff[:, None, :]).sum(2)
        dots = (left * gram_coeff[:, None, :]).sum(2)
        return ((self.d * dots)[:, :, None] * right).sum(1) - coeff

    def store(self, slot, u, w, d):
        """Put the term u d wᵀ into `slot`, replacing what was there."""
        self.u[:, slot], self.w[:, slot], self.d[:, slot] = u, w, d

    def compress(self, basis, keep):
        """Make the basis the vectors with coefficients keep (B, k, capacity), then every u_k and w_k.

        basis (capacity, B, n) is rewritten in place: its first k + 2·memory rows
        become the new basis, with its Gram matrix; returns that count. What
        the method still needs (the terms of H, the newest residual and H g) lies
        in their span, so nothing is lost but the residuals that left H.
        """
        B, memory, capacity = self.u.shape
        coeff = torch.cat([keep, self.u, self.w], dim=1)  # (B, rows, capacity)
        rows = coeff.shape[1]
        vectors = torch.bmm(coeff, basis.transpose(0, 1))  # (B, rows, n), aside: it reads every row
        basis[:rows] = vectors.transpose(0, 1)
        self.gram.zero_()
        self.gram[:, :rows, :rows] = torch.bmm(vectors, vectors.transpose(1, 2))
        eye = torch.eye(capacity, dtype=coeff.dtype, device=coeff.device)
        first = keep.shape[1]
        self.u.copy_(eye[first:first + memory].expand(B, -1, -1))
        self.w.copy_(eye[first + memory:rows].expand(B, -1, -1))
        return rows


def broyden(func, y0, max_iter=30, tol=None, memory=27, f0=None):
    """Limited-memory Broyden's (good) method for y = func(y); returns each sample's lowest-residual iterate.

    Solves g(y) = func(y) - y = 0 per sample. The inverse Jacobian of g is
    approximated as H = -I + Σ_k u_k d_k w_kᵀ (exact for func ≡ const); the
    good Broyden update H ← H + (Δy - H Δg) Δyᵀ H / (Δyᵀ H Δg) adds the term
    with u = H g_new, w = Hᵀ Δy and d = -1/(w·Δg) (since Δy = -H g, Δy - H Δg
    = -H g_new), keeping at most `memory` terms (oldest overwritten first). The
    step is the full Newton step -H g (no line search). Non-finite values never
    reach the stored terms, and a sample whose residual is non-finite restarts
    from its best iterate.

    The residuals are stored, one (B, n) vector per iteration, and u_k, w_k as
    coefficients over them (see _LowRankInverse): an iteration reads the stored
    vectors twice, once to form the step and once for the new residual's dot
    products with them, and otherwise works on (B, capacity) numbers. The
    storage holds min(max_iter + 1, 3·memory + 2) vectors; when a long solve
    fills it, the basis is rewritten as the terms of H, the newest residual
    and H g (2·memory + 2 vectors), which leaves room for `memory` more.

    The per-sample best iterates are chosen on the device; each iteration
    reads 3·B numbers on the host at once (the per-sample best and new
    squared residuals and the iteration each best is from: the stop test,
    whether a sample diverged, whether the best iterates come from different
    iterations). When they do, the returned batch was never
    evaluated as a whole, and func is called once more to report its own
    residual (`trace` keeps the per-sample best residuals the method saw).
    """
    B, n = y0.shape
    memory = max(1, min(memory, max_iter))
    capacity = min(max_iter + 1, 3 * memory + 2)
    basis = y0.new_empty(capacity, B, n)  # residuals, or after a compression what H needs
    gram = y0.new_zeros(B, capacity, capacity)
    H = _LowRankInverse(gram, memory)
    one_hot = torch.eye(capacity, dtype=y0.dtype, device=y0.device)
    reads = _HostReads()

    y = y0
    g = torch.sub(func(y) if f0 is None else f0, y, out=basis[0])
    gram[:, 0, 0] = _dots(g, basis[:1]).squeeze(1)
    rows, last = 1, 0  # basis vectors in use; the newest residual's row
    Hg = -one_hot[0].expand(B, -1)  # coefficients of H g, with H = -I
    best_sq = _finite_squares(gram[:, 0, 0])  # (B,) squared residual of each sample's best iterate
    best_y = y  # never modified in place
    best_step = y0.new_zeros(B)  # the iteration each best iterate is from (in y's dtype: read with the residuals)
    residual = math.sqrt(math.fsum(reads.floats(best_sq)))
    stop = _stop_level(residual, g.numel(), tol)
    trace = [residual]
    nstep, mixed = 0, False
    while nstep < max_iter and not residual < stop:
        if rows == capacity:
            rows = H.compress(basis, torch.stack([one_hot[last].expand(B, -1), Hg], dim=1))
            last, Hg = 0, one_hot[1].expand(B, -1)
        new = rows
        # The Newton step Δy = -H g = -Σ_j Hg_j b_j.
        y = torch.baddbmm(y[:, None], Hg[:, None, :new], basis[:new].transpose(0, 1), alpha=-1.0).squeeze(1)
        g = torch.sub(func(y), y, out=basis[new])
        nstep += 1

        dots = _dots(g, basis[:new + 1])  # g·b_j for j ≤ new
        sample_sq = _finite_squares(dots[:, new])
        better = sample_sq < best_sq
        best_sq = torch.where(better, sample_sq, best_sq)
        best_y = torch.where(better[:, None], y, best_y)
        best_step = best_step.masked_fill(better, nstep)
        # The one host read of the iteration: 3·B numbers, summarised on the host (fewer kernels than on the device).
        best_host, new_host, steps = reads.floats(torch.stack([best_sq, sample_sq, best_step]))
        residual = math.sqrt(math.fsum(best_host))  # +inf as soon as one sample's is
        mixed = min(steps) != max(steps)
        trace.append(residual)
        bad = torch.isinf(sample_sq)[:, None] if math.inf in new_host else None
        if bad is not None:  # a non-finite residual is replaced by zero before it reaches the Gram matrix
            dots.masked_fill_(bad, 0.0)
            g.masked_fill_(bad, 0.0)
        gram[:, new, :new + 1] = dots
        gram[:, :new + 1, new] = dots

        g_coeff, g_gram = one_hot[new].expand(B, -1), gram[:, :, new]  # g_new and its dot products
        u = H.apply(g_coeff, gram_coeff=g_gram)   # H g_new, before the update
        w = -H.apply(Hg, transpose=True)          # Hᵀ Δy = -Hᵀ H g
        # d = -1/(Δyᵀ H Δg) = -1/(w·g_new - w·g_old); a zero or non-finite denominator drops the update.
        w_g = (w * g_gram).sum(1)
        d = (-1.0 / (w_g - (w * gram[:, :, last]).sum(1))).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        overwrites = nstep > memory
        H.store((nstep - 1) % memory, u, w, d)
        if overwrites:  # the oldest term left H: apply it anew
            Hg = H.apply(g_coeff, gram_coeff=g_gram)
        else:  # (H + u d wᵀ) g_new = u (1 + d w·g_new), without another pass over H
            Hg = u * (1.0 + d * w_g)[:, None]
        rows, last = new + 1, new
        if bad is not None:  # a diverged sample restarts from its best iterate
            Hg = Hg.masked_fill(bad, 0.0)
            y = torch.where(bad, best_y, y)
    nfev = nstep + (f0 is None)
    true_residual = None
    if mixed:
        true_residual = reads.floats((func(best_y) - best_y).norm())
        nfev += 1
    return best_y, _info(nstep, nfev, trace, residual < stop, reads.count, true_residual)


def _finite_squares(squares):
    """Squared norms (B,) with NaN and infinite ones as +inf."""
    return squares.nan_to_num(nan=math.inf, posinf=math.inf)


def _damped_iteration(func, y0, max_iter, tol, f0, damping, stop_test):
    """y ← y + damping·(func(y) - y), max_iter times or until the stop test holds; returns the last iterate.

    Without a stop test the residual norms stay on the device and reach the
    host once, at the end.
    """
    reads = _HostReads()
    y = y0
    r = (func(y) if f0 is None else f0) - y
    norms = [r.norm()]  # device scalars, read at once when there is no stop test
    trace = [reads.floats(norms[0])] if stop_test else None
    stop = _stop_level(trace[0], r.numel(), tol) if stop_test else None
    nstep = 0
    while nstep < max_iter and not (stop_test and trace[-1] < stop):
        y = torch.add(y, r, alpha=damping)  # one pass; for damping ½ equal to y + ½·r, halving being exact
        nstep += 1
        r = func(y) - y
        norms.append(r.norm())
        if stop_test:
            trace.append(reads.floats(norms[-1]))
    if not stop_test:
        trace = reads.floats(torch.stack(norms))
    return y, _info(nstep, nstep + (f0 is None), trace, stop_test and trace[-1] < stop, reads.count)


def fixed_point_iter(func, y0, max_iter=30, tol=None, f0=None):
    """Damped fixed-point iteration y ← y + ½·(func(y) - y); returns the last iterate.

    With r(y) = func(y) - y the residual of y = v + y·J, the fixed point of this
    update is the solution itself. (The paper's release damped with
    y ← (y + r(y))/2, whose fixed point is v(2I - J)⁻¹ instead of v(I - J)⁻¹.)
    """
    return _damped_iteration(func, y0, max_iter, tol, f0, 0.5, stop_test=True)


def phantom_steps(func, y0, max_iter=5, tol=None, f0=None, tau=0.5):
    """Exactly max_iter damped steps y ← (1 - τ)·y + τ·func(y) (`tol` is ignored); returns the last iterate.

    From y0 = 0 on the adjoint map y ↦ v + y·J this is the phantom gradient
    y_K = τ Σ_{j<K} v M^j, M = (1 - τ) I + τ J (Geng et al., NeurIPS 2021): a
    truncated series for v (I - J)⁻¹ that costs K vector-Jacobian products
    (K - 1 for the steps, one for the residual of y_K) and no host read but
    the final one. K = 1, τ = 1 gives y = v: Jacobian-free backpropagation.
    """
    return _damped_iteration(func, y0, max_iter, None, f0, tau, stop_test=False)


def anderson(func, y0, max_iter=30, tol=None, memory=5, f0=None, beta=1.0, regularization=None):
    """Anderson acceleration (type II) for y = func(y); returns the lowest-residual iterate of the whole batch.

    With the last m = `memory` iterates y_i and their residuals g_i = func(y_i) - y_i,
    each sample takes the weights α (Σ α_i = 1) minimising ‖Σ α_i g_i‖ and steps
    to y = Σ α_i (y_i + β g_i) (β = `beta`, 1: undamped). On a linear map
    with full memory this is GMRES in disguise (Walker & Ni, 2011). α comes
    from the Gram matrix of the g_i, scaled by its largest diagonal entry and
    regularised by `regularization`·I (default 100 × the dtype's machine
    epsilon), so a rank-deficient history (repeated or zero residuals) gives
    finite weights instead of a singular system. A non-finite residual sends
    the method back to its best iterate with an empty history.

    Each iteration stores g and y + β g (2·m vectors of (B, n) in all), reads
    the stored residuals once for the new Gram row and the stored y + β g
    once for the step, and reads two numbers on the host (the whole-batch residual
    and whether it is finite). The returned iterate is one the map was
    evaluated at as a whole, so `residual` is exact even for maps that couple
    the samples.
    """
    B, n = y0.shape
    memory = max(1, min(memory, max_iter))
    eps = regularization if regularization is not None else 100 * torch.finfo(y0.dtype).eps
    # The history, a ring of slots: residuals g_i, and the points y_i + β g_i that the step combines.
    G, Z = y0.new_empty(memory, B, n), y0.new_empty(memory, B, n)
    gram = y0.new_zeros(B, memory, memory)
    eye = torch.eye(memory, dtype=y0.dtype, device=y0.device)
    reads = _HostReads()

    y = y0
    g = (func(y) if f0 is None else f0) - y
    best_y, best_g, best_sq = y, g, (g * g).sum()
    residual = reads.floats(best_sq.sqrt())
    stop = _stop_level(residual, g.numel(), tol)
    trace = [residual]
    nstep, stored = 0, 0  # stored: history entries since the start or the last restart
    while nstep < max_iter and not residual < stop:
        slot, size = stored % memory, min(stored + 1, memory)
        G[slot] = g
        torch.add(y, g, alpha=beta, out=Z[slot])
        dots = _dots(g, G[:size])  # (B, size)
        gram[:, slot, :size] = dots
        gram[:, :size, slot] = dots
        alpha = _anderson_weights(gram[:, :size, :size], eye[:size, :size], eps)  # (B, size)
        # y = Σ α_i (y_i + β g_i) per sample: (B, 1, size) @ (B, size, n).
        y = torch.bmm(alpha[:, None], Z[:size].transpose(0, 1)).squeeze(1)
        g = func(y) - y
        nstep, stored = nstep + 1, stored + 1
        sq = (g * g).sum()
        better = sq < best_sq  # False for NaN
        best_y, best_g = torch.where(better, y, best_y), torch.where(better, g, best_g)
        best_sq = torch.where(better, sq, best_sq)
        residual, finite = reads.floats(torch.stack([best_sq.sqrt(), torch.isfinite(sq).to(y.dtype)]))
        trace.append(residual)
        if finite != 1.0:  # restart from the best iterate with an empty history
            y, g, stored = best_y, best_g, 0
            gram.zero_()
    return best_y, _info(nstep, nstep + (f0 is None), trace, residual < stop, reads.count)


def _anderson_weights(gram, eye, eps):
    """α (B, k) minimising ‖Σ α_i g_i‖ subject to Σ α_i = 1, from the residuals' Gram matrix (B, k, k).

    α = A⁻¹1 / (1ᵀA⁻¹1) with A = gram / max diag + eps·I, symmetric positive definite.
    """
    scale = gram.diagonal(dim1=1, dim2=2).amax(dim=1).clamp_min(torch.finfo(gram.dtype).tiny)
    A = gram / scale[:, None, None] + eps * eye
    ones = torch.ones(A.shape[:2] + (1,), dtype=A.dtype, device=A.device)
    # solve_ex: no host read for the error check, and A is never singular.
    z = torch.linalg.solve_ex(A, ones)[0].squeeze(2)
    return z / z.sum(1, keepdim=True)


@dataclass(frozen=True)
class Solver:
    """A registered solver: its function (the contract above) and what its callers need to know.

    starts_from_v: the adjoint solve starts it from y0 = v (the damped iteration,
    whose first step then already mixes in v·J) rather than from y0 = 0 with
    f0 = v (which saves a vector-Jacobian product). options: the keyword
    options beyond the contract that it takes.
    """
    solve: Callable
    starts_from_v: bool = False
    options: tuple = ()


SOLVERS = {
    "broyden": Solver(broyden, options=("memory",)),
    "anderson": Solver(anderson, options=("memory", "beta")),
    "iter": Solver(fixed_point_iter, starts_from_v=True),
}


def get_solver(name):
    """The solver registered under `name` (see SOLVERS)."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}") from None
