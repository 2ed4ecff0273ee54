"""Float32 precision on GPUs: where TensorFloat-32 (TF32) may replace full float32 products.

On Ampere and later GPUs cuDNN convolutions run in TF32 (a 10-bit mantissa) by
default, and matrix products do when asked. The network follows one policy:

- the simulation and f (forward) use TF32 only when `allow_tf32(True)` was
  called (the training scripts' `--tf32`); otherwise full float32;
- the vector–Jacobian products of f in the adjoint solve always run in full
  float32: at TF32 they stall the residual near 1e-5 of v, far above where the
  solve stops in float32, so it runs every iteration.

`allow_tf32` also sets PyTorch's global flags, so that everything else a
training step runs (the classifier, the parameter gradient) follows the same
choice. The flags only affect CUDA devices; on a CPU they are inert.
"""
import contextlib

import torch

_tf32_allowed = False


def _new_api():
    """True where PyTorch has the per-backend `fp32_precision` settings (2.9 and later)."""
    return hasattr(torch.backends.cuda.matmul, "fp32_precision")


def _backends():
    """The (object, attribute) pairs that decide TF32 for matrix products and cuDNN convolutions."""
    if _new_api():
        # Mixing these with the older allow_tf32 flags makes PyTorch refuse to read the older ones.
        return [(torch.backends.cuda.matmul, "fp32_precision"), (torch.backends.cudnn.conv, "fp32_precision"),
                (torch.backends.cudnn.rnn, "fp32_precision")]
    return [(torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32")]


def tf32_flags():
    """The current TF32 settings, one value per entry of `_backends()` (for saving and restoring)."""
    return [getattr(owner, name) for owner, name in _backends()]


def set_tf32_flags(values):
    """Restore settings returned by `tf32_flags()`."""
    for (owner, name), value in zip(_backends(), values):
        setattr(owner, name, value)


def _flags_for(enabled):
    """The settings that allow (enabled) or forbid TF32 everywhere."""
    if _new_api():
        return ["tf32" if enabled else "ieee"] * len(_backends())
    return [bool(enabled)] * len(_backends())


def allow_tf32(enabled):
    """Let the simulation and f use TF32 (enabled) or keep them in full float32; sets PyTorch's flags too."""
    global _tf32_allowed
    _tf32_allowed = bool(enabled)
    set_tf32_flags(_flags_for(enabled))


def tf32_allowed():
    """Whether `allow_tf32(True)` is in force (default False: full float32)."""
    return _tf32_allowed


@contextlib.contextmanager
def tf32(enabled):
    """Run the block with TF32 allowed or forbidden for matrix products and cuDNN; restore the flags after."""
    saved = tf32_flags()
    set_tf32_flags(_flags_for(enabled))
    try:
        yield
    finally:
        set_tf32_flags(saved)


def forward_precision():
    """The precision context of the simulation and of f: TF32 only where `allow_tf32(True)` said so."""
    return tf32(_tf32_allowed)


def full_float32():
    """The precision context of the adjoint solve's vector–Jacobian products: never TF32."""
    return tf32(False)


def full_float32_vjp(point, f_point):
    """f_point = f(point) (a leaf point, with f's graph) as a tensor whose VJPs in point run in full float32."""
    # f_point travels inside a tuple so that autograd links the output to point alone.
    return _FullFloat32VJP.apply(point, (f_point,))


class _FullFloat32VJP(torch.autograd.Function):
    """Identity on f(point); its backward differentiates f's graph inside `full_float32()`.

    Each vector–Jacobian product of the adjoint solve is then exact float32
    whatever the TF32 flags around the solve are.
    """

    @staticmethod
    def forward(ctx, point, boxed_f_point):
        ctx.point, (ctx.f_point,) = point, boxed_f_point
        return ctx.f_point.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        with torch.enable_grad(), full_float32():
            (vjp,) = torch.autograd.grad(ctx.f_point, ctx.point, grad, retain_graph=True)
        return vjp, None
