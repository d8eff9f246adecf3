"""The command line's workflows as library functions: prune a zoo model, train a preset, prune then train.

Each workflow first resolves and checks its whole configuration (``resolve_prune``: what
``ntksap-jax prune --dry-run`` prints and what ``report.json`` records as ``config``), then runs,
writes its files atomically (only the primary process of a multi-host run writes), and returns
its report. Bad arguments raise :class:`ConfigError` (a ``ValueError``) naming the argument as
``spell`` writes it (``spell=cli_flag`` gives ``--num-inputs``; the default, ``num_inputs``).

Example::

    plan = resolve_prune(model="resnet20", dataset="cifar10", density=0.018, iterations=20, samples=5)
    pruned = prune_zoo(plan)                      # PrunedZoo(masks, report, model, variables, notes)
    save_pruned("runs/r20", pruned)               # masks.npz + report.json
    reports = run_preset("mlp-digits", method="ntksap", density=0.1, out="runs/mlp")
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import warnings
from typing import Any, Callable, NamedTuple, Sequence

from ntksap_jax._checks import non_negative_int, positive_float, positive_int
from ntksap_jax._io import atomic_write_text

__all__ = ["ConfigError", "PrunePlan", "PrunedZoo", "resolve_prune", "prune_zoo", "save_pruned", "prune_summary",
           "model_kwargs", "device_mesh", "check_out_dir", "prepare_out_dir", "clear_training_outputs",
           "read_report_beside", "check_mask_file", "cli_flag", "tqdm_progress", "SHUFFLE_KEY", "REINIT_SEED_OFFSET"]

PyTree = Any
Spell = Callable[[str], str]

#: ``--reinit``: training re-creates the init from ``seed + REINIT_SEED_OFFSET``.
REINIT_SEED_OFFSET = 1_000_003
#: ``--shuffle``: the positions are shuffled with ``fold_in(prune_key, SHUFFLE_KEY)``.
SHUFFLE_KEY = 7_919
_RESNETS_WITH_STEMS = ("resnet18", "resnet34", "resnet50")


class ConfigError(ValueError):
    """A bad argument or configuration, found before any computation (the CLI's exit status 2)."""


def _plain(name: str) -> str:
    return name


def cli_flag(name: str) -> str:
    """How the command line spells argument ``name``: ``cli_flag("num_inputs")  # '--num-inputs'``."""
    return "--" + name.replace("_", "-")


def dataset_info(name: str):
    """The data set's registry entry (:class:`ntksap_jax.data.registry.DatasetSpec`: shape, classes,
    loader, official NTK-SAP rounds and repeats); ``ConfigError`` if the name is unknown."""
    from ntksap_jax.data.registry import get_dataset_spec, list_datasets

    check_choice(name, list_datasets(), "dataset")
    return get_dataset_spec(name)


def check_choice(value, allowed: Sequence[str], what: str) -> str:
    """``value``, or ``ConfigError`` "unknown {what} ...; choose one of ..." unless it is in ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
    return value


class PrunePlan(NamedTuple):
    """A resolved pruning configuration (:func:`resolve_prune`).

    ``config`` is what ``report.json`` records (``dataset``, ``input_shape``, ``num_classes``,
    ``iterations``, ``schedule``, ``distribution``, ``invert``, ``shuffle``, ``reinit``, ``seed``,
    ``init_seed``, ``model_kwargs``, ``scorer``).
    """

    model: str
    method: str
    density: float
    config: dict

    def to_json(self) -> dict:
        """``{"density", "config"}``: what ``--dry-run`` prints."""
        return {"density": self.density, "config": self.config}


def model_kwargs(model: str, stem: str | None, dataset: str, spell: Spell = _plain) -> dict:
    """The zoo model's extra fields: the ResNet-18/34/50 stem (ImageNet's for ImageNet-sized data)."""
    if model in _RESNETS_WITH_STEMS:
        stem = stem or ("imagenet" if dataset_info(dataset).loader == "imagenet2012" else "cifar")
        check_choice(stem, ("imagenet", "cifar"), spell("stem"))
        return {"stem": stem}
    if stem is not None:
        raise ConfigError(f"{spell('stem')} applies to resnet18/34/50 only, not {model!r}")
    return {}


def _density(density, sparsity, spell: Spell) -> float:
    from ntksap_jax.masks import check_density

    if sparsity is not None:
        try:
            s = float(sparsity)
        except (TypeError, ValueError):
            s = float("nan")
        if not 0.0 <= s < 1.0:
            raise ConfigError(f"{spell('sparsity')} must be in [0, 1); got {sparsity!r}")
        density = 1.0 - s
    try:
        return check_density(density, spell("density"))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _scorer_options(method, info, values: dict, spell: Spell) -> dict:
    """The scorer configuration of ``method``: the options it takes, with the official defaults for the
    data set (``R`` repeats, ``10 × classes`` inputs). Every value is checked, used or not."""
    from ntksap_jax.scores import Estimator, SampleLoop
    from ntksap_jax.scores._ntksap_batching import check_micro_batch

    values = {**values, "num_classes": info.num_classes}
    values["samples"] = info.ntksap_samples if values["samples"] is None else values["samples"]
    values["num_inputs"] = 10 * info.num_classes if values["num_inputs"] is None else values["num_inputs"]
    try:
        for name in ("samples", "num_inputs", "batch_size"):
            values[name] = positive_int(values[name], spell(name))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        values["eps"] = positive_float(values["eps"], spell("eps"))
    except ValueError:
        raise ConfigError(f"{spell('eps')} must be a positive number; got {values['eps']!r}") from None
    for name, enum in (("estimator", Estimator), ("sample_loop", SampleLoop)):
        check_choice(values[name], [e.value for e in enum], spell(name))
    try:
        values["micro_batch"] = check_micro_batch(values["micro_batch"], spell("micro_batch"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    order = ("num_classes", "samples", "num_inputs", "batch_size", "eps", "estimator", "sample_loop", "micro_batch",
             "float64")
    return {name: values[name] for name in order
            if name in method.options and (name != "num_classes" or method.needs_data)}


def _examples_per_class(method, k, num_inputs, spell: Spell) -> int | None:
    """The class-balanced scoring set's ``k`` (``None``: no real data), checked: only for the data-driven
    methods, not with ``num_inputs``; PX (``requires_data``) defaults to 10 (``10 × classes`` examples)."""
    if k is None:
        return 10 if method.requires_data else None
    try:
        k = non_negative_int(k, spell("examples_per_class"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not method.needs_data:
        raise ConfigError(f"{spell('examples_per_class')} applies to the data-driven methods (snip, iterative_snip, "
                          f"grasp, px); {method.name!r} scores no data")
    if k == 0 and method.requires_data:
        raise ConfigError(f"{method.name} scores real data: {spell('examples_per_class')} must be at least 1; got 0")
    if k and num_inputs is not None:
        raise ConfigError(f"give {spell('num_inputs')} or {spell('examples_per_class')}, not both")
    return k or None


def resolve_prune(*, model: str, dataset: str = "cifar10", method: str = "ntksap", density: float | None = None,
                  sparsity: float | None = None, iterations: int | None = None, samples: int | None = None,
                  num_inputs: int | None = None, batch_size: int = 256, eps: float = 0.01,
                  estimator: str = "finite_difference", sample_loop: str = "auto", micro_batch: int | str | None = None,
                  schedule: str = "exponential",
                  distribution: str = "global", invert: bool = False, shuffle: bool = False, reinit: bool = False,
                  float64: bool = False, stem: str | None = None, seed: int = 0,
                  examples_per_class: int | None = None, spell: Spell = _plain) -> PrunePlan:
    """Check and resolve a zoo pruning run, touching no device, data or file.

    Defaults are the official ones: NTK-SAP's rounds ``T`` and repeats ``R`` by data set (20 and 5
    on CIFAR-10, 100 and 1 elsewhere), other methods' rounds from their :class:`~ntksap_jax.scores.Method`,
    ``10 × classes`` Gaussian inputs. ``examples_per_class=k`` (data-driven methods; PX: default 10) has
    :func:`prune_zoo` score on ``k`` training examples of every class (:func:`ntksap_jax.data.balanced_batch`).

    Raises:
      ConfigError: naming the bad argument (spelled by ``spell``) and what is allowed.

    Example::

      plan = resolve_prune(model="resnet20", dataset="cifar10", density=0.018)
      plan.config["iterations"], plan.config["scorer"]["samples"]   # 20, 5
    """
    from ntksap_jax.distributions import DISTRIBUTIONS
    from ntksap_jax.models import list_models
    from ntksap_jax.schedules import SCHEDULES
    from ntksap_jax.scores import get_method, list_scorers

    check_choice(model, list_models(), "model")
    info = dataset_info(dataset)
    check_choice(method, list_scorers(), "method")
    check_choice(schedule, SCHEDULES, "schedule")
    check_choice(distribution, ("global", *DISTRIBUTIONS), spell("distribution"))
    m = get_method(method)
    if float64 and "float64" not in m.options:
        raise ConfigError(f"{spell('float64')} applies to {spell('method')} synflow only, not {method!r}")
    density = _density(density, sparsity, spell)
    default_t = info.ntksap_iterations if m.official_by_dataset else m.default_iterations
    try:
        iterations = positive_int(default_t if iterations is None else iterations, spell("iterations"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    values = dict(samples=samples, num_inputs=num_inputs, batch_size=batch_size, eps=eps, estimator=estimator,
                  sample_loop=sample_loop, micro_batch=micro_batch, float64=float64)
    k = _examples_per_class(m, examples_per_class, num_inputs, spell)
    scorer = _scorer_options(m, info, values, spell)
    if k:
        scorer.pop("num_inputs", None)  # every example of the balanced set
    kwargs = model_kwargs(model, stem, dataset, spell)
    config = {
        "dataset": dataset, "input_shape": list(info.input_shape), "num_classes": info.num_classes,
        "iterations": iterations, "schedule": schedule, "distribution": distribution, "invert": bool(invert),
        "shuffle": bool(shuffle), "reinit": bool(reinit), "seed": seed,
        # Training re-creates the init from this seed (a different one with reinit).
        "init_seed": seed + REINIT_SEED_OFFSET if reinit else seed,
        "model_kwargs": kwargs, "scorer": scorer, "examples_per_class": k,
    }
    return PrunePlan(model, method, density, config)


class PrunedZoo(NamedTuple):
    """What :func:`prune_zoo` returns: the masks, the report (``report.json``), the Flax model, its
    init variables (``init_model(model, shape, seed)``) and the scorers' notes (warnings)."""

    masks: PyTree
    report: dict
    model: Any
    variables: dict
    notes: list


def _layer_rows(model, variables, masks, shape) -> tuple[list, dict]:
    """Per-layer rows (forward order) with dead outputs and on-path counts, and the path report."""
    import jax.numpy as jnp

    from ntksap_jax.collapse import path_report, unit_report
    from ntksap_jax.masks import density_report
    from ntksap_jax.models import module_order

    rows = density_report(masks, module_order(model, jnp.zeros((1, *shape), jnp.float32)))
    units = {r["name"]: r for r in unit_report(masks)}
    paths = path_report(model, variables["params"], masks, variables.get("batch_stats"), shape)
    on_path = {r["name"]: r["effective"] for r in paths["layers"]}
    for r in rows:
        r["dead_outputs"] = units[r["name"]]["dead_outputs"] if r["name"] in units else 0
        r["effective"] = on_path[r["name"]]
    return rows, paths


def _environment(mesh) -> dict:
    import flax
    import jax

    import ntksap_jax
    from ntksap_jax.parallel import mesh_summary

    return {"ntksap_jax": ntksap_jax.__version__, "jax": jax.__version__, "flax": flax.__version__,
            "backend": jax.default_backend(), "devices": len(jax.devices()), "mesh": mesh_summary(mesh)}


def _balanced_data(config: dict, data, data_dir: str | None):
    """``k`` examples of every class: chosen from ``data``, or loaded from the training set."""
    from ntksap_jax.data import DataError, balanced_batch, class_balanced, load

    k = config["examples_per_class"]
    try:
        if data is not None:
            return class_balanced(data[0], data[1], k, num_classes=config["num_classes"], seed=config["seed"])
        return balanced_batch(load(config["dataset"], data_dir=data_dir), k, seed=config["seed"])
    except (DataError, ValueError) as e:
        raise ConfigError(str(e)) from None


def prune_zoo(plan: PrunePlan, *, data=None, mesh=None, progress: Callable | None = None,
              data_dir: str | None = None) -> PrunedZoo:
    """Prune a zoo model as ``ntksap-jax prune`` does: :func:`ntksap_jax.prune_model` on the init of
    ``init_model(model, shape, seed)`` with the official algorithm's mask (``off_path="keep"``), then
    the sanity-check shuffle if asked, and the full report.

    Args:
      plan: from :func:`resolve_prune`.
      data: ``(x, y)`` labelled examples for the data-driven methods (``None``: Gaussian inputs with
        random labels, noted in ``notes``).
      mesh, progress: as :func:`ntksap_jax.prune`.
      data_dir: where the training set is (tfds sets), read when the plan has ``examples_per_class`` and
        no ``data`` is given.

    Example::

      pruned = prune_zoo(resolve_prune(model="mlp", dataset="digits", density=0.1, iterations=3))
      pruned.report["total_kept"]
    """
    import jax

    from ntksap_jax.masks import collapsed_layers, count_kept, count_total
    from ntksap_jax.models import get_model
    from ntksap_jax.sanity import shuffle_masks
    from ntksap_jax.steps import init_model
    from ntksap_jax.workflow import prune_model

    config = plan.config
    shape = tuple(config["input_shape"])
    model = get_model(plan.model, config["num_classes"], **config["model_kwargs"])
    variables, prune_key = init_model(model, shape, config["seed"])
    scorer = dict(config["scorer"])
    if config.get("examples_per_class"):
        data = _balanced_data(config, data, data_dir)
    if data is not None and "num_classes" in scorer:
        scorer["data"] = (jax.numpy.asarray(data[0]), jax.numpy.asarray(data[1]))
        config["scorer_data"] = f"{len(data[1])} labelled training images"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = prune_model(model, input_shape=shape, density=plan.density, key=prune_key, method=plan.method,
                             variables=variables, iterations=config["iterations"], schedule=config["schedule"],
                             distribution=config["distribution"], invert=config["invert"], mesh=mesh,
                             progress=progress, zero_norm_scales="keep", off_path="keep", on_collapse="ignore",
                             **scorer)
    masks = result.library_masks
    if config["shuffle"]:
        masks = shuffle_masks(jax.random.fold_in(prune_key, SHUFFLE_KEY), masks)
    rows, paths = _layer_rows(model, variables, masks, shape)
    kept, total = count_kept(masks), count_total(masks)
    report = {
        "model": plan.model, "method": plan.method, "dataset": config["dataset"], "density_target": plan.density,
        "density_actual": kept / total, "total_prunable": total, "total_kept": kept,
        "seconds": result.report["seconds"], "config": config, "layers": rows,
        "collapsed_layers": collapsed_layers(masks), "disconnected": paths["disconnected"],
        "effective_kept": paths["effective_kept"], "dead_units": sum(r["dead_outputs"] for r in rows),
        "zero_score_layers": result.report["zero_score_layers"], "history": result.history,
        "environment": _environment(mesh),
    }
    return PrunedZoo(masks, report, model, variables, [str(w.message) for w in caught])


def tqdm_progress(total_iterations: int | None, desc: str, disable: bool):
    """``(close, progress)``: the ``progress(t, row)`` callback of :func:`ntksap_jax.prune` as a tqdm bar on
    stderr (the round's target density and the weights kept), opened at the first round, and its ``close()``.

    Example::

      close, progress = tqdm_progress(20, "ntksap resnet20", disable=False)
    """
    from tqdm import tqdm

    state = {}

    def progress(t, row):
        if "bar" not in state:
            state["bar"] = tqdm(total=total_iterations, desc=desc, unit="it", disable=disable, file=sys.stderr)
        state["bar"].set_postfix(density=f"{row['density_target']:.4%}", kept=row["kept"])
        state["bar"].update(1)

    def close():
        if "bar" in state:
            state["bar"].close()

    return close, progress


def save_pruned(out: str, pruned: PrunedZoo) -> None:
    """Write ``out/masks.npz`` and ``out/report.json`` (primary process only; every process waits for them)."""
    from ntksap_jax.masks import save_masks
    from ntksap_jax.parallel import is_primary_process, sync_processes

    if is_primary_process():  # one writer; the masks are the same on every device and host
        save_masks(os.path.join(out, "masks.npz"), pruned.masks)
        atomic_write_text(os.path.join(out, "report.json"), json.dumps(pruned.report, indent=1) + "\n")
    sync_processes("ntksap-jax prune: masks written")  # `run` reads them back on every host


def prune_summary(report: dict) -> tuple[str, list[str]]:
    """``(text, warnings)``: the per-layer table and summary lines of a prune report, and its loud
    warnings (all-zero scores, layer collapse, a disconnected network)."""
    from ntksap_jax.masks import format_report

    kept, total = report["total_kept"], report["total_prunable"]
    lines = [format_report(report["layers"], {"on path": "effective"}),
             f"{report['method']} on {report['model']}: kept {kept:,} of {total:,} prunable weights "
             f"(density {kept / total:.4%}, target {report['density_target']:.4%}) in {report['seconds']:.1f} s",
             f"{report['effective_kept']:,} of the kept weights lie on an input-output path; "
             f"{report['dead_units']:,} units receive no weight"]
    loud = []
    if report["zero_score_layers"]:
        loud.append(f"ALL SCORES 0 (the method could not rank them) in {', '.join(report['zero_score_layers'])}")
    if report["collapsed_layers"]:
        loud.append(f"LAYER COLLAPSE: no weight left in {', '.join(report['collapsed_layers'])}")
    if report["disconnected"]:
        loud.append("THE NETWORK IS DISCONNECTED: no path from input to output survives this mask")
    return "\n".join(lines), loud


# ----------------------------------------------------------------------------- folders and devices


def check_out_dir(out: str, overwrite: bool, spell: Spell = _plain) -> None:
    """Refuse an ``out`` that is a file, or a non-empty folder without ``overwrite`` (changes nothing)."""
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise ConfigError(f"{spell('out')} {out!r} exists and is not a folder")
        # (another host's write probe, below, is not content)
        if [n for n in os.listdir(out) if not n.startswith(".probe-")] and not overwrite:
            raise ConfigError(f"{spell('out')} {out!r} exists and is not empty; pass {spell('overwrite')} to replace "
                              "its masks and report")


def prepare_out_dir(out: str, overwrite: bool, spell: Spell = _plain) -> None:
    """:func:`check_out_dir`, then create ``out`` and check that it is writable."""
    check_out_dir(out, overwrite, spell)
    if not os.path.exists(out):
        try:
            os.makedirs(out, exist_ok=True)  # exist_ok: the other hosts of a multi-host run race here
        except OSError as e:
            raise ConfigError(f"cannot create {spell('out')} {out!r}: {e.strerror or e}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{spell('out')} {out!r} is not writable: {e.strerror or e}") from None


def clear_training_outputs(folder: str) -> None:
    """Remove what a previous training run wrote in ``folder`` (call after :func:`check_out_dir`)."""
    from ntksap_jax.checkpoint import CHECKPOINT_DIR, METRICS_FILE
    from ntksap_jax.parallel import is_primary_process, sync_processes

    if is_primary_process():  # one host clears; the others wait for it
        if os.path.isdir(os.path.join(folder, CHECKPOINT_DIR)):
            shutil.rmtree(os.path.join(folder, CHECKPOINT_DIR))
        for name in (METRICS_FILE, "train_report.json"):
            if os.path.exists(os.path.join(folder, name)):
                os.unlink(os.path.join(folder, name))
    sync_processes(f"ntksap-jax: cleared {folder}")


def read_report_beside(mask_path: str) -> dict | None:
    """The ``report.json`` that ``prune`` wrote beside ``mask_path`` (``None`` if absent or unreadable)."""
    path = os.path.join(os.path.dirname(os.path.abspath(mask_path)), "report.json")
    try:
        with open(path) as f:
            report = json.load(f)
        return report if isinstance(report, dict) else None
    except (OSError, ValueError):
        return None


def check_mask_file(path: str, spell: Spell = _plain) -> None:
    """``ConfigError`` unless ``path`` is an existing file (a ``masks.npz`` from ``prune``)."""
    if not os.path.isfile(path):
        raise ConfigError(f"mask file {path!r} does not exist (expected the masks.npz written by `ntksap-jax prune`)")


def device_mesh(devices: int | None = None, model_parallel: int = 1, spell: Spell = _plain):
    """The mesh of the first ``devices`` devices (default all) with ``model_parallel`` of them
    splitting kernels, or ``None`` for one device (the plain single-device path)."""
    import jax

    from ntksap_jax.parallel import make_mesh

    available = jax.device_count()
    n = available if devices is None else devices
    if isinstance(n, bool) or not 1 <= n <= available:
        raise ConfigError(f"{spell('devices')} must be in 1..{available} (the devices JAX sees: "
                          f"{jax.devices()[0].platform} x {available}); got {devices}")
    if model_parallel < 1 or n % model_parallel:
        raise ConfigError(f"{spell('model_parallel')} must be a positive divisor of the device count {n}; "
                          f"got {model_parallel}")
    return None if n == 1 else make_mesh(n, model_parallel=model_parallel)
