"""Mask pytrees: which weights are prunable, applying, counting, ranking, saving.

A *mask* is a pytree with the structure of the params it masks. A leaf is ``None``
for a dense (never pruned) param, or a 0/1 array of the param's shape and dtype.
By default conv and dense kernels are prunable (leaves named ``kernel`` with
``ndim > 1``), as in the official NTK-SAP code; biases, BatchNorm scales and
embeddings are not.

Because ``None`` is an empty pytree node in JAX, functions that walk masks and params
together use ``is_leaf=lambda x: x is None`` with the mask as the first tree.

Example::

    masks = init_masks(params)                       # ones on kernels, None elsewhere
    masks = global_topk(scores, masks, density=0.1)  # keep exactly round(0.1 * N)
    pruned = apply_masks(params, masks)
    print(format_report(density_report(masks)))
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ntksap_jax._checks import is_none as _is_none
from ntksap_jax._mask_files import load_masks, save_masks

__all__ = [
    "default_filter",
    "path_name",
    "init_masks",
    "apply_masks",
    "check_structure",
    "check_density",
    "check_scores",
    "count_kept",
    "count_total",
    "masked_density",
    "global_topk",
    "global_topk_count",
    "layerwise_topk",
    "layerwise_topk_counts",
    "density_report",
    "format_report",
    "collapsed_layers",
    "save_masks",
    "load_masks",
    "named_leaves",
]

PyTree = Any
FilterFn = Callable[[tuple, Any], bool]


def path_name(path: Iterable) -> str:
    """Dotted name of a pytree key path, e.g. ``("blocks_3", "conv1", "kernel")`` -> ``"blocks_3.conv1.kernel"``."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def default_filter(path: tuple, leaf: Any) -> bool:
    """Prunable iff the leaf is named ``kernel`` and has ``ndim > 1`` (conv and dense weights).

    Args:
      path: the leaf's key path (as from ``jax.tree_util.tree_flatten_with_path``).
      leaf: the param array.

    Example::

      default_filter((DictKey("fc"), DictKey("kernel")), jnp.zeros((64, 10)))  # True
      default_filter((DictKey("fc"), DictKey("bias")), jnp.zeros((10,)))       # False
    """
    name = path_name(path[-1:]) if path else ""
    return name == "kernel" and jnp.ndim(leaf) > 1


def named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    """``[(dotted_name, leaf), ...]`` in pytree order; ``None`` leaves are kept.

    Example::

      [name for name, m in named_leaves(masks) if m is not None]
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)
    return [(path_name(p), leaf) for p, leaf in flat]


def init_masks(params: PyTree, filter_fn: FilterFn = default_filter) -> PyTree:
    """All-ones masks on the prunable leaves of ``params`` and ``None`` elsewhere.

    Args:
      params: a params pytree (e.g. ``variables["params"]`` of a Flax model).
      filter_fn: ``filter_fn(path, leaf) -> bool`` picks prunable leaves (jaxpruner style).

    Returns:
      A pytree of the same structure; prunable leaves are ones of the param's shape and dtype.

    Example::

      masks = init_masks(params)
      masks = init_masks(params, lambda path, p: p.ndim == 4)  # convolutions only
    """
    chosen = jax.tree_util.tree_map_with_path(
        lambda path, p: (tuple(int(d) for d in jnp.shape(p)), jnp.dtype(jnp.result_type(p)).name)
        if filter_fn(path, p) else None, params)
    specs, treedef = jax.tree.flatten(chosen, is_leaf=_is_spec)
    ones = _ones(tuple(s for s in specs if s is not None))  # one program for every leaf, not one per shape
    it = iter(ones)
    return jax.tree.unflatten(treedef, [None if s is None else next(it) for s in specs])


def _is_spec(x) -> bool:
    return x is None or (isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], str))


@functools.partial(jax.jit, static_argnums=0)
def _ones(specs: tuple) -> list:
    """Ones of each ``(shape, dtype name)`` in ``specs``: one compiled program for all the masks."""
    return [jnp.ones(shape, dtype) for shape, dtype in specs]


def check_structure(params: PyTree, masks: PyTree) -> None:
    """Raise ``ValueError`` naming the first mismatch if ``masks`` does not fit ``params``.

    Checks the tree structure (with ``None`` leaves allowed anywhere) and every mask's shape.

    Example::

      check_structure(params, masks)  # returns None when they fit
    """
    pnames = [n for n, _ in named_leaves(params)]
    mflat = named_leaves(masks)
    mnames = [n for n, _ in mflat]
    if pnames != mnames:
        missing = sorted(set(pnames) - set(mnames))
        extra = sorted(set(mnames) - set(pnames))
        raise ValueError(
            "mask structure does not match params: "
            f"missing from mask {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"not in params {extra[:5]}{'...' if len(extra) > 5 else ''}"
            + ("" if missing or extra else " (same names, different order or nesting)")
        )
    for (name, p), (_, m) in zip(named_leaves(params), mflat):
        if m is not None and tuple(jnp.shape(m)) != tuple(jnp.shape(p)):
            raise ValueError(
                f"mask for {name!r} has shape {tuple(jnp.shape(m))}, but the param has shape {tuple(jnp.shape(p))}"
            )


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """``params ⊙ masks`` leaf by leaf; params under a ``None`` mask are returned unchanged.

    Differentiable in both arguments (NTK-SAP and SNIP differentiate it w.r.t. the masks).

    Example::

      pruned = apply_masks(params, masks)
    """
    return jax.tree.map(
        lambda m, p: p if m is None else p * m.astype(jnp.result_type(p)), masks, params, is_leaf=_is_none
    )


#: :func:`apply_masks` as one compiled program (outside a trace, an eager ``p * m`` compiles one program
#: per leaf shape; the workflow's final ``θ₀ ⊙ m`` uses this).
apply_masks_jit = jax.jit(apply_masks)


def _mask_leaves(masks: PyTree) -> list:
    return [m for m in jax.tree.leaves(masks, is_leaf=_is_none) if m is not None]


def count_total(masks: PyTree) -> int:
    """Number of prunable weights (the size of all non-``None`` mask leaves).

    Example::

      count_total(init_masks(params))  # 270896 for ResNet-20 on CIFAR-10
    """
    return int(sum(math.prod(jnp.shape(m)) for m in _mask_leaves(masks)))


def count_kept(masks: PyTree) -> int:
    """Number of non-zero mask entries (a host sync; device arrays, sharded ones included, are
    counted where they live).

    Example::

      count_kept(masks) / count_total(masks)  # the density
    """
    leaves = _mask_leaves(masks)
    if all(isinstance(m, np.ndarray) for m in leaves):
        return int(sum(np.count_nonzero(m) for m in leaves))
    return int(_count_nonzero(leaves))  # one compiled reduction and one host sync (the pruning loop's per round)


@jax.jit
def _count_nonzero(leaves: list) -> jax.Array:
    return sum(jnp.count_nonzero(m) for m in leaves)


def masked_density(masks: PyTree) -> float:
    """Kept fraction of the prunable weights. Example: ``masked_density(masks)  # 0.018``."""
    total = count_total(masks)
    return count_kept(masks) / total if total else 1.0


def check_density(density: float, name: str = "density") -> float:
    """Return ``float(density)`` or raise ``ValueError`` unless it is finite and in (0, 1].

    Example::

      check_density(0.018)   # 0.018
      check_density(1.5)     # ValueError: density must be in (0, 1]; got 1.5
    """
    try:
        d = float(density)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1]; got {density!r}") from None
    if not (math.isfinite(d) and 0.0 < d <= 1.0):
        raise ValueError(f"{name} must be in (0, 1]; got {density!r}")
    return d


def check_scores(scores: PyTree, masks: PyTree) -> None:
    """Raise ``ValueError`` naming the layers whose scores are NaN or infinite.

    Only entries that are still unpruned (mask != 0) are checked: pruned entries are
    ranked last whatever their score. The check runs on device and syncs one boolean;
    scores are copied to the host only to word the error.

    Example::

      check_scores(scores, masks)
    """
    if bool(_all_live_finite(_align(scores, masks), masks)):
        return
    bad = []
    for (name, m), (_, s) in zip(named_leaves(masks), named_leaves(_align(scores, masks))):
        if m is None:
            continue
        s = np.asarray(s)
        live = np.asarray(m) != 0
        n_nan = int(np.count_nonzero(np.isnan(s) & live))
        n_inf = int(np.count_nonzero(np.isinf(s) & live))
        if n_nan or n_inf:
            bad.append(f"{name} ({n_nan} NaN, {n_inf} inf)")
    if bad:
        raise ValueError("scores must be finite; non-finite scores in " + ", ".join(bad))


@jax.jit
def _all_live_finite(scores: PyTree, masks: PyTree) -> jax.Array:
    checks = [
        jnp.all(jnp.isfinite(s) | (m == 0))
        for m, s in zip(jax.tree.leaves(masks, is_leaf=_is_none), jax.tree.leaves(scores, is_leaf=_is_none))
        if m is not None
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def _align(scores: PyTree, masks: PyTree) -> PyTree:
    """Scores restricted to the mask's structure (``None`` where the mask is ``None``)."""
    return jax.tree.map(lambda m, s: None if m is None else s, masks, scores, is_leaf=_is_none)


def _keep_count(density, n: int):
    # Python's round() and jnp.round() both round half to even.
    if not isinstance(density, jax.core.Tracer):
        return round(check_density(density) * n)
    return jnp.round(
        jnp.asarray(density, jnp.float64 if jax.config.jax_enable_x64 else jnp.float32) * n
    ).astype(jnp.int32)


def _keep_top(flat_scores: jax.Array, live: jax.Array, k) -> jax.Array:
    """Boolean vector keeping exactly ``k`` entries: the largest live scores.

    Pruned (not live) entries rank below every live entry. Ties are broken by index:
    among equal scores the lowest index is pruned first (a stable ascending sort).
    """
    n = flat_scores.shape[0]
    ranked = jnp.where(live, flat_scores, -jnp.inf)
    order = jnp.argsort(ranked, stable=True)
    rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    return rank >= n - k


def global_topk_count(scores: PyTree, masks: PyTree, k) -> PyTree:
    """Keep exactly ``k`` of the prunable weights, ranked globally (``k`` may be traced).

    The ranking of :func:`global_topk`; ``jax.jit(global_topk_count)`` compiles once per mask
    structure, whatever ``k``.

    Example::

      masks = jax.jit(global_topk_count)(scores, masks, jnp.int32(4880))
    """
    mleaves, treedef = jax.tree.flatten(masks, is_leaf=_is_none)
    sleaves = jax.tree.leaves(_align(scores, masks), is_leaf=_is_none)
    live_idx = [i for i, m in enumerate(mleaves) if m is not None]
    if not live_idx:
        return masks
    flat_s = jnp.concatenate([jnp.ravel(sleaves[i]) for i in live_idx])
    flat_m = jnp.concatenate([jnp.ravel(mleaves[i]) != 0 for i in live_idx])
    keep = _keep_top(flat_s, flat_m, k)
    out = list(mleaves)
    offset = 0
    for i in live_idx:
        m = mleaves[i]
        size = math.prod(jnp.shape(m))
        out[i] = keep[offset : offset + size].reshape(jnp.shape(m)).astype(jnp.result_type(m))
        offset += size
    return jax.tree.unflatten(treedef, out)


def global_topk(scores: PyTree, masks: PyTree, density) -> PyTree:
    """Keep exactly ``round(density × N)`` of the ``N`` prunable weights, ranked globally.

    Entries already pruned (mask 0) rank below every live entry, so with a decreasing
    density schedule masks only ever shrink. Ties are broken deterministically: among
    equal scores the entry with the lowest global index (pytree leaf order, then
    row-major within a leaf) is pruned first. (The official code prunes every score equal
    to the threshold and so can miss the count.)

    ``jit``-compatible with a traced ``density``. Check scores with :func:`check_scores`
    first: NaN would rank unpredictably.

    Args:
      scores: params-shaped pytree (leaves under ``None`` masks are ignored; may be ``None``).
      masks: mask pytree.
      density: kept fraction in (0, 1]; a Python float or a scalar array.

    Returns:
      New masks with the same structure and dtypes.

    Example::

      masks = global_topk(scores, masks, 0.2)
    """
    return global_topk_count(scores, masks, _keep_count(density, count_total(masks)))


def layerwise_topk_counts(scores: PyTree, masks: PyTree, counts: PyTree) -> PyTree:
    """Keep exactly ``counts[l]`` weights in every prunable layer ``l`` (counts may be traced ints).

    Same ranking and tie rule as :func:`global_topk`, within each leaf.
    ``jax.jit(layerwise_topk_counts)`` compiles once per mask structure.

    Example::

      masks = layerwise_topk_counts(scores, masks, layer_counts(masks, erk_densities(masks, 0.1)))
    """
    mleaves, treedef = jax.tree.flatten(masks, is_leaf=_is_none)
    sleaves = jax.tree.leaves(_align(scores, masks), is_leaf=_is_none)
    cleaves = jax.tree.leaves(_align(counts, masks), is_leaf=_is_none)
    out = []
    for m, s, k in zip(mleaves, sleaves, cleaves):
        if m is None:
            out.append(None)
            continue
        keep = _keep_top(jnp.ravel(s), jnp.ravel(m) != 0, k)
        out.append(keep.reshape(jnp.shape(m)).astype(jnp.result_type(m)))
    return jax.tree.unflatten(treedef, out)


def layerwise_topk(scores: PyTree, masks: PyTree, density) -> PyTree:
    """Keep exactly ``max(1, round(density × n_l))`` weights in every prunable layer ``l``.

    Same ranking and tie rule as :func:`global_topk`, applied per leaf. ``density`` is a
    scalar, or a masks-shaped pytree (a nested dict) of per-layer densities (e.g. from
    :func:`ntksap_jax.distributions.erk_densities`).

    Example::

      masks = layerwise_topk(scores, masks, 0.1)
    """
    if not isinstance(density, Mapping):
        d = check_density(density)
        density = jax.tree.map(lambda m: None if m is None else d, masks, is_leaf=_is_none)
    counts = jax.tree.map(
        lambda m, d: None if m is None else max(1, round(check_density(d) * math.prod(jnp.shape(m)))),
        masks, _align(density, masks), is_leaf=_is_none,
    )
    return layerwise_topk_counts(scores, masks, counts)


def density_report(masks: PyTree, order: Sequence[str] | None = None) -> list[dict]:
    """Per-layer counts: ``[{"name", "shape", "total", "kept", "density"}, ...]``.

    ``name`` is the dotted param path (e.g. ``"blocks_3.shortcut_conv.kernel"``). Dense
    (``None``) leaves are omitted. Rows are in pytree order (JAX sorts dict keys), or in
    the order of ``order``: dotted module paths such as those of
    :func:`ntksap_jax.models.module_order` (forward-pass order); a row goes where its
    module (its name less the last part) stands.

    Example::

      for row in density_report(masks, module_order(model, x)): print(row["name"], row["kept"])
    """
    rows = []
    for name, m in named_leaves(masks):
        if m is None:
            continue
        arr = np.asarray(m)
        total = int(arr.size)
        kept = int(np.count_nonzero(arr))
        rows.append({"name": name, "shape": list(arr.shape), "total": total, "kept": kept, "density": kept / total})
    if order is None:
        return rows
    index = {name: i for i, name in enumerate(order)}
    return sorted(rows, key=lambda r: index.get(r["name"].rpartition(".")[0], index.get(r["name"], len(index))))


def collapsed_layers(masks: PyTree) -> list[str]:
    """Names of prunable layers left with no weight (layer collapse). Example: ``collapsed_layers(masks)  # []``."""
    return [r["name"] for r in density_report(masks) if r["kept"] == 0]


def format_report(rows: list[dict], counts: Mapping[str, str] | None = None) -> str:
    """A fixed-width text table of :func:`density_report` rows with a total line.

    Args:
      rows: ``[{"name", "shape", "kept", "total", "density", ...}, ...]``.
      counts: more integer columns, ``{header: row key}``, summed on the total line, e.g.
        ``{"on path": "effective"}`` for rows annotated with path counts
        (:func:`ntksap_jax.collapse.path_report`).

    Example::

      print(format_report(density_report(masks)))
    """
    if not rows:
        return "(no prunable layers)"
    counts = dict(counts or {})
    w = max(len("layer"), *(len(r["name"]) for r in rows))

    def extra(values) -> str:
        return "".join(f" {v:>9,}" if isinstance(v, int) else f" {v:>9}" for v in values)

    lines = [f"{'layer':<{w}}  {'shape':<18} {'kept':>10} {'total':>10} {'density':>9}{extra(counts)}"]
    for r in rows:
        shape = "x".join(str(s) for s in r["shape"])
        lines.append(f"{r['name']:<{w}}  {shape:<18} {r['kept']:>10,} {r['total']:>10,} {r['density']:>9.4%}"
                     f"{extra(r[k] for k in counts.values())}")
    kept = sum(r["kept"] for r in rows)
    total = sum(r["total"] for r in rows)
    sums = (sum(r[k] for r in rows) for k in counts.values())
    lines.append(f"{'total':<{w}}  {'':<18} {kept:>10,} {total:>10,} {kept / total:>9.4%}{extra(sums)}")
    return "\n".join(lines)
