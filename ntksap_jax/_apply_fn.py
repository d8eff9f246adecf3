"""The plain-function front end: :func:`from_apply_fn` builds a :class:`~ntksap_jax.model.Model`.

For any ``apply_fn(params, x) -> (N, K)`` with its params and no normalisation statistics:
Equinox (the array part of ``eqx.partition``), neural-tangents ``stax``, Haiku. Params are
flattened to a dict ``{"dotted.path": array}``; masks and params go back to the user's own
structure through :attr:`Model.to_native`. Import it from :mod:`ntksap_jax.model` (or
``ntksap_jax``).

Example::

    from ntksap_jax.model import from_apply_fn

    params, static = eqx.partition(mlp, eqx.is_inexact_array)
    model = from_apply_fn(lambda p, x: jax.vmap(eqx.combine(p, static))(x), params)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from ntksap_jax._model_base import Model, WeightLayout, as_shape, first_axis_layout, last_axis_layout, leaf_name
from ntksap_jax.masks import path_name

__all__ = ["from_apply_fn"]

PyTree = Any


def _ndim2_filter(path, leaf) -> bool:
    return jnp.ndim(leaf) > 1


def _apply_fn_norm_scale(path, leaf) -> bool:
    return jnp.ndim(leaf) == 1 and leaf_name(path) in ("scale", "weight", "gamma")


def _infer_layout(params) -> str:
    try:
        import equinox as eqx
    except ImportError:
        return "in_out"
    is_eqx = any(
        isinstance(node, eqx.Module) for node in jax.tree.leaves(params, is_leaf=lambda n: isinstance(n, eqx.Module))
    )
    return "out_in" if is_eqx else "in_out"


def from_apply_fn(
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    params: PyTree,
    *,
    init_fn: Callable[[jax.Array], PyTree] | None = None,
    layout: str | Callable[[tuple, tuple], WeightLayout] = "auto",
    prunable: Callable[[tuple, Any], bool] | None = None,
    norm_scale: Callable[[tuple, Any], bool] | None = None,
    input_shape: Sequence[int] | None = None,
    name: str = "apply_fn",
) -> Model:
    """A :class:`Model` from ``apply_fn(params, x) -> (N, K)`` and its params (no statistics).

    The params are flattened to ``{"dotted.path": array}`` (so Equinox modules, stax tuples
    and Haiku dicts all get readable names); :attr:`Model.to_native` turns masks and params
    back into the user's structure (``None`` where a leaf is not prunable).

    Args:
      apply_fn: the pure forward function, batched over the first axis of ``x``.
      params: its params, any pytree (for Equinox: the arrays of ``eqx.partition(model,
        eqx.is_inexact_array)``, with ``apply_fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)``).
      init_fn: ``key -> params`` in the same structure: the model's own initializer, used for
        NTK-SAP's re-draws; without it re-draws are kaiming normal by :attr:`layout`.
      layout: ``"in_out"`` (Flax/stax: last axis output), ``"out_in"`` (PyTorch/Equinox:
        first axis output), ``"auto"`` (``"out_in"`` if ``params`` holds Equinox modules), or
        ``layout(path, shape) -> WeightLayout``.
      prunable: default every leaf with ``ndim > 1``.
      norm_scale: default 1-D leaves named ``scale``, ``weight`` or ``gamma``.
      input_shape: one example's shape, optional.
      name: a display name.

    Example::

      params, static = eqx.partition(mlp, eqx.is_inexact_array)
      model = from_apply_fn(lambda p, x: jax.vmap(eqx.combine(p, static))(x), params)
    """
    if not callable(apply_fn):
        raise ValueError(f"apply_fn must be callable; got {type(apply_fn).__name__}")
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not flat:
        raise ValueError("from_apply_fn: params has no array leaves")
    names = [path_name(p) or f"leaf{i}" for i, (p, _) in enumerate(flat)]
    if len(set(names)) != len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    if layout == "auto":
        layout = _infer_layout(params)
    if layout == "in_out":
        layout_fn = lambda path, shape: last_axis_layout(tuple(shape))  # noqa: E731
    elif layout == "out_in":
        layout_fn = lambda path, shape: first_axis_layout(tuple(shape))  # noqa: E731
    elif callable(layout):
        layout_fn = layout
    else:
        raise ValueError(f"layout must be 'auto', 'in_out', 'out_in' or a callable; got {layout!r}")

    def to_flat(tree):
        leaves = treedef.flatten_up_to(tree)
        return dict(zip(names, leaves))

    def to_native(flat_dict):
        return jax.tree.unflatten(treedef, [flat_dict[n] for n in names])

    def apply(p, state, x, *, train: bool = False, rng: jax.Array | None = None):
        return apply_fn(to_native(p), x), state

    init = None if init_fn is None else (lambda k: {"params": to_flat(init_fn(k))})
    return Model(
        init=init, apply=apply, statistics=lambda p, state, x: state, has_state=False,
        prunable=prunable or _ndim2_filter, layout=layout_fn, norm_scale=norm_scale or _apply_fn_norm_scale,
        variables={"params": to_flat(params)}, kind="apply_fn", name=name,
        input_shape=as_shape(input_shape), to_native=to_native,
    )
