"""Flax (linen) model zoo for pruning at initialization, with a name registry.

Every model is a ``flax.linen.Module`` with ``__call__(x, train=False)``
mapping an NHWC float batch (the MLP flattens any trailing shape) to logits
``(N, num_classes)``; it has a ``num_classes`` field, and the BatchNorm models
``bn_momentum`` (default 0.9) and ``bn_epsilon`` (default 1e-5) fields used by
every BN layer.  Conv and dense weights, and only they, are leaves named
``kernel`` with ``ndim > 1`` (the prunable weights); they are initialised
Kaiming-normal (fan_in, gain sqrt(2), plain normal) as in the official
NTK-SAP / SynFlow code, biases 0, BN scale 1 / bias 0.  Conv padding matches
PyTorch (explicit symmetric padding, never Flax ``"SAME"``).

Normalisation trap: Flax BatchNorm ``momentum`` is the weight of the OLD
running average (``ra = m * ra + (1 - m) * batch``), the opposite of
PyTorch.  PyTorch's default momentum 0.1 is Flax 0.9; PyTorch momentum 1.0
(running stats := this batch's statistics) is Flax 0.0::

    model = get_model("resnet20", 10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    logits = model.apply(variables, x)                     # (N, 32, 32, 3) -> (N, 10)
    _, state = model.clone(bn_momentum=0.0).apply(
        variables, x, train=True, mutable=["batch_stats"])  # running stats := batch stats
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn

from .common import check_num_classes, kaiming_normal
from ._order import module_order
from .lenet5 import LENET5_CHANNELS, LENET5_FEATURES, LeNet5
from .mlp import LENET300_FEATURES, MLP
from .resnet import RESNET_SPECS, STEMS, BasicBlock, Bottleneck, ResNet
from .resnet_cifar import LotteryBlock, LotteryResNet
from .vgg import VGG, VGG_CFGS

__all__ = [
    "BasicBlock",
    "LeNet5",
    "Bottleneck",
    "LotteryBlock",
    "LotteryResNet",
    "MLP",
    "ResNet",
    "VGG",
    "LENET300_FEATURES",
    "LENET5_CHANNELS",
    "LENET5_FEATURES",
    "RESNET_SPECS",
    "STEMS",
    "VGG_CFGS",
    "get_model",
    "kaiming_normal",
    "list_models",
    "module_order",
]


class _Entry(NamedTuple):
    cls: Callable[..., nn.Module]
    fixed: dict[str, Any]  # fields determined by the registry name


_REGISTRY: dict[str, _Entry] = {
    "mlp": _Entry(MLP, {}),
    "lenet300": _Entry(MLP, {"features": LENET300_FEATURES}),
    "resnet20": _Entry(LotteryResNet, {"depth": 20}),
    "resnet32": _Entry(LotteryResNet, {"depth": 32}),
    "resnet56": _Entry(LotteryResNet, {"depth": 56}),
    "vgg11": _Entry(VGG, {"depth": 11}),
    "vgg16": _Entry(VGG, {"depth": 16}),
    "vgg19": _Entry(VGG, {"depth": 19}),
    "resnet18": _Entry(ResNet, {"depth": 18}),
    "resnet34": _Entry(ResNet, {"depth": 34}),
    "resnet50": _Entry(ResNet, {"depth": 50}),
    "lenet5": _Entry(LeNet5, {}),
}

# dataclass fields of every linen Module that are not model hyper-parameters
_RESERVED_FIELDS = frozenset({"parent", "name", "num_classes"})


def list_models() -> tuple[str, ...]:
    """Names accepted by :func:`get_model`, in registry order.

    Returns:
      ``("mlp", "lenet300", "resnet20", "resnet32", "resnet56", "vgg11",
      "vgg16", "vgg19", "resnet18", "resnet34", "resnet50", "lenet5")``.

    Example::

        for name in list_models():
            model = get_model(name, 10)
    """
    return tuple(_REGISTRY)


def _allowed_kwargs(entry: _Entry) -> tuple[str, ...]:
    names = [f.name for f in dataclasses.fields(entry.cls) if f.init]
    return tuple(n for n in names if n not in _RESERVED_FIELDS and n not in entry.fixed)


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a registered model (an unbound ``flax.linen.Module``).

    Args:
      name: one of :func:`list_models` (case-sensitive).
      num_classes: number of output logits, an int >= 1.
      **kwargs: extra fields forwarded to the model class, e.g. ``stem`` for
        ``resnet18/34/50`` (``"imagenet"`` or ``"cifar"``), ``width`` for the
        CIFAR ResNets, ``features`` for ``"mlp"``, and ``bn_momentum`` /
        ``bn_epsilon`` (Flax convention: weight of the OLD running average,
        PyTorch momentum 0.1 == Flax 0.9, PyTorch 1.0 == Flax 0.0).

    Returns:
      The model; ``model.apply(variables, x, train=False)`` maps ``(N, H, W,
      C)`` (any ``(N, ...)`` for the MLPs) to logits ``(N, num_classes)``.

    Raises:
      ValueError: unknown ``name`` (the message lists the allowed names),
        ``num_classes < 1``, or an invalid field value (e.g. a bad ``stem``).
      TypeError: a keyword the model does not accept, or one fixed by
        ``name`` (e.g. ``depth`` for ``"resnet20"``).

    Example::

        model = get_model("resnet20", 10)
        variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
        logits = model.apply(variables, x)          # (N, 32, 32, 3) -> (N, 10)
        tiny = get_model("resnet18", 200, stem="cifar")  # Tiny-ImageNet, 64x64 inputs
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(
            f"unknown model name {name!r}; allowed names: {', '.join(list_models())}"
        )
    check_num_classes(num_classes)
    entry = _REGISTRY[name]
    allowed = _allowed_kwargs(entry)
    for key in kwargs:
        if key in entry.fixed:
            raise TypeError(
                f"get_model({name!r}): {key!r} is fixed to {entry.fixed[key]!r} by the "
                f"model name; accepted keyword arguments: {', '.join(allowed) or '(none)'}"
            )
        if key not in allowed:
            raise TypeError(
                f"get_model({name!r}): unexpected keyword argument {key!r}; "
                f"accepted keyword arguments: {', '.join(allowed) or '(none)'}"
            )
    return entry.cls(num_classes=num_classes, **entry.fixed, **kwargs)
