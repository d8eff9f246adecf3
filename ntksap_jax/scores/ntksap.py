"""The NTK-SAP saliency (Wang, Li & Sun, ICLR 2023), as the official code computes it.

For each weight sample (``samples`` repeats × one per input batch):

1. draw fresh kaiming-normal (fan_in) values for every prunable kernel (other params,
   e.g. biases and BatchNorm scales, are kept as given: zeros/ones at init);
2. draw a fresh ``N(0, 1)`` input batch ``x`` in the data's shape;
3. set BatchNorm statistics to those of the unperturbed masked net ``f(θ⊙m)`` on ``x``,
   as the official code's no-grad momentum-1.0 train-mode pass leaves them (see the
   normalisation notes), with no gradient through them; both nets below are evaluated in
   eval mode with these statistics (:func:`apply_with_batch_statistics`);
4. draw ``z ~ N(0, 1)`` on the prunable kernels and evaluate the objective

   * ``estimator="finite_difference"`` (the official code):
     ``L(m) = Σ_batch ‖f(θ⊙m) − f((θ + ε z)⊙m)‖²``;
   * ``estimator="jvp"``: ``L(m) = ‖J_θ f(θ⊙m) · (ε z⊙m)‖²``, the exact first-order
     form computed with ``jax.jvp``, unbiased for ``ε² tr Θ`` (the finite difference is
     not: −7.7% ± 0.3% on a 512-512 MLP at ``ε = 0.01``, and on ResNet-20 +0.9% ± 2.3% at
     ``ε = 0.01`` but −4.8% ± 0.3% at ``1e-3``; see ``benchmarks/trace_estimators.py``);

5. accumulate ``∂L/∂m``.

The score is ``|Σ_samples ∂L/∂m|`` with already-pruned entries set to 0. ``ε`` is a
standard deviation (the paper's "ε = 1e-4 as variance" is this ``ε = 0.01``).

Normalisation notes: the official code normalises with PyTorch's *running* variance,
which after its momentum-1.0 pass is the unbiased batch variance ``n/(n-1) · var``
(``n = N·H·W`` values per channel), while Flax stores the biased one; and the statistics of
each layer come from that train-mode pass, in which earlier BatchNorms normalised with the
biased variance. The statistics here follow the official code in both respects
(:attr:`ntksap_jax.model.Model.statistics`). The factor matters more than it looks:
1/(n−1) is 1.6e-4 at ResNet-20's 8x8 stage with 100 inputs, and without it the scores differ
from the official code's by 3.7e-3 (median relative; 2.4e-2 with 16 inputs); taking the
statistics from the eval-mode pass itself (one pass fewer) differs by 2.1e-2 with 16 inputs.
Any linen ``nn.BatchNorm`` or ``nnx.BatchNorm`` works; no ``bn_momentum`` field is needed.

Memory (``micro_batch``): with the statistics fixed, the objective is a sum over examples, so a
batch can be scored in chunks after one statistics pass over the whole batch: the same gradient up
to float rounding, with one chunk's activations live (ResNet-50 at 224², 256 inputs: 47 GB whole,
12 GB in chunks of 64; ``benchmarks/imagenet_memory.py``). See :mod:`._ntksap_batching`.

Weight re-draws (``reinit``): ``"kaiming"`` draws ``N(0, 2/fan_in)`` with each leaf's fan-in
from the model's layout (``DenseGeneral``/attention kernels and ``(out, in)`` layouts
included), as the official code; ``"init"`` re-runs the model's own initializers with a
fresh key; ``"auto"`` (default) is kaiming for the library's zoo and for models that cannot
re-initialise, the model's own initializers otherwise.
"""

from __future__ import annotations

import enum
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from ntksap_jax._checks import positive_float, positive_int
from ntksap_jax.masks import apply_masks
from ntksap_jax.model import Model, as_model
from ntksap_jax.ntk import gaussian_like
from ntksap_jax.parallel import shard_examples
from ntksap_jax.scores._data import batch_sizes
from ntksap_jax.scores._ntksap_batching import (
    check_micro_batch,
    chunk_size,
    micro_batched_gradient,
    objective_value,
    sequential_score_fn,
)
from ntksap_jax.scores._protocol import ScoreFn, TraceCounter

__all__ = [
    "Estimator",
    "SampleLoop",
    "Reinit",
    "kaiming_normal_reinit",
    "make_reinit",
    "bn_statistics",
    "apply_with_batch_statistics",
    "ntksap_objective",
    "ntksap_sample_draws",
    "ntksap_sample_gradient",
    "ntksap_scorer",
]

PyTree = Any


class Estimator(str, enum.Enum):
    """How the NTK-SAP objective measures the output change."""

    FINITE_DIFFERENCE = "finite_difference"
    JVP = "jvp"


#: ``SampleLoop.AUTO`` on accelerators: vmap up to this many inputs per iteration (samples × batch).
VMAP_MAX_INPUTS = 4096


class SampleLoop(str, enum.Enum):
    """How weight samples are looped.

    ``SEQUENTIAL``: a host loop over one jitted per-sample step (fast on XLA:CPU, where
    batched-weight convolutions under ``vmap`` and convolutions inside ``lax.map`` bodies
    are 10-40x slower). ``VMAP``: all samples of a batch shape in one ``vmap``-ed call
    (fewer dispatches; for accelerators). ``AUTO``: sequential on CPU; on accelerators vmap
    when one iteration has at most :data:`VMAP_MAX_INPUTS` inputs in all (samples × batch),
    else sequential. Measured on an H200: ResNet-20 at R=5 × 100 inputs took 0.032 s per
    iteration under vmap and 0.035 s sequential, while ResNet-50 with 40 samples of 256
    ImageNet images did not finish under vmap and took 4.9 s sequential.
    """

    SEQUENTIAL = "sequential"
    VMAP = "vmap"
    AUTO = "auto"


def _choice(enum_cls, value, name):
    try:
        return enum_cls(value)
    except ValueError:
        allowed = [e.value for e in enum_cls]
        raise ValueError(f"unknown {name} {value!r}; choose one of {allowed}") from None


class Reinit(str, enum.Enum):
    """How NTK-SAP re-draws the prunable weights for each weight sample (see the module docstring)."""

    AUTO = "auto"
    KAIMING = "kaiming"
    INIT = "init"


def _fan_in(shape: Sequence[int]) -> int:
    # Flax layout: the last axis is the output; fan_in = prod(shape[:-1]) (H·W·C_in, or in).
    return max(1, math.prod(shape[:-1]))


def kaiming_normal_reinit(key: jax.Array, params: PyTree, masks: PyTree, layout=None) -> PyTree:
    """Fresh kaiming-normal (fan_in, gain √2) values for every leaf that has a mask.

    ``N(0, 2 / fan_in)``. ``fan_in`` is ``layout(path, shape).fan_in`` (a
    :class:`ntksap_jax.model.Model`'s ``layout``: ``in`` for an attention q/k/v kernel
    ``(in, heads, head_dim)``, ``C_in·H·W`` for an ``(out, in, H, W)`` weight), or without a
    layout ``prod(shape[:-1])`` (Flax's ``H·W·C_in`` / ``in``): PyTorch's ``kaiming_normal_`` on
    the same layer. Leaves under a ``None`` mask are returned unchanged.

    Example::

      theta = kaiming_normal_reinit(jax.random.key(0), params, masks, layout=model.layout)
    """
    draws = gaussian_like(key, masks)

    def one(path, m, p, z):
        if m is None:
            return p
        shape = jnp.shape(p)
        fan_in = _fan_in(shape) if layout is None else layout(path, shape).fan_in
        return (z * math.sqrt(2.0 / fan_in)).astype(jnp.result_type(p))

    return jax.tree_util.tree_map_with_path(one, masks, params, draws, is_leaf=lambda t: t is None)


def make_reinit(model: Model, reinit: Reinit | str | Callable = Reinit.AUTO) -> Callable:
    """``reinit(key, params, masks) -> params`` for ``model``: ``"kaiming"``, ``"init"``, ``"auto"``
    or a callable (returned as is).

    ``"init"`` re-runs ``model.init`` with ``key`` and takes its values on the masked leaves
    (other leaves, e.g. biases and normalisation scales, stay as given, as with kaiming).

    Example::

      reinit = make_reinit(as_model(vit, (32, 32, 3)), "init")
      theta = reinit(jax.random.key(0), params, masks)
    """
    if callable(reinit) and not isinstance(reinit, str):
        return reinit
    choice = _choice(Reinit, reinit, "reinit")
    if choice == Reinit.AUTO:
        choice = Reinit.KAIMING if (model.zoo or model.init is None) else Reinit.INIT
    if choice == Reinit.KAIMING:
        return functools.partial(kaiming_normal_reinit, layout=model.layout)
    if model.init is None:
        raise ValueError(f"reinit='init' needs a model that can re-initialise itself; {model.name} cannot "
                         "(build it from a factory / with init_fn, or use reinit='kaiming')")

    def own_init(key, params, masks):
        fresh = model.init(key)["params"]
        return jax.tree.map(lambda m, p, f: p if m is None else f.astype(jnp.result_type(p)), masks, params, fresh,
                            is_leaf=lambda t: t is None)

    return own_init


def bn_statistics(model, params: PyTree, batch_stats: PyTree, x: jax.Array) -> PyTree:
    """BatchNorm statistics of ``model`` at ``params`` on the batch ``x``, as NTK-SAP uses them.

    Each BatchNorm's mean and *unbiased* variance of its own input (the official code's
    running statistics after a momentum-1.0 pass), under ``stop_gradient``. Returns
    ``batch_stats`` unchanged (possibly ``None``/empty) for models without BatchNorm.

    Args:
      model: a linen or NNX module or a :class:`ntksap_jax.model.Model`.
      params: its params (already masked, if masks apply).
      batch_stats: any batch_stats of the right structure (only the structure is used).
      x: the input batch ``(N, ...)``.

    Example::

      stats = bn_statistics(model, apply_masks(params, masks), variables["batch_stats"], x)
    """
    if not batch_stats:
        return batch_stats
    return as_model(model, tuple(x.shape[1:])).statistics(params, batch_stats, x)


def apply_with_batch_statistics(model, params: PyTree, batch_stats: PyTree, x: jax.Array) -> tuple[jax.Array, PyTree]:
    """Eval-mode forward pass with the BatchNorm statistics of :func:`bn_statistics`.

    The statistics (linen ``nn.BatchNorm`` or ``nnx.BatchNorm``) come from a train-mode pass
    on this batch, each layer's mean and unbiased variance of its input, under
    ``stop_gradient``; then the network runs in eval mode with them: the official code's
    statistics, gradients not flowing through them (its statistics come from a ``no_grad``
    pass).

    Args:
      model: a linen or NNX module or a :class:`ntksap_jax.model.Model`.
      params: params (already masked).
      batch_stats: the model's batch_stats (structure only), or ``None``/``{}``.
      x: the input batch ``(N, ...)``.

    Returns:
      ``(outputs (N, K), batch_stats)`` with the statistics used (``batch_stats`` as given
      when the model has none).

    Raises:
      ValueError: if some ``batch_stats`` entry is not owned by a BatchNorm.

    Example::

      y, stats = apply_with_batch_statistics(model, apply_masks(params, masks), variables["batch_stats"], x)
    """
    spec = as_model(model, tuple(x.shape[1:]))
    if not batch_stats:
        return spec.apply(params, batch_stats, x)[0], batch_stats
    return spec.apply_with_batch_statistics(params, batch_stats, x)


def ntksap_objective(
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    params: PyTree,
    masks: PyTree,
    perturbation: PyTree,
    x: jax.Array,
    *,
    eps: float = 0.01,
    estimator: Estimator | str = Estimator.FINITE_DIFFERENCE,
) -> jax.Array:
    """The NTK-SAP objective for one weight sample; differentiate it w.r.t. ``masks``.

    Args:
      apply_fn: ``apply_fn(params, x) -> (N, K)`` with any BatchNorm statistics fixed.
      params: the weights ``θ`` (unmasked).
      masks: mask pytree (``None`` for dense leaves); the variable of differentiation.
      perturbation: ``z``, a pytree with the structure of ``masks`` (leaves where the mask
        is not ``None``; ``None`` elsewhere).
      x: inputs ``(N, ...)``.
      eps: perturbation standard deviation.
      estimator: ``"finite_difference"``: ``‖f(θ⊙m) − f((θ+εz)⊙m)‖²``;
        ``"jvp"``: ``‖J(θ⊙m) (εz⊙m)‖²``.

    Returns:
      A scalar.

    Example::

      g = jax.grad(lambda m: ntksap_objective(apply_fn, theta, m, z, x))(masks)
    """
    estimator = _choice(Estimator, estimator, "estimator")
    return objective_value(apply_fn, params, masks, perturbation, x, eps=eps, jvp=estimator == Estimator.JVP)


def ntksap_sample_draws(
    key: jax.Array,
    params: PyTree,
    masks: PyTree,
    input_shape: Sequence[int],
    *,
    reinit: Callable[[jax.Array, PyTree, PyTree], PyTree] = kaiming_normal_reinit,
) -> tuple[PyTree, jax.Array, PyTree]:
    """The random draws of one NTK-SAP weight sample: ``(θ, x, z)``.

    ``θ``: ``reinit(k1, params, masks)`` (fresh kaiming kernels); ``x ~ N(0, 1)`` of shape
    ``input_shape`` in the params' dtype; ``z ~ N(0, 1)`` on the masked leaves (``None``
    elsewhere). ``k1, k2, k3 = jax.random.split(key, 3)``.

    Example::

      theta, x, z = ntksap_sample_draws(jax.random.key(0), params, masks, (100, 32, 32, 3))
    """
    k_init, k_x, k_z = jax.random.split(key, 3)
    theta = reinit(k_init, params, masks)
    dtype = jnp.result_type(*jax.tree.leaves(params))
    # Under a mesh (prune(..., mesh=)) the batch is split over its data axis; a no-op otherwise.
    # JAX's partitionable threefry draws the same numbers whatever the split.
    x = shard_examples(jax.random.normal(k_x, tuple(input_shape), dtype))
    return theta, x, gaussian_like(k_z, masks)


def ntksap_sample_gradient(
    model,
    params: PyTree,
    masks: PyTree,
    batch_stats: PyTree,
    key: jax.Array,
    input_shape: Sequence[int],
    *,
    eps: float = 0.01,
    estimator: Estimator | str = Estimator.FINITE_DIFFERENCE,
    reinit: Reinit | str | Callable[[jax.Array, PyTree, PyTree], PyTree] = Reinit.KAIMING,
    micro_batch: int | None = None,
) -> PyTree:
    """``∂L/∂m`` for one weight sample (steps 1-5 of the module docstring), signed.

    Args:
      model: a linen or NNX module or a :class:`ntksap_jax.model.Model`.
      params: params pytree (only its structure and non-prunable leaves are used).
      masks: current masks.
      batch_stats: the model's batch_stats (structure only), or ``None``/``{}``.
      key: PRNG key for this sample (re-init, input and perturbation).
      input_shape: the batch's shape, e.g. ``(100, 32, 32, 3)``.
      eps, estimator: see :func:`ntksap_objective`.
      reinit: ``"kaiming"`` (default here), ``"init"``, ``"auto"`` or
        ``reinit(key, params, masks) -> params`` (see :func:`make_reinit`).
      micro_batch: ``None`` (the whole batch at once) or at most this many examples at a time:
        the statistics from one pass over the whole batch, then the gradient summed over chunks
        in a ``lax.scan`` (equal up to float rounding; a lower memory peak).

    Returns:
      A pytree shaped like ``masks`` (``None`` on dense leaves).

    Example::

      g = jax.jit(functools.partial(ntksap_sample_gradient, model, input_shape=(100, 32, 32, 3)))(
          params, masks, batch_stats, key)
    """
    estimator = _choice(Estimator, estimator, "estimator")
    spec = as_model(model, tuple(input_shape)[1:])
    theta, x, z = ntksap_sample_draws(key, params, masks, input_shape, reinit=make_reinit(spec, reinit))
    micro_batch = check_micro_batch(micro_batch)
    if micro_batch == "auto":
        raise ValueError("ntksap_sample_gradient: micro_batch must be a positive integer or None; "
                         "'auto' is resolved by ntksap_scorer")
    if micro_batch is not None and micro_batch < x.shape[0]:
        return micro_batched_gradient(spec, theta, masks, z, x, batch_stats, micro_batch=micro_batch, eps=eps,
                                      jvp=estimator == Estimator.JVP)
    if not batch_stats:
        apply_fn = lambda p, xb: spec.apply(p, batch_stats, xb)[0]  # noqa: E731
        return jax.grad(lambda m: ntksap_objective(apply_fn, theta, m, z, x, eps=eps, estimator=estimator))(masks)

    # BatchNorm statistics of the unperturbed net on x (the official code's train-mode pass).
    def objective(m):
        stats = spec.statistics(apply_masks(theta, m), batch_stats, x)
        apply_fn = lambda p, xb: spec.apply(p, stats, xb)[0]  # noqa: E731
        return objective_value(apply_fn, theta, m, z, x, eps=eps, jvp=estimator == Estimator.JVP)

    return jax.grad(objective)(masks)


def _finalize(grad_sum: PyTree, masks: PyTree) -> PyTree:
    return jax.tree.map(
        lambda m, g: None if m is None else jnp.abs(g) * (m != 0), masks, grad_sum, is_leaf=lambda t: t is None
    )


def _tree_add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda u, v: u + v, a, b)


def ntksap_scorer(
    model,
    input_shape: Sequence[int],
    *,
    samples: int = 5,
    num_inputs: int = 100,
    batch_size: int = 256,
    eps: float = 0.01,
    estimator: Estimator | str = Estimator.FINITE_DIFFERENCE,
    sample_loop: SampleLoop | str = SampleLoop.AUTO,
    reinit: Reinit | str | Callable[[jax.Array, PyTree, PyTree], PyTree] = Reinit.AUTO,
    micro_batch: int | str | None = None,
) -> Callable[[PyTree, PyTree, PyTree, jax.Array], PyTree]:
    """Build the NTK-SAP score function ``score(params, masks, batch_stats, key) -> scores``.

    As in the official code, ``num_inputs`` Gaussian inputs are split into batches of at
    most ``batch_size``, and each of the ``samples`` repeats draws fresh weights for each
    batch: ``samples × ceil(num_inputs / batch_size)`` weight samples per call. The
    official settings are ``num_inputs = 10 × num_classes``; ``samples = 5`` on CIFAR-10
    (with 20 pruning iterations), 1 elsewhere.

    The per-sample step is jitted once; calling ``score`` with new masks or keys of the
    same shapes never re-traces.

    Args:
      model: a linen or NNX module or a :class:`ntksap_jax.model.Model` (any call convention;
        see :func:`ntksap_jax.model.as_model`).
      input_shape: one example's shape, e.g. ``(32, 32, 3)``.
      samples: repeats ``R``.
      num_inputs: Gaussian inputs per repeat.
      batch_size: largest batch evaluated at once.
      eps: perturbation standard deviation (0.01 in the official code).
      estimator: ``"finite_difference"`` (official) or ``"jvp"`` (exact first order).
      sample_loop: ``"sequential"``, ``"vmap"`` or ``"auto"`` (see :class:`SampleLoop`).
      reinit: weight re-draws: ``"auto"`` (kaiming on the zoo and on models that cannot
        re-initialise, the model's own ``init`` otherwise), ``"kaiming"``, ``"init"``, or
        ``reinit(key, params, masks) -> params``.
      micro_batch: ``None`` (default: each batch at once), a positive int (at most this many
        examples of a batch at a time: statistics from one forward pass over the whole batch,
        then the mask gradient summed over chunks in a ``lax.scan``; equal to the whole batch's
        up to float rounding, a peak memory of about one chunk's activations), or ``"auto"``:
        the largest chunk whose compiled step fits 0.75 of the device's ``bytes_limit``, whole
        batches if they fit or the device reports no limit (XLA:CPU); ``"auto"`` runs the
        sequential sample loop. ``score.micro_batches`` records ``{batch size: examples per chunk, None if whole}``.

    Returns:
      ``score(params, masks, batch_stats, key)`` returning a pytree shaped like ``masks``
      with non-negative scores (0 on pruned entries, ``None`` on dense leaves).

    Example::

      model = get_model("resnet20", 10)
      variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
      score = ntksap_scorer(model, (32, 32, 3), samples=5)
      s = score(variables["params"], init_masks(variables["params"]), variables["batch_stats"], jax.random.key(1))
    """
    samples, num_inputs, batch_size = (positive_int(v, name) for v, name in (
        (samples, "samples"), (num_inputs, "num_inputs"), (batch_size, "batch_size")))
    eps = positive_float(eps, "eps")
    estimator = _choice(Estimator, estimator, "estimator")
    sample_loop = _choice(SampleLoop, sample_loop, "sample_loop")
    micro_batch = check_micro_batch(micro_batch)
    if micro_batch == "auto" and sample_loop == SampleLoop.VMAP:
        raise ValueError("micro_batch='auto' sizes the sequential loop's step; use sample_loop='sequential' or "
                         "'auto', or give micro_batch a number")
    input_shape = tuple(int(s) for s in input_shape)
    spec = as_model(model, input_shape)
    reinit = make_reinit(spec, reinit)
    sizes = batch_sizes(num_inputs, batch_size)
    if sample_loop == SampleLoop.AUTO and micro_batch == "auto":
        sample_loop = SampleLoop.SEQUENTIAL
    if sample_loop == SampleLoop.AUTO:
        small = samples * num_inputs <= VMAP_MAX_INPUTS
        sample_loop = SampleLoop.VMAP if jax.default_backend() != "cpu" and small else SampleLoop.SEQUENTIAL
    # (repeat, batch) -> batch size; each pair is one weight sample with its own key.
    plan = [(r, b, n) for r in range(samples) for b, n in enumerate(sizes)]

    counter = TraceCounter()

    def one(params, masks, batch_stats, key, n, micro=micro_batch):
        return ntksap_sample_gradient(spec, params, masks, batch_stats, key, (n, *input_shape), eps=eps,
                                      estimator=estimator, reinit=reinit, micro_batch=micro)

    def sample_key(key, r, b):
        return jax.random.fold_in(jax.random.fold_in(key, r), b)

    if sample_loop == SampleLoop.SEQUENTIAL:
        return sequential_score_fn(one, plan, sample_key, micro_batch, counter, _finalize)
    one = counter.wrap(one)

    @jax.jit
    def score(params, masks, batch_stats, key):
        acc = None
        for b, n in enumerate(sizes):
            keys = jnp.stack([sample_key(key, r, b) for r in range(samples)])
            grads = jax.vmap(lambda k, n=n: one(params, masks, batch_stats, k, n))(keys)
            total = jax.tree.map(lambda g: jnp.sum(g, axis=0), grads)
            acc = total if acc is None else _tree_add(acc, total)
        return _finalize(acc, masks)

    fn = ScoreFn(score, counter, lambda *args: [(score.lower(*args), 1)])
    fn.micro_batches = {n: chunk_size(n, micro_batch) for n in sizes}
    return fn
