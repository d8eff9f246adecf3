"""Per-layer density allocations: uniform and Erdős–Rényi-Kernel (ERK, as in RigL).

These fix *how much* each layer keeps, independently of *which* weights a scorer picks,
so that "layer-wise ratios" can be separated from "which weights" in comparisons
(e.g. ``--method random --distribution erk``).

Example::

    dens = erk_densities(masks, 0.1)          # {"conv": {"kernel": 0.63, ...}, ...}
    counts = layer_counts(masks, dens)        # exact kept counts per layer
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from ntksap_jax._checks import is_none as _is_none
from ntksap_jax.masks import check_density

__all__ = ["uniform_densities", "erk_densities", "layer_counts", "get_distribution", "DISTRIBUTIONS"]

PyTree = Any


def uniform_densities(masks: PyTree, density: float) -> PyTree:
    """Every prunable layer keeps ``density``. Returns a masks-shaped pytree of floats (``None`` on dense leaves).

    Example::

      uniform_densities(masks, 0.1)["fc"]["kernel"]  # 0.1
    """
    d = check_density(density)
    return jax.tree.map(lambda m: None if m is None else d, masks, is_leaf=_is_none)


def erk_densities(masks: PyTree, density: float, power_scale: float = 1.0) -> PyTree:
    """Erdős–Rényi-Kernel densities (Evci et al. 2020, RigL's ``get_mask_random`` allocation).

    Layer ``l`` with kernel shape ``s`` gets density ``min(1, ε · (Σ s / Π s)^power_scale)``,
    with ``ε`` chosen so that the kept total is ``density × N``; layers that would exceed 1 are
    made dense and ``ε`` is solved again for the rest.

    Args:
      masks: mask pytree (only shapes are used).
      density: overall kept fraction in (0, 1].
      power_scale: exponent on the ERK ratio (1.0 = ERK; 0.0 = uniform).

    Returns:
      A masks-shaped pytree of per-layer densities in (0, 1] (``None`` on dense leaves).

    Example::

      dens = erk_densities(masks, 0.05)
    """
    d = check_density(density)
    leaves, treedef = jax.tree.flatten(masks, is_leaf=_is_none)
    live = [i for i, m in enumerate(leaves) if m is not None]
    sizes = {i: math.prod(np.shape(leaves[i])) for i in live}
    raw = {i: (sum(np.shape(leaves[i])) / sizes[i]) ** power_scale for i in live}
    total = sum(sizes.values())
    dense: set[int] = set()
    while True:
        budget = d * total - sum(sizes[i] for i in dense)
        denom = sum(raw[i] * sizes[i] for i in live if i not in dense)
        eps = budget / denom if denom > 0 else 0.0
        over = {i for i in live if i not in dense and eps * raw[i] > 1.0}
        if not over:
            break
        dense |= over
    out = list(leaves)
    for i in live:
        out[i] = 1.0 if i in dense else float(eps * raw[i])
    return jax.tree.unflatten(treedef, out)


DISTRIBUTIONS = {"uniform": uniform_densities, "erk": erk_densities}


def get_distribution(name: str):
    """The allocation function called ``name`` (``"uniform"`` or ``"erk"``).

    Example::

      get_distribution("erk")(masks, 0.1)
    """
    try:
        return DISTRIBUTIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown distribution {name!r}; choose one of {sorted(DISTRIBUTIONS)} (or 'global')"
        ) from None


def layer_counts(masks: PyTree, densities: PyTree) -> PyTree:
    """Exact kept counts ``max(1, round(d_l × n_l))`` per layer, as Python ints.

    Example::

      layer_counts(masks, uniform_densities(masks, 0.1))["fc"]["kernel"]  # 64 for a 64x10 kernel
    """
    return jax.tree.map(
        lambda m, d: None if m is None else max(1, round(float(d) * math.prod(np.shape(m)))),
        masks, densities, is_leaf=_is_none,
    )
