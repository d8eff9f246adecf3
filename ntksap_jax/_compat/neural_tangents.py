"""Make neural-tangents 0.6.5 importable under current JAX, by restoring names only.

neural-tangents 0.6.5 (June 2023) is the package's last release. Its modules do
``from jax.core import Jaxpr, JaxprEqn, Literal, Primitive, Var``, ``from jax.util
import safe_map, safe_zip`` and register rules keyed by ``jax.interpreters.ad.zeros_like_p``.
JAX moved the first five to :mod:`jax.extend.core`, made ``jax.util`` private, and
removed ``zeros_like_p``; with jax 0.10 the plain ``import neural_tangents`` fails
with ``ImportError: cannot import name 'Jaxpr' from 'jax.core'``.

:func:`restore_jax_names` puts those names back where neural-tangents looks for
them, **only where they are missing**, and changes no behaviour of JAX:

==========================================  =============================================
name neural-tangents imports                what is restored
==========================================  =============================================
``jax.core.{Jaxpr, JaxprEqn, Literal,``     the same classes from ``jax.extend.core``
``Primitive, Var}``
``jax.util.{safe_map, safe_zip}``           a module ``jax.util`` with those two
                                            functions (``map``/``zip`` that check lengths)
``jax.interpreters.ad.zeros_like_p``        a fresh, never-bound ``Primitive("zeros_like")``:
                                            neural-tangents only uses it as a dict key for
                                            its structured-derivative rules, and current
                                            JAX never emits it, so the rule is dead
``jax.lax.copy_p``, ``jax.lax.device_put_p``  (present in jax 0.10: left alone; restored
                                            from ``jax._src.lax`` / ``jax._src.dispatch``
                                            only if a future JAX drops the public name)
==========================================  =============================================

What works afterwards (measured with jax 0.10.2, neural-tangents 0.6.5, float64
against a ``jax.jacobian`` oracle): ``NtkImplementation.JACOBIAN_CONTRACTION`` and
``NtkImplementation.NTK_VECTOR_PRODUCTS``, see :data:`SUPPORTED_IMPLEMENTATIONS`.
What does not, and why (:data:`UNSUPPORTED_IMPLEMENTATIONS`):

* ``STRUCTURED_DERIVATIVES`` re-implements JAX's linearize/transpose machinery on
  JAX internals: it calls ``ad.linearize(fn, *primals, has_aux=False)`` (the
  current signature is ``linearize(traceable, primals_ft, ...)`` over a flat tree
  and returns a different tuple) and reads ``ad.reducing_transposes``,
  ``core.lattice_join`` and ``core.DShapedArray``, which JAX removed. Restoring
  names cannot fix a changed calling convention; it fails with
  ``TypeError: linearize() got multiple values for argument 'has_aux'``.
* ``AUTO`` picks an implementation by compiling each and reading
  ``compiled.cost_analysis()[0]``; ``cost_analysis()`` now returns a dict, so it
  fails with ``KeyError: 0``. Pass an explicit implementation instead.

If this layer ever stops working (measured pins): the unmodified package imports
up to jax 0.5.3, and all three implementations work on jax 0.4.25 with numpy<2.

Example::

    from ntksap_jax._compat import import_neural_tangents
    nt = import_neural_tangents()          # restores names, then imports
    kernel_fn = nt.empirical_ntk_fn(f, trace_axes=(), vmap_axes=0,
                                    implementation=nt.NtkImplementation.NTK_VECTOR_PRODUCTS)
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

__all__ = [
    "INSTALL_HINT",
    "SUPPORTED_IMPLEMENTATIONS",
    "UNSUPPORTED_IMPLEMENTATIONS",
    "NeuralTangentsUnavailable",
    "import_neural_tangents",
    "restore_jax_names",
]

INSTALL_HINT = (
    "neural-tangents is not installed: pip install 'ntksap-jax[validate]' "
    "(neural-tangents 0.6.5 + tensorflow, about 1.9 GB)"
)

# neural-tangents NtkImplementation member names.
SUPPORTED_IMPLEMENTATIONS = ("JACOBIAN_CONTRACTION", "NTK_VECTOR_PRODUCTS")
UNSUPPORTED_IMPLEMENTATIONS = {
    "STRUCTURED_DERIVATIVES": "re-implements JAX's linearize/transpose on internals that changed "
    "(ad.linearize's calling convention; ad.reducing_transposes, core.lattice_join, core.DShapedArray were "
    "removed); restoring names cannot fix it: TypeError: linearize() got multiple values for argument 'has_aux'",
    "AUTO": "reads compiled.cost_analysis()[0], but cost_analysis() now returns a dict (KeyError: 0); "
    "pass an explicit implementation",
}

_CORE_NAMES = ("Jaxpr", "JaxprEqn", "Literal", "Primitive", "Var")


class NeuralTangentsUnavailable(ImportError):
    """neural-tangents is not installed, or does not import even with the names restored."""


def _safe_map(f, *args):
    args = list(map(list, args))
    n = len(args[0])
    for arg in args[1:]:
        if len(arg) != n:
            raise ValueError(f"length mismatch: {list(map(len, args))}")
    return list(map(f, *args))


def _safe_zip(*args):
    args = list(map(list, args))
    n = len(args[0])
    for arg in args[1:]:
        if len(arg) != n:
            raise ValueError(f"length mismatch: {list(map(len, args))}")
    return list(zip(*args))


def restore_jax_names() -> tuple[str, ...]:
    """Restore the JAX names neural-tangents 0.6.5 imports, where they are missing.

    Idempotent, and a no-op on a JAX that still has every name (nothing is
    replaced: an existing attribute or module is never touched).

    Returns:
      the dotted names that this call added, e.g. ``("jax.core.Jaxpr", ...,
      "jax.util", "jax.interpreters.ad.zeros_like_p")``; ``()`` when nothing was
      missing (or a previous call already restored them).

    Example::

      restored = restore_jax_names()
      import neural_tangents as nt   # now imports under jax 0.10
    """
    import jax
    import jax.core
    from jax import lax
    from jax.interpreters import ad

    restored: list[str] = []
    missing = [n for n in _CORE_NAMES if not hasattr(jax.core, n)]
    if missing:
        import jax.extend.core as jex_core

        for name in missing:
            setattr(jax.core, name, getattr(jex_core, name))
            restored.append(f"jax.core.{name}")

    util = sys.modules.get("jax.util") or getattr(jax, "util", None)
    if util is None:
        try:
            util = importlib.import_module("jax.util")
        except ImportError:
            util = types.ModuleType("jax.util", "Restored by ntksap_jax._compat for neural-tangents 0.6.5.")
            sys.modules["jax.util"] = util
            jax.util = util
            restored.append("jax.util")
    for name, fn in (("safe_map", _safe_map), ("safe_zip", _safe_zip)):
        if not hasattr(util, name):
            setattr(util, name, fn)
            restored.append(f"jax.util.{name}")

    if not hasattr(ad, "zeros_like_p"):
        ad.zeros_like_p = jax.core.Primitive("zeros_like")
        restored.append("jax.interpreters.ad.zeros_like_p")

    if not hasattr(lax, "copy_p"):
        from jax._src.lax import lax as _lax_impl

        lax.copy_p = _lax_impl.copy_p
        restored.append("jax.lax.copy_p")
    if not hasattr(lax, "device_put_p"):
        from jax._src import dispatch as _dispatch

        lax.device_put_p = _dispatch.device_put_p
        restored.append("jax.lax.device_put_p")
    return tuple(restored)


def import_neural_tangents():
    """Import and return a working ``neural_tangents`` module on this JAX (public as
    ``ntksap_jax.import_neural_tangents``).

    neural-tangents 0.6.5, its last release, imports JAX names that current JAX has moved or
    removed, so a plain ``import neural_tangents`` fails there. This restores those names
    first (only where missing; nothing else in JAX changes), then imports it; afterwards a
    plain ``import neural_tangents`` works too. Implementations that do not work on this JAX
    are listed in ``ntksap_jax._compat.UNSUPPORTED_IMPLEMENTATIONS`` with the reason.

    Raises:
      NeuralTangentsUnavailable: with :data:`INSTALL_HINT` when the package is not
        installed, or with the original error when it fails to import anyway.

    Example::

      nt = ntksap_jax.validate.import_neural_tangents()
      init_fn, apply_fn, kernel_fn = nt.stax.serial(nt.stax.Dense(512), nt.stax.Relu(), nt.stax.Dense(1))
    """
    if importlib.util.find_spec("neural_tangents") is None:
        raise NeuralTangentsUnavailable(INSTALL_HINT)
    restore_jax_names()
    try:
        return importlib.import_module("neural_tangents")
    except ImportError as e:  # pragma: no cover - depends on the installed versions
        raise NeuralTangentsUnavailable(
            f"neural-tangents is installed but does not import with this JAX even after restoring names: {e}"
        ) from e
