"""The accuracy studies' runs and command line (the tables and plots: :mod:`_accuracy`).

:func:`main` is a study script's whole command line: ``main(STUDY, __doc__)``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings

from _accuracy import PRESET_T, Study, Variant, log, setting_of, write_outputs


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


def new_record(study: Study, setting: str, preset, args, train_kwargs: dict) -> dict:
    import jax

    import ntksap_jax

    variants = {m: study.variants[m] for m in args.methods}
    iterations = {m: preset.ntksap_iterations if v.iterations == PRESET_T else v.iterations
                  for m, v in variants.items()}
    data_methods = [m for m, v in variants.items() if needs_data(v)]
    per_class = study.examples_per_class
    return {
        "study": study.name, "setting": setting, "dataset": preset.dataset,
        "config": {
            "preset": preset.name, "model": preset.model, "model_kwargs": dict(preset.model_kwargs),
            "methods": list(args.methods), "labels": {m: v.label for m, v in variants.items()},
            "variants": {m: {"scorer": v.scorer, "options": dict(v.options), "distribution": v.distribution}
                         for m, v in variants.items()},
            "ks": list(args.ks), "densities": [0.8 ** k for k in args.ks], "seeds": list(args.seeds),
            "epochs": train_kwargs["epochs"], "preset_epochs": preset.epochs, "train": train_kwargs,
            "iterations": iterations, "ntksap_scorer": preset.scorer_kwargs(), "data_methods": data_methods,
            "prune_batch": per_class * preset.num_classes,
            "prune_batch_kind": (f"class-balanced: {per_class} of each class, drawn with the seed"
                                 if study.balanced else "the first of the seed's shuffled training set"),
            "reference": study.reference, "quick": bool(args.quick), "note": args.note,
        },
        "environment": {"machine": machine(), "python": platform.python_version(), "jax": jax.__version__,
                        "backend": jax.default_backend(), "ntksap_jax": ntksap_jax.__version__},
        "runs": [], "dense": [], "wall_seconds": 0.0, "complete": False,
    }


def needs_data(variant: Variant) -> bool:
    from ntksap_jax.scores import get_method

    return get_method(variant.scorer).needs_data


def prune_data(study: Study, ds, num_classes: int, seed: int):
    """The labelled batch the data-driven methods score for ``seed`` (numpy ``(x, y)``)."""
    import numpy as np

    from ntksap_jax.data.balanced import balanced_batch

    if study.balanced:
        x, y = balanced_batch(ds, study.examples_per_class, seed=seed)
    else:
        batch = next(iter(ds.train_batches(study.examples_per_class * num_classes, seed=seed, epoch=0)))
        x, y = batch["image"], batch["label"]
    return np.asarray(x), np.asarray(y)


def make_scorer(variant: Variant, model, preset, data):
    """The variant's score function on ``model`` (``data``: the seed's labelled batch, for data methods)."""
    from ntksap_jax.scores import get_scorer

    kwargs = dict(variant.options)
    if variant.scorer == "ntksap":
        kwargs = {**preset.scorer_kwargs(), **kwargs}
    elif needs_data(variant):
        kwargs.update(num_classes=preset.num_classes, data=data, num_inputs=len(data[0]))
    elif variant.scorer == "synflow":
        kwargs["num_classes"] = preset.num_classes
    with warnings.catch_warnings():
        # SNIP / GraSP warn when they fall back to Gaussian inputs: that must not happen here
        warnings.filterwarnings("error", message=".*no labelled batch given.*")
        return get_scorer(variant.scorer)(model, preset.input_shape, **kwargs)


def fit(ctx: dict, variables, masks, seed: int):
    from ntksap_jax.train import train

    t0 = time.perf_counter()
    result = train(ctx["model"], variables, masks, ctx["ds"], **ctx["train_kwargs"], seed=seed, out_dir=None,
                   progress=False)
    return result, result.history[-1], time.perf_counter() - t0


def one_run(ctx: dict, method: str, score_fn, seed: int, k: int) -> dict:
    """Prune seed's init to ``0.8^k`` with ``score_fn``, train, check, and return the run's row."""
    from ntksap_jax.collapse import path_report
    from ntksap_jax.masks import collapsed_layers, count_kept, count_total, density_report
    from ntksap_jax.prune import prune
    from ntksap_jax.steps import pruned_weights_are_zero

    record, preset, model = ctx["record"], ctx["preset"], ctx["model"]
    variables, prune_key = ctx["inits"][seed]
    density = 0.8 ** k
    t0 = time.perf_counter()
    pr = prune(score_fn, variables["params"], density=density, iterations=record["config"]["iterations"][method],
               key=prune_key, batch_stats=variables.get("batch_stats"),
               distribution=record["config"]["variants"][method]["distribution"])
    prune_secs = time.perf_counter() - t0
    masks = pr.masks
    result, last, train_secs = fit(ctx, variables, masks, seed)
    zero = bool(pruned_weights_are_zero(result.state.params, masks))
    collapsed = collapsed_layers(masks)
    paths = path_report(model, variables["params"], masks, variables.get("batch_stats"), preset.input_shape)
    kept, total = count_kept(masks), count_total(masks)
    flag = (f" COLLAPSE={','.join(collapsed)}" if collapsed else "") \
        + (" DISCONNECTED" if paths["disconnected"] else "") + ("" if zero else " NONZERO-PRUNED!")
    log(f"[{setting_of(record)}] {method:<9} k={k:<2} d={density:.4%} seed={seed} acc={last['test_top1']:.2%} "
        f"prune={prune_secs:.1f}s train={train_secs:.1f}s{flag}")
    if not zero:
        raise RuntimeError(f"{method} k={k} seed={seed}: a pruned weight is nonzero after training")
    return {
        "method": method, "k": k, "density_target": density, "density_actual": kept / total,
        "kept": kept, "total": total, "seed": seed, "test_top1": last["test_top1"],
        "train_top1": last["train_top1"], "train_loss": last["train_loss"],
        "prune_seconds": prune_secs, "train_seconds": train_secs,
        "collapsed_layers": collapsed, "disconnected": bool(paths["disconnected"]),
        "effective_kept": int(paths["effective_kept"]), "pruned_weights_zero": zero,
        "layers": [{"name": r["name"], "kept": r["kept"], "total": r["total"]} for r in density_report(masks)],
    }


def run_setting(study: Study, setting: str, args) -> str:
    """The whole study on one setting; the outputs are rewritten after the dense runs and each method."""
    from ntksap_jax.data import load
    from ntksap_jax.presets import get_preset
    from ntksap_jax.steps import init_model

    preset = get_preset(study.settings[setting])
    model = preset.build_model()
    ds = load(preset.dataset)
    train_kwargs = preset.train_kwargs()
    if args.epochs is not None:  # a warm-up must leave at least one epoch
        train_kwargs.update(epochs=args.epochs, warmup_epochs=min(train_kwargs["warmup_epochs"], args.epochs - 1))
    record = new_record(study, setting, preset, args, train_kwargs)
    start = time.perf_counter()
    ctx = {"record": record, "preset": preset, "model": model, "ds": ds, "train_kwargs": train_kwargs,
           "inits": {s: init_model(model, preset.input_shape, s) for s in args.seeds}}
    for seed in args.seeds:
        result, last, secs = fit(ctx, ctx["inits"][seed][0], None, seed)
        record["dense"].append({"seed": seed, "test_top1": last["test_top1"], "train_top1": last["train_top1"],
                                "train_loss": last["train_loss"], "train_seconds": secs})
        log(f"[{setting}] dense     seed={seed} acc={last['test_top1']:.2%} train={secs:.1f}s")
    record["wall_seconds"] = time.perf_counter() - start
    write_outputs(record, args.out_dir)
    for method in args.methods:
        variant = study.variants[method]
        for seed in args.seeds:
            t_build = time.perf_counter()
            data = prune_data(study, ds, preset.num_classes, seed) if needs_data(variant) else None
            if seed == args.seeds[0] or data is not None:  # data-free scorers: one per method
                score_fn = make_scorer(variant, model, preset, data)
                log(f"[{setting}] {method}: scorer built in {time.perf_counter() - t_build:.1f}s")
            for k in args.ks:
                record["runs"].append(one_run(ctx, method, score_fn, seed, k))
        record["wall_seconds"] = time.perf_counter() - start
        write_outputs(record, args.out_dir)
    record["complete"] = True
    record["wall_seconds"] = time.perf_counter() - start
    return write_outputs(record, args.out_dir)


def parse_args(study: Study, doc: str, argv):
    q = study.quick
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(study.setting_option, dest="settings", nargs="+", default=list(study.settings),
                   choices=list(study.settings), help="which settings (default: all)")
    p.add_argument("--methods", nargs="+", default=list(study.variants), choices=list(study.variants))
    p.add_argument("--ks", nargs="+", type=int, default=None,
                   help=f"density exponents: density 0.8^k (default {' '.join(map(str, study.full['ks']))}; "
                        f"--quick: {' '.join(map(str, q['ks']))})")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help=f"seeds (default {' '.join(map(str, study.full['seeds']))}; --quick: {q['seeds'][0]})")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"training epochs (default: the preset's; --quick: {q['epochs']})")
    p.add_argument("--out-dir", default=os.path.join("benchmarks", "results"))
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: 1 seed, k in {set(q['ks'])}, {q['epochs']} epochs (explicit options still win)")
    p.add_argument("--note", default=None, help="a line added to the tables' footers (e.g. why fewer seeds)")
    p.add_argument("--replot", action="store_true",
                   help="no training: rewrite the .md and .png of the settings from their .json in --out-dir")
    args = p.parse_args(argv)
    defaults = q if args.quick else study.full
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
    return args


def main(study: Study, doc: str, argv=None) -> int:
    """The command line of a study script (``doc``: its module docstring, for ``--help``)."""
    args = parse_args(study, doc, argv)
    if args.replot:
        for setting in args.settings:
            with open(os.path.join(args.out_dir, f"{study.name}_{setting}.json")) as f:
                record = json.load(f)
            record["config"].setdefault("labels", {m: v.label for m, v in study.variants.items()})
            print(write_outputs(record, args.out_dir), flush=True)
        return 0
    os.makedirs(args.out_dir, exist_ok=True)
    start = time.perf_counter()
    for setting in args.settings:
        print(run_setting(study, setting, args), flush=True)
    log(f"done in {(time.perf_counter() - start) / 60:.1f} min")
    return 0
