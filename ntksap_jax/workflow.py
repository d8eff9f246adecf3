"""The library's pruning workflow for any model: :func:`prune_model`.

One call takes a linen module (with its variables, or initialised here), an NNX module, or a
:class:`ntksap_jax.model.Model` (e.g. :func:`ntksap_jax.model.from_apply_fn` for Equinox,
stax or Haiku), scores it with any registered method, prunes it on the method's schedule, and
returns the masks and the masked initial params in the model's own structure with a report.

Example::

    result = prune_model(cnn, input_shape=(8, 8, 1), density=0.1, key=jax.random.key(0))
    result.report["total_kept"], result.report["collapsed_layers"]
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from ntksap_jax.masks import apply_masks_jit, count_kept, count_total, density_report, init_masks, path_name
from ntksap_jax.model import Model, as_model, forward_order
from ntksap_jax.prune import prune
from ntksap_jax.scores import get_method

__all__ = ["PrunedModel", "prune_model", "unit_norm_scales"]

PyTree = Any



class PrunedModel(NamedTuple):
    """What :func:`prune_model` returns.

    Attributes:
      masks: the final masks in the model's own structure (linen/NNX: a pure params dict with
        ``None`` on dense leaves; ``apply_fn`` models: the user's params structure).
      params: the initial params ``θ₀ ⊙ m`` in the same structure (NNX: write them back with
        ``model.update_nnx(module, params)``).
      report: a JSON-ready dict (see :func:`prune_model`).
      history: one row per pruning round (:class:`ntksap_jax.prune.PruneResult`).
      model: the :class:`ntksap_jax.model.Model` that was pruned.
      variables: ``{"params": θ₀, "batch_stats"?}`` in the library's structure (what
        :func:`ntksap_jax.train` takes with :attr:`library_masks`).
      library_masks: the masks in the library's structure (equal to ``masks`` for linen/NNX).
    """

    masks: PyTree
    params: PyTree
    report: dict
    history: list
    model: Model
    variables: dict
    library_masks: PyTree


def unit_norm_scales(model: Model, params: PyTree) -> tuple[PyTree, list[str]]:
    """``params`` with every normalisation scale that is all zero set to ones, and their names.

    A zero-initialised scale (the "zero-init residual" trick: the last BatchNorm of each block
    starts at 0) makes every weight of its branch score exactly 0 under NTK-SAP, SynFlow and
    SNIP alike; the tie rule then keeps weights on no path and whole layers empty. Scoring
    at scale 1 ranks the branch as if it were open; training still starts from the original
    init.

    Example::

      scoring_params, names = unit_norm_scales(as_model(resnet, (32, 32, 3)), variables["params"])
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    scales = [i for i, (path, leaf) in enumerate(flat) if model.norm_scale(path, leaf)]
    if not scales:
        return params, []
    zero = jax.device_get(_all_zero([flat[i][1] for i in scales]))  # one program and one sync for all scales
    unit = {i for i, z in zip(scales, zero) if z}
    names = [path_name(flat[i][0]) for i in sorted(unit)]
    if not unit:
        return params, []
    ones = _ones_like([flat[i][1] for i in sorted(unit)])
    by_index = dict(zip(sorted(unit), ones))
    return jax.tree_util.tree_unflatten(treedef, [by_index.get(i, leaf) for i, (_, leaf) in enumerate(flat)]), names


@jax.jit
def _all_zero(leaves: list) -> list:
    return [jnp.logical_not(jnp.any(leaf != 0)) for leaf in leaves]


@jax.jit
def _ones_like(leaves: list) -> list:
    return [jnp.ones_like(leaf) for leaf in leaves]


#: ``split(key)`` as one compiled program (eager, it runs as two).
split_key = jax.jit(lambda key: tuple(jax.random.split(key)))


def _num_outputs(model: Model, params, state, input_shape) -> int:
    out = jax.eval_shape(lambda p, s: model.apply(p, s, jnp.zeros((1, *input_shape), jnp.float32))[0], params, state)
    if len(out.shape) != 2:
        raise ValueError(f"{model.name} must return logits of shape (N, K); got {tuple(out.shape)} for N=1")
    return int(out.shape[1])


def prune_model(
    model,
    *,
    input_shape: Sequence[int],
    density: float,
    key: jax.Array,
    method: str = "ntksap",
    variables: dict | None = None,
    iterations: int | None = None,
    samples: int | None = None,
    num_inputs: int | None = None,
    data=None,
    num_classes: int | None = None,
    examples_per_class: int | None = None,
    zero_norm_scales: str = "one",
    reinit: str | Callable = "auto",
    on_collapse: str = "warn",
    off_path: str = "reallocate",
    schedule: str = "exponential",
    distribution: str = "global",
    invert: bool = False,
    prunable: Callable | None = None,
    mesh=None,
    progress: Callable | None = None,
    **scorer_kwargs,
) -> PrunedModel:
    """Prune any model at initialization with any registered method.

    Args:
      model: a ``flax.linen`` module (any call convention), an ``nnx.Module``, or a
        :class:`ntksap_jax.model.Model` (:func:`~ntksap_jax.model.from_apply_fn` for Equinox,
        stax, Haiku; :func:`~ntksap_jax.model.from_nnx` with a factory to re-draw an NNX
        model with its own initializers).
      input_shape: one example's shape, e.g. ``(32, 32, 3)``.
      density: final kept fraction of the prunable weights, in (0, 1].
      key: PRNG key. Without ``variables``, a linen model is initialised as
        :func:`ntksap_jax.init_model` does (``init_key, prune_key = split(key)``); otherwise
        ``key`` is the pruning key.
      method: a registered scorer (:func:`ntksap_jax.list_scorers`).
      variables: ``{"params", "batch_stats"?}`` to prune (linen); default: initialise here
        (linen), or the module's own (NNX instance, ``apply_fn`` model).
      iterations: pruning rounds; default the method's ``default_iterations``
        (:func:`ntksap_jax.scores.get_method`: NTK-SAP 20 as on CIFAR-10, SynFlow and iterative
        SNIP 100, the others 1).
      samples, num_inputs: NTK-SAP's ``R`` (default 5) and Gaussian inputs per repeat
        (default ``10 × K``, ``K`` the number of outputs); ``num_inputs`` also sets the
        data-driven methods' batch.
      data: ``(x, y)`` labelled examples for SNIP, iterative SNIP and GraSP (without it they
        score Gaussian inputs with random labels, and warn).
      num_classes: for the data-driven methods; default the model's output width.
      examples_per_class: score the data-driven methods on a class-balanced subset of ``data``:
        exactly this many examples of each of the ``num_classes`` classes, chosen by
        :func:`ntksap_jax.data.class_balanced` with a seed drawn from ``key`` (same key, same
        subset); ``None`` (default): ``data`` as given.
      zero_norm_scales: ``"one"`` (default): normalisation scales that are all zero are scored
        at 1 (:func:`unit_norm_scales`; named in ``report["unit_scored_norm_scales"]``);
        ``"keep"``: score them as they are.
      reinit: NTK-SAP's weight re-draws: ``"auto"`` (kaiming on the zoo and on models that
        cannot re-initialise, the model's own initializers otherwise), ``"kaiming"``,
        ``"init"`` or a callable (see :func:`ntksap_jax.scores.make_reinit`).
      on_collapse: ``"warn"`` (default), ``"raise"`` or ``"ignore"`` (see :func:`ntksap_jax.prune`).
      off_path: ``"reallocate"`` (default): kept weights on no input-output path (iterative
        pruning leaves a few: a round keeps the weights out of a unit whose last incoming
        weights it prunes) give their budget to the next-ranked weights on a path, so the
        mask keeps exactly ``round(density · N)`` weights and all of them matter;
        ``report["reallocated"]`` says how many moved. ``"keep"``: the official algorithm's
        mask as it comes out (:func:`ntksap_jax.prune`'s default; the warning counts them).
      schedule, distribution, invert, mesh, progress: as :func:`ntksap_jax.prune`.
      prunable: ``prunable(path, leaf) -> bool``; default the model's filter (linen/NNX:
        leaves named ``kernel`` with ``ndim > 1``; ``apply_fn``: every leaf with ``ndim > 1``).
      **scorer_kwargs: more options of the method's scorer (e.g. ``eps``, ``estimator``,
        ``batch_size``, ``float64``).

    Returns:
      :class:`PrunedModel`. ``report`` has ``model``, ``kind``, ``method``, ``density_target``,
      ``density_actual``, ``total_prunable``, ``total_kept``, ``layers`` (``name``, ``shape``,
      ``kept``, ``total``, ``density``, ``effective`` in forward order), ``collapsed_layers``,
      ``zero_score_layers``, ``disconnected``, ``effective_kept``, ``off_path_kept``,
      ``reallocated``, ``unit_scored_norm_scales``, ``iterations``, ``scorer`` (the configuration) and
      ``seconds``.

    Raises:
      ValueError: a bad argument (the message names it);
      ntksap_jax.prune.DegenerateMaskError: ``on_collapse="raise"`` and a degenerate mask.

    Example::

      result = prune_model(vit, input_shape=(32, 32, 3), density=0.1, key=jax.random.key(0),
                           iterations=3)
      masked_vars = {"params": result.params}
    """
    if zero_norm_scales not in ("one", "keep"):
        raise ValueError(f"zero_norm_scales must be 'one' or 'keep'; got {zero_norm_scales!r}")
    shape = tuple(int(s) for s in input_shape)
    spec = as_model(model, shape)
    if variables is None and spec.variables is None:
        init_key, key = split_key(key)
        variables = jax.jit(spec.init)(init_key)
    elif variables is None:
        variables = spec.variables
    params = variables["params"]
    state = variables.get("batch_stats") or None
    masks0 = init_masks(params, prunable or spec.prunable)
    if count_total(masks0) == 0:
        raise ValueError(f"{spec.name}: no prunable weights (the filter selected no leaf); pass prunable=")
    scoring_params, unit_scaled = (unit_norm_scales(spec, params) if zero_norm_scales == "one" else (params, []))

    m = get_method(method)
    iterations = m.default_iterations if iterations is None else iterations
    if examples_per_class is not None:
        data, num_classes = _balanced(m, spec, params, state, shape, data, num_classes, num_inputs,
                                      examples_per_class, key)
    config = _scorer_config(m, spec, scoring_params, state, shape, samples=samples, num_inputs=num_inputs,
                            data=data, num_classes=num_classes, reinit=reinit, extra=scorer_kwargs)
    score_fn = m.factory(spec, shape, **config)
    start = time.perf_counter()
    result = prune(score_fn, scoring_params, masks0, density=density, iterations=iterations, key=key,
                   batch_stats=state, schedule=schedule, distribution=distribution, invert=invert, progress=progress,
                   mesh=mesh, on_collapse=on_collapse, model=spec, input_shape=shape,
                   off_path=off_path if distribution == "global" else "keep")
    seconds = time.perf_counter() - start
    masks = result.masks
    diag = result.diagnostics
    order = forward_order(spec, params, state, jnp.zeros((1, *shape), jnp.float32))
    rows = density_report(masks, order)
    kept, total = count_kept(masks), count_total(masks)
    report = {
        "model": spec.name,
        "kind": spec.kind,
        "method": method,
        "density_target": float(density),
        "density_actual": kept / total,
        "total_prunable": total,
        "total_kept": kept,
        "layers": rows,
        "collapsed_layers": diag["collapsed_layers"],
        "zero_score_layers": diag["zero_score_layers"],
        "disconnected": diag["disconnected"],
        "effective_kept": kept - diag["off_path_kept"],
        "off_path_kept": diag["off_path_kept"],
        "unit_scored_norm_scales": unit_scaled,
        "reallocated": diag.get("reallocated", 0),
        "iterations": int(iterations),
        "scorer": {k: v for k, v in config.items() if k != "data"},
        "seconds": seconds,
    }
    if data is not None:
        report["scorer"]["data"] = f"{len(data[1])} labelled examples"
    if getattr(score_fn, "micro_batches", None) is not None:  # NTK-SAP: {batch size: chunk or None}, as used
        report["scorer"]["micro_batches"] = {str(n): mb for n, mb in score_fn.micro_batches.items()}
    if examples_per_class is not None:
        report["scorer"]["examples_per_class"] = int(examples_per_class)
    params_out = apply_masks_jit(params, masks)  # one program, not one multiply per leaf
    return PrunedModel(masks=spec.to_native(masks), params=spec.to_native(params_out), report=report,
                       history=result.history, model=spec, variables=dict(variables), library_masks=masks)


def _balanced(method, spec, params, state, shape, data, num_classes, num_inputs, k, key):
    """``(data, num_classes)`` with ``data`` cut to ``k`` examples of every class (checked)."""
    from ntksap_jax.data.balanced import class_balanced

    if not method.needs_data:
        raise ValueError(f"examples_per_class applies to the data-driven methods; {method.name!r} scores no data")
    if data is None:
        raise ValueError(f"examples_per_class={k!r} needs data=(x, y) to choose from")
    if num_inputs is not None:
        raise ValueError(f"give num_inputs or examples_per_class, not both; got num_inputs={num_inputs!r}, "
                         f"examples_per_class={k!r}")
    if num_classes is None:
        num_classes = _num_outputs(spec, params, state, shape)
    seed = int(jax.random.randint(jax.random.fold_in(key, 0xBA1), (), 0, 2**31 - 1))
    x, y = class_balanced(data[0], data[1], k, num_classes=num_classes, seed=seed)
    return (x, y), num_classes


def _scorer_config(method, spec, params, state, shape, *, samples, num_inputs, data, num_classes, reinit, extra):
    """The scorer's options: what ``method`` declares it takes (:class:`ntksap_jax.scores.Method`)."""
    config = dict(extra)
    given = {"samples": samples, "num_inputs": num_inputs, "data": data}
    for name, value in given.items():
        if value is not None and name not in method.options:
            takes = [n for n in given if n in method.options]
            raise ValueError(f"method {method.name!r} takes no {name} (it takes {', '.join(takes) or 'none of them'}: "
                             f"see get_method({method.name!r}).options); got {name}={value!r}")
    if "samples" in method.options:
        config.setdefault("samples", 5 if samples is None else samples)
    if "num_inputs" in method.options and (num_inputs is not None or not method.needs_data):
        k = _num_outputs(spec, params, state, shape)
        config.setdefault("num_inputs", 10 * k if num_inputs is None else num_inputs)
    if "reinit" in method.options:
        config.setdefault("reinit", reinit)
    if method.needs_data:
        config["num_classes"] = num_classes if num_classes is not None else _num_outputs(spec, params, state, shape)
        if data is not None:
            config["data"] = data
    return config
