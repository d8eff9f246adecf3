"""Shared plumbing of the data-driven baselines (SNIP, iterative SNIP, GraSP). Private.

* config checks that raise ``ValueError`` naming the bad value;
* the prune "loader": ``num_inputs`` examples split into batches of at most ``batch_size``
  (as the official ``load.dataloader(..., prune_dataset_ratio * num_classes)``), either the
  user's labelled ``(x, y)`` or, per call, Gaussian inputs with uniform random labels;
* a train-mode forward pass (batch statistics, updated statistics discarded) and the
  mean cross-entropy of PyTorch's ``F.cross_entropy``.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ntksap_jax._checks import positive_int as check_positive_int
from ntksap_jax.model import as_model
from ntksap_jax.parallel import shard_examples

PyTree = Any
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of ``(N, K)`` logits against ``(N,)`` int labels (PyTorch's default)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))


def resolve_loss(loss: str | LossFn, who: str) -> LossFn:
    """``"cross_entropy"`` or a callable ``loss(logits, labels) -> scalar``."""
    if callable(loss):
        return loss
    if loss == "cross_entropy":
        return cross_entropy
    raise ValueError(f"{who}: unknown loss {loss!r}; choose 'cross_entropy' or pass a callable loss(logits, labels)")


def batch_sizes(num_inputs: int, batch_size: int) -> list[int]:
    """``[batch_size, ..., rest]``: the official loader's batches (the last one may be short)."""
    full, rest = divmod(num_inputs, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


class PruneData:
    """The prune batches of one scorer: fixed labelled data, or fresh Gaussian draws per call.

    Built by :func:`prune_data`; :meth:`batches` is called inside the scorer's jitted function.
    """

    def __init__(self, x, y, num_inputs: int, batch_size: int, num_classes: int, input_shape: tuple):
        self.x, self.y = x, y  # numpy arrays or None
        self.num_inputs = num_inputs
        self.sizes = batch_sizes(num_inputs, batch_size)
        self.num_classes = num_classes
        self.input_shape = input_shape

    @property
    def arrays(self):
        """The fixed ``(x, y)`` to pass to the jitted function (``(None, None)`` when drawn)."""
        return self.x, self.y

    def batches(self, key: jax.Array, x, y, dtype) -> list[tuple[jax.Array, jax.Array]]:
        """``[(x_b, y_b), ...]``: slices of the given data, or draws from ``key`` when ``x`` is None.

        Draws: ``x ~ N(0, 1)`` of shape ``(num_inputs, *input_shape)`` in ``dtype`` and
        ``y ~ U{0, ..., num_classes - 1}``, from ``k_x, k_y = jax.random.split(key)``.
        """
        if x is None:
            k_x, k_y = jax.random.split(key)
            x = jax.random.normal(k_x, (self.num_inputs, *self.input_shape), dtype)
            y = jax.random.randint(k_y, (self.num_inputs,), 0, self.num_classes)
        else:
            x = jnp.asarray(x).astype(dtype)
            y = jnp.asarray(y).astype(jnp.int32)
        out, start = [], 0
        for n in self.sizes:  # under a mesh (prune(..., mesh=)), each batch is split over its data axis
            out.append((shard_examples(x[start : start + n]), shard_examples(y[start : start + n])))
            start += n
        return out


def prune_data(
    who: str,
    input_shape: Sequence[int],
    *,
    num_classes,
    data,
    num_inputs,
    batch_size,
    stacklevel: int = 3,
) -> PruneData:
    """Check the data config of a labelled-loss scorer and warn once if there is no data.

    ``data=None``: ``num_inputs`` (default ``10 × num_classes``) Gaussian inputs with random
    labels per call, and one ``UserWarning`` now. ``data=(x, y)``: the first ``num_inputs``
    (default all) examples; ``x`` must be ``(N, *input_shape)``, ``y`` ints in ``[0, num_classes)``.
    """
    num_classes = check_positive_int(num_classes, "num_classes")
    batch_size = check_positive_int(batch_size, "batch_size")
    input_shape = tuple(int(s) for s in input_shape)
    if num_inputs is not None:
        num_inputs = check_positive_int(num_inputs, "num_inputs")
    if data is None:
        if num_inputs is None:
            num_inputs = 10 * num_classes
        warnings.warn(
            f"{who}: no labelled batch given; scoring on Gaussian inputs with random labels "
            f"({num_inputs} fresh N(0, 1) inputs and uniform labels per call). Pass data=(x, y) to score on data.",
            UserWarning,
            stacklevel=stacklevel,
        )
        return PruneData(None, None, num_inputs, batch_size, num_classes, input_shape)
    try:
        x, y = data
    except (TypeError, ValueError):
        raise ValueError(f"{who}: data must be a pair (x, y); got {type(data).__name__}") from None
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != len(input_shape) + 1 or tuple(x.shape[1:]) != input_shape:
        raise ValueError(f"{who}: data x must have shape (N, *{input_shape}); got {x.shape}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"{who}: data y must have shape ({x.shape[0]},) to match x; got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{who}: data y must hold integer class labels; got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{who}: labels must be in [0, {num_classes}); got min {y.min()}, max {y.max()}")
    if x.shape[0] == 0:
        raise ValueError(f"{who}: data is empty")
    if num_inputs is None:
        num_inputs = x.shape[0]
    elif num_inputs > x.shape[0]:
        raise ValueError(f"{who}: num_inputs={num_inputs} but data holds only {x.shape[0]} examples")
    return PruneData(x[:num_inputs], y[:num_inputs], num_inputs, batch_size, num_classes, input_shape)


def train_apply(model, params: PyTree, batch_stats: PyTree, x: jax.Array) -> jax.Array:
    """Logits of a train-mode pass (BatchNorm on batch statistics; updated statistics dropped;
    dropout off: scoring needs no PRNG). ``model``: a linen/NNX module or a ``Model``."""
    return as_model(model, tuple(x.shape[1:])).apply(params, batch_stats, x, train=True)[0]


def params_dtype(params: PyTree):
    """The promoted floating dtype of ``params`` (inputs are drawn/cast to it)."""
    leaves = [leaf for leaf in jax.tree.leaves(params) if jnp.issubdtype(jnp.result_type(leaf), jnp.floating)]
    return jnp.result_type(*leaves) if leaves else jnp.float32
