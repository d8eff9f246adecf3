"""SynFlow (Tanaka et al., NeurIPS 2020), as the official NTK-SAP / SynFlow code computes it.

Official (``Pruners/pruners.py`` class ``SynFlow``):

1. ``linearize``: every entry of the model's ``state_dict`` is replaced by its absolute value:
   all parameters (kernels, biases, BatchNorm scale and bias) *and* buffers (BatchNorm running
   mean and variance, the masks);
2. the all-ones input of shape ``[1, *input_shape]`` goes through the model with the masks
   applied in the forward pass (``w = |θ| ⊙ m``); BatchNorm is in whatever mode the prune loop
   set, eval mode for SynFlow (``--prune-train-mode`` off), so it normalises with the absolute
   running statistics: ``(h − |μ|) / sqrt(|σ²| + ε) · |γ| + |β|``;
3. ``R = Σ outputs``; ``backward()``; ``scores = |p.grad ⊙ p|`` with ``p = |θ|`` the linearized
   raw weight and ``p.grad = m ⊙ ∂R/∂w``. So ``scores = |∂R/∂w ⊙ w|`` at ``w = |θ|⊙m``: 0 on
   pruned entries, and by the chain rule exactly ``|θ|·m ⊙ ∂R/∂w``.

No data and no randomness: ``key`` is ignored, and the result depends only on ``params``,
``batch_stats`` and ``masks``. SynFlow is meant to be iterated (the paper and the official
runs use 100 iterations: ``prune(..., iterations=100)``); one-shot SynFlow is much weaker.

Conservation: without biases and BatchNorm, ``R`` is a sum over input-output paths of products
of weights, so every layer's scores sum to ``R`` (a layer a path crosses once).

Precision: the official code runs float32 on CIFAR models and ``model.double()`` for its
ImageNet models, where ``R`` overflows float32; ``float64=True`` does the latter.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from ntksap_jax._checks import is_none as _is_none
from ntksap_jax.masks import apply_masks
from ntksap_jax.model import as_model
from ntksap_jax._checks import positive_int as check_positive_int
from ntksap_jax.scores._data import params_dtype
from ntksap_jax.scores._protocol import ScoreFn, TraceCounter

__all__ = ["synflow_scorer", "synflow_objective"]

PyTree = Any


def _abs_cast(tree: PyTree, dtype) -> PyTree:
    return jax.tree.map(
        lambda a: jnp.abs(a).astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a, tree
    )


def synflow_objective(
    model, params: PyTree, masks: PyTree, batch_stats: PyTree, input_shape: Sequence[int]
) -> jax.Array:
    """``R = Σ f(1; |θ|⊙m)``: the sum of the outputs on one all-ones input, BatchNorm in eval mode.

    ``params`` and ``batch_stats`` are used as given (pass their absolute values, as
    :func:`synflow_scorer` does); ``masks`` are applied to ``params`` in the forward pass.

    Args:
      model: a linen or NNX module or a :class:`ntksap_jax.model.Model`.
      params: params pytree (already ``|θ|``).
      masks: mask pytree (``None`` on dense leaves).
      batch_stats: BatchNorm statistics (already absolute), or ``None``/``{}``.
      input_shape: one example's shape; the input is ``ones((1, *input_shape))``.

    Returns:
      A scalar.

    Example::

      R = synflow_objective(model, jax.tree.map(jnp.abs, params), init_masks(params), None, (28, 28, 1))
    """
    x = jnp.ones((1, *tuple(input_shape)), params_dtype(params))
    w = apply_masks(params, masks)
    return jnp.sum(as_model(model, input_shape).apply(w, batch_stats, x)[0])


def synflow_scorer(
    model, input_shape: Sequence[int], *, num_classes: int | None = None, float64: bool = False
) -> ScoreFn:
    """Build the SynFlow score function ``score(params, masks, batch_stats, key) -> scores``.

    ``scores = |∂R/∂w ⊙ w|`` at ``w = |θ|⊙m`` with every param and BatchNorm statistic
    replaced by its absolute value and ``R`` of :func:`synflow_objective` (module docstring).
    ``key`` is ignored (SynFlow is deterministic). Use about 100 pruning iterations.

    Args:
      model: a linen or NNX module or a :class:`ntksap_jax.model.Model`.
      input_shape: one example's shape, e.g. ``(32, 32, 3)``.
      num_classes: accepted for a uniform factory signature; unused (checked if given).
      float64: run the computation in float64 (params, statistics and input are cast;
        ``jax.enable_x64`` is switched on around the call). The scores come back in float64;
        rank them with x64 enabled too (JAX computes on float64 arrays in float32 when x64 is
        off, so scores beyond float32's range would tie at ``inf``).

    Returns:
      ``score(params, masks, batch_stats, key)``: a pytree shaped like ``masks`` (``None`` on
      dense leaves), non-negative, 0 on pruned entries, in the params' dtype (float64 with
      ``float64=True``). It compiles once.

    Example::

      model = get_model("resnet20", 10)
      v = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
      score = synflow_scorer(model, (32, 32, 3))
      result = prune(score, v["params"], batch_stats=v["batch_stats"], density=0.8 ** 18,
                     iterations=100, key=jax.random.key(0))
    """
    if num_classes is not None:
        check_positive_int(num_classes, "num_classes")
    if not isinstance(float64, bool):
        raise ValueError(f"float64 must be True or False; got {float64!r}")
    input_shape = tuple(int(s) for s in input_shape)
    model = as_model(model, input_shape)

    counter = TraceCounter()

    @jax.jit
    @counter.wrap
    def _score(params, masks, batch_stats):
        dtype = jnp.float64 if float64 else params_dtype(params)
        theta = _abs_cast(params, dtype)
        stats = _abs_cast(batch_stats, dtype) if batch_stats else batch_stats
        m = jax.tree.map(lambda a: a.astype(dtype), masks)
        grads = jax.grad(lambda p: synflow_objective(model, p, m, stats, input_shape))(theta)
        # official: |p.grad * p| with p = |θ| (raw, unmasked) and p.grad = m ⊙ ∂R/∂w.
        return jax.tree.map(
            lambda mk, g, p: None if mk is None else jnp.abs(g * p), masks, grads, theta, is_leaf=_is_none
        )

    if float64:

        def score(params, masks, batch_stats, key):
            with jax.enable_x64(True):
                return _score(params, masks, batch_stats)

    else:

        def score(params, masks, batch_stats, key):
            return _score(params, masks, batch_stats)

    def lowered(params, masks, batch_stats, key):
        with jax.enable_x64(float64):
            return [(_score.lower(params, masks, batch_stats), 1)]

    return ScoreFn(score, counter, lowered)
