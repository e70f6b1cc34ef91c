"""A convolution whose gradients stay fast inside XLA CPU loops.

Every training update here runs inside ``lax.scan`` loops (epochs, minibatches, updates per chunk). On
the CPU backend, XLA lowers the two backward convolutions of a plain ``lax.conv_general_dilated``
(input gradient: a transposed convolution; kernel gradient: batch and space contracted) to far slower
code inside a loop body than outside one, while the forward convolution stays fast. Measured on a
2-core Xeon by ``benchmarks/conv_grad_loop.py`` (docs/results.md, "Convolution gradients inside a loop
on the CPU"): four gradient steps in a ``lax.scan`` run about 34x faster with this module's gradients
for one 5x5 layer, and about 13x faster for the PPO family's pixel actor-critic, within 20% of the
unrolled loop there.

``loop_friendly_conv`` keeps the forward convolution and writes both gradients as forward
convolutions, the form XLA CPU runs fast in loops:

- input gradient: the output gradient convolved with the spatially flipped, in/out-swapped kernel;
- kernel gradient: the zero-padded input convolved with the output gradient, with the batch axis as
  the contracted feature axis and the input channels as the batch (the output gradient is the kernel).

Both are the same sums JAX computes, term for term (tests/test_conv.py compares values and
gradients). The custom form covers stride 1, no dilation, one feature group, SAME padding and odd
kernel sizes (every convolution of the policy torsos); anything else goes to ``lax.conv_general_dilated``
as is. It is used on the CPU backend only: on GPUs the library convolutions are fast in loops.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_function(choice: str = "auto"):
    """The ``conv_general_dilated`` for flax's ``nn.Conv`` (None: flax's default, JAX's own gradients).

    ``"auto"``: loop-friendly on the CPU backend, JAX's own elsewhere; ``"lax"`` or ``"loop_friendly"``
    force one.
    """
    if choice not in ("auto", "lax", "loop_friendly"):
        raise ValueError(f"conv must be auto, lax or loop_friendly, not {choice!r}")
    if choice == "auto":
        choice = "loop_friendly" if jax.default_backend() == "cpu" else "lax"
    return loop_friendly_conv if choice == "loop_friendly" else None


def loop_friendly_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                       dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``lax.conv_general_dilated``'s signature; the loop-friendly gradients where they apply."""
    if _covered(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                feature_group_count, kwargs):
        return _conv_same(lhs, rhs, precision)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, precision=precision, **kwargs)


def _covered(lhs, rhs, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, groups, kwargs):
    spatial = lhs.ndim - 2
    if spatial != 2 or kwargs or groups != 1 or padding != "SAME":
        return False
    if any(s != 1 for s in strides) or any(d != 1 for d in (lhs_dilation or ())) or any(
            d != 1 for d in (rhs_dilation or ())):
        return False
    if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != lax.conv_dimension_numbers(
            lhs.shape, rhs.shape, _NHWC):
        return False
    return rhs.shape[0] % 2 == 1 and rhs.shape[1] % 2 == 1


def _conv(lhs, rhs, padding, precision):
    return lax.conv_general_dilated(lhs, rhs, (1, 1), padding, dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_same(x, kernel, precision):
    return _conv(x, kernel, "SAME", precision)


def _conv_same_forward(x, kernel, precision):
    return _conv(x, kernel, "SAME", precision), (x, kernel)


def _conv_same_backward(precision, residuals, grad_out):
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    grad_x = _conv(grad_out, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), "SAME", precision)
    padded = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    # [C_in, H+kh-1, W+kw-1, N] convolved VALID with [H, W, N, C_out] -> [C_in, kh, kw, C_out]
    grad_kernel = _conv(padded.transpose(3, 1, 2, 0), grad_out.transpose(1, 2, 0, 3), "VALID", precision)
    return grad_x, grad_kernel.transpose(1, 2, 0, 3).astype(kernel.dtype)


_conv_same.defvjp(_conv_same_forward, _conv_same_backward)
