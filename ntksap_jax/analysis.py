"""The NTK of a pruned network: the masked function, and the spectrum of its kernel.

A mask changes the network's function ``f(θ⊙m, x)`` and, through BatchNorm, the
statistics its layers see. Every kernel computed here uses the same convention as
NTK-SAP's own scorer: BatchNorm statistics are those of the *masked* network on the
batch (each BatchNorm's mean and unbiased variance of its own input, as the official code;
see :func:`ntksap_jax.scores.ntksap.bn_statistics`), then fixed, so the kernel is the
per-example NTK of an eval-mode network. Differentiating ``f(θ⊙m, x)`` w.r.t. ``θ``
gives ``J diag(m)``, so the kernel is ``Θ_m = J diag(m) Jᵀ``: pruned weights
contribute nothing.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ntksap_jax._io import atomic_write
from ntksap_jax.masks import apply_masks, check_structure, density_report, init_masks, masked_density
from ntksap_jax.model import as_model, forward_order
from ntksap_jax.scores.ntksap import bn_statistics, kaiming_normal_reinit

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]

__all__ = [
    "masked_apply_fn",
    "calibrated_batch_stats",
    "SpectrumResult",
    "ntk_spectrum",
    "spectrum_study",
    "plot_spectrum",
    "plot_densities",
]


def masked_apply_fn(model, masks: PyTree | None, batch_stats: PyTree | None) -> ApplyFn:
    """``f(params, x) = model(params ⊙ masks, x)`` in eval mode with ``batch_stats`` fixed.

    Args:
      model: a linen or NNX module or a :class:`ntksap_jax.model.Model` (any call convention).
      masks: mask pytree (``None`` leaves dense), or ``None`` for the dense network.
      batch_stats: the BatchNorm statistics to use (``None``/empty for models without BN).

    Returns:
      ``apply_fn(params, x) -> (N, K)`` logits, ready for :func:`ntksap_jax.empirical_ntk`.

    Example::

      stats = calibrated_batch_stats(model, params, masks, variables["batch_stats"], x)
      f = masked_apply_fn(model, masks, stats)
      theta = empirical_ntk(f, params, x)        # (N, N, K, K)
    """

    def apply_fn(params: PyTree, x: jax.Array) -> jax.Array:
        p = params if masks is None else apply_masks(params, masks)
        return as_model(model, tuple(x.shape[1:])).apply(p, batch_stats or None, x)[0]

    return apply_fn


def calibrated_batch_stats(
    model, params: PyTree, masks: PyTree | None, batch_stats: PyTree | None, x: jax.Array
) -> PyTree | None:
    """BatchNorm statistics of the masked network ``θ⊙m`` on the batch ``x`` (no gradient).

    Each BatchNorm's mean and unbiased variance of its input in the masked network (NTK-SAP's
    statistics: the official code's running statistics after a momentum-1.0 pass). Any model
    with linen or NNX BatchNorm layers works; no ``bn_momentum`` field is needed.
    ``batch_stats`` only supplies the structure; returns it unchanged for models
    without BatchNorm.

    Example::

      stats = calibrated_batch_stats(model, params, masks, variables["batch_stats"], x)
    """
    p = params if masks is None else apply_masks(params, masks)
    return bn_statistics(model, p, batch_stats, x)


# --------------------------------------------------------------------------- spectrum

#: Largest Jacobian block (``chunk · K · P`` entries) that :func:`ntk_spectrum` builds at once
#: when ``chunk_size`` is not given.
MAX_BLOCK_BYTES = 2**30


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


def _per_example_jacobian(apply_fn: ApplyFn, params: PyTree, xb: jax.Array) -> list[jax.Array]:
    """Leaves ``(c·K, P_leaf)``: rows ``(i, a)`` are ``∂f_a(x_i)/∂θ``, one example at a time.

    Valid because the network is evaluated in eval mode (examples are independent); each row
    costs one single-example backward pass instead of a whole-batch one.
    """

    def one(xi):
        def out(p):
            y = apply_fn(p, xi[None])
            if y.ndim != 2 or y.shape[0] != 1:
                raise ValueError(f"the model must return logits of shape (N, K); got {tuple(y.shape)} for N=1")
            return y[0]

        return jax.jacrev(out)(params)

    jac = jax.vmap(one)(xb)  # leaves (c, K, *shape)
    return [leaf.reshape(leaf.shape[0] * leaf.shape[1], -1) for leaf in jax.tree.leaves(jac)]


def _contract(a: list[jax.Array], b: list[jax.Array]) -> jax.Array:
    terms = [u @ v.T for u, v in zip(a, b)]
    return sum(terms[1:], terms[0])


def _blocked_gram(apply_fn: ApplyFn, params: PyTree, x: jax.Array, chunk: int, k: int) -> jax.Array:
    """The ``(N·K, N·K)`` Gram ``J Jᵀ`` built from Jacobian blocks of ``chunk`` examples.

    With ``chunk >= N`` the whole ``J`` is formed once. Otherwise block row ``I`` is
    ``J_I [J_1 … J_B]ᵀ``: each column block's Jacobian is recomputed (``B + B²`` block Jacobians
    in all), so at most two blocks (``2 · chunk · K · P`` numbers) are alive at a time.
    """
    n = x.shape[0]
    if chunk >= n:
        rows = _per_example_jacobian(apply_fn, params, x)
        return _contract(rows, rows)
    b = -(-n // chunk)
    pad = b * chunk - n  # padded examples give rows that are sliced off
    xp = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
    blocks = xp.reshape(b, chunk, *x.shape[1:])

    def block_row(xi):
        ri = _per_example_jacobian(apply_fn, params, xi)
        return jax.lax.map(lambda xj: _contract(ri, _per_example_jacobian(apply_fn, params, xj)), blocks)

    g = jax.lax.map(block_row, blocks)  # (B, B, chunk·K, chunk·K)
    g = g.transpose(0, 2, 1, 3).reshape(b * chunk * k, b * chunk * k)
    return g[: n * k, : n * k]


def _gram_program(model, chunk: int, k: int):
    """One jitted ``gram(params, masks, batch_stats, x, key, draw)``; masks and draw are traced."""

    def gram(params, masks, batch_stats, x, key, draw):
        if key is not None:
            layout = as_model(model, tuple(x.shape[1:])).layout
            params = kaiming_normal_reinit(jax.random.fold_in(key, draw), params, masks, layout=layout)
        stats = calibrated_batch_stats(model, params, masks, batch_stats, x)
        return _blocked_gram(masked_apply_fn(model, masks, stats), params, x, chunk, k)

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
    if isinstance(draws, bool) or not isinstance(draws, (int, np.integer)) or draws < 1:
        raise ValueError(f"draws must be a positive integer; got {draws!r}")
    if draws > 1 and key is None:
        raise ValueError(
            f"draws={draws} averages over fresh weight draws and needs a PRNG key "
            "(key=jax.random.key(...)); with key=None the given params are used (draws=1)"
        )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive integer or None; got {chunk_size!r}")


def _chunk(n: int, k: int, num_params: int, itemsize: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return min(int(chunk_size), n)
    return max(1, min(n, MAX_BLOCK_BYTES // max(1, k * num_params * itemsize)))


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


def _ones_like_masks(masks: PyTree) -> PyTree:
    return jax.tree.map(lambda m: None if m is None else jnp.ones_like(m), masks, is_leaf=lambda t: t is None)


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
    (:func:`calibrated_batch_stats`), then the per-example NTK of the eval-mode network
    :func:`masked_apply_fn` with every param differentiated (biases and BN scales too; pruned
    weights contribute nothing). Eigenvalues come from ``numpy.linalg.eigvalsh`` in float64 on
    the host; the Gram itself is computed in the params' dtype at full matmul precision.

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

    Memory: the Gram is assembled from per-example Jacobian blocks of ``chunk_size`` examples
    (``chunk_size · K · P`` numbers each, at most two alive), contracted leaf by leaf. ``None``
    picks the largest chunk whose block fits in :data:`MAX_BLOCK_BYTES` (1 GiB): for ResNet-20
    (P = 272,474 with BN and biases), K = 10, float32 that is 98 examples, so N = 64 forms the
    whole ``J`` once (0.70 GB) and N = 256 takes 3 × 3 blocks of 98 examples (1.07 GB each)
    instead of a 2.8 GB ``J``. Smaller chunks trade time for memory: block row ``I`` recomputes
    every column block's Jacobian (``B + B²`` block Jacobians for ``B`` blocks).
    Each Jacobian row costs one single-example backward pass (eval mode: examples are
    independent), cheaper than whole-batch VJPs or NTK-vector products, which push every row
    through the whole batch.

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
    k = _output_width(model, params, batch_stats, x)
    dtype = jnp.result_type(*jax.tree.leaves(params))
    chunk = _chunk(int(x.shape[0]), k, _num_params(params), np.dtype(dtype).itemsize, chunk_size)
    program = _gram_program(model, chunk, k)
    return _spectrum(program, params, masks, batch_stats, x, key, int(draws), density, k)


def _json_float(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


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
            raise ValueError('the label "dense" is taken by the dense network; rename that mask or pass include_dense=False')
        template = next(iter(labelled.values())) if labelled else init_masks(params)
        labelled = {"dense": _ones_like_masks(template), **labelled}
    if not labelled:
        raise ValueError("nothing to do: no masks and include_dense=False")

    x = jnp.asarray(x)
    n = int(x.shape[0])
    k = _output_width(model, params, batch_stats, x)
    dtype = jnp.result_type(*jax.tree.leaves(params))
    num_params = _num_params(params)
    chunk = _chunk(n, k, num_params, np.dtype(dtype).itemsize, chunk_size)
    program = _gram_program(model, chunk, k)
    order = forward_order(as_model(model, tuple(x.shape[1:])), params, batch_stats or None, x[:1])

    spectra: dict[str, dict] = {}
    layer_names: list[str] | None = None
    for label, masks in labelled.items():
        density = 1.0 if (include_dense and label == "dense") else masked_density(masks)
        res = _spectrum(program, params, masks, batch_stats, x, key, int(draws), density, k)
        rows = density_report(masks, order)
        if layer_names is None:
            layer_names = [r["name"] for r in rows]
        spectra[label] = {
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
    if include_dense:
        dense_trace = spectra["dense"]["trace"]
        for entry in spectra.values():
            entry["relative_trace"] = entry["trace"] / dense_trace if dense_trace > 0 else None
    first = next(iter(labelled.values()))
    return {
        "config": {
            "num_examples": n,
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


# --------------------------------------------------------------------------- plots


def _figure(figsize):
    try:
        from matplotlib.figure import Figure
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError as e:
        raise ImportError(
            "plotting needs matplotlib, which is not installed: pip install 'ntksap-jax[validate]'"
        ) from e
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)  # no pyplot, no global backend state
    return fig


def _save_atomic(fig, path) -> None:
    """``fig`` as a PNG at ``path``: a temp file in the same folder, then ``os.replace``."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=150), binary=True)


def _colours(labels: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    others = [lab for lab in labels if lab != "dense"]
    out = {lab: cmap(i % 10) for i, lab in enumerate(others)}
    out["dense"] = "black"
    return out


def _short(name: str) -> str:
    return name[: -len(".kernel")] if name.endswith(".kernel") else name


def _fmt(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "∞"
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"


def plot_spectrum(study: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Eigenvalue index vs eigenvalue (log scale) for each label of a :func:`spectrum_study`.

    The dense network is drawn in black. Each legend entry reads
    ``"label: density d, tr T (r× dense), κ C"``; numerically zero eigenvalues are not drawn
    (log scale) and the legend then adds ``rank r/n``. Written atomically (temp file in the
    same folder, then rename): nothing is left behind if writing fails.

    Args:
      study: the dict returned by :func:`spectrum_study` (or read back from its JSON).
      path: output PNG path.

    Raises:
      ImportError: matplotlib is missing (``pip install 'ntksap-jax[validate]'``).

    Example::

      plot_spectrum(spectrum_study(model, variables, {"ntksap": masks}, x), "out/spectrum.png")
    """
    spectra = study["spectra"]
    cfg = study.get("config", {})
    fig = _figure((8.0, 5.0 + 0.22 * len(spectra)))
    ax = fig.add_subplot()
    colours = _colours(list(spectra))
    for label, s in spectra.items():
        lam = np.asarray(s["eigenvalues"], dtype=np.float64)
        n = lam.size
        shown = np.where(lam > 0, lam, np.nan)
        text = f"{label}: density {s['density']:.3g}, tr {_fmt(s['trace'])}"
        if s.get("relative_trace") is not None and label != "dense":
            text += f" ({s['relative_trace']:.3g}× dense)"
        text += f", κ {_fmt(s.get('condition_number'))}"
        if s.get("rank", n) < n:
            text += f", rank {s['rank']}/{n}"
        ax.plot(
            np.arange(1, n + 1), shown, color=colours[label], lw=2.2 if label == "dense" else 1.6,
            zorder=3 if label == "dense" else 2, label=text,
        )
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue index (descending)")
    ax.set_ylabel("NTK eigenvalue")
    ax.grid(True, which="major", alpha=0.3)
    title = "NTK spectrum"
    if cfg:
        title += f": N={cfg.get('num_examples')} inputs × K={cfg.get('num_outputs')} outputs"
        draws = cfg.get("draws", 1)
        if cfg.get("keyed"):
            title += f", mean of {draws} weight draw{'s' if draws != 1 else ''}"
    ax.set_title(title)
    fig.legend(loc="outside lower center", fontsize="small", frameon=False)  # never covers a curve
    _save_atomic(fig, path)


def plot_densities(study: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Per-layer kept fraction (log y) vs layer in forward order, one series per mask.

    The dense network (all ones) is not drawn. A dashed line in each mask's colour marks its
    overall density; layers left with no weight (collapsed) are drawn as ``×`` on the bottom
    edge. Layer names (``.kernel`` dropped) label the x axis, rotated. Written atomically.

    Args:
      study: the dict returned by :func:`spectrum_study`.
      path: output PNG path.

    Raises:
      ImportError: matplotlib is missing (``pip install 'ntksap-jax[validate]'``).

    Example::

      plot_densities(study, "out/densities.png")
    """
    series = {lab: s for lab, s in study["spectra"].items() if lab != "dense"}
    names = list(study.get("layers") or [])
    if not names and study["spectra"]:
        names = [r["name"] for r in next(iter(study["spectra"].values()))["layers"]]
    fig = _figure((max(6.5, 0.32 * len(names) + 2.5), 5.5 + 0.12 * len(series)))
    ax = fig.add_subplot()
    colours = _colours(list(study["spectra"]))
    positive = [r["density"] for s in series.values() for r in s["layers"] if r["density"] > 0]
    floor = min(positive) / 2 if positive else 1e-3
    xs = np.arange(len(names))
    collapsed_any = False
    markers = "osD^vP*X"
    width = min(0.3, 0.1 * max(len(series) - 1, 0))  # dodge: series with equal densities stay visible
    for i, (label, s) in enumerate(series.items()):
        by_name = {r["name"]: r["density"] for r in s["layers"]}
        d = np.array([by_name.get(nm, np.nan) for nm in names], dtype=np.float64)
        c = colours[label]
        dx = xs + (i / max(len(series) - 1, 1) - 0.5) * width
        ax.plot(dx, np.where(d > 0, d, np.nan), marker=markers[i % len(markers)], ms=5, lw=1.3, alpha=0.85,
                color=c, label=f"{label} (overall {s['density']:.3g})")
        ax.axhline(s["density"], color=c, ls="--", lw=0.9, alpha=0.7)
        dead = d == 0
        if dead.any():
            collapsed_any = True
            ax.plot(dx[dead], np.full(dead.sum(), floor), ls="none", marker="x", ms=8, mew=2, color=c, clip_on=False)
    if collapsed_any:
        ax.plot([], [], ls="none", marker="x", mew=2, color="grey", label="layer collapsed (0 kept)")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.set_ylim(floor, 1.5)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 0.01 0.02 0.05 0.1 …
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(xs)
    ax.set_xticklabels([_short(nm) for nm in names], rotation=60, ha="right", fontsize="small")
    ax.set_xlabel("layer (forward order)")
    ax.set_ylabel("kept fraction of weights")
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title("Per-layer density (dashed: overall density)")
    if series:
        fig.legend(loc="outside lower center", fontsize="small", frameon=False, ncols=min(2, len(series) + collapsed_any))
    _save_atomic(fig, path)
