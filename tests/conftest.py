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
