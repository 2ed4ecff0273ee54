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


def _norms(r):
    """Per-sample L2 norms of a (B, n) tensor; non-finite rows become +inf."""
    return r.norm(dim=1).nan_to_num_(nan=math.inf, posinf=math.inf)  # a norm is never -inf


def _finite_or_inf(value):
    """value, or +inf where it is NaN or infinite."""
    return value if math.isfinite(value) else math.inf


def _low_rank_update(base, x, left, right, beta=1.0, alpha=1.0):
    """beta·base + alpha·Σ_k (left_k · x) right_k, with left, right (B, k, n) stacks of rows; base, x (B, n)."""
    # (B, 1, n) @ (B, n, k), then (B, 1, k) @ (B, k, n) fused with the sum: the batched-matrix
    # layout that CPU BLAS runs at memory speed (the (B, k, n) @ (B, n, 1) form is ~20x slower).
    coeff = torch.bmm(x[:, None], left.transpose(1, 2))
    return torch.baddbmm(base[:, None], coeff, right, beta=beta, alpha=alpha).squeeze(1)


def _stop_level(init_residual, numel, tol):
    """Whole-batch residual under which a solver stops."""
    if tol is None:
        return 2e-10 * math.sqrt(numel)
    return tol * init_residual


def _info(nstep, nfev, trace):
    """The info dict every solver returns."""
    return {"nstep": nstep, "nfev": nfev, "residual": trace[-1], "init_residual": trace[0], "trace": trace}


def broyden(func, y0, max_iter=30, tol=None, memory=27, f0=None):
    """Limited-memory Broyden's (good) method for y = func(y); returns the lowest-residual iterate.

    Solves g(y) = func(y) - y = 0 per sample. The inverse Jacobian of g is
    approximated as H = -I + U Vᵀ (exact for func ≡ const), updated by
    H ← H + (Δy - H Δg) Δyᵀ H / (Δyᵀ H Δg) and stored as at most `memory`
    rank-one terms (oldest overwritten first). The step is the full Newton step
    -H g (no line search). Non-finite values never reach the stored terms, and
    a sample whose residual is non-finite keeps its last finite best iterate.
    """
    B, n = y0.shape
    memory = max(1, min(memory, max_iter))
    U = y0.new_empty(B, memory, n)   # rows u_kᵀ
    VT = y0.new_empty(B, memory, n)  # rows v_kᵀ
    filled = 0                       # terms stored so far; only these are ever read
    # With H = -I + U Vᵀ: H x = -x + U (Vᵀ x) and xᵀ H = -xᵀ + (xᵀ U) Vᵀ. H g is carried from one
    # iteration to the next (updated by the new rank-one term), so each iteration applies the
    # stored terms twice, for H g_new and Δyᵀ H, rather than three times.

    y = y0
    gy = (func(y) if f0 is None else f0) - y
    Hg = -gy
    sample_res = _norms(gy)
    best_y, best_res = y.clone(), sample_res.clone()
    residual = float(gy.norm())
    stop = _stop_level(residual, gy.numel(), tol)
    trace = [residual]
    nstep = 0
    while nstep < max_iter and not residual < stop:
        Us, VTs = U[:, :filled], VT[:, :filled]
        y_new = y - Hg                                           # the Newton step Δy = -H g
        g_new = func(y_new) - y_new
        y, g_old, gy = y_new, gy, g_new
        nstep += 1

        sample_res = _norms(gy)
        better = sample_res < best_res
        best_res = torch.where(better, sample_res, best_res)
        bad = torch.isinf(sample_res)  # a non-finite residual (see _norms)
        # One host synchronisation per iteration; the norm of best_res is +inf as soon as one sample's is.
        residual, any_bad, all_better = torch.stack(
            [best_res.norm(), bad.any().to(best_res.dtype), better.all().to(best_res.dtype)]).tolist()
        trace.append(residual)
        # y is never modified in place, so when every sample improved it can be kept without a copy.
        best_y = y if all_better else torch.where(better[:, None], y, best_y)

        # Since Δy = -H g, the new term's u = Δy - H Δg = -H g_new: no separate H Δg is needed.
        Hg_new = _low_rank_update(gy, gy, VTs, Us, beta=-1.0)          # H g_new, before the update
        vT = _low_rank_update(Hg, Hg, Us, VTs, alpha=-1.0)             # Δyᵀ H = -(H g)ᵀ H
        v_g_new = torch.linalg.vecdot(vT, gy)[:, None]
        denom = v_g_new - torch.linalg.vecdot(vT, g_old)[:, None]      # Δyᵀ H Δg
        # A zero or non-finite denominator drops the sample's update instead of storing inf/NaN.
        usable = (denom != 0) & torch.isfinite(denom)
        scale = torch.where(usable, 1.0 / torch.where(usable, denom, torch.ones_like(denom)), torch.zeros_like(denom))
        slot = (nstep - 1) % memory
        evicting = filled == memory
        if evicting:  # the oldest term leaves H: its share of H g_new goes too
            Hg = Hg_new - U[:, slot] * torch.linalg.vecdot(VT[:, slot], gy)[:, None]
        torch.mul(Hg_new, -scale, out=U[:, slot])                      # u = -H g_new / (Δyᵀ H Δg)
        VT[:, slot] = vT
        if any_bad:  # non-finite iterates must not reach the stored terms
            U[:, slot].nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            VT[:, slot].nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        filled = min(filled + 1, memory)
        # H_new g_new = H g_new + u (vᵀ g_new), a per-sample multiple of H g_new unless a term left.
        if evicting or any_bad:
            Hg = (Hg if evicting else Hg_new) + U[:, slot] * torch.linalg.vecdot(VT[:, slot], gy)[:, None]
        else:
            Hg = Hg_new * (1.0 - scale * v_g_new)
        # A diverged sample restarts from its best iterate.
        if any_bad:
            y = torch.where(bad[:, None], best_y, y)
            gy = torch.where(bad[:, None], torch.zeros_like(gy), gy)
            Hg = torch.where(bad[:, None], torch.zeros_like(Hg), Hg)
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
