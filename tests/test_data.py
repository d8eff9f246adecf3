"""Data pipelines: shapes, dtypes, label ranges, normalisation, fixed splits, determinism under a seed,
eval coverage with masked padding, and one-line errors. The tfds sets run on ``tfds.testing.mock_data``
(cifar10, cifar100, imagenet2012) and on a small generated ``tiny-imagenet-200`` folder; nothing is
downloaded."""

import os
import subprocess
import sys
import zlib

import jax
import numpy as np
import pytest

from ntksap_jax import data
from ntksap_jax.data import DATASETS, DataError, get_dataset_info, load
from ntksap_jax.data._base import _check_batch_size
from ntksap_jax.data.registry import get_dataset_spec, list_datasets


def _stack(batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _assert_batches(batches, batch_size, shape, num_classes):
    for b in batches:
        assert set(b) == {"image", "label", "mask"}
        assert b["image"].shape == (batch_size, *shape) and b["image"].dtype == np.float32
        assert b["label"].shape == (batch_size,) and b["label"].dtype == np.int32
        assert b["mask"].shape == (batch_size,) and b["mask"].dtype == np.bool_
        assert np.isfinite(b["image"]).all()
        assert ((b["label"] >= 0) & (b["label"] < num_classes)).all()


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def _differs(a, b):
    return any(not np.array_equal(x["image"], y["image"]) for x, y in zip(a, b))


def _raw_uint8(images, mean, std):
    """Undo ``(x / 255 - mean) / std``."""
    raw = (images * np.asarray(std) + np.asarray(mean)) * 255.0
    np.testing.assert_allclose(raw, np.round(raw), atol=2e-3)
    return np.round(raw).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Registry and errors.


def test_registry_and_unknown_name():
    assert list(DATASETS) == ["cifar10", "cifar100", "tiny_imagenet", "imagenet2012", "digits", "mnist5k"]
    assert get_dataset_info("cifar100") == DATASETS["cifar100"]
    assert get_dataset_info("imagenet2012").num_test == 50_000
    assert get_dataset_info("digits").input_shape == (8, 8, 1) and get_dataset_info("digits").offline
    assert get_dataset_info("mnist5k").input_shape == (28, 28, 1) and not get_dataset_info("cifar10").offline
    for call in (lambda: get_dataset_info("mnist"), lambda: load("mnist")):
        with pytest.raises(ValueError, match="'mnist'") as e:
            call()
        assert all(name in str(e.value) for name in DATASETS)


def test_batch_size_checks(monkeypatch):
    ds = load("digits")
    monkeypatch.setattr(jax, "local_device_count", lambda *a, **k: 8)
    # Without a mesh the host's device count is no constraint (it was: a defect, fixed; the mesh's
    # data axis is checked where batches are sharded, see test_batch_size_divides_the_devices_it_is_given).
    assert ds.steps_per_epoch(60) == 1437 // 60 == len(list(ds.train_batches(60, seed=0, epoch=0)))
    assert sum(int(b["mask"].sum()) for b in ds.eval_batches(60)) == 360
    assert ds.steps_per_epoch(64) == 1437 // 64
    with pytest.raises(ValueError, match="larger than the 1437 training examples"):
        ds.train_batches(1440, seed=0, epoch=0)
    for bad in (0, -8, 8.0, True):
        with pytest.raises(ValueError, match="batch_size"):
            ds.eval_batches(bad)
    with pytest.raises(ValueError, match="seed"):
        ds.train_batches(8, seed=-1, epoch=0)
    with pytest.raises(ValueError, match="epoch"):
        ds.train_batches(8, seed=0, epoch=1.5)
    with pytest.raises(ValueError, match="split"):
        ds.eval_batches(8, split="validation")


def test_batch_size_divides_the_devices_it_is_given():
    # The divisibility is the caller's number of data-parallel devices (default 1: no mesh), not
    # jax.local_device_count() (8 simulated devices cannot be set in-process, so the check is called directly).
    assert _check_batch_size(7) == 7 and _check_batch_size(np.int64(60), devices=4) == 60
    assert type(_check_batch_size(np.int64(60), devices=4)) is int
    with pytest.raises(ValueError, match=r"^batch_size 60 must be divisible by the number of data-parallel "
                                         r"devices, 8 \(each batch is split across them\)$"):
        _check_batch_size(60, devices=8)
    for bad in (0, -2, True, 2.0):
        with pytest.raises(ValueError, match=r"^devices must be a positive integer; got "):
            _check_batch_size(8, devices=bad)
    # A batch size that divides no usual device count is fine without a mesh.
    ds = load("digits")
    a = list(ds.train_batches(7, seed=0, epoch=0))
    assert len(a) == ds.steps_per_epoch(7) == 1437 // 7
    _assert_batches(a, 7, (8, 8, 1), 10)
    e = list(ds.eval_batches(7))
    _assert_batches(e, 7, (8, 8, 1), 10)
    assert sum(int(b["mask"].sum()) for b in e) == 360


def test_argument_messages_are_the_shared_checks():
    ds = load("digits")
    for call, message in (
        (lambda: ds.eval_batches(0), "batch_size must be a positive integer; got 0"),
        (lambda: ds.steps_per_epoch(True), "batch_size must be a positive integer; got True"),
        (lambda: ds.train_batches(8, seed=-1, epoch=0), "seed must be a non-negative integer; got -1"),
        (lambda: ds.train_batches(8, seed=0, epoch=1.5), "epoch must be a non-negative integer; got 1.5"),
    ):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == message


# The command line's table before the registry: name -> (shape, classes, official NTK-SAP T, R).
_CLI_TABLE = {
    "cifar10": ((32, 32, 3), 10, 20, 5),
    "cifar100": ((32, 32, 3), 100, 100, 1),
    "tiny_imagenet": ((64, 64, 3), 200, 100, 1),
    "imagenet": ((224, 224, 3), 1000, 100, 1),
    "imagenet2012": ((224, 224, 3), 1000, 100, 1),
    "mnist": ((28, 28, 1), 10, 100, 1),
    "mnist5k": ((28, 28, 1), 10, 100, 1),
    "digits": ((8, 8, 1), 10, 100, 1),
}


def test_one_registry_answers_every_command_line_name():
    assert sorted(list_datasets()) == sorted(_CLI_TABLE) and len(list_datasets()) == len(_CLI_TABLE)
    assert list_datasets(loadable=True) == tuple(DATASETS) and data.list_datasets is list_datasets
    for name, (shape, classes, t, r) in _CLI_TABLE.items():
        spec = get_dataset_spec(name)
        assert (spec.name, spec.input_shape, spec.num_classes, spec.ntksap_iterations, spec.ntksap_samples) == (
            name, shape, classes, t, r)
        if spec.loadable:
            info = get_dataset_info(spec.loader)
            assert (info.input_shape, info.num_classes, info.num_train, info.num_test, info.offline) == (
                spec.input_shape, spec.num_classes, spec.num_train, spec.num_test, spec.offline)
    assert get_dataset_spec("imagenet").loader == "imagenet2012" and get_dataset_spec("imagenet2012").loadable
    mnist = get_dataset_spec("mnist")
    assert not mnist.loadable and mnist.loader is None and mnist.num_train is None and mnist.num_test is None
    assert {n: get_dataset_spec(n).loader for n in DATASETS} == {n: n for n in DATASETS}
    with pytest.raises(ValueError, match="'svhn'") as e:
        get_dataset_spec("svhn")
    assert "\n" not in str(e.value) and all(name in str(e.value) for name in _CLI_TABLE)


def test_presets_take_shapes_classes_and_official_defaults_from_the_registry():
    from ntksap_jax.presets import PRESETS

    for p in PRESETS.values():
        spec = get_dataset_spec(p.dataset)
        assert spec.loadable and (p.input_shape, p.num_classes) == (spec.input_shape, spec.num_classes)
        assert p.ntksap_num_inputs == 10 * spec.num_classes and p.ntksap_samples == spec.ntksap_samples
        if not spec.offline:  # the offline presets prune with T = 20 (their own, cheaper setting)
            assert p.ntksap_iterations == spec.ntksap_iterations


def _stdout_without_tensorflow(code: str) -> str:
    """``code``'s printed output in a fresh interpreter where importing tensorflow(-datasets) fails."""
    block = "import sys; sys.modules['tensorflow'] = None; sys.modules['tensorflow_datasets'] = None\n"
    out = subprocess.run([sys.executable, "-c", block + code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_registry_and_presets_import_without_tensorflow():
    code = (
        "from ntksap_jax.data.registry import get_dataset_spec\n"
        "from ntksap_jax.presets import get_preset\n"
        "print(get_dataset_spec('imagenet').loader, get_preset('mlp-digits').input_shape)\n"
    )
    assert _stdout_without_tensorflow(code) == "imagenet2012 (8, 8, 1)"


@pytest.mark.parametrize("name", ["cifar10", "tiny_imagenet", "imagenet2012"])
def test_missing_tfds_data_is_one_clear_line(tmp_path, name):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError) as e:
        load(name, data_dir=str(tmp_path))
    message = str(e.value)
    assert "\n" not in message and "--data-dir" in message and str(tmp_path) in message
    expected = {
        "cifar10": "download_and_prepare()",
        "tiny_imagenet": "tiny-imagenet-200.zip",
        "imagenet2012": "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar",
    }[name]
    assert expected in message
    if name != "cifar10":
        assert os.path.join(str(tmp_path), "downloads", "manual") in message


def test_tfds_importlib_resources_bug_gives_a_clear_error():
    class Builder:  # tensorflow-datasets 4.9.x without importlib_resources (tensorflow/datasets#11212)
        def download_and_prepare(self, download_config=None):
            raise ModuleNotFoundError("No module named 'importlib_resources'", name="importlib_resources")

    with pytest.raises(DataError, match=r"^preparing tiny_imagenet needs importlib_resources .*ntksap-jax\[data\]'$"):
        data._prepare("tiny_imagenet", Builder(), None)


def test_no_tensorflow_needed_for_import_and_offline_sets():
    code = (
        "from ntksap_jax import data\n"
        "b = next(data.load('digits').train_batches(8, seed=0, epoch=0)); assert b['image'].shape == (8, 8, 8, 1)\n"
        "try:\n    data.load('cifar10')\nexcept data.DataError as e:\n    print(e)\n"
    )
    assert _stdout_without_tensorflow(code) == \
        "cifar10 needs tensorflow and tensorflow-datasets: pip install 'ntksap-jax[data]'"


# --------------------------------------------------------------------------------------------
# Offline in-memory sets.

_FIXED = {  # the fixed split: first test indices (into load_digits() / mnist_data() order) and a CRC of all
    "digits": ([3, 7, 13, 19, 36, 38, 43, 48, 53, 55], 488846306, 1437, 360),
    "mnist5k": ([1, 10, 12, 15, 21, 37, 45, 46, 54, 56], 2586965296, 4000, 1000),
}


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_offline_split_is_fixed_stratified_and_normalised(name):
    ds = load(name)
    first, crc, n_train, n_test = _FIXED[name]
    assert ds.info == DATASETS[name] and (ds.info.num_train, ds.info.num_test) == (n_train, n_test)
    assert ds.test_index[:10].tolist() == first
    assert zlib.crc32(np.asarray(ds.test_index, np.int64).tobytes()) == crc
    assert np.intersect1d(ds.train_index, ds.test_index).size == 0
    assert len(np.union1d(ds.train_index, ds.test_index)) == n_train + n_test

    train, test = _stack(list(ds.eval_batches(100, split="train"))), _stack(list(ds.eval_batches(100)))
    assert train["mask"].sum() == n_train and test["mask"].sum() == n_test
    y_train, y_test = train["label"][train["mask"]], test["label"][test["mask"]]
    # Stratified: every class in both splits, each split's share of a class within one example of 20%.
    counts_train, counts_test = np.bincount(y_train, minlength=10), np.bincount(y_test, minlength=10)
    assert (counts_test > 0).all() and (counts_train > 0).all()
    assert np.all(np.abs(counts_test - (counts_train + counts_test) * n_test / (n_train + n_test)) < 1)
    if name == "mnist5k":
        assert (counts_test == 100).all() and (counts_train == 400).all()
    # Normalised with the training split's statistics (the constants in the module).
    x = train["image"][train["mask"]]
    assert abs(x.mean()) < 1e-3 and abs(x.std() - 1) < 1e-3
    mean, std = data._ARRAY_NORM[name]
    scale = 16 if name == "digits" else 255
    raw = (x * std[0] + mean[0]) * scale
    np.testing.assert_allclose(raw, np.round(raw), atol=1e-3)
    assert np.round(raw).min() == 0 and np.round(raw).max() == scale


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_offline_batches_are_deterministic(name):
    ds = load(name)
    shape = DATASETS[name].input_shape
    a = list(ds.train_batches(32, seed=7, epoch=2))
    assert len(a) == ds.steps_per_epoch(32) == ds.info.num_train // 32
    _assert_batches(a, 32, shape, 10)
    assert all(b["mask"].all() for b in a)
    _assert_same(a, list(ds.train_batches(32, seed=7, epoch=2)))
    assert _differs(a, list(ds.train_batches(32, seed=7, epoch=3)))
    assert _differs(a, list(ds.train_batches(32, seed=8, epoch=2)))
    # Eval: fixed order, last batch padded and masked.
    e = list(ds.eval_batches(64))
    _assert_batches(e, 64, shape, 10)
    _assert_same(e, list(ds.eval_batches(64)))
    assert len(e) == -(-ds.info.num_test // 64)
    pad = len(e) * 64 - ds.info.num_test
    assert e[-1]["mask"].sum() == 64 - pad and not e[-1]["mask"][64 - pad :].any()
    assert (e[-1]["image"][64 - pad :] == 0).all() and all(b["mask"].all() for b in e[:-1])


# --------------------------------------------------------------------------------------------
# tfds sets on mock data.


@pytest.fixture(scope="module")
def tfds():
    return pytest.importorskip("tensorflow_datasets")


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_on_mock_data(tfds, tmp_path, name):
    mean, std = data._TFDS_SPECS[name].mean, data._TFDS_SPECS[name].std
    with tfds.testing.mock_data(num_examples=20):
        ds = load(name, data_dir=str(tmp_path))
        assert ds.info == DATASETS[name]._replace(num_train=20, num_test=20)
        raw = np.stack([ex["image"] for ex in tfds.as_numpy(tfds.load(name, split="train", data_dir=str(tmp_path)))])
        a = list(ds.train_batches(8, seed=3, epoch=0))
        assert len(a) == ds.steps_per_epoch(8) == 2
        _assert_batches(a, 8, (32, 32, 3), DATASETS[name].num_classes)
        assert all(b["mask"].all() for b in a)
        _assert_same(a, list(ds.train_batches(8, seed=3, epoch=0)))
        assert _differs(a, list(ds.train_batches(8, seed=3, epoch=1)))
        assert _differs(a, list(ds.train_batches(8, seed=4, epoch=0)))

        # Every training image is a 32x32 crop of a distinct source image zero-padded by 4, maybe flipped.
        padded = np.pad(raw.astype(np.int64), [(0, 0), (4, 4), (4, 4), (0, 0)])
        windows = np.lib.stride_tricks.sliding_window_view(padded, (32, 32), axis=(1, 2))  # (20, 9, 9, 3, 32, 32)
        sources, moves = [], set()
        for image in _raw_uint8(_stack(a)["image"], mean, std):
            found = [
                (src, dy, dx, flip)
                for flip, view in ((False, image), (True, image[:, ::-1]))
                for src, dy, dx in zip(*np.nonzero((windows == view.transpose(2, 0, 1)).all(axis=(3, 4, 5))))
            ]
            assert len(found) == 1
            sources.append(found[0][0])
            moves.add(found[0][1:])
        assert len(set(sources)) == 16 and len(moves) > 4  # no repeats in an epoch; crops and flips vary

        # Eval: the source images in order, normalised, the last batch padded and masked.
        e = list(ds.eval_batches(8))
        _assert_batches(e, 8, (32, 32, 3), DATASETS[name].num_classes)
        assert [b["mask"].sum() for b in e] == [8, 8, 4] and not e[-1]["mask"][4:].any()
        test = _stack(e)
        np.testing.assert_array_equal(_raw_uint8(test["image"][:20], mean, std), raw)
        _assert_same(e, list(ds.eval_batches(8)))


def test_imagenet2012_on_mock_data(tfds, tmp_path):
    lo = (0 - np.asarray(data._TFDS_SPECS["imagenet2012"].mean)) / data._TFDS_SPECS["imagenet2012"].std
    hi = (1 - np.asarray(data._TFDS_SPECS["imagenet2012"].mean)) / data._TFDS_SPECS["imagenet2012"].std
    with tfds.testing.mock_data(num_examples=10):  # random-sized JPEGs (5 to 49 pixels a side)
        ds = load("imagenet2012", data_dir=str(tmp_path))
        assert (ds.info.num_train, ds.info.num_test, ds.info.num_classes) == (10, 10, 1000)
        a = list(ds.train_batches(4, seed=0, epoch=5))
        assert len(a) == ds.steps_per_epoch(4) == 2
        _assert_batches(a, 4, (224, 224, 3), 1000)
        _assert_same(a, list(ds.train_batches(4, seed=0, epoch=5)))
        assert _differs(a, list(ds.train_batches(4, seed=0, epoch=6)))
        e = list(ds.eval_batches(4))
        _assert_batches(e, 4, (224, 224, 3), 1000)
        assert sum(b["mask"].sum() for b in e) == 10 and [b["mask"].sum() for b in e] == [4, 4, 2]
        _assert_same(e, list(ds.eval_batches(4)))
        for b in a + e:
            assert (b["image"] >= lo - 1e-4).all() and (b["image"] <= hi + 1e-4).all()


# --------------------------------------------------------------------------------------------
# Tiny ImageNet builder on a generated folder.

_WNIDS = ["n03000003", "n01000001", "n02000002"]  # wnids.txt order; labels follow sorted order


def _value(label: int) -> int:
    return 30 + 90 * label  # every pixel of an image of class `label`


def _write_tiny_imagenet(root, tf):
    """3 classes x 4 training images and 6 validation images; pixel values encode the class."""
    os.makedirs(os.path.join(root, "val", "images"))
    with open(os.path.join(root, "wnids.txt"), "w") as f:
        f.write("\n".join(_WNIDS) + "\n")

    def write(path, label, channels=3):
        image = np.full((64, 64, channels), _value(label), np.uint8)
        with open(path, "wb") as f:
            f.write(tf.io.encode_jpeg(image, quality=100).numpy())

    for wnid in _WNIDS:
        folder = os.path.join(root, "train", wnid, "images")
        os.makedirs(folder)
        for k in range(4):
            write(os.path.join(folder, f"{wnid}_{k}.JPEG"), sorted(_WNIDS).index(wnid), channels=1 if k == 0 else 3)
    val_wnids = ["n02000002", "n03000003", "n01000001", "n01000001", "n03000003", "n02000002"]
    with open(os.path.join(root, "val", "val_annotations.txt"), "w") as f:
        for i, wnid in enumerate(val_wnids):
            write(os.path.join(root, "val", "images", f"val_{i}.JPEG"), sorted(_WNIDS).index(wnid))
            f.write(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63\n")
    return val_wnids


def _labels_from_pixels(images, at=(slice(None), slice(None))):
    spec = data._TFDS_SPECS["tiny_imagenet"]
    raw = (images[(slice(None), *at, 0)] * spec.std[0] + spec.mean[0]) * 255
    return np.round((raw.reshape(len(images), -1).mean(axis=1) - 30) / 90).astype(np.int32)


def test_tiny_imagenet_builder_on_generated_folder(tfds, tmp_path):
    tf = pytest.importorskip("tensorflow")
    from ntksap_jax.data._tiny_imagenet import TinyImagenet

    manual = tmp_path / "manual"
    val_wnids = _write_tiny_imagenet(str(manual / "tiny-imagenet-200"), tf)
    builder = TinyImagenet(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    assert builder.info.splits["train"].num_examples == 12 and builder.info.splits["validation"].num_examples == 6
    val = list(tfds.as_numpy(builder.as_dataset(split="validation")))
    for ex in val:
        assert ex["image"].shape == (64, 64, 3) and ex["wnid"].decode() == val_wnids[int(ex["file_name"][4:5])]
        assert ex["label"] == sorted(_WNIDS).index(ex["wnid"].decode())

    ds = load("tiny_imagenet", data_dir=str(tmp_path / "tfds"))
    assert ds.info == DATASETS["tiny_imagenet"]._replace(num_train=12, num_test=6)
    e = list(ds.eval_batches(4))
    _assert_batches(e, 4, (64, 64, 3), 200)
    test = _stack(e)
    assert test["mask"].sum() == 6 and not test["mask"][6:].any()
    np.testing.assert_array_equal(test["label"][:6], _labels_from_pixels(test["image"][:6]))
    assert sorted(test["label"][:6].tolist()) == [0, 0, 1, 1, 2, 2]
    a = list(ds.train_batches(4, seed=1, epoch=0))
    assert len(a) == 3
    _assert_batches(a, 4, (64, 64, 3), 200)
    train = _stack(a)
    # The centre pixel survives a crop shifted by at most 4 pixels; the greyscale JPEGs decode to RGB.
    np.testing.assert_array_equal(train["label"], _labels_from_pixels(train["image"], (slice(28, 36), slice(28, 36))))
    assert sorted(train["label"].tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    _assert_same(a, list(ds.train_batches(4, seed=1, epoch=0)))
    assert _differs(a, list(ds.train_batches(4, seed=1, epoch=1)))


def test_tiny_imagenet_is_prepared_on_first_use_from_the_manual_dir(tfds, tmp_path):
    tf = pytest.importorskip("tensorflow")
    _write_tiny_imagenet(str(tmp_path / "downloads" / "manual" / "tiny-imagenet-200"), tf)
    ds = load("tiny_imagenet", data_dir=str(tmp_path))
    assert (ds.info.num_train, ds.info.num_test) == (12, 6)
    assert sum(b["mask"].sum() for b in ds.eval_batches(8)) == 6
