"""Batched fixed-point solvers for the adjoint equation y = v + y·J.

Contract shared by every solver: `solve(func, y0, max_iter, tol) -> (y, info)`
finds a fixed point y = func(y) of a batched map on (B, n) tensors. `info`
holds `nstep` (iterations taken), `residual` (‖func(y) - y‖ of the returned
iterate over the whole batch), `init_residual` (the same at y0) and `trace`
(the residual after each iteration).

`tol=None` keeps the paper's stopping rule: run `max_iter` iterations unless the
whole-batch residual falls below 2e-10·sqrt(numel), i.e. practically never stop
early. A float `tol` stops as soon as the residual has fallen below `tol` times
its initial value (an option that saves iterations on easy batches).
"""
import math

import torch


def _norms(r):
    """Per-sample L2 norms of a (B, n) tensor; non-finite rows become +inf."""
    norms = r.norm(dim=1)
    return torch.where(torch.isfinite(norms), norms, torch.full_like(norms, math.inf))


def _stop_level(init_residual, numel, tol):
    """Whole-batch residual under which a solver stops."""
    if tol is None:
        return 2e-10 * math.sqrt(numel)
    return tol * init_residual


def _info(nstep, trace):
    """The info dict every solver returns."""
    return {"nstep": nstep, "residual": trace[-1], "init_residual": trace[0], "trace": trace}


def broyden(func, y0, max_iter=30, tol=None, memory=27):
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
    U = y0.new_zeros(B, n, memory)   # columns u_k
    VT = y0.new_zeros(B, memory, n)  # rows v_kᵀ

    def apply_H(x):    # H x = -x + U (Vᵀ x),  x: (B, n)
        return -x + torch.einsum("bnm,bm->bn", U, torch.einsum("bmn,bn->bm", VT, x))

    def apply_HT(x):   # xᵀ H = -xᵀ + (xᵀ U) Vᵀ
        return -x + torch.einsum("bm,bmn->bn", torch.einsum("bn,bnm->bm", x, U), VT)

    y = y0
    gy = func(y) - y
    sample_res = _norms(gy)
    best_y, best_res = y.clone(), sample_res.clone()
    residual = float(gy.norm())
    stop = _stop_level(residual, gy.numel(), tol)
    trace = [residual]
    nstep = 0
    while nstep < max_iter and not residual < stop:
        step = -apply_H(gy)
        y_new = y + step
        g_new = func(y_new) - y_new
        dy, dg = y_new - y, g_new - gy
        y, gy = y_new, g_new
        nstep += 1

        sample_res = _norms(gy)
        better = sample_res < best_res
        best_y = torch.where(better[:, None], y, best_y)
        best_res = torch.where(better, sample_res, best_res)
        residual = float(best_res.norm()) if torch.isfinite(best_res).all() else math.inf
        trace.append(residual)

        vT = apply_HT(dy)                                  # Δyᵀ H
        denom = torch.einsum("bn,bn->b", vT, dg)[:, None]  # Δyᵀ H Δg
        u = (dy - apply_H(dg)) / denom
        slot = (nstep - 1) % memory
        U[:, :, slot] = torch.nan_to_num(u, nan=0.0, posinf=0.0, neginf=0.0)
        VT[:, slot] = torch.nan_to_num(vT, nan=0.0, posinf=0.0, neginf=0.0)
        # A diverged sample restarts from its best iterate.
        bad = ~torch.isfinite(gy).all(dim=1)
        if bad.any():
            y = torch.where(bad[:, None], best_y, y)
            gy = torch.where(bad[:, None], torch.zeros_like(gy), gy)
    return best_y, _info(nstep, trace)


def fixed_point_iter(func, y0, max_iter=30, tol=None):
    """Damped fixed-point iteration y ← y + ½·(func(y) - y); returns the last iterate.

    With r(y) = func(y) - y the residual of y = v + y·J, the fixed point of this
    update is the solution itself. (The paper's release damped with
    y ← (y + r(y))/2, whose fixed point is v(2I - J)⁻¹ instead of v(I - J)⁻¹.)
    """
    y = y0
    r = func(y) - y
    residual = float(r.norm())
    stop = _stop_level(residual, r.numel(), tol)
    trace = [residual]
    nstep = 0
    while nstep < max_iter and not residual < stop:
        y = y + 0.5 * r
        nstep += 1
        r = func(y) - y
        residual = float(r.norm()) if torch.isfinite(r).all() else math.inf
        trace.append(residual)
    return y, _info(nstep, trace)


SOLVERS = {"broyden": broyden, "iter": fixed_point_iter}


def get_solver(name):
    """The solver registered under `name` (see SOLVERS)."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}") from None
