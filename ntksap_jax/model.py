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

Three front ends build one (each in its own private module: ``_linen.py``, ``_nnx.py``,
``_apply_fn.py``; :class:`Model` itself lives in ``_model_base.py``, which they share), and
:func:`as_model` picks the right one:

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

The masked network: :func:`masked_apply_fn` is ``f(θ⊙m, x)`` in eval mode with fixed
statistics (ready for :func:`ntksap_jax.ntk.empirical_ntk`), and :func:`calibrated_batch_stats`
gives NTK-SAP's statistics of the masked network on a batch.

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

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax

from ntksap_jax._apply_fn import from_apply_fn
from ntksap_jax._linen import from_linen
from ntksap_jax._model_base import Model, WeightLayout, as_shape, batch_statistics
from ntksap_jax._nnx import from_nnx
from ntksap_jax.masks import apply_masks, path_name

__all__ = [
    "Model",
    "WeightLayout",
    "as_model",
    "from_linen",
    "from_nnx",
    "from_apply_fn",
    "batch_statistics",
    "forward_order",
    "masked_apply_fn",
    "calibrated_batch_stats",
]

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]

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
    shape = as_shape(input_shape)
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


def masked_apply_fn(model, masks: PyTree | None, batch_stats: PyTree | None) -> ApplyFn:
    """``f(params, x) = model(params ⊙ masks, x)`` in eval mode with ``batch_stats`` fixed.

    Args:
      model: a linen or NNX module or a :class:`Model` (any call convention).
      masks: mask pytree (``None`` leaves dense), or ``None`` for the dense network.
      batch_stats: the BatchNorm statistics to use (``None``/empty for models without BN).

    Returns:
      ``apply_fn(params, x) -> (N, K)`` logits, ready for :func:`ntksap_jax.empirical_ntk`.

    Example::

      stats = calibrated_batch_stats(model, params, masks, variables["batch_stats"], x)
      f = masked_apply_fn(model, masks, stats)
      theta = empirical_ntk(f, params, x)        # (N, N, K, K)
    """

    def apply_fn(params: PyTree, x: jax.Array) -> jax.Array:
        p = params if masks is None else apply_masks(params, masks)
        return as_model(model, tuple(x.shape[1:])).apply(p, batch_stats or None, x)[0]

    return apply_fn


def calibrated_batch_stats(
    model, params: PyTree, masks: PyTree | None, batch_stats: PyTree | None, x: jax.Array
) -> PyTree | None:
    """BatchNorm statistics of the masked network ``θ⊙m`` on the batch ``x`` (no gradient).

    Each BatchNorm's mean and unbiased variance of its input in the masked network (NTK-SAP's
    statistics: the official code's running statistics after a momentum-1.0 pass;
    :attr:`Model.statistics`, as :func:`ntksap_jax.scores.ntksap.bn_statistics`). Any model
    with linen or NNX BatchNorm layers works; no ``bn_momentum`` field is needed.
    ``batch_stats`` only supplies the structure; returns it unchanged for models
    without BatchNorm.

    Example::

      stats = calibrated_batch_stats(model, params, masks, variables["batch_stats"], x)
    """
    p = params if masks is None else apply_masks(params, masks)
    if not batch_stats:
        return batch_stats
    return as_model(model, tuple(x.shape[1:])).statistics(p, batch_stats, x)
