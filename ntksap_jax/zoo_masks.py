"""The ``validate`` and ``spectrum`` commands' workflows: a zoo network, its init and masks read from files.

Example::

    zoo = load_zoo_with_masks("resnet20", ["runs/r20/masks.npz"])   # dataset and seed from the report.json
    result, where = validate_zoo(zoo, x, x64=True)
"""

from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple, Sequence

from ntksap_jax.runs import ConfigError, check_choice, check_mask_file, dataset_info, model_kwargs, read_report_beside

__all__ = ["ZooWithMasks", "load_zoo_with_masks", "gaussian_batch", "validate_zoo", "write_spectrum", "spectrum_labels",
           "format_spectrum"]

Spell = Callable[[str], str]


def _plain(name: str) -> str:
    return name



class ZooWithMasks(NamedTuple):
    """A zoo network (``name``, the Flax ``model``), its init ``variables``, one example's ``input_shape``,
    the init ``seed``, the ``dataset`` name and the ``masks`` read from the files, in order."""

    name: str
    model: Any
    variables: dict
    input_shape: tuple
    seed: int
    dataset: str
    masks: list


def load_zoo_with_masks(model: str, mask_paths: Sequence[str], *, dataset: str | None = None,
                        stem: str | None = None, seed: int | None = None, spell: Spell = _plain) -> ZooWithMasks:
    """A zoo model, its init and the masks in ``mask_paths`` (checked against its params).

    ``dataset`` and ``seed`` default to those of the ``report.json`` beside the first mask file, so the
    weights are the ones that were pruned (``init_model``'s convention); else ``cifar10`` and 0.

    Example::

      zoo = load_zoo_with_masks("resnet20", ["runs/r20/masks.npz"])
      zoo.masks[0], zoo.variables["params"]
    """
    import jax

    from ntksap_jax.masks import load_masks
    from ntksap_jax.models import get_model, list_models
    from ntksap_jax.steps import init_model

    check_choice(model, list_models(), "model")
    for path in mask_paths:
        check_mask_file(path, spell)
    report = read_report_beside(mask_paths[0]) if mask_paths else None
    for path in mask_paths:
        r = read_report_beside(path)
        if r is not None and r.get("model") not in (None, model):
            raise ConfigError(
                f"{path} was pruned for model {r.get('model')!r} (its report.json says so), not {model!r}"
            )
    dataset = dataset or (report or {}).get("dataset") or "cifar10"
    info = dataset_info(dataset)
    seed = seed if seed is not None else int((report or {}).get("config", {}).get("init_seed", 0))
    net = get_model(model, info.num_classes, **model_kwargs(model, stem, dataset, spell))
    shape = tuple(info.input_shape)
    shapes = jax.eval_shape(lambda: init_model(net, shape, seed)[0])["params"]
    for path in mask_paths:  # check every file against the param shapes before computing anything
        try:
            load_masks(path, shapes)
        except ValueError as e:
            raise ConfigError(f"{e} (is it a mask for {spell('model')} {model} on {dataset}?)") from None
    variables, _ = init_model(net, shape, seed)
    return ZooWithMasks(model, net, variables, shape, seed, dataset,
                        [load_masks(path, variables["params"]) for path in mask_paths])


def gaussian_batch(zoo: ZooWithMasks, n: int):
    """The ``(n, *input_shape)`` standard-normal inputs of ``validate`` and ``spectrum``:
    key ``fold_in(key(seed), 1)``."""
    import jax

    return jax.random.normal(jax.random.fold_in(jax.random.key(zoo.seed), 1), (n, *zoo.input_shape))


def validate_zoo(zoo: ZooWithMasks, batch: int, *, x64: bool = False, tolerance: float | None = None,
                 mask_file: str | None = None, spell: Spell = _plain):
    """:func:`ntksap_jax.validate.validate_ntk` of the zoo network under its first mask (dense without one)
    on :func:`gaussian_batch`, in float64 with ``x64`` (params, masks and inputs cast; x64 switched on only
    inside). Returns ``(ValidationResult, where)``, ``where`` describing the mask and its density."""
    import math

    import jax
    import jax.numpy as jnp

    from ntksap_jax.masks import count_kept, count_total
    from ntksap_jax.validate import validate_ntk

    if tolerance is not None and not (math.isfinite(tolerance) and tolerance > 0):
        raise ConfigError(f"{spell('tolerance')} must be a positive number; got {tolerance!r}")
    x = gaussian_batch(zoo, batch)
    mask = zoo.masks[0] if zoo.masks else None
    variables = zoo.variables
    with jax.enable_x64(bool(x64)):  # scoped: never flips the global flag
        if x64:  # Flax makes float32 params even with x64 on: cast params, masks and inputs
            cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)  # noqa: E731
            variables, x = cast(variables), x.astype(jnp.float64)
            mask = cast(mask) if mask is not None else None
        result = validate_ntk(zoo.model, variables, mask, x, tolerance=tolerance)
    where = f"mask {mask_file} (density {count_kept(mask) / count_total(mask):.4%})" if mask is not None else "dense"
    return result, where


def write_spectrum(zoo: ZooWithMasks, labels: Sequence[str], mask_files: Sequence[str], *, batch: int, draws: int,
                   out: str) -> dict:
    """:func:`ntksap_jax.analysis.spectrum_study` of the zoo network under each mask on :func:`gaussian_batch`
    (``draws`` > 1: averaged over fresh kaiming draws, key ``fold_in(key(seed), 2)``); writes
    ``out/spectrum.json``, ``out/spectrum.png`` and ``out/densities.png`` and returns the study."""
    import json

    import jax

    from ntksap_jax._io import atomic_write_text
    from ntksap_jax.analysis import plot_densities, plot_spectrum, spectrum_study

    key = jax.random.fold_in(jax.random.key(zoo.seed), 2) if draws > 1 else None
    study = spectrum_study(zoo.model, zoo.variables, dict(zip(labels, zoo.masks)), gaussian_batch(zoo, batch),
                           key=key, draws=draws)
    study.update(model=zoo.name, dataset=zoo.dataset, seed=zoo.seed,
                 mask_files=dict(zip(labels, mask_files)))
    atomic_write_text(os.path.join(out, "spectrum.json"), json.dumps(study, indent=1) + "\n")
    plot_spectrum(study, os.path.join(out, "spectrum.png"))
    plot_densities(study, os.path.join(out, "densities.png"))
    return study


def spectrum_labels(mask_paths: Sequence[str], labels: Sequence[str] | None = None, spell: Spell = _plain) -> list:
    """One legend label per mask file: ``labels``, or from each ``report.json`` (method and folder name)."""
    if labels is not None and len(labels) != len(mask_paths):
        raise ConfigError(f"{spell('labels')} gives {len(labels)} labels for {len(mask_paths)} mask files")
    labels = list(labels) if labels else []
    for path in [] if labels else mask_paths:
        r = read_report_beside(path) or {}
        name = os.path.basename(os.path.dirname(os.path.abspath(path)))
        labels.append(f"{r['method']} {name}" if "method" in r and r["method"] not in name else name)
    if len(set(labels)) != len(labels) or "dense" in labels:
        raise ConfigError(f"labels must be distinct and not 'dense'; got {labels} (pass {spell('labels')})")
    return labels


def format_spectrum(study: dict) -> str:
    """A Markdown table of :func:`ntksap_jax.analysis.spectrum_study`'s spectra, one row per mask."""
    n_k = study["config"]["num_examples"] * study["config"]["num_outputs"]
    lines = ["| mask | density | NTK trace | trace / dense | λ_max | λ_min | condition number | rank |",
             "|---|---|---|---|---|---|---|---|"]
    for label, r in study["spectra"].items():
        lam = r["eigenvalues"]
        kappa = "inf" if r["condition_number"] is None else f"{r['condition_number']:.3e}"
        lines.append(f"| {label} | {r['density']:.4f} | {r['trace']:.4e} | {r['relative_trace']:.4f} | {lam[0]:.3e} | "
                     f"{lam[-1]:.3e} | {kappa} | {r['rank']}/{n_k} |")
    return "\n".join(lines)
