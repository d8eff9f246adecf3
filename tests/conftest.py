"""Shared fixtures. Float64 checks use ``jax.enable_x64(True)`` locally, never globally."""

import jax
import jax.numpy as jnp
import pytest


def to_f64(tree):
    """Cast every floating leaf to float64 (Flax makes float32 params even with x64 on)."""
    return jax.tree.map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def official_name_to_ours(name: str) -> str:
    """Official PyTorch ResNet-20 layer name -> our dotted param path.

    ``conv`` -> ``conv.kernel``; ``blocks.3.conv1`` -> ``blocks_3.conv1.kernel``;
    ``blocks.3.shortcut.0`` -> ``blocks_3.shortcut_conv.kernel``; ``fc`` -> ``fc.kernel``.
    """
    if name in ("conv", "fc"):
        return f"{name}.kernel"
    _, index, rest = name.split(".", 2)
    return f"blocks_{index}.{'shortcut_conv' if rest == 'shortcut.0' else rest}.kernel"


def official_bn_stats(model, variables, x):
    """BatchNorm statistics as the official NTK-SAP code leaves them, by hand: a train-mode pass
    (each BatchNorm normalising with its batch's biased variance, Flax momentum 0 = PyTorch
    momentum 1.0), then every running variance made PyTorch's unbiased one (times n/(n-1), n
    the values per channel that BatchNorm saw). Needs a zoo-style model with ``bn_momentum``."""
    import flax.linen as nn

    counts = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.BatchNorm):
            counts[context.module.path] = args[0].size // args[0].shape[-1]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        _, st = model.clone(bn_momentum=0.0).apply(variables, x, train=True, mutable=["batch_stats"])
    st = jax.tree.map(lambda a: a, st["batch_stats"])
    for path, n in counts.items():
        node = st
        for k in path:
            node = node[k]
        node["var"] = node["var"] * n / (n - 1)
    return jax.lax.stop_gradient(st)
