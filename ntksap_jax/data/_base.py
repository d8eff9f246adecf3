"""The loaded-data-set interface: :class:`Dataset`, :class:`DataError` and the shared batch helpers.

Private: :mod:`ntksap_jax.data` re-exports ``Dataset`` and ``DataError``; the loaders
(:mod:`ntksap_jax.data._arrays`, :mod:`ntksap_jax.data._tfds`) subclass ``Dataset``.

Example::

    from ntksap_jax.data import Dataset, DataError

    def first_batch(ds: Dataset) -> dict:
        return next(ds.train_batches(32, seed=0, epoch=0))   # batch sizes: any positive integer
"""

from __future__ import annotations

import abc
from typing import Iterator

import numpy as np

from ntksap_jax._checks import non_negative_int, positive_int
from ntksap_jax.data.registry import DatasetInfo

__all__ = ["Dataset", "DataError"]

INSTALL = "pip install 'ntksap-jax[data]'"


class DataError(Exception):
    """A data set (or the package that provides it) is missing. The message is one line.

    Example::

      try:
          ds = load("cifar10", data_dir=args.data_dir)
      except DataError as e:
          sys.exit(f"error: {e}")
    """


# --------------------------------------------------------------------------------------------
# Argument checks and seeds.


def _check_batch_size(batch_size, devices: int = 1) -> int:
    """``int(batch_size)``, or ``ValueError`` unless it is a positive integer divisible by ``devices``.

    ``devices`` is the number of data-parallel devices each batch is split across (the size of
    a mesh's ``data`` axis); 1 without a mesh, where any positive batch size is fine.

    Example::

      _check_batch_size(7)              # 7
      _check_batch_size(60, devices=8)  # ValueError: batch_size 60 must be divisible by ...
    """
    b = positive_int(batch_size, "batch_size")
    n = positive_int(devices, "devices")
    if b % n:
        raise ValueError(
            f"batch_size {b} must be divisible by the number of data-parallel devices, {n} "
            "(each batch is split across them)"
        )
    return b


def _epoch_sequence(seed, epoch) -> np.random.SeedSequence:
    """``SeedSequence([seed, epoch])``: everything random in an epoch derives from it."""
    return np.random.SeedSequence([non_negative_int(seed, "seed"), non_negative_int(epoch, "epoch")])


def _pad_batch(image: np.ndarray, label: np.ndarray, batch_size: int) -> dict:
    n = len(label)
    mask = np.zeros(batch_size, np.bool_)
    mask[:n] = True
    if n < batch_size:
        image = np.concatenate([image, np.zeros((batch_size - n, *image.shape[1:]), image.dtype)])
        label = np.concatenate([label, np.zeros(batch_size - n, label.dtype)])
    return {"image": np.asarray(image, np.float32), "label": np.asarray(label, np.int32), "mask": mask}


# --------------------------------------------------------------------------------------------
# Datasets.


class Dataset(abc.ABC):
    """A loaded data set: ``info`` plus deterministic epochs of training batches and eval batches.

    Made by :func:`ntksap_jax.data.load`. Batches are dicts ``{"image": float32 (B, H, W, C),
    "label": int32 (B,), "mask": bool (B,)}``; ``B`` is any positive integer (training on a mesh,
    it must also divide by the mesh's ``data`` axis: :func:`ntksap_jax.train.train` checks that).

    Attributes:
      info: the :class:`DatasetInfo`; ``num_train`` and ``num_test`` are the counts actually loaded
        (the table's, except on mocked or generated test data).
    """

    info: DatasetInfo

    def steps_per_epoch(self, batch_size: int) -> int:
        """Full training batches per epoch: ``num_train // batch_size``.

        Example::

          load("digits").steps_per_epoch(64)  # 22 (1,437 = 22 * 64 + 29: 29 examples wait for another epoch)
        """
        return self.info.num_train // _check_batch_size(batch_size)

    def _check_train(self, batch_size: int) -> int:
        b = _check_batch_size(batch_size)
        if b > self.info.num_train:
            raise ValueError(
                f"batch_size {b} is larger than the {self.info.num_train} training examples of {self.info.name}: "
                "an epoch would have no full batch"
            )
        return b

    def _check_split(self, split: str) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test'; got {split!r}")

    @abc.abstractmethod
    def train_batches(self, batch_size: int, *, seed: int, epoch: int) -> Iterator[dict]:
        """One training epoch: ``steps_per_epoch(batch_size)`` full, shuffled, augmented batches.

        Order and augmentation are a pure function of ``(seed, epoch)`` (both non-negative
        integers): the same pair gives identical batches, so resuming after epoch ``k`` is exact.
        The ``num_train % batch_size`` examples left over differ from epoch to epoch (each epoch is
        a fresh permutation). ``mask`` is all True.

        Args:
          batch_size: examples per batch ``B``, a positive integer at most ``num_train``.
          seed: the run's data seed.
          epoch: the epoch number (0, 1, ...).

        Yields:
          ``{"image": float32 (B, H, W, C), "label": int32 (B,), "mask": bool (B,)}``.

        Example::

          for batch in ds.train_batches(128, seed=0, epoch=3):
              ...
        """
        raise NotImplementedError

    @abc.abstractmethod
    def eval_batches(self, batch_size: int, *, split: str = "test") -> Iterator[dict]:
        """Every example of ``split`` exactly once, in a fixed order, without augmentation.

        The last batch is padded to ``batch_size`` with zero images and label 0, ``mask`` False
        on the padding, so ``sum(b["mask"].sum()) == num_test`` (or ``num_train``).

        Args:
          batch_size: ``B``, a positive integer.
          split: ``"test"`` (for tiny_imagenet and imagenet2012, the validation split) or ``"train"``.

        Yields:
          ``{"image": float32 (B, H, W, C), "label": int32 (B,), "mask": bool (B,)}``.

        Example::

          correct = sum(((pred(b["image"]) == b["label"]) & b["mask"]).sum() for b in ds.eval_batches(500))
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        i = self.info
        return (f"{type(self).__name__}({i.name}: {i.num_train} train, {i.num_test} test, {i.input_shape}, "
                f"{i.num_classes} classes)")
