"""Norms of linear operators and of the Jacobian J = ∂f/∂a, measured through their products alone.

Everything here works on an autograd graph `output = func(point)`, `point` a
tensor that requires grad, and never forms a matrix:

- the vector–Jacobian product uᵀJ is one `torch.autograd.grad`;
- the Jacobian–vector product J v is the derivative of the linear map
  u ↦ uᵀJ in u (the double-VJP trick), so the graph the adjoint solve uses is
  all that is needed, whatever operators it holds (conv, transposed conv, BN
  with batch statistics, clamp);
- the spectral norm ‖J‖₂ is found by Lanczos bidiagonalisation on these
  products (`spectral_norm`);
- ‖J‖_F² is estimated by Hutchinson's estimator ‖εᵀJ‖², ε ~ N(0, I), unbiased
  since E[εεᵀ] = I, and differentiable with respect to the parameters (the
  Jacobian regulariser of Bai, Koltun & Kolter, ICML 2021).

Every function leaves the graph intact (retain_graph) for the backward pass.
"""
import math

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, svds

LANCZOS_VECTORS = 20  # Lanczos basis size (ARPACK's ncv, scipy's default for k = 1)


def vjp(output, point, u, create_graph=False):
    """uᵀJ for J = ∂output/∂point, shaped like point."""
    (uJ,) = torch.autograd.grad(output, point, u, retain_graph=True, create_graph=create_graph)
    return uJ


def jvp(output, point, v):
    """J v for J = ∂output/∂point, shaped like output, by differentiating u ↦ uᵀJ in u."""
    with torch.enable_grad():
        u = torch.zeros_like(output, requires_grad=True)
        uJ = vjp(output, point, u, create_graph=True)
        (Jv,) = torch.autograd.grad(uJ, u, v, retain_graph=True)
    return Jv


def spectral_norm(forward, adjoint, in_shape, out_shape, tol=1e-5, like=None):
    """‖A‖₂ of a linear map given by its products A v = forward(v) and Aᵀu = adjoint(u), in float64.

    Lanczos bidiagonalisation (ARPACK, through scipy's svds) on the products
    alone: it reaches a relative accuracy `tol` in a few tens of products
    where power iteration needs hundreds when the top singular values are
    close (as they are for a conv or a normalised random matrix). Operators
    with at most LANCZOS_VECTORS inputs or outputs are formed densely.
    The start vector comes from a fixed seed: nothing is drawn from the global
    random streams, and a measurement repeats exactly. `like`: a tensor whose
    dtype and device the products take.
    """
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    dtype, device = (like.dtype, like.device) if like is not None else (torch.float32, None)

    def product(fn, shape):
        def apply(vector):
            v = torch.as_tensor(np.asarray(vector, dtype=np.float64).ravel()).to(dtype=dtype, device=device)
            return fn(v.reshape(shape)).detach().reshape(-1).to(device='cpu', dtype=torch.float64).numpy()
        return apply

    matvec, rmatvec = product(forward, in_shape), product(adjoint, out_shape)
    # ‖A‖₂ = ‖Aᵀ‖₂: work on the side with fewer entries, as ARPACK does.
    apply, size = (matvec, n_in) if n_in <= n_out else (rmatvec, n_out)
    if size <= LANCZOS_VECTORS:
        return float(np.linalg.norm(np.stack([apply(column) for column in np.eye(size)], axis=1), 2))
    start = np.random.default_rng(0).standard_normal(size)
    if not np.any(apply(start)):
        return 0.0  # A x = 0 for a random x: A = 0 (a silent Jacobian), where Lanczos would break down
    operator = LinearOperator((n_out, n_in), matvec=matvec, rmatvec=rmatvec, dtype=np.float64)
    (sigma,) = svds(operator, k=1, ncv=LANCZOS_VECTORS, tol=tol, v0=start, return_singular_vectors=False)
    return float(sigma)


def jacobian_norm(output, point, tol=1e-5):
    """‖J‖₂ for J = ∂output/∂point, over the whole tensor (batch included); see `spectral_norm`."""
    return spectral_norm(lambda v: jvp(output, point, v), lambda u: vjp(output, point, u), point.shape,
                         output.shape, tol, like=point)


def operator_norm(linear_map, shape, tol=1e-5, dtype=torch.float32, device=None):
    """‖A‖₂ of a linear map A (an fc, conv or transposed conv, any linear function) on inputs of `shape`.

    For a linear map J = A at every point, so this is `jacobian_norm` at zero.
    For a conv it is the norm of the convolution operator on that input size,
    padding included, not of its kernel reshaped to a matrix.
    """
    with torch.enable_grad():
        point = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
        return jacobian_norm(linear_map(point), point, tol)


def hutchinson_frobenius(output, point, generator=None):
    """‖εᵀJ‖² with one ε ~ N(0, I): an unbiased estimate of ‖J‖_F², differentiable in J's parameters."""
    epsilon = torch.randn(output.shape, generator=generator, dtype=output.dtype, device=output.device)
    return vjp(output, point, epsilon, create_graph=True).pow(2).sum()
