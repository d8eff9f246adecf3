"""oneDNN convolutions for XLA:CPU: three JAX primitives lowered to an XLA FFI custom call.

XLA:CPU's own convolutions (Eigen) run at 40-70 GFLOP/s on the project's 2-core machine where
PyTorch's oneDNN runs near 115. The package's build compiles ``csrc/onednn_conv.cc`` against
oneDNN (Debian's ``libdnnl-dev``) and XLA's FFI headers into ``ntksap_jax/_onednn_conv*.so``;
this module loads it, registers its three handlers for the CPU platform and defines

* ``conv_fwd(x, w)``: ``x`` ``(N, H, W, C)`` float32, ``w`` ``(kh, kw, C, O)`` -> ``(N, H', W', O)``,
* ``conv_bwd_data(g, w)``: the transpose of ``conv_fwd`` in ``x`` (shape ``lhs_shape``),
* ``conv_bwd_weights(x, g)``: the transpose of ``conv_fwd`` in ``w`` (shape ``rhs_shape``),

each bilinear, so one rule set gives every transformation: forward mode (``jvp(p)(a, b) =
p(da, b) + p(a, db)``), reverse mode (each primitive's transposes are the other two, or itself),
and so any composition (the NTK-SAP jvp estimator's mask gradient, vjp-of-jvp NTK products);
``vmap`` folds a mapped activation into the batch axis and maps anything else with ``lax.map``.
On platforms other than CPU the primitives lower to ``lax.conv_general_dilated`` and its
transposes, so a function traced with them still runs on GPU and TPU.

The library is optional: :func:`available` is ``False`` when it was not built (no compiler, no
oneDNN headers at install time) or when ``NTKSAP_JAX_ONEDNN=0``; then ``conv.py`` keeps XLA's
path and a :class:`OneDnnUnavailableWarning` says so once per process.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
import warnings
from pathlib import Path

import jax
import numpy as np
from jax import lax
from jax.core import ShapedArray
from jax.interpreters import ad, batching, mlir

try:  # jax >= 0.4.36
    from jax.extend.core import Primitive
except ImportError:  # pragma: no cover - older jax
    from jax.core import Primitive

__all__ = ["available", "conv", "OneDnnUnavailableWarning", "ENV_VAR"]

ENV_VAR = "NTKSAP_JAX_ONEDNN"
_NHWC = ("NHWC", "HWIO", "NHWC")
_TARGETS = ("ntksap_onednn_conv_fwd", "ntksap_onednn_conv_bwd_data", "ntksap_onednn_conv_bwd_weights")


class OneDnnUnavailableWarning(UserWarning):
    """The oneDNN convolution library is not built: XLA's (slower) CPU convolutions are used."""


class _State:
    """What loading found, once per process (the FFI registry it fills is process-wide too)."""

    loaded: bool | None = None
    reason: str = ""
    warned: bool = False


def library_path() -> Path | None:
    """The built ``_onednn_conv`` library beside this module, or ``None``."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_onednn_conv{suffix}"
        if path.exists():
            return path
    return None


def _load() -> bool:
    if _State.loaded is not None:
        return _State.loaded
    _State.loaded = False
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        _State.reason = f"{ENV_VAR}={os.environ[ENV_VAR]} turns it off"
        return False
    path = library_path()
    if path is None:
        _State.reason = ("the extension was not built (install oneDNN's headers, e.g. `apt-get install "
                         "libdnnl-dev`, and a C++ compiler, then reinstall the package)")
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(path))
        for target in _TARGETS:
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)), platform="cpu")
    except (OSError, AttributeError) as err:
        _State.reason = f"{path.name} did not load: {err}"
        return False
    for prim, target in zip(_PRIMITIVES, _TARGETS):
        mlir.register_lowering(prim, _cpu_lowering(target), platform="cpu")
    _State.loaded = True
    return True


def available() -> bool:
    """Whether convolutions on CPU run through oneDNN in this process.

    Example::

      from ntksap_jax import _onednn
      _onednn.available()  # True after an install that found libdnnl-dev
    """
    ok = _load()
    if not ok and not _State.warned and not _State.reason.startswith(ENV_VAR):
        _State.warned = True
        warnings.warn(f"ntksap_jax: oneDNN convolutions are unavailable ({_State.reason}); CPU convolutions "
                      "run on XLA's slower path.", OneDnnUnavailableWarning, stacklevel=3)
    return ok


def conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: tuple[tuple[int, int], tuple[int, int]]):
    """``lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))``.

    ``x`` ``(N, H, W, C)`` and ``w`` ``(kh, kw, C, O)``, both float32; explicit non-negative ``pads``
    ``((top, bottom), (left, right))``. Call only when :func:`available` is ``True``.

    A strided 1x1 convolution runs as a unit-stride one on every stride-th pixel: oneDNN 2.6's own
    strided 1x1 path ("reduce to unit stride") corrupted the heap in its weight gradient for one
    image of under 16 channels, so no caller may reach it. Padded strided 1x1 convolutions are refused
    (``conv.py`` keeps those on XLA's path).
    """
    strides, pads = tuple(int(s) for s in strides), tuple(tuple(int(p) for p in pair) for pair in pads)
    if refuses(w.shape, strides, pads):
        raise ValueError(f"oneDNN convolutions take no padded strided 1x1 kernels; got strides {strides}, "
                         f"pads {pads}")
    if w.shape[:2] == (1, 1) and strides != (1, 1):
        x, strides = x[:, ::strides[0], ::strides[1], :], (1, 1)
    return conv_fwd_p.bind(x, w, strides=strides, pads=pads)


def refuses(kernel_shape, strides, pads) -> bool:
    """True for the convolutions :func:`conv` refuses: padded strided 1x1 kernels (see there)."""
    return tuple(kernel_shape[:2]) == (1, 1) and tuple(strides) != (1, 1) and any(p for pair in pads for p in pair)


# --- primitives -------------------------------------------------------------------------------

conv_fwd_p = Primitive("ntksap_onednn_conv_fwd")
conv_bwd_data_p = Primitive("ntksap_onednn_conv_bwd_data")
conv_bwd_weights_p = Primitive("ntksap_onednn_conv_bwd_weights")
_PRIMITIVES = (conv_fwd_p, conv_bwd_data_p, conv_bwd_weights_p)


def _out_shape(lhs_shape, rhs_shape, strides, pads):
    n, h, w, _ = lhs_shape
    kh, kw, _, o = rhs_shape
    oh = (h + pads[0][0] + pads[0][1] - kh) // strides[0] + 1
    ow = (w + pads[1][0] + pads[1][1] - kw) // strides[1] + 1
    return (n, oh, ow, o)


def _ref_fwd(x, w, *, strides, pads):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC)


def _ref_bwd_data(g, w, *, strides, pads, lhs_shape):
    x = jax.ShapeDtypeStruct(lhs_shape, g.dtype)
    return jax.linear_transpose(lambda x_: _ref_fwd(x_, w, strides=strides, pads=pads), x)(g)[0]


def _ref_bwd_weights(x, g, *, strides, pads, rhs_shape):
    w = jax.ShapeDtypeStruct(rhs_shape, g.dtype)
    return jax.linear_transpose(lambda w_: _ref_fwd(x, w_, strides=strides, pads=pads), w)(g)[0]


conv_fwd_p.def_abstract_eval(
    lambda x, w, *, strides, pads: ShapedArray(_out_shape(x.shape, w.shape, strides, pads), x.dtype))
conv_bwd_data_p.def_abstract_eval(lambda g, w, *, strides, pads, lhs_shape: ShapedArray(lhs_shape, g.dtype))
conv_bwd_weights_p.def_abstract_eval(lambda x, g, *, strides, pads, rhs_shape: ShapedArray(rhs_shape, g.dtype))

for _prim, _ref in zip(_PRIMITIVES, (_ref_fwd, _ref_bwd_data, _ref_bwd_weights)):
    # Eagerly: the same compiled custom call as under jit. Elsewhere than CPU: XLA's convolution.
    _prim.def_impl(jax.jit(_prim.bind, static_argnames=("strides", "pads", "lhs_shape", "rhs_shape")))
    mlir.register_lowering(_prim, mlir.lower_fun(_ref, multiple_results=False))


def _cpu_lowering(target: str):
    rule = jax.ffi.ffi_lowering(target)

    def lower(ctx, a, b, *, strides, pads, **_shapes):
        (pt, pb), (pl, pr) = pads
        return rule(ctx, a, b, sh=np.int64(strides[0]), sw=np.int64(strides[1]), pt=np.int64(pt),
                    pb=np.int64(pb), pl=np.int64(pl), pr=np.int64(pr))

    return lower


# --- differentiation: every primitive is bilinear, its transposes are the other two ----------

ad.defbilinear(
    conv_fwd_p,
    lambda ct, x, w, *, strides, pads: conv_bwd_data_p.bind(ct, w, strides=strides, pads=pads,
                                                            lhs_shape=x.aval.shape),
    lambda ct, x, w, *, strides, pads: conv_bwd_weights_p.bind(x, ct, strides=strides, pads=pads,
                                                               rhs_shape=w.aval.shape),
)
ad.defbilinear(
    conv_bwd_data_p,
    lambda ct, g, w, *, strides, pads, lhs_shape: conv_fwd_p.bind(ct, w, strides=strides, pads=pads),
    lambda ct, g, w, *, strides, pads, lhs_shape: conv_bwd_weights_p.bind(ct, g, strides=strides, pads=pads,
                                                                          rhs_shape=w.aval.shape),
)
ad.defbilinear(
    conv_bwd_weights_p,
    lambda ct, x, g, *, strides, pads, rhs_shape: conv_bwd_data_p.bind(g, ct, strides=strides, pads=pads,
                                                                       lhs_shape=x.aval.shape),
    lambda ct, x, g, *, strides, pads, rhs_shape: conv_fwd_p.bind(x, ct, strides=strides, pads=pads),
)


# --- vmap ------------------------------------------------------------------------------------

def _at_front(a, bdim, size):
    if bdim is None:
        return jax.numpy.broadcast_to(a, (size, *a.shape))
    return jax.numpy.moveaxis(a, bdim, 0)


def _batch_rule(prim, activation_arg: int | None):
    """Fold a mapped activation (only it mapped) into the batch axis; ``lax.map`` otherwise."""

    def rule(args, dims, **params):
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        if activation_arg is not None and all((d is None) == (i != activation_arg) for i, d in enumerate(dims)):
            a = _at_front(args[activation_arg], dims[activation_arg], size)
            merged = list(args)
            merged[activation_arg] = a.reshape(size * a.shape[1], *a.shape[2:])
            if "lhs_shape" in params:
                n, *rest = params["lhs_shape"]
                params = {**params, "lhs_shape": (size * n, *rest)}
            out = prim.bind(*merged, **params)
            return out.reshape(size, out.shape[0] // size, *out.shape[1:]), 0
        a, b = (_at_front(arg, d, size) for arg, d in zip(args, dims))
        return lax.map(lambda ab: prim.bind(ab[0], ab[1], **params), (a, b)), 0

    return rule


batching.primitive_batchers[conv_fwd_p] = _batch_rule(conv_fwd_p, 0)
batching.primitive_batchers[conv_bwd_data_p] = _batch_rule(conv_bwd_data_p, 0)
batching.primitive_batchers[conv_bwd_weights_p] = _batch_rule(conv_bwd_weights_p, None)

del _prim, _ref
