"""The ``ntksap-jax`` command line.

Example::

    ntksap-jax prune --model resnet20 --dataset cifar10 --method ntksap --density 0.018 \\
        --iterations 20 --samples 5 --seed 0 --out runs/r20

writes ``runs/r20/masks.npz`` (see :func:`ntksap_jax.masks.load_masks`) and
``runs/r20/report.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
from typing import Sequence

from ntksap_jax._io import atomic_write_text

__all__ = ["main", "DATASETS"]

# name -> (example shape HWC, classes, official NTK-SAP iterations T, weight repeats R)
DATASETS = {
    "cifar10": ((32, 32, 3), 10, 20, 5),
    "cifar100": ((32, 32, 3), 100, 100, 1),
    "tiny_imagenet": ((64, 64, 3), 200, 100, 1),
    "imagenet": ((224, 224, 3), 1000, 100, 1),
    "imagenet2012": ((224, 224, 3), 1000, 100, 1),
    "mnist": ((28, 28, 1), 10, 100, 1),
    "mnist5k": ((28, 28, 1), 10, 100, 1),
    "digits": ((8, 8, 1), 10, 100, 1),
}


# Default pruning rounds by method (ntksap: by dataset, above), as in the official scripts.
ITERATIONS_BY_METHOD = {"synflow": 100, "iterative_snip": 100}
# Methods that score on a labelled batch (Gaussian inputs with random labels until data pipelines exist).
DATA_METHODS = ("snip", "iterative_snip", "grasp")
REINIT_SEED_OFFSET = 1_000_003
SHUFFLE_KEY = 7_919


class CliError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        raise CliError(f"{message} (see `{self.prog} --help`)")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ntksap-jax", description="NTK-SAP pruning at initialization in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    p = sub.add_parser(
        "prune",
        help="prune a model at initialization and write masks.npz + report.json",
        description="Prune a freshly initialised model. --dataset only sets the input shape and class count: "
        "NTK-SAP scores on Gaussian inputs and needs no data.",
    )
    p.add_argument("--model", required=True, help="model name (see `ntksap_jax.list_models()`), e.g. resnet20")
    p.add_argument("--dataset", default="cifar10", help=f"one of {', '.join(DATASETS)} (default cifar10)")
    p.add_argument("--method", default="ntksap",
                   help="scorer: ntksap (default), random, magnitude, snip, iterative_snip, grasp, synflow")
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
    p.add_argument("--schedule", default="exponential", help="exponential (default) or linear")
    p.add_argument("--distribution", default="global",
                   help="global (one ranking over all layers, default), uniform or erk (fixed per-layer shares)")
    p.add_argument("--invert", action="store_true", help="sanity check: prune the highest scores instead of the lowest")
    p.add_argument("--shuffle", action="store_true",
                   help="sanity check: move the kept positions at random within each layer (same per-layer counts)")
    p.add_argument("--reinit", action="store_true",
                   help="sanity check: keep the mask, train from a different init (recorded as init_seed in the report)")
    p.add_argument("--float64", action="store_true", help="synflow: compute in float64 (for deep models)")
    p.add_argument("--stem", default=None, help="resnet18/34/50 stem: imagenet or cifar (default: by dataset)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for the init and the scores (default 0)")
    p.add_argument("--out", required=True, help="output folder for masks.npz and report.json")
    p.add_argument("--overwrite", action="store_true", help="allow writing into an existing non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true",
                   help="check the arguments and print the resolved configuration as JSON; touch no device, data or file")
    _add_device_args(p)

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
                   help="weight draws to average over: 1 (default) uses the init weights; >1 draws fresh kaiming weights")
    s.add_argument("--out", required=True, help="output folder for spectrum.json, spectrum.png, densities.png")
    s.add_argument("--overwrite", action="store_true", help="allow writing into an existing non-empty --out")

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
        "T and R. SNIP and GraSP score on a labelled batch of 10 x classes training images.",
    )
    _add_train_args(r)
    r.add_argument("--method", default="ntksap",
                   help="ntksap (default), random, magnitude, snip, iterative_snip, grasp, synflow")
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--density", type=float, help="final kept fraction of prunable weights, in (0, 1]")
    g.add_argument("--sparsity", type=float, help="final pruned fraction, in [0, 1)")
    r.add_argument("--iterations", type=int, default=None, help="pruning rounds (default: the preset's / method's)")
    r.add_argument("--no-dense", action="store_true", help="skip training the dense reference")
    return parser


def _add_train_args(p) -> None:
    p.add_argument("--preset", required=True, help="a preset name, e.g. mlp-digits (see ntksap_jax.presets.list_presets())")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    p.add_argument("--batch-size", type=int, default=None, help="override the preset's training batch size")
    p.add_argument("--seed", type=int, default=None,
                   help="init, pruning and data-order seed (default: the init_seed of the mask's report.json, else 0)")
    p.add_argument("--data-dir", default=None, help="tensorflow-datasets data directory (tfds sets only)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="allow writing into an existing non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--dry-run", action="store_true",
                   help="check the arguments and print the resolved configuration as JSON; touch no device, data or file")
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


def _mesh(args):
    """The device mesh the command runs on, or ``None`` for one device (the plain single-device path)."""
    import jax

    from ntksap_jax.parallel import make_mesh

    available = jax.device_count()
    n = available if args.devices is None else args.devices
    if isinstance(n, bool) or not 1 <= n <= available:
        raise CliError(f"--devices must be in 1..{available} (the devices JAX sees: {jax.devices()[0].platform} x "
                       f"{available}); got {args.devices}")
    if args.model_parallel < 1 or n % args.model_parallel:
        raise CliError(f"--model-parallel must be a positive divisor of the device count {n}; got {args.model_parallel}")
    if n == 1:
        return None
    return make_mesh(n, model_parallel=args.model_parallel)


def _check_distributed_args(args) -> None:
    if not getattr(args, "distributed", False):
        if getattr(args, "num_processes", None) is not None or getattr(args, "process_id", None) is not None:
            raise CliError("--num-processes and --process-id need --distributed")


def _start_distributed(args) -> None:
    _check_distributed_args(args)
    if not getattr(args, "distributed", False):
        return
    from ntksap_jax.parallel import initialize_distributed

    initialize_distributed(num_processes=args.num_processes, process_id=args.process_id)


def _add_model_args(p) -> None:
    p.add_argument("--model", required=True, help="model name, e.g. resnet20 (must match the masks)")
    p.add_argument("--dataset", default=None,
                   help="sets the input shape and class count (default: from the report.json beside the first mask "
                   "file, else cifar10)")
    p.add_argument("--stem", default=None, help="resnet18/34/50 stem: imagenet or cifar (default: by dataset)")
    p.add_argument("--seed", type=int, default=None,
                   help="init and input seed (default: the init_seed in the report.json beside the first mask file, "
                   "so the weights are the ones that were pruned; else 0)")


def _check_out(out: str, overwrite: bool) -> None:
    """Refuse an existing --out that is a file, or not empty without --overwrite (changes nothing)."""
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise CliError(f"--out {out!r} exists and is not a folder")
        # (another host's write probe, below, is not content)
        if [n for n in os.listdir(out) if not n.startswith(".probe-")] and not overwrite:
            raise CliError(f"--out {out!r} exists and is not empty; pass --overwrite to replace its masks and report")


def _prepare_out(out: str, overwrite: bool) -> None:
    _check_out(out, overwrite)
    if not os.path.exists(out):
        try:
            os.makedirs(out, exist_ok=True)  # exist_ok: the other hosts of a multi-host run race here
        except OSError as e:
            raise CliError(f"cannot create --out {out!r}: {e.strerror or e}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CliError(f"--out {out!r} is not writable: {e.strerror or e}") from None


def _resolve(args) -> dict:
    """Validate everything cheap before any compilation; return the run config."""
    from ntksap_jax.masks import check_density
    from ntksap_jax.models import list_models
    from ntksap_jax.scores import Estimator, SampleLoop, list_scorers
    from ntksap_jax.distributions import DISTRIBUTIONS
    from ntksap_jax.schedules import SCHEDULES

    if args.model not in list_models():
        raise CliError(f"unknown model {args.model!r}; choose one of {', '.join(list_models())}")
    if args.dataset not in DATASETS:
        raise CliError(f"unknown dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    if args.method not in list_scorers():
        raise CliError(f"unknown method {args.method!r}; choose one of {', '.join(list_scorers())}")
    if args.schedule not in SCHEDULES:
        raise CliError(f"unknown schedule {args.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if args.distribution not in ("global", *DISTRIBUTIONS):
        raise CliError(f"unknown --distribution {args.distribution!r}; choose one of global, {', '.join(DISTRIBUTIONS)}")
    if args.float64 and args.method != "synflow":
        raise CliError(f"--float64 applies to --method synflow only, not {args.method!r}")
    if args.sparsity is not None:
        if not (math.isfinite(args.sparsity) and 0.0 <= args.sparsity < 1.0):
            raise CliError(f"--sparsity must be in [0, 1); got {args.sparsity!r}")
        density = 1.0 - args.sparsity
    else:
        density = args.density
    try:
        density = check_density(density, "--density")
    except ValueError as e:
        raise CliError(str(e)) from None
    shape, classes, t_official, r_official = DATASETS[args.dataset]
    ntksap = args.method == "ntksap"
    default_t = t_official if ntksap else ITERATIONS_BY_METHOD.get(args.method, 1)
    iterations = args.iterations if args.iterations is not None else default_t
    samples = args.samples if args.samples is not None else r_official
    num_inputs = args.num_inputs if args.num_inputs is not None else 10 * classes
    for name, v in (("--iterations", iterations), ("--samples", samples), ("--num-inputs", num_inputs),
                    ("--batch-size", args.batch_size)):
        if v < 1:
            raise CliError(f"{name} must be a positive integer; got {v}")
    if not (math.isfinite(args.eps) and args.eps > 0):
        raise CliError(f"--eps must be a positive number; got {args.eps!r}")
    if args.estimator not in [e.value for e in Estimator]:
        raise CliError(f"unknown --estimator {args.estimator!r}; choose one of {', '.join(e.value for e in Estimator)}")
    if args.sample_loop not in [e.value for e in SampleLoop]:
        raise CliError(
            f"unknown --sample-loop {args.sample_loop!r}; choose one of {', '.join(e.value for e in SampleLoop)}"
        )
    model_kwargs = _model_kwargs(args.model, args.stem, args.dataset)
    config = {
        "dataset": args.dataset,
        "input_shape": list(shape),
        "num_classes": classes,
        "iterations": iterations,
        "schedule": args.schedule,
        "distribution": args.distribution,
        "invert": args.invert,
        "shuffle": args.shuffle,
        "reinit": args.reinit,
        "seed": args.seed,
        # Training re-creates the init from this seed (a different one with --reinit).
        "init_seed": args.seed + REINIT_SEED_OFFSET if args.reinit else args.seed,
        "model_kwargs": model_kwargs,
    }
    if ntksap:
        scorer = dict(samples=samples, num_inputs=num_inputs, batch_size=args.batch_size, eps=args.eps,
                      estimator=args.estimator, sample_loop=args.sample_loop)
    elif args.method in DATA_METHODS:
        scorer = dict(num_classes=classes, num_inputs=num_inputs, batch_size=args.batch_size)
    elif args.method == "synflow":
        scorer = dict(float64=args.float64)
    else:
        scorer = {}
    config["scorer"] = scorer
    return {"density": density, "config": config}


def _model_kwargs(model: str, stem: str | None, dataset: str) -> dict:
    if model in ("resnet18", "resnet34", "resnet50"):
        stem = stem or ("imagenet" if dataset == "imagenet" else "cifar")
        if stem not in ("imagenet", "cifar"):
            raise CliError(f"unknown --stem {stem!r}; choose imagenet or cifar")
        return {"stem": stem}
    if stem is not None:
        raise CliError(f"--stem applies to resnet18/34/50 only, not {model!r}")
    return {}


def _read_report_beside(mask_path: str) -> dict | None:
    """The report.json that `prune` wrote beside ``mask_path``, if any (None if absent or unreadable)."""
    path = os.path.join(os.path.dirname(os.path.abspath(mask_path)), "report.json")
    try:
        with open(path) as f:
            report = json.load(f)
        return report if isinstance(report, dict) else None
    except (OSError, ValueError):
        return None


def _model_setup(args, mask_paths: Sequence[str]):
    """Model, variables, input shape, seed and per-file masks for `validate` / `spectrum`.

    Defaults for --dataset and --seed come from the report.json beside the first mask file, so the
    weights are those the masks were pruned on. Every mask file is checked against the model.
    """
    from ntksap_jax.models import list_models

    if args.model not in list_models():
        raise CliError(f"unknown model {args.model!r}; choose one of {', '.join(list_models())}")
    for path in mask_paths:
        if not os.path.isfile(path):
            raise CliError(f"mask file {path!r} does not exist (expected the masks.npz written by `ntksap-jax prune`)")
    report = _read_report_beside(mask_paths[0]) if mask_paths else None
    for path in mask_paths:
        r = _read_report_beside(path)
        if r is not None and r.get("model") not in (None, args.model):
            raise CliError(f"{path} was pruned for model {r.get('model')!r} (its report.json says so), not {args.model!r}")
    dataset = args.dataset or (report or {}).get("dataset") or "cifar10"
    if dataset not in DATASETS:
        raise CliError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    seed = args.seed if args.seed is not None else int((report or {}).get("config", {}).get("init_seed", 0))
    kwargs = _model_kwargs(args.model, args.stem, dataset)
    if args.batch < 1:
        raise CliError(f"--batch must be a positive integer; got {args.batch}")

    import jax
    import jax.numpy as jnp
    from ntksap_jax.masks import load_masks
    from ntksap_jax.models import get_model

    shape, classes = DATASETS[dataset][0], DATASETS[dataset][1]
    model = get_model(args.model, classes, **kwargs)
    # The same init as `prune`: key(seed) split into (init, prune).
    init_key, _ = jax.random.split(jax.random.key(seed))
    init = jax.jit(lambda k: model.init(k, jnp.zeros((1, *shape), jnp.float32), train=False))
    # Check every mask file against the param shapes before compiling anything.
    shapes = jax.eval_shape(init, init_key)["params"]
    for path in mask_paths:
        try:
            load_masks(path, shapes)
        except ValueError as e:
            raise CliError(f"{e} (is it a mask for --model {args.model} on {dataset}?)") from None
    variables = init(init_key)
    masks = [load_masks(path, variables["params"]) for path in mask_paths]
    return model, variables, shape, seed, dataset, masks


def _run_validate(args) -> int:
    model, variables, shape, seed, dataset, masks = _model_setup(args, [args.masks] if args.masks else [])
    if args.tolerance is not None and not (math.isfinite(args.tolerance) and args.tolerance > 0):
        raise CliError(f"--tolerance must be a positive number; got {args.tolerance!r}")
    import jax
    import jax.numpy as jnp
    from ntksap_jax._compat import NeuralTangentsUnavailable
    from ntksap_jax.masks import count_kept, count_total
    from ntksap_jax.validate import format_validation, validate_ntk

    x = jax.random.normal(jax.random.fold_in(jax.random.key(seed), 1), (args.batch, *shape))
    mask = masks[0] if masks else None
    with jax.enable_x64(bool(args.x64)):  # scoped: never flips the global flag
        if args.x64:  # Flax makes float32 params even with x64 on: cast params, masks and inputs
            cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)  # noqa: E731
            variables, x = cast(variables), x.astype(jnp.float64)
            mask = cast(mask) if mask is not None else None
        try:
            result = validate_ntk(model, variables, mask, x, tolerance=args.tolerance)
        except NeuralTangentsUnavailable as e:
            raise CliError(str(e)) from None
    where = f"mask {args.masks} (density {count_kept(mask) / count_total(mask):.4%})" if mask is not None else "dense"
    print(f"{args.model} on {dataset}-shaped Gaussian inputs, {where}, seed {seed}")
    print(format_validation(result))
    return 0 if result.passed else 1


def _run_spectrum(args) -> int:
    if args.draws < 1:
        raise CliError(f"--draws must be a positive integer; got {args.draws}")
    if args.labels is not None and len(args.labels) != len(args.masks):
        raise CliError(f"--labels gives {len(args.labels)} labels for {len(args.masks)} mask files")
    labels = list(args.labels) if args.labels else []
    if not labels:
        for path in args.masks:
            r = _read_report_beside(path) or {}
            name = os.path.basename(os.path.dirname(os.path.abspath(path)))
            labels.append(f"{r['method']} {name}" if "method" in r and r["method"] not in name else name)
    if len(set(labels)) != len(labels) or "dense" in labels:
        raise CliError(f"labels must be distinct and not 'dense'; got {labels} (pass --labels)")
    model, variables, shape, seed, dataset, masks = _model_setup(args, args.masks)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CliError("spectrum plots need matplotlib: pip install 'ntksap-jax[validate]'") from None
    _prepare_out(args.out, args.overwrite)
    import jax
    from ntksap_jax.analysis import plot_densities, plot_spectrum, spectrum_study

    x = jax.random.normal(jax.random.fold_in(jax.random.key(seed), 1), (args.batch, *shape))
    key = jax.random.fold_in(jax.random.key(seed), 2) if args.draws > 1 else None
    start = time.perf_counter()
    study = spectrum_study(model, variables, dict(zip(labels, masks)), x, key=key, draws=args.draws)
    study["model"], study["dataset"], study["seed"] = args.model, dataset, seed
    study["mask_files"] = dict(zip(labels, args.masks))
    atomic_write_text(os.path.join(args.out, "spectrum.json"), json.dumps(study, indent=1) + "\n")
    plot_spectrum(study, os.path.join(args.out, "spectrum.png"))
    plot_densities(study, os.path.join(args.out, "densities.png"))
    print(_format_spectrum(study))
    print(f"spectrum of {args.model} on {args.batch} Gaussian inputs, {args.draws} weight draw(s), "
          f"{time.perf_counter() - start:.1f} s -> {args.out}")
    return 0


def _format_spectrum(study: dict) -> str:
    n_k = study["config"]["num_examples"] * study["config"]["num_outputs"]
    lines = ["| mask | density | NTK trace | trace / dense | λ_max | λ_min | condition number | rank |",
             "|---|---|---|---|---|---|---|---|"]
    for label, r in study["spectra"].items():
        lam = r["eigenvalues"]
        kappa = "inf" if r["condition_number"] is None else f"{r['condition_number']:.3e}"
        lines.append(f"| {label} | {r['density']:.4f} | {r['trace']:.4e} | {r['relative_trace']:.4f} | {lam[0]:.3e} | "
                     f"{lam[-1]:.3e} | {kappa} | {r['rank']}/{n_k} |")
    return "\n".join(lines)


def _preset_or_error(name: str):
    from ntksap_jax.presets import get_preset

    try:
        return get_preset(name)
    except ValueError as e:
        raise CliError(str(e)) from None


def _check_train_overrides(args) -> None:
    for flag, v in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if v is not None and v < 1:
            raise CliError(f"{flag} must be a positive integer; got {v}")


def _load_dataset(preset, data_dir):
    from ntksap_jax.data import DataError, load

    try:
        return load(preset.dataset, data_dir=data_dir)
    except DataError as e:
        raise CliError(str(e)) from None


def _train_one(preset, model, variables, masks, dataset, args, out: str, *, resume: bool, label: str) -> dict:
    """Train one network into ``out``; returns the final metrics row plus the config used."""
    from ntksap_jax.train import train

    kwargs = preset.train_kwargs()
    if args.epochs is not None:
        kwargs["epochs"] = args.epochs
    if args.batch_size is not None:
        kwargs["batch_size"] = args.batch_size
    print(f"training {label}: {preset.model} on {preset.dataset}, {kwargs['epochs']} epochs, batch "
          f"{kwargs['batch_size']}, lr {kwargs['lr']} ({kwargs['schedule']}) -> {out}", file=sys.stderr)
    try:
        mesh = _mesh(args)
        result = train(model, variables, masks, dataset, seed=args.seed, out_dir=out, resume=resume,
                       progress=not args.no_progress, mesh=mesh, **kwargs)
    except ValueError as e:
        raise CliError(str(e)) from None
    final = dict(result.history[-1]) if result.history else {}
    from ntksap_jax.parallel import is_primary_process, mesh_summary

    report = {"preset": preset.name, "label": label, "epochs_done": result.epoch, "final": final,
              "train_config": kwargs, "seed": args.seed, "mesh": mesh_summary(mesh)}
    if is_primary_process():
        atomic_write_text(os.path.join(out, "train_report.json"), json.dumps(report, indent=1) + "\n")
    return report


def _run_train(args) -> int:
    preset = _preset_or_error(args.preset)
    _check_train_overrides(args)
    report = _read_report_beside(args.masks) if args.masks else None
    if args.masks:
        if not os.path.isfile(args.masks):
            raise CliError(f"mask file {args.masks!r} does not exist (expected the masks.npz written by `ntksap-jax prune`)")
        if report is not None and report.get("model") not in (None, preset.model):
            raise CliError(f"{args.masks} was pruned for model {report.get('model')!r} (its report.json says so), "
                           f"but preset {preset.name} trains {preset.model!r}")
    if args.seed is None:
        args.seed = int((report or {}).get("config", {}).get("init_seed", 0))
    if args.resume:
        if not os.path.isdir(args.out):
            raise CliError(f"--resume: {args.out!r} does not exist; nothing to resume")
    else:
        _prepare_out(args.out, args.overwrite)
        _clear_training_outputs(args.out)
    dataset = _load_dataset(preset, args.data_dir)

    import jax
    from ntksap_jax.masks import load_masks
    from ntksap_jax.train import init_model

    model = preset.build_model()
    variables, _ = init_model(model, preset.input_shape, args.seed)
    masks = None
    if args.masks:
        try:
            masks = load_masks(args.masks, jax.eval_shape(lambda: variables["params"]))
        except ValueError as e:
            raise CliError(f"{e} (is it a mask for preset {preset.name}, model {preset.model}?)") from None
        masks = load_masks(args.masks, variables["params"])
    label = "pruned" if masks is not None else "dense"
    out = _train_one(preset, model, variables, masks, dataset, args, args.out, resume=args.resume, label=label)
    print(_format_accuracy({label: out}))
    return 0


def _clear_training_outputs(folder: str) -> None:
    """Remove what a previous training run wrote in ``folder`` (only after --overwrite was checked)."""
    import shutil

    from ntksap_jax.parallel import is_primary_process, sync_processes
    from ntksap_jax.train import CHECKPOINT_DIR, METRICS_FILE

    if is_primary_process():  # one host clears; the others wait for it
        if os.path.isdir(os.path.join(folder, CHECKPOINT_DIR)):
            shutil.rmtree(os.path.join(folder, CHECKPOINT_DIR))
        for name in (METRICS_FILE, "train_report.json"):
            if os.path.exists(os.path.join(folder, name)):
                os.unlink(os.path.join(folder, name))
    sync_processes(f"ntksap-jax: cleared {folder}")


def _format_accuracy(reports: dict) -> str:
    lines = ["| network | density | epochs | test top-1 | test loss |", "|---|---|---|---|---|"]
    for label, r in reports.items():
        f = r["final"]
        top1 = f"{100 * f['test_top1']:.2f}%" if "test_top1" in f else "–"
        loss = f"{f['test_loss']:.4f}" if "test_loss" in f else "–"
        lines.append(f"| {label} | {f.get('density', 1.0):.4f} | {r['epochs_done']} | {top1} | {loss} |")
    return "\n".join(lines)


def _prune_args_for_run(args, preset) -> argparse.Namespace:
    """The `prune` arguments `run` uses: the preset's model, data set, T and R; the official defaults otherwise."""
    iterations = args.iterations
    if iterations is None and args.method == "ntksap":
        iterations = preset.ntksap_iterations
    return argparse.Namespace(
        model=preset.model, dataset=preset.dataset, method=args.method, density=args.density, sparsity=args.sparsity,
        iterations=iterations, samples=preset.ntksap_samples if args.method == "ntksap" else None,
        num_inputs=preset.ntksap_num_inputs, batch_size=256, eps=0.01, estimator="finite_difference",
        sample_loop="auto", schedule="exponential", distribution="global", invert=False, shuffle=False, reinit=False,
        float64=False, stem=dict(preset.model_kwargs).get("stem"), seed=args.seed, out=args.out,
        overwrite=args.overwrite, no_progress=args.no_progress, devices=args.devices,
        model_parallel=args.model_parallel, distributed=args.distributed, num_processes=args.num_processes,
        process_id=args.process_id, dry_run=False,
    )


def _dry_run(args) -> int:
    """``--dry-run``: check the arguments, print what the command would run as JSON; no device, data or file."""
    _check_distributed_args(args)
    for flag in ("devices", "model_parallel"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise CliError(f"--{flag.replace('_', '-')} must be a positive integer; got {v}")
    plan = {"command": args.command}
    if args.command == "prune":
        plan.update(_resolve(args))
    else:
        preset = _preset_or_error(args.preset)
        _check_train_overrides(args)
        kwargs = preset.train_kwargs()
        for key in ("epochs", "batch_size"):
            if getattr(args, key) is not None:
                kwargs[key] = getattr(args, key)
        plan.update(preset=preset.name, model=preset.model, dataset=preset.dataset, data_dir=args.data_dir,
                    train=kwargs)
        if args.command == "train":
            if args.masks and not os.path.isfile(args.masks):
                raise CliError(f"mask file {args.masks!r} does not exist (expected the masks.npz written by "
                               "`ntksap-jax prune`)")
            plan.update(masks=args.masks, resume=args.resume)
        else:
            if args.seed is None:
                args.seed = 0
            plan["prune"] = _resolve(_prune_args_for_run(args, preset))
            plan["dense"] = not args.no_dense
    if not getattr(args, "resume", False):
        _check_out(args.out, args.overwrite)
    plan.update(out=args.out, seed=args.seed, devices=args.devices if args.devices is not None else "all",
                model_parallel=args.model_parallel, distributed=args.distributed)
    print(json.dumps(plan, indent=1))
    return 0


def _run_run(args) -> int:
    preset = _preset_or_error(args.preset)
    _check_train_overrides(args)
    if args.seed is None:
        args.seed = 0
    dataset = _load_dataset(preset, args.data_dir)
    prune_args = _prune_args_for_run(args, preset)
    data = None
    if args.method in DATA_METHODS:  # a real labelled batch: 10 x classes training images
        import numpy as np

        n = min(preset.ntksap_num_inputs, dataset.info.num_train)
        batch = next(iter(dataset.train_batches(n, seed=args.seed, epoch=0)))
        data = (np.asarray(batch["image"]), np.asarray(batch["label"]))
    code = _run_prune(prune_args, data=data)
    if code != 0:
        return code

    from ntksap_jax.masks import load_masks
    from ntksap_jax.train import init_model

    model = preset.build_model()
    variables, _ = init_model(model, preset.input_shape, args.seed)
    masks = load_masks(os.path.join(args.out, "masks.npz"), variables["params"])
    reports = {}
    if not args.no_dense:
        dense_dir = os.path.join(args.out, "dense")
        _prepare_out(dense_dir, True)
        _clear_training_outputs(dense_dir)
        reports["dense"] = _train_one(preset, model, variables, None, dataset, args, dense_dir, resume=False,
                                      label="dense")
    pruned_dir = os.path.join(args.out, "pruned")
    _prepare_out(pruned_dir, True)
    _clear_training_outputs(pruned_dir)
    reports[f"{args.method} pruned"] = _train_one(preset, model, variables, masks, dataset, args, pruned_dir,
                                                  resume=False, label=f"{args.method} pruned")
    summary = {label: {"density": r["final"].get("density"), "test_top1": r["final"].get("test_top1")}
               for label, r in reports.items()}
    from ntksap_jax.parallel import is_primary_process

    if is_primary_process():
        atomic_write_text(os.path.join(args.out, "run_report.json"),
                           json.dumps({"preset": preset.name, "method": args.method, "seed": args.seed,
                                       "results": summary}, indent=1) + "\n")
    print(_format_accuracy(reports))
    return 0


def _run_prune(args, data=None) -> int:
    resolved = _resolve(args)
    _prepare_out(args.out, args.overwrite)

    import jax
    import jax.numpy as jnp
    import flax
    from tqdm import tqdm

    import ntksap_jax
    from ntksap_jax.collapse import path_report, unit_report
    from ntksap_jax.masks import collapsed_layers, count_kept, count_total, density_report, format_report, save_masks
    from ntksap_jax.sanity import shuffle_masks
    from ntksap_jax.models import get_model, module_order
    from ntksap_jax.parallel import is_primary_process, mesh_summary, sync_processes
    from ntksap_jax.prune import prune
    from ntksap_jax.scores import get_scorer

    density, config = resolved["density"], resolved["config"]
    shape = tuple(config["input_shape"])
    model = get_model(args.model, config["num_classes"], **config["model_kwargs"])
    init_key, prune_key = jax.random.split(jax.random.key(args.seed))
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, *shape), jnp.float32), train=False))(init_key)
    params, batch_stats = variables["params"], variables.get("batch_stats")
    scorer_kwargs = dict(config["scorer"])
    if data is not None and args.method in DATA_METHODS:
        scorer_kwargs["data"] = (jnp.asarray(data[0]), jnp.asarray(data[1]))
        config["scorer_data"] = f"{len(data[1])} labelled training images"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score_fn = get_scorer(args.method)(model, shape, **scorer_kwargs)
    for w in caught:  # e.g. "snip: no labelled batch given; scoring on Gaussian inputs with random labels"
        print(f"ntksap-jax: note: {w.message}", file=sys.stderr)

    bar = tqdm(total=config["iterations"], desc=f"{args.method} {args.model}", unit="it",
               disable=args.no_progress, file=sys.stderr)

    def progress(t, row):
        bar.set_postfix(density=f"{row['kept'] / total:.4%}", kept=row["kept"])
        bar.update(1)

    from ntksap_jax.masks import init_masks

    masks0 = init_masks(params)
    total = count_total(masks0)
    start = time.perf_counter()
    mesh = _mesh(args)
    result = prune(score_fn, params, masks0, density=density, iterations=config["iterations"], key=prune_key,
                   batch_stats=batch_stats, schedule=config["schedule"], distribution=config["distribution"],
                   invert=config["invert"], progress=progress, mesh=mesh,
                   on_collapse="ignore")  # reported below, with the path counts
    masks = result.masks
    if config["shuffle"]:
        masks = shuffle_masks(jax.random.fold_in(prune_key, SHUFFLE_KEY), masks)
    seconds = time.perf_counter() - start
    bar.close()

    order = module_order(model, jnp.zeros((1, *shape), jnp.float32))
    rows = density_report(masks, order)
    kept = count_kept(masks)
    units = {r["name"]: r for r in unit_report(masks)}
    paths = path_report(model, params, masks, batch_stats, shape)
    on_path = {r["name"]: r["effective"] for r in paths["layers"]}
    for r in rows:
        r["dead_outputs"] = units[r["name"]]["dead_outputs"] if r["name"] in units else 0
        r["effective"] = on_path[r["name"]]
    report = {
        "model": args.model,
        "method": args.method,
        "dataset": args.dataset,
        "density_target": density,
        "density_actual": kept / total,
        "total_prunable": total,
        "total_kept": kept,
        "seconds": seconds,
        "config": config,
        "layers": rows,
        "collapsed_layers": collapsed_layers(masks),
        "disconnected": paths["disconnected"],
        "effective_kept": paths["effective_kept"],
        "dead_units": sum(r["dead_outputs"] for r in rows),
        "zero_score_layers": result.diagnostics["zero_score_layers"],
        "history": result.history,
        "environment": {
            "ntksap_jax": ntksap_jax.__version__,
            "jax": jax.__version__,
            "flax": flax.__version__,
            "backend": jax.default_backend(),
            "devices": len(jax.devices()),
            "mesh": mesh_summary(mesh),
        },
    }
    if is_primary_process():  # one writer; the masks are the same on every device and host
        save_masks(os.path.join(args.out, "masks.npz"), masks)
        atomic_write_text(os.path.join(args.out, "report.json"), json.dumps(report, indent=1) + "\n")
    sync_processes("ntksap-jax prune: masks written")  # `run` reads them back on every host
    print(format_report(rows))
    print(
        f"{args.method} on {args.model}: kept {kept:,} of {total:,} prunable weights "
        f"(density {kept / total:.4%}, target {density:.4%}) in {seconds:.1f} s -> {args.out}"
    )
    print(f"{paths['effective_kept']:,} of the kept weights lie on an input-output path; "
          f"{report['dead_units']:,} units receive no weight")
    if report["zero_score_layers"]:
        print(f"WARNING: ALL SCORES 0 (the method could not rank them) in {', '.join(report['zero_score_layers'])}",
              file=sys.stderr)
    if report["collapsed_layers"]:
        print(f"WARNING: LAYER COLLAPSE: no weight left in {', '.join(report['collapsed_layers'])}", file=sys.stderr)
    if paths["disconnected"]:
        print("WARNING: THE NETWORK IS DISCONNECTED: no path from input to output survives this mask", file=sys.stderr)
    return 0


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
        if args.command == "prune":
            return _run_prune(args)
        if args.command == "validate":
            return _run_validate(args)
        if args.command == "spectrum":
            return _run_spectrum(args)
        if args.command == "train":
            return _run_train(args)
        if args.command == "run":
            return _run_run(args)
        raise CliError(f"unknown command {args.command!r}")
    except CliError as e:
        print(f"ntksap-jax: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # raised by the library on bad input met during the run
        print(f"ntksap-jax: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
