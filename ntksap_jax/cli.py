"""The ``ntksap-jax`` command line: parse, call the library's workflows, print, map errors to exit codes.

Example::

    ntksap-jax prune --model resnet20 --dataset cifar10 --method ntksap --density 0.018 \\
        --iterations 20 --samples 5 --seed 0 --out runs/r20

writes ``runs/r20/masks.npz`` (see :func:`ntksap_jax.masks.load_masks`) and
``runs/r20/report.json``. Every command is a library function (:mod:`ntksap_jax.runs`,
:mod:`ntksap_jax.preset_runs`); bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from typing import Sequence

from ntksap_jax._compile_cache import enable_compile_cache
from ntksap_jax.data.registry import list_datasets
from ntksap_jax.runs import ConfigError, cli_flag, tqdm_progress

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ntksap-jax", description="NTK-SAP pruning at initialization in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_prune_parser(sub)
    _add_analysis_parsers(sub)
    _add_training_parsers(sub)
    for command in sub.choices.values():
        command.add_argument("--no-compile-cache", action="store_true",
                             help="keep no compiled programs in ~/.cache/ntksap-jax (also NTKSAP_JAX_COMPILE_CACHE=0)")
    return parser


def _add_prune_parser(sub) -> None:
    p = sub.add_parser(
        "prune",
        help="prune a model at initialization and write masks.npz + report.json",
        description="Prune a freshly initialised model. --dataset only sets the input shape and class count: "
        "NTK-SAP scores on Gaussian inputs and needs no data.",
    )
    p.add_argument("--model", required=True, help="model name (see `ntksap_jax.models.list_models()`), e.g. resnet20")
    p.add_argument("--dataset", default="cifar10", help=f"one of {', '.join(list_datasets())} (default cifar10)")
    p.add_argument("--method", default="ntksap",
                   help="scorer: ntksap (default), random, magnitude, snip, iterative_snip, grasp, synflow, px")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--density", type=float, help="final kept fraction of prunable weights, in (0, 1]")
    g.add_argument("--sparsity", type=float, help="final pruned fraction, in [0, 1): density = 1 - sparsity")
    p.add_argument("--iterations", type=int, default=None,
                   help="pruning rounds T (default: ntksap 20 on cifar10 and 100 elsewhere, as the official code; "
                   "synflow and iterative_snip 100; other methods 1)")
    p.add_argument("--samples", type=int, default=None,
                   help="NTK-SAP weight repeats R per round (default 5 on cifar10, 1 elsewhere)")
    p.add_argument("--num-inputs", type=int, default=None,
                   help="Gaussian inputs per repeat (default 10 x classes, as the official code)")
    p.add_argument("--batch-size", type=int, default=256, help="largest Gaussian batch per weight sample (default 256)")
    p.add_argument("--eps", type=float, default=0.01, help="perturbation standard deviation (default 0.01)")
    p.add_argument("--estimator", default="finite_difference", help="finite_difference (official) or jvp")
    p.add_argument("--sample-loop", default="auto", help="auto, sequential or vmap")
    p.add_argument("--micro-batch", default=None, help="NTK-SAP: score N inputs at a time, or auto (default: whole)")
    p.add_argument("--schedule", default="exponential", help="exponential (default) or linear")
    p.add_argument("--distribution", default="global",
                   help="global (one ranking over all layers, default), uniform or erk (fixed per-layer shares)")
    p.add_argument("--invert", action="store_true", help="sanity check: prune the highest scores instead of the lowest")
    p.add_argument("--shuffle", action="store_true",
                   help="sanity check: move the kept positions at random within each layer (same per-layer counts)")
    p.add_argument("--reinit", action="store_true",
                   help="sanity check: keep the mask, train from a different init "
                        "(recorded as init_seed in the report)")
    p.add_argument("--float64", action="store_true", help="synflow: compute in float64 (for deep models)")
    p.add_argument("--examples-per-class", type=int, default=None, help="snip/grasp/px: K train images a class (px 10)")
    p.add_argument("--data-dir", default=None, help="tensorflow-datasets data directory (tfds sets only)")
    p.add_argument("--stem", default=None, help="resnet18/34/50 stem: imagenet or cifar (default: by dataset)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for the init and the scores (default 0)")
    p.add_argument("--out", required=True, help="output folder for masks.npz and report.json")
    p.add_argument("--overwrite", action="store_true", help="allow writing into an existing non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true",
                   help="check the arguments and print the resolved configuration as JSON; "
                        "touch no device, data or file")
    _add_device_args(p)


def _add_analysis_parsers(sub) -> None:
    v = sub.add_parser(
        "validate",
        help="check our empirical NTK of a (masked) model against neural-tangents",
        description="Compute the empirical NTK of the masked network on Gaussian inputs (BatchNorm statistics of "
        "the masked network on that batch, then fixed) with ntksap_jax and with neural-tangents, and print one "
        "row per implementation. Exit status 1 if any error exceeds the tolerance (float64 1e-10, float32 1e-5, "
        "relative Frobenius). Needs the [validate] extra.",
    )
    _add_model_args(v)
    v.add_argument("--masks", default=None, help="masks.npz written by `ntksap-jax prune` (default: dense network)")
    v.add_argument("--batch", type=int, default=8, help="Gaussian inputs N; the kernel is (N, N, K, K) (default 8)")
    v.add_argument("--x64", action="store_true", help="compare in float64 (tolerance 1e-10) instead of float32")
    v.add_argument("--tolerance", type=float, default=None, help="override the relative Frobenius tolerance")

    s = sub.add_parser(
        "spectrum",
        help="NTK eigenvalues of the dense network and of each mask; writes spectrum.json/.png and densities.png",
        description="Eigenvalues of the (N*K) x (N*K) NTK Gram of the network under each mask on a Gaussian batch "
        "(BatchNorm statistics of each masked network on that batch), averaged over --draws fresh kaiming weight "
        "draws when --draws > 1. Needs matplotlib (the [validate] extra) for the plots.",
    )
    _add_model_args(s)
    s.add_argument("--masks", nargs="+", required=True, help="one or more masks.npz files")
    s.add_argument("--labels", nargs="+", default=None, help="legend label per mask (default: from each report.json)")
    s.add_argument("--batch", type=int, default=32, help="Gaussian inputs N (default 32)")
    s.add_argument("--draws", type=int, default=1,
                   help="weight draws to average over: 1 (default) uses the init weights; "
                        ">1 draws fresh kaiming weights")
    s.add_argument("--out", required=True, help="output folder for spectrum.json, spectrum.png, densities.png")
    s.add_argument("--overwrite", action="store_true", help="allow writing into an existing non-empty --out")


def _add_training_parsers(sub) -> None:
    t = sub.add_parser(
        "train",
        help="train a preset's network (dense, or under a mask from `prune`) and write metrics and checkpoints",
        description="Train from the same init the mask was pruned on (the init_seed in the report.json beside the "
        "mask), with the preset's optimiser and schedule. Writes DIR/metrics.jsonl (one line per epoch), "
        "DIR/checkpoints/ (every epoch) and DIR/train_report.json. Needs the [data] extra for tfds data sets.",
    )
    _add_train_args(t)
    t.add_argument("--masks", default=None, help="masks.npz from `ntksap-jax prune` (default: train the dense network)")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")

    r = sub.add_parser(
        "run",
        help="prune a preset's network, then train the pruned network (and the dense one) from the same init",
        description="`prune` into DIR (masks.npz, report.json), train the pruned network into DIR/pruned and, "
        "unless --no-dense, the dense network into DIR/dense; print both accuracies. NTK-SAP uses the preset's "
        "T and R. SNIP, GraSP and PX score on a class-balanced labelled batch of training images.",
    )
    _add_train_args(r)
    r.add_argument("--method", default="ntksap",
                   help="ntksap (default), random, magnitude, snip, iterative_snip, grasp, synflow, px")
    r.add_argument("--examples-per-class", type=int, default=10, help="snip/grasp/px: K train images a class (0: off)")
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--density", type=float, help="final kept fraction of prunable weights, in (0, 1]")
    g.add_argument("--sparsity", type=float, help="final pruned fraction, in [0, 1)")
    r.add_argument("--iterations", type=int, default=None, help="pruning rounds (default: the preset's / method's)")
    r.add_argument("--no-dense", action="store_true", help="skip training the dense reference")


def _add_train_args(p) -> None:
    p.add_argument("--preset", required=True,
                   help="a preset name, e.g. mlp-digits (see ntksap_jax.presets.list_presets())")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    p.add_argument("--batch-size", type=int, default=None, help="override the preset's training batch size")
    p.add_argument("--seed", type=int, default=None,
                   help="init, pruning and data-order seed (default: the init_seed of the mask's report.json, else 0)")
    p.add_argument("--data-dir", default=None, help="tensorflow-datasets data directory (tfds sets only)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="allow writing into an existing non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--dry-run", action="store_true",
                   help="check the arguments and print the resolved configuration as JSON; "
                        "touch no device, data or file")
    _add_device_args(p)


def _add_device_args(p) -> None:
    p.add_argument("--devices", type=int, default=None,
                   help="devices to run on, the first N of jax.devices() (default: all; across hosts with "
                        "--distributed). Batches are split over them; results match one device to float32 rounding")
    p.add_argument("--model-parallel", type=int, default=1,
                   help="split each kernel's output features over this many of the devices (default 1: data parallel)")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() first (auto-detects TPU pod slices, SLURM, "
                        "Open MPI, Kubernetes; elsewhere set JAX_COORDINATOR_ADDRESS and pass --num-processes "
                        "and --process-id)")
    p.add_argument("--num-processes", type=int, default=None, help="with --distributed: number of processes")
    p.add_argument("--process-id", type=int, default=None, help="with --distributed: this process's index")


def _add_model_args(p) -> None:
    p.add_argument("--model", required=True, help="model name, e.g. resnet20 (must match the masks)")
    p.add_argument("--dataset", default=None,
                   help="sets the input shape and class count (default: from the report.json beside the first mask "
                   "file, else cifar10)")
    p.add_argument("--stem", default=None, help="resnet18/34/50 stem: imagenet or cifar (default: by dataset)")
    p.add_argument("--seed", type=int, default=None,
                   help="init and input seed (default: the init_seed in the report.json beside the first mask file, "
                   "so the weights are the ones that were pruned; else 0)")


# ----------------------------------------------------------------------------- commands


def _print_pruned(pruned, out: str) -> None:
    from ntksap_jax.runs import prune_summary

    for note in pruned.notes:  # e.g. "snip: no labelled batch given; scoring on Gaussian inputs with random labels"
        print(f"ntksap-jax: note: {note}", file=sys.stderr)
    text, loud = prune_summary(pruned.report)
    lines = text.split("\n")
    lines[-2] += f" -> {out}"
    print("\n".join(lines))
    for line in loud:
        print(f"WARNING: {line}", file=sys.stderr)


def _prune_plan(args):
    from ntksap_jax.runs import resolve_prune

    names = ("model", "dataset", "method", "density", "sparsity", "iterations", "samples", "num_inputs", "batch_size",
             "eps", "estimator", "sample_loop", "schedule", "distribution", "invert", "shuffle", "reinit", "float64",
             "stem", "seed", "examples_per_class", "micro_batch")
    return resolve_prune(**{name: getattr(args, name) for name in names}, spell=cli_flag)


def _run_prune(args) -> int:
    from ntksap_jax.runs import device_mesh, prepare_out_dir, prune_zoo, save_pruned

    plan = _prune_plan(args)
    prepare_out_dir(args.out, args.overwrite, cli_flag)
    mesh = device_mesh(args.devices, args.model_parallel, cli_flag)
    close, progress = tqdm_progress(plan.config["iterations"], f"{args.method} {args.model}", args.no_progress)
    pruned = prune_zoo(plan, mesh=mesh, progress=progress, data_dir=args.data_dir)
    close()
    save_pruned(args.out, pruned)
    _print_pruned(pruned, args.out)
    return 0


def _validate_setup(args, mask_paths):
    from ntksap_jax.zoo_masks import load_zoo_with_masks

    if args.batch < 1:
        raise ConfigError(f"--batch must be a positive integer; got {args.batch}")
    return load_zoo_with_masks(args.model, mask_paths, dataset=args.dataset, stem=args.stem, seed=args.seed,
                               spell=cli_flag)


def _run_validate(args) -> int:
    from ntksap_jax._compat import NeuralTangentsUnavailable
    from ntksap_jax.validate import format_validation
    from ntksap_jax.zoo_masks import validate_zoo

    zoo = _validate_setup(args, [args.masks] if args.masks else [])
    try:
        result, where = validate_zoo(zoo, args.batch, x64=args.x64, tolerance=args.tolerance, mask_file=args.masks,
                                     spell=cli_flag)
    except NeuralTangentsUnavailable as e:
        raise ConfigError(str(e)) from None
    print(f"{args.model} on {zoo.dataset}-shaped Gaussian inputs, {where}, seed {zoo.seed}")
    print(format_validation(result))
    return 0 if result.passed else 1


def _run_spectrum(args) -> int:
    from ntksap_jax.runs import prepare_out_dir
    from ntksap_jax.zoo_masks import format_spectrum, spectrum_labels, write_spectrum

    if args.draws < 1:
        raise ConfigError(f"--draws must be a positive integer; got {args.draws}")
    labels = spectrum_labels(args.masks, args.labels, cli_flag)
    zoo = _validate_setup(args, args.masks)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("spectrum plots need matplotlib: pip install 'ntksap-jax[validate]'") from None
    prepare_out_dir(args.out, args.overwrite, cli_flag)
    start = time.perf_counter()
    study = write_spectrum(zoo, labels, args.masks, batch=args.batch, draws=args.draws, out=args.out)
    print(format_spectrum(study))
    print(f"spectrum of {args.model} on {args.batch} Gaussian inputs, {args.draws} weight draw(s), "
          f"{time.perf_counter() - start:.1f} s -> {args.out}")
    return 0


def _run_train(args) -> int:
    from ntksap_jax.preset_runs import format_accuracy, train_preset
    from ntksap_jax.runs import device_mesh

    reports = train_preset(args.preset, out=args.out, masks_path=args.masks, seed=args.seed, epochs=args.epochs,
                           batch_size=args.batch_size, data_dir=args.data_dir, resume=args.resume,
                           overwrite=args.overwrite, mesh=device_mesh(args.devices, args.model_parallel, cli_flag),
                           progress=not args.no_progress, log=functools.partial(print, file=sys.stderr), spell=cli_flag)
    print(format_accuracy(reports))
    return 0


def _run_run(args) -> int:
    from ntksap_jax.preset_runs import format_accuracy, run_preset
    from ntksap_jax.runs import device_mesh

    seed = 0 if args.seed is None else args.seed
    close, progress = tqdm_progress(None, f"{args.method} {args.preset}", args.no_progress)
    reports = run_preset(args.preset, out=args.out, method=args.method, density=args.density,
                         sparsity=args.sparsity, iterations=args.iterations, seed=seed, dense=not args.no_dense,
                         epochs=args.epochs, batch_size=args.batch_size, data_dir=args.data_dir,
                         overwrite=args.overwrite, mesh=device_mesh(args.devices, args.model_parallel, cli_flag),
                         progress=not args.no_progress, prune_progress=progress,
                         on_pruned=lambda pruned: (close(), _print_pruned(pruned, args.out)),
                         log=functools.partial(print, file=sys.stderr),
                         examples_per_class=args.examples_per_class, spell=cli_flag)
    print(format_accuracy(reports))
    return 0


def _dry_run(args) -> int:
    """``--dry-run``: check the arguments, print what the command would run as JSON; no device, data or file."""
    from ntksap_jax.preset_runs import get_preset_or_error, resolve_run, resolve_train
    from ntksap_jax.runs import check_mask_file, check_out_dir

    _check_distributed_args(args)
    for flag in ("devices", "model_parallel"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise ConfigError(f"{cli_flag(flag)} must be a positive integer; got {v}")
    plan = {"command": args.command}
    if args.command == "prune":
        plan.update(_prune_plan(args).to_json())
    else:
        preset = get_preset_or_error(args.preset)
        plan.update(preset=preset.name, model=preset.model, dataset=preset.dataset, data_dir=args.data_dir,
                    train=resolve_train(preset, epochs=args.epochs, batch_size=args.batch_size, spell=cli_flag))
        if args.command == "train":
            if args.masks:
                check_mask_file(args.masks, cli_flag)
            plan.update(masks=args.masks, resume=args.resume)
        else:
            args.seed = 0 if args.seed is None else args.seed
            plan["prune"] = resolve_run(preset, method=args.method, density=args.density, sparsity=args.sparsity,
                                        iterations=args.iterations, seed=args.seed,
                                        examples_per_class=args.examples_per_class, spell=cli_flag).to_json()
            plan["dense"] = not args.no_dense
    if not getattr(args, "resume", False):
        check_out_dir(args.out, args.overwrite, cli_flag)
    plan.update(out=args.out, seed=args.seed, devices=args.devices if args.devices is not None else "all",
                model_parallel=args.model_parallel, distributed=args.distributed)
    print(json.dumps(plan, indent=1))
    return 0


def _check_distributed_args(args) -> None:
    if not getattr(args, "distributed", False):
        if getattr(args, "num_processes", None) is not None or getattr(args, "process_id", None) is not None:
            raise ConfigError("--num-processes and --process-id need --distributed")


def _start_distributed(args) -> None:
    _check_distributed_args(args)
    if getattr(args, "distributed", False):
        from ntksap_jax.parallel import initialize_distributed

        initialize_distributed(num_processes=args.num_processes, process_id=args.process_id)


_COMMANDS = {"prune": _run_prune, "validate": _run_validate, "spectrum": _run_spectrum, "train": _run_train,
             "run": _run_run}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ntksap-jax`` console script; returns the exit status.

    Example::

      main(["prune", "--model", "mlp", "--dataset", "digits", "--method", "magnitude",
            "--density", "0.1", "--out", "/tmp/run"])
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if getattr(args, "dry_run", False):
            return _dry_run(args)
        if args.command in ("prune", "train", "run"):
            _start_distributed(args)
        _, why_not = enable_compile_cache(not args.no_compile_cache)
        if why_not and why_not.startswith("cannot"):
            print(f"ntksap-jax: note: running without the compilation cache: {why_not}", file=sys.stderr)
        return _COMMANDS[args.command](args)
    except ConfigError as e:  # bad input, found before any computation
        print(f"ntksap-jax: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # raised by the library on bad input met during the run
        print(f"ntksap-jax: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
