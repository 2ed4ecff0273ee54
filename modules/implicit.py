"""Implicit differentiation on the equilibrium state.

Given the simulated rate a ≈ a* = f_θ(a*) and one differentiable application
z = f_θ(·) at the state, the loss gradient with respect to θ is

    ∂L/∂θ = y · ∂f/∂θ,   where   y = v + y · J,   v = ∂L/∂a,   J = ∂f/∂a,

so the backward pass solves this adjoint equation for y and hands y to z's
graph in place of v. The vector-Jacobian products y·J are taken with respect to
the state only (`torch.autograd.grad(..., inputs=state)`), so no gradient
reaches the parameters during the solve.
"""
import torch


class ImplicitGradient(torch.autograd.Function):
    """Forward: the simulated rate. Backward: the adjoint solution y, sent through z.

    Arguments of `apply`: z (f applied at the state, with autograd), rate (the
    simulated rate, the output's value), f_point/point (f and the point at which
    J is taken: point is a leaf with requires_grad, f_point = f(point)), solve
    (a function of (func, y0, f0=None) returning (y, info)), y0_like_v (True: start the
    solve from v, as the damped iteration does; False: from zero), record (a
    function receiving the solver's info).
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
