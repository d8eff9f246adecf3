"""A small accuracy study: prune at initialization, train, report test top-1 vs density.

For each method (NTK-SAP, SynFlow, SNIP, GraSP, magnitude, random), density ``0.8^k`` and seed,
the network of the data set's preset (``mlp-digits``, ``lenet300-mnist5k``) is initialised with
:func:`ntksap_jax.steps.init_model`, pruned from that init with the prune key it returns, and the
masked init is trained with the preset's settings. The dense network is trained once per seed as
the reference. Writes, per data set, to ``--out-dir``:

* ``accuracy_small_<dataset>.md``: rows methods, columns densities, cells mean ± std of the
  final test top-1 (%) over the seeds, the dense row, and a footer (machine, epochs, wall time);
* ``accuracy_small_<dataset>.json``: every run's numbers (per seed), the configuration and the
  environment;
* ``accuracy_small_<dataset>.png``: accuracy vs density (log x), one line per method with
  std error bars, dense as a horizontal line.

All three are rewritten (atomically) after each method, so a long run can be read while it goes.
Progress lines go to stderr.

    python benchmarks/accuracy_small.py --quick --out-dir /tmp/acc   # smoke run: 1 seed, k 4/12/20, 5 epochs
    python benchmarks/accuracy_small.py --datasets digits            # the full study on digits
    nohup python benchmarks/accuracy_small.py > /tmp/accuracy_small.log 2>&1 &

Pruning rounds: NTK-SAP the preset's ``ntksap_iterations`` (T = 20, R = 1, 100 Gaussian inputs),
SynFlow 100 (official), SNIP, GraSP, magnitude and random 1 (one-shot, as the official code).
SNIP and GraSP score on a real labelled batch: the first ``10 × classes`` training examples of
``train_batches(10 × classes, seed=seed, epoch=0)``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

PRESET_BY_DATASET = {"digits": "mlp-digits", "mnist5k": "lenet300-mnist5k"}
METHODS = ("ntksap", "synflow", "snip", "grasp", "magnitude", "random")
LABELS = {"ntksap": "NTK-SAP", "synflow": "SynFlow", "snip": "SNIP", "grasp": "GraSP",
          "magnitude": "magnitude", "random": "random"}
DATA_METHODS = ("snip", "grasp")
ONE_SHOT = 1
SYNFLOW_ITERATIONS = 100
QUICK = {"seeds": [0], "ks": [4, 12, 20], "epochs": 5}
FULL = {"seeds": [0, 1, 2], "ks": [4, 8, 12, 16, 20], "epochs": None}  # epochs None: the preset's


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ files


from ntksap_jax._io import atomic_write, atomic_write_text  # noqa: E402


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
    lines = [f"### {record['dataset']} ({cfg['preset']}): test top-1 (%), mean ± std over seeds", "",
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
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    if record["dense"]:
        d = cell([r["test_top1"] for r in record["dense"]])
        lines.append("| dense (100%, reference) | " + " | ".join([d] * len(ks)) + " |")
    n_seeds = len(cfg["seeds"])
    lines.append("")
    lines.append(
        f"Seeds: {n_seeds} ({', '.join(map(str, cfg['seeds']))}); std is the sample std (ddof = 1) over seeds"
        + ("" if n_seeds > 1 else " (one seed: no std)")
        + "; bold: best mean per density. Each seed: same init for the mask and for training; "
        "data order seed = init seed."
    )
    if collapsed_any:
        lines.append("†n: layer collapse (a prunable layer kept no weight) in n of the seeds.")
    if disconnected_any:
        lines.append("‡n: no layer empty, but no input-output path left (the output ignores the input) "
                     "in n of the seeds.")
    it = cfg["iterations"]
    lines.append(
        f"Pruning rounds: NTK-SAP {it['ntksap']} (R = {cfg['ntksap_scorer']['samples']}, "
        f"{cfg['ntksap_scorer']['num_inputs']} Gaussian inputs), SynFlow {it['synflow']}, "
        "SNIP / GraSP / magnitude / random 1 (one-shot); SNIP and GraSP on "
        f"{cfg['prune_batch']} real labelled training images."
    )
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
    return "\n".join(lines) + "\n"


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
    markers = "osD^vP"
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
            ax.errorbar([x * shift for x in xs], ys, yerr=es, label=LABELS.get(m, m), color=cmap(i % 10),
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
    fig.suptitle(f"{record['dataset']} ({cfg['preset']}): test top-1 after {cfg['epochs']} epochs, "
                 f"mean ± std over {n} seed{'s' if n > 1 else ''}")
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, borderaxespad=0)
    atomic_save_png(fig, path)


# ------------------------------------------------------------------------------------------ the study


def write_outputs(record: dict, out_dir: str) -> str:
    name = f"accuracy_small_{record['dataset']}"
    record["summary"] = summarise(record)
    atomic_write_text(os.path.join(out_dir, name + ".json"), json.dumps(record, indent=1) + "\n")
    table = format_table(record)
    atomic_write_text(os.path.join(out_dir, name + ".md"), table)
    plot(record, os.path.join(out_dir, name + ".png"))
    return table


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores (shared with other jobs), {platform.system()}"


def run_dataset(dataset_name: str, args) -> str:
    import jax
    import numpy as np

    import ntksap_jax
    from ntksap_jax.collapse import path_report
    from ntksap_jax.data import load
    from ntksap_jax.masks import collapsed_layers, count_kept, count_total, density_report
    from ntksap_jax.presets import get_preset
    from ntksap_jax.prune import prune
    from ntksap_jax.scores import get_scorer
    from ntksap_jax.steps import init_model, pruned_weights_are_zero
    from ntksap_jax.train import train

    preset = get_preset(PRESET_BY_DATASET[dataset_name])
    model = preset.build_model()
    ds = load(preset.dataset)
    train_kwargs = preset.train_kwargs()
    if args.epochs is not None:
        train_kwargs["epochs"] = args.epochs
    iterations = {"ntksap": preset.ntksap_iterations, "synflow": SYNFLOW_ITERATIONS}
    prune_batch = 10 * preset.num_classes
    record = {
        "dataset": dataset_name,
        "config": {
            "preset": preset.name, "model": preset.model, "methods": list(args.methods), "ks": list(args.ks),
            "densities": [0.8 ** k for k in args.ks], "seeds": list(args.seeds), "epochs": train_kwargs["epochs"],
            "preset_epochs": preset.epochs, "train": train_kwargs,
            "iterations": {m: iterations.get(m, ONE_SHOT) for m in METHODS},
            "ntksap_scorer": preset.scorer_kwargs(), "prune_batch": prune_batch,
            "quick": bool(args.quick), "note": args.note,
        },
        "environment": {"machine": machine(), "python": platform.python_version(), "jax": jax.__version__,
                        "backend": jax.default_backend(), "ntksap_jax": ntksap_jax.__version__},
        "runs": [], "dense": [], "wall_seconds": 0.0, "complete": False,
    }
    start = time.perf_counter()

    inits = {s: init_model(model, preset.input_shape, s) for s in args.seeds}

    def fit(variables, masks, seed):
        t0 = time.perf_counter()
        result = train(model, variables, masks, ds, **train_kwargs, seed=seed, out_dir=None, progress=False)
        last = result.history[-1]
        return result, last, time.perf_counter() - t0

    for seed in args.seeds:
        variables, _ = inits[seed]
        result, last, secs = fit(variables, None, seed)
        record["dense"].append({"seed": seed, "test_top1": last["test_top1"], "train_top1": last["train_top1"],
                                "train_loss": last["train_loss"], "train_seconds": secs})
        log(f"[{dataset_name}] dense     seed={seed} acc={last['test_top1']:.2%} train={secs:.1f}s")
    record["wall_seconds"] = time.perf_counter() - start
    write_outputs(record, args.out_dir)

    for method in args.methods:
        t_build = time.perf_counter()
        factory = get_scorer(method)
        data = {}
        if method in DATA_METHODS:
            for seed in args.seeds:
                batch = next(iter(ds.train_batches(prune_batch, seed=seed, epoch=0)))
                data[seed] = (np.asarray(batch["image"]), np.asarray(batch["label"]))
        with warnings.catch_warnings():
            # SNIP / GraSP warn when they fall back to Gaussian inputs: that must not happen here
            warnings.filterwarnings("error", message=".*no labelled batch given.*")
            if method in DATA_METHODS:
                base = factory(model, preset.input_shape, num_classes=preset.num_classes,
                               data=data[args.seeds[0]], num_inputs=prune_batch)
            elif method == "ntksap":
                base = factory(model, preset.input_shape, **preset.scorer_kwargs())
            elif method == "synflow":
                base = factory(model, preset.input_shape, num_classes=preset.num_classes)
            else:
                base = factory(model, preset.input_shape)

        def scorer_for(seed, method=method, base=base, data=data, factory=factory):
            if method not in DATA_METHODS or seed == args.seeds[0]:
                return base
            x, y = data[seed]
            jitted = getattr(base, "jitted", None)
            if jitted is None:  # no shared jitted function: build a scorer for this seed's batch
                return factory(model, preset.input_shape, num_classes=preset.num_classes, data=(x, y),
                               num_inputs=prune_batch)
            # the same compiled function, fed this seed's batch (same shapes: no re-trace)
            # noqa reason: ruff false positive, `masks` here is the lambda's own parameter, not the loop's
            return lambda params, masks, batch_stats, key: jitted(params, masks, batch_stats, key, x, y)  # noqa: B023

        log(f"[{dataset_name}] {method}: scorer built in {time.perf_counter() - t_build:.1f}s")
        for seed in args.seeds:
            variables, prune_key = inits[seed]
            score_fn = scorer_for(seed)
            for k in args.ks:
                density = 0.8 ** k
                t0 = time.perf_counter()
                pr = prune(score_fn, variables["params"], density=density,
                           iterations=iterations.get(method, ONE_SHOT), key=prune_key,
                           batch_stats=variables.get("batch_stats"))
                prune_secs = time.perf_counter() - t0
                masks = pr.masks
                result, last, train_secs = fit(variables, masks, seed)
                zero = bool(pruned_weights_are_zero(result.state.params, masks))
                collapsed = collapsed_layers(masks)
                paths = path_report(model, variables["params"], masks, variables.get("batch_stats"),
                                    preset.input_shape)
                kept, total = count_kept(masks), count_total(masks)
                record["runs"].append({
                    "method": method, "k": k, "density_target": density, "density_actual": kept / total,
                    "kept": kept, "total": total, "seed": seed, "test_top1": last["test_top1"],
                    "train_top1": last["train_top1"], "train_loss": last["train_loss"],
                    "prune_seconds": prune_secs, "train_seconds": train_secs,
                    "collapsed_layers": collapsed, "disconnected": bool(paths["disconnected"]),
                    "effective_kept": int(paths["effective_kept"]), "pruned_weights_zero": zero,
                    "layers": [{"name": r["name"], "kept": r["kept"], "total": r["total"]}
                               for r in density_report(masks)],
                })
                flag = (f" COLLAPSE={','.join(collapsed)}" if collapsed else "") \
                    + (" DISCONNECTED" if paths["disconnected"] else "") + ("" if zero else " NONZERO-PRUNED!")
                log(f"[{dataset_name}] {method:<9} k={k:<2} d={density:.4%} seed={seed} acc={last['test_top1']:.2%} "
                    f"prune={prune_secs:.1f}s train={train_secs:.1f}s{flag}")
                if not zero:
                    raise RuntimeError(f"{method} k={k} seed={seed}: a pruned weight is nonzero after training")
        record["wall_seconds"] = time.perf_counter() - start
        write_outputs(record, args.out_dir)
    record["complete"] = True
    record["wall_seconds"] = time.perf_counter() - start
    return write_outputs(record, args.out_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["digits", "mnist5k"], choices=sorted(PRESET_BY_DATASET))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--ks", nargs="+", type=int, default=None,
                   help="density exponents: density 0.8^k (default 4 8 12 16 20; --quick: 4 12 20)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default 0 1 2; --quick: 0)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"training epochs (default: the preset's; --quick: {QUICK['epochs']})")
    p.add_argument("--out-dir", default=os.path.join("benchmarks", "results"))
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 seed, k in {4, 12, 20}, 5 epochs (explicit options still win)")
    p.add_argument("--note", default=None, help="a line added to the tables' footers (e.g. why fewer seeds)")
    p.add_argument("--replot", action="store_true",
                   help="no training: rewrite the .md and .png of --datasets from their .json in --out-dir")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for name in ("ks", "seeds", "epochs"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if any(k < 0 for k in args.ks) or len(set(args.ks)) != len(args.ks):
        p.error(f"--ks must be distinct non-negative integers; got {args.ks}")
    if any(s < 0 for s in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds must be distinct non-negative integers; got {args.seeds}")
    if args.epochs is not None and args.epochs < 1:
        p.error(f"--epochs must be a positive integer; got {args.epochs}")
    args.ks = sorted(args.ks)
    if args.replot:
        for dataset_name in args.datasets:
            with open(os.path.join(args.out_dir, f"accuracy_small_{dataset_name}.json")) as f:
                record = json.load(f)
            print(write_outputs(record, args.out_dir), flush=True)
        return 0
    os.makedirs(args.out_dir, exist_ok=True)
    start = time.perf_counter()
    for dataset_name in args.datasets:
        table = run_dataset(dataset_name, args)
        print(table, flush=True)
    log(f"done in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
