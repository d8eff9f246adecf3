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
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ntksap_jax._checks import is_none as _is_none
from ntksap_jax.masks import (
    apply_masks_jit,
    check_density,
    check_scores,
    check_structure,
    count_kept,
    count_total,
    global_topk_count,
    init_masks,
    layerwise_topk_counts,
    named_leaves,
)
from ntksap_jax.distributions import get_distribution, layer_counts
from ntksap_jax.parallel import mesh_context, param_shardings, place, replicated
from ntksap_jax.schedules import get_schedule

__all__ = ["PruneResult", "prune", "DegenerateMaskError", "OnCollapse"]

PyTree = Any
ScoreFn = Callable[[PyTree, PyTree, PyTree, jax.Array], PyTree]


class PruneResult(NamedTuple):
    """What :func:`prune` returns.

    Attributes:
      masks: the final mask pytree.
      params: the params given to :func:`prune` (the original init ``θ₀``) with the masks applied.
      history: one dict per iteration: ``{"iteration", "density_target", "kept", "seconds"}``.
      diagnostics: what could make the mask degenerate: ``{"zero_score_layers": [...]}`` (layers
        whose live scores were all exactly 0 in some round: the scorer could not rank them),
        ``"collapsed_layers"`` (no weight kept), and, when ``prune`` was given the model,
        ``"off_path_kept"`` (kept weights on no input-output path) and ``"disconnected"``.
    """

    masks: PyTree
    params: PyTree
    history: list
    diagnostics: dict | None = None


class DegenerateMaskError(ValueError):
    """``prune(..., on_collapse="raise")`` found a degenerate mask (the message names the layers)."""


#: What :func:`prune` does about a degenerate mask.
OnCollapse = ("warn", "raise", "ignore")


_global_topk_count = jax.jit(global_topk_count)
_layerwise_topk_counts = jax.jit(layerwise_topk_counts)
_negate = jax.jit(lambda scores: jax.tree.map(jnp.negative, scores))


@jax.jit
def _zero_score_leaves(scores: PyTree, masks: PyTree) -> list:
    """Per mask leaf (``None`` leaves skipped): True when every live entry scores exactly 0."""
    out = []
    for s, m in zip(jax.tree.leaves(scores), jax.tree.leaves(masks)):
        live = m != 0
        out.append(jnp.any(live) & jnp.all(jnp.where(live, s == 0, True)))
    return out


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
    on_collapse: str = "warn",
    model=None,
    input_shape: Sequence[int] | None = None,
    off_path: str = "keep",
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
      on_collapse: a degenerate mask is never silent. ``"warn"`` (default): one
        ``UserWarning`` line naming the layers whose scores were all zero in some round (a
        zero-initialised normalisation scale, say: the scorer cannot rank them, and the tie
        rule then keeps weights on no path), the collapsed layers (no weight kept), and with
        ``model`` the number of kept weights on no input-output path; ``"raise"``:
        :class:`DegenerateMaskError` instead; ``"ignore"``: neither (the facts are still in
        ``diagnostics``).
      model, input_shape: the network the params belong to (a linen/NNX module or a
        :class:`ntksap_jax.model.Model`) and one example's shape; given both, the final mask is
        also checked for kept weights on no input-output path
        (:func:`ntksap_jax.collapse.path_report`).
      off_path: ``"keep"`` (default; the official algorithm): kept weights on no
        input-output path stay in the mask (and are reported). Iterative pruning leaves some:
        a round keeps weights out of a unit whose last incoming weights the same round
        prunes. ``"reallocate"`` (needs ``model``; global distribution only): give their
        budget to the next-ranked weights of the last round's scores that lie on a path,
        until none is off path; the count stays ``round(density · N)``, and
        ``diagnostics["reallocated"]`` counts the distinct weights dropped for lying on no path
        (it can exceed the budget when the refills are off path too; above half of the kept
        weights it is reported as a degenerate mask).

    Returns:
      :class:`PruneResult` with the final masks, ``params ⊙ masks`` and the diagnostics.

    Example::

      result = prune(get_scorer("magnitude")(model, (32, 32, 3)), params, density=0.1, key=jax.random.key(0))
    """
    density = check_density(density)
    if on_collapse not in OnCollapse:
        raise ValueError(f"on_collapse must be one of {list(OnCollapse)}; got {on_collapse!r}")
    if (model is None) != (input_shape is None):
        raise ValueError("prune: pass both model and input_shape (for the path check) or neither")
    if off_path not in ("keep", "reallocate"):
        raise ValueError(f"off_path must be 'keep' or 'reallocate'; got {off_path!r}")
    if off_path == "reallocate" and (model is None or distribution != "global"):
        raise ValueError("off_path='reallocate' needs model= and input_shape=, and distribution='global'")
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
    zero_scored: list = []
    with mesh_context(mesh):
        masks, history, last = _rounds(score_fn, params, masks, batch_stats, key, densities, total, allocate, invert,
                                       progress, zero_scored)
    moved = 0
    if off_path == "reallocate":
        masks, moved = _reallocate(masks, last, params, batch_stats, model, input_shape)
    diagnostics = _diagnose(masks, zero_scored, params, batch_stats, model, input_shape)
    if off_path == "reallocate":
        diagnostics["reallocated"] = moved
        diagnostics["kept"] = count_kept(masks)
    _report_degenerate(diagnostics, on_collapse)
    return PruneResult(masks=masks, params=apply_masks_jit(params, masks), history=history, diagnostics=diagnostics)


def _score_precision(scores):
    """float64 scores (e.g. SynFlow on deep nets, beyond float32's range) are handled with x64 on."""
    wide = any(jnp.result_type(s) == jnp.float64 for s in jax.tree.leaves(scores))
    return jax.enable_x64(True) if wide else contextlib.nullcontext()


def _diagnose(masks, zero_scored, params, batch_stats, model, input_shape) -> dict:
    from ntksap_jax.masks import collapsed_layers

    out = {"zero_score_layers": zero_scored, "collapsed_layers": collapsed_layers(masks)}
    if model is not None:
        from ntksap_jax.collapse import path_report

        rep = path_report(model, params, masks, batch_stats, input_shape)
        out["off_path_kept"] = rep["total_kept"] - rep["effective_kept"]
        out["disconnected"] = rep["disconnected"]
        out["off_path_layers"] = [r["name"] for r in rep["layers"] if r["effective"] < r["kept"]]
    return out


#: Most passes of ``off_path="reallocate"`` (each drops the off-path weights and refills).
MAX_REALLOCATION_PASSES = 16
#: ``off_path="reallocate"`` replacing more than this fraction of the kept weights is reported as degenerate
#: (the method's ranking was then largely unusable; a few percent is what iterative pruning normally leaves:
#: 12 of 138 on the small NNX CNN of the own-model tests, 21-36 of 1,824 on the ViT).
REALLOCATION_WARN_FRACTION = 0.5


def _reallocate(masks, last, params, batch_stats, model, input_shape):
    """Replace kept weights on no path by the next-ranked on-path ones (last round's ranking)."""
    from ntksap_jax.collapse import on_path_masks

    scores, live, k = last
    banned = jax.tree.map(lambda m: None if m is None else np.zeros(np.shape(m), bool), masks, is_leaf=_is_none)
    moved = 0
    for _ in range(MAX_REALLOCATION_PASSES):
        on_path, _ = on_path_masks(model, params, masks, batch_stats, input_shape)
        off = jax.tree.map(lambda m, ok: None if m is None else (np.asarray(m) != 0) & ~ok, masks, on_path,
                           is_leaf=_is_none)
        count = sum(int(o.sum()) for o in jax.tree.leaves(off))
        if count == 0:
            return masks, moved
        moved += count
        banned = jax.tree.map(lambda b, o: None if b is None else b | o, banned, off, is_leaf=_is_none)
        allowed = jax.tree.map(lambda m, b: None if m is None else jnp.where(jnp.asarray(b), 0, m), live, banned,
                               is_leaf=_is_none)
        with _score_precision(scores):
            masks = _global_topk_count(scores, allowed, jnp.asarray(k, jnp.int32))
    warnings.warn(f"off_path='reallocate' stopped after {MAX_REALLOCATION_PASSES} passes with weights still off path",
                  UserWarning, stacklevel=3)
    return masks, moved


def _report_degenerate(diag: dict, on_collapse: str) -> None:
    parts = []
    if diag["zero_score_layers"]:
        parts.append(f"all scores 0 (unrankable) in {', '.join(diag['zero_score_layers'])}")
    if diag["collapsed_layers"]:
        parts.append(f"layer collapse (no weight kept) in {', '.join(diag['collapsed_layers'])}")
    if diag.get("disconnected"):
        parts.append("no input-output path left")
    if diag.get("off_path_kept"):
        parts.append(f"{diag['off_path_kept']:,} kept weights on no input-output path "
                     f"(in {', '.join(diag['off_path_layers'])})")
    kept = diag.get("kept", 0)
    if diag.get("reallocated", 0) > REALLOCATION_WARN_FRACTION * max(kept, 1):
        parts.append(f"{diag['reallocated']:,} weights the method ranked among the {kept:,} kept lay on no "
                     "input-output path and were replaced (off_path='reallocate'): its ranking was largely unusable")
    if not parts or on_collapse == "ignore":
        return
    message = "degenerate mask: " + "; ".join(parts)
    if on_collapse == "raise":
        raise DegenerateMaskError(message)
    warnings.warn(message, UserWarning, stacklevel=3)


def _rounds(score_fn, params, masks, batch_stats, key, densities, total, allocate, invert, progress, zero_scored):
    names = [name for name, m in named_leaves(masks) if m is not None]
    history, last = [], None
    for t, d_t in enumerate(densities, start=1):
        start = time.perf_counter()
        scores = score_fn(params, masks, batch_stats, jax.random.fold_in(key, t))
        check_scores(scores, masks)
        with _score_precision(scores):
            # scores beyond float32's range must not be cast to it: 1e-50 is not a zero score
            for name, zero in zip(names, jax.device_get(_zero_score_leaves(scores, masks))):
                if zero and name not in zero_scored:
                    zero_scored.append(name)
            if invert:
                scores = _negate(scores)
            if allocate is None:
                k = round(float(d_t) * total)
                last = (scores, masks, k)  # the last round's ranking, for off_path="reallocate"
                masks = _global_topk_count(scores, masks, jnp.asarray(k, jnp.int32))
            else:
                counts = jax.tree.map(lambda c: None if c is None else jnp.asarray(c, jnp.int32),
                                      layer_counts(masks, allocate(masks, float(d_t))), is_leaf=lambda c: c is None)
                masks = _layerwise_topk_counts(scores, masks, counts)
        kept = count_kept(masks)
        row = {"iteration": t, "density_target": float(d_t), "kept": kept, "seconds": time.perf_counter() - start}
        history.append(row)
        if progress is not None:
            progress(t, row)
    return masks, history, last
