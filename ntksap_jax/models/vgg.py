"""CIFAR VGG-11/13/16/19 with BatchNorm in the "lottery" layout.

Port of ``Models/lottery_vgg.py`` (``vgg*_bn``) from the SynFlow / NTK-SAP
repositories (itself from facebookresearch/open_lth).  Unlike torchvision's
VGG there is no final max-pool and no 3-layer classifier: after the last conv
block comes a 2x2 average pool and a single linear layer.
"""

from __future__ import annotations

from typing import Union

import flax.linen as nn
import jax.numpy as jnp

from .common import batch_norm, check_num_classes, conv, dense

#: Layer plans: an int is a 3x3 conv (padding 1, with bias) + BN + ReLU with
#: that many channels, ``"M"`` a 2x2 stride-2 max pool.  No trailing ``"M"``.
VGG_CFGS: dict[int, tuple[Union[int, str], ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    19: (
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
        512, 512, 512, 512, "M", 512, 512, 512, 512,
    ),
}


class VGG(nn.Module):
    """VGG-``depth`` with BatchNorm for 32x32 inputs ("lottery" VGG, ``vgg*_bn``).

    Input: NHWC float ``(N, H, W, C)``; H and W must be >= 32 (four 2x2
    max pools then a 2x2 average pool).  32x32 gives a 512-feature vector
    before ``fc``, as in the PyTorch original; larger inputs give
    ``512 * (H // 32) * (W // 32)`` features, flattened in NHWC order (which
    differs from PyTorch's NCHW flatten order when the map is larger than 1x1).
    Output: logits ``(N, num_classes)``, dtype following inputs / params.

    Layers: the i-th conv of :data:`VGG_CFGS` ``[depth]`` is ``conv_i`` (3x3,
    padding 1, with bias) followed by ``bn_i`` and ReLU; ``"M"`` is a 2x2
    stride-2 max pool; then ``nn.avg_pool(x, (2, 2), strides=(2, 2))``,
    flatten and ``fc`` (Dense with bias).  VGG-16 has ``conv_0..conv_12``
    and, for 100 classes on 32x32 inputs, 14,761,664 prunable weights.

    Init (as the official code): conv / dense ``kernel`` Kaiming normal
    (fan_in, gain sqrt(2), plain normal); all biases 0 (the brief's choice;
    the official code leaves PyTorch's default uniform bias init); BN scale 1,
    bias 0.

    Normalisation trap: ``bn_momentum`` is Flax's BatchNorm momentum, the
    weight of the OLD running average.  PyTorch momentum 0.1 == Flax 0.9
    (default); PyTorch momentum 1.0 (running stats := this batch) == Flax
    0.0.  It controls every BN layer.

    Attributes:
      num_classes: number of logits (>= 1).
      depth: 11, 13, 16 or 19.
      bn_momentum: Flax BatchNorm momentum for every BN layer (default 0.9).
      bn_epsilon: BatchNorm epsilon (default 1e-5, as PyTorch).

    Example::

        model = VGG(num_classes=100, depth=16)         # == get_model("vgg16", 100)
        variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
        logits = model.apply(variables, x)             # (N, 32, 32, 3) -> (N, 100)
    """

    num_classes: int
    depth: int = 16
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    def __post_init__(self):
        check_num_classes(self.num_classes)
        if self.depth not in VGG_CFGS:
            raise ValueError(
                f"VGG depth must be one of {sorted(VGG_CFGS)}, got {self.depth!r}"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Map NHWC images ``(N, H, W, C)`` to logits ``(N, num_classes)``."""
        index = 0
        for spec in VGG_CFGS[self.depth]:
            if spec == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            else:
                x = conv(spec, 3, stride=1, padding=1, use_bias=True, name=f"conv_{index}")(x)
                x = batch_norm(train, self.bn_momentum, self.bn_epsilon, name=f"bn_{index}")(x)
                x = nn.relu(x)
                index += 1
        if x.shape[1] < 2 or x.shape[2] < 2:
            raise ValueError(
                f"VGG needs inputs of at least 32x32 (feature map before the 2x2 "
                f"average pool is {x.shape[1]}x{x.shape[2]})"
            )
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        return dense(self.num_classes, name="fc")(x)
