"""CIFAR ResNets (ResNet-20/32/56...) in the "lottery" layout.

Port of ``Models/lottery_resnet.py`` from the SynFlow / NTK-SAP repositories
(itself from facebookresearch/open_lth): a 3x3 stem, three stages of ``n``
basic blocks (``depth = 6 n + 2``) with widths ``(w, 2w, 4w)``, global
average pooling and a linear classifier.  Where a block changes the shape
(first block of stages 2 and 3) the shortcut is a 1x1 stride-2 conv + BN.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from .common import batch_norm, check_num_classes, conv, dense, residual_shortcut


class LotteryBlock(nn.Module):
    """Basic residual block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    Input ``(N, H, W, C_in)`` -> output ``(N, ceil(H/stride), ceil(W/stride),
    features)``.  ``conv1`` is 3x3 with stride ``stride`` and PyTorch padding 1,
    ``conv2`` 3x3 stride 1 padding 1, both without bias.  If ``stride != 1`` or
    ``C_in != features`` the shortcut is ``shortcut_conv`` (1x1, stride
    ``stride``, no bias) + ``shortcut_bn``; otherwise it is the identity.

    BatchNorm: ``momentum`` is Flax's (weight of the OLD running average):
    PyTorch momentum 0.1 == Flax 0.9, PyTorch 1.0 == Flax 0.0.

    Example (inside a parent's ``@nn.compact`` method)::

        x = LotteryBlock(32, stride=2, name="blocks_3")(x, train)  # (N,32,32,16)->(N,16,16,32)
    """

    features: int
    stride: int = 1
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Apply the block to an NHWC batch."""
        def bn(name):
            return batch_norm(train, self.bn_momentum, self.bn_epsilon, name=name)

        out = conv(self.features, 3, stride=self.stride, padding=1, name="conv1")(x)
        out = nn.relu(bn("bn1")(out))
        out = conv(self.features, 3, stride=1, padding=1, name="conv2")(out)
        out = bn("bn2")(out)
        return nn.relu(out + residual_shortcut(x, self.features, self.stride, bn, "shortcut"))


class LotteryResNet(nn.Module):
    """CIFAR ResNet-``depth`` ("lottery" ResNet of SynFlow / NTK-SAP).

    Input: NHWC float ``(N, H, W, 3)`` (32x32 for CIFAR; any size >= 4 works
    because the head uses global average pooling).
    Output: logits ``(N, num_classes)``, dtype following inputs / params.

    Architecture (names are the Flax module names, chosen to match the
    PyTorch state-dict names): ``conv`` (3x3, ``width`` channels, stride 1,
    no bias) -> ``bn`` -> relu -> ``blocks_0`` ... ``blocks_{3n-1}``
    (:class:`LotteryBlock`, ``n = (depth - 2) // 6`` per stage, widths
    ``width, 2*width, 4*width``, stride 2 on the first block of stages 2 and
    3) -> global average pool over H, W -> ``fc`` (Dense with bias).
    ResNet-20: ``n = 3``, blocks ``blocks_0..blocks_8``, 270,896 prunable
    weights for 10 classes.

    Init (as the official code): every conv / dense ``kernel`` is Kaiming
    normal (fan_in, gain sqrt(2), plain normal); biases 0; BN scale 1, bias 0.

    Normalisation trap: ``bn_momentum`` is Flax's BatchNorm momentum, the
    weight of the OLD running average (``ra = m * ra + (1 - m) * batch``).
    PyTorch's default momentum 0.1 is Flax 0.9 (the default here); PyTorch
    momentum 1.0 (running stats := this batch's statistics) is Flax 0.0, e.g.
    ``model.clone(bn_momentum=0.0).apply(v, x, train=True,
    mutable=['batch_stats'])``.  It controls every BN layer of the model.

    Attributes:
      num_classes: number of logits (>= 1).
      depth: ``6 n + 2`` (20, 32, 44, 56, 110, ...).
      width: channels of the first stage (16 in the paper; 32 for "wide").
      bn_momentum: Flax BatchNorm momentum for every BN layer (default 0.9).
      bn_epsilon: BatchNorm epsilon (default 1e-5, as PyTorch).

    Example::

        model = LotteryResNet(num_classes=10, depth=20)   # == get_model("resnet20", 10)
        variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
        logits = model.apply(variables, x)                # (N, 32, 32, 3) -> (N, 10)
        logits, new_state = model.apply(variables, x, train=True, mutable=["batch_stats"])
    """

    num_classes: int
    depth: int = 20
    width: int = 16
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    def __post_init__(self):
        check_num_classes(self.num_classes)
        if not isinstance(self.depth, int) or self.depth < 8 or (self.depth - 2) % 6 != 0:
            raise ValueError(
                f"LotteryResNet depth must be 6n+2 with n >= 1 (e.g. 20, 32, 56), got {self.depth!r}"
            )
        if not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"LotteryResNet width must be a positive int, got {self.width!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Map NHWC images ``(N, H, W, 3)`` to logits ``(N, num_classes)``."""
        n = (self.depth - 2) // 6
        x = conv(self.width, 3, stride=1, padding=1, name="conv")(x)
        x = batch_norm(train, self.bn_momentum, self.bn_epsilon, name="bn")(x)
        x = nn.relu(x)
        index = 0
        for stage, features in enumerate((self.width, 2 * self.width, 4 * self.width)):
            for block in range(n):
                stride = 2 if (stage > 0 and block == 0) else 1
                x = LotteryBlock(
                    features,
                    stride=stride,
                    bn_momentum=self.bn_momentum,
                    bn_epsilon=self.bn_epsilon,
                    name=f"blocks_{index}",
                )(x, train)
                index += 1
        x = jnp.mean(x, axis=(1, 2))
        return dense(self.num_classes, name="fc")(x)
