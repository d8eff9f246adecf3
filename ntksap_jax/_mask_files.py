"""Mask files (private; public as :func:`ntksap_jax.masks.save_masks` and :func:`ntksap_jax.masks.load_masks`):
an ``.npz`` of boolean arrays named by dotted param path, written atomically, read back checked.

Example::

    save_masks("run/masks.npz", masks)
    masks = load_masks("run/masks.npz", variables["params"])
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntksap_jax._io import atomic_write

__all__ = ["save_masks", "load_masks"]

PyTree = Any


def save_masks(path: str | os.PathLike, masks: PyTree) -> None:
    """Write masks to an ``.npz`` file atomically (temp file in the same folder, then rename).

    Each non-``None`` leaf is stored as a boolean array under its dotted path name;
    dense leaves are not stored. :func:`load_masks` restores them exactly.

    Raises ``ValueError`` if a mask has entries other than 0 and 1.

    Example::

      save_masks("run/masks.npz", masks)
      masks2 = load_masks("run/masks.npz", params)
    """
    from ntksap_jax.masks import named_leaves

    path = os.fspath(path)
    arrays = {}
    for name, m in named_leaves(masks):
        if m is None:
            continue
        a = np.asarray(m)
        if not np.all((a == 0) | (a == 1)):
            raise ValueError(f"mask {name!r} has entries other than 0 and 1; refusing to save it as a mask")
        arrays[name] = a.astype(bool)
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays), binary=True)


def load_masks(path: str | os.PathLike, params: PyTree) -> PyTree:
    """Read masks saved by :func:`save_masks`, rebuilt in the structure of ``params``.

    Leaves of ``params`` that the file does not name get ``None`` (dense). Mask leaves get
    the param's dtype. Raises ``ValueError`` with one clear line when the file is missing,
    unreadable or corrupt, has an entry that is not a 0/1 array, or names a param that
    ``params`` lacks or a shape that differs (a mask made for another model).

    Example::

      masks = load_masks("run/masks.npz", variables["params"])
    """
    from ntksap_jax.masks import named_leaves, path_name

    where = os.fspath(path)
    if not os.path.isfile(where):
        raise ValueError(f"mask file {where!r} does not exist (expected the masks.npz written by `ntksap-jax prune`)")
    try:
        with np.load(where, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError("it holds a single array, not named masks")
            stored = {k: data[k] for k in data.files}
    except Exception as e:  # zipfile.BadZipFile, EOFError, zlib.error, pickle refusal, truncated members, ...
        raise ValueError(
            f"{where}: not a readable masks file ({type(e).__name__}: {e}); "
            "expected an .npz of 0/1 arrays written by save_masks / `ntksap-jax prune`"
        ) from None
    for name, a in stored.items():
        if a.dtype != np.bool_ and not (np.issubdtype(a.dtype, np.number) and np.all((a == 0) | (a == 1))):
            raise ValueError(f"{where}: entry {name!r} is not a 0/1 mask (dtype {a.dtype})")
    names = {n for n, _ in named_leaves(params)}
    unknown = sorted(set(stored) - names)
    if unknown:
        raise ValueError(f"{os.fspath(path)}: masks for params that the model does not have: {unknown[:5]}")

    def build(path_, p):
        name = path_name(path_)
        if name not in stored:
            return None
        a = stored[name]
        if tuple(a.shape) != tuple(jnp.shape(p)):
            raise ValueError(
                f"{os.fspath(path)}: mask {name!r} has shape {tuple(a.shape)}, the param has {tuple(jnp.shape(p))}"
            )
        return jnp.asarray(a, dtype=jnp.result_type(p))

    return jax.tree_util.tree_map_with_path(build, params)
