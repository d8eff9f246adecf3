"""The one table of data sets: shapes, class counts, loaders, split sizes and NTK-SAP defaults.

Every name the command line accepts is a row of :data:`REGISTRY` (a :class:`DatasetSpec`)::

    name           input (HWC)    classes  loader         train      test     T    R
    cifar10        (32, 32, 3)    10       cifar10        50,000     10,000   20   5
    cifar100       (32, 32, 3)    100      cifar100       50,000     10,000   100  1
    tiny_imagenet  (64, 64, 3)    200      tiny_imagenet  100,000    10,000   100  1
    imagenet       (224, 224, 3)  1000     imagenet2012   1,281,167  50,000   100  1   (alias of imagenet2012)
    imagenet2012   (224, 224, 3)  1000     imagenet2012   1,281,167  50,000   100  1
    digits         (8, 8, 1)      10       digits         1,437      360      100  1
    mnist          (28, 28, 1)    10       (none)         -          -        100  1   (shape of mnist5k; no loader)
    mnist5k        (28, 28, 1)    10       mnist5k        4,000      1,000    100  1

``loader`` is the name :func:`ntksap_jax.data.load` takes for the set (``None``: shape only, e.g.
for pruning, which scores on Gaussian inputs and needs no data). ``T`` (``ntksap_iterations``) and
``R`` (``ntksap_samples``) are the official NTK-SAP pruning defaults, keyed by data set: the
official scripts/run.sh prunes CIFAR-10 with ``--prune-epochs 20 --ntksap_R 5``, and ``T = 100,
R = 1`` are the official command line's defaults everywhere else. They live here, as fields of the
row, so that the command line and the presets read them from one place.

:data:`DATASETS` is the loadable part (a row whose loader is itself) as :class:`DatasetInfo`, the
record a loaded :class:`ntksap_jax.data.Dataset` carries. Importing this module imports nothing
but the standard library.

Example::

    from ntksap_jax.data.registry import get_dataset_spec, list_datasets

    spec = get_dataset_spec("imagenet")
    spec.input_shape, spec.num_classes, spec.loader          # (224, 224, 3), 1000, "imagenet2012"
    spec.ntksap_iterations, spec.ntksap_samples              # 100, 1
    list_datasets()                 # ("cifar10", "cifar100", "tiny_imagenet", "imagenet", ...)
    list_datasets(loadable=True)    # ("cifar10", "cifar100", "tiny_imagenet", "imagenet2012", "digits", "mnist5k")
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, NamedTuple

__all__ = [
    "DatasetSpec",
    "DatasetInfo",
    "REGISTRY",
    "DATASETS",
    "get_dataset_spec",
    "get_dataset_info",
    "list_datasets",
]


class DatasetInfo(NamedTuple):
    """What a model and a trainer need to know of a data set (the ``info`` of a loaded one).

    Attributes:
      name: the key in :data:`DATASETS`.
      input_shape: one image, HWC, e.g. ``(32, 32, 3)``.
      num_classes: labels are in ``[0, num_classes)``.
      num_train, num_test: examples in the training and test splits.
      offline: True for the sets that ship with a Python package (digits, mnist5k).

    Example::

      DatasetInfo("synthetic", (32, 32, 3), 10, 48, 20, True)
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    num_train: int
    num_test: int
    offline: bool


class DatasetSpec(NamedTuple):
    """One row of :data:`REGISTRY`: everything known of a data-set name without loading it.

    Attributes:
      name: the key in :data:`REGISTRY` (a ``--dataset`` value).
      input_shape: one image, HWC.
      num_classes: labels are in ``[0, num_classes)``.
      loader: the name :func:`ntksap_jax.data.load` takes for this set (``name`` itself, or the
        set it is an alias of); ``None`` for a shape-only name that has no loader.
      num_train, num_test: the split sizes (of the loader's set); ``None`` where unknown.
      offline: True for the sets that ship with a Python package (digits, mnist5k).
      ntksap_iterations: the official NTK-SAP pruning rounds ``T`` for this data set.
      ntksap_samples: the official NTK-SAP weight repeats ``R`` per round.

    Example::

      get_dataset_spec("cifar10").ntksap_samples   # 5
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    loader: str | None
    num_train: int | None
    num_test: int | None
    offline: bool
    ntksap_iterations: int
    ntksap_samples: int

    @property
    def loadable(self) -> bool:
        """Whether :func:`ntksap_jax.data.load` can load it (under :attr:`loader`)."""
        return self.loader is not None


def _row(name, shape, classes, loader, train, test, offline=False, iterations=100, samples=1) -> DatasetSpec:
    return DatasetSpec(name, shape, classes, loader, train, test, offline, iterations, samples)


_IMAGENET = ((224, 224, 3), 1000, "imagenet2012", 1_281_167, 50_000)  # imagenet is imagenet2012
_MNIST = ((28, 28, 1), 10)  # mnist: the shape of mnist5k, with no loader of its own

#: Every data-set name (``--dataset`` value) -> its :class:`DatasetSpec`, in the order listed.
REGISTRY: Mapping[str, DatasetSpec] = MappingProxyType({
    s.name: s
    for s in (
        _row("cifar10", (32, 32, 3), 10, "cifar10", 50_000, 10_000, iterations=20, samples=5),
        _row("cifar100", (32, 32, 3), 100, "cifar100", 50_000, 10_000),
        _row("tiny_imagenet", (64, 64, 3), 200, "tiny_imagenet", 100_000, 10_000),
        _row("imagenet", *_IMAGENET),
        _row("imagenet2012", *_IMAGENET),
        _row("digits", (8, 8, 1), 10, "digits", 1_437, 360, offline=True),
        _row("mnist", *_MNIST, None, None, None),
        _row("mnist5k", *_MNIST, "mnist5k", 4_000, 1_000, offline=True),
    )
})

#: The loadable sets (:func:`ntksap_jax.data.load`'s names) -> :class:`DatasetInfo`, in registry order.
DATASETS: dict[str, DatasetInfo] = {
    s.name: DatasetInfo(s.name, s.input_shape, s.num_classes, s.num_train, s.num_test, s.offline)
    for s in REGISTRY.values()
    if s.loader == s.name
}


def list_datasets(*, loadable: bool = False) -> tuple[str, ...]:
    """The registry's names (every ``--dataset`` value), or only those :func:`~ntksap_jax.data.load` takes.

    Example::

      list_datasets()                # ("cifar10", "cifar100", "tiny_imagenet", "imagenet", "imagenet2012",
                                     #  "digits", "mnist", "mnist5k")
      list_datasets(loadable=True)   # ("cifar10", "cifar100", "tiny_imagenet", "imagenet2012", "digits", "mnist5k")
    """
    return tuple(DATASETS if loadable else REGISTRY)


def _lookup(table: Mapping, name):
    try:
        return table[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(table)}") from None


def get_dataset_spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of any registry name; ``ValueError`` naming the bad name and the allowed ones.

    Example::

      get_dataset_spec("mnist").input_shape   # (28, 28, 1)
      get_dataset_spec("svhn")                # ValueError: unknown data set 'svhn'; choose one of cifar10, ...
    """
    return _lookup(REGISTRY, name)


def get_dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of a loadable set; ``ValueError`` naming the bad name and the allowed ones.

    Example::

      get_dataset_info("cifar10").input_shape  # (32, 32, 3)
      get_dataset_info("mnist").num_classes    # ValueError: unknown data set 'mnist'; choose one of ...
    """
    return _lookup(DATASETS, name)
