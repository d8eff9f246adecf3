"""SNIP (Lee et al., ICLR 2019) and iterative SNIP, as the official NTK-SAP / SynFlow code computes them.

Both differentiate the prune loss ``L = Σ_batches CE_mean(f(θ⊙m; x_b), y_b)`` (PyTorch's
``F.cross_entropy``, mean over each batch, summed over the batches of the prune loader:
``num_inputs`` examples in batches of at most ``batch_size``), BatchNorm in train mode
(batch statistics; the updated running statistics are discarded). Why train mode: the official
argparse default is ``--prune-train-mode False`` (eval mode), but the official ``scripts/run.sh``,
which produced the paper's SNIP, GraSP and iterative-SNIP baselines, passes
``--prune-train-mode True``; and at initialization the running statistics are the BatchNorm
defaults (mean 0, variance 1), so eval mode would score a network whose activations are not
normalised at all. The same holds for GraSP (``grasp.py``). With ``w = θ⊙m`` and ``g_w = ∂L/∂w``:

* SNIP (``Pruners/pruners.py`` class ``SNIP``): ``|∂L/∂m| = |θ ⊙ g_w|``. The official code
  leaves pruned entries at ``|θ ⊙ g_w|`` (so with more than one iteration its threshold can
  revive them); here they are set to 0, which changes nothing in :func:`ntksap_jax.prune.prune`
  (pruned entries rank last there).
* Iterative SNIP (class ``IterSNIP``): ``|p.grad ⊙ p|`` with ``p = θ`` the raw weight and
  ``p.grad = ∂L/∂θ = m ⊙ g_w`` (the mask multiplies in the forward pass), i.e.
  ``|m ⊙ g_w ⊙ θ| = |m ⊙ ∂L/∂m|``. For 0/1 masks this *equals* the SNIP score above; the two
  official classes differ only in the pruned entries (0 here, ``|θ ⊙ g_w|`` in ``SNIP``).

Both official classes divide by the sum of all scores; a positive factor that does not change
the ranking, so it is left out. The scores depend on ``params``; run :func:`ntksap_jax.prune.prune`
with ``iterations > 1`` for the iterative variant (the official runs use 100).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from ntksap_jax._checks import is_none as _is_none
from ntksap_jax.masks import apply_masks
from ntksap_jax.model import as_model
from ntksap_jax.scores._protocol import ScoreFn, TraceCounter
from ntksap_jax.scores._data import LossFn, cross_entropy, params_dtype, prune_data, resolve_loss, train_apply

__all__ = ["snip_scorer", "iterative_snip_scorer", "prune_loss"]

PyTree = Any


def prune_loss(model, params: PyTree, batch_stats: PyTree, batches, loss: LossFn = None, temperature: float = 1.0):
    """``Σ_b loss(f(params; x_b) / temperature, y_b)`` with BatchNorm in train mode.

    Args:
      model: a linen or NNX module or a :class:`ntksap_jax.model.Model`.
      params: the (already masked) params.
      batch_stats: the model's batch_stats, or ``None``/``{}`` without BatchNorm.
      batches: ``[(x_b, y_b), ...]`` with ``x_b`` of shape ``(n_b, *input_shape)`` and
        ``y_b`` int labels ``(n_b,)``.
      loss: ``loss(logits, labels) -> scalar``; default mean cross-entropy.
      temperature: logits are divided by it (GraSP uses 200).

    Returns:
      A scalar.

    Example::

      L = prune_loss(model, apply_masks(params, masks), batch_stats, [(x, y)])
    """
    loss = cross_entropy if loss is None else loss
    total = 0.0
    for xb, yb in batches:
        logits = train_apply(model, params, batch_stats, xb)
        if temperature != 1.0:
            logits = logits / temperature
        total = total + loss(logits, yb)
    return total


def _make(who: str, which: str, model, input_shape, *, num_classes, data, num_inputs, batch_size, loss) -> ScoreFn:
    model = as_model(model, input_shape)
    loss_fn = resolve_loss(loss, who)
    pdata = prune_data(who, input_shape, num_classes=num_classes, data=data, num_inputs=num_inputs,
                       batch_size=batch_size, stacklevel=4)

    counter = TraceCounter()

    @jax.jit
    @counter.wrap
    def _score(params, masks, batch_stats, key, x, y):
        batches = pdata.batches(key, x, y, params_dtype(params))
        if which == "snip":
            # |∂L/∂m| at the current masks, zero on pruned entries.
            gm = jax.grad(lambda m: prune_loss(model, apply_masks(params, m), batch_stats, batches, loss_fn))(masks)
            return jax.tree.map(lambda m, g: None if m is None else jnp.abs(g) * (m != 0), masks, gm, is_leaf=_is_none)
        # |p.grad ⊙ p|: the gradient w.r.t. the raw weights θ (the mask multiplies in the forward pass).
        gp = jax.grad(lambda p: prune_loss(model, apply_masks(p, masks), batch_stats, batches, loss_fn))(params)
        return jax.tree.map(lambda m, g, p: None if m is None else jnp.abs(g * p), masks, gp, params, is_leaf=_is_none)

    x, y = pdata.arrays

    def score(params, masks, batch_stats, key):
        return _score(params, masks, batch_stats, key, x, y)

    return ScoreFn(score, counter, lambda p, m, bs, k: [(_score.lower(p, m, bs, k, x, y), 1)])


def snip_scorer(
    model,
    input_shape: Sequence[int],
    *,
    num_classes: int,
    data=None,
    num_inputs: int | None = None,
    batch_size: int = 256,
    loss: str | LossFn = "cross_entropy",
) -> ScoreFn:
    """Build the SNIP score function ``score(params, masks, batch_stats, key) -> scores``.

    ``scores = |∂L/∂m| ⊙ (m ≠ 0)`` at the current masks, ``L = Σ_b CE_mean(f(θ⊙m; x_b), y_b)``
    over the prune batches, BatchNorm in train mode (see the module docstring).

    Args:
      model: a linen or NNX module or a :class:`ntksap_jax.model.Model`.
      input_shape: one example's shape, e.g. ``(32, 32, 3)``.
      num_classes: number of classes (labels are drawn from it when ``data`` is None).
      data: optional labelled ``(x, y)``: ``x`` of shape ``(N, *input_shape)``, ``y`` int
        labels ``(N,)``. ``None``: every call draws ``num_inputs`` fresh ``N(0, 1)`` inputs and
        uniform labels from ``key`` (a ``UserWarning`` is emitted once, here).
      num_inputs: examples per call; default ``10 × num_classes`` (the official prune set),
        or all of ``data``.
      batch_size: largest batch; the examples are split as the official loader does.
      loss: ``"cross_entropy"`` or a callable ``loss(logits, labels) -> scalar``.

    Returns:
      ``score(params, masks, batch_stats, key)``: a pytree shaped like ``masks`` (``None`` on
      dense leaves), non-negative, 0 on pruned entries. It compiles once.

    Example::

      model = get_model("resnet20", 10)
      v = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
      score = snip_scorer(model, (32, 32, 3), num_classes=10, data=(x_train[:100], y_train[:100]))
      result = prune(score, v["params"], batch_stats=v["batch_stats"], density=0.05, key=jax.random.key(1))
    """
    return _make("snip", "snip", model, input_shape, num_classes=num_classes, data=data, num_inputs=num_inputs,
                 batch_size=batch_size, loss=loss)


def iterative_snip_scorer(
    model,
    input_shape: Sequence[int],
    *,
    num_classes: int,
    data=None,
    num_inputs: int | None = None,
    batch_size: int = 256,
    loss: str | LossFn = "cross_entropy",
) -> ScoreFn:
    """Build the iterative-SNIP score function ``score(params, masks, batch_stats, key) -> scores``.

    ``scores = |m ⊙ g_w ⊙ θ|`` with ``g_w = ∂L/∂w`` at ``w = θ⊙m`` (the official ``IterSNIP``:
    ``|p.grad ⊙ p|``). This equals ``|m ⊙ ∂L/∂m|``, i.e. the SNIP score for 0/1 masks; the
    method is SNIP re-scored over many pruning iterations (``prune(..., iterations=100)``).
    Arguments, data handling and the warning are those of :func:`snip_scorer`.

    Returns:
      A pytree shaped like ``masks`` (``None`` on dense leaves), non-negative, 0 on pruned entries.

    Example::

      score = iterative_snip_scorer(model, (32, 32, 3), num_classes=10, data=(x, y))
      result = prune(score, params, batch_stats=bs, density=0.018, iterations=100, key=jax.random.key(0))
    """
    return _make("iterative_snip", "iterative_snip", model, input_shape, num_classes=num_classes, data=data,
                 num_inputs=num_inputs, batch_size=batch_size, loss=loss)
