"""Models written the way users write them, not by the library's authors: the own-model tests'
subjects (tests/test_own_models.py) and notebook 04's.

* ``FlaxExamplesResNet``: the Flax examples' ``examples/imagenet/models.py`` ResNet (``train``
  argument, ``nn.BatchNorm`` with ``scale_init=zeros`` on the last norm of every block: "zero-init
  residual"), shrunk to stage sizes [1, 1, 1, 1] and 8 filters;
* ``ViT``: a small linen vision transformer (patch conv, ``nn.MultiHeadDotProductAttention``,
  LayerNorm, Dropout) whose ``__call__`` takes ``deterministic=``;
* ``NnxCNN`` / ``NnxMLP``: Flax NNX modules (``nnx.Conv``, ``nnx.BatchNorm``, ``nnx.Linear``);
* ``LinenCNN``: ``NnxCNN``'s linen twin (same layers, same names, same order);
* ``equinox_mlp`` / ``LinenMLP``: an Equinox MLP and its linen twin;
* ``stax_cnn``: a neural-tangents ``stax`` CNN.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


# ----------------------------------------------------------------- Flax examples ResNet


class ResNetBlock(nn.Module):
    filters: int
    conv: Any
    norm: Any
    act: Any = nn.relu
    strides: tuple = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return self.act(residual + y)


class FlaxExamplesResNet(nn.Module):
    stage_sizes: Sequence[int] = (1, 1, 1, 1)
    num_classes: int = 10
    num_filters: int = 8

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(nn.Conv, use_bias=False, dtype=jnp.float32)
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                 dtype=jnp.float32)
        x = conv(self.num_filters, (3, 3), (1, 1), padding=[(1, 1), (1, 1)], name="conv_init")(x)
        x = norm(name="bn_init")(x)
        x = nn.relu(x)
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = ResNetBlock(self.num_filters * 2**i, strides=strides, conv=conv, norm=norm)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=jnp.float32)(x)


# ----------------------------------------------------------------- linen ViT


class EncoderBlock(nn.Module):
    heads: int
    mlp_dim: int
    dropout: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        y = nn.LayerNorm()(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.heads, dropout_rate=self.dropout)(
            y, y, deterministic=deterministic)
        x = x + nn.Dropout(self.dropout)(y, deterministic=deterministic)
        y = nn.LayerNorm()(x)
        y = nn.Dense(self.mlp_dim)(y)
        y = nn.gelu(y)
        y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
        y = nn.Dense(x.shape[-1])(y)
        return x + nn.Dropout(self.dropout)(y, deterministic=deterministic)


class ViT(nn.Module):
    num_classes: int = 10
    patch: int = 4
    dim: int = 32
    depth: int = 2
    heads: int = 2
    mlp_dim: int = 64
    dropout: float = 0.1

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        x = nn.Conv(self.dim, (self.patch, self.patch), strides=(self.patch, self.patch), padding="VALID",
                    name="patch_embed")(x)
        n, h, w, c = x.shape
        x = x.reshape(n, h * w, c)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
        x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
        x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w + 1, c))
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        for i in range(self.depth):
            x = EncoderBlock(self.heads, self.mlp_dim, self.dropout, name=f"block_{i}")(x, deterministic)
        x = nn.LayerNorm(name="norm")(x)
        return nn.Dense(self.num_classes, name="head")(x[:, 0])


# ----------------------------------------------------------------- NNX


class NnxCNN(nnx.Module):
    """conv 3x3 (c1) -> BatchNorm -> relu -> conv 3x3 (c2) -> BatchNorm -> relu -> mean pool -> linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, c1: int = 8, c2: int = 16, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(in_channels, c1, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(c1, rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(c2, rngs=rngs)
        self.fc = nnx.Linear(c2, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(axis=(1, 2)))


class LinenCNN(nn.Module):
    """``NnxCNN`` in linen: the same layers under the same names."""

    num_classes: int = 10
    c1: int = 8
    c2: int = 16

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.99, epsilon=1e-5)
        x = nn.relu(bn(name="bn1")(nn.Conv(self.c1, (3, 3), padding="SAME", use_bias=False, name="conv1")(x)))
        x = nn.relu(bn(name="bn2")(nn.Conv(self.c2, (3, 3), padding="SAME", use_bias=False, name="conv2")(x)))
        return nn.Dense(self.num_classes, name="fc")(x.mean(axis=(1, 2)))


class NnxMLP(nnx.Module):
    def __init__(self, in_features: int = 64, hidden: int = 64, num_classes: int = 10, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(in_features, hidden, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = self.drop(nnx.relu(self.l1(x)))
        return self.out(nnx.relu(self.l2(x)))


# ----------------------------------------------------------------- Equinox and its linen twin


def equinox_mlp(key, sizes=(64, 32, 32, 10)):
    """An ``eqx.nn.MLP``-like stack of ``eqx.nn.Linear`` (weights ``(out, in)``) with relu; returns
    ``(apply_fn, params, static)`` for a batch ``(N, *shape)``."""
    import equinox as eqx

    keys = jax.random.split(key, len(sizes) - 1)
    layers = [eqx.nn.Linear(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys)]

    class MLP(eqx.Module):
        layers: list

        def __call__(self, x):
            x = x.reshape(-1)
            for layer in self.layers[:-1]:
                x = jax.nn.relu(layer(x))
            return self.layers[-1](x)

    model = MLP(layers)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def apply_fn(p, x):
        return jax.vmap(eqx.combine(p, static))(x)

    return apply_fn, params, static


class LinenMLP(nn.Module):
    sizes: Sequence[int] = (32, 32, 10)

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for i, s in enumerate(self.sizes[:-1]):
            x = nn.relu(nn.Dense(s, name=f"layers_{i}")(x))
        return nn.Dense(self.sizes[-1], name=f"layers_{len(self.sizes) - 1}")(x)


def linen_params_from_equinox(params) -> dict:
    """The linen twin's params from the Equinox MLP's (weights transposed to ``(in, out)``)."""
    return {f"layers_{i}": {"kernel": layer.weight.T, "bias": layer.bias} for i, layer in enumerate(params.layers)}


# ----------------------------------------------------------------- stax


def stax_cnn(key, input_shape=(8, 8, 1), num_classes=10):
    """A neural-tangents ``stax`` CNN: conv 3x3 (8) - relu - conv 3x3 (8) - relu - flatten - dense.
    Returns ``(apply_fn, params)``; ``apply_fn(params, x)`` gives ``(N, num_classes)``."""
    from ntksap_jax.validate import import_neural_tangents

    stax = import_neural_tangents().stax
    init_fn, apply_fn, _ = stax.serial(
        stax.Conv(8, (3, 3), padding="SAME"), stax.Relu(),
        stax.Conv(8, (3, 3), padding="SAME"), stax.Relu(),
        stax.Flatten(), stax.Dense(num_classes),
    )
    _, params = init_fn(key, (-1, *input_shape))
    return apply_fn, params
