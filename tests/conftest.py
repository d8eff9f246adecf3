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
