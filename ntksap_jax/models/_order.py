"""The order in which a Flax model calls its submodules (for readable per-layer reports)."""

from __future__ import annotations

import jax
import flax.linen as nn

__all__ = ["module_order"]


def module_order(model: nn.Module, x: jax.Array, **call_kwargs) -> list[str]:
    """Dotted paths of ``model``'s submodules in the order the forward pass enters them.

    JAX sorts dict keys, so param pytrees list ``blocks_0`` before ``conv``; this recovers
    the network's own order (stem first, classifier last). Runs ``model.init`` abstractly
    under ``jax.eval_shape``: no compilation, no FLOPs.

    Args:
      model: a Flax linen module.
      x: an example input (only its shape and dtype matter), e.g. ``jnp.zeros((1, 32, 32, 3))``.
      **call_kwargs: extra arguments of ``__call__`` (default ``train=False``).

    Returns:
      e.g. ``["", "conv", "bn", "blocks_0", "blocks_0.conv1", ...]`` (``""`` is the root).

    Example::

      order = module_order(get_model("resnet20", 10), jnp.zeros((1, 32, 32, 3)))
    """
    call_kwargs.setdefault("train", False)
    paths: list[str] = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            path = ".".join(context.module.path)
            if path not in paths:
                paths.append(path)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.key(0), x, **call_kwargs))
    return paths
