"""A tfds builder for Tiny ImageNet (200 classes, 64×64×3) read from a manual directory. Private.

Imported lazily by :mod:`ntksap_jax.data._tfds` (it imports tensorflow-datasets at module level, and
defining the class registers the dataset name ``"tiny_imagenet"`` with tfds).

The manual directory (by default ``<data_dir>/downloads/manual/``) holds the unzipped
``tiny-imagenet-200.zip`` from http://cs231n.stanford.edu/tiny-imagenet-200.zip, i.e. either
``<manual_dir>/tiny-imagenet-200/`` or the folder's contents directly::

    tiny-imagenet-200/
        wnids.txt                          # one WordNet id per line: the classes
        train/<wnid>/images/*.JPEG         # 500 per class: 100,000
        val/images/*.JPEG                  # 10,000
        val/val_annotations.txt            # "<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>" per line

Labels are the index of the image's wnid in ``sorted(wnids.txt)`` (the order of torchvision's
``ImageFolder`` on ``train/``); the class list comes from ``wnids.txt``, so a folder with fewer
classes (as in the tests) works too. Splits: ``train`` (100,000) and ``validation`` (10,000; used
as the test set: the official test images have no labels and are not read). The JPEG files are
stored as they are (no re-encoding); the few greyscale ones decode to three channels.

Example::

    builder = TinyImagenet(data_dir="/data/tfds")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir="/data/tfds/downloads/manual"))
    ds = builder.as_dataset(split="validation")
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from ntksap_jax.data.registry import REGISTRY

NUM_CLASSES = REGISTRY["tiny_imagenet"].num_classes  # 200
FOLDER = "tiny-imagenet-200"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"

__all__ = ["TinyImagenet", "NUM_CLASSES", "FOLDER", "URL", "find_root", "read_wnids"]


def find_root(manual_dir: str) -> str | None:
    """The ``tiny-imagenet-200`` folder inside ``manual_dir`` (or ``manual_dir`` itself), else ``None``.

    Example::

      find_root("/data/tfds/downloads/manual")  # "/data/tfds/downloads/manual/tiny-imagenet-200"
    """
    for root in (os.path.join(manual_dir, FOLDER), manual_dir):
        if os.path.isfile(os.path.join(root, "wnids.txt")):
            return root
    return None


def read_wnids(root: str) -> list[str]:
    """The sorted class ids of ``<root>/wnids.txt``; ``ValueError`` on duplicates or more than 200.

    Example::

      read_wnids(root)[:2]  # ["n01443537", "n01629819"]
    """
    with open(os.path.join(root, "wnids.txt")) as f:
        wnids = [line.strip() for line in f if line.strip()]
    if not wnids or len(set(wnids)) != len(wnids) or len(wnids) > NUM_CLASSES:
        raise ValueError(
            f"{os.path.join(root, 'wnids.txt')} must list 1 to {NUM_CLASSES} distinct class ids; "
            f"it lists {len(wnids)} ({len(set(wnids))} distinct)"
        )
    return sorted(wnids)


class TinyImagenet(tfds.core.GeneratorBasedBuilder):
    """Tiny ImageNet 200: 64×64×3 images, 200 classes, train (100,000) and validation (10,000)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: train and validation splits, labels = sorted wnids.txt index."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
    Download {URL} and unzip it into the manual directory (by default
    <data_dir>/downloads/manual/), so that <manual_dir>/{FOLDER}/wnids.txt exists.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Tiny ImageNet 200 (Stanford CS231n): 64x64 RGB images of 200 ImageNet classes.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=REGISTRY["tiny_imagenet"].input_shape, encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                    "wnid": tfds.features.Text(),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="http://cs231n.stanford.edu/",
        )

    def _split_generators(self, dl_manager):
        manual_dir = os.fspath(dl_manager.manual_dir)  # asserts that it exists, with the instructions
        root = find_root(manual_dir)
        if root is None:
            raise FileNotFoundError(
                f"no {FOLDER}/wnids.txt in the manual directory {manual_dir}: download {URL} and unzip it there"
            )
        wnids = read_wnids(root)
        return {
            "train": self._generate_examples(root=root, wnids=wnids, split="train"),
            "validation": self._generate_examples(root=root, wnids=wnids, split="validation"),
        }

    def _generate_examples(self, root: str, wnids: list[str], split: str):
        label_of = {w: i for i, w in enumerate(wnids)}
        if split == "train":
            for wnid in wnids:
                folder = os.path.join(root, "train", wnid, "images")
                if not os.path.isdir(folder):
                    raise FileNotFoundError(f"missing training folder {folder} (class {wnid} of wnids.txt)")
                for name in sorted(os.listdir(folder)):
                    if name.upper().endswith((".JPEG", ".JPG")):
                        yield f"train/{name}", {
                            "image": os.path.join(folder, name),
                            "label": label_of[wnid],
                            "wnid": wnid,
                            "file_name": name,
                        }
            return
        annotations = os.path.join(root, "val", "val_annotations.txt")
        with open(annotations) as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                name, wnid = line.split("\t")[:2]
                if wnid not in label_of:
                    raise ValueError(f"{annotations}:{line_number}: class {wnid!r} is not in wnids.txt")
                yield f"val/{name}", {
                    "image": os.path.join(root, "val", "images", name),
                    "label": label_of[wnid],
                    "wnid": wnid,
                    "file_name": name,
                }
