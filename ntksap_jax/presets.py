"""Benchmark presets: model, data, optimiser, schedule and NTK-SAP settings per paper benchmark.

Example::

    p = get_preset("resnet20-cifar10")
    model = p.build_model()                                  # get_model("resnet20", 10)
    score = ntksap_scorer(model, p.input_shape, **p.scorer_kwargs())
    masks = prune(score, params, batch_stats=bs, density=0.8 ** 10,
                  iterations=p.ntksap_iterations, key=key).masks
    result = train(model, variables, masks, load(p.dataset), **p.train_kwargs(), out_dir="runs/r20")
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Mapping

from ntksap_jax.data.registry import get_dataset_spec

__all__ = ["Preset", "PRESETS", "get_preset", "list_presets"]


@dataclasses.dataclass(frozen=True)
class Preset:
    """One benchmark's full configuration.

    Attributes:
      name: the preset's key in :data:`PRESETS`.
      model: a :func:`ntksap_jax.get_model` name; ``model_kwargs`` its extra fields.
      dataset: an ``ntksap_jax.data`` name; ``input_shape`` ``(H, W, C)`` and ``num_classes``
        (both read from :mod:`ntksap_jax.data.registry`).
      epochs, batch_size: training length and batch size.
      optimizer: always ``"sgd"`` (PyTorch ``SGD``, see :func:`ntksap_jax.optim.sgd`).
      lr, momentum, nesterov, weight_decay: the SGD settings.
      schedule: ``"step"`` (``MultiStepLR`` per epoch) or ``"cosine"``; ``milestones``, ``gamma``
        the step drops; ``warmup_epochs`` a linear warm-up.
      ntksap_iterations: NTK-SAP pruning rounds ``T``; ``ntksap_samples`` weight repeats ``R``
        (by default the data set's official values in :mod:`ntksap_jax.data.registry`);
        ``ntksap_num_inputs`` Gaussian inputs per repeat (official: 10 × classes).
      top5: also report top-5 accuracy.
      source: where the numbers come from.
    """

    name: str
    model: str
    dataset: str
    input_shape: tuple
    num_classes: int
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    schedule: str
    milestones: tuple
    gamma: float
    warmup_epochs: int
    ntksap_iterations: int
    ntksap_samples: int
    ntksap_num_inputs: int
    top5: bool
    source: str
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    optimizer: str = "sgd"

    def build_model(self):
        """``get_model(model, num_classes, **model_kwargs)``.

        Example::

          model = get_preset("resnet18-tinyimagenet").build_model()   # cifar stem, 200 classes
        """
        from ntksap_jax.models import get_model

        return get_model(self.model, self.num_classes, **dict(self.model_kwargs))

    def train_kwargs(self) -> dict:
        """Keyword arguments for :func:`ntksap_jax.train.train` (everything but data, seed, out_dir).

        Example::

          train(model, variables, masks, ds, **get_preset("mlp-digits").train_kwargs())
        """
        return {
            "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "momentum": self.momentum,
            "nesterov": self.nesterov, "weight_decay": self.weight_decay, "schedule": self.schedule,
            "milestones": tuple(self.milestones), "gamma": self.gamma, "warmup_epochs": self.warmup_epochs,
            "top5": self.top5,
        }

    def scorer_kwargs(self) -> dict:
        """Keyword arguments for :func:`ntksap_jax.ntksap_scorer` (``samples``, ``num_inputs``).

        Example::

          score = ntksap_scorer(model, p.input_shape, **p.scorer_kwargs())
        """
        return {"samples": self.ntksap_samples, "num_inputs": self.ntksap_num_inputs}


def _preset(name: str, dataset: str, **fields) -> Preset:
    """A :class:`Preset` on ``dataset``, its input shape and class count from the data-set registry.

    Unless given, ``ntksap_iterations`` and ``ntksap_samples`` are the data set's official NTK-SAP
    ``T`` and ``R`` (:class:`ntksap_jax.data.registry.DatasetSpec`) and ``ntksap_num_inputs`` is
    ``10 × num_classes``.

    Example::

      _preset("mlp-digits", "digits", model="mlp", ...).input_shape   # (8, 8, 1)
    """
    spec = get_dataset_spec(dataset)
    defaults = {"ntksap_iterations": spec.ntksap_iterations, "ntksap_samples": spec.ntksap_samples,
                "ntksap_num_inputs": 10 * spec.num_classes}
    return Preset(name=name, dataset=dataset, input_shape=spec.input_shape, num_classes=spec.num_classes,
                  **{**defaults, **fields})


# NTK-SAP official code (github.com/YiteWang/NTK-SAP): Utils/load.py maps --optimizer sgd to
# torch.optim.SGD(momentum=0.9) (no Nesterov) with --weight-decay on every parameter
# (Experiments/multishot.py: generator.parameters(model)), the schedule is always
# MultiStepLR(--lr-drops, gamma=--lr-drop-rate=0.1) stepped per epoch, and the pruning
# set is --prune-dataset-ratio 10 x classes inputs. NTK-SAP T / R: scripts/run.sh (CIFAR-10:
# --prune-epochs 20, --ntksap_R 5); T = 100, R = 1 elsewhere, as the command line's defaults: the
# registry's (ntksap_jax.data.registry), which _preset fills in with the shape and class count.
_PRESETS = [
    _preset(
        "resnet20-cifar10", "cifar10", model="resnet20",
        # scripts/run.sh of the official repo: --train-batch-size 128 --lr 0.1 --lr-drops 80 120
        # --weight-decay 1e-4 --post-epochs 160 --optimizer sgd --prune-epochs 20 --ntksap_R 5.
        epochs=160, batch_size=128, lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4,
        schedule="step", milestones=(80, 120), gamma=0.1, warmup_epochs=0, top5=False,
        source="YiteWang/NTK-SAP scripts/run.sh",
    ),
    _preset(
        "vgg16-cifar100", "cifar100", model="vgg16",
        # The SynFlow (Tanaka et al. 2020) / Frankle et al. 2021 VGG-16 CIFAR-100 setting that NTK-SAP
        # follows: 160 epochs, batch 128, lr 0.1 x0.1 at 60 and 120, weight decay 5e-4. (The
        # official repo ships no script for it; not checked against the paper's appendix table.)
        epochs=160, batch_size=128, lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4,
        schedule="step", milestones=(60, 120), gamma=0.1, warmup_epochs=0, top5=False,
        source="SynFlow (Tanaka et al. 2020) / Frankle et al. 2021 CIFAR-100 VGG-16 setting",
    ),
    _preset(
        "resnet18-tinyimagenet", "tiny_imagenet", model="resnet18", model_kwargs=MappingProxyType({"stem": "cifar"}),
        # The SynFlow / Frankle et al. 2021 ResNet-18 Tiny-ImageNet setting: 200 epochs, batch 256,
        # lr 0.2 x0.1 at 100 and 150, weight decay 1e-4. The official code's tinyimagenet_resnet
        # uses a 3x3 stride-1 stem without max-pool (our stem="cifar"). Not checked against the
        # paper's appendix table.
        epochs=200, batch_size=256, lr=0.2, momentum=0.9, nesterov=False, weight_decay=1e-4,
        schedule="step", milestones=(100, 150), gamma=0.1, warmup_epochs=0, top5=False,
        source="SynFlow (Tanaka et al. 2020) / Frankle et al. 2021 Tiny-ImageNet ResNet-18 setting",
    ),
    _preset(
        "resnet50-imagenet", "imagenet2012", model="resnet50", model_kwargs=MappingProxyType({"stem": "imagenet"}),
        # facebookresearch/open_lth models/imagenet_resnet.py default_hparams (the Frankle et al.
        # 2021 ImageNet setting): 90 epochs, batch 1024, lr 0.4 with 5 warm-up epochs, x0.1 at
        # 30, 60, 80, weight decay 1e-4 ("batch size 512 -> lr 0.2, 256 -> 0.1": scale lr linearly
        # with the batch). The NTK-SAP paper's own ImageNet batch / lr could not be retrieved here,
        # and its code has no warm-up (MultiStepLR only).
        epochs=90, batch_size=1024, lr=0.4, momentum=0.9, nesterov=False, weight_decay=1e-4,
        schedule="step", milestones=(30, 60, 80), gamma=0.1, warmup_epochs=5, top5=True,
        source="facebookresearch/open_lth imagenet_resnet_50 default_hparams (Frankle et al. 2021)",
    ),
    _preset(
        "mlp-digits", "digits", model="mlp",
        # Ours, for the offline 8x8 digits (1,437 train / 360 test): a 512-512 ReLU MLP, 30 epochs
        # of 22 steps, cosine from 0.1; ~6 s on 2 CPU cores. Measured (seeds 0-2, data seed = init
        # seed): dense 97.8-98.1% test top-1; NTK-SAP (T=20, R=1) at 10% density 96.9-97.5%.
        # T = 20 rather than the command line's 100 for digits: 100 rounds take ~20 s on 2 CPU cores.
        epochs=30, batch_size=64, lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4,
        schedule="cosine", milestones=(), gamma=0.1, warmup_epochs=0, ntksap_iterations=20, top5=False,
        source="ntksap_jax (tuned on sklearn digits)",
    ),
    _preset(
        "lenet300-mnist5k", "mnist5k", model="lenet300",
        # Ours, for the offline 5,000-image MNIST subset (4,000 train / 1,000 test): LeNet-300-100,
        # 30 epochs of 62 steps, cosine from 0.1; ~10 s on 2 CPU cores. Measured (seeds 0-2): dense
        # 94.9-95.5% test top-1 (lr 0.05: 94.1-95.5%, and NTK-SAP T=20 at 10% density 92.7-93.6%).
        epochs=30, batch_size=64, lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4,
        schedule="cosine", milestones=(), gamma=0.1, warmup_epochs=0, ntksap_iterations=20, top5=False,
        source="ntksap_jax (own setting for the MNIST 5k subset)",
    ),
    _preset(
        "lenet5-mnist5k", "mnist5k", model="lenet5",
        # Ours: LeNet-5 (ReLU, max-pool) on the MNIST 5k subset, the conv study's model
        # (benchmarks/accuracy_conv.py); 12 epochs of 63 steps, 1 warm-up epoch to lr 0.05, then cosine.
        # ~1 s an epoch on 2 CPU cores. Measured (seeds 0-1): dense 97.3-97.7% test top-1, NTK-SAP at
        # 0.8^10 94.3-96.1%; lr 0.01 without warm-up: dense 96.4-96.5%, NTK-SAP at 0.8^10 78.0-92.7%
        # (sparse nets train slowly); lr 0.05 without warm-up: the dense net dies at chance.
        epochs=12, batch_size=64, lr=0.05, momentum=0.9, nesterov=False, weight_decay=5e-4,
        schedule="cosine", milestones=(), gamma=0.1, warmup_epochs=1, ntksap_iterations=20, top5=False,
        source="ntksap_jax (own setting for the MNIST 5k subset)",
    ),
    _preset(
        "resnet20-narrow-mnist5k", "mnist5k", model="resnet20", model_kwargs=MappingProxyType({"width": 8}),
        # Ours: the lottery ResNet-20 at width 8 (8-16-32 channels, 1-channel input) on the MNIST
        # 5k subset; 15 epochs of 63 steps, cosine from 0.1.
        epochs=15, batch_size=64, lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4,
        schedule="cosine", milestones=(), gamma=0.1, warmup_epochs=0, ntksap_iterations=20, top5=False,
        source="ntksap_jax (own setting for the MNIST 5k subset)",
    ),
]

#: Preset name -> :class:`Preset`.
PRESETS: Mapping[str, Preset] = MappingProxyType({p.name: p for p in _PRESETS})


def list_presets() -> tuple[str, ...]:
    """Preset names, in :data:`PRESETS` order.

    Example::

      list_presets()   # ('resnet20-cifar10', 'vgg16-cifar100', ...)
    """
    return tuple(PRESETS)


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises:
      ValueError: unknown ``name`` (the message lists the allowed names).

    Example::

      p = get_preset("vgg16-cifar100")
      p.milestones, p.weight_decay   # (60, 120), 0.0005
    """
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed names: {', '.join(PRESETS)}")
    return PRESETS[name]
