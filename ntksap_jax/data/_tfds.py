"""The tensorflow-datasets sets: cifar10, cifar100, tiny_imagenet and imagenet2012 (private).

TensorFlow and tensorflow-datasets are imported inside :func:`_load_tfds` (never at module import),
and TensorFlow is kept off the GPUs. :data:`_TFDS_SPECS` holds each set's tfds name, test split,
normalisation and augmentation; :class:`_TfdsDataset` rebuilds a deterministic ``tf.data``
pipeline per epoch and yields NumPy batches. tiny_imagenet is read by the builder in
:mod:`ntksap_jax.data._tiny_imagenet`.

Example::

    from ntksap_jax.data._tfds import _load_tfds

    ds = _load_tfds("cifar10", "/data/tfds", download=False)   # what load("cifar10", data_dir=...) does
    next(ds.train_batches(128, seed=0, epoch=0))["image"].shape   # (128, 32, 32, 3)
"""

from __future__ import annotations

import os
from typing import Iterator, NamedTuple

import numpy as np

from ntksap_jax.data._base import INSTALL, DataError, Dataset, _check_batch_size, _epoch_sequence, _pad_batch
from ntksap_jax.data.registry import DATASETS, DatasetInfo

__all__ = ["_TFDS_SPECS", "_TfdsDataset", "_load_tfds", "_prepare"]


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
    "cifar10": _TfdsSpec(
        "cifar10", "test", (0.491, 0.482, 0.447), (0.247, 0.243, 0.262), "crop_flip", 4, 50_000, False
    ),
    "cifar100": _TfdsSpec(
        "cifar100", "test", (0.507, 0.487, 0.441), (0.267, 0.256, 0.276), "crop_flip", 4, 50_000, False
    ),
    "tiny_imagenet": _TfdsSpec(
        "tiny_imagenet", "validation", (0.480, 0.448, 0.397), (0.276, 0.269, 0.282), "crop_flip", 4, 100_000, True
    ),
    "imagenet2012": _TfdsSpec(
        "imagenet2012", "validation", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "resized_crop_flip", 0, 10_000, True
    ),
}

_IMAGENET_RESIZE = 256
_IMAGENET_CROP = DATASETS["imagenet2012"].input_shape[0]  # 224


def _import_tf(name: str):
    """``(tf, tfds)``, with TensorFlow kept off the GPUs, or ``DataError`` saying what to install."""
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(f"{name} needs tensorflow and tensorflow-datasets: {INSTALL}") from None
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
        from ntksap_jax.data import _tiny_imagenet as ti

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
        f"python -c \"import tensorflow_datasets as tfds; "
        f"tfds.builder('{name}', data_dir='{root}').download_and_prepare()\" "
        f"(or load(..., download=True)), copy that folder to this machine and pass --data-dir {root}"
    )


def _manual_files_present(name: str, manual: str) -> bool:
    if name == "tiny_imagenet":
        from ntksap_jax.data import _tiny_imagenet as ti

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
        ds = ds.shuffle(min(self._spec.shuffle_buffer, self.info.num_train), seed=shuffle_seed,
                        reshuffle_each_iteration=False)
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
        raise DataError(f"preparing {name} needs importlib_resources (a tensorflow-datasets bug): {INSTALL}") from None


def _load_tfds(name: str, data_dir: str | None, download: bool) -> _TfdsDataset:
    spec = _TFDS_SPECS[name]
    tf, tfds = _import_tf(name)
    root = os.path.abspath(os.path.expanduser(os.fspath(data_dir))) if data_dir else _default_data_dir(tfds)
    if name == "tiny_imagenet":
        from ntksap_jax.data._tiny_imagenet import TinyImagenet

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
