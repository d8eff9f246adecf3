"""Training state and the jitted, pure training and evaluation steps.

* :func:`init_model`: the init the command line prunes and trains (``key(seed)`` split into
  ``(init_key, prune_key)``).
* :class:`TrainState` (a Flax ``TrainState`` with ``batch_stats``) and
  :func:`create_train_state` (params ``θ₀ ⊙ m``, optimiser ``masked(tx, masks)``).
* :func:`train_step` / :func:`eval_step` (jitted; the optimiser and the model's apply are
  static, so equal settings share one compilation) and :func:`evaluate` over a whole split.
* :func:`shard_state` (data- or model-parallel placement) and :func:`pruned_weights_are_zero`.

Example::

    model = get_model("mlp", 10)
    variables, prune_key = init_model(model, (8, 8, 1), seed=0)
    state = create_train_state(model, variables, masks, sgd(0.1, momentum=0.9))
    for batch in load("digits").train_batches(64, seed=0, epoch=0):
        state, metrics = train_step(state, batch)
    evaluate(state, load("digits"))       # {'loss': ..., 'top1': ..., 'top5': ..., 'count': 360}
    pruned_weights_are_zero(state.params, masks)   # True
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from ntksap_jax._checks import is_none
from ntksap_jax.masks import apply_masks, check_structure
from ntksap_jax.model import Model, as_model
from ntksap_jax.optim import MaskedState, masked, masked_for_state
from ntksap_jax.parallel import (
    batch_sharding,
    cpu_collectives_need_serial,
    data_parallel_size,
    mesh_context,
    param_shardings,
    place,
    replicated,
    shard_batch,
)

__all__ = [
    "TrainState",
    "init_model",
    "create_train_state",
    "train_step",
    "eval_step",
    "evaluate",
    "shard_state",
    "pruned_weights_are_zero",
]

PyTree = Any


class TrainState(train_state.TrainState):
    """A Flax ``TrainState`` (``step``, ``params``, ``opt_state``; static ``apply_fn``, ``tx``)
    plus the model's ``batch_stats`` (``{}`` for models without BatchNorm).

    ``apply_fn`` is a :class:`ntksap_jax.model.Model`'s ``apply(params, state, x, *, train,
    rng) -> (logits, state)``, for linen, NNX and ``apply_fn`` models alike.

    ``masks`` is the mask pytree stored in the :func:`ntksap_jax.optim.masked` optimiser state
    (``None`` for a dense run).

    Example::

      state = create_train_state(model, variables, masks, sgd(0.1))
      state.params, state.batch_stats, state.masks
    """

    batch_stats: PyTree = None

    @property
    def masks(self) -> PyTree:
        return self.opt_state.masks if isinstance(self.opt_state, MaskedState) else None


# --------------------------------------------------------------------------------------------
# Init and state
# --------------------------------------------------------------------------------------------


def init_model(model, input_shape: Sequence[int], seed: int) -> tuple[PyTree, jax.Array]:
    """The init the command line prunes: ``key(seed)`` split into ``(init_key, prune_key)``.

    Train a mask from the SAME init it was pruned on (the paper applies the mask to ``θ₀``).

    Args:
      model: a Flax module (e.g. from :func:`ntksap_jax.get_model`).
      input_shape: one example's shape, e.g. ``(32, 32, 3)``.
      seed: the integer seed given to ``ntksap-jax prune --seed``.

    Returns:
      ``(variables, prune_key)``: ``{"params", "batch_stats"?}`` and the key to prune with.

    Example::

      variables, prune_key = init_model(get_model("resnet20", 10), (32, 32, 3), seed=0)
    """
    init_key, prune_key = _seed_keys(int(seed))
    shape = tuple(int(d) for d in input_shape)
    spec = as_model(model, shape)
    if spec.init is None:  # an NNX instance or an apply_fn model without init_fn: its own variables
        return spec.get_variables(), prune_key
    return _compiled_init(spec)(init_key), prune_key


# The compiled init of each Model, for as long as that Model lives. as_model gives equal linen
# modules one Model (while its own cache holds it), so repeated init_model calls compile once;
# unlike the process-wide lru_cache this replaces, dropping a Model (e.g. a fresh NNX wrapper per
# call) drops its entry. The value, jax.jit(spec.init), refers to the init closure only, never to
# the Model, so it does not keep its key alive.
_COMPILED_INITS: weakref.WeakKeyDictionary[Model, Callable] = weakref.WeakKeyDictionary()


@functools.partial(jax.jit, static_argnums=0)
def _seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """``split(key(seed))`` as one compiled program (eager, it runs as four); the same keys."""
    return tuple(jax.random.split(jax.random.key(seed)))


def _compiled_init(spec: Model) -> Callable:
    init = _COMPILED_INITS.get(spec)
    if init is None:
        init = _COMPILED_INITS[spec] = jax.jit(spec.init)
    return init


def create_train_state(model, variables: PyTree, masks: PyTree, tx: optax.GradientTransformation) -> TrainState:
    """A :class:`TrainState` at step 0 with params ``θ₀ ⊙ m`` and optimiser ``masked(tx, masks)``.

    Args:
      model: a linen or NNX module or a :class:`ntksap_jax.model.Model` (its ``apply`` becomes
        ``state.apply_fn``).
      variables: ``{"params": ..., "batch_stats": ...}`` (``batch_stats`` optional), e.g.
        :func:`init_model`'s; ``None`` for an NNX module or ``apply_fn`` model: its current variables.
      masks: mask pytree for ``variables["params"]``, or ``None`` for dense training.
      tx: the optimiser, e.g. :func:`ntksap_jax.optim.sgd`; it is wrapped in
        :func:`ntksap_jax.optim.masked` here, so pruned weights cannot move whatever ``tx`` is.

    Example::

      state = create_train_state(model, variables, masks, sgd(0.1, momentum=0.9, weight_decay=1e-4))
      pruned_weights_are_zero(state.params, masks)   # True
    """
    spec = as_model(model)
    if variables is None and spec.variables is not None:
        variables = spec.variables
    if not isinstance(variables, dict) and not hasattr(variables, "keys"):
        raise ValueError(f"variables must be the dict returned by model.init; got {type(variables).__name__}")
    if "params" not in variables:
        raise ValueError(f"variables has no 'params' collection; got collections {sorted(variables)}")
    params = variables["params"]
    if masks is not None:
        check_structure(params, masks)
        params = apply_masks(params, masks)
    batch_stats = variables.get("batch_stats", {})
    opt_state = masked(tx, masks).init(params)
    return TrainState(step=jnp.zeros((), jnp.int32), apply_fn=spec.apply, params=params,
                      tx=tx if masks is None else masked_for_state(tx), opt_state=opt_state, batch_stats=batch_stats)


def shard_state(state: TrainState, mesh) -> TrainState:
    """Place a :class:`TrainState` on ``mesh``: replicated, or with kernels (and their masks and
    momenta) split over a ``model`` axis (:func:`ntksap_jax.parallel.param_shardings`).

    Example::

      state = shard_state(create_train_state(model, variables, masks, sgd(0.1)), make_mesh())
    """
    return place(state, param_shardings(state, mesh))


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def _batch_metrics(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> tuple[jax.Array, dict]:
    """Mean loss over the weighted examples and the summed metrics of one batch (the loss in
    float32 at least: half-precision logits go up to float32, float64 ones stay float64)."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    count = jnp.sum(weights)
    loss_sum = jnp.sum(ce * weights)
    k = min(5, logits.shape[-1])
    _, top = jax.lax.top_k(logits, k)
    hit_k = jnp.any(top == labels[:, None], axis=-1)
    hit_1 = jnp.argmax(logits, axis=-1) == labels
    w = weights > 0
    metrics = {
        "loss_sum": loss_sum.astype(jnp.float32),
        "correct_top1": jnp.sum(hit_1 & w, dtype=jnp.int32),
        "correct_top5": jnp.sum(hit_k & w, dtype=jnp.int32),
        "count": jnp.sum(w, dtype=jnp.int32),
    }
    return loss_sum / jnp.maximum(count, 1.0), metrics


#: The seed of the dropout keys ``fold_in(key(_DROPOUT_SEED), step)`` (models with dropout).
_DROPOUT_SEED = 0x5EED


def _train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """One optimiser step on a batch (BatchNorm in train mode; its running stats are updated).

    The loss is the mean cross-entropy over the examples with ``batch["mask"]`` True (all of
    a training batch), like PyTorch's ``CrossEntropyLoss``. On a state and batch placed on a
    mesh (:func:`shard_state`, :func:`ntksap_jax.parallel.shard_batch`) the same step runs
    data-parallel: the compiler averages the gradients and takes BatchNorm's statistics over
    the global batch, as one device would.

    Args:
      state: a :class:`TrainState`.
      batch: ``{"image": (B, H, W, C) float32, "label": (B,) int32, "mask": (B,) bool}``.

    Returns:
      ``(new_state, metrics)``; metrics are batch sums: ``loss_sum`` (float32),
      ``correct_top1``, ``correct_top5`` (top-min(5, classes)) and ``count`` (int32).

    Example::

      state, m = train_step(state, batch)
      float(m["loss_sum"]) / int(m["count"])
    """
    weights = batch["mask"].astype(jnp.float32)

    # Dropout (if the model has any) draws from a key that is a pure function of the step:
    # resuming from a checkpoint replays it bit for bit.
    rng = jax.random.fold_in(jax.random.key(_DROPOUT_SEED), state.step)

    def loss_fn(params):
        logits, stats = state.apply_fn(params, state.batch_stats or None, batch["image"], train=True, rng=rng)
        loss, metrics = _batch_metrics(logits, batch["label"], weights)
        return loss, (metrics, stats if stats else state.batch_stats)

    grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, metrics


train_step = jax.jit(_train_step)


def sharded_train_step(state: TrainState, mesh) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """:func:`train_step` compiled for ``state``'s layout on ``mesh`` (``state`` from
    :func:`shard_state`): the layout is pinned, so every step reuses one compilation.

    Example::

      step = sharded_train_step(state, mesh)
      state, m = step(state, shard_batch(batch, mesh))
    """
    shardings = param_shardings(state, mesh)
    return jax.jit(_train_step, in_shardings=(shardings, batch_sharding(mesh)),
                   out_shardings=(shardings, replicated(mesh)))


@jax.jit
def eval_step(state: TrainState, batch: dict) -> dict:
    """Summed metrics of one batch in eval mode (BatchNorm running stats); padded rows
    (``batch["mask"]`` False) do not count.

    Args:
      state: a :class:`TrainState`.
      batch: ``{"image", "label", "mask"}`` as for :func:`train_step`.

    Returns:
      ``{"loss_sum", "correct_top1", "correct_top5", "count"}`` (see :func:`train_step`).

    Example::

      m = eval_step(state, batch)
      int(m["correct_top1"]) / int(m["count"])
    """
    logits = state.apply_fn(state.params, state.batch_stats or None, batch["image"], train=False)[0]
    return _batch_metrics(logits, batch["label"], batch["mask"].astype(jnp.float32))[1]


# --------------------------------------------------------------------------------------------
# Metrics over many batches
# --------------------------------------------------------------------------------------------


_add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))


def accumulate(sums: dict | None, metrics: dict, serial: bool = False) -> dict:
    """``sums + metrics`` on the device (``metrics`` itself when ``sums`` is ``None``).

    ``serial``: wait for ``metrics`` first, for CPU meshes whose collectives must not overlap
    (:func:`ntksap_jax.parallel.cpu_collectives_need_serial`).

    Example::

      sums = None
      for batch in batches:
          sums = accumulate(sums, eval_step(state, batch))
    """
    if serial:
        jax.block_until_ready(metrics)
    return metrics if sums is None else _add(sums, metrics)


def summarise(sums: dict, top5: bool) -> dict:
    """Batch sums -> ``{"loss", "top1", "top5"?, "count"}`` (one host transfer).

    Example::

      summarise(sums, top5=False)   # {'loss': 0.09, 'top1': 0.975, 'count': 360}
    """
    host = jax.device_get(sums)
    count = int(host["count"])
    if count == 0:
        return {"count": 0}
    out = {"loss": float(host["loss_sum"]) / count, "top1": int(host["correct_top1"]) / count}
    if top5:
        out["top5"] = int(host["correct_top5"]) / count
    out["count"] = count
    return out


def evaluate(
    state: TrainState, dataset, batch_size: int = 256, split: str = "test", top5: bool = True, *, mesh=None
) -> dict:
    """Loss and accuracy of ``state`` over every example of a split, each counted once.

    Args:
      state: a :class:`TrainState`.
      dataset: an object with ``eval_batches(batch_size, split=...)`` (see ``ntksap_jax.data``).
      batch_size: evaluation batch size (divisible by the mesh's ``data`` axis with a mesh).
      split: the split name passed to ``eval_batches``.
      top5: include ``top5``.
      mesh: a device mesh (:func:`ntksap_jax.parallel.make_mesh`): every batch (the last one
        padded, its padding masked out) is split over the ``data`` axis and the whole split is
        still counted once. ``state`` should be on the mesh (:func:`shard_state`).

    Returns:
      ``{"loss", "top1", "top5"?, "count"}`` (accuracies are fractions in [0, 1]).

    Example::

      evaluate(state, load("digits"))   # {'loss': 0.09, 'top1': 0.975, 'top5': 1.0, 'count': 360}
    """
    check_divides("eval batch_size", batch_size, mesh)
    serial = cpu_collectives_need_serial(mesh)
    sums = None
    with mesh_context(mesh):
        for batch in dataset.eval_batches(batch_size, split=split):
            sums = accumulate(sums, eval_step(state, batch if mesh is None else shard_batch(batch, mesh)), serial)
    if sums is None:
        raise ValueError(f"the {split!r} split of the dataset gave no batches")
    return summarise(sums, top5)


def check_divides(name: str, batch_size: int, mesh) -> None:
    """``ValueError`` unless ``batch_size`` splits evenly over ``mesh``'s ``data`` axis (any
    size without a mesh).

    Example::

      check_divides("batch_size", 128, make_mesh(8))   # fine; 100 would raise
    """
    n = data_parallel_size(mesh)
    if batch_size % n:
        raise ValueError(f"{name} {batch_size} does not split evenly over the {n} devices of the mesh's "
                         f"'data' axis; use a multiple of {n}")


def pruned_weights_are_zero(params: PyTree, masks: PyTree) -> bool:
    """True iff every param entry where the mask is 0 is exactly ``0.0`` (``-0.0`` counts as 0).

    Example::

      assert pruned_weights_are_zero(result.state.params, masks)
    """
    if masks is None:
        return True
    check_structure(params, masks)
    flat_m = jax.tree.leaves(masks, is_leaf=is_none)
    flat_p = jax.tree.leaves(jax.tree.map(lambda m, p: None if m is None else p, masks, params, is_leaf=is_none),
                             is_leaf=is_none)
    for m, p in zip(flat_m, flat_p):
        if m is None:
            continue
        if np.any(np.asarray(p)[np.asarray(m) == 0] != 0):
            return False
    return True
