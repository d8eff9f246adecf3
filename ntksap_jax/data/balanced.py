"""Class-balanced scoring sets for the data-driven pruning methods (SNIP, iterative SNIP, GraSP, PX).

PX's official code scores a class-balanced subset, ``examples_per_class`` images of every class
(``iurada/px-ntk-pruning``, ``lib/pruners.py``, ``PX.get_balanced_subset``, lines 403-417: the
first ``k`` indices of each class in data-set order; ``ValueError`` when a class has fewer).
Here the ``k`` of each class are a seeded random choice (the same seed gives the same set), and
the result is interleaved class by class (example ``i`` has the ``i mod K``-th class), so that
every scoring batch, not only the whole set, is as balanced as it can be (with BatchNorm in train
mode a batch's statistics depend on its classes; the official loader keeps the class blocks).

Example::

    xs, ys = class_balanced(x_train, y_train, 10, num_classes=10, seed=0)   # 100 examples
    xs, ys = balanced_batch(load("digits"), 10, seed=0)                     # from a Dataset
"""

from __future__ import annotations

import numpy as np

__all__ = ["class_balanced", "balanced_batch"]


def _check_k(examples_per_class) -> int:
    if isinstance(examples_per_class, bool) or not isinstance(examples_per_class, (int, np.integer)) \
            or examples_per_class < 1:
        raise ValueError(f"examples_per_class must be a positive integer; got {examples_per_class!r}")
    return int(examples_per_class)


def _interleave(per_class: list[np.ndarray]) -> np.ndarray:
    """Indices ``[c0[0], c1[0], ..., c0[1], c1[1], ...]`` from equal-length per-class index arrays."""
    return np.stack(per_class, axis=1).reshape(-1)


def class_balanced(x, y, examples_per_class: int, *, num_classes: int | None = None, seed: int = 0):
    """``(x_sel, y_sel)``: exactly ``examples_per_class`` examples of every class, interleaved.

    Args:
      x: examples ``(N, ...)``.
      y: integer labels ``(N,)``.
      examples_per_class: ``k``, how many of each class.
      num_classes: the classes are ``0 .. num_classes - 1`` (each must have ``k``); default: the
        classes present in ``y``.
      seed: which ``k`` of each class (``numpy.random.default_rng(seed)``); same seed, same set.

    Returns:
      ``x_sel`` of shape ``(K·k, ...)`` and ``y_sel`` ``(K·k,)``, ``y_sel[i]`` the ``i mod K``-th class.

    Raises:
      ValueError: one line naming the class with fewer than ``k`` examples, or a bad argument.

    Example::

      xs, ys = class_balanced(x, y, 2, num_classes=3)   # ys == [0, 1, 2, 0, 1, 2]
    """
    k = _check_k(examples_per_class)
    x, y = np.asarray(x), np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or x.shape[:1] != y.shape:
        raise ValueError(f"class_balanced needs integer labels y of shape ({x.shape[0] if x.ndim else 0},); "
                         f"got {y.dtype} {y.shape}")
    classes = np.arange(num_classes) if num_classes is not None else np.unique(y)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in classes:
        idx = np.flatnonzero(y == c)
        if idx.size < k:
            raise ValueError(f"class {int(c)} has {idx.size} examples; examples_per_class={k} needs {k} of each class")
        chosen.append(np.sort(rng.choice(idx, size=k, replace=False)))
    order = _interleave(chosen)
    return x[order], y[order]


def balanced_batch(dataset, examples_per_class: int, *, seed: int = 0, chunk: int = 1024):
    """``(x, y)``: ``examples_per_class`` training examples of every class of a
    :class:`ntksap_jax.data.Dataset`, the first ones of each class in the epoch-0 order of ``seed``
    (the augmented images the training loop would see), interleaved as :func:`class_balanced`.

    Reads batches of ``chunk`` examples until every class has enough.

    Raises:
      ValueError: a class with fewer than ``k`` training examples (named), or a bad argument.

    Example::

      x, y = balanced_batch(load("digits"), 10, seed=0)   # (100, 8, 8, 1), (100,)
    """
    k = _check_k(examples_per_class)
    num_classes = dataset.info.num_classes
    size = min(int(chunk), dataset.info.num_train)
    xs: list = [[] for _ in range(num_classes)]
    for batch in dataset.train_batches(size, seed=seed, epoch=0):
        for c in range(num_classes):
            need = k - len(xs[c])
            if need > 0:
                xs[c].extend(batch["image"][batch["label"] == c][:need])
        if all(len(v) >= k for v in xs):
            break
    for c, v in enumerate(xs):
        if len(v) < k:
            raise ValueError(f"class {c} has {len(v)} training examples; examples_per_class={k} needs {k} of each "
                             "class")
    x = np.stack([np.stack(v) for v in xs], axis=1).reshape(num_classes * k, *np.shape(xs[0][0]))
    y = np.tile(np.arange(num_classes, dtype=np.int32), k)
    return x, y
