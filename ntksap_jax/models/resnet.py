"""ResNet-18/34/50/101/152 in the torchvision v1.5 layout.

Port of ``Models/imagenet_resnet.py`` (torchvision-derived) from the
NTK-SAP / SynFlow repositories, with an optional CIFAR / Tiny-ImageNet stem
(3x3 stride-1 ``conv1``, no max pool) as used for 32x32 and 64x64 inputs.
"v1.5" means the stride of a down-sampling Bottleneck sits on its 3x3 conv
(``conv2``), not on the first 1x1 conv.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from .common import batch_norm, check_num_classes, conv, dense, residual_shortcut

#: depth -> (block type, blocks per stage)
RESNET_SPECS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}

#: Allowed values of :attr:`ResNet.stem`.
STEMS: tuple[str, ...] = ("imagenet", "cifar")


class BasicBlock(nn.Module):
    """torchvision BasicBlock (expansion 1).

    ``out = relu(bn2(conv2(relu(bn1(conv1(x))))) + identity)`` with
    ``conv1`` 3x3 stride ``stride`` padding 1 and ``conv2`` 3x3 padding 1 (no
    biases).  ``identity`` is ``downsample_bn(downsample_conv(x))`` (1x1,
    stride ``stride``, no bias) when ``stride != 1`` or ``C_in != planes``,
    else ``x``.

    Input ``(N, H, W, C_in)`` -> ``(N, ceil(H/stride), ceil(W/stride), planes)``.
    BN momentum is Flax's (weight of the OLD average): PyTorch 0.1 == Flax 0.9.

    Example (inside a parent's ``@nn.compact`` method)::

        x = BasicBlock(128, stride=2, name="layer2_0")(x, train)  # (N,56,56,64)->(N,28,28,128)
    """

    planes: int
    stride: int = 1
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    expansion = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Apply the block to an NHWC batch."""
        def bn(name):
            return batch_norm(train, self.bn_momentum, self.bn_epsilon, name=name)

        out_features = self.planes * self.expansion
        out = conv(self.planes, 3, stride=self.stride, padding=1, name="conv1")(x)
        out = nn.relu(bn("bn1")(out))
        out = conv(out_features, 3, stride=1, padding=1, name="conv2")(out)
        out = bn("bn2")(out)
        return nn.relu(out + residual_shortcut(x, out_features, self.stride, bn, "downsample"))


class Bottleneck(nn.Module):
    """torchvision v1.5 Bottleneck (expansion 4), stride on the 3x3 conv.

    ``conv1`` (1x1, ``planes``) ``bn1`` relu ``conv2`` (3x3, stride
    ``stride``, padding 1) ``bn2`` relu ``conv3`` (1x1, ``4 * planes``)
    ``bn3``; plus identity or ``downsample_conv`` (1x1, stride) +
    ``downsample_bn`` when ``stride != 1`` or ``C_in != 4 * planes``; relu.

    Input ``(N, H, W, C_in)`` -> ``(N, ceil(H/stride), ceil(W/stride), 4 * planes)``.
    BN momentum is Flax's (weight of the OLD average): PyTorch 0.1 == Flax 0.9.

    Example (inside a parent's ``@nn.compact`` method)::

        x = Bottleneck(64, name="layer1_0")(x, train)  # (N,56,56,64)->(N,56,56,256)
    """

    planes: int
    stride: int = 1
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    expansion = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Apply the block to an NHWC batch."""
        def bn(name):
            return batch_norm(train, self.bn_momentum, self.bn_epsilon, name=name)

        out_features = self.planes * self.expansion
        out = conv(self.planes, 1, stride=1, padding=0, name="conv1")(x)
        out = nn.relu(bn("bn1")(out))
        out = conv(self.planes, 3, stride=self.stride, padding=1, name="conv2")(out)
        out = nn.relu(bn("bn2")(out))
        out = conv(out_features, 1, stride=1, padding=0, name="conv3")(out)
        out = bn("bn3")(out)
        return nn.relu(out + residual_shortcut(x, out_features, self.stride, bn, "downsample"))


class ResNet(nn.Module):
    """ResNet-``depth`` (torchvision v1.5 layout) with an ImageNet or CIFAR stem.

    Input: NHWC float ``(N, H, W, 3)`` (224x224 for ``stem="imagenet"``;
    32x32 or 64x64 for ``stem="cifar"``).
    Output: logits ``(N, num_classes)``, dtype following inputs / params.

    Stem ``"imagenet"``: ``conv1`` 7x7 stride 2 padding 3 (no bias), ``bn1``,
    relu, 3x3 stride-2 max pool with padding 1 (224 -> 112 -> 56).  Stem
    ``"cifar"``: ``conv1`` 3x3 stride 1 padding 1, ``bn1``, relu, no max pool.
    Then four stages ``layer1``..``layer4`` (widths 64/128/256/512, stride
    1/2/2/2 on the first block) of :class:`BasicBlock` (depth 18, 34) or
    :class:`Bottleneck` (50, 101, 152) modules named ``layer1_0``,
    ``layer1_1``, ..., global average pool and ``fc`` (Dense with bias).
    Prunable weights for 1000 classes: ResNet-18 11,678,912, ResNet-50
    25,502,912 (imagenet stem; the cifar stem's conv1 has 1,728 instead of
    9,408 weights).

    Init (as the NTK-SAP code, which differs from torchvision's fan_out):
    conv / dense ``kernel`` Kaiming normal (fan_in, gain sqrt(2), plain
    normal); biases 0; BN scale 1, bias 0 (no zero-init of the last BN).

    Normalisation trap: ``bn_momentum`` is Flax's BatchNorm momentum, the
    weight of the OLD running average.  PyTorch momentum 0.1 == Flax 0.9
    (default); PyTorch momentum 1.0 (running stats := this batch) == Flax
    0.0.  It controls every BN layer.

    Attributes:
      num_classes: number of logits (>= 1).
      depth: 18, 34, 50, 101 or 152.
      stem: ``"imagenet"`` (default) or ``"cifar"``.
      bn_momentum: Flax BatchNorm momentum for every BN layer (default 0.9).
      bn_epsilon: BatchNorm epsilon (default 1e-5, as PyTorch).

    Example::

        model = ResNet(num_classes=200, depth=18, stem="cifar")  # == get_model("resnet18", 200, stem="cifar")
        variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
        logits = model.apply(variables, x)                       # (N, 64, 64, 3) -> (N, 200)
    """

    num_classes: int
    depth: int = 18
    stem: str = "imagenet"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    def __post_init__(self):
        check_num_classes(self.num_classes)
        if self.depth not in RESNET_SPECS:
            raise ValueError(
                f"ResNet depth must be one of {sorted(RESNET_SPECS)}, got {self.depth!r}"
            )
        if self.stem not in STEMS:
            raise ValueError(f"ResNet stem must be one of {STEMS}, got {self.stem!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Map NHWC images ``(N, H, W, 3)`` to logits ``(N, num_classes)``."""
        kind, stage_sizes = RESNET_SPECS[self.depth]
        block_cls = BasicBlock if kind == "basic" else Bottleneck
        if self.stem == "imagenet":
            x = conv(64, 7, stride=2, padding=3, name="conv1")(x)
        else:
            x = conv(64, 3, stride=1, padding=1, name="conv1")(x)
        x = batch_norm(train, self.bn_momentum, self.bn_epsilon, name="bn1")(x)
        x = nn.relu(x)
        if self.stem == "imagenet":
            # PyTorch MaxPool2d(3, 2, padding=1): symmetric padding with -inf.
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, (planes, num_blocks) in enumerate(zip((64, 128, 256, 512), stage_sizes)):
            for block in range(num_blocks):
                stride = 2 if (stage > 0 and block == 0) else 1
                x = block_cls(
                    planes,
                    stride=stride,
                    bn_momentum=self.bn_momentum,
                    bn_epsilon=self.bn_epsilon,
                    name=f"layer{stage + 1}_{block}",
                )(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return dense(self.num_classes, name="fc")(x)
