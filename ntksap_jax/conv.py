"""A drop-in ``lax.conv_general_dilated`` that is fast on XLA:CPU.

On CPU, float32 convolutions in the model zoo's layout run through oneDNN (the library PyTorch
uses on CPU) when the package's extension is built: ``_onednn.py`` defines them as three
bilinear JAX primitives (forward, backward-data, backward-weights) lowered to an XLA FFI
custom call, with forward mode, reverse mode and ``vmap`` rules. ``NTKSAP_JAX_ONEDNN=0``
turns it off; without the extension a warning says so once and the path below is used.
Other dtypes (float64 oracles), other layouts and other backends (cuDNN, TPU) never take it.

float64 convolutions are XLA's own (``lax.conv_general_dilated``, derivatives and all): float64 is
the dtype of oracles and validation, small batches that run a few times, where the time to
compile is the cost. The per-tap weight tangent below is 9 matmuls, pads and slices per 3x3
convolution where XLA's is one op: on 2 cores a float64 ResNet-20 NTK-SAP scorer (2 samples of
12 inputs) compiled and ran its first call in 12.5 s against 19.9 s through the taps, and ran
later calls in 1.86 s against 1.41 s (``benchmarks/conv_float64.py``), so the taps pay off only
after about 16 calls; an eager float64 ``jax.jacobian`` oracle dispatches far fewer ops.

Without oneDNN:

XLA:CPU lowers the forward convolution and the input gradient to Eigen's spatial
convolution (fast), but the *weight* gradient, a convolution whose "kernel" is the
whole output map, falls off that path: on 2 cores, for a 3x3 conv of
``(100, 32, 32, 16) -> 16`` channels it took 170-245 ms against 6 ms for the forward
pass, and 7.5 s against 0.77 s for ``(256, 32, 32, 64) -> 64`` (a VGG layer). NTK-SAP
scores are weight(-mask) gradients, so this one operation was most of the pruning time.

:func:`conv_general_dilated` computes the same convolution. Its forward pass and input
gradient are ``lax.conv_general_dilated``'s; it differs only in how the *weight
tangent* ``conv(x, dw)`` is written: on CPU as a sum over the ``kh·kw`` kernel taps of
``x @ dw[i, j]`` shifted by the tap's offset (one matmul per tap), whose transpose, the
weight gradient, is ``kh·kw`` matmuls ``xᵀ @ shifted_g``; on other backends (cuDNN, TPU) as
``lax.conv_general_dilated`` itself. The choice is made when the computation is lowered
(``lax.platform_dependent``), so one jitted function is right on every backend.

It is a ``jax.custom_jvp`` function: forward mode (``jax.jvp``, the NTK's jvp-based
implementations), reverse mode and their compositions all work. Results agree with
``lax.conv_general_dilated`` to floating-point rounding (the sums are reassociated).

Only the layouts the model zoo uses take the fast path: 2-D ``NHWC``/``HWIO``/``NHWC``
with no dilation, one feature group and one batch group; every other call is passed to
``lax.conv_general_dilated`` unchanged.

Use it in your own Flax models with ``nn.Conv(..., conv_general_dilated=conv_general_dilated)``
(all ``ntksap_jax.models`` do).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from ntksap_jax import _onednn

__all__ = ["conv_general_dilated"]

_NHWC = ("NHWC", "HWIO", "NHWC")


def _explicit_padding(padding, in_hw: Sequence[int], kernel_hw: Sequence[int], strides: Sequence[int]):
    if isinstance(padding, str):
        return tuple(tuple(p) for p in lax.padtype_to_pads(tuple(in_hw), tuple(kernel_hw), tuple(strides), padding))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _is_nhwc(dimension_numbers) -> bool:
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return tuple(dimension_numbers) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    return tuple(dimension_numbers) == _NHWC


def _trivial(dilation) -> bool:
    return dilation is None or all(int(d) == 1 for d in dilation)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """``lax.conv_general_dilated`` with a fast weight gradient on CPU (same signature).

    Args:
      lhs: input, ``(N, H, W, C)`` for the fast path.
      rhs: kernel, ``(kh, kw, C, O)`` (HWIO) for the fast path.
      window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, batch_group_count, precision, preferred_element_type:
        as ``lax.conv_general_dilated``.

    Returns:
      ``(N, H', W', O)``, equal to ``lax.conv_general_dilated(...)`` (bit-identical in the
      forward pass; derivatives agree to rounding; in float64 it is ``lax``'s, derivatives too).

    Example::

      y = conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
      layer = nn.Conv(16, (3, 3), conv_general_dilated=conv_general_dilated)
    """
    return _dispatch(True, lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                     feature_group_count, batch_group_count, precision, preferred_element_type)


def _dispatch(routes: bool, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
              dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
              preferred_element_type=None):
    """``conv_general_dilated``'s choice of implementation. ``routes=False`` skips the float64 and
    oneDNN routes, so the model zoo's layouts always take the custom-jvp convolution ``_conv``
    (its per-tap weight tangent on CPU) whatever the dtype: ``_taps_conv_general_dilated``."""
    fast = (
        jnp.ndim(lhs) == 4
        and jnp.ndim(rhs) == 4
        and _is_nhwc(dimension_numbers)
        and _trivial(lhs_dilation)
        and _trivial(rhs_dilation)
        and feature_group_count == 1
        and batch_group_count == 1
        and preferred_element_type is None
    )
    if not fast or (routes and _is_float64(lhs, rhs)):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
            batch_group_count=batch_group_count, precision=precision, preferred_element_type=preferred_element_type,
        )
    strides = tuple(int(s) for s in window_strides)
    pads = _explicit_padding(padding, lhs.shape[1:3], rhs.shape[:2], strides)
    if routes and _onednn_applies(lhs, rhs, strides, pads):
        return _onednn.conv(lhs, rhs, strides, pads)
    return _conv(lhs, rhs, strides, pads, precision)


#: ``conv_general_dilated`` without its float64 and oneDNN routes: the per-tap path in every dtype,
#: for tests that check it against ``lax`` in float64 (same signature).
_taps_conv_general_dilated = functools.partial(_dispatch, False)


def _is_float64(lhs, rhs) -> bool:
    """float64 convolutions are XLA's own on every backend (see the module docstring)."""
    return jnp.result_type(lhs, rhs) == jnp.float64


def _onednn_applies(lhs, rhs, strides, pads) -> bool:
    """oneDNN takes float32 NHWC convolutions with non-negative padding when JAX runs on one CPU device,
    except the padded strided 1x1 ones ``_onednn.conv`` refuses (oneDNN 2.6's strided 1x1 bug).

    Several CPU devices (``--xla_force_host_platform_device_count``, meshes of host devices) keep
    XLA's convolution: XLA's SPMD partitioner can split it across the mesh, not a custom call.
    """
    return (
        jnp.result_type(lhs) == jnp.float32
        and jnp.result_type(rhs) == jnp.float32
        and all(p >= 0 for pair in pads for p in pair)
        and not _onednn.refuses(rhs.shape, strides, pads)
        and jax.default_backend() == "cpu"
        and jax.device_count() == 1
        and _onednn.available()
    )


def _lax_conv(x, w, strides, pads, precision):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC, precision=precision)


def _weight_tangent_taps(x, dw, strides, pads, precision, out_hw):
    """``conv(x, dw)`` as a sum over kernel taps of ``(x_pad @ dw[i, j])`` shifted by ``(i, j)``.

    The shift (a strided slice) acts on each matmul's *output*, so the function's only
    non-linear input is ``x_pad``: reverse mode keeps ``x_pad`` and, in the transpose, pads
    the cotangent into place for each tap (``dw[i, j] = x_padᵀ @ shifted g``). Slicing ``x``
    instead (im2col) made XLA keep ``kh·kw`` shifted copies of every activation for the
    backward pass: 1.39 GB of temporaries for one ResNet-20 weight sample of 100 inputs
    against 0.50 GB this way (``compiled.memory_analysis()``), at the same speed.
    """
    kh, kw, c, o = dw.shape
    n = x.shape[0]
    (ho, wo), (sh, sw) = out_hw, strides
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
    # Strided convolutions: tap (i, j) only reads the input phase (i mod sh, j mod sw), so each
    # matmul runs on that phase (1/(sh·sw) of the grid), at offset (i // sh, j // sw).
    phases = {}
    out = None
    for i in range(kh):
        for j in range(kw):
            a, b = i % sh, j % sw
            if (a, b) not in phases:
                phase = xp[:, a::sh, b::sw, :]
                phases[a, b] = (phase.reshape(-1, c), phase.shape[1:3])
            flat, (hq, wq) = phases[a, b]
            z = jnp.dot(flat, dw[i, j], precision=precision).reshape(n, hq, wq, o)
            term = lax.slice(z, (0, i // sh, j // sw, 0), (n, i // sh + ho, j // sw + wo, o))
            out = term if out is None else out + term
    return out


def _weight_tangent(x, dw, strides, pads, precision, out_hw):
    return lax.platform_dependent(
        x, dw,
        cpu=lambda a, b: _weight_tangent_taps(a, b, strides, pads, precision, out_hw),
        default=lambda a, b: _lax_conv(a, b, strides, pads, precision),
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, pads, precision):
    return _lax_conv(x, w, strides, pads, precision)


@functools.partial(_conv.defjvp, symbolic_zeros=True)
def _conv_jvp(strides, pads, precision, primals, tangents):
    x, w = primals
    dx, dw = tangents
    y = _conv(x, w, strides, pads, precision)
    out = None
    if not isinstance(dx, SymbolicZero):
        out = _lax_conv(dx, w, strides, pads, precision)
    if not isinstance(dw, SymbolicZero):
        term = _weight_tangent(x, dw, strides, pads, precision, y.shape[1:3])
        out = term if out is None else out + term
    if out is None:
        out = jnp.zeros_like(y)
    return y, out
