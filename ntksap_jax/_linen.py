"""The ``flax.linen`` front end: :func:`from_linen` builds a :class:`~ntksap_jax.model.Model`.

Any linen module with any call convention (``train=``, ``deterministic=``,
``use_running_average=``, ``training=``, none at all, or a callable ``mode_kwargs(train)``).
Dropout and attention dropout are switched off through Flax interceptors when no dropout key
is given; NTK-SAP's BatchNorm statistics come from a train-mode pass whose ``nn.BatchNorm``
layers record their input's mean and unbiased variance. Import it from
:mod:`ntksap_jax.model` (or ``ntksap_jax``).

Example::

    from ntksap_jax.model import from_linen

    model = from_linen(ViT(...), (32, 32, 3))        # __call__(x, deterministic=...)
    variables = model.init(jax.random.key(0))
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ntksap_jax._model_base import Model, as_shape, batch_statistics, kernel_filter, scale_filter, table_layout

__all__ = ["from_linen"]


def _linen_mode_kwargs(module: nn.Module, mode_kwargs) -> Callable[[bool], dict]:
    """``train -> call kwargs`` from the module's ``__call__`` signature, or the user's callable."""
    if callable(mode_kwargs):
        return mode_kwargs
    if mode_kwargs is not None:
        raise ValueError(f"mode_kwargs must be a callable train -> dict or None; got {mode_kwargs!r}")
    method = type(module).__call__ if isinstance(module, nn.Module) else module.apply
    try:
        names = set(inspect.signature(method).parameters)
    except (TypeError, ValueError):
        names = set()
    for name, flip in (("train", False), ("training", False), ("is_training", False),
                       ("deterministic", True), ("use_running_average", True), ("eval", True)):
        if name in names:
            return lambda train, name=name, flip=flip: {name: (not train) if flip else train}
    return lambda train: {}


def _stats_interceptor(next_fun, args, kwargs, context, *, seen: list):
    """In a train-mode pass, let each ``nn.BatchNorm`` normalise with its batch statistics (as
    PyTorch's train mode), then overwrite its running statistics with its input's mean and
    unbiased variance (PyTorch's running statistics after a momentum-1.0 update)."""
    bn = context.module
    if not (isinstance(bn, nn.BatchNorm) and context.method_name == "__call__"):
        return next_fun(*args, **kwargs)
    x = args[0]
    if kwargs.get("mask") is not None or bn.axis_name is not None:
        raise ValueError(f"BatchNorm {bn.name!r}: masked or axis_name statistics are not supported here")
    y = next_fun(*args, **kwargs)
    if not bn.is_mutable_collection("batch_stats"):
        return y
    dtype = bn.dtype or jnp.result_type(x)
    if bn.force_float32_reductions:
        dtype = jnp.promote_types(dtype, jnp.float32)
    axes = (bn.axis,) if isinstance(bn.axis, int) else tuple(bn.axis)
    mean, var = batch_statistics(x, axes, fast_variance=bn.use_fast_variance, dtype=dtype)
    bn.put_variable("batch_stats", "mean", mean)
    bn.put_variable("batch_stats", "var", var)
    seen.append(tuple(bn.scope.path))
    return y


def _identity_dropout(next_fun, args, kwargs, context):
    """Dropout as the identity (scoring and any train-mode pass without a dropout key): ``nn.Dropout``
    returns its input, and attention's own dropout (``MultiHeadDotProductAttention``) is made
    deterministic."""
    module = context.module
    if context.method_name == "__call__":
        if isinstance(module, nn.Dropout):
            return args[0]
        if isinstance(module, nn.MultiHeadDotProductAttention) and module.deterministic is None:
            kwargs = {**kwargs, "deterministic": True}
    return next_fun(*args, **kwargs)


def _linen_layouts(module: nn.Module, example: jax.Array, kwargs: dict) -> dict:
    """``{module path: n_in axes or None}`` recorded while tracing ``init`` (see ``table_layout``)."""
    found: dict = {}

    def record(next_fun, args, fkwargs, context):
        m = context.module
        if context.method_name == "__call__":
            n_in = None
            if isinstance(m, nn.DenseGeneral):
                n_in = 1 if isinstance(m.axis, int) else len(tuple(m.axis))
            elif isinstance(m, (nn.Dense, nn.Conv, nn.ConvTranspose, nn.ConvLocal)):
                n_in = -1  # all axes but the last
            elif isinstance(m, nn.Einsum):
                n_in = None
            found[tuple(m.scope.path)] = n_in
        return next_fun(*args, **fkwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: module.init(_shape_keys(), x, **kwargs), example)
    return found


def _shape_keys() -> dict:
    """Init keys for a shape-only trace, made inside it (an eager key compiles two programs)."""
    key = jax.random.key(0)
    return {"params": key, "dropout": key}


def _is_zoo(module) -> bool:
    """The library's own models (``ntksap_jax.models``): re-drawn kaiming normal by default."""
    return type(module).__module__.startswith("ntksap_jax.models")


def from_linen(
    module: nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    mode_kwargs: Callable[[bool], dict] | None = None,
    prunable: Callable[[tuple, Any], bool] | None = None,
    norm_scale: Callable[[tuple, Any], bool] | None = None,
    state_collection: str = "batch_stats",
) -> Model:
    """A :class:`Model` from a ``flax.linen`` module.

    Args:
      module: the (unbound) linen module; ``module.apply(variables, x, **mode)`` gives ``(N, K)``.
      input_shape: one example's shape, e.g. ``(32, 32, 3)``; needed by ``init`` and to find
        each weight's layout (``DenseGeneral``/attention kernels); without it every kernel is
        read as ``(..., out)`` with fan-in the product of the other axes.
      mode_kwargs: ``train -> dict`` of call arguments; default from ``__call__``'s signature:
        ``train=train``, ``training=train``, ``is_training=train``,
        ``deterministic=not train``, ``use_running_average=not train`` or ``eval=not train``
        (the first that exists), else no argument.
      prunable: the prunable filter; default leaves named ``kernel`` with ``ndim > 1``.
      norm_scale: which leaves are normalisation scales; default 1-D leaves named ``scale``.
      state_collection: the collection holding normalisation statistics.

    Example::

      model = from_linen(ViT(...), (32, 32, 3))        # __call__(x, deterministic=...)
      model = from_linen(net, (28, 28, 1), mode_kwargs=lambda train: {"is_training": train})
    """
    if not (isinstance(module, nn.Module) or callable(getattr(module, "apply", None))):
        raise ValueError(f"from_linen needs a flax.linen.Module (or an object with linen's apply); "
                         f"got {type(module).__name__}")
    mode = _linen_mode_kwargs(module, mode_kwargs)
    shape = as_shape(input_shape)
    coll = state_collection
    cache: dict = {}

    def variables_of(params, state):
        return {"params": params, coll: state} if state else {"params": params}

    def apply(params, state, x, *, train: bool = False, rng: jax.Array | None = None):
        variables = variables_of(params, state)
        if not train:
            return module.apply(variables, x, **mode(False)), state
        extra = {} if rng is None else {"rngs": {"dropout": rng}}
        ctx = nn.intercept_methods(_identity_dropout) if rng is None else contextlib.nullcontext()
        with ctx:
            if state:
                y, upd = module.apply(variables, x, **mode(True), mutable=[coll], **extra)
                return y, upd.get(coll, state)
            return module.apply(variables, x, **mode(True), **extra), state

    def statistics(params, state, x):
        if not state:
            return state
        seen: list = []
        params = jax.lax.stop_gradient(params)
        with nn.intercept_methods(_identity_dropout), \
                nn.intercept_methods(functools.partial(_stats_interceptor, seen=seen)):
            _, upd = module.apply(variables_of(params, state), x, **mode(True), mutable=[coll])
        stats = jax.lax.stop_gradient(upd[coll])
        owners = {tuple(k.key for k in path[:-1]) for path, _ in jax.tree_util.tree_leaves_with_path(state)}
        missed = sorted("/".join(o) or "<root>" for o in owners - set(seen))
        if missed:
            raise ValueError(f"{coll} entries {missed} were not set by an nn.BatchNorm layer; NTK-SAP's statistics "
                             "need flax.linen.BatchNorm (or build the model with from_apply_fn)")
        return stats

    def init(key):
        if shape is None:
            raise ValueError(f"{type(module).__name__}: init needs input_shape (one example's shape)")
        variables = module.init({"params": key, "dropout": key}, jnp.zeros((1, *shape), jnp.float32), **mode(False))
        out = {"params": variables["params"]}
        if coll in variables:
            out[coll] = variables[coll]
        return out

    def layout(path, leaf_shape):
        if shape is not None and "modules" not in cache:
            cache["modules"] = _linen_layouts(module, jax.ShapeDtypeStruct((1, *shape), jnp.float32), mode(False))
        return table_layout(cache.get("modules", {}), path, leaf_shape)

    return Model(
        init=init, apply=apply, statistics=statistics,
        has_state=_linen_has_state(module, shape, mode, coll), prunable=prunable or kernel_filter,
        layout=layout, norm_scale=norm_scale or scale_filter, kind="linen", name=type(module).__name__,
        input_shape=shape, zoo=_is_zoo(module), module=module,
    )


def _linen_has_state(module, shape, mode, coll) -> bool | None:
    if shape is None or not callable(getattr(module, "init", None)):
        return None  # unknown until the variables are seen
    tree = jax.eval_shape(lambda: module.init(_shape_keys(), jnp.zeros((1, *shape)), **mode(False)))
    return coll in tree and bool(jax.tree.leaves(tree[coll]))
