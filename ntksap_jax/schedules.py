"""Density schedules for iterative pruning.

A schedule maps the final density ``d`` and the number of iterations ``T`` to the
density kept after each iteration, ``d_1 ≥ d_2 ≥ ... ≥ d_T = d``.

Example::

    exponential_schedule(0.8 ** 18, 20)  # d_t = d^(t/T), as in NTK-SAP and SynFlow
"""

from __future__ import annotations

import numpy as np

from ntksap_jax.masks import check_density

__all__ = ["exponential_schedule", "linear_schedule", "get_schedule", "paper_density_grid", "SCHEDULES"]


def _check_iterations(iterations) -> int:
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer; got {iterations!r}")
    return int(iterations)


def exponential_schedule(density: float, iterations: int) -> np.ndarray:
    """``d_t = density^(t/T)`` for ``t = 1..T`` (float64, shape ``(T,)``).

    Each iteration removes the same *fraction* of the remaining weights.

    Example::

      exponential_schedule(0.01, 2)  # array([0.1, 0.01])
    """
    d = check_density(density)
    t = _check_iterations(iterations)
    return d ** (np.arange(1, t + 1, dtype=np.float64) / t)


def linear_schedule(density: float, iterations: int) -> np.ndarray:
    """``d_t = 1 - (1 - density)·t/T`` for ``t = 1..T`` (float64, shape ``(T,)``).

    Example::

      linear_schedule(0.5, 2)  # array([0.75, 0.5])
    """
    d = check_density(density)
    t = _check_iterations(iterations)
    return 1.0 - (1.0 - d) * np.arange(1, t + 1, dtype=np.float64) / t


SCHEDULES = {"exponential": exponential_schedule, "linear": linear_schedule}


def get_schedule(name: str):
    """The schedule function called ``name`` (``"exponential"`` or ``"linear"``).

    Example::

      get_schedule("exponential")(0.1, 5)
    """
    try:
        return SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}") from None


def paper_density_grid(ks=(2, 6, 10, 14, 18)) -> np.ndarray:
    """Densities ``0.8^k`` of the NTK-SAP / SynFlow papers.

    The default ``k`` gives 64%, 26.2%, 10.7%, 4.4%, 1.8% density
    (36%, 73.8%, 89.3%, 95.6%, 98.2% sparsity).

    Example::

      paper_density_grid()[-1]  # 0.018014398509481993
    """
    return 0.8 ** np.asarray(ks, dtype=np.float64)
