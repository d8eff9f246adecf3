"""Layer collapse: layers with no weight, units cut off, weights on no input-output path.

Three levels, from cheap to exact:

* :func:`ntksap_jax.masks.collapsed_layers`: layers with no kept weight;
* :func:`unit_report`: per layer, output units (neurons / output channels) with no incoming
  kept weight, and input units with no outgoing one;
* :func:`path_report`: per layer, how many kept weights lie on at least one path from the
  input to the output, computed exactly by propagating positive values through the masked
  network (the SynFlow construction with every kept weight positive). ``disconnected`` is
  true when no path is left: the network's output no longer depends on its input.

:func:`max_critical_compression` searches the largest compression a method reaches before
collapse (SynFlow's "maximal critical compression").

Example::

    rep = path_report(model, params, masks, batch_stats, (32, 32, 3))
    rep["disconnected"], rep["effective_kept"], rep["total_kept"]
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ntksap_jax.masks import named_leaves
from ntksap_jax.model import as_model

__all__ = ["unit_report", "path_report", "on_path_masks", "max_critical_compression", "compression_grid"]

PyTree = Any


def unit_report(masks: PyTree) -> list[dict]:
    """Per prunable layer: units cut off by the mask.

    For a kernel of shape ``(..., C_in, C_out)`` (Flax layout), ``dead_outputs`` counts the
    output units ``j`` with ``kernel[..., j]`` all pruned (they receive no signal through
    this layer), ``dead_inputs`` the input units ``i`` with ``kernel[..., i, :]`` all pruned
    (this layer passes nothing on from them).

    Returns:
      ``[{"name", "outputs", "dead_outputs", "inputs", "dead_inputs"}, ...]`` in pytree order.

    Example::

      [r for r in unit_report(masks) if r["dead_outputs"]]
    """
    rows = []
    for name, m in named_leaves(masks):
        if m is None or np.ndim(m) < 2:
            continue
        a = np.asarray(m) != 0
        c_in, c_out = a.shape[-2], a.shape[-1]
        per_out = a.reshape(-1, c_out).any(axis=0)
        per_in = np.moveaxis(a, -2, 0).reshape(c_in, -1).any(axis=1)
        rows.append({"name": name, "outputs": int(c_out), "dead_outputs": int((~per_out).sum()),
                     "inputs": int(c_in), "dead_inputs": int((~per_in).sum())})
    return rows


def _path_variables(spec, params: PyTree, masks: PyTree, batch_stats: PyTree):
    """The path-propagation network: kept weights ``u/fan_in`` with ``u ~ U(0.5, 1.5)`` (0 if
    pruned), dense weight leaves likewise, normalisation scales 1, every other param 0;
    BatchNorm the identity (mean 0, variance 1)."""

    rng = np.random.default_rng(0)  # fixed draws, on the host (no compiled kernel per leaf shape)

    def param(path, p, m):
        shape = np.shape(p)
        if m is not None:
            positive = rng.uniform(0.5, 1.5, shape)
            return (np.asarray(m) != 0) * positive / spec.layout(path, shape).fan_in
        if len(shape) > 1:  # a dense (unpruned) weight: all connections exist
            return rng.uniform(0.5, 1.5, shape) / spec.layout(path, shape).fan_in
        if spec.norm_scale(path, p):
            return np.ones(shape)
        return np.zeros(shape)  # biases and anything else

    masks_full = jax.tree.map(lambda m, p: m, masks, params, is_leaf=lambda t: t is None)
    flat_p, tdef = jax.tree_util.tree_flatten_with_path(params)
    flat_m = tdef.flatten_up_to(masks_full) if masks_full is not None else [None] * len(flat_p)
    new_params = jax.tree.unflatten(tdef, [param(path, p, m) for (path, p), m in zip(flat_p, flat_m)])
    new_stats = None
    if batch_stats:
        new_stats = jax.tree_util.tree_map_with_path(
            lambda path, s: (np.ones if str(getattr(path[-1], "key", "")) == "var" else np.zeros)(np.shape(s)),
            batch_stats,
        )
    return new_params, new_stats


@functools.partial(jax.jit, static_argnums=0)
def _path_value_and_grad(spec, p64: PyTree, s64: PyTree, x: jax.Array):
    def total(p, xi):
        y = spec.apply(p, s64, xi)[0]
        c = jax.random.uniform(jax.random.key(1), y.shape, jnp.float64, 0.5, 1.5)
        return jnp.sum(y * c)

    value, (grads, gx) = jax.value_and_grad(total, argnums=(0, 1))(p64, x)
    return value, grads, jnp.any(gx != 0)


def path_report(model, params: PyTree, masks: PyTree, batch_stats: PyTree, input_shape: Sequence[int]) -> dict:
    """Which kept weights lie on an input-to-output path of the masked network.

    Every kept weight is set to a positive ``u/fan_in`` (``u ~ U(0.5, 1.5)``, fixed draws; the
    scale keeps values finite), biases to 0, normalisation scales to 1, BatchNorm statistics
    to the identity (mean 0, variance 1), and an all-ones input is propagated in float64.
    Without a mean-subtracting layer all activations are then non-negative, so a unit is
    positive iff some path reaches it, and a kept weight ``w`` lies on a path to the output
    iff ``∂(Σ c·outputs)/∂w ≠ 0`` (``c > 0`` fixed draws): exact for ReLU networks with
    BatchNorm, pooling and residual additions. With LayerNorm (transformers) the propagated
    values change sign; the test stays exact for smooth activations (GELU) and may call a
    weight behind a ReLU unit that happens to be negative "off path".

    Args:
      model: a linen or NNX module or a :class:`ntksap_jax.model.Model`.
      params, masks, batch_stats: as for pruning (batch_stats may be ``None``).
      input_shape: one example's shape, e.g. ``(32, 32, 3)``.

    Returns:
      ``{"disconnected": bool, "total_kept": int, "effective_kept": int,
      "layers": [{"name", "kept", "effective"}, ...]}``; ``disconnected``: the output no longer
      depends on the input.

    Example::

      rep = path_report(model, params, masks, batch_stats, (32, 32, 3))
      if rep["disconnected"]: print("collapsed")
    """
    on_path, connected = on_path_masks(model, params, masks, batch_stats, input_shape)
    layers = []
    for (name, m), (_, ok) in zip(named_leaves(masks), named_leaves(on_path)):
        if m is None:
            continue
        kept = np.asarray(m) != 0
        layers.append({"name": name, "kept": int(kept.sum()), "effective": int(np.asarray(ok).sum())})
    return {
        "disconnected": not connected,
        "total_kept": sum(r["kept"] for r in layers),
        "effective_kept": sum(r["effective"] for r in layers),
        "layers": layers,
    }


def on_path_masks(model, params: PyTree, masks: PyTree, batch_stats: PyTree, input_shape: Sequence[int]):
    """``(on_path, connected)``: a masks-shaped pytree of booleans, True where a kept weight lies
    on an input-output path (``None`` on dense leaves), and whether the output still depends on
    the input. The construction is :func:`path_report`'s.

    Example::

      on_path, connected = on_path_masks(model, params, masks, batch_stats, (32, 32, 3))
    """
    spec = as_model(model, tuple(input_shape))
    with jax.enable_x64(True):
        p64, s64 = _path_variables(spec, params, masks, batch_stats)
        x = np.ones((1, *tuple(input_shape)))
        # compiled once per (model, shapes): max_critical_compression calls this many times
        _, grads, connected = _path_value_and_grad(spec, p64, s64, x)
        on_path = jax.tree.map(
            lambda m, g, w: None if m is None else (np.asarray(m) != 0) & (np.asarray(g) * np.asarray(w) != 0),
            masks, grads, p64, is_leaf=lambda t: t is None)
    return on_path, bool(connected)


def compression_grid(max_compression: float = 1e4, per_decade: int = 4) -> np.ndarray:
    """Densities ``10^(-k/per_decade)``, ``k = 1, 2, ...`` down to ``1/max_compression``.

    Example::

      compression_grid(100, 2)  # array([0.316..., 0.1, 0.0316..., 0.01])
    """
    n = int(round(np.log10(max_compression) * per_decade))
    return 10.0 ** (-np.arange(1, n + 1) / per_decade)


def max_critical_compression(
    prune_at: Callable[[float], PyTree],
    is_collapsed: Callable[[PyTree], bool],
    densities: Iterable[float] | None = None,
) -> dict:
    """The largest compression (1/density) reached before the masks collapse.

    Walks ``densities`` from dense to sparse, pruning afresh at each (``prune_at(d) -> masks``),
    and stops at the first collapsed mask.

    Args:
      prune_at: ``prune_at(density) -> masks``.
      is_collapsed: e.g. ``lambda m: bool(collapsed_layers(m))`` or
        ``lambda m: path_report(model, params, m, bs, shape)["disconnected"]``.
      densities: decreasing densities; default :func:`compression_grid` ``(1e4, 4)``.

    Returns:
      ``{"max_compression", "density", "first_collapse_density", "tried": [(density, collapsed), ...]}``;
      ``max_compression`` is 1.0 if even the first density collapses, and
      ``first_collapse_density`` is ``None`` if none collapsed.

    Example::

      res = max_critical_compression(lambda d: prune(score, params, density=d, key=k).masks,
                                     lambda m: bool(collapsed_layers(m)))
    """
    grid = compression_grid() if densities is None else list(densities)
    best, tried = 1.0, []
    for d in grid:
        collapsed = bool(is_collapsed(prune_at(float(d))))
        tried.append((float(d), collapsed))
        if collapsed:
            return {"max_compression": 1.0 / best, "density": best, "first_collapse_density": float(d), "tried": tried}
        best = float(d)
    return {"max_compression": 1.0 / best, "density": best, "first_collapse_density": None, "tried": tried}
