"""Layer factories shared by the model zoo: PyTorch-matching init and padding.

Every model in :mod:`ntksap_jax.models` builds its convolutions, dense layers
and batch norms through these helpers so that three conventions hold
everywhere:

* **Initialisation** follows the official NTK-SAP / SynFlow PyTorch code
  (``nn.init.kaiming_normal_(weight)`` on every conv and linear weight):
  ``variance_scaling(2.0, "fan_in", "normal")``, i.e. a *plain* (not
  truncated) normal with std ``sqrt(2 / fan_in)`` where ``fan_in = kh * kw *
  in_channels`` for an HWIO conv kernel and ``in_features`` for a dense
  kernel.  Biases are zero, BatchNorm scale is 1 and bias 0.  (Flax's own
  defaults are ``lecun_normal`` kernels, which is why the initializer is
  always passed explicitly.)
* **Padding** is explicit and symmetric, as in PyTorch: a 3x3 conv with
  PyTorch ``padding=1`` uses ``((1, 1), (1, 1))``, 7x7/``padding=3`` uses
  ``((3, 3), (3, 3))``, 1x1 uses ``"VALID"``.  Flax's ``"SAME"`` is *not*
  equivalent for stride 2 on even inputs: it pads asymmetrically (more on
  the bottom/right), e.g. a 3x3 stride-2 conv on 32x32 gets ``(0, 1)``
  padding instead of PyTorch's ``(1, 1)``, which shifts every output pixel.
* **Prunable weights**: only conv and dense weights are called ``kernel`` and
  only they have ``ndim > 1`` (biases, BN scale/bias and BN running stats are
  1-D), so the library's default prunable filter "leaf named 'kernel' with
  ndim > 1" selects exactly the conv + dense weights.

Normalisation trap (BatchNorm momentum)
---------------------------------------
Flax's ``nn.BatchNorm(momentum=m)`` updates running statistics as
``ra = m * ra + (1 - m) * batch``: ``m`` is the weight of the *old* running
average.  PyTorch's ``momentum`` is the weight of the *new* batch statistic.
So PyTorch's default ``momentum=0.1`` is Flax ``momentum=0.9`` (our default),
and PyTorch ``momentum=1.0`` ("running stats := this batch", used by pruning
scorers that reset BN statistics on one batch) is Flax ``momentum=0.0``.
Also note that Flax stores the *biased* batch variance in ``var`` whereas
PyTorch's ``running_var`` uses the unbiased (n / (n - 1)) estimate.
"""

from __future__ import annotations

from typing import Union

import flax.linen as nn

from ntksap_jax._checks import positive_int
from ntksap_jax.conv import conv_general_dilated

#: Kaiming-normal (fan_in, gain sqrt(2)), plain normal: PyTorch's
#: ``nn.init.kaiming_normal_(w)`` with its defaults.
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

Padding = Union[str, tuple[tuple[int, int], ...]]


def torch_padding(pad: int) -> Padding:
    """PyTorch-style symmetric spatial padding for a 2-D conv / pool.

    Args:
      pad: the PyTorch ``padding=`` integer.

    Returns:
      ``"VALID"`` for 0, else ``((pad, pad), (pad, pad))``.

    Example:
      >>> torch_padding(1)
      ((1, 1), (1, 1))
    """
    if pad == 0:
        return "VALID"
    return ((pad, pad), (pad, pad))


def conv(
    features: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    use_bias: bool = False,
    name: str | None = None,
) -> nn.Conv:
    """A square 2-D conv with PyTorch padding and Kaiming-normal (fan_in) init.

    Input (N, H, W, C_in) -> output (N, H', W', features) with
    ``H' = (H + 2 * padding - kernel_size) // stride + 1`` exactly as PyTorch.
    The kernel has shape (kernel_size, kernel_size, C_in, features) (HWIO);
    the bias (if any) is zero-initialised.  The convolution is
    :func:`ntksap_jax.conv.conv_general_dilated`: ``lax.conv_general_dilated``'s
    values, with a weight gradient that is 2-10x faster on XLA:CPU.  Must be called inside a
    ``@nn.compact`` method (the layer is bound to the calling module).

    Example:
      Inside an ``@nn.compact`` ``__call__``::

          y = conv(16, 3, stride=2, padding=1, name="conv1")(x)  # (N,32,32,C)->(N,16,16,16)
    """
    return nn.Conv(
        features=features,
        kernel_size=(kernel_size, kernel_size),
        strides=(stride, stride),
        padding=torch_padding(padding),
        use_bias=use_bias,
        kernel_init=kaiming_normal,
        bias_init=nn.initializers.zeros,
        name=name,
        conv_general_dilated=conv_general_dilated,
    )


def dense(features: int, name: str | None = None) -> nn.Dense:
    """A dense layer with bias, Kaiming-normal (fan_in) kernel and zero bias.

    Input (..., F_in) -> output (..., features); kernel shape (F_in, features).

    Example:
      Inside an ``@nn.compact`` ``__call__``::

          logits = dense(10, name="fc")(x)  # (N, F) -> (N, 10)
    """
    return nn.Dense(
        features=features,
        use_bias=True,
        kernel_init=kaiming_normal,
        bias_init=nn.initializers.zeros,
        name=name,
    )


def batch_norm(
    train: bool, momentum: float, epsilon: float, name: str | None = None
) -> nn.BatchNorm:
    """BatchNorm over the channel (last) axis, scale 1 / bias 0 at init.

    ``train=True`` normalises with the batch statistics and (if
    ``batch_stats`` is mutable) updates the running statistics as
    ``ra = momentum * ra + (1 - momentum) * batch``; ``train=False`` uses the
    running statistics.  Flax ``momentum`` is the weight of the OLD average:
    PyTorch momentum 0.1 == Flax 0.9; PyTorch 1.0 == Flax 0.0.

    Example:
      Inside an ``@nn.compact`` ``__call__``::

          x = batch_norm(train, self.bn_momentum, self.bn_epsilon, name="bn")(x)
    """
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=momentum,
        epsilon=epsilon,
        scale_init=nn.initializers.ones,
        bias_init=nn.initializers.zeros,
        name=name,
        use_fast_variance=False,
    )


def residual_shortcut(x, out_features: int, stride: int, bn, prefix: str):
    """The block's shortcut: ``x``, or a 1x1 conv (stride ``stride``, no bias) + BN when the shape changes.

    Call inside a parent's ``@nn.compact`` method; the submodules are named ``{prefix}_conv`` and
    ``{prefix}_bn`` (``shortcut`` in the lottery ResNet, ``downsample`` in torchvision's).
    ``bn(name)`` builds the parent's BatchNorm.

    Example::

        shortcut = residual_shortcut(x, 32, 2, bn, "shortcut")  # (N,32,32,16) -> (N,16,16,32)
    """
    if stride == 1 and x.shape[-1] == out_features:
        return x
    return bn(f"{prefix}_bn")(conv(out_features, 1, stride=stride, padding=0, name=f"{prefix}_conv")(x))


def check_num_classes(num_classes: int) -> None:
    """Raise ``ValueError`` (naming the value) unless ``num_classes`` is an int >= 1 (``bool`` refused).

    The message is :func:`ntksap_jax._checks.positive_int`'s, as the scorers' for their ``num_classes``.

    Example:
      >>> check_num_classes(10)
    """
    positive_int(num_classes, "num_classes")
