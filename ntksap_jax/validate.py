"""Check our empirical NTK against neural-tangents on a (masked) model.

Users should be able to trust this library's kernel numbers for *their* model and
mask. :func:`validate_ntk` computes the empirical NTK ``Θ(x, x)`` of the masked
network with :func:`ntksap_jax.empirical_ntk` and with neural-tangents'
``empirical_ntk_fn`` (every implementation that works on this JAX, see
:mod:`ntksap_jax._compat.neural_tangents`) and compares them entry by entry.

Conventions (the traps):

* BatchNorm: statistics are those of the masked network on the batch ``x``
  (:func:`ntksap_jax.model.calibrated_batch_stats`), then fixed; both libraries
  differentiate the same eval-mode function ``f(θ⊙m, x)``, whose per-example outputs
  are independent, so neural-tangents' ``vmap_axes=0`` is valid.
* Normalisation: the full kernel is compared with ``trace_axes=()`` on both sides
  (shape ``(N, N, K, K)``, sums over parameters). neural-tangents' default
  ``trace_axes=(-1,)`` *averages* over the K outputs; the extra ``traced (-1,) × K``
  row checks ``K · Θ_nt[i, j] == Σ_a Θ[i, j, a, a]``.
* Tolerances are relative Frobenius errors, by dtype: :data:`TOLERANCES`
  (float64 1e-10, float32 1e-5). The two libraries sum the same products in a
  different order, so float32 agreement is ~1e-6 on ResNet-20, float64 ~1e-14.

Example::

    from ntksap_jax.validate import validate_ntk, format_validation
    result = validate_ntk(model, variables, masks, x)
    print(format_validation(result))
    assert result.passed
"""

from __future__ import annotations

import time
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ntksap_jax._compat import (
    SUPPORTED_IMPLEMENTATIONS,
    UNSUPPORTED_IMPLEMENTATIONS,
    NeuralTangentsUnavailable,
    import_neural_tangents,
)
from ntksap_jax.model import calibrated_batch_stats, masked_apply_fn
from ntksap_jax.ntk import NtkImplementation, empirical_ntk

PyTree = Any

__all__ = ["TOLERANCES", "ValidationRow", "ValidationResult", "validate_ntk", "format_validation", "tolerance_for",
           "import_neural_tangents", "NeuralTangentsUnavailable", "SUPPORTED_IMPLEMENTATIONS"]

# Relative Frobenius error allowed between the two kernels, by dtype.
TOLERANCES = {"float64": 1e-10, "float32": 1e-5}


class ValidationRow(NamedTuple):
    """One comparison: a kernel computed by ``implementation`` against our reference kernel.

    ``max_abs_diff`` and ``rel_frobenius`` are ``nan`` and ``passed`` is ``None`` for an
    implementation that is unsupported on this JAX (``note`` says why).
    """

    implementation: str
    max_abs_diff: float
    rel_frobenius: float
    trace_ours: float
    trace_theirs: float
    seconds: float
    passed: bool | None
    note: str = ""


class ValidationResult(NamedTuple):
    """What :func:`validate_ntk` found; ``passed`` is True iff every supported row passed."""

    rows: list[ValidationRow]
    dtype: str
    tolerance: float
    shape: tuple[int, ...]
    reference_seconds: float
    passed: bool


def tolerance_for(dtype) -> float:
    """The relative Frobenius tolerance for ``dtype`` (:data:`TOLERANCES`).

    Example::

      tolerance_for(jnp.float64)   # 1e-10
    """
    name = jnp.dtype(dtype).name
    if name not in TOLERANCES:
        raise ValueError(f"no NTK validation tolerance for dtype {name!r}; use one of {', '.join(TOLERANCES)}")
    return TOLERANCES[name]


def _timed(fn, *args):
    """Compile, then time one run; returns (value as float64 numpy, run seconds)."""
    with warnings.catch_warnings():  # neural-tangents 0.6.5 calls np.size on ShapeDtypeStruct while tracing
        warnings.filterwarnings("ignore", message="size requires ndarray", category=DeprecationWarning)
        compiled = jax.jit(fn).lower(*args).compile()
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return np.asarray(out, dtype=np.float64), time.perf_counter() - start


def _compare(name, theirs, ours, seconds, tol, note=""):
    diff = theirs - ours
    rel = float(np.linalg.norm(diff) / max(np.linalg.norm(ours), np.finfo(np.float64).tiny))
    return ValidationRow(
        implementation=name,
        max_abs_diff=float(np.max(np.abs(diff))),
        rel_frobenius=rel,
        trace_ours=float(np.einsum("iiaa->", ours)) if ours.ndim == 4 else float(np.trace(ours)),
        trace_theirs=float(np.einsum("iiaa->", theirs)) if theirs.ndim == 4 else float(np.trace(theirs)),
        seconds=seconds,
        passed=bool(rel <= tol),
        note=note,
    )


def validate_ntk(
    model,
    variables: PyTree,
    masks: PyTree | None,
    x: jax.Array,
    *,
    tolerance: float | None = None,
    implementations: tuple[str, ...] | None = None,
    compare_own: bool = True,
) -> ValidationResult:
    """Compare our empirical NTK of the masked network with neural-tangents'.

    Args:
      model: a linen or NNX module or a :class:`ntksap_jax.model.Model`.
      variables: ``{"params": ..., "batch_stats": ...}`` (``batch_stats`` optional). Use
        float64 params and inputs (under ``jax_enable_x64``) for the float64 check:
        Flax makes float32 params even with x64 on.
      masks: mask pytree for ``params`` (``None`` leaves dense), or ``None`` for dense.
      x: Gaussian (or any) inputs ``(N, ...)``; the kernel is ``(N, N, K, K)``.
      tolerance: relative Frobenius tolerance; default :func:`tolerance_for` the params' dtype.
      implementations: neural-tangents ``NtkImplementation`` names to run (default: all
        supported; unsupported names get a row that says why).
      compare_own: also compare our ``NTK_VECTOR_PRODUCTS`` with our reference (one more
        compilation; float64 convolutions are slow on XLA:CPU).

    Returns:
      :class:`ValidationResult`: one row for our own second implementation
      (``NTK_VECTOR_PRODUCTS`` against our ``JACOBIAN_CONTRACTION`` reference), one per
      neural-tangents implementation, and one for neural-tangents' traced mode
      ``trace_axes=(-1,)`` times K.

    Raises:
      NeuralTangentsUnavailable: neural-tangents is not installed
        (the message says how to install it).

    Example::

      jax.config.update("jax_enable_x64", True)
      variables = jax.tree.map(lambda a: a.astype(jnp.float64), variables)
      result = validate_ntk(model, variables, masks, x.astype(jnp.float64))
      print(format_validation(result))
    """
    nt = import_neural_tangents()
    params = variables["params"]
    dtype = jnp.result_type(*jax.tree.leaves(params))
    tol = tolerance_for(dtype) if tolerance is None else float(tolerance)
    x = jnp.asarray(x, dtype)
    stats = calibrated_batch_stats(model, params, masks, variables.get("batch_stats"), x)
    f = masked_apply_fn(model, masks, stats)
    k = int(jax.eval_shape(f, params, x).shape[-1])

    ref, ref_seconds = _timed(lambda p, x: empirical_ntk(f, p, x), params, x)
    rows = []
    if compare_own:
        ours_vp, s = _timed(
            lambda p, x: empirical_ntk(f, p, x, implementation=NtkImplementation.NTK_VECTOR_PRODUCTS), params, x
        )
        rows.append(_compare("ntksap_jax NTK_VECTOR_PRODUCTS", ours_vp, ref, s, tol))

    names = implementations or SUPPORTED_IMPLEMENTATIONS + tuple(UNSUPPORTED_IMPLEMENTATIONS)
    for name in names:
        if name in UNSUPPORTED_IMPLEMENTATIONS:
            rows.append(ValidationRow(f"neural-tangents {name}", float("nan"), float("nan"), float(np.einsum(
                "iiaa->", ref)), float("nan"), float("nan"), None, "unsupported on this JAX: "
                + UNSUPPORTED_IMPLEMENTATIONS[name]))
            continue
        if name not in SUPPORTED_IMPLEMENTATIONS:
            raise ValueError(
                f"unknown neural-tangents implementation {name!r}; choose from "
                f"{', '.join(SUPPORTED_IMPLEMENTATIONS + tuple(UNSUPPORTED_IMPLEMENTATIONS))}"
            )
        impl = getattr(nt.NtkImplementation, name)
        kernel_fn = nt.empirical_ntk_fn(f, trace_axes=(), vmap_axes=0, implementation=impl)
        theirs, s = _timed(lambda p, x, kernel_fn=kernel_fn: kernel_fn(x, None, p), params, x)
        rows.append(_compare(f"neural-tangents {name}", theirs, ref, s, tol))

    traced_fn = nt.empirical_ntk_fn(
        f, trace_axes=(-1,), vmap_axes=0, implementation=getattr(nt.NtkImplementation, SUPPORTED_IMPLEMENTATIONS[0])
    )
    traced, s = _timed(lambda p, x: traced_fn(x, None, p), params, x)
    rows.append(_compare("neural-tangents traced (-1,) x K", k * traced, np.einsum("ijaa->ij", ref), s, tol,
                         note="neural-tangents averages traced axes: its kernel times K is our sum over outputs"))
    passed = all(r.passed for r in rows if r.passed is not None)
    return ValidationResult(rows, jnp.dtype(dtype).name, tol, tuple(ref.shape), ref_seconds, passed)


def format_validation(result: ValidationResult) -> str:
    """A Markdown table of a :class:`ValidationResult`, then one verdict line.

    Example::

      print(format_validation(validate_ntk(model, variables, masks, x)))
    """
    lines = [
        f"| implementation | max abs diff | rel. Frobenius error | trace ours / theirs | seconds | "
        f"within {result.tolerance:g} ({result.dtype}) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result.rows:
        if r.passed is None:
            lines.append(f"| {r.implementation} | – | – | – | – | unsupported |")
            continue
        ratio = r.trace_ours / r.trace_theirs if r.trace_theirs else float("nan")
        lines.append(
            f"| {r.implementation} | {r.max_abs_diff:.3e} | {r.rel_frobenius:.3e} | {ratio:.12f} | "
            f"{r.seconds:.3f} | {'yes' if r.passed else 'NO'} |"
        )
    notes = [f"- {r.implementation}: {r.note}" for r in result.rows if r.note]
    verdict = (
        f"kernel {result.shape}, reference ntksap_jax JACOBIAN_CONTRACTION in {result.reference_seconds:.3f} s: "
        + ("all supported implementations agree" if result.passed else "MISMATCH beyond the tolerance")
    )
    return "\n".join(lines + notes + [verdict])
