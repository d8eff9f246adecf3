"""Sanity checks for pruning at initialization (Frankle et al. 2021; Su et al. 2020).

If a method's masks still train as well after these transforms, the method found only
per-layer ratios, not which weights matter:

* :func:`shuffle_masks` moves the kept positions at random within each layer (same per-layer
  counts). It really moves them — the public reference code's shuffle is a no-op.
* :func:`reinit_params` keeps the mask and draws new weights.
* inversion (prune the highest scores) is ``prune(..., invert=True)`` / ``--invert``.

Example::

    shuffled = shuffle_masks(jax.random.key(0), result.masks)
    params = reinit_params(jax.random.key(1), model, jnp.zeros((1, 32, 32, 3)), result.masks)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ntksap_jax.masks import apply_masks, check_structure
from ntksap_jax.model import as_model

__all__ = ["shuffle_masks", "reinit_params"]

PyTree = Any


def shuffle_masks(key: jax.Array, masks: PyTree) -> PyTree:
    """Permute each prunable layer's mask entries uniformly at random (counts per layer kept).

    Args:
      key: PRNG key (one sub-key per layer).
      masks: mask pytree.

    Returns:
      Masks of the same structure, shapes and per-layer kept counts, with kept positions
      drawn uniformly within each layer.

    Example::

      shuffled = shuffle_masks(jax.random.key(0), masks)
    """
    leaves, treedef = jax.tree.flatten(masks, is_leaf=lambda t: t is None)
    keys = jax.random.split(key, len(leaves))
    out = [
        None if m is None else jax.random.permutation(k, jnp.ravel(m)).reshape(jnp.shape(m))
        for k, m in zip(keys, leaves)
    ]
    return jax.tree.unflatten(treedef, out)


def reinit_params(key: jax.Array, model, example_input: jax.Array, masks: PyTree, **init_kwargs) -> PyTree:
    """Fresh params from ``model.init(key, example_input)`` with ``masks`` applied.

    Args:
      key: PRNG key for the new init (use one different from the original init's).
      model: a linen module, an NNX factory model or a :class:`ntksap_jax.model.Model` that
        can re-initialise itself.
      example_input: e.g. ``jnp.zeros((1, 32, 32, 3))``.
      masks: the mask to keep.
      **init_kwargs: explicit ``__call__`` arguments for a linen ``init`` (default: the
        model's eval-mode call convention, see :func:`ntksap_jax.model.from_linen`).

    Returns:
      ``new_params ⊙ masks`` (the ``"params"`` collection only).

    Example::

      params = reinit_params(jax.random.key(1), model, jnp.zeros((1, 32, 32, 3)), masks)
    """
    if init_kwargs:  # a linen module with explicit call arguments
        params = jax.jit(lambda k: model.init(k, example_input, **init_kwargs)["params"])(key)
    else:
        spec = as_model(model, tuple(jnp.shape(example_input)[1:]))
        params = jax.jit(lambda k: spec.get_variables(k)["params"])(key)
    check_structure(params, masks)
    return apply_masks(params, masks)
