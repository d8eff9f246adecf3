"""What a pruning method is to the rest of the library (private; public through ``ntksap_jax.scores``).

* :class:`Method`: a registered method, declared once: its scorer factory, whether it scores a
  labelled batch, its default number of pruning rounds, and the options its factory takes (read
  from the factory's signature). :func:`ntksap_jax.prune_model` and the command line read what a
  method needs from here instead of branching on its name.
* :class:`ScoreFn`: what a factory returns: ``score(params, masks, batch_stats, key) -> scores``
  with :attr:`ScoreFn.traces`, how many times its computation was traced (each trace is one XLA
  compilation), and :meth:`ScoreFn.lowered` for cost analysis.

Example::

    method = get_method("snip")          # Method(name='snip', needs_data=True, default_iterations=1, ...)
    score = method.factory(model, (32, 32, 3), num_classes=10, data=(x, y))
    prune(score, params, density=0.1, key=key); score.traces   # 1
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Sequence

__all__ = ["Method", "ScoreFn", "TraceCounter"]

PyTree = Any


class TraceCounter:
    """Counts how many times the functions it wraps are traced (a Python side effect that runs
    only while JAX traces, never when a compiled executable runs).

    Example::

      counter = TraceCounter()
      f = jax.jit(counter.wrap(lambda x: x + 1)); f(1.0); f(2.0); counter.count   # 1
    """

    def __init__(self):
        self.count = 0

    def wrap(self, fun: Callable) -> Callable:
        @functools.wraps(fun)
        def traced(*args, **kwargs):
            self.count += 1
            return fun(*args, **kwargs)

        return traced


class ScoreFn:
    """A score function ``score(params, masks, batch_stats, key) -> scores`` (a pytree shaped
    like ``masks``, ``None`` on dense leaves; larger means keep).

    Attributes:
      traces: how many times the computation was traced, i.e. compiled: 1 after any number of
        pruning rounds on arrays of one shape (2 for NTK-SAP when its last input batch is short).

    Example::

      score = ntksap_scorer(model, (32, 32, 3), samples=2)
      s = score(params, masks, batch_stats, jax.random.key(0)); score.traces   # 1
    """

    def __init__(self, call: Callable, counter: TraceCounter, lowered: Callable | None = None):
        self._call, self._counter, self._lowered = call, counter, lowered
        functools.update_wrapper(self, call)

    def __call__(self, params: PyTree, masks: PyTree, batch_stats: PyTree, key) -> PyTree:
        return self._call(params, masks, batch_stats, key)

    @property
    def traces(self) -> int:
        return self._counter.count

    def lowered(self, params: PyTree, masks: PyTree, batch_stats: PyTree, key) -> list[tuple[Any, int]]:
        """``[(jax.stages.Lowered, uses per call), ...]``: the programs one call runs, for cost
        analysis (``lowered.compile().cost_analysis()``); ``[]`` if the scorer does not say.

        Example::

          flops = sum(n * low.compile().cost_analysis()["flops"] for low, n in score.lowered(p, m, bs, key))
        """
        return [] if self._lowered is None else self._lowered(params, masks, batch_stats, key)


def _options(factory: Callable) -> tuple[str, ...]:
    """The keyword options of a factory ``factory(model, input_shape, **options)``."""
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return ()
    return tuple(p.name for p in params[2:] if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered pruning method.

    Attributes:
      name: the registry name (``ntksap``, ``snip``, ...).
      factory: ``factory(model, input_shape, **options) -> ScoreFn``.
      needs_data: scores a labelled batch (``data=(x, y)``, ``num_classes=``): SNIP, iterative
        SNIP, GraSP. Without data they score Gaussian inputs with random labels, and warn.
      default_iterations: pruning rounds when none are given (the official scripts: NTK-SAP 20
        on CIFAR-10, SynFlow and iterative SNIP 100, the rest one-shot).
      official_by_dataset: the official rounds and repeats depend on the data set (NTK-SAP:
        T = 20, R = 5 on CIFAR-10, T = 100, R = 1 elsewhere; see ``ntksap_jax.data``).
      requires_data: it cannot score without real data (PX): the workflows load a labelled batch
        for it instead of drawing Gaussian inputs.
      options: the keyword options ``factory`` takes (from its signature).

    Example::

      get_method("synflow").default_iterations   # 100
      "eps" in get_method("ntksap").options       # True
    """

    name: str
    factory: Callable
    needs_data: bool = False
    default_iterations: int = 1
    official_by_dataset: bool = False
    options: Sequence[str] = ()
    requires_data: bool = False

    def __post_init__(self):
        if not self.options:
            object.__setattr__(self, "options", _options(self.factory))
