"""The accuracy studies' machinery: prune at initialization, train, report test top-1 vs density.

A :class:`Study` names its settings (a key -> a preset: model, data set, training), its methods
(a :class:`Variant` each: the registered scorer, its options, rounds and layer distribution) and
its quick / full sizes; ``benchmarks/accuracy_small.py`` (MLPs) and ``benchmarks/accuracy_conv.py``
(CNNs) are two. For each method, density ``0.8^k`` and seed, the setting's network is initialised
with :func:`ntksap_jax.steps.init_model`, pruned from that init with the prune key it returns, and
the masked init is trained with the preset's settings; the dense network is trained once per seed
as the reference. Per setting, ``<study>_<setting>.md`` (table), ``.json`` (every run) and
``.png`` (accuracy vs density) are rewritten atomically after each method. Progress goes to stderr.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
from typing import Mapping

from ntksap_jax._io import atomic_write, atomic_write_text

PRESET_T = "preset"  # Variant.iterations: the preset's NTK-SAP rounds


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compared method: ``get_scorer(scorer)(model, shape, **options)``, pruned in ``iterations``
    rounds (:data:`PRESET_T`: the preset's NTK-SAP ``T``) with ``distribution`` over layers."""

    label: str
    scorer: str
    iterations: int | str = 1
    options: Mapping = dataclasses.field(default_factory=dict)
    distribution: str = "global"


@dataclasses.dataclass(frozen=True)
class Study:
    """A study: ``name`` (file prefix), ``settings`` (key -> preset name), ``variants`` (method ->
    :class:`Variant`, in table order), ``quick`` / ``full`` sizes (``seeds``, ``ks``, ``epochs``:
    None = the preset's), data methods' batch (``balanced``: ``examples_per_class`` of every class,
    else the first ``10 × classes`` of the seed's first shuffled epoch) and ``reference``: the method
    each one is compared with seed by seed (None: no paired table)."""

    name: str
    settings: Mapping[str, str]
    variants: Mapping[str, Variant]
    quick: Mapping
    full: Mapping
    setting_option: str = "--datasets"
    balanced: bool = False
    examples_per_class: int = 10
    reference: str | None = None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ files


def atomic_save_png(fig, path: str) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=150), binary=True)


# ------------------------------------------------------------------------------------------ stats


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof = 1; None for a single value)."""
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) if len(values) > 1 else None)


def cell(values: list[float]) -> str:
    if not values:
        return "—"
    m, s = mean_std([100 * v for v in values])
    return f"{m:.2f}" if s is None else f"{m:.2f} ± {s:.2f}"


def summarise(record: dict) -> dict:
    """``{method: {k: {"mean", "std", "n", "collapsed_seeds"}}}`` and the dense row, accuracies in %."""
    out = {}
    for run in record["runs"]:
        out.setdefault(run["method"], {}).setdefault(run["k"], []).append(run)
    summary = {}
    for method, by_k in out.items():
        summary[method] = {}
        for k, runs in sorted(by_k.items()):
            m, s = mean_std([100 * r["test_top1"] for r in runs])
            summary[method][k] = {"mean": m, "std": s, "n": len(runs),
                                  "collapsed_seeds": sum(1 for r in runs if r["collapsed_layers"]),
                                  "disconnected_seeds": sum(1 for r in runs if r.get("disconnected"))}
    dense = [100 * r["test_top1"] for r in record["dense"]]
    if dense:
        m, s = mean_std(dense)
        summary["dense"] = {"mean": m, "std": s, "n": len(dense)}
    return summary


# ------------------------------------------------------------------------------------------ table and plot


def setting_of(record: dict) -> str:
    """The setting's key (``digits``, ``lenet5``, ...); records before the conv study call it ``dataset``."""
    return record.get("setting", record["dataset"])


def format_table(record: dict) -> str:
    cfg = record["config"]
    ks = cfg["ks"]
    methods = [m for m in cfg["methods"] if any(r["method"] == m for r in record["runs"])]
    by = {}
    for r in record["runs"]:
        by.setdefault((r["method"], r["k"]), []).append(r)
    best = {}
    for k in ks:
        means = {m: statistics.fmean(r["test_top1"] for r in by[(m, k)]) for m in methods if (m, k) in by}
        if means:
            best[k] = max(means.values())
    header = "| method | " + " | ".join(f"{100 * 0.8 ** k:.2f}% (0.8^{k})" for k in ks) + " |"
    labels = cfg.get("labels", {})
    lines = [f"### {setting_of(record)} ({cfg['preset']}): test top-1 (%), mean ± std over seeds", "",
             header, "|---|" + "---|" * len(ks)]
    collapsed_any = disconnected_any = False
    for m in methods:
        cells = []
        for k in ks:
            runs = by.get((m, k), [])
            text = cell([r["test_top1"] for r in runs])
            if runs and len(runs) < len(cfg["seeds"]):
                text += f" (n={len(runs)})"
            if runs and statistics.fmean(r["test_top1"] for r in runs) == best.get(k):
                text = f"**{text}**"
            c = sum(1 for r in runs if r["collapsed_layers"])
            if c:
                collapsed_any = True
                text += f" †{c}"
            dis = sum(1 for r in runs if r.get("disconnected") and not r["collapsed_layers"])
            if dis:
                disconnected_any = True
                text += f" ‡{dis}"
            cells.append(text)
        lines.append(f"| {labels.get(m, m)} | " + " | ".join(cells) + " |")
    if record["dense"]:
        d = cell([r["test_top1"] for r in record["dense"]])
        lines.append("| dense (100%, reference) | " + " | ".join([d] * len(ks)) + " |")
    lines.append("")
    lines += footer_lines(record, collapsed_any, disconnected_any)
    return "\n".join(lines) + "\n"


def rounds_line(cfg: dict) -> str:
    """The footer's line on each method's pruning rounds and scoring data."""
    it, labels, variants = cfg["iterations"], cfg.get("labels", {}), cfg.get("variants", {})
    parts = []
    for m in cfg["methods"]:
        v = variants.get(m, {})
        extra = [f"{k} {val}" for k, val in v.get("options", {}).items()]
        if v.get("distribution", "global") != "global":
            extra.append(f"{v['distribution']} layer densities")
        parts.append(f"{labels.get(m, m)} {it.get(m, 1)}" + (f" ({', '.join(extra)})" if extra else ""))
    ntk = cfg["ntksap_scorer"]
    data = cfg.get("data_methods", ["snip", "grasp"])
    batch = cfg.get("prune_batch_kind", "the first of the seed's shuffled training set")
    return (f"Pruning rounds: {', '.join(parts)}. NTK-SAP: R = {ntk['samples']}, {ntk['num_inputs']} Gaussian "
            f"inputs; {' / '.join(labels.get(m, m) for m in data)} score {cfg['prune_batch']} real labelled "
            f"training images ({batch}). Masks as `prune` returns them (off_path 'keep': weights left off every "
            "input-output path are not reallocated).")


def footer_lines(record: dict, collapsed_any: bool, disconnected_any: bool) -> list[str]:
    cfg = record["config"]
    n_seeds = len(cfg["seeds"])
    lines = [
        f"Seeds: {n_seeds} ({', '.join(map(str, cfg['seeds']))}); std is the sample std (ddof = 1) over seeds"
        + ("" if n_seeds > 1 else " (one seed: no std)")
        + "; bold: best mean per density. Each seed: same init for the mask and for training; "
        "data order seed = init seed."
    ]
    if collapsed_any:
        lines.append("†n: layer collapse (a prunable layer kept no weight) in n of the seeds.")
    if disconnected_any:
        lines.append("‡n: no layer empty, but no input-output path left (the output ignores the input) "
                     "in n of the seeds.")
    lines.append(rounds_line(cfg))
    t = cfg["train"]
    epochs_note = "" if cfg["epochs"] == cfg["preset_epochs"] else f" (preset: {cfg['preset_epochs']})"
    lines.append(
        f"Training: {t['epochs']} epochs{epochs_note}, batch {t['batch_size']}, SGD lr {t['lr']} "
        f"momentum {t['momentum']}, weight decay {t['weight_decay']}, {t['schedule']} schedule."
    )
    if cfg.get("note"):
        lines.append(f"Note: {cfg['note']}")
    zero = all(r["pruned_weights_zero"] for r in record["runs"])
    env = record["environment"]
    lines.append(
        f"Machine: {env['machine']}; jax {env['jax']} ({env['backend']}). "
        f"Wall time {record['wall_seconds'] / 60:.1f} min for {len(record['runs'])} pruned + "
        f"{len(record['dense'])} dense runs"
        f"{'' if record.get('complete') else ' (INCOMPLETE: run still going or stopped)'}. "
        f"Every pruned weight exactly 0 after training: {'yes' if zero else 'NO'}."
    )
    return lines


ZOOM_BELOW_DENSE = 8.0  # the right panel shows [dense - 8, dense + 1.5] percentage points


def plot(record: dict, path: str) -> None:
    """Two panels: the full accuracy range, and a zoom on the top near the dense accuracy."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator

    cfg = record["config"]
    summary = summarise(record)
    dense = summary.get("dense")
    fig = Figure(figsize=(13, 5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if dense else 1, squeeze=False)[0]
    cmap = colormaps["tab10"]
    markers = "osD^vP*Xh<"
    labels = cfg.get("labels", {})
    ticks = [100 * 0.8 ** k for k in cfg["ks"]]
    for j, ax in enumerate(axes):
        for i, m in enumerate(cfg["methods"]):
            if m not in summary:
                continue
            ks = sorted(summary[m])
            xs = [100 * 0.8 ** k for k in ks]
            ys = [summary[m][k]["mean"] for k in ks]
            es = [summary[m][k]["std"] or 0.0 for k in ks]
            # a small horizontal offset per method so that overlapping error bars stay apart
            shift = 1.0 + 0.04 * (i - (len(cfg["methods"]) - 1) / 2)
            ax.errorbar([x * shift for x in xs], ys, yerr=es, label=labels.get(m, m), color=cmap(i % 10),
                        marker=markers[i % len(markers)], markersize=5, linewidth=1.5, capsize=3)
        if dense:
            ax.axhline(dense["mean"], color="black", linestyle="--", linewidth=1.2,
                       label=f"dense ({dense['mean']:.2f}%)")
            if dense["std"]:
                ax.axhspan(dense["mean"] - dense["std"], dense["mean"] + dense["std"], color="black", alpha=0.08,
                           linewidth=0)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{t:.2f}%" for t in ticks])
        ax.set_xlim(max(ticks) * 1.25, min(ticks) / 1.25)  # inverted: sparser to the right
        ax.set_xlabel("density (kept fraction of prunable weights, log scale)")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(True, which="major", alpha=0.3)
        if j == 1:
            ax.set_ylim(dense["mean"] - ZOOM_BELOW_DENSE, dense["mean"] + 1.5)
            ax.set_title(f"zoom: within {ZOOM_BELOW_DENSE:g} points of dense (lower points off the panel)",
                         fontsize=10)
        else:
            ax.set_title("full range", fontsize=10)
    n = len(cfg["seeds"])
    fig.suptitle(f"{setting_of(record)} ({cfg['preset']}): test top-1 after {cfg['epochs']} epochs, "
                 f"mean ± std over {n} seed{'s' if n > 1 else ''}")
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, borderaxespad=0)
    atomic_save_png(fig, path)


# ------------------------------------------------------------------------------------------ the study


def paired_table(record: dict) -> str:
    """Seed-by-seed comparison with the study's reference method: wins-ties-losses per density."""
    cfg = record["config"]
    ref = cfg.get("reference")
    acc = {(r["method"], r["k"], r["seed"]): r["test_top1"] for r in record["runs"]}
    if not ref or not any(m == ref for m, _, _ in acc):
        return ""
    labels, ks = cfg.get("labels", {}), cfg["ks"]
    lines = [f"### Paired with {labels.get(ref, ref)}: wins-ties-losses over seeds (same init, same data order)",
             "", "| method | " + " | ".join(f"0.8^{k}" for k in ks) + " | total |", "|---|" + "---|" * (len(ks) + 1)]
    for m in cfg["methods"]:
        if m == ref or not any(key[0] == m for key in acc):
            continue
        cells, total = [], [0, 0, 0]
        for k in ks:
            wtl = [0, 0, 0]
            for seed in cfg["seeds"]:
                a, b = acc.get((m, k, seed)), acc.get((ref, k, seed))
                if a is not None and b is not None:
                    wtl[0 if a > b else 1 if a == b else 2] += 1
            total = [t + w for t, w in zip(total, wtl)]
            cells.append("—" if sum(wtl) == 0 else "-".join(map(str, wtl)))
        lines.append(f"| {labels.get(m, m)} | " + " | ".join(cells) + f" | {'-'.join(map(str, total))} |")
    lines += ["", f"A win: the method's test top-1 above {labels.get(ref, ref)}'s for the same seed and density; "
              "a tie: equal (the test set has 1,000 images: steps of 0.1 points)."]
    return "\n".join(lines) + "\n"


def write_outputs(record: dict, out_dir: str) -> str:
    name = f"{record.get('study', 'accuracy_small')}_{setting_of(record)}"
    record["summary"] = summarise(record)
    atomic_write_text(os.path.join(out_dir, name + ".json"), json.dumps(record, indent=1) + "\n")
    table = format_table(record)
    paired = paired_table(record)
    if paired:
        table += "\n" + paired
    atomic_write_text(os.path.join(out_dir, name + ".md"), table)
    plot(record, os.path.join(out_dir, name + ".png"))
    return table
