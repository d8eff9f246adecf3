"""NTK spectra of masked networks: :func:`ntk_spectrum` for one mask, :func:`spectrum_study` for several.

A mask changes the network's function ``f(θ⊙m, x)`` and, through BatchNorm, the
statistics its layers see. Every kernel computed here uses the same convention as
NTK-SAP's own scorer: BatchNorm statistics are those of the *masked* network on the
batch (each BatchNorm's mean and unbiased variance of its own input, as the official code;
see :func:`ntksap_jax.model.calibrated_batch_stats`), then fixed, so the kernel is the
per-example NTK of an eval-mode network (:func:`ntksap_jax.model.masked_apply_fn`).
Differentiating ``f(θ⊙m, x)`` w.r.t. ``θ`` gives ``J diag(m)``, so the kernel is
``Θ_m = J diag(m) Jᵀ``: pruned weights contribute nothing. The Gram itself is
:func:`ntksap_jax.ntk.ntk_gram` (per example, in memory-bounded Jacobian blocks); its
eigenvalues are taken in float64 on the host.

Example::

    x = jax.random.normal(jax.random.key(0), (64, 32, 32, 3))
    res = ntk_spectrum(model, variables, masks, x, key=jax.random.key(1), draws=3)
    res.eigenvalues.shape, res.trace, res.condition_number      # (640,), ...
    study = spectrum_study(model, variables, {"ntksap": m1, "random": m2}, x)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ntksap_jax._checks import is_none, positive_int
from ntksap_jax.masks import check_structure, density_report, init_masks, masked_density
from ntksap_jax.model import as_model, calibrated_batch_stats, forward_order, masked_apply_fn
from ntksap_jax.ntk import gram_chunk_size, ntk_gram
from ntksap_jax.scores.ntksap import kaiming_normal_reinit

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]

__all__ = ["SpectrumResult", "ntk_spectrum", "spectrum_study"]


class SpectrumResult(NamedTuple):
    """Eigenvalues of the NTK Gram of a masked network (see :func:`ntk_spectrum`).

    Attributes:
      eigenvalues: ``(N·K,)`` float64, descending; the mean over draws of each draw's sorted
        eigenvalues. Eigenvalues at or below the numerical-zero threshold are exactly ``0``.
      trace: mean over draws of ``tr Θ = ‖J diag(m)‖²_F`` (a sum over the ``N·K`` outputs).
      condition_number: ``eigenvalues[0] / eigenvalues[-1]``; ``inf`` when the smallest is 0
        (numerically singular Gram).
      effective_rank: ``exp(entropy(λ / Σλ))`` over the positive ``eigenvalues`` (Roy & Vetterli);
        between 1 and ``rank``.
      rank: number of positive ``eigenvalues`` (the largest numerical rank over draws).
      density: kept fraction of the prunable weights (1.0 for the dense network).
      traces_per_draw: ``(draws,)`` float64.
      eigenvalues_per_draw: ``(draws, N·K)`` float64, each row descending and thresholded.
      num_examples: ``N``.
      num_outputs: ``K``.
    """

    eigenvalues: np.ndarray
    trace: float
    condition_number: float
    effective_rank: float
    rank: int
    density: float
    traces_per_draw: np.ndarray
    eigenvalues_per_draw: np.ndarray
    num_examples: int
    num_outputs: int


def _blocked_gram(apply_fn: ApplyFn, params: PyTree, x: jax.Array, chunk: int) -> jax.Array:
    """The ``(N·K, N·K)`` Gram of the eval-mode network, per example, ``chunk`` examples per
    Jacobian block (:func:`ntksap_jax.ntk.ntk_gram`)."""
    return ntk_gram(apply_fn, params, x, per_example=True, chunk_size=chunk)


def _gram_program(model, chunk: int):
    """One jitted ``gram(params, masks, batch_stats, x, key, draw)``; masks and draw are traced."""

    def gram(params, masks, batch_stats, x, key, draw):
        if key is not None:
            layout = as_model(model, tuple(x.shape[1:])).layout
            params = kaiming_normal_reinit(jax.random.fold_in(key, draw), params, masks, layout=layout)
        stats = calibrated_batch_stats(model, params, masks, batch_stats, x)
        return _blocked_gram(masked_apply_fn(model, masks, stats), params, x, chunk)

    return jax.jit(gram)


def _output_width(model, params: PyTree, batch_stats: PyTree | None, x: jax.Array) -> int:
    spec = as_model(model, tuple(x.shape[1:]))
    out = jax.eval_shape(lambda p, s, xb: spec.apply(p, s, xb)[0], params, batch_stats or None, x[:1])
    if len(out.shape) != 2:
        raise ValueError(f"the model must return logits of shape (N, K); got {tuple(out.shape)}")
    return int(out.shape[1])


def _num_params(params: PyTree) -> int:
    return int(sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree.leaves(params)))


def _check_args(x, key, draws, chunk_size) -> None:
    if jnp.ndim(x) < 2 or jnp.shape(x)[0] < 1:
        raise ValueError(f"x must be a batch (N, ...) with N >= 1; got shape {tuple(jnp.shape(x))}")
    positive_int(draws, "draws")
    if draws > 1 and key is None:
        raise ValueError(
            f"draws={draws} averages over fresh weight draws and needs a PRNG key "
            "(key=jax.random.key(...)); with key=None the given params are used (draws=1)"
        )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive integer or None; got {chunk_size!r}")


def _setup(model, params: PyTree, batch_stats: PyTree | None, x: jax.Array, chunk_size: int | None):
    """``(k, dtype, num_params, program)`` shared by every mask of one network and batch."""
    k = _output_width(model, params, batch_stats, x)
    dtype = jnp.result_type(*jax.tree.leaves(params))
    num_params = _num_params(params)
    n = int(x.shape[0])
    if chunk_size is not None:
        chunk = min(int(chunk_size), n)
    else:
        chunk = gram_chunk_size(n, k, num_params, np.dtype(dtype).itemsize)
    return k, dtype, num_params, _gram_program(model, chunk)


def _threshold(lam: np.ndarray, dtype) -> np.ndarray:
    """Zero the eigenvalues that rounding cannot tell from 0 (``lam`` descending, float64).

    The Gram is PSD in exact arithmetic, so negative eigenvalues are pure rounding noise, and
    the null-space eigenvalues spread symmetrically around 0 with that same size. The
    threshold is the larger of ``eps(dtype) · λ_max`` (the resolution of the dtype the Gram
    was computed in) and twice the size of the most negative eigenvalue (the noise actually
    present). Values at or below it, negative ones included, are set to exactly 0.
    """
    if not lam.size:
        return lam
    lam_max = max(float(lam[0]), 0.0)
    tol = max(float(np.finfo(dtype).eps) * lam_max, 2.0 * max(-float(lam[-1]), 0.0))
    return np.where(lam > tol, lam, 0.0)


def _summarise(eigs_per_draw: np.ndarray, traces: np.ndarray, density: float, n: int, k: int) -> SpectrumResult:
    lam = eigs_per_draw.mean(axis=0)
    lam_min = float(lam[-1])
    cond = float(lam[0] / lam_min) if lam_min > 0 else math.inf
    pos = lam[lam > 0]
    if pos.size:
        p = pos / pos.sum()
        erank = float(np.exp(-np.sum(p * np.log(p))))
    else:
        erank = 0.0
    return SpectrumResult(
        eigenvalues=lam,
        trace=float(traces.mean()),
        condition_number=cond,
        effective_rank=erank,
        rank=int(pos.size),
        density=float(density),
        traces_per_draw=traces,
        eigenvalues_per_draw=eigs_per_draw,
        num_examples=n,
        num_outputs=k,
    )


def _spectrum(program, params, masks, batch_stats, x, key, draws, density, k) -> SpectrumResult:
    n = int(x.shape[0])
    dtype = jnp.result_type(*jax.tree.leaves(params))
    eigs, traces = [], []
    for d in range(draws):
        with jax.default_matmul_precision("highest"):  # no TF32 / bf16 passes on GPU and TPU
            g = program(params, masks, batch_stats, x, key, np.int32(d))
        g = np.asarray(g, dtype=np.float64)
        g = 0.5 * (g + g.T)
        traces.append(float(np.trace(g)))
        eigs.append(_threshold(np.linalg.eigvalsh(g)[::-1], dtype))
    return _summarise(np.stack(eigs), np.asarray(traces), density, n, k)


def ntk_spectrum(
    model,
    variables: Mapping[str, PyTree],
    masks: PyTree | None,
    x: jax.Array,
    *,
    key: jax.Array | None = None,
    draws: int = 1,
    chunk_size: int | None = None,
) -> SpectrumResult:
    """Eigenvalues of the ``(N·K) × (N·K)`` NTK Gram ``Θ_m = J diag(m) Jᵀ`` of a masked network.

    For each weight draw: BatchNorm statistics of the masked network on ``x``
    (:func:`ntksap_jax.model.calibrated_batch_stats`), then the per-example NTK of the eval-mode
    network :func:`ntksap_jax.model.masked_apply_fn` with every param differentiated (biases and
    BN scales too; pruned weights contribute nothing). Eigenvalues come from
    ``numpy.linalg.eigvalsh`` in float64 on the host; the Gram itself is computed in the
    params' dtype at full matmul precision.

    Weights: with ``key=None`` the given params are used (``draws`` must be 1). With a key,
    draw ``d = 0 … draws-1`` uses ``kaiming_normal_reinit(jax.random.fold_in(key, d), params,
    masks)`` (NTK-SAP's weight-agnostic view: fresh kaiming-normal kernels where ``masks`` is
    not ``None``; biases and BN params stay as given), and the sorted eigenvalue vectors are
    averaged. One compiled program serves every draw (the draw index is a traced argument).

    Numerically zero eigenvalues: rounding makes the null-space eigenvalues of a singular Gram
    come out as tiny numbers of either sign (about ``0.1–0.2 · eps · λ_max`` in float32 at full
    matmul precision). Each draw's eigenvalues at or below ``tol = max(eps(dtype) · λ_max,
    2 · |most negative eigenvalue|)`` (``eps`` of the params' dtype; a PSD matrix has no
    negative eigenvalue, so their size measures the noise) are set to exactly 0, and
    ``condition_number`` is then ``inf`` and ``rank < N·K``. So in float32, eigenvalues
    below about ``1.2e-7 · λ_max`` (condition numbers beyond ~10⁷) are not resolved; use
    float64 params and inputs (``jax.enable_x64``) for more.

    Memory: the Gram is :func:`ntksap_jax.ntk.ntk_gram` with ``per_example=True``, assembled
    from per-example Jacobian blocks of ``chunk_size`` examples (``chunk_size · K · P`` numbers
    each, at most two alive), contracted leaf by leaf. ``None`` picks the largest chunk whose
    block fits in :data:`ntksap_jax.ntk.MAX_BLOCK_BYTES` (1 GiB;
    :func:`ntksap_jax.ntk.gram_chunk_size`): for ResNet-20 (P = 272,474 with BN and biases),
    K = 10, float32 that is 98 examples, so N = 64 forms the whole ``J`` once (0.70 GB) and
    N = 256 takes 3 × 3 blocks of 98 examples (1.07 GB each) instead of a 2.8 GB ``J``.
    Smaller chunks trade time for memory: block row ``I`` recomputes every column block's
    Jacobian (``B + B²`` block Jacobians for ``B`` blocks). Each Jacobian row costs one
    single-example backward pass (eval mode: examples are independent), cheaper than
    whole-batch VJPs or NTK-vector products, which push every row through the whole batch.

    Args:
      model: a linen or NNX module or a :class:`ntksap_jax.model.Model` returning ``(N, K)`` logits.
      variables: ``{"params": ..., "batch_stats": ...}`` (``batch_stats`` optional).
      masks: mask pytree (``None`` leaves dense), or ``None`` for the dense network (all-ones
        masks on the default prunable kernels, so that draws re-draw them).
      x: inputs ``(N, H, W, C)`` (any ``(N, ...)`` the model accepts), e.g. a Gaussian batch.
      key: PRNG key for weight draws, or ``None`` to use the given params.
      draws: number of weight draws to average (needs ``key`` when > 1).
      chunk_size: examples per Jacobian block (see Memory), or ``None``.

    Returns:
      :class:`SpectrumResult`; ``eigenvalues`` has shape ``(N·K,)``, float64, descending.

    Raises:
      ValueError: ``draws > 1`` without a key, bad ``draws``/``chunk_size``/``x``, or masks
        that do not fit the params.

    Example::

      x = jax.random.normal(jax.random.key(0), (64, 32, 32, 3))
      res = ntk_spectrum(model, variables, masks, x, key=jax.random.key(1), draws=3)
      res.eigenvalues.shape          # (640,)
      res.trace, res.condition_number
    """
    _check_args(x, key, draws, chunk_size)
    params = variables["params"]
    batch_stats = variables.get("batch_stats")
    if masks is None:
        masks, density = init_masks(params), 1.0
    else:
        check_structure(params, masks)
        density = masked_density(masks)
    x = jnp.asarray(x)
    k, _, _, program = _setup(model, params, batch_stats, x, chunk_size)
    return _spectrum(program, params, masks, batch_stats, x, key, int(draws), density, k)


def _json_float(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _ones_like_masks(masks: PyTree) -> PyTree:
    return jax.tree.map(lambda m: None if m is None else jnp.ones_like(m), masks, is_leaf=is_none)


def _labelled_masks(params: PyTree, masks_by_label: Mapping[str, PyTree], include_dense: bool) -> dict:
    """``{label: masks}`` checked against ``params``, the dense network first when asked."""
    labelled = dict(masks_by_label)
    for label, masks in labelled.items():
        if not isinstance(label, str):
            raise ValueError(f"labels must be strings; got {label!r}")
        if masks is None:
            raise ValueError(f"masks for {label!r} is None; the dense network is include_dense=True")
        try:
            check_structure(params, masks)
        except ValueError as e:
            raise ValueError(f"masks {label!r}: {e}") from None
    if include_dense:
        if "dense" in labelled:
            raise ValueError(
                'the label "dense" is taken by the dense network; rename that mask or pass include_dense=False'
            )
        template = next(iter(labelled.values())) if labelled else init_masks(params)
        labelled = {"dense": _ones_like_masks(template), **labelled}
    if not labelled:
        raise ValueError("nothing to do: no masks and include_dense=False")
    return labelled


def _study_entry(res: SpectrumResult, rows: list[dict]) -> dict:
    """One label's JSON-ready entry (``relative_trace`` filled in later)."""
    return {
        "eigenvalues": [float(v) for v in res.eigenvalues],
        "trace": res.trace,
        "relative_trace": None,
        "condition_number": _json_float(res.condition_number),
        "effective_rank": res.effective_rank,
        "rank": res.rank,
        "density": res.density,
        "traces_per_draw": [float(t) for t in res.traces_per_draw],
        "layers": [{key_: r[key_] for key_ in ("name", "kept", "total", "density")} for r in rows],
    }


def spectrum_study(
    model,
    variables: Mapping[str, PyTree],
    masks_by_label: Mapping[str, PyTree],
    x: jax.Array,
    *,
    key: jax.Array | None = None,
    draws: int = 1,
    include_dense: bool = True,
    chunk_size: int | None = None,
) -> dict:
    """NTK spectra of several masks of one network (and the dense one), as a JSON-ready dict.

    Runs :func:`ntk_spectrum` for each mask with the same inputs, key and draws (so with a
    key, every mask sees the same weight draws), sharing one compiled program between masks
    of the same structure. The dense network is the all-ones mask on the masks' prunable
    leaves.

    Args:
      model, variables, x, key, draws, chunk_size: as :func:`ntk_spectrum`.
      masks_by_label: ``{label: masks}``, e.g. ``{"ntksap": m1, "random": m2}``.
      include_dense: add the dense network first, under the label ``"dense"`` (which a mask
        label must then not use).

    Returns:
      ``{"config": {...}, "layers": [names], "spectra": {label: {...}}}`` with

      * ``config``: ``num_examples`` N, ``num_outputs`` K, ``draws``, ``keyed`` (weights
        re-drawn), ``dtype``, ``input_shape``, ``num_params``, ``num_prunable``;
      * ``layers``: prunable layer names in forward order (:func:`ntksap_jax.model.forward_order`);
      * per label: ``eigenvalues`` (``N·K`` floats, descending, mean over draws), ``trace``,
        ``relative_trace`` (trace / dense trace; ``None`` without the dense run),
        ``condition_number`` (``None`` when infinite: JSON has no infinity), ``effective_rank``,
        ``rank``, ``density``, ``traces_per_draw``, and ``layers``: per-layer rows
        ``{"name", "kept", "total", "density"}`` in forward order.

    Example::

      study = spectrum_study(model, variables, {"ntksap": m1, "random": m2}, x,
                             key=jax.random.key(0), draws=3)
      json.dump(study, open("spectrum.json", "w"))
      plot_spectrum(study, "spectrum.png"); plot_densities(study, "densities.png")
    """
    _check_args(x, key, draws, chunk_size)
    params = variables["params"]
    batch_stats = variables.get("batch_stats")
    labelled = _labelled_masks(params, masks_by_label, include_dense)
    x = jnp.asarray(x)
    k, dtype, num_params, program = _setup(model, params, batch_stats, x, chunk_size)
    order = forward_order(as_model(model, tuple(x.shape[1:])), params, batch_stats or None, x[:1])

    spectra: dict[str, dict] = {}
    layer_names: list[str] | None = None
    for label, masks in labelled.items():
        density = 1.0 if (include_dense and label == "dense") else masked_density(masks)
        res = _spectrum(program, params, masks, batch_stats, x, key, int(draws), density, k)
        rows = density_report(masks, order)
        if layer_names is None:
            layer_names = [r["name"] for r in rows]
        spectra[label] = _study_entry(res, rows)
    if include_dense:
        dense_trace = spectra["dense"]["trace"]
        for entry in spectra.values():
            entry["relative_trace"] = entry["trace"] / dense_trace if dense_trace > 0 else None
    first = next(iter(labelled.values()))
    return {
        "config": {
            "num_examples": int(x.shape[0]),
            "num_outputs": k,
            "draws": int(draws),
            "keyed": key is not None,
            "dtype": str(np.dtype(dtype)),
            "input_shape": [int(s) for s in x.shape],
            "num_params": num_params,
            "num_prunable": int(sum(r["total"] for r in density_report(first))),
        },
        "layers": layer_names or [],
        "spectra": spectra,
    }
