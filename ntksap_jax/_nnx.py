"""The Flax NNX front end: :func:`from_nnx` builds a :class:`~ntksap_jax.model.Model`.

Params and statistics are pure dicts (``nnx.to_pure_dict(nnx.state(module, nnx.Param))``,
``nnx.BatchStat`` likewise); every call merges them into a fresh copy of the module
(``nnx.split``/``nnx.merge``), so ``apply`` is pure and the user's module is never modified.
Results go back into a module with :meth:`Model.update_nnx`. ``flax.nnx`` is imported only
when an NNX model is built. Import it from :mod:`ntksap_jax.model` (or ``ntksap_jax``).

Example::

    from ntksap_jax.model import from_nnx

    model = from_nnx(lambda rngs: CNN(rngs=rngs))   # init re-runs the factory
    y, _ = model.apply(model.variables["params"], model.variables.get("batch_stats"), x)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from ntksap_jax._model_base import (
    Model,
    as_shape,
    batch_statistics,
    kernel_filter,
    scale_filter,
    table_layout,
    to_pure,
)
from ntksap_jax.masks import path_name

__all__ = ["from_nnx"]


def _nnx_layout_table(module) -> dict:
    """``{module path: n_in axes}`` for NNX linear layers (``-1``: all axes but the last)."""
    from flax import nnx

    table = {}
    for path, m in nnx.iter_modules(module):
        key = tuple(str(p) for p in path)
        if isinstance(m, nnx.LinearGeneral):
            table[key] = len(tuple(m.in_features))
        elif isinstance(m, (nnx.Linear, nnx.Conv, nnx.ConvTranspose)):
            table[key] = -1
    return table


def _set_variable(variable, value) -> None:
    """``variable[...] = value`` (flax ≥ 0.12), or ``variable.value = value`` before it."""
    try:
        old = variable[...]
        variable[...] = jnp.asarray(value, jnp.result_type(old))
    except (TypeError, AttributeError, IndexError):
        variable.value = jnp.asarray(value, jnp.result_type(variable.value))


@functools.lru_cache(maxsize=None)
def _make_stats_batchnorm():
    from flax import nnx

    class _RecordingBatchNorm(nnx.BatchNorm):
        """A train-mode ``nnx.BatchNorm`` that stores its input's mean and unbiased variance."""

        def __call__(self, x, use_running_average=None, *, mask=None):
            if mask is not None or self.axis_name is not None:
                raise ValueError("BatchNorm: masked or axis_name statistics are not supported here")
            y = super().__call__(x, use_running_average=False)
            axes = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
            mean, var = batch_statistics(x, axes, fast_variance=self.use_fast_variance)
            _set_variable(self.mean, mean)
            _set_variable(self.var, var)
            return y

    return _RecordingBatchNorm


def _set_mode(module, train: bool, dropout: bool) -> None:
    """Train/eval on every submodule: BatchNorm's ``use_running_average``, dropout's ``deterministic``."""
    from flax import nnx

    for _, sub in nnx.iter_modules(module):
        if isinstance(sub, nnx.BatchNorm):
            sub.use_running_average = not train
        if isinstance(sub, nnx.Dropout):
            sub.deterministic = not dropout
        elif isinstance(sub, nnx.MultiHeadAttention):
            sub.deterministic = not dropout


class _NnxFunctions:
    """``apply``, ``statistics``, ``init`` and ``layout`` of one split NNX module, on pure dicts."""

    def __init__(self, module, factory):
        from flax import nnx

        self.graphdef, p_state, self.s_state, rest = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
        self.p_def = jax.tree.structure(p_state)
        self.s_def = jax.tree.structure(self.s_state)
        self.has_state = bool(jax.tree.leaves(self.s_state))
        self.variables = {"params": to_pure(p_state)}
        if self.has_state:
            self.variables["batch_stats"] = to_pure(self.s_state)
        _check_pure_order(p_state, self.variables["params"])
        self.layouts = _nnx_layout_table(module)
        self.stats_bn = _make_stats_batchnorm()
        self.rest_leaves, self.rest_def = jax.tree.flatten(rest)
        self.factory = factory

    def merged(self, params, state, rng=None):
        """A fresh module holding ``params`` and ``state`` (and, given ``rng``, fresh PRNG keys)."""
        from flax import nnx

        p = jax.tree.unflatten(self.p_def, jax.tree.leaves(params))
        s = jax.tree.unflatten(self.s_def, jax.tree.leaves(state)) if self.has_state else self.s_state
        leaves = self.rest_leaves
        if rng is not None:  # fresh dropout keys: every PRNG key of the module derived from rng
            leaves = [jax.random.fold_in(rng, i) if jax.dtypes.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key)
                      else leaf for i, leaf in enumerate(self.rest_leaves)]
        return nnx.merge(self.graphdef, p, s, jax.tree.unflatten(self.rest_def, leaves))

    def state_of(self, m):
        from flax import nnx

        return to_pure(nnx.state(m, nnx.BatchStat)) if self.has_state else None

    def apply(self, params, state, x, *, train: bool = False, rng: jax.Array | None = None):
        m = self.merged(params, state, rng if train else None)
        _set_mode(m, train, train and rng is not None)
        y = m(x)
        return y, (self.state_of(m) if train else state)

    def statistics(self, params, state, x):
        from flax import nnx

        if not self.has_state:
            return state
        m = self.merged(jax.lax.stop_gradient(params), state)
        _set_mode(m, True, False)
        for _, sub in nnx.iter_modules(m):
            if type(sub) is nnx.BatchNorm:
                sub.__class__ = self.stats_bn
            elif isinstance(sub, nnx.BatchNorm):
                raise ValueError(f"{type(sub).__name__}: a BatchNorm subclass; NTK-SAP's statistics need nnx.BatchNorm")
        m(x)
        return jax.lax.stop_gradient(self.state_of(m))

    def init(self, k):
        from flax import nnx

        fresh = self.factory(nnx.Rngs(k))
        _, p, s, _ = nnx.split(fresh, nnx.Param, nnx.BatchStat, ...)
        out = {"params": to_pure(p)}
        if self.has_state:
            out["batch_stats"] = to_pure(s)
        return out

    def layout(self, path, leaf_shape):
        return table_layout(self.layouts, path, leaf_shape)


def _module_and_factory(module_or_factory, key: jax.Array | None):
    """``(module, factory)``: the instance as given (no factory), or the factory's first module."""
    from flax import nnx

    if isinstance(module_or_factory, nnx.Module):
        return module_or_factory, None
    if callable(module_or_factory):
        module = module_or_factory(nnx.Rngs(jax.random.key(0) if key is None else key))
        if not isinstance(module, nnx.Module):
            raise ValueError(f"the NNX factory must return an nnx.Module; got {type(module).__name__}")
        return module, module_or_factory
    raise ValueError(
        f"from_nnx needs an nnx.Module or a factory rngs -> module; got {type(module_or_factory).__name__}"
    )


def from_nnx(
    module_or_factory,
    input_shape: Sequence[int] | None = None,
    *,
    prunable: Callable[[tuple, Any], bool] | None = None,
    norm_scale: Callable[[tuple, Any], bool] | None = None,
    key: jax.Array | None = None,
) -> Model:
    """A :class:`Model` from a Flax NNX module, or from a factory ``rngs -> module``.

    Params and statistics are pure dicts (``nnx.to_pure_dict(nnx.state(module, nnx.Param))``,
    ``nnx.BatchStat`` likewise); every call merges them into a fresh copy of the module, so
    ``apply`` is pure and the user's module is never modified. Train/eval is set on that copy
    (``use_running_average`` on BatchNorm, ``deterministic`` on Dropout and attention).

    Args:
      module_or_factory: an ``nnx.Module``, or a callable ``rngs -> nnx.Module`` (then ``init``
        re-runs it with ``nnx.Rngs(key)``: the model's own initializers).
      input_shape: one example's shape (for reports); optional.
      prunable, norm_scale: as :func:`from_linen`.
      key: the key the factory is first called with (default ``jax.random.key(0)``).

    Example::

      model = from_nnx(lambda rngs: CNN(rngs=rngs))
      model = from_nnx(cnn)                      # an instance: its current weights
      model.update_nnx(cnn, result.params)        # write the pruned init back
    """
    module, factory = _module_and_factory(module_or_factory, key)
    fns = _NnxFunctions(module, factory)
    return Model(
        init=None if factory is None else fns.init, apply=fns.apply, statistics=fns.statistics,
        has_state=fns.has_state, prunable=prunable or kernel_filter, layout=fns.layout,
        norm_scale=norm_scale or scale_filter, variables=fns.variables, kind="nnx", name=type(module).__name__,
        input_shape=as_shape(input_shape), module=module,
    )


def _check_pure_order(state, pure) -> None:
    """The NNX state's leaves and the pure dict's leaves come in the same order (sorted keys)."""
    def strip(path):  # a Variable flattens to its value: drop that trailing attribute key
        last = path[-1] if path else None
        return path[:-1] if isinstance(last, jax.tree_util.GetAttrKey) and last.name == "value" else path

    names_state = [path_name(strip(p)) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    names_pure = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(pure)[0]]
    if names_state != names_pure:
        raise ValueError("internal: NNX state and its pure dict flatten in different orders; "
                         f"{names_state[:3]} vs {names_pure[:3]}")
