"""One model abstraction for every scorer, the pruning loop, training, analysis and validation.

A :class:`Model` is what the library needs to know about a network, whatever wrote it:

* ``init(key) -> variables``: ``{"params": ..., "batch_stats": ...}`` (``batch_stats`` only
  for models with normalisation statistics), re-running the model's own initializers;
* ``apply(params, state, x, *, train=False, rng=None) -> (y, state)``: a pure function.
  ``train=True`` normalises with batch statistics and returns the updated running
  statistics; dropout is active only when ``rng`` is given (scoring never gives one, so
  no PRNG is needed to score a model with dropout);
* ``statistics(params, state, x) -> stats``: NTK-SAP's BatchNorm statistics of the network
  on a batch, as the official code takes them (see below), under ``stop_gradient``;
* which leaves are prunable (``prunable(path, leaf)``), each weight's fan-in and output
  axes (``layout(path, shape) -> WeightLayout``), and which leaves are normalisation
  scales (``norm_scale(path, leaf)``).

Three front ends build one, and :func:`as_model` picks the right one:

* :func:`from_linen`: any ``flax.linen`` module, with any call convention (``train=``,
  ``deterministic=``, ``use_running_average=``, ``training=``, none at all, or a callable
  ``mode_kwargs(train) -> dict``). The library's own zoo goes through here too.
* :func:`from_nnx`: a Flax NNX module (``nnx.split``/``nnx.merge``). Params and masks are
  pure dicts matching ``nnx.to_pure_dict(nnx.state(module, nnx.Param))``; put results back with
  :meth:`Model.update_nnx` (``nnx.update``).
* :func:`from_apply_fn`: a plain ``apply_fn(params, x)`` with its params: Equinox (pass the
  array part of ``eqx.partition``), neural-tangents ``stax``, Haiku. Params are flattened to
  a dict ``{"dotted.path": array}`` internally; masks and params come back in the user's own
  structure through :meth:`Model.to_native`.

Normalisation trap (NTK-SAP statistics): the official code takes BatchNorm statistics with a
momentum-1.0 train-mode pass (each BatchNorm normalising with its batch's *biased* variance
inside that pass) and then normalises in eval mode with PyTorch's *running* variance, which
is the unbiased batch variance ``n/(n-1) · var`` (``n = N·H·W`` per channel); Flax stores the
biased one. :attr:`Model.statistics` does exactly that: one train-mode pass whose
BatchNorms record their input's mean and unbiased variance (whatever their momentum). Both
details matter: taking the statistics from the eval-mode pass itself (one pass fewer), or
the biased variance, moves ResNet-20's scores by about 2e-2 (median relative, 16 inputs,
float64), far beyond float32 rounding.

Example::

    model = as_model(my_linen_module, input_shape=(32, 32, 3))
    variables = model.init(jax.random.key(0))
    y, _ = model.apply(variables["params"], variables.get("batch_stats"), x)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from ntksap_jax.masks import path_name

__all__ = [
    "Model",
    "WeightLayout",
    "as_model",
    "from_linen",
    "from_nnx",
    "from_apply_fn",
    "batch_statistics",
]

PyTree = Any
Variables = dict


class WeightLayout(NamedTuple):
    """How a weight leaf maps inputs to outputs.

    Attributes:
      fan_in: the number of inputs each output sums over (``H·W·C_in`` for an HWIO conv
        kernel, ``in`` for a dense ``(in, out)`` kernel, ``in`` for an attention q/k/v
        kernel ``(in, heads, head_dim)``, ``heads·head_dim`` for its output kernel).
      out_axes: the axes that index output units (``(-1,)`` for Flax kernels, ``(1, 2)``
        for a q/k/v kernel, ``(0,)`` for PyTorch/Equinox ``(out, in, ...)`` weights).
    """

    fan_in: int
    out_axes: tuple


def _last_axis_layout(shape: Sequence[int]) -> WeightLayout:
    """Flax/stax layout: the last axis is the output; fan-in is the product of the others."""
    return WeightLayout(max(1, math.prod(shape[:-1])), (len(shape) - 1,))


def _first_axis_layout(shape: Sequence[int]) -> WeightLayout:
    """PyTorch/Equinox layout ``(out, in, *kernel)``: the first axis is the output."""
    return WeightLayout(max(1, math.prod(shape[1:])), (0,))


def _leaf_name(path) -> str:
    return path_name(path[-1:]) if path else ""


def _kernel_filter(path, leaf) -> bool:
    return _leaf_name(path) == "kernel" and jnp.ndim(leaf) > 1


def _scale_filter(path, leaf) -> bool:
    return _leaf_name(path) == "scale" and jnp.ndim(leaf) == 1


def _is_none(x) -> bool:
    return x is None


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A network as the library sees it (see the module docstring). Build it with
    :func:`as_model`, :func:`from_linen`, :func:`from_nnx` or :func:`from_apply_fn`.

    Attributes:
      init: ``init(key) -> {"params", "batch_stats"?}``, the model's own initializers with a
        fresh key; ``None`` when the model cannot re-initialise itself (an NNX instance built
        without a factory, an ``apply_fn`` without ``init_fn``).
      apply: ``apply(params, state, x, *, train=False, rng=None) -> (y, state)``.
      statistics: ``(params, state, x) -> stats``: NTK-SAP's BatchNorm statistics (the official
        code's: a train-mode pass, unbiased variances), under ``stop_gradient``; ``state`` as
        given for models without statistics.
      has_state: whether the model has normalisation statistics (``batch_stats``); ``None``
        when not known (a linen module without ``input_shape``).
      prunable: ``prunable(path, leaf) -> bool``, the default filter of :func:`init_masks`.
      layout: ``layout(path, shape) -> WeightLayout`` for weight leaves.
      norm_scale: ``norm_scale(path, leaf) -> bool``: normalisation scales (BatchNorm,
        LayerNorm, GroupNorm, RMSNorm) that scoring may set from 0 to 1.
      variables: the current variables of an NNX instance or an ``apply_fn`` model, else ``None``.
      kind: ``"linen"``, ``"nnx"`` or ``"apply_fn"``.
      name: a display name (the class name).
      input_shape: one example's shape if known (needed by :attr:`init` for linen).
      zoo: True for the library's own models (``ntksap_jax.models``): their re-draws
        default to kaiming normal, as the official code.
      to_native: ``to_native(tree) -> tree`` in the user's own structure (identity for
        linen and NNX, whose params are already pure dicts).
      module: the wrapped linen/NNX module (``None`` for ``apply_fn`` models).
    """

    init: Callable[[jax.Array], Variables] | None
    apply: Callable[..., tuple]
    statistics: Callable[..., PyTree]
    has_state: bool | None
    prunable: Callable[[tuple, Any], bool]
    layout: Callable[[tuple, tuple], WeightLayout]
    norm_scale: Callable[[tuple, Any], bool]
    variables: Variables | None = None
    kind: str = "linen"
    name: str = "model"
    input_shape: tuple | None = None
    zoo: bool = False
    to_native: Callable[[PyTree], PyTree] = lambda tree: tree
    module: Any = None

    def apply_with_batch_statistics(self, params: PyTree, state: PyTree, x: jax.Array) -> tuple:
        """``(y, stats)``: :attr:`statistics` on ``x``, then the eval-mode output with them.

        Example::

          y, stats = model.apply_with_batch_statistics(masked_params, variables["batch_stats"], x)
        """
        stats = self.statistics(params, state, x)
        return self.apply(params, stats, x)[0], stats

    def eval_fn(self, state: PyTree = None) -> Callable[[PyTree, jax.Array], jax.Array]:
        """``f(params, x) -> y`` in eval mode with ``state`` fixed (for the NTK functions).

        Example::

          theta = empirical_ntk(model.eval_fn(stats), params, x)
        """
        return lambda params, x: self.apply(params, state, x)[0]

    def get_variables(self, key: jax.Array | None = None) -> Variables:
        """The model's variables: its current ones (NNX instance, ``apply_fn`` params) when
        ``key`` is None, else ``init(key)``.

        Example::

          variables = model.get_variables(jax.random.key(0))
        """
        if key is None and self.variables is not None:
            return self.variables
        if self.init is None:
            raise ValueError(f"{self.name}: this model cannot re-initialise itself; pass its variables "
                             "(or build it with a factory / init_fn)")
        if key is None:
            raise ValueError(f"{self.name}: pass variables or a key to initialise the model")
        return self.init(key)

    def update_nnx(self, module, params: PyTree, state: PyTree = None):
        """Write pure-dict ``params`` (and ``state``) into an NNX ``module`` with ``nnx.update``.

        Example::

          model.update_nnx(cnn, result.params)    # the pruned init, in place
        """
        if self.kind != "nnx":
            raise ValueError(f"update_nnx needs an NNX model; this one is {self.kind}")
        from flax import nnx

        p_state = nnx.state(module, nnx.Param)
        _replace_by_pure(p_state, params)
        nnx.update(module, p_state)
        if state is not None:
            s_state = nnx.state(module, nnx.BatchStat)
            _replace_by_pure(s_state, state)
            nnx.update(module, s_state)
        return module


# --------------------------------------------------------------------------- batch statistics


def batch_statistics(x: jax.Array, feature_axes: Sequence[int], *, fast_variance: bool = True,
                     unbiased: bool = True, dtype=None) -> tuple[jax.Array, jax.Array]:
    """Per-feature mean and variance of ``x`` over every axis but ``feature_axes``, under
    ``stop_gradient``.

    ``unbiased=True`` returns ``n/(n-1)`` times the biased variance (``n`` the number of
    values per feature, ``N·H·W`` for a conv feature map): PyTorch's running variance after a
    momentum-1.0 pass, which the official NTK-SAP code normalises with. ``fast_variance``
    picks Flax's ``E[x²] − E[x]²`` formula (clipped at 0) or the two-pass one.

    Example::

      mean, var = batch_statistics(h, (-1,))      # h: (N, H, W, C) -> (C,), (C,)
    """
    xs = jax.lax.stop_gradient(jnp.asarray(x, dtype) if dtype is not None else jnp.asarray(x))
    feat = tuple(a % xs.ndim for a in feature_axes)
    axes = tuple(a for a in range(xs.ndim) if a not in feat)
    mean = xs.mean(axes)
    if fast_variance:
        var = jnp.maximum(0.0, (xs * xs).mean(axes) - mean * mean)
    else:
        var = ((xs - mean.reshape([xs.shape[a] if a in feat else 1 for a in range(xs.ndim)])) ** 2).mean(axes)
    n = math.prod(xs.shape[a] for a in axes)
    if unbiased and n > 1:
        var = var * (n / (n - 1))
    return mean, var


# --------------------------------------------------------------------------- linen


_NORMS = (nn.BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


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
    """``{module path: (type, n_in axes or None)}`` recorded while tracing ``init``."""
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
            found[tuple(m.scope.path)] = (type(m), n_in)
        return next_fun(*args, **fkwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda k: module.init({"params": k, "dropout": k}, example, **kwargs), jax.random.key(0))
    return found


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
    shape = None if input_shape is None else tuple(int(s) for s in input_shape)
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
        leaf_shape = tuple(leaf_shape)
        if shape is not None and "modules" not in cache:
            cache["modules"] = _linen_layouts(module, jnp.zeros((1, *shape), jnp.float32), mode(False))
        owner = tuple(path_name([k]) for k in path[:-1])
        kind, n_in = cache.get("modules", {}).get(owner, (None, -1))
        if n_in is None or n_in == -1 or len(leaf_shape) < 2:
            return _last_axis_layout(leaf_shape)
        return WeightLayout(max(1, math.prod(leaf_shape[:n_in])), tuple(range(n_in, len(leaf_shape))))

    return Model(
        init=init, apply=apply, statistics=statistics,
        has_state=_linen_has_state(module, shape, mode, coll), prunable=prunable or _kernel_filter,
        layout=layout, norm_scale=norm_scale or _scale_filter, kind="linen", name=type(module).__name__,
        input_shape=shape, zoo=_is_zoo(module), module=module,
    )


def _linen_has_state(module, shape, mode, coll) -> bool | None:
    if shape is None or not callable(getattr(module, "init", None)):
        return None  # unknown until the variables are seen
    tree = jax.eval_shape(lambda k: module.init({"params": k, "dropout": k}, jnp.zeros((1, *shape)), **mode(False)),
                          jax.random.key(0))
    return coll in tree and bool(jax.tree.leaves(tree[coll]))


# --------------------------------------------------------------------------- NNX


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


def _to_pure(state):
    """``nnx.to_pure_dict(state)`` (flax ≥ 0.12), or the older ``state.to_pure_dict()``."""
    from flax import nnx

    return nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


def _replace_by_pure(state, pure) -> None:
    from flax import nnx

    if hasattr(nnx, "replace_by_pure_dict"):
        nnx.replace_by_pure_dict(state, pure)
    else:
        state.replace_by_pure_dict(pure)


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
    from flax import nnx

    factory = None
    if isinstance(module_or_factory, nnx.Module):
        module = module_or_factory
    elif callable(module_or_factory):
        factory = module_or_factory
        module = factory(nnx.Rngs(jax.random.key(0) if key is None else key))
        if not isinstance(module, nnx.Module):
            raise ValueError(f"the NNX factory must return an nnx.Module; got {type(module).__name__}")
    else:
        raise ValueError(f"from_nnx needs an nnx.Module or a factory rngs -> module; got {type(module_or_factory).__name__}")

    graphdef, p_state, s_state, rest = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
    p_def = jax.tree.structure(p_state)
    s_def = jax.tree.structure(s_state)
    has_state = bool(jax.tree.leaves(s_state))
    variables = {"params": _to_pure(p_state)}
    if has_state:
        variables["batch_stats"] = _to_pure(s_state)
    _check_pure_order(p_state, variables["params"])
    layouts = _nnx_layout_table(module)
    stats_bn = _make_stats_batchnorm()
    rest_leaves, rest_def = jax.tree.flatten(rest)

    def merged(params, state, rng=None):
        p = jax.tree.unflatten(p_def, jax.tree.leaves(params))
        s = jax.tree.unflatten(s_def, jax.tree.leaves(state)) if has_state else s_state
        leaves = rest_leaves
        if rng is not None:  # fresh dropout keys: every PRNG key of the module derived from rng
            leaves = [jax.random.fold_in(rng, i) if jax.dtypes.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key)
                      else leaf for i, leaf in enumerate(rest_leaves)]
        return nnx.merge(graphdef, p, s, jax.tree.unflatten(rest_def, leaves))

    def set_mode(m, train: bool, dropout: bool):
        for _, sub in nnx.iter_modules(m):
            if isinstance(sub, nnx.BatchNorm):
                sub.use_running_average = not train
            if isinstance(sub, nnx.Dropout):
                sub.deterministic = not dropout
            elif isinstance(sub, nnx.MultiHeadAttention):
                sub.deterministic = not dropout

    def state_of(m):
        return _to_pure(nnx.state(m, nnx.BatchStat)) if has_state else None

    def apply(params, state, x, *, train: bool = False, rng: jax.Array | None = None):
        m = merged(params, state, rng if train else None)
        set_mode(m, train, train and rng is not None)
        y = m(x)
        return y, (state_of(m) if train else state)

    def statistics(params, state, x):
        if not has_state:
            return state
        m = merged(jax.lax.stop_gradient(params), state)
        set_mode(m, True, False)
        for _, sub in nnx.iter_modules(m):
            if type(sub) is nnx.BatchNorm:
                sub.__class__ = stats_bn
            elif isinstance(sub, nnx.BatchNorm):
                raise ValueError(f"{type(sub).__name__}: a BatchNorm subclass; NTK-SAP's statistics need nnx.BatchNorm")
        m(x)
        return jax.lax.stop_gradient(state_of(m))

    def init(k):
        fresh = factory(nnx.Rngs(k))
        _, p, s, _ = nnx.split(fresh, nnx.Param, nnx.BatchStat, ...)
        out = {"params": _to_pure(p)}
        if has_state:
            out["batch_stats"] = _to_pure(s)
        return out

    def layout(path, leaf_shape):
        leaf_shape = tuple(leaf_shape)
        owner = tuple(path_name([k]) for k in path[:-1])
        n_in = layouts.get(owner, -1)
        if n_in == -1 or len(leaf_shape) < 2:
            return _last_axis_layout(leaf_shape)
        return WeightLayout(max(1, math.prod(leaf_shape[:n_in])), tuple(range(n_in, len(leaf_shape))))

    return Model(
        init=None if factory is None else init, apply=apply, statistics=statistics,
        has_state=has_state, prunable=prunable or _kernel_filter, layout=layout, norm_scale=norm_scale or _scale_filter,
        variables=variables, kind="nnx", name=type(module).__name__,
        input_shape=None if input_shape is None else tuple(int(s) for s in input_shape), module=module,
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


# --------------------------------------------------------------------------- plain apply functions


def _ndim2_filter(path, leaf) -> bool:
    return jnp.ndim(leaf) > 1


def _apply_fn_norm_scale(path, leaf) -> bool:
    return jnp.ndim(leaf) == 1 and _leaf_name(path) in ("scale", "weight", "gamma")


def _infer_layout(params) -> str:
    try:
        import equinox as eqx
    except ImportError:
        return "in_out"
    is_eqx = any(isinstance(node, eqx.Module) for node in jax.tree.leaves(params, is_leaf=lambda n: isinstance(n, eqx.Module)))
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
        layout_fn = lambda path, shape: _last_axis_layout(tuple(shape))  # noqa: E731
    elif layout == "out_in":
        layout_fn = lambda path, shape: _first_axis_layout(tuple(shape))  # noqa: E731
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
        input_shape=None if input_shape is None else tuple(int(s) for s in input_shape), to_native=to_native,
    )


# --------------------------------------------------------------------------- dispatch


def _is_nnx_module(obj) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, nnx.Module)


@functools.lru_cache(maxsize=64)
def _cached_linen(module: nn.Module, input_shape) -> Model:
    return from_linen(module, input_shape)


def as_model(model, input_shape: Sequence[int] | None = None) -> Model:
    """The :class:`Model` for ``model``: a :class:`Model` as is, a linen module through
    :func:`from_linen` (cached per module and shape), an NNX module through :func:`from_nnx`.

    A plain apply function needs its params: use :func:`from_apply_fn`.

    Example::

      model = as_model(get_model("resnet20", 10), (32, 32, 3))
    """
    if isinstance(model, Model):
        return model
    shape = None if input_shape is None else tuple(int(s) for s in input_shape)
    if _is_nnx_module(model):
        return from_nnx(model, shape)
    if isinstance(model, nn.Module) or callable(getattr(model, "apply", None)):  # linen, or linen's protocol
        try:
            return _cached_linen(model, shape)
        except TypeError:  # an unhashable module
            return from_linen(model, shape)
    if callable(model):
        raise ValueError("a plain function needs its params: build the model with "
                         "ntksap_jax.from_apply_fn(apply_fn, params)")
    raise ValueError(f"expected a flax.linen.Module, an nnx.Module or an ntksap_jax Model; got {type(model).__name__}")


def forward_order(model: Model, params: PyTree, state: PyTree, x: jax.Array) -> list[str]:
    """Dotted names of ``params``' leaves in the order the forward pass first uses them.

    Works for every front end (it reads the traced program, no FLOPs are spent): JAX sorts
    dict keys, so pytree order lists ``blocks_0`` before ``conv``; this gives the network's own
    order (stem first, classifier last), for :func:`ntksap_jax.masks.density_report`.

    Example::

      order = forward_order(model, params, state, jnp.zeros((1, 32, 32, 3)))
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    jaxpr = jax.make_jaxpr(lambda p: model.apply(p, state, x)[0])(params).jaxpr
    first = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if type(v).__name__ != "Literal" and v not in first:
                first[v] = i
    position = [first.get(v, len(jaxpr.eqns)) for v in jaxpr.invars[: len(flat)]]
    names = [path_name(p) for p, _ in flat]
    return [n for _, n in sorted(zip(position, names), key=lambda t: t[0])]
