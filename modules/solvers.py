"""Batched fixed-point solvers for the adjoint equation y = v + y·J.

Contract shared by every solver: `solve(func, y0, max_iter, tol, f0=None) -> (y, info)`
finds a fixed point y = func(y) of a batched map on (B, n) tensors; `f0`, when
the caller knows it, is func(y0) (e.g. v for the adjoint map at y0 = 0), which
saves one evaluation. `info` holds `nstep` (iterations taken), `nfev` (calls of
func), `residual` (‖func(y) - y‖ of the returned iterate over the whole batch),
`init_residual` (the same at y0) and `trace` (the residual after each iteration).

`tol=None` keeps the paper's stopping rule: run `max_iter` iterations unless the
whole-batch residual falls below 2e-10·sqrt(numel), i.e. practically never stop
early. A float `tol` stops as soon as the residual has fallen below `tol` times
its initial value (an option that saves iterations on easy batches).
"""
import math

import torch


def _norms_from_squares(squares):
    """Per-sample L2 norms, as a list of floats, from squared norms (B,); non-finite ones become +inf."""
    return [math.sqrt(s) if math.isfinite(s) else math.inf for s in squares.tolist()]


def _batch_norm(norms):
    """Whole-batch L2 norm from per-sample norms (floats)."""
    return math.sqrt(math.fsum(r * r for r in norms))


def _mask(flags, like):
    """A (B, 1) boolean tensor on like's device from B Python booleans."""
    return torch.tensor(flags, device=like.device)[:, None]


def _finite_or_inf(value):
    """value, or +inf where it is NaN or infinite."""
    return value if math.isfinite(value) else math.inf


def _stop_level(init_residual, numel, tol):
    """Whole-batch residual under which a solver stops."""
    if tol is None:
        return 2e-10 * math.sqrt(numel)
    return tol * init_residual


def _info(nstep, nfev, trace):
    """The info dict every solver returns."""
    return {"nstep": nstep, "nfev": nfev, "residual": trace[-1], "init_residual": trace[0], "trace": trace}


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

    def __init__(self, gram, memory):
        B, capacity, _ = gram.shape
        self.gram = gram
        self.u = gram.new_zeros(B, memory, capacity)
        self.w = gram.new_zeros(B, memory, capacity)
        self.d = gram.new_zeros(B, memory)

    def apply(self, coeff, transpose=False, gram_coeff=None):
        """Coefficients of H x (Hᵀ x when transpose) for x with coefficients coeff (B, capacity).

        gram_coeff, if the caller has it, is gram·coeff (x's dot products with the basis), (B, capacity).
        """
        # H x = -x + Σ_k u_k d_k (w_k·x), with w_k·x = w_kᵀ gram x in coefficients. The operands
        # are a few thousand numbers: broadcast products, unlike batched matrix products, run them
        # without waking a thread pool.
        left, right = (self.u, self.w) if transpose else (self.w, self.u)
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
    """Limited-memory Broyden's (good) method for y = func(y); returns the lowest-residual iterate.

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
    """
    B, n = y0.shape
    memory = max(1, min(memory, max_iter))
    capacity = min(max_iter + 1, 3 * memory + 2)
    basis = y0.new_empty(capacity, B, n)  # residuals, or after a compression what H needs
    gram = y0.new_zeros(B, capacity, capacity)
    H = _LowRankInverse(gram, memory)
    one_hot = torch.eye(capacity, dtype=y0.dtype, device=y0.device)

    y = y0
    g = torch.sub(func(y) if f0 is None else f0, y, out=basis[0])
    gram[:, 0, 0] = _dots(g, basis[:1]).squeeze(1)
    rows, last = 1, 0  # basis vectors in use; the newest residual's row
    Hg = -one_hot[0].expand(B, -1)  # coefficients of H g, with H = -I
    # Per-sample residuals are tracked on the host: one transfer of B numbers per iteration.
    best_res = _norms_from_squares(gram[:, 0, 0])
    best_y = y  # never modified in place
    residual = _batch_norm(best_res)
    stop = _stop_level(residual, g.numel(), tol)
    trace = [residual]
    nstep = 0
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
        sample_res = _norms_from_squares(dots[:, new])
        better = [r < b for r, b in zip(sample_res, best_res)]
        best_res = [min(r, b) for r, b in zip(sample_res, best_res)]
        residual = _batch_norm(best_res)  # +inf as soon as one sample's is
        trace.append(residual)
        # y is never modified in place, so when every sample improved it can be kept without a copy.
        best_y = y if all(better) else torch.where(_mask(better, y), y, best_y)
        diverged = [math.isinf(r) for r in sample_res]
        bad = _mask(diverged, y) if any(diverged) else None
        if bad is not None:  # a non-finite residual is replaced by zero before it reaches the Gram matrix
            dots.masked_fill_(bad, 0.0)
            g.masked_fill_(bad, 0.0)
        gram[:, new, :new + 1] = dots
        gram[:, :new + 1, new] = dots

        g_coeff, g_gram = one_hot[new].expand(B, -1), gram[:, :, new]  # g_new and its dot products
        u = H.apply(g_coeff, gram_coeff=g_gram)   # H g_new, before the update
        w = -H.apply(Hg, transpose=True)          # Hᵀ Δy = -Hᵀ H g
        # d = -1/(Δyᵀ H Δg) = -1/(w·g_new - w·g_old); a zero or non-finite denominator drops the update.
        d = (-1.0 / (w * (g_gram - gram[:, :, last])).sum(1)).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        H.store((nstep - 1) % memory, u, w, d)
        Hg = H.apply(g_coeff, gram_coeff=g_gram)  # H g_new, after the update
        rows, last = new + 1, new
        if bad is not None:  # a diverged sample restarts from its best iterate
            Hg = Hg.masked_fill(bad, 0.0)
            y = torch.where(bad, best_y, y)
    return best_y, _info(nstep, nstep + (f0 is None), trace)


def fixed_point_iter(func, y0, max_iter=30, tol=None, f0=None):
    """Damped fixed-point iteration y ← y + ½·(func(y) - y); returns the last iterate.

    With r(y) = func(y) - y the residual of y = v + y·J, the fixed point of this
    update is the solution itself. (The paper's release damped with
    y ← (y + r(y))/2, whose fixed point is v(2I - J)⁻¹ instead of v(I - J)⁻¹.)
    """
    y = y0
    r = (func(y) if f0 is None else f0) - y
    residual = float(r.norm())
    stop = _stop_level(residual, r.numel(), tol)
    trace = [residual]
    nstep = 0
    while nstep < max_iter and not residual < stop:
        y = torch.add(y, r, alpha=0.5)  # one pass; equals y + 0.5·r, halving being exact for normal floats
        nstep += 1
        r = func(y) - y
        residual = _finite_or_inf(float(r.norm()))
        trace.append(residual)
    return y, _info(nstep, nstep + (f0 is None), trace)


SOLVERS = {"broyden": broyden, "iter": fixed_point_iter}


def get_solver(name):
    """The solver registered under `name` (see SOLVERS)."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}") from None
