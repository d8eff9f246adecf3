"""LeNet-5 (the modern ReLU / max-pool variant) for 28x28 grey images.

``conv1`` 6@5x5 (PyTorch padding 2, 28x28 kept) -> ReLU -> 2x2 max-pool -> ``conv2`` 16@5x5
(no padding: 14x14 -> 10x10) -> ReLU -> 2x2 max-pool -> flatten (16 x 5 x 5 = 400) ->
``dense_0`` 120 -> ReLU -> ``dense_1`` 84 -> ReLU -> ``fc`` ``num_classes``. Every layer has a
bias. 61,470 prunable weights for 10 classes (150 + 2,400 + 48,000 + 10,080 + 840).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from .common import check_num_classes, conv, dense

#: Widths: the two conv layers' channels and the two hidden dense layers'.
LENET5_CHANNELS: tuple[int, int] = (6, 16)
LENET5_FEATURES: tuple[int, int] = (120, 84)


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling: NHWC ``(N, 28, 28, C)`` -> logits ``(N, num_classes)``.

    Kernels are Kaiming-normal (fan_in), biases zero, as the rest of the zoo. The model has no
    BatchNorm; ``bn_momentum`` / ``bn_epsilon`` are accepted and ignored (interface uniformity
    with the BN models, as :class:`ntksap_jax.models.MLP`), and so is ``train``. Other square
    input sizes work if the flattened features are what the first dense layer expects (it is
    sized at init).

    Attributes:
      num_classes: number of logits (>= 1).
      bn_momentum: unused.
      bn_epsilon: unused.

    Example::

        model = LeNet5(num_classes=10)                  # == get_model("lenet5", 10)
        variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
        logits = model.apply(variables, x)              # (N, 28, 28, 1) -> (N, 10)
    """

    num_classes: int
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    def __post_init__(self):
        check_num_classes(self.num_classes)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Map NHWC images to ``(N, num_classes)`` logits."""
        del train  # no dropout / BN
        c1, c2 = LENET5_CHANNELS
        x = nn.relu(conv(c1, 5, padding=2, use_bias=True, name="conv1")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(conv(c2, 5, use_bias=True, name="conv2")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(LENET5_FEATURES):
            x = nn.relu(dense(width, name=f"dense_{i}")(x))
        return dense(self.num_classes, name="fc")(x)
