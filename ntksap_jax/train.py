"""Masked training: SGD (PyTorch semantics) on a pruned network whose pruned weights stay exactly 0.

The pieces, smallest first:

* :func:`masked` wraps any optax transformation so that its *final* updates are 0 on pruned
  entries (gradients are masked on the way in as well). With params that start at ``θ₀ ⊙ m``
  the pruned weights therefore stay exactly ``0.0`` whatever momentum or weight decay do.
* :func:`sgd` is PyTorch's ``torch.optim.SGD(momentum, nesterov, weight_decay)``, and
  :func:`make_schedule` its ``MultiStepLR`` (stepped once per epoch) or a cosine decay.
* :class:`TrainState` (a Flax ``TrainState`` with ``batch_stats``), :func:`create_train_state`,
  and the jitted, pure :func:`train_step` / :func:`eval_step`.
* :func:`train`: the epoch loop with a progress bar, test evaluation, ``metrics.jsonl`` and
  orbax checkpoints every epoch; ``resume=True`` continues bit-identically where it stopped.

Example::

    model = get_model("mlp", 10)
    variables, prune_key = init_model(model, (8, 8, 1), seed=0)
    masks = prune(ntksap_scorer(model, (8, 8, 1), samples=1), variables["params"],
                  density=0.1, iterations=20, key=prune_key).masks
    result = train(model, variables, masks, load("digits"), epochs=40, batch_size=64, lr=0.05,
                   weight_decay=5e-4, schedule="cosine", out_dir="runs/mlp")
    result.history[-1]["test_top1"], pruned_weights_are_zero(result.state.params, masks)  # (0.97.., True)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from flax.training import train_state

from ntksap_jax._io import atomic_write_text
from ntksap_jax.masks import apply_masks, check_structure, count_kept, count_total
from ntksap_jax.model import as_model
from ntksap_jax.parallel import (
    batch_sharding,
    cpu_collectives_need_serial,
    data_parallel_size,
    is_primary_process,
    mesh_context,
    param_shardings,
    place,
    replicated,
    shard_batch,
)

__all__ = [
    "SCHEDULES",
    "MaskedState",
    "TrainState",
    "TrainResult",
    "masked",
    "sgd",
    "make_schedule",
    "init_model",
    "create_train_state",
    "shard_state",
    "train_step",
    "eval_step",
    "evaluate",
    "train",
    "pruned_weights_are_zero",
]

PyTree = Any

#: Learning-rate schedules accepted by :func:`make_schedule` and :func:`train`.
SCHEDULES = ("step", "cosine", "constant")

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"


def _is_none(x) -> bool:
    return x is None


# --------------------------------------------------------------------------------------------
# Optimiser
# --------------------------------------------------------------------------------------------


class MaskedState(NamedTuple):
    """State of :func:`masked`: the inner transformation's state and the masks.

    The masks live in the optimiser state (not in a closure) so that jitted steps take them as
    arguments instead of baking them into the compiled program as constants, and so that a
    checkpoint carries the mask it was trained with.
    """

    inner_state: Any
    masks: PyTree


def _mask_tree(tree: PyTree, masks: PyTree) -> PyTree:
    """``tree`` with every entry where ``masks == 0`` set to exactly 0 (``None`` mask leaves: unchanged)."""
    return jax.tree.map(
        lambda m, t: t if m is None else jnp.where(m != 0, t, jnp.zeros_like(t)), masks, tree, is_leaf=_is_none
    )


def masked(inner: optax.GradientTransformation, masks: PyTree) -> optax.GradientTransformation:
    """Restrict an optax transformation to the kept weights.

    Gradients are zeroed on pruned entries before ``inner`` sees them, so its state (e.g. the
    momentum buffer) stays 0 there as in the official code, whose forward pass uses ``θ ⊙ m``.
    The final updates are zeroed there too (``jnp.where``, so even an ``inf``/``nan`` update
    cannot leak): together with params that start at ``θ₀ ⊙ m`` (see
    :func:`create_train_state`), pruned weights stay exactly ``0.0`` under any ``inner`` —
    momentum, Nesterov, L2 or decoupled weight decay, or state carried over from a denser mask.

    Args:
      inner: the optimiser to restrict, e.g. :func:`sgd`.
      masks: a params-shaped mask pytree (0/1 arrays on prunable leaves, ``None`` on dense
        ones; see :mod:`ntksap_jax.masks`), or ``None`` for no masking (returns ``inner``).
        For NNX, the pure-dict masks of :func:`ntksap_jax.prune_model` work with
        ``nnx.Optimizer(model, masked(tx, masks), wrt=nnx.Param)``.

    Returns:
      A transformation whose state is :class:`MaskedState` ``(inner_state, masks)``.

    Example::

      tx = masked(sgd(0.1, momentum=0.9, weight_decay=5e-4), masks)
      opt_state = tx.init(params)                               # params = apply_masks(θ₀, masks)
      updates, opt_state = tx.update(grads, opt_state, params)  # 0 wherever masks == 0
    """
    if masks is None:
        return inner

    def init_fn(params):
        aligned = _masks_for(params, masks)
        check_structure(params, aligned)
        stored = jax.tree.map(
            lambda m, p: None if m is None else jnp.asarray(m, jnp.result_type(p)), aligned, params, is_leaf=_is_none
        )
        return MaskedState(inner_state=inner.init(params), masks=stored)

    return optax.GradientTransformation(init_fn, _masked_update(inner))


def _masks_for(params, masks):
    """``masks`` in the structure of ``params``: as given, or, for an ``nnx.State`` of params
    (``nnx.Optimizer(model, masked(tx, masks), wrt=nnx.Param)``) and pure-dict masks (as
    :func:`ntksap_jax.prune_model` returns them), an ``nnx.State`` with ones on dense leaves."""
    if not hasattr(params, "to_pure_dict") or hasattr(masks, "to_pure_dict"):
        return masks
    from ntksap_jax.model import _replace_by_pure, _to_pure

    pure = _to_pure(params)
    check_structure(pure, masks)
    full = jax.tree.map(lambda m, p: jnp.ones_like(p) if m is None else jnp.asarray(m), masks, pure, is_leaf=_is_none)
    state = jax.tree.map(lambda p: p, params)
    _replace_by_pure(state, full)
    return state


@functools.lru_cache(maxsize=64)
def _masked_update(inner: optax.GradientTransformation) -> Callable:
    """The update of ``masked(inner, ·)``: one function object per ``inner`` (it reads the masks
    from the state), so jitted steps of states built for different masks share their compilation."""

    def update_fn(updates, state, params=None):
        updates = _mask_tree(updates, state.masks)
        updates, inner_state = inner.update(updates, state.inner_state, params)
        return _mask_tree(updates, state.masks), MaskedState(inner_state=inner_state, masks=state.masks)

    return update_fn


def _init_from_masked(params):
    raise ValueError("this optimiser's state is MaskedState(inner_state, masks): build it with "
                     "masked(inner, masks).init(params) or create_train_state")


@functools.lru_cache(maxsize=64)
def _masked_for_state(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """The ``tx`` a masked :class:`TrainState` holds: equal for equal ``inner`` (a static jit
    argument, so one compilation serves every mask and every :func:`train` call)."""
    return optax.GradientTransformation(_init_from_masked, _masked_update(inner))


def sgd(
    learning_rate: float | optax.Schedule,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """``torch.optim.SGD(lr, momentum, nesterov=nesterov, weight_decay=weight_decay)`` (dampening 0).

    PyTorch adds ``weight_decay · θ`` to the gradient *before* momentum (L2 regularisation,
    not decoupled decay), keeps ``buf ← momentum · buf + g`` (``buf = g`` on the first step,
    the same as a zero-initialised buffer), steps ``θ ← θ − lr · buf`` (Nesterov:
    ``θ ← θ − lr · (g + momentum · buf)``), and multiplies by the *current* learning rate
    after momentum. ``chain(add_decayed_weights, sgd)`` is exactly that. As in the official
    NTK-SAP / SynFlow code the decay applies to every parameter (biases and BatchNorm too).

    Args:
      learning_rate: a float or an optax schedule (``step -> lr``, see :func:`make_schedule`).
      momentum: in ``[0, 1)``; 0 is plain SGD.
      nesterov: Nesterov momentum (needs ``momentum > 0``, as in PyTorch).
      weight_decay: L2 coefficient ``>= 0``.

    Example::

      tx = sgd(make_schedule("step", 0.1, epochs=160, steps_per_epoch=391, milestones=(80, 120)),
               momentum=0.9, weight_decay=1e-4)
    """
    if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be in [0, 1); got {momentum!r}")
    if nesterov and momentum <= 0:
        raise ValueError(f"nesterov=True needs momentum > 0 (as in PyTorch); got momentum={momentum!r}")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0; got {weight_decay!r}")
    key = (learning_rate, float(momentum), bool(nesterov), float(weight_decay))
    try:
        hash(key)
    except TypeError:  # e.g. an array learning rate: build it, uncached
        return _sgd.__wrapped__(*key)
    return _sgd(*key)


@functools.lru_cache(maxsize=64)
def _sgd(learning_rate, momentum: float, nesterov: bool, weight_decay: float) -> optax.GradientTransformation:
    # Cached: equal settings give the same object, so TrainStates holding it (a static jit
    # argument) share one compilation of train_step / eval_step.
    parts = []
    if weight_decay > 0:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.sgd(learning_rate, momentum=momentum if momentum > 0 else None, nesterov=nesterov))
    return optax.chain(*parts)


def make_schedule(
    kind: str,
    base_lr: float,
    epochs: int,
    steps_per_epoch: int,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    warmup_epochs: int = 0,
) -> optax.Schedule:
    """Per-step learning-rate schedule, ``schedule(step) -> lr`` (a float32 scalar).

    * ``"step"``: PyTorch ``MultiStepLR`` stepped once per epoch: during epoch ``e``
      (0-based, the steps ``e · steps_per_epoch ..``) the rate is
      ``base_lr · gamma ** #{milestones <= e}`` (a repeated milestone counts twice, as in PyTorch).
    * ``"cosine"``: ``base_lr · (1 + cos(π · t / T)) / 2`` per step, from ``base_lr`` at
      step 0 to 0 at ``T = (epochs − warmup_epochs) · steps_per_epoch`` (and after).
    * ``"constant"``: ``base_lr``.

    ``warmup_epochs > 0`` first ramps linearly per step, ``base_lr · (s + 1) / W`` for the
    ``W = warmup_epochs · steps_per_epoch`` first steps (then ``"step"`` continues with its own
    milestones; ``"cosine"`` starts its decay after the warm-up).

    Args:
      kind: one of :data:`SCHEDULES`.
      base_lr: the initial rate, > 0.
      epochs: total epochs >= 1.
      steps_per_epoch: optimiser steps per epoch >= 1.
      milestones: epochs (0 < m) at which ``"step"`` multiplies the rate by ``gamma``.
      gamma: the ``"step"`` factor, > 0.
      warmup_epochs: linear warm-up epochs, ``0 <= warmup_epochs < epochs``.

    Example::

      lr = make_schedule("step", 0.1, epochs=160, steps_per_epoch=391, milestones=(80, 120))
      lr(80 * 391 - 1), lr(80 * 391)   # 0.1, 0.01
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; allowed: {', '.join(SCHEDULES)}")
    if not (isinstance(base_lr, (int, float)) and math.isfinite(base_lr) and base_lr > 0):
        raise ValueError(f"base_lr must be a positive number; got {base_lr!r}")
    for name, v in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer; got {v!r}")
    if not isinstance(warmup_epochs, (int, np.integer)) or not 0 <= warmup_epochs < epochs:
        raise ValueError(f"warmup_epochs must be an integer in [0, epochs={epochs}); got {warmup_epochs!r}")
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a positive number; got {gamma!r}")
    milestones = tuple(milestones)
    if any(not isinstance(m, (int, np.integer)) or m < 1 for m in milestones):
        raise ValueError(f"milestones must be positive integer epochs; got {milestones!r}")
    if kind != "step" and milestones:
        raise ValueError(f"milestones apply to the 'step' schedule only, not {kind!r}; got {milestones!r}")
    return _Schedule(kind, float(base_lr), int(epochs), int(steps_per_epoch), tuple(sorted(int(m) for m in milestones)),
                     float(gamma), int(warmup_epochs))


@dataclasses.dataclass(frozen=True)
class _Schedule:
    """A :func:`make_schedule` schedule: a callable ``step -> lr``, equal (and hashable) by its
    settings so that optimisers built from equal settings are equal (see :func:`sgd`)."""

    kind: str
    base_lr: float
    epochs: int
    steps_per_epoch: int
    milestones: tuple
    gamma: float
    warmup_epochs: int

    def __call__(self, count):
        count = jnp.asarray(count, jnp.int32)
        base, spe = self.base_lr, self.steps_per_epoch
        warmup_steps = self.warmup_epochs * spe
        if self.kind == "step":
            ms = jnp.asarray(self.milestones, jnp.int32)
            drops = jnp.sum(count // spe >= ms) if self.milestones else jnp.int32(0)
            lr = base * jnp.power(jnp.float32(self.gamma), drops.astype(jnp.float32))
        elif self.kind == "cosine":
            decay_steps = (self.epochs - self.warmup_epochs) * spe
            t = jnp.clip(count - warmup_steps, 0, decay_steps).astype(jnp.float32)
            lr = 0.5 * base * (1.0 + jnp.cos(jnp.pi * t / decay_steps))
        else:
            lr = jnp.float32(base)
        if warmup_steps:
            ramp = jnp.minimum((count + 1).astype(jnp.float32) / warmup_steps, 1.0)
            lr = jnp.where(count < warmup_steps, base * ramp, lr)
        return jnp.asarray(lr, jnp.float32)


# --------------------------------------------------------------------------------------------
# State and steps
# --------------------------------------------------------------------------------------------


class TrainState(train_state.TrainState):
    """A Flax ``TrainState`` (``step``, ``params``, ``opt_state``; static ``apply_fn``, ``tx``)
    plus the model's ``batch_stats`` (``{}`` for models without BatchNorm).

    ``apply_fn`` is a :class:`ntksap_jax.model.Model`'s ``apply(params, state, x, *, train,
    rng) -> (logits, state)``, for linen, NNX and ``apply_fn`` models alike.

    ``masks`` is the mask pytree stored in the :func:`masked` optimiser state (``None`` for
    a dense run).

    Example::

      state = create_train_state(model, variables, masks, sgd(0.1))
      state.params, state.batch_stats, state.masks
    """

    batch_stats: PyTree = None

    @property
    def masks(self) -> PyTree:
        return self.opt_state.masks if isinstance(self.opt_state, MaskedState) else None


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
    init_key, prune_key = jax.random.split(jax.random.key(seed))
    shape = tuple(int(d) for d in input_shape)
    spec = as_model(model, shape)
    if spec.init is None:  # an NNX instance or an apply_fn model without init_fn: its own variables
        return spec.get_variables(), prune_key
    try:
        init = _jitted_init(spec)
    except TypeError:  # an unhashable model
        init = _jitted_init.__wrapped__(spec)
    return init(init_key), prune_key


@functools.lru_cache(maxsize=32)
def _jitted_init(spec) -> Callable:
    # Cached per model: equal modules share one Model (as_model's cache) and so one compilation.
    return jax.jit(spec.init)


def create_train_state(model, variables: PyTree, masks: PyTree, tx: optax.GradientTransformation) -> TrainState:
    """A :class:`TrainState` at step 0 with params ``θ₀ ⊙ m`` and optimiser ``masked(tx, masks)``.

    Args:
      model: a linen or NNX module or a :class:`ntksap_jax.model.Model` (its ``apply`` becomes
        ``state.apply_fn``).
      variables: ``{"params": ..., "batch_stats": ...}`` (``batch_stats`` optional), e.g.
        :func:`init_model`'s; ``None`` for an NNX module or ``apply_fn`` model: its current variables.
      masks: mask pytree for ``variables["params"]``, or ``None`` for dense training.
      tx: the optimiser, e.g. :func:`sgd`; it is wrapped in :func:`masked` here, so pruned
        weights cannot move whatever ``tx`` is.

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
                      tx=tx if masks is None else _masked_for_state(tx), opt_state=opt_state, batch_stats=batch_stats)


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


_add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))


def _summarise(sums: dict, top5: bool) -> dict:
    """Batch sums -> ``{"loss", "top1", "top5"?, "count"}`` (one host transfer)."""
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
    _check_divides("eval batch_size", batch_size, mesh)
    serial = cpu_collectives_need_serial(mesh)
    sums = None
    with mesh_context(mesh):
        for batch in dataset.eval_batches(batch_size, split=split):
            m = eval_step(state, batch if mesh is None else shard_batch(batch, mesh))
            if serial:
                jax.block_until_ready(m)
            sums = m if sums is None else _add(sums, m)
    if sums is None:
        raise ValueError(f"the {split!r} split of the dataset gave no batches")
    return _summarise(sums, top5)


def _check_divides(name: str, batch_size: int, mesh) -> None:
    n = data_parallel_size(mesh)
    if batch_size % n:
        raise ValueError(f"{name} {batch_size} does not split evenly over the {n} devices of the mesh's "
                         f"'data' axis; use a multiple of {n}")


def shard_state(state: TrainState, mesh) -> TrainState:
    """Place a :class:`TrainState` on ``mesh``: replicated, or with kernels (and their masks and
    momenta) split over a ``model`` axis (:func:`ntksap_jax.parallel.param_shardings`).

    Example::

      state = shard_state(create_train_state(model, variables, masks, sgd(0.1)), make_mesh())
    """
    return place(state, param_shardings(state, mesh))


def pruned_weights_are_zero(params: PyTree, masks: PyTree) -> bool:
    """True iff every param entry where the mask is 0 is exactly ``0.0`` (``-0.0`` counts as 0).

    Example::

      assert pruned_weights_are_zero(result.state.params, masks)
    """
    if masks is None:
        return True
    check_structure(params, masks)
    flat_m = jax.tree.leaves(masks, is_leaf=_is_none)
    flat_p = jax.tree.leaves(jax.tree.map(lambda m, p: None if m is None else p, masks, params, is_leaf=_is_none),
                             is_leaf=_is_none)
    for m, p in zip(flat_m, flat_p):
        if m is None:
            continue
        if np.any(np.asarray(p)[np.asarray(m) == 0] != 0):
            return False
    return True


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------


class TrainResult(NamedTuple):
    """What :func:`train` returns.

    Attributes:
      state: the final :class:`TrainState`.
      history: one dict per completed epoch (the ``metrics.jsonl`` rows, earlier runs'
        included when resumed).
      epoch: epochs completed.
    """

    state: TrainState
    history: list
    epoch: int


def _read_metrics(path: str) -> list:
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    break  # a torn last line (the file is rewritten atomically, so only from outside)
    return rows


def _write_metrics(path: str, rows: list) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _checkpoint_tree(state: TrainState) -> dict:
    return {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": serialization.to_state_dict(state.opt_state),
    }


def _masks_equal(a: PyTree, b: PyTree) -> bool:
    la, lb = jax.tree.leaves(a, is_leaf=_is_none), jax.tree.leaves(b, is_leaf=_is_none)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if (x is None) != (y is None):
            return False
        if x is not None and not np.array_equal(np.asarray(x) != 0, np.asarray(y) != 0):
            return False
    return True


def _checkpoint_manager(directory: str, keep: int):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.abspath(directory), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    )


def _check_positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive integer; got {v!r}")
    return int(v)


def train(
    model,
    variables: PyTree,
    masks: PyTree,
    dataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    schedule: str = "step",
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    warmup_epochs: int = 0,
    seed: int = 0,
    out_dir: str | None = None,
    resume: bool = False,
    progress: bool = True,
    eval_every: int = 1,
    eval_batch_size: int = 256,
    top5: bool = False,
    keep_checkpoints: int = 3,
    stop_after: int | None = None,
    callback: Callable[[dict], None] | None = None,
    mesh=None,
) -> TrainResult:
    """Train ``θ₀ ⊙ m`` with SGD for ``epochs`` epochs; pruned weights stay exactly 0.

    Each epoch ``e`` (0-based) draws its batches from ``dataset.train_batches(batch_size,
    seed=seed, epoch=e)`` — a pure function of ``(seed, e)`` — shows a progress bar, evaluates
    on the test split (every ``eval_every`` epochs and after the last), appends a row to
    ``out_dir/metrics.jsonl`` and saves an orbax checkpoint (state, epoch, seed and config) to
    ``out_dir/checkpoints/<epoch>``, keeping the last ``keep_checkpoints``. With
    ``resume=True`` the latest checkpoint is restored and training continues from the next
    epoch; since nothing else is random, the result is bit-identical to an uninterrupted run,
    and ``metrics.jsonl`` is cut back to the restored epoch so no epoch is listed twice.

    Rows: ``{"epoch" (1-based, completed), "step", "lr" (at the epoch's first step),
    "train_loss", "train_top1", ["train_top5"], ["test_loss", "test_top1", ["test_top5"],
    "test_count"], "density", "seconds"}``; accuracies are fractions in [0, 1].

    Args:
      model: the Flax module.
      variables: ``model.init`` output: the SAME init the masks were pruned on (see :func:`init_model`).
      masks: mask pytree for ``variables["params"]`` or ``None`` (dense).
      dataset: an ``ntksap_jax.data`` dataset (``train_batches``, ``steps_per_epoch``, ``eval_batches``).
      epochs: total epochs (the schedule's length).
      batch_size: training batch size.
      lr, momentum, nesterov, weight_decay: :func:`sgd` (PyTorch semantics).
      schedule, milestones, gamma, warmup_epochs: :func:`make_schedule`.
      seed: data-order seed (recorded in checkpoints; a resumed run must use the same).
      out_dir: folder for ``metrics.jsonl`` and ``checkpoints/``; ``None``: nothing written.
      resume: continue from the latest checkpoint in ``out_dir`` (from scratch if there is none).
      progress: show a tqdm bar per epoch (on stderr).
      eval_every: evaluate every this many epochs (and after the last).
      eval_batch_size: evaluation batch size.
      top5: also report top-5 accuracy (ImageNet-scale runs).
      keep_checkpoints: how many most recent checkpoints to keep.
      stop_after: return after this many epochs in total (e.g. to fit a time limit; a later
        call with ``resume=True`` continues). Default: ``epochs``.
      callback: called with each epoch's row.
      mesh: a device mesh (:func:`ntksap_jax.parallel.make_mesh`) to train data-parallel on:
        the state is placed with :func:`shard_state`, every batch is split over the ``data``
        axis (``batch_size`` and ``eval_batch_size`` must divide by its size), gradients are
        averaged and BatchNorm statistics taken over the global batch by the compiler, so the
        run matches a one-device run up to float32 rounding. Across hosts every process calls
        ``train`` with the same arguments; only process 0 writes ``metrics.jsonl``, and orbax
        writes each checkpoint once. ``None``: one device.

    Returns:
      :class:`TrainResult` ``(state, history, epoch)``.

    Raises:
      ValueError: a bad argument; ``out_dir`` already holds checkpoints and ``resume`` is
        False; or the checkpoint was written with another config, seed or mask.

    Example::

      result = train(model, variables, masks, load("digits"), epochs=40, batch_size=64, lr=0.05,
                     schedule="cosine", weight_decay=5e-4, out_dir="runs/mlp")
      result = train(..., out_dir="runs/mlp", resume=True)   # after an interruption
    """
    epochs = _check_positive_int("epochs", epochs)
    batch_size = _check_positive_int("batch_size", batch_size)
    eval_every = _check_positive_int("eval_every", eval_every)
    eval_batch_size = _check_positive_int("eval_batch_size", eval_batch_size)
    keep_checkpoints = _check_positive_int("keep_checkpoints", keep_checkpoints)
    stop = epochs if stop_after is None else _check_positive_int("stop_after", stop_after)
    if stop > epochs:
        raise ValueError(f"stop_after must be <= epochs={epochs}; got {stop_after!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer; got {seed!r}")
    if resume and out_dir is None:
        raise ValueError("resume=True needs the out_dir that holds the checkpoints; got out_dir=None")
    _check_divides("batch_size", batch_size, mesh)
    _check_divides("eval_batch_size", eval_batch_size, mesh)
    steps_per_epoch = int(dataset.steps_per_epoch(batch_size))
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} gives no full training batch for this dataset")
    lr_fn = make_schedule(schedule, lr, epochs, steps_per_epoch, milestones, gamma, warmup_epochs)
    tx = sgd(lr_fn, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    state = create_train_state(model, variables, masks, tx)
    step_fn = train_step
    if mesh is not None:
        state = shard_state(state, mesh)
        shardings = param_shardings(state, mesh)
        # Pin the state's layout so that every step reuses one compilation.
        step_fn = jax.jit(_train_step, in_shardings=(shardings, batch_sharding(mesh)),
                          out_shardings=(shardings, replicated(mesh)))
    serial = cpu_collectives_need_serial(mesh)
    density = 1.0 if masks is None else count_kept(masks) / max(count_total(masks), 1)
    config = {
        "epochs": epochs, "batch_size": batch_size, "lr": float(lr), "momentum": float(momentum),
        "nesterov": bool(nesterov), "weight_decay": float(weight_decay), "schedule": schedule,
        "milestones": [int(m) for m in milestones], "gamma": float(gamma), "warmup_epochs": int(warmup_epochs),
        "seed": int(seed), "steps_per_epoch": steps_per_epoch, "density": density,
    }

    from tqdm import tqdm

    start, history, manager, metrics_path = 0, [], None, None
    try:
        if out_dir is not None:
            os.makedirs(out_dir, exist_ok=True)
            metrics_path = os.path.join(out_dir, METRICS_FILE)
            manager = _checkpoint_manager(os.path.join(out_dir, CHECKPOINT_DIR), keep_checkpoints)
            latest = manager.latest_step()
            if latest is not None and not resume:
                raise ValueError(
                    f"{out_dir!r} already holds checkpoints (latest: epoch {latest}); pass resume=True to "
                    "continue or choose a new out_dir"
                )
            if latest is not None:
                state = _restore(manager, latest, state, config, masks, mesh)
                start = latest
                history = [r for r in _read_metrics(metrics_path) if int(r.get("epoch", 0)) <= latest]
            # a fresh run starts a fresh file; a resumed one drops rows written after its checkpoint
            if is_primary_process():
                _write_metrics(metrics_path, history)
        done = start

        for epoch in range(start, stop):
            t0 = time.perf_counter()
            row = {"epoch": epoch + 1, "lr": float(f"{float(lr_fn(epoch * steps_per_epoch)):.8g}")}
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                       disable=not progress, file=sys.stderr, leave=True)
            sums = None
            for i, batch in enumerate(dataset.train_batches(batch_size, seed=seed, epoch=epoch)):
                if mesh is not None:
                    batch = shard_batch(batch, mesh)
                with mesh_context(mesh):
                    state, m = step_fn(state, batch)
                if serial:
                    jax.block_until_ready(m)
                sums = m if sums is None else _add(sums, m)
                bar.update(1)
                if progress and (i % 20 == 0 or i + 1 == steps_per_epoch):
                    bar.set_postfix(loss=f"{float(m['loss_sum']) / max(int(m['count']), 1):.4f}")
            if sums is None:
                raise ValueError(f"epoch {epoch}: the dataset gave no training batches")
            row["step"] = int(state.step)
            row.update({f"train_{k}": v for k, v in _summarise(sums, top5).items() if k != "count"})
            if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
                row.update({f"test_{k}": v for k, v in
                            evaluate(state, dataset, eval_batch_size, "test", top5, mesh=mesh).items()})
            row["density"] = density
            row["seconds"] = time.perf_counter() - t0
            if progress:
                shown = {k: round(row[k], 4) for k in ("train_loss", "train_top1", "test_top1") if k in row}
                bar.set_postfix(shown)
            bar.close()
            history.append(row)
            if manager is not None:
                if is_primary_process():
                    _write_metrics(metrics_path, history)
                _save(manager, epoch + 1, state, config)  # every process calls it; orbax writes once
            done = epoch + 1
            if callback is not None:
                callback(row)
    finally:
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
    return TrainResult(state=state, history=history, epoch=done)


def _save(manager, epoch: int, state: TrainState, config: dict) -> None:
    import orbax.checkpoint as ocp

    meta = {"epoch": epoch, "step": int(state.step), "seed": config["seed"], "config": config}
    manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(_checkpoint_tree(state)),
                                                meta=ocp.args.JsonSave(meta)))


def _restore(manager, epoch: int, state: TrainState, config: dict, masks: PyTree, mesh=None) -> TrainState:
    import orbax.checkpoint as ocp

    meta = manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    saved = dict(meta.get("config", {}))
    now = json.loads(json.dumps(config))
    diff = {k: (saved.get(k), now[k]) for k in now if saved.get(k) != now[k]}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"cannot resume: the checkpoint at epoch {epoch} was written with another config ({detail})")
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _checkpoint_tree(state))
    restored = manager.restore(epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
    if mesh is None:
        # Orbax returns device-committed arrays; fresh ones are uncommitted, and jit keys its cache on
        # that, so re-create them uncommitted (one host round trip) to reuse train_step's compilation.
        restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), restored)
    # (on a mesh the target carried the state's shardings, so orbax restored each shard in place)
    opt_state = serialization.from_state_dict(state.opt_state, restored["opt_state"])
    if isinstance(opt_state, MaskedState) and not _masks_equal(opt_state.masks, masks):
        raise ValueError(f"cannot resume: the checkpoint at epoch {epoch} was trained with a different mask")
    return state.replace(step=restored["step"], params=restored["params"], batch_stats=restored["batch_stats"],
                         opt_state=opt_state)
