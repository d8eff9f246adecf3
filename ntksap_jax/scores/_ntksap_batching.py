"""NTK-SAP's objective in micro-batches, and the automatic micro-batch size (private).

Public through :func:`ntksap_jax.scores.ntksap_scorer` (``micro_batch=``) and
:func:`ntksap_jax.scores.ntksap.ntksap_sample_gradient`.

Why it is exact: the official code takes every BatchNorm's statistics from one ``no_grad``
train-mode pass over the *whole* batch of one weight sample, then evaluates the unperturbed and
the perturbed net in eval mode with those statistics fixed, so the objective
``Σ_i ‖f(θ⊙m, x_i) − f((θ+εz)⊙m, x_i)‖²`` is a sum over examples of terms that each depend on one
example only (the statistics carry no gradient: :attr:`ntksap_jax.model.Model.statistics` stops
it on the params and on its result). So one statistics pass over the whole batch (forward only:
nothing is kept for a backward pass), then ``∂L/∂m`` summed over micro-batches of at most
``micro_batch`` examples in a ``lax.scan`` (one micro-batch's activations live at a time) gives
the whole-batch gradient up to the order of a floating-point sum.

A batch of ``n`` examples is cut into ``c = ceil(n / micro_batch)`` chunks of
``s = ceil(n / c)`` examples (never more than ``micro_batch``); when ``c·s > n`` the last
``c·s − n`` slots repeat the first examples with weight 0, so they add exactly nothing.

``micro_batch="auto"`` (:func:`pick_micro_batch`): whole batches when the compiled per-sample
step fits :data:`AUTO_MEMORY_FRACTION` of the device's ``bytes_limit``, else the largest chunk
size whose peak (a line through the compiled peaks at 2 and 8 chunks) fits, checked by
compiling it. XLA:CPU reports no limit: ``auto`` scores whole batches there.

Example::

    theta, x, z = ntksap_sample_draws(key, params, masks, (256, 224, 224, 3))
    g = micro_batched_gradient(as_model(model, (224, 224, 3)), theta, masks, z, x, batch_stats, micro_batch=32)
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from ntksap_jax.masks import apply_masks
from ntksap_jax.ntk import jvp_squared_norm
from ntksap_jax.parallel import cpu_collectives_need_serial
from ntksap_jax.scores._protocol import ScoreFn

__all__ = ["AUTO_MEMORY_FRACTION", "check_micro_batch", "chunks", "chunk_size", "micro_batched_gradient",
           "objective_value", "pick_micro_batch", "device_memory_budget", "compiled_peak_bytes", "sequential_score_fn"]

PyTree = Any

#: ``micro_batch="auto"`` keeps the compiled step's peak within this fraction of ``bytes_limit``
#: (the rest: the pruning loop's own arrays, allocator fragmentation).
AUTO_MEMORY_FRACTION = 0.75
AUTO = "auto"


def check_micro_batch(value, name: str = "micro_batch") -> int | str | None:
    """``None`` (whole batches), ``"auto"`` or a positive int; else a one-line ``ValueError``.

    Example::

      check_micro_batch("32")   # 32
    """
    if value is None or value == AUTO:
        return value
    try:
        number = int(value)
        exact = not isinstance(value, bool) and number == float(value)
    except (TypeError, ValueError):
        exact = False
    if not exact or number < 1:
        raise ValueError(f"{name} must be a positive integer, 'auto' or None; got {value!r}")
    return number


def chunks(n: int, micro_batch: int | None) -> tuple[int, int]:
    """``(c, s)``: ``c = ceil(n / micro_batch)`` chunks of ``s = ceil(n / c) ≤ micro_batch``
    examples (``(1, n)`` for ``None``).

    Example::

      chunks(232, 64)   # (4, 58)
    """
    if micro_batch is None or micro_batch >= n:
        return 1, n
    c = -(-n // micro_batch)
    return c, -(-n // c)


def chunk_size(n: int, micro_batch: int | None) -> int | None:
    """The examples per chunk for a batch of ``n``, ``None`` when it is scored whole.

    Example::

      chunk_size(232, 64), chunk_size(32, 64)   # 58, None
    """
    c, s = chunks(n, micro_batch)
    return s if c > 1 else None


def moved(params, masks, perturbation, eps):
    """``(θ + ε z)⊙m`` on masked leaves, ``θ`` elsewhere."""
    return jax.tree.map(lambda m, p, z: p if m is None else (p + eps * z) * m, masks, params, perturbation,
                        is_leaf=lambda t: t is None)


def tangent(params, masks, perturbation, eps):
    """``ε z⊙m`` on masked leaves, 0 elsewhere, in each param's dtype (jvp needs the primal's:
    float64 params with float32 masks are a float64 computation)."""
    return jax.tree.map(lambda m, p, z: jnp.zeros_like(p) if m is None else (eps * z * m).astype(p.dtype), masks,
                        params, perturbation, is_leaf=lambda t: t is None)


def objective_value(apply_fn, params, masks, perturbation, x, *, eps: float, jvp: bool) -> jax.Array:
    """NTK-SAP's objective (:func:`ntksap_jax.scores.ntksap.ntksap_objective`, the estimator as a flag):
    ``‖f(θ⊙m) − f((θ+εz)⊙m)‖²``, or ``‖J(θ⊙m) (εz⊙m)‖²`` when ``jvp``."""
    masked = apply_masks(params, masks)
    if jvp:
        return jvp_squared_norm(apply_fn, masked, x, tangent(params, masks, perturbation, eps))
    diff = apply_fn(masked, x) - apply_fn(moved(params, masks, perturbation, eps), x)
    return jnp.vdot(diff, diff)


def _chunk_objective(spec, theta, m, z, xb, weight, stats, eps: float, jvp: bool) -> jax.Array:
    """The objective on one chunk ``xb`` with fixed statistics; ``weight`` (0/1 per example, or
    ``None``) multiplies each example's outputs, so a weight-0 example adds exactly nothing."""
    def apply_fn(p, xs):
        out = spec.apply(p, stats, xs)[0]
        return out if weight is None else out * weight.reshape((-1,) + (1,) * (out.ndim - 1))

    return objective_value(apply_fn, theta, m, z, xb, eps=eps, jvp=jvp)


def micro_batched_gradient(spec, theta: PyTree, masks: PyTree, z: PyTree, x: jax.Array, batch_stats: PyTree, *,
                           micro_batch: int, eps: float = 0.01, jvp: bool = False) -> PyTree:
    """``∂L/∂m`` of one weight sample, summed over micro-batches of ``x`` (see the module docstring).

    Args:
      spec: a :class:`ntksap_jax.model.Model`.
      theta: the drawn weights (unmasked); masks: the masks (``None`` on dense leaves);
      z: the perturbation (``None`` where the mask is).
      x: the whole batch ``(n, ...)``: statistics come from it in one train-mode pass.
      batch_stats: the model's statistics (structure only), or ``None``/``{}``.
      micro_batch: at most this many examples per chunk (a positive int).
      eps: perturbation standard deviation; jvp: the ``"jvp"`` estimator, else finite difference.

    Returns:
      A pytree shaped like ``masks``: the whole batch's gradient up to float rounding.

    Example::

      g = micro_batched_gradient(spec, theta, masks, z, x, stats, micro_batch=32)
    """
    n = x.shape[0]
    c, s = chunks(n, micro_batch)
    stats = spec.statistics(apply_masks(theta, masks), batch_stats, x) if batch_stats else batch_stats
    pad = c * s - n
    if pad:  # repeat the first examples, weighted 0 (finite values, no contribution)
        x = jnp.concatenate([x, x[:pad]])
    xs = x.reshape((c, s) + x.shape[1:])
    weights = None if not pad else (jnp.arange(c * s) < n).astype(x.dtype).reshape(c, s)
    grad = jax.grad(lambda m, xb, w: _chunk_objective(spec, theta, m, z, xb, w, stats, eps, jvp))

    def body(acc, chunk):
        xb, w = chunk
        return jax.tree.map(jnp.add, acc, grad(masks, xb, w)), None

    zeros = jax.tree.map(jnp.zeros_like, masks)
    total, _ = jax.lax.scan(body, zeros, (xs, weights))
    return total


def compiled_peak_bytes(compiled) -> int:
    """Temporaries + arguments + outputs − aliased bytes of a compiled executable
    (``compiled.memory_analysis()``; ``peak_memory_in_bytes`` on XLA:CPU leaves out temporaries)."""
    m = compiled.memory_analysis()
    return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def device_memory_budget(device=None) -> int | None:
    """:data:`AUTO_MEMORY_FRACTION` of the device's ``memory_stats()["bytes_limit"]``, or
    ``None`` where the device reports none (XLA:CPU)."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    limit = (stats or {}).get("bytes_limit")
    return None if not limit else int(AUTO_MEMORY_FRACTION * limit)


def pick_micro_batch(peak: Callable[[int | None], int], n: int, budget: int | None) -> int | None:
    """The micro-batch for batches of ``n`` whose step fits ``budget`` bytes, ``None`` for whole.

    ``peak(micro_batch) -> bytes`` compiles the step (``None``: the whole-batch step). Whole
    batches when ``budget`` is ``None`` or their step fits; otherwise the peaks at 2 and 8 chunks
    give a line in the chunk size, the largest size ``ceil(n / c)`` under it is compiled, and
    halved while it does not fit: 3 to about 5 compilations.

    Raises:
      ValueError: if even one example per chunk does not fit.

    Example::

      pick_micro_batch(lambda mb: 10 * (mb or 256) + 100, 256, 1000)   # 86
    """
    if budget is None:
        return None
    seen: dict = {}

    def at(mb):
        if mb not in seen:
            seen[mb] = peak(mb)
        return seen[mb]

    if n == 1 or at(None) <= budget:
        return None
    big, small = chunks(n, -(-n // 2))[1], chunks(n, -(-n // min(n, 8)))[1]
    slope = (at(big) - at(small)) / max(1, big - small)
    fits = [s for s in sorted({chunks(n, -(-n // c))[1] for c in range(2, n + 1)}, reverse=True)
            if at(small) + slope * (s - small) <= budget]
    size = fits[0] if fits else 1
    while at(size) > budget and size > 1:
        size = chunks(n, max(1, size // 2))[1]
    if at(size) > budget:
        raise ValueError(f"micro_batch='auto': one example per chunk needs {at(size) / 2**30:.2f} GiB, over the "
                         f"budget of {budget / 2**30:.2f} GiB ({AUTO_MEMORY_FRACTION} of the device's limit)")
    return size


def sequential_score_fn(one: Callable, plan: list, sample_key: Callable, micro_batch, counter,
                        finalize: Callable) -> ScoreFn:
    """NTK-SAP's sequential sample loop: one jitted step per batch size, run once per ``(r, b, n)``
    of ``plan`` with ``sample_key(key, r, b)``; ``one(params, masks, batch_stats, key, n, micro)``
    is one sample's gradient. ``micro_batch="auto"`` picks each batch size's micro-batch at its
    first call (:func:`pick_micro_batch`, compiling uncounted candidates).

    Example::

      fn = sequential_score_fn(one, [(0, 0, 100)], sample_key, None, TraceCounter(), finalize)
    """
    counted = counter.wrap(one)

    def make_step(n, micro, fun=counted):
        return jax.jit(lambda acc, params, masks, batch_stats, key: jax.tree.map(
            jnp.add, acc, fun(params, masks, batch_stats, key, n, micro)), donate_argnums=0)

    sizes = sorted({n for _, _, n in plan})
    auto = micro_batch == AUTO
    chosen = {} if auto else {n: chunk_size(n, micro_batch) for n in sizes}
    steps = {} if auto else {n: make_step(n, micro_batch) for n in sizes}
    zeros = jax.jit(lambda masks: jax.tree.map(jnp.zeros_like, masks))
    finalize = jax.jit(finalize)

    def step(n, params, masks, batch_stats, key):
        if n not in steps:  # "auto": compile candidates on these shapes, keep the one that fits
            acc = jax.eval_shape(lambda m: jax.tree.map(jnp.zeros_like, m), masks)

            def peak(micro):
                low = make_step(n, micro, fun=one).lower(acc, params, masks, batch_stats, key)
                return compiled_peak_bytes(low.compile())

            chosen[n] = pick_micro_batch(peak, n, device_memory_budget())
            steps[n] = make_step(n, chosen[n])
        return steps[n]

    def score(params, masks, batch_stats, key):
        serial = cpu_collectives_need_serial(jax.sharding.get_mesh())  # under prune(..., mesh=) on CPU
        acc = zeros(masks)
        for r, b, n in plan:
            acc = step(n, params, masks, batch_stats, key)(acc, params, masks, batch_stats, sample_key(key, r, b))
            if serial:
                jax.block_until_ready(acc)
        return finalize(acc, masks)

    def lowered(params, masks, batch_stats, key):
        acc = jax.eval_shape(lambda m: jax.tree.map(jnp.zeros_like, m), masks)
        uses = [n for _, _, n in plan]
        return [(step(n, params, masks, batch_stats, key).lower(acc, params, masks, batch_stats, key), uses.count(n))
                for n in sizes]

    fn = ScoreFn(score, counter, lowered)
    fn.micro_batches = chosen
    return fn
