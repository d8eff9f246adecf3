"""Data-free, model-free baselines: Gaussian-random and magnitude scores.

Both follow the scorer protocol ``score(params, masks, batch_stats, key) -> scores``
(a pytree shaped like ``masks``; ``None`` on dense leaves).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from ntksap_jax._checks import is_none as _is_none
from ntksap_jax.ntk import gaussian_like
from ntksap_jax.scores._protocol import ScoreFn, TraceCounter

__all__ = ["random_scorer", "magnitude_scorer"]

PyTree = Any


def random_scorer(model=None, input_shape: Sequence[int] | None = None):
    """Scores ``~ N(0, 1)`` i.i.d. (the official ``Rand`` pruner): a uniformly random mask.

    Example::

      score = random_scorer()
      s = score(params, masks, None, jax.random.key(0))
    """

    counter = TraceCounter()

    @jax.jit
    @counter.wrap
    def score(params, masks, batch_stats, key):
        return gaussian_like(key, masks)

    return ScoreFn(score, counter, lambda *args: [(score.lower(*args), 1)])


def magnitude_scorer(model=None, input_shape: Sequence[int] | None = None):
    """Scores ``|θ|`` (the official ``Mag`` pruner).

    Example::

      s = magnitude_scorer()(params, masks, None, jax.random.key(0))
    """

    counter = TraceCounter()

    @jax.jit
    @counter.wrap
    def score(params, masks, batch_stats, key):
        return jax.tree.map(lambda m, p: None if m is None else jnp.abs(p), masks, params, is_leaf=_is_none)

    return ScoreFn(score, counter, lambda *args: [(score.lower(*args), 1)])
