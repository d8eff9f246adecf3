"""Optimisers and learning-rate schedules for masked training.

* :func:`masked` wraps any optax transformation so that its *final* updates are 0 on pruned
  entries (gradients are masked on the way in as well). With params that start at ``θ₀ ⊙ m``
  the pruned weights therefore stay exactly ``0.0`` whatever momentum or weight decay do.
* :func:`sgd` is PyTorch's ``torch.optim.SGD(momentum, nesterov, weight_decay)``, and
  :func:`make_schedule` its ``MultiStepLR`` (stepped once per epoch), a cosine decay or a
  constant rate (:data:`LR_SCHEDULES`).

The transformations built here from equal settings are *equal* (value-equal callables, not
cached objects): a :class:`ntksap_jax.steps.TrainState` holds its optimiser as a static jit
argument, so equal settings share one compilation of the jitted steps without any module-level
cache keeping optimisers alive.

Example::

    lr = make_schedule("step", 0.1, epochs=160, steps_per_epoch=391, milestones=(80, 120))
    tx = masked(sgd(lr, momentum=0.9, weight_decay=1e-4), masks)
    opt_state = tx.init(params)                               # params = apply_masks(θ₀, masks)
    updates, opt_state = tx.update(grads, opt_state, params)  # 0 wherever masks == 0
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntksap_jax._checks import is_none, positive_int
from ntksap_jax.masks import check_structure

__all__ = ["LR_SCHEDULES", "MaskedState", "masked", "sgd", "make_schedule"]

PyTree = Any

#: Learning-rate schedules accepted by :func:`make_schedule` and :func:`ntksap_jax.train.train`
#: (not to be confused with :data:`ntksap_jax.schedules.SCHEDULES`, the density schedules).
LR_SCHEDULES = ("step", "cosine", "constant")


# --------------------------------------------------------------------------------------------
# Masking
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
        lambda m, t: t if m is None else jnp.where(m != 0, t, jnp.zeros_like(t)), masks, tree, is_leaf=is_none
    )


def masked(inner: optax.GradientTransformation, masks: PyTree) -> optax.GradientTransformation:
    """Restrict an optax transformation to the kept weights.

    Gradients are zeroed on pruned entries before ``inner`` sees them, so its state (e.g. the
    momentum buffer) stays 0 there as in the official code, whose forward pass uses ``θ ⊙ m``.
    The final updates are zeroed there too (``jnp.where``, so even an ``inf``/``nan`` update
    cannot leak): together with params that start at ``θ₀ ⊙ m`` (see
    :func:`ntksap_jax.steps.create_train_state`), pruned weights stay exactly ``0.0`` under any
    ``inner`` — momentum, Nesterov, L2 or decoupled weight decay, or state carried over from a
    denser mask.

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
            lambda m, p: None if m is None else jnp.asarray(m, jnp.result_type(p)), aligned, params, is_leaf=is_none
        )
        return MaskedState(inner_state=inner.init(params), masks=stored)

    return optax.GradientTransformation(init_fn, _MaskedUpdate(inner))


def _masks_for(params, masks):
    """``masks`` in the structure of ``params``: as given, or, for an ``nnx.State`` of params
    (``nnx.Optimizer(model, masked(tx, masks), wrt=nnx.Param)``) and pure-dict masks (as
    :func:`ntksap_jax.prune_model` returns them), an ``nnx.State`` with ones on dense leaves."""
    if not hasattr(params, "to_pure_dict") or hasattr(masks, "to_pure_dict"):
        return masks
    from ntksap_jax._model_base import replace_by_pure, to_pure

    pure = to_pure(params)
    check_structure(pure, masks)
    full = jax.tree.map(lambda m, p: jnp.ones_like(p) if m is None else jnp.asarray(m), masks, pure, is_leaf=is_none)
    state = jax.tree.map(lambda p: p, params)
    replace_by_pure(state, full)
    return state


@dataclasses.dataclass(frozen=True)
class _MaskedUpdate:
    """The update of ``masked(inner, ·)``. It reads the masks from the state, so it depends on
    ``inner`` only, and updates of equal ``inner`` are equal: jitted steps of states built for
    different masks share their compilation."""

    inner: optax.GradientTransformation

    def __call__(self, updates, state, params=None):
        updates = _mask_tree(updates, state.masks)
        updates, inner_state = self.inner.update(updates, state.inner_state, params)
        return _mask_tree(updates, state.masks), MaskedState(inner_state=inner_state, masks=state.masks)


def _init_from_masked(params):
    raise ValueError("this optimiser's state is MaskedState(inner_state, masks): build it with "
                     "masked(inner, masks).init(params) or create_train_state")


def masked_for_state(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """The ``tx`` a masked :class:`ntksap_jax.steps.TrainState` holds (its state comes from
    ``masked(inner, masks).init``): equal for equal ``inner``, so one compilation of the jitted
    steps serves every mask and every :func:`ntksap_jax.train.train` call.

    Example::

      state = TrainState(..., tx=masked_for_state(tx), opt_state=masked(tx, masks).init(params))
    """
    return optax.GradientTransformation(_init_from_masked, _MaskedUpdate(inner))


# --------------------------------------------------------------------------------------------
# SGD
# --------------------------------------------------------------------------------------------


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

    Returns:
      The transformation; with a hashable ``learning_rate`` (a float, a :func:`make_schedule`
      schedule, any function), equal arguments give equal transformations.

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
    settings = _SgdSettings(learning_rate, float(momentum), bool(nesterov), float(weight_decay))
    try:
        hash(settings)
    except TypeError:  # e.g. an array learning rate: no value equality, the optax chain itself
        return settings.build()
    return optax.GradientTransformationExtraArgs(_SgdInit(settings), _SgdUpdate(settings))


@dataclasses.dataclass(frozen=True)
class _SgdSettings:
    """:func:`sgd`'s arguments, equal and hashable by value (a hashable learning rate)."""

    learning_rate: Any
    momentum: float
    nesterov: bool
    weight_decay: float

    def build(self) -> optax.GradientTransformationExtraArgs:
        parts = []
        if self.weight_decay > 0:
            parts.append(optax.add_decayed_weights(self.weight_decay))
        parts.append(optax.sgd(self.learning_rate, momentum=self.momentum if self.momentum > 0 else None,
                               nesterov=self.nesterov))
        return optax.chain(*parts)


# The init and update of sgd(): the optax chain of their settings, built when called (at trace
# time inside jit). Equal settings give equal functions, so TrainStates holding equal optimisers
# (a static jit argument) share one compilation of train_step / eval_step across train() calls.


@dataclasses.dataclass(frozen=True)
class _SgdInit:
    settings: _SgdSettings

    def __call__(self, params):
        return self.settings.build().init(params)


@dataclasses.dataclass(frozen=True)
class _SgdUpdate:
    settings: _SgdSettings

    def __call__(self, updates, state, params=None, **extra_args):
        return self.settings.build().update(updates, state, params, **extra_args)


# --------------------------------------------------------------------------------------------
# Learning-rate schedules
# --------------------------------------------------------------------------------------------


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
      kind: one of :data:`LR_SCHEDULES`.
      base_lr: the initial rate, > 0.
      epochs: total epochs >= 1.
      steps_per_epoch: optimiser steps per epoch >= 1.
      milestones: epochs (0 < m) at which ``"step"`` multiplies the rate by ``gamma``.
      gamma: the ``"step"`` factor, > 0.
      warmup_epochs: linear warm-up epochs, ``0 <= warmup_epochs < epochs``.

    Returns:
      The schedule, equal (and hashable) by its settings.

    Example::

      lr = make_schedule("step", 0.1, epochs=160, steps_per_epoch=391, milestones=(80, 120))
      lr(80 * 391 - 1), lr(80 * 391)   # 0.1, 0.01
    """
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; allowed: {', '.join(LR_SCHEDULES)}")
    if not (isinstance(base_lr, (int, float)) and math.isfinite(base_lr) and base_lr > 0):
        raise ValueError(f"base_lr must be a positive number; got {base_lr!r}")
    epochs = positive_int(epochs, "epochs")
    steps_per_epoch = positive_int(steps_per_epoch, "steps_per_epoch")
    if not isinstance(warmup_epochs, (int, np.integer)) or not 0 <= warmup_epochs < epochs:
        raise ValueError(f"warmup_epochs must be an integer in [0, epochs={epochs}); got {warmup_epochs!r}")
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a positive number; got {gamma!r}")
    milestones = tuple(milestones)
    if any(not isinstance(m, (int, np.integer)) or m < 1 for m in milestones):
        raise ValueError(f"milestones must be positive integer epochs; got {milestones!r}")
    if kind != "step" and milestones:
        raise ValueError(f"milestones apply to the 'step' schedule only, not {kind!r}; got {milestones!r}")
    return _Schedule(kind, float(base_lr), epochs, steps_per_epoch, tuple(sorted(int(m) for m in milestones)),
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
