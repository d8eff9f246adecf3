"""Training workflows on the benchmark presets: ``ntksap-jax train`` and ``ntksap-jax run`` as library functions.

:func:`train_preset` trains a preset's network (dense, or under a mask from ``prune``) from the init the mask
was pruned on; :func:`run_preset` prunes a preset's network (:func:`ntksap_jax.runs.prune_zoo`, with a real
labelled batch for the data-driven methods), then trains the pruned and the dense network from the same init.
Both write into folders atomically and return their reports; :func:`resolve_train` / :func:`resolve_run`
check a whole configuration first, touching no device, data or file (what ``--dry-run`` prints).

Example::

    reports = run_preset("mlp-digits", method="ntksap", density=0.1, out="runs/mlp", overwrite=True)
    reports["ntksap pruned"]["final"]["test_top1"]
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from ntksap_jax._checks import positive_int
from ntksap_jax._io import atomic_write_text
from ntksap_jax.runs import (
    ConfigError,
    PrunePlan,
    check_mask_file,
    clear_training_outputs,
    prepare_out_dir,
    prune_zoo,
    read_report_beside,
    resolve_prune,
    save_pruned,
)

__all__ = ["get_preset_or_error", "resolve_train", "resolve_run", "train_preset", "run_preset", "format_accuracy"]

Spell = Callable[[str], str]


def _plain(name: str) -> str:
    return name


def get_preset_or_error(name: str):
    """:func:`ntksap_jax.presets.get_preset`, raising :class:`~ntksap_jax.runs.ConfigError`."""
    from ntksap_jax.presets import get_preset

    try:
        return get_preset(name)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def resolve_train(preset, *, epochs: int | None = None, batch_size: int | None = None,
                  spell: Spell = _plain) -> dict:
    """The preset's training keyword arguments with the overrides applied (checked)."""
    kwargs = preset.train_kwargs()
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if value is not None:
            try:
                kwargs[name] = positive_int(value, spell(name))
            except ValueError as e:
                raise ConfigError(str(e)) from None
    return kwargs


def resolve_run(preset, *, method: str = "ntksap", density: float | None = None, sparsity: float | None = None,
                iterations: int | None = None, seed: int = 0, examples_per_class: int | None = 10,
                spell: Spell = _plain) -> PrunePlan:
    """The pruning half of :func:`run_preset`: the preset's model, data set, NTK-SAP ``T`` and ``R``
    and Gaussian-input count; the official defaults otherwise. The data-driven methods score
    ``examples_per_class`` training images of every class (default 10; 0: the first ``10 × classes``
    of a shuffled epoch, unbalanced); the others ignore it."""
    from ntksap_jax.runs import check_choice
    from ntksap_jax.scores import get_method, list_scorers

    ntksap = method == "ntksap"
    if iterations is None and ntksap:
        iterations = preset.ntksap_iterations
    check_choice(method, list_scorers(), "method")
    balanced = get_method(method).needs_data and examples_per_class not in (None, 0)
    return resolve_prune(model=preset.model, dataset=preset.dataset, method=method, density=density,
                         sparsity=sparsity, iterations=iterations, samples=preset.ntksap_samples if ntksap else None,
                         num_inputs=None if balanced else preset.ntksap_num_inputs,
                         stem=dict(preset.model_kwargs).get("stem"), seed=seed,
                         examples_per_class=examples_per_class if get_method(method).needs_data else None, spell=spell)


def _load_dataset(preset, data_dir):
    from ntksap_jax.data import DataError, load

    try:
        return load(preset.dataset, data_dir=data_dir)
    except DataError as e:
        raise ConfigError(str(e)) from None


def _train_one(preset, model, variables, masks, dataset, kwargs: dict, out: str, *, seed: int, resume: bool,
               label: str, mesh=None, progress: bool = True, log: Callable = print) -> dict:
    """Train one network into ``out``; its report (final metrics row, config, mesh) goes to ``train_report.json``."""
    from ntksap_jax.parallel import is_primary_process, mesh_summary
    from ntksap_jax.train import train

    log(f"training {label}: {preset.model} on {preset.dataset}, {kwargs['epochs']} epochs, batch "
        f"{kwargs['batch_size']}, lr {kwargs['lr']} ({kwargs['schedule']}) -> {out}")
    result = train(model, variables, masks, dataset, seed=seed, out_dir=out, resume=resume, progress=progress,
                   mesh=mesh, **kwargs)
    final = dict(result.history[-1]) if result.history else {}
    report = {"preset": preset.name, "label": label, "epochs_done": result.epoch, "final": final,
              "train_config": kwargs, "seed": seed, "mesh": mesh_summary(mesh)}
    if is_primary_process():
        atomic_write_text(os.path.join(out, "train_report.json"), json.dumps(report, indent=1) + "\n")
    return report


def train_preset(preset_name: str, *, out: str, masks_path: str | None = None, seed: int | None = None,
                 epochs: int | None = None, batch_size: int | None = None, data_dir: str | None = None,
                 resume: bool = False, overwrite: bool = False, mesh=None, progress: bool = True,
                 log: Callable = print, spell: Spell = _plain) -> dict:
    """Train a preset's network into ``out`` (``metrics.jsonl``, ``checkpoints/``, ``train_report.json``).

    With ``masks_path`` (a ``masks.npz`` from ``prune``) it trains the pruned network from the init the
    mask was pruned on (the ``init_seed`` of the ``report.json`` beside it, unless ``seed`` is given);
    without, the dense one. ``resume`` continues from the last checkpoint in ``out``.

    Returns ``{label: report}`` with ``label`` ``"pruned"`` or ``"dense"``.

    Example::

      reports = train_preset("mlp-digits", masks_path="runs/mlp/masks.npz", epochs=5, out="runs/mlp-train")
    """
    import jax

    from ntksap_jax.masks import load_masks
    from ntksap_jax.steps import init_model

    preset = get_preset_or_error(preset_name)
    kwargs = resolve_train(preset, epochs=epochs, batch_size=batch_size, spell=spell)
    report = read_report_beside(masks_path) if masks_path else None
    if masks_path:
        check_mask_file(masks_path, spell)
        if report is not None and report.get("model") not in (None, preset.model):
            raise ConfigError(f"{masks_path} was pruned for model {report.get('model')!r} (its report.json says so), "
                              f"but preset {preset.name} trains {preset.model!r}")
    seed = int((report or {}).get("config", {}).get("init_seed", 0)) if seed is None else seed
    if resume:
        if not os.path.isdir(out):
            raise ConfigError(f"{spell('resume')}: {out!r} does not exist; nothing to resume")
    else:
        prepare_out_dir(out, overwrite, spell)
        clear_training_outputs(out)
    dataset = _load_dataset(preset, data_dir)
    model = preset.build_model()
    variables, _ = init_model(model, preset.input_shape, seed)
    masks = None
    if masks_path:
        try:
            load_masks(masks_path, jax.eval_shape(lambda: variables["params"]))
        except ValueError as e:
            raise ConfigError(f"{e} (is it a mask for preset {preset.name}, model {preset.model}?)") from None
        masks = load_masks(masks_path, variables["params"])
    label = "pruned" if masks is not None else "dense"
    return {label: _train_one(preset, model, variables, masks, dataset, kwargs, out, seed=seed, resume=resume,
                              label=label, mesh=mesh, progress=progress, log=log)}


def _scoring_batch(preset, dataset, seed: int):
    """A real labelled batch for the data-driven methods: ``10 × classes`` training images."""
    import numpy as np

    n = min(preset.ntksap_num_inputs, dataset.info.num_train)
    batch = next(iter(dataset.train_batches(n, seed=seed, epoch=0)))
    return np.asarray(batch["image"]), np.asarray(batch["label"])


def run_preset(preset_name: str, *, out: str, method: str = "ntksap", density: float | None = None,
               sparsity: float | None = None, iterations: int | None = None, seed: int = 0, dense: bool = True,
               epochs: int | None = None, batch_size: int | None = None, data_dir: str | None = None,
               overwrite: bool = False, mesh=None, progress: bool = True, prune_progress: Callable | None = None,
               on_pruned: Callable | None = None, log: Callable = print, examples_per_class: int | None = 10,
               spell: Spell = _plain) -> dict:
    """Prune a preset's network into ``out``, then train it into ``out/pruned`` and, with ``dense``, the dense
    network into ``out/dense`` from the same init; writes ``out/run_report.json``.

    Data-driven methods (``Method.needs_data``) score on a class-balanced labelled batch: ``examples_per_class``
    training images of every class (default 10; ``0``: the first ``10 × classes`` of a shuffled epoch).
    ``prune_progress(t, row)`` is called after each pruning round; ``on_pruned(pruned)`` with the
    :class:`~ntksap_jax.runs.PrunedZoo` before training; ``progress`` shows the training bars.

    Returns ``{label: train report}`` for ``"dense"`` and ``"<method> pruned"``.

    Example::

      reports = run_preset("mlp-digits", method="ntksap", density=0.1, out="runs/mlp", overwrite=True)
    """
    from ntksap_jax.masks import load_masks
    from ntksap_jax.runs import check_out_dir
    from ntksap_jax.scores import get_method

    preset = get_preset_or_error(preset_name)
    kwargs = resolve_train(preset, epochs=epochs, batch_size=batch_size, spell=spell)
    plan = resolve_run(preset, method=method, density=density, sparsity=sparsity, iterations=iterations, seed=seed,
                       examples_per_class=examples_per_class, spell=spell)
    check_out_dir(out, overwrite, spell)
    dataset = _load_dataset(preset, data_dir)
    prepare_out_dir(out, overwrite, spell)
    data = None
    if plan.config["examples_per_class"]:
        from ntksap_jax.data import balanced_batch

        try:
            data = balanced_batch(dataset, plan.config["examples_per_class"], seed=seed)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    elif get_method(method).needs_data:
        data = _scoring_batch(preset, dataset, seed)
    pruned = prune_zoo(plan, data=data, mesh=mesh, progress=prune_progress)
    save_pruned(out, pruned)
    if on_pruned is not None:
        on_pruned(pruned)
    masks = load_masks(os.path.join(out, "masks.npz"), pruned.variables["params"])  # as every host reads them
    runs = ([("dense", None)] if dense else []) + [(f"{method} pruned", masks)]
    reports = {}
    for label, masks in runs:
        folder = os.path.join(out, label.split()[-1])
        prepare_out_dir(folder, True, spell)
        clear_training_outputs(folder)
        reports[label] = _train_one(preset, pruned.model, pruned.variables, masks, dataset, kwargs, folder,
                                    seed=seed, resume=False, label=label, mesh=mesh, progress=progress, log=log)
    summary = {label: {"density": r["final"].get("density"), "test_top1": r["final"].get("test_top1")}
               for label, r in reports.items()}
    from ntksap_jax.parallel import is_primary_process

    if is_primary_process():
        atomic_write_text(os.path.join(out, "run_report.json"),
                          json.dumps({"preset": preset.name, "method": method, "seed": seed, "results": summary},
                                     indent=1) + "\n")
    return reports


def format_accuracy(reports: dict[str, Any]) -> str:
    """A Markdown table of train reports: network, density, epochs, test top-1, test loss."""
    lines = ["| network | density | epochs | test top-1 | test loss |", "|---|---|---|---|---|"]
    for label, r in reports.items():
        f = r["final"]
        top1 = f"{100 * f['test_top1']:.2f}%" if "test_top1" in f else "–"
        loss = f"{f['test_loss']:.4f}" if "test_loss" in f else "–"
        lines.append(f"| {label} | {f.get('density', 1.0):.4f} | {r['epochs_done']} | {top1} | {loss} |")
    return "\n".join(lines)
