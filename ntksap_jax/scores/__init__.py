"""Pruning scorers and their registry.

A scorer *factory* ``make(model, input_shape, **config)`` returns a score function
``score(params, masks, batch_stats, key) -> scores``: a pytree shaped like ``masks``
(``None`` on dense leaves) where larger means "keep". Score functions are jit-compiled
once and never re-trace between pruning iterations.

Example::

    score = get_scorer("ntksap")(model, (32, 32, 3), samples=5)

Registered: ``ntksap``, ``random``, ``magnitude``, and the baselines ``snip``,
``iterative_snip``, ``grasp`` (labelled-loss scorers: ``num_classes=`` required, ``data=(x, y)``
optional) and ``synflow`` (data-free; meant for ~100 iterations).
"""

from __future__ import annotations

from typing import Callable

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
from ntksap_jax.scores.snip import iterative_snip_scorer, prune_loss, snip_scorer
from ntksap_jax.scores.synflow import synflow_objective, synflow_scorer

__all__ = [
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

_REGISTRY: dict[str, Callable] = {}


def register_scorer(name: str, factory: Callable) -> None:
    """Register ``factory(model, input_shape, **config) -> score`` under ``name``.

    Raises ``ValueError`` if the name is taken.

    Example::

      register_scorer("mine", lambda model, input_shape, **cfg: my_score_fn)
    """
    if name in _REGISTRY:
        raise ValueError(f"a scorer named {name!r} is already registered")
    _REGISTRY[name] = factory


def get_scorer(name: str) -> Callable:
    """The factory registered as ``name``; ``ValueError`` listing the names otherwise.

    Example::

      get_scorer("magnitude")(model, (32, 32, 3))
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {list_scorers()}") from None


def list_scorers() -> tuple[str, ...]:
    """Registered scorer names, sorted. Example: ``list_scorers()  # ('magnitude', 'ntksap', 'random')``."""
    return tuple(sorted(_REGISTRY))


register_scorer("ntksap", ntksap_scorer)
register_scorer("random", random_scorer)
register_scorer("magnitude", magnitude_scorer)
register_scorer("snip", snip_scorer)
register_scorer("iterative_snip", iterative_snip_scorer)
register_scorer("grasp", grasp_scorer)
register_scorer("synflow", synflow_scorer)
