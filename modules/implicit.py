"""Implicit differentiation on the equilibrium state.

Given the simulated rate a ≈ a* = f_θ(a*) and one differentiable application
z = f_θ(·) at the state, the loss gradient with respect to θ is

    ∂L/∂θ = y · ∂f/∂θ,   where   y = v + y · J,   v = ∂L/∂a,   J = ∂f/∂a,

so the backward pass solves this adjoint equation for y and hands y to z's
graph in place of v. The vector-Jacobian products y·J are taken with respect to
the state only (`torch.autograd.grad(..., inputs=state)`), so no gradient
reaches the parameters during the solve.

How y is found is the gradient mode (`GRADIENTS`), each a way to build an
`AdjointSolve` that the one backward pass below calls:

- 'ide': the exact implicit gradient, y = v (I - J)⁻¹ by a registered solver
  (`modules.solvers.SOLVERS`: 'broyden', 'anderson', 'iter');
- 'jfb': Jacobian-free backpropagation (Fung et al., AAAI 2022), y = v, i.e.
  ∂L/∂θ = v · ∂f/∂θ, the Neumann series of (I - J)⁻¹ cut after its first term;
- 'phantom': the phantom gradient of Geng et al., "On Training Implicit
  Models" (NeurIPS 2021), in one of its two forms (`PHANTOM_FORMS`), both K
  damped steps of size τ, M = (1 - τ) I + τ J:
  'neumann', their Neumann-series-based phantom gradient (NPG): K damped
  steps y ← (1 - τ) y + τ (v + y J) from y = 0, i.e. y_K = τ Σ_{j<K} v M^j,
  J frozen at one point, sent through the one z = f(·) like the exact
  gradient; 'unroll', their unrolling-based phantom gradient (UPG, TorchDEQ's
  phantom gradient): K damped steps z ← (1 - τ) z + τ f(z) from the state,
  differentiated by autograd (`FeedbackSNN._unrolled_phantom`), so every step
  has its own Jacobian and its own ∂f/∂θ. At an exact fixed point every
  iterate is the fixed point and the two coincide.
"""
from dataclasses import dataclass

import torch

from .solvers import SOLVERS, Solver, get_solver, phantom_steps


@dataclass(frozen=True)
class AdjointSolve:
    """How the backward pass finds y: a registered solver with its iteration cap, tolerance and options.

    Calling it as `(func, y0, f0=None)` runs `solver.solve` under the solver
    contract (`modules.solvers`); options are (name, value) pairs.
    """
    solver: Solver
    max_iter: int
    tol: float = None
    options: tuple = ()

    def __call__(self, func, y0, f0=None):
        return self.solver.solve(func, y0, max_iter=self.max_iter, tol=self.tol, f0=f0, **dict(self.options))

    @property
    def starts_from_v(self):
        """True when the solve starts from y0 = v, False when from y0 = 0 with f0 = v."""
        return self.solver.starts_from_v


def exact_gradient(solver, threshold, tol, solver_memory, phantom_k, phantom_tau):
    """'ide': y = v (I - J)⁻¹ by `solver`, at most `threshold` iterations (`solver_memory`: its memory)."""
    entry = get_solver(solver)
    options = ()
    if solver_memory is not None:
        if "memory" not in entry.options:
            with_memory = sorted(name for name, other in SOLVERS.items() if "memory" in other.options)
            raise ValueError(f"solver {solver!r} keeps no memory; solver_memory applies to {with_memory}")
        if solver_memory < 1:
            raise ValueError(f"solver_memory must be >= 1, got {solver_memory}")
        options = (("memory", solver_memory),)
    return AdjointSolve(entry, threshold, tol, options)


def jacobian_free_gradient(solver, threshold, tol, solver_memory, phantom_k, phantom_tau):
    """'jfb': y = v, the first phantom step with τ = 1 (one VJP measures its residual)."""
    return AdjointSolve(Solver(phantom_steps, options=("tau",)), 1, None, (("tau", 1.0),))


def phantom_gradient(solver, threshold, tol, solver_memory, phantom_k, phantom_tau):
    """'phantom': `phantom_k` damped steps of size `phantom_tau` from y = 0."""
    if phantom_k < 1:
        raise ValueError(f"phantom_k must be >= 1, got {phantom_k}")
    if not 0.0 < phantom_tau <= 1.0:
        raise ValueError(f"phantom_tau must be in (0, 1], got {phantom_tau}")
    return AdjointSolve(Solver(phantom_steps, options=("tau",)), phantom_k, None, (("tau", phantom_tau),))


GRADIENTS = {"ide": exact_gradient, "jfb": jacobian_free_gradient, "phantom": phantom_gradient}
PHANTOM_FORMS = ("neumann", "unroll")


def adjoint_solve(grad="ide", solver="broyden", threshold=30, tol=None, solver_memory=None,
                  phantom_k=5, phantom_tau=0.5, phantom_form="neumann"):
    """The AdjointSolve of gradient mode `grad` (see the module docstring and GRADIENTS).

    solver, threshold, tol and solver_memory configure 'ide'; phantom_k,
    phantom_tau and phantom_form configure 'phantom'. An option given to a
    mode that does not use it (solver_memory outside 'ide', the 'unroll' form
    outside 'phantom') is an error.
    """
    if grad not in GRADIENTS:
        raise ValueError(f"unknown gradient mode {grad!r}; choose one of {sorted(GRADIENTS)}")
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1, got {threshold}")
    get_solver(solver)  # an unknown solver name is an error in every mode
    if tol is not None and not 0.0 < tol < 1.0:
        # The solve stops once the residual is below tol × its first value: tol ≥ 1 stops before the first
        # iteration and leaves y = v (or 0), a gradient that is not the implicit one.
        raise ValueError(f"tol must be a fraction in (0, 1) or None, got {tol}")
    if grad != "ide" and solver_memory is not None:
        raise ValueError(f"solver_memory applies to grad='ide' only, not to grad={grad!r}")
    if phantom_form not in PHANTOM_FORMS:
        raise ValueError(f"unknown phantom form {phantom_form!r}; choose one of {list(PHANTOM_FORMS)}")
    if phantom_form != "neumann" and grad != "phantom":
        raise ValueError(f"phantom_form={phantom_form!r} applies to grad='phantom' only, not to grad={grad!r}")
    return GRADIENTS[grad](solver, threshold, tol, solver_memory, phantom_k, phantom_tau)



class ImplicitGradient(torch.autograd.Function):
    """Forward: the simulated rate. Backward: the adjoint solution y, sent through z.

    Arguments of `apply`: z (f applied at the state, with autograd), rate (the
    simulated rate, the output's value), f_point/point (f and the point at which
    J is taken: point is a leaf with requires_grad, f_point = f(point)), solve
    (an AdjointSolve, or any function of (func, y0, f0=None) returning (y, info)),
    start_from_v (True: start the solve from v, as the damped iteration does;
    False: from zero), record (a function receiving the solver's info, with
    `rel_residual` = residual / ‖v‖ added).
    """

    @staticmethod
    def forward(ctx, z, rate, f_point, point, solve, start_from_v, record):
        ctx.f_point, ctx.point = f_point, point
        ctx.solve, ctx.start_from_v, ctx.record = solve, start_from_v, record
        return rate.clone()

    @staticmethod
    def backward(ctx, v):
        f_point, point, shape = ctx.f_point, ctx.point, v.shape
        v_flat = v.reshape(shape[0], -1)

        def adjoint_map(y):  # y ↦ v + y·J, on (B, n)
            with torch.enable_grad():
                (yJ,) = torch.autograd.grad(f_point, point, y.reshape(shape), retain_graph=True)
            return v_flat + yJ.reshape(shape[0], -1)

        if ctx.start_from_v:
            y, info = ctx.solve(adjoint_map, v_flat)
        else:  # from y = 0, where the map's value v needs no vector-Jacobian product
            y, info = ctx.solve(adjoint_map, torch.zeros_like(v_flat), f0=v_flat)
        v_norm = float(v_flat.norm())
        info["rel_residual"] = info["residual"] / v_norm if v_norm > 0 else 0.0
        ctx.record(info)
        return y.reshape(shape), None, None, None, None, None, None


class ValueWithGradientOf(torch.autograd.Function):
    """Forward: `value` (a copy). Backward: the incoming gradient, sent to `carrier` (same shape) alone.

    The unrolled phantom gradient's output: the network's state stays the
    simulated rate, while its gradient is that of the unrolled z_K.
    """

    @staticmethod
    def forward(ctx, value, carrier):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, grad
