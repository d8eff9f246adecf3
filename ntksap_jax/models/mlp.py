"""Fully connected networks: a generic ReLU MLP and LeNet-300-100.

LeNet-300-100 (``features=(300, 100)``) is the MNIST baseline of the pruning
literature (SynFlow / NTK-SAP ``Models/mlp.py``).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from .common import check_num_classes, dense

#: Hidden widths of LeNet-300-100.
LENET300_FEATURES: tuple[int, ...] = (300, 100)


class MLP(nn.Module):
    """ReLU multilayer perceptron: flatten -> [Dense + ReLU] * len(features) -> Dense.

    Input: ``(N, ...)`` float array of any trailing shape (e.g. NHWC images
    ``(N, 28, 28, 1)``); it is flattened to ``(N, prod(...))``.
    Output: logits ``(N, num_classes)`` in the promoted dtype of the input and
    parameters.

    Parameters are named ``dense_0``, ``dense_1``, ... for the hidden layers and
    ``fc`` for the classifier; each has a ``kernel`` (Kaiming-normal, fan_in,
    gain sqrt(2), plain normal, as ``nn.init.kaiming_normal_`` in the official
    NTK-SAP / SynFlow code) and a zero-initialised ``bias``.

    The model has no BatchNorm.  ``bn_momentum`` / ``bn_epsilon`` are accepted
    and ignored so that code written for the BN models (e.g. a scorer doing
    ``model.clone(bn_momentum=0.0)`` and applying with
    ``mutable=['batch_stats']``) works unchanged.  (For the BN models recall
    the trap: Flax momentum is the weight of the OLD running average, so
    PyTorch momentum 0.1 == Flax 0.9 and PyTorch 1.0 == Flax 0.0.)
    ``train`` is accepted for interface uniformity and has no effect.

    Attributes:
      num_classes: number of output logits (>= 1).
      features: hidden layer widths; ``(300, 100)`` is LeNet-300-100.
      bn_momentum: unused (interface uniformity).
      bn_epsilon: unused (interface uniformity).

    Example::

        model = MLP(num_classes=10, features=(300, 100))   # == get_model("lenet300", 10)
        variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
        logits = model.apply(variables, x)                 # x: (N, 28, 28, 1) -> (N, 10)
    """

    num_classes: int
    features: Sequence[int] = (512, 512)
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    def __post_init__(self):
        check_num_classes(self.num_classes)
        for f in self.features:
            if int(f) < 1:
                raise ValueError(f"MLP features must be positive widths, got {tuple(self.features)!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Map ``(N, ...)`` inputs to ``(N, num_classes)`` logits."""
        del train  # no dropout / BN
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.features):
            x = nn.relu(dense(int(width), name=f"dense_{i}")(x))
        return dense(self.num_classes, name="fc")(x)
