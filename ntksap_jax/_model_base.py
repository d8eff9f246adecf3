"""The :class:`Model` record, :class:`WeightLayout` and what every front end shares (private).

:mod:`ntksap_jax.model` is the public door: it re-exports :class:`Model`, :class:`WeightLayout`
and :func:`batch_statistics` and holds :func:`~ntksap_jax.model.as_model`. The front ends
(:mod:`ntksap_jax._linen`, :mod:`ntksap_jax._nnx`, :mod:`ntksap_jax._apply_fn`) build a
:class:`Model` from the pieces here: the default filters (``kernel_filter``,
``scale_filter``), the weight layouts (``last_axis_layout``, ``first_axis_layout``,
``table_layout``) and NNX's pure-dict conversions (``to_pure``, ``replace_by_pure``).

Example::

    layout = last_axis_layout((3, 3, 16, 32))      # WeightLayout(fan_in=144, out_axes=(3,))
    mean, var = batch_statistics(h, (-1,))         # per channel, unbiased variance
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from ntksap_jax.masks import path_name

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


def last_axis_layout(shape: Sequence[int]) -> WeightLayout:
    """Flax/stax layout: the last axis is the output; fan-in is the product of the others."""
    return WeightLayout(max(1, math.prod(shape[:-1])), (len(shape) - 1,))


def first_axis_layout(shape: Sequence[int]) -> WeightLayout:
    """PyTorch/Equinox layout ``(out, in, *kernel)``: the first axis is the output."""
    return WeightLayout(max(1, math.prod(shape[1:])), (0,))


def table_layout(table: dict, path: tuple, shape: Sequence[int]) -> WeightLayout:
    """The layout of the weight at ``path`` from ``table = {owner module path: n_in}``.

    ``n_in`` is the number of leading input axes of the owner's kernel; a missing owner,
    ``-1`` or ``None`` (and any 0-d/1-d leaf) is read as :func:`last_axis_layout`.
    """
    shape = tuple(shape)
    n_in = table.get(tuple(path_name([k]) for k in path[:-1]), -1)
    if n_in is None or n_in == -1 or len(shape) < 2:
        return last_axis_layout(shape)
    return WeightLayout(max(1, math.prod(shape[:n_in])), tuple(range(n_in, len(shape))))


def leaf_name(path) -> str:
    return path_name(path[-1:]) if path else ""


def kernel_filter(path, leaf) -> bool:
    """The default prunable filter of linen and NNX models: leaves named ``kernel``, ``ndim > 1``."""
    return leaf_name(path) == "kernel" and jnp.ndim(leaf) > 1


def scale_filter(path, leaf) -> bool:
    """The default normalisation scales of linen and NNX models: 1-D leaves named ``scale``."""
    return leaf_name(path) == "scale" and jnp.ndim(leaf) == 1


def as_shape(input_shape: Sequence[int] | None) -> tuple | None:
    """``input_shape`` as a tuple of ints, or ``None``."""
    return None if input_shape is None else tuple(int(s) for s in input_shape)


def to_pure(state):
    """``nnx.to_pure_dict(state)`` (flax ≥ 0.12), or the older ``state.to_pure_dict()``."""
    from flax import nnx

    return nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


def replace_by_pure(state, pure) -> None:
    """Write the pure dict ``pure`` into the NNX ``state`` in place (``nnx.replace_by_pure_dict``)."""
    from flax import nnx

    if hasattr(nnx, "replace_by_pure_dict"):
        nnx.replace_by_pure_dict(state, pure)
    else:
        state.replace_by_pure_dict(pure)


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
        replace_by_pure(p_state, params)
        nnx.update(module, p_state)
        if state is not None:
            s_state = nnx.state(module, nnx.BatchStat)
            replace_by_pure(s_state, state)
            nnx.update(module, s_state)
        return module


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
