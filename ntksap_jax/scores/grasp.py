"""GraSP (Wang, Zhang & Grosse, ICLR 2020), as the official NTK-SAP / SynFlow code computes it.

Official (``Pruners/pruners.py`` class ``GraSP``, after alecwangcq/GraSP), with ``p = θ`` the
raw prunable weights (the mask multiplies them in the forward pass, so every derivative
w.r.t. ``θ`` carries a factor ``m``) and ``L_b = CE_mean(f(θ⊙m; x_b) / T, y_b)``, ``T = 200``:

1. ``g = Σ_b ∂L_b/∂θ`` with no graph (a constant), over the prunable weights only;
2. ``z = Σ_b g · ∂L_b/∂θ`` and ``backward()``: ``θ.grad = H g``, ``H = Σ_b ∂²L_b/∂θ²``
   restricted to the prunable weights (biases and BatchNorm parameters are in neither ``g``
   nor the rows kept);
3. ``scores = θ ⊙ (H g)``, signed; the prune loop keeps the *largest*. (The comment there says
   "negate to remove top percent", but nothing is negated: keeping the largest ``θ ⊙ Hg`` is
   GraSP's "remove the largest ``-θ ⊙ Hg``".)

The official code divides by ``|Σ scores| + 1e-10``, a positive factor that leaves the
ranking unchanged, so it is left out. Pruned entries get exactly 0 (a factor ``m``); in the
official loop 0 can exceed a negative threshold and revive them over iterations, here they
always rank last. BatchNorm runs in train mode (batch statistics, differentiated through),
as with the official ``--prune-train-mode True``.

Here ``H g`` is one forward-over-reverse Hessian-vector product (``jax.jvp`` of ``jax.grad``).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax

from ntksap_jax._checks import is_none as _is_none
from ntksap_jax.masks import apply_masks
from ntksap_jax.model import as_model
from ntksap_jax._checks import positive_float as check_positive_float
from ntksap_jax.scores._data import LossFn, params_dtype, prune_data, resolve_loss
from ntksap_jax.scores._protocol import ScoreFn, TraceCounter
from ntksap_jax.scores.snip import prune_loss

__all__ = ["grasp_scorer"]

PyTree = Any


def grasp_scorer(
    model,
    input_shape: Sequence[int],
    *,
    num_classes: int,
    data=None,
    num_inputs: int | None = None,
    batch_size: int = 256,
    loss: str | LossFn = "cross_entropy",
    temperature: float = 200.0,
) -> ScoreFn:
    """Build the GraSP score function ``score(params, masks, batch_stats, key) -> scores``.

    ``scores = θ ⊙ (H g)`` (see the module docstring): ``g = ∂L/∂θ`` and ``H = ∂²L/∂θ²`` of
    ``L = Σ_b CE_mean(f(θ⊙m; x_b) / temperature, y_b)`` w.r.t. the raw prunable weights ``θ``.
    Scores are signed (never abs-ed); larger = keep, as the official code ranks them.

    Args:
      model: a linen or NNX module or a :class:`ntksap_jax.model.Model`.
      input_shape: one example's shape, e.g. ``(32, 32, 3)``.
      num_classes: number of classes (labels are drawn from it when ``data`` is None).
      data: optional labelled ``(x, y)``: ``x`` of shape ``(N, *input_shape)``, ``y`` int labels
        ``(N,)``. ``None``: every call draws ``num_inputs`` fresh ``N(0, 1)`` inputs and uniform
        labels from ``key`` (a ``UserWarning`` is emitted once, here).
      num_inputs: examples per call; default ``10 × num_classes``, or all of ``data``.
      batch_size: largest batch (the official prune loader's split).
      loss: ``"cross_entropy"`` or a callable ``loss(logits, labels) -> scalar``.
      temperature: ``T > 0``; logits are divided by it (200 in the official code).

    Returns:
      ``score(params, masks, batch_stats, key)``: a pytree shaped like ``masks`` (``None`` on
      dense leaves), signed, 0 on pruned entries. It compiles once.

    Example::

      score = grasp_scorer(model, (32, 32, 3), num_classes=10, data=(x[:100], y[:100]))
      result = prune(score, v["params"], batch_stats=v["batch_stats"], density=0.05, key=jax.random.key(1))
    """
    model = as_model(model, input_shape)
    temperature = check_positive_float(temperature, "temperature")
    loss_fn = resolve_loss(loss, "grasp")
    pdata = prune_data("grasp", input_shape, num_classes=num_classes, data=data, num_inputs=num_inputs,
                       batch_size=batch_size, stacklevel=3)

    counter = TraceCounter()

    @jax.jit
    @counter.wrap
    def _score(params, masks, batch_stats, key, x, y):
        batches = pdata.batches(key, x, y, params_dtype(params))
        # θ: the prunable leaves (a masks-shaped pytree, None on dense leaves).
        theta = jax.tree.map(lambda m, p: None if m is None else p, masks, params, is_leaf=_is_none)

        def loss_of(kernels):
            full = jax.tree.map(lambda m, p, k: p if m is None else k, masks, params, kernels, is_leaf=_is_none)
            return prune_loss(model, apply_masks(full, masks), batch_stats, batches, loss_fn, temperature)

        grad_fn = jax.grad(loss_of)
        g = grad_fn(theta)
        _, hg = jax.jvp(grad_fn, (theta,), (g,))  # forward-over-reverse Hessian-vector product
        return jax.tree.map(lambda m, h, t: None if m is None else h * t, masks, hg, theta, is_leaf=_is_none)

    x, y = pdata.arrays

    def score(params, masks, batch_stats, key):
        return _score(params, masks, batch_stats, key, x, y)

    return ScoreFn(score, counter, lambda p, m, bs, k: [(_score.lower(p, m, bs, k, x, y), 1)])
