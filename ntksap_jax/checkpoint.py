"""Orbax checkpoints of a training run and its ``metrics.jsonl``.

A run's folder holds :data:`METRICS_FILE` (one JSON row per completed epoch, rewritten
atomically) and :data:`CHECKPOINT_DIR` (one orbax checkpoint per epoch: the
:class:`ntksap_jax.steps.TrainState` and ``{"epoch", "step", "seed", "config"}``). Restoring
refuses a checkpoint written with another config or mask, so a resumed run is the run it
continues.

Example::

    manager = checkpoint_manager(os.path.join(out_dir, CHECKPOINT_DIR), keep=3)
    save_checkpoint(manager, epoch, state, config)            # after each epoch
    state = restore_checkpoint(manager, manager.latest_step(), state, config, masks)
    rows = read_metrics(os.path.join(out_dir, METRICS_FILE))
    manager.wait_until_finished(); manager.close()
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from ntksap_jax._checks import is_none
from ntksap_jax._io import atomic_write_text
from ntksap_jax.optim import MaskedState
from ntksap_jax.steps import TrainState

__all__ = [
    "METRICS_FILE",
    "CHECKPOINT_DIR",
    "checkpoint_manager",
    "save_checkpoint",
    "restore_checkpoint",
    "read_metrics",
    "write_metrics",
]

PyTree = Any

#: The per-epoch metrics rows of a run, in its ``out_dir``.
METRICS_FILE = "metrics.jsonl"
#: The orbax checkpoints of a run, in its ``out_dir``.
CHECKPOINT_DIR = "checkpoints"


# --------------------------------------------------------------------------------------------
# metrics.jsonl
# --------------------------------------------------------------------------------------------


def read_metrics(path: str) -> list:
    """The rows of a ``metrics.jsonl`` (``[]`` if there is none; a torn last line ends it).

    Example::

      rows = read_metrics("runs/mlp/metrics.jsonl")   # [{"epoch": 1, ...}, ...]
    """
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    break  # a torn last line (the file is rewritten atomically, so only from outside)
    return rows


def write_metrics(path: str, rows: list) -> None:
    """Replace ``path`` with ``rows``, one JSON object a line (atomically).

    Example::

      write_metrics("runs/mlp/metrics.jsonl", history)
    """
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def checkpoint_manager(directory: str, keep: int):
    """An orbax ``CheckpointManager`` on ``directory`` (created) keeping the last ``keep``.

    Example::

      manager = checkpoint_manager("runs/mlp/checkpoints", keep=3)
      manager.latest_step()   # the last saved epoch, or None
    """
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.abspath(directory), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    )


def _checkpoint_tree(state: TrainState) -> dict:
    return {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": serialization.to_state_dict(state.opt_state),
    }


def _masks_equal(a: PyTree, b: PyTree) -> bool:
    la, lb = jax.tree.leaves(a, is_leaf=is_none), jax.tree.leaves(b, is_leaf=is_none)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if (x is None) != (y is None):
            return False
        if x is not None and not np.array_equal(np.asarray(x) != 0, np.asarray(y) != 0):
            return False
    return True


def save_checkpoint(manager, epoch: int, state: TrainState, config: dict) -> None:
    """Save ``state`` as checkpoint ``epoch`` with ``{"epoch", "step", "seed", "config"}``
    (asynchronously; every process calls it, orbax writes once).

    Example::

      save_checkpoint(manager, 3, state, {"seed": 0, ...})
    """
    import orbax.checkpoint as ocp

    meta = {"epoch": epoch, "step": int(state.step), "seed": config["seed"], "config": config}
    manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(_checkpoint_tree(state)),
                                                meta=ocp.args.JsonSave(meta)))


def _check_config(manager, epoch: int, config: dict) -> None:
    import orbax.checkpoint as ocp

    meta = manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    saved = dict(meta.get("config", {}))
    now = json.loads(json.dumps(config))
    diff = {k: (saved.get(k), now[k]) for k in now if saved.get(k) != now[k]}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"cannot resume: the checkpoint at epoch {epoch} was written with another config ({detail})")


def restore_checkpoint(manager, epoch: int, state: TrainState, config: dict, masks: PyTree, mesh=None) -> TrainState:
    """``state`` with step, params, batch statistics and optimiser state of checkpoint ``epoch``.

    Args:
      manager: from :func:`checkpoint_manager`.
      epoch: the checkpoint to restore (e.g. ``manager.latest_step()``).
      state: a fresh state of the run (its structure, dtypes and, on a mesh, shardings are
        the restore target).
      config: the run's config; must equal the checkpoint's.
      masks: the run's masks; must equal the ones in the checkpoint's optimiser state.
      mesh: the run's mesh, or ``None``.

    Raises:
      ValueError: the checkpoint was written with another config or mask.

    Example::

      state = restore_checkpoint(manager, manager.latest_step(), state, config, masks)
    """
    import orbax.checkpoint as ocp

    _check_config(manager, epoch, config)
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _checkpoint_tree(state))
    restored = manager.restore(epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
    if mesh is None:
        # Orbax returns device-committed arrays; fresh ones are uncommitted, and jit keys its cache on
        # that, so re-create them uncommitted (one host round trip) to reuse train_step's compilation.
        restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), restored)
    # (on a mesh the target carried the state's shardings, so orbax restored each shard in place)
    opt_state = serialization.from_state_dict(state.opt_state, restored["opt_state"])
    if isinstance(opt_state, MaskedState) and not _masks_equal(opt_state.masks, masks):
        raise ValueError(f"cannot resume: the checkpoint at epoch {epoch} was trained with a different mask")
    return state.replace(step=restored["step"], params=restored["params"], batch_stats=restored["batch_stats"],
                         opt_state=opt_state)
