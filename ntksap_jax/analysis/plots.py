"""Plots of a :func:`ntksap_jax.analysis.spectrum_study`: the spectra and the per-layer densities.

matplotlib is imported only when a plot is drawn (``pip install 'ntksap-jax[validate]'``);
figures are drawn without pyplot (no global backend state) and written atomically.

Example::

    study = spectrum_study(model, variables, {"ntksap": m1, "random": m2}, x)
    plot_spectrum(study, "out/spectrum.png")
    plot_densities(study, "out/densities.png")
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import numpy as np

from ntksap_jax._io import atomic_write

__all__ = ["plot_spectrum", "plot_densities"]


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
        fig.legend(loc="outside lower center", fontsize="small", frameon=False,
                   ncols=min(2, len(series) + collapsed_any))
    _save_atomic(fig, path)
