"""The pruning loop: score, rank globally, repeat on a density schedule.

Example::

    model = get_model("resnet20", 10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    score = ntksap_scorer(model, (32, 32, 3), samples=5)
    result = prune(score, variables["params"], batch_stats=variables["batch_stats"],
                   density=0.8 ** 18, iterations=20, key=jax.random.key(1))
    result.masks, result.params  # masks, and the original init with pruned weights zeroed
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from ntksap_jax.masks import (
    apply_masks,
    check_density,
    check_scores,
    check_structure,
    count_total,
    global_topk_count,
    init_masks,
    layerwise_topk_counts,
)
from ntksap_jax.distributions import get_distribution, layer_counts
from ntksap_jax.parallel import mesh_context, param_shardings, place, replicated
from ntksap_jax.schedules import get_schedule

__all__ = ["PruneResult", "prune"]

PyTree = Any
ScoreFn = Callable[[PyTree, PyTree, PyTree, jax.Array], PyTree]


class PruneResult(NamedTuple):
    """What :func:`prune` returns.

    Attributes:
      masks: the final mask pytree.
      params: the params given to :func:`prune` (the original init ``θ₀``) with the masks applied.
      history: one dict per iteration: ``{"iteration", "density_target", "kept", "seconds"}``.
    """

    masks: PyTree
    params: PyTree
    history: list


_global_topk_count = jax.jit(global_topk_count)
_layerwise_topk_counts = jax.jit(layerwise_topk_counts)
_count_kept = jax.jit(lambda masks: sum(jnp.count_nonzero(m) for m in jax.tree.leaves(masks)))
_negate = jax.jit(lambda scores: jax.tree.map(jnp.negative, scores))


def prune(
    score_fn: ScoreFn,
    params: PyTree,
    masks: PyTree | None = None,
    *,
    density: float,
    iterations: int = 1,
    key: jax.Array,
    batch_stats: PyTree = None,
    schedule: str = "exponential",
    distribution: str = "global",
    invert: bool = False,
    progress: Callable | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> PruneResult:
    """Iterative pruning: ``T`` rounds of score-then-keep-top-``k`` down to ``density``.

    Round ``t = 1..T`` scores with key ``fold_in(key, t)`` and keeps exactly
    ``round(d_t × N)`` weights, ``d_t`` from the schedule (exponential: ``density^(t/T)``).
    ``T = 1`` is one-shot pruning. Scores are checked for NaN/inf each round (one host sync).
    The score function and the ranking compile once; nothing re-traces between rounds.

    Args:
      score_fn: ``score_fn(params, masks, batch_stats, key) -> scores`` (see ``ntksap_jax.scores``).
      params: the params to prune (the original init ``θ₀``); never modified.
      masks: starting masks; default :func:`ntksap_jax.masks.init_masks` (all kernels).
      density: final kept fraction of prunable weights, in (0, 1].
      iterations: ``T`` ≥ 1.
      key: PRNG key.
      batch_stats: the model's batch_stats (or ``None``), passed to ``score_fn``.
      schedule: ``"exponential"`` or ``"linear"``.
      distribution: ``"global"`` (one ranking over all layers: the scorer decides how much each
        layer keeps), or ``"uniform"`` / ``"erk"`` (each layer keeps a fixed share from
        :mod:`ntksap_jax.distributions`; the scorer only picks which weights within a layer).
      invert: prune the *highest* scores instead of the lowest (a true rank reversal: the
        ranking uses ``-scores``, valid for negative and zero scores; pruned entries stay pruned).
      progress: optional ``progress(iteration, history_row)`` callback after each round.
      mesh: a device mesh (:func:`ntksap_jax.parallel.make_mesh`) to score across: params and
        masks are placed with :func:`~ntksap_jax.parallel.param_shardings` (replicated unless
        the mesh has a ``model`` axis), BatchNorm statistics replicated, and every round runs
        under ``jax.set_mesh(mesh)``, so the scorers split their input batches over the
        ``data`` axis.
        The masks come out the same on every device and match a one-device run up to float32
        rounding of the scores. ``None``: the arrays' own devices (one device).

    Returns:
      :class:`PruneResult` with the final masks and ``params ⊙ masks``.

    Example::

      result = prune(get_scorer("magnitude")(model, (32, 32, 3)), params, density=0.1, key=jax.random.key(0))
    """
    density = check_density(density)
    densities = get_schedule(schedule)(density, iterations)
    if masks is None:
        masks = init_masks(params)
    else:
        check_structure(params, masks)
    total = count_total(masks)
    if total == 0:
        raise ValueError("no prunable weights: every mask leaf is None")
    allocate = None if distribution == "global" else get_distribution(distribution)
    if mesh is not None:
        params = place(params, param_shardings(params, mesh))
        masks = place(masks, param_shardings(masks, mesh))
        if batch_stats:
            batch_stats = place(batch_stats, replicated(mesh))
    with mesh_context(mesh):
        masks, history = _rounds(score_fn, params, masks, batch_stats, key, densities, total, allocate, invert, progress)
    return PruneResult(masks=masks, params=apply_masks(params, masks), history=history)


def _rounds(score_fn, params, masks, batch_stats, key, densities, total, allocate, invert, progress):
    history = []
    for t, d_t in enumerate(densities, start=1):
        start = time.perf_counter()
        scores = score_fn(params, masks, batch_stats, jax.random.fold_in(key, t))
        check_scores(scores, masks)
        # float64 scores (e.g. SynFlow on deep nets, beyond float32's range) are ranked in float64.
        wide = any(jnp.result_type(s) == jnp.float64 for s in jax.tree.leaves(scores))
        with jax.enable_x64(True) if wide else contextlib.nullcontext():
            if invert:
                scores = _negate(scores)
            if allocate is None:
                k = round(float(d_t) * total)
                masks = _global_topk_count(scores, masks, jnp.asarray(k, jnp.int32))
            else:
                counts = jax.tree.map(lambda c: None if c is None else jnp.asarray(c, jnp.int32),
                                      layer_counts(masks, allocate(masks, float(d_t))), is_leaf=lambda c: c is None)
                masks = _layerwise_topk_counts(scores, masks, counts)
        kept = int(_count_kept(masks))
        row = {"iteration": t, "density_target": float(d_t), "kept": kept, "seconds": time.perf_counter() - start}
        history.append(row)
        if progress is not None:
            progress(t, row)
    return masks, history
