"""Pruning scorers and their registry.

A scorer *factory* ``make(model, input_shape, **config)`` returns a score function
``score(params, masks, batch_stats, key) -> scores``: a pytree shaped like ``masks``
(``None`` on dense leaves) where larger means "keep". Score functions are jit-compiled
once and never re-trace between pruning iterations.

Example::

    score = get_scorer("ntksap")(model, (32, 32, 3), samples=5)

Registered: ``ntksap``, ``random``, ``magnitude``, and the baselines ``snip``,
``iterative_snip``, ``grasp`` (labelled-loss scorers: ``num_classes=`` required, ``data=(x, y)``
optional), ``synflow`` (data-free; meant for ~100 iterations) and ``px`` (real ``data=(x, y)``
required; 100 iterations). Each is declared as a
:class:`Method` (:func:`get_method`): whether it needs data, its default rounds, its options.
The library's factories return a :class:`ScoreFn`, whose ``traces`` counts its compilations.
"""

from __future__ import annotations

from typing import Callable

from ntksap_jax.scores._protocol import Method, ScoreFn
from ntksap_jax.scores.basic import magnitude_scorer, random_scorer
from ntksap_jax.scores.grasp import grasp_scorer
from ntksap_jax.scores.ntksap import (
    Estimator,
    Reinit,
    SampleLoop,
    apply_with_batch_statistics,
    bn_statistics,
    kaiming_normal_reinit,
    make_reinit,
    ntksap_objective,
    ntksap_sample_draws,
    ntksap_sample_gradient,
    ntksap_scorer,
)
from ntksap_jax.scores.px import px_objective, px_roles, px_scorer
from ntksap_jax.scores.snip import iterative_snip_scorer, prune_loss, snip_scorer
from ntksap_jax.scores.synflow import synflow_objective, synflow_scorer

__all__ = [
    "Method",
    "ScoreFn",
    "get_method",
    "get_scorer",
    "list_scorers",
    "register_scorer",
    "ntksap_scorer",
    "random_scorer",
    "magnitude_scorer",
    "snip_scorer",
    "iterative_snip_scorer",
    "grasp_scorer",
    "synflow_scorer",
    "px_scorer",
    "px_objective",
    "px_roles",
    "prune_loss",
    "synflow_objective",
    "ntksap_objective",
    "ntksap_sample_draws",
    "ntksap_sample_gradient",
    "apply_with_batch_statistics",
    "bn_statistics",
    "kaiming_normal_reinit",
    "make_reinit",
    "Estimator",
    "Reinit",
    "SampleLoop",
]

_REGISTRY: dict[str, Method] = {}


def register_scorer(name: str, factory: Callable, *, needs_data: bool = False, default_iterations: int = 1,
                    official_by_dataset: bool = False, requires_data: bool = False) -> Method:
    """Register ``factory(model, input_shape, **config) -> score`` under ``name``; returns its :class:`Method`.

    Args:
      name: the method's name (``ntksap-jax prune --method NAME``, ``prune_model(method=NAME)``).
      factory: builds ``score(params, masks, batch_stats, key) -> scores``.
      needs_data: it scores a labelled batch (``data=(x, y)``, ``num_classes=``).
      default_iterations: pruning rounds when none are given.
      official_by_dataset: its official rounds and repeats come from the data set (NTK-SAP).
      requires_data: it cannot score without real data (PX; implies ``needs_data``).

    Raises ``ValueError`` if the name is taken.

    Example::

      register_scorer("mine", lambda model, input_shape, **cfg: my_score_fn, default_iterations=10)
    """
    if name in _REGISTRY:
        raise ValueError(f"a scorer named {name!r} is already registered")
    method = Method(name, factory, needs_data=needs_data or requires_data, default_iterations=default_iterations,
                    official_by_dataset=official_by_dataset, requires_data=requires_data)
    _REGISTRY[name] = method
    return method


def get_method(name: str) -> Method:
    """The :class:`Method` registered as ``name``; ``ValueError`` listing the names otherwise.

    Example::

      get_method("iterative_snip").needs_data   # True
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(list_scorers())}") from None


def get_scorer(name: str) -> Callable:
    """The factory registered as ``name``; ``ValueError`` listing the names otherwise.

    Example::

      get_scorer("magnitude")(model, (32, 32, 3))
    """
    return get_method(name).factory


def list_scorers() -> tuple[str, ...]:
    """Registered scorer names, sorted. Example: ``list_scorers()  # ('magnitude', 'ntksap', 'random')``."""
    return tuple(sorted(_REGISTRY))


register_scorer("ntksap", ntksap_scorer, default_iterations=20, official_by_dataset=True)
register_scorer("random", random_scorer)
register_scorer("magnitude", magnitude_scorer)
register_scorer("snip", snip_scorer, needs_data=True)
register_scorer("iterative_snip", iterative_snip_scorer, needs_data=True, default_iterations=100)
register_scorer("grasp", grasp_scorer, needs_data=True)
register_scorer("synflow", synflow_scorer, default_iterations=100)
register_scorer("px", px_scorer, needs_data=True, default_iterations=100, requires_data=True)
