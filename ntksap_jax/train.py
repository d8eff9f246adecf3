"""The training loop: SGD (PyTorch semantics) on a pruned network whose pruned weights stay exactly 0.

:func:`train` runs the epochs with a progress bar, test evaluation, ``metrics.jsonl`` and
orbax checkpoints every epoch; ``resume=True`` continues bit-identically where it stopped. Its
pieces live in :mod:`ntksap_jax.optim` (``masked``, ``sgd``, ``make_schedule``),
:mod:`ntksap_jax.steps` (``TrainState``, ``init_model``, the jitted steps, ``evaluate``) and
:mod:`ntksap_jax.checkpoint` (checkpoints and the metrics file).

Example::

    model = get_model("mlp", 10)
    variables, prune_key = init_model(model, (8, 8, 1), seed=0)
    masks = prune(ntksap_scorer(model, (8, 8, 1), samples=1), variables["params"],
                  density=0.1, iterations=20, key=prune_key).masks
    result = train(model, variables, masks, load("digits"), epochs=40, batch_size=64, lr=0.05,
                   weight_decay=5e-4, schedule="cosine", out_dir="runs/mlp")
    result.history[-1]["test_top1"], pruned_weights_are_zero(result.state.params, masks)  # (0.97.., True)
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from ntksap_jax._checks import positive_int
from ntksap_jax.checkpoint import (
    CHECKPOINT_DIR,
    METRICS_FILE,
    checkpoint_manager,
    read_metrics,
    restore_checkpoint,
    save_checkpoint,
    write_metrics,
)
from ntksap_jax.masks import count_kept, count_total
from ntksap_jax.optim import make_schedule, sgd
from ntksap_jax.parallel import cpu_collectives_need_serial, is_primary_process, mesh_context, shard_batch
from ntksap_jax.steps import (
    TrainState,
    accumulate,
    check_divides,
    create_train_state,
    evaluate,
    shard_state,
    sharded_train_step,
    summarise,
    train_step,
)

__all__ = ["TrainResult", "train"]

PyTree = Any


class TrainResult(NamedTuple):
    """What :func:`train` returns.

    Attributes:
      state: the final :class:`ntksap_jax.steps.TrainState`.
      history: one dict per completed epoch (the ``metrics.jsonl`` rows, earlier runs'
        included when resumed).
      epoch: epochs completed.
    """

    state: TrainState
    history: list
    epoch: int


@dataclasses.dataclass(frozen=True)
class _Loop:
    """:func:`train`'s checked settings, as the epoch loop reads them."""

    epochs: int
    stop: int
    batch_size: int
    steps_per_epoch: int
    eval_every: int
    eval_batch_size: int
    keep_checkpoints: int
    seed: int
    top5: bool
    progress: bool
    mesh: Any
    serial: bool
    density: float = 1.0


def train(
    model,
    variables: PyTree,
    masks: PyTree,
    dataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    schedule: str = "step",
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    warmup_epochs: int = 0,
    seed: int = 0,
    out_dir: str | None = None,
    resume: bool = False,
    progress: bool = True,
    eval_every: int = 1,
    eval_batch_size: int = 256,
    top5: bool = False,
    keep_checkpoints: int = 3,
    stop_after: int | None = None,
    callback: Callable[[dict], None] | None = None,
    mesh=None,
) -> TrainResult:
    """Train ``θ₀ ⊙ m`` with SGD for ``epochs`` epochs; pruned weights stay exactly 0.

    Each epoch ``e`` (0-based) draws its batches from ``dataset.train_batches(batch_size,
    seed=seed, epoch=e)`` — a pure function of ``(seed, e)`` — shows a progress bar, evaluates
    on the test split (every ``eval_every`` epochs and after the last), appends a row to
    ``out_dir/metrics.jsonl`` and saves an orbax checkpoint (state, epoch, seed and config) to
    ``out_dir/checkpoints/<epoch>``, keeping the last ``keep_checkpoints``. With
    ``resume=True`` the latest checkpoint is restored and training continues from the next
    epoch; since nothing else is random, the result is bit-identical to an uninterrupted run,
    and ``metrics.jsonl`` is cut back to the restored epoch so no epoch is listed twice.

    Rows: ``{"epoch" (1-based, completed), "step", "lr" (at the epoch's first step),
    "train_loss", "train_top1", ["train_top5"], ["test_loss", "test_top1", ["test_top5"],
    "test_count"], "density", "seconds"}``; accuracies are fractions in [0, 1].

    Args:
      model: the Flax module.
      variables: ``model.init`` output: the SAME init the masks were pruned on (see
        :func:`ntksap_jax.steps.init_model`).
      masks: mask pytree for ``variables["params"]`` or ``None`` (dense).
      dataset: an ``ntksap_jax.data`` dataset (``train_batches``, ``steps_per_epoch``, ``eval_batches``).
      epochs: total epochs (the schedule's length).
      batch_size: training batch size.
      lr, momentum, nesterov, weight_decay: :func:`ntksap_jax.optim.sgd` (PyTorch semantics).
      schedule, milestones, gamma, warmup_epochs: :func:`ntksap_jax.optim.make_schedule`.
      seed: data-order seed (recorded in checkpoints; a resumed run must use the same).
      out_dir: folder for ``metrics.jsonl`` and ``checkpoints/``; ``None``: nothing written.
      resume: continue from the latest checkpoint in ``out_dir`` (from scratch if there is none).
      progress: show a tqdm bar per epoch (on stderr).
      eval_every: evaluate every this many epochs (and after the last).
      eval_batch_size: evaluation batch size.
      top5: also report top-5 accuracy (ImageNet-scale runs).
      keep_checkpoints: how many most recent checkpoints to keep.
      stop_after: return after this many epochs in total (e.g. to fit a time limit; a later
        call with ``resume=True`` continues). Default: ``epochs``.
      callback: called with each epoch's row.
      mesh: a device mesh (:func:`ntksap_jax.parallel.make_mesh`) to train data-parallel on:
        the state is placed with :func:`ntksap_jax.steps.shard_state`, every batch is split over
        the ``data`` axis (``batch_size`` and ``eval_batch_size`` must divide by its size),
        gradients are averaged and BatchNorm statistics taken over the global batch by the
        compiler, so the run matches a one-device run up to float32 rounding. Across hosts every
        process calls ``train`` with the same arguments; only process 0 writes ``metrics.jsonl``,
        and orbax writes each checkpoint once. ``None``: one device.

    Returns:
      :class:`TrainResult` ``(state, history, epoch)``.

    Raises:
      ValueError: a bad argument; ``out_dir`` already holds checkpoints and ``resume`` is
        False; or the checkpoint was written with another config, seed or mask.

    Example::

      result = train(model, variables, masks, load("digits"), epochs=40, batch_size=64, lr=0.05,
                     schedule="cosine", weight_decay=5e-4, out_dir="runs/mlp")
      result = train(..., out_dir="runs/mlp", resume=True)   # after an interruption
    """
    loop = _checked_loop(dataset, epochs=epochs, batch_size=batch_size, eval_every=eval_every,
                         eval_batch_size=eval_batch_size, keep_checkpoints=keep_checkpoints, stop_after=stop_after,
                         seed=seed, resume=resume, out_dir=out_dir, top5=top5, progress=progress, mesh=mesh)
    lr_fn = make_schedule(schedule, lr, loop.epochs, loop.steps_per_epoch, milestones, gamma, warmup_epochs)
    tx = sgd(lr_fn, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    # The jitted step is built (or, for one device, looked up) once per call and passed down, so
    # every epoch reuses one compilation.
    state = create_train_state(model, variables, masks, tx)
    step_fn = train_step
    if mesh is not None:
        state = shard_state(state, mesh)
        step_fn = sharded_train_step(state, mesh)
    loop = dataclasses.replace(loop, density=1.0 if masks is None else count_kept(masks) / max(count_total(masks), 1))
    config = {
        "epochs": loop.epochs, "batch_size": loop.batch_size, "lr": float(lr), "momentum": float(momentum),
        "nesterov": bool(nesterov), "weight_decay": float(weight_decay), "schedule": schedule,
        "milestones": [int(m) for m in milestones], "gamma": float(gamma), "warmup_epochs": int(warmup_epochs),
        "seed": int(seed), "steps_per_epoch": loop.steps_per_epoch, "density": loop.density,
    }
    return _run(state, step_fn, lr_fn, dataset, masks, loop, config, out_dir=out_dir, resume=resume,
                callback=callback)


def _checked_loop(dataset, *, epochs, batch_size, eval_every, eval_batch_size, keep_checkpoints, stop_after, seed,
                  resume, out_dir, top5, progress, mesh) -> _Loop:
    """:func:`train`'s loop settings, checked (``ValueError`` on the first bad one)."""
    epochs = positive_int(epochs, "epochs")
    batch_size = positive_int(batch_size, "batch_size")
    eval_every = positive_int(eval_every, "eval_every")
    eval_batch_size = positive_int(eval_batch_size, "eval_batch_size")
    keep_checkpoints = positive_int(keep_checkpoints, "keep_checkpoints")
    stop = epochs if stop_after is None else positive_int(stop_after, "stop_after")
    if stop > epochs:
        raise ValueError(f"stop_after must be <= epochs={epochs}; got {stop_after!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer; got {seed!r}")
    if resume and out_dir is None:
        raise ValueError("resume=True needs the out_dir that holds the checkpoints; got out_dir=None")
    check_divides("batch_size", batch_size, mesh)
    check_divides("eval_batch_size", eval_batch_size, mesh)
    steps_per_epoch = int(dataset.steps_per_epoch(batch_size))
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} gives no full training batch for this dataset")
    return _Loop(epochs=epochs, stop=stop, batch_size=batch_size, steps_per_epoch=steps_per_epoch,
                 eval_every=eval_every, eval_batch_size=eval_batch_size, keep_checkpoints=keep_checkpoints,
                 seed=seed, top5=top5, progress=progress, mesh=mesh, serial=cpu_collectives_need_serial(mesh))


def _run(state: TrainState, step_fn: Callable, lr_fn: Callable, dataset, masks: PyTree, loop: _Loop, config: dict,
         *, out_dir: str | None, resume: bool, callback: Callable[[dict], None] | None) -> TrainResult:
    """The epochs from the restored checkpoint's (``resume``) or 0 to ``loop.stop``; with an
    ``out_dir``, the metrics file and a checkpoint after each."""
    manager = None
    try:
        if out_dir is not None:
            os.makedirs(out_dir, exist_ok=True)
            manager = checkpoint_manager(os.path.join(out_dir, CHECKPOINT_DIR), loop.keep_checkpoints)
        state, start, history = _start(manager, out_dir, resume, state, config, masks, loop.mesh)
        done = start
        for epoch in range(start, loop.stop):
            state, row = _train_epoch(state, step_fn, lr_fn, dataset, loop, epoch)
            history.append(row)
            if manager is not None:
                if is_primary_process():
                    write_metrics(os.path.join(out_dir, METRICS_FILE), history)
                save_checkpoint(manager, epoch + 1, state, config)  # every process calls it; orbax writes once
            done = epoch + 1
            if callback is not None:
                callback(row)
    finally:
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
    return TrainResult(state=state, history=history, epoch=done)


def _start(manager, out_dir: str | None, resume: bool, state: TrainState, config: dict, masks: PyTree,
           mesh) -> tuple[TrainState, int, list]:
    """``(state, first epoch, history)``: restored from the latest checkpoint when resuming,
    else fresh (refusing an ``out_dir`` that already holds checkpoints)."""
    if manager is None:
        return state, 0, []
    metrics_path = os.path.join(out_dir, METRICS_FILE)
    latest = manager.latest_step()
    if latest is not None and not resume:
        raise ValueError(
            f"{out_dir!r} already holds checkpoints (latest: epoch {latest}); pass resume=True to "
            "continue or choose a new out_dir"
        )
    start, history = 0, []
    if latest is not None:
        state = restore_checkpoint(manager, latest, state, config, masks, mesh)
        start = latest
        history = [r for r in read_metrics(metrics_path) if int(r.get("epoch", 0)) <= latest]
    # a fresh run starts a fresh file; a resumed one drops rows written after its checkpoint
    if is_primary_process():
        write_metrics(metrics_path, history)
    return state, start, history


def _train_epoch(state: TrainState, step_fn: Callable, lr_fn: Callable, dataset, loop: _Loop,
                 epoch: int) -> tuple[TrainState, dict]:
    """One epoch (0-based ``epoch``) of steps, then its test evaluation: ``(state, row)``."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    row = {"epoch": epoch + 1, "lr": float(f"{float(lr_fn(epoch * loop.steps_per_epoch)):.8g}")}
    bar = tqdm(total=loop.steps_per_epoch, desc=f"epoch {epoch + 1}/{loop.epochs}", unit="step",
               disable=not loop.progress, file=sys.stderr, leave=True)
    state, sums = _train_batches(state, step_fn, dataset, loop, epoch, bar)
    row["step"] = int(state.step)
    row.update({f"train_{k}": v for k, v in summarise(sums, loop.top5).items() if k != "count"})
    if (epoch + 1) % loop.eval_every == 0 or epoch + 1 == loop.epochs:
        test = evaluate(state, dataset, loop.eval_batch_size, "test", loop.top5, mesh=loop.mesh)
        row.update({f"test_{k}": v for k, v in test.items()})
    row["density"] = loop.density
    row["seconds"] = time.perf_counter() - t0
    if loop.progress:
        bar.set_postfix({k: round(row[k], 4) for k in ("train_loss", "train_top1", "test_top1") if k in row})
    bar.close()
    return state, row


def _train_batches(state: TrainState, step_fn: Callable, dataset, loop: _Loop, epoch: int,
                   bar) -> tuple[TrainState, dict]:
    """The optimiser steps of one epoch: ``(state, summed batch metrics)``."""
    sums = None
    for i, batch in enumerate(dataset.train_batches(loop.batch_size, seed=loop.seed, epoch=epoch)):
        if loop.mesh is not None:
            batch = shard_batch(batch, loop.mesh)
        with mesh_context(loop.mesh):
            state, m = step_fn(state, batch)
        sums = accumulate(sums, m, loop.serial)
        bar.update(1)
        if loop.progress and (i % 20 == 0 or i + 1 == loop.steps_per_epoch):
            bar.set_postfix(loss=f"{float(m['loss_sum']) / max(int(m['count']), 1):.4f}")
    if sums is None:
        raise ValueError(f"epoch {epoch}: the dataset gave no training batches")
    return state, sums
