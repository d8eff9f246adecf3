"""Atomic file writes (private): write a temp file beside the target, then ``os.replace``.

Nothing half-written is ever left under the target's name, and on failure the temp file
is removed. The temp file is created with ``open(..., "x")`` rather than
``tempfile.mkstemp``, whose 0600 mode would stick to the final file; this honours the umask.
"""

from __future__ import annotations

import os
import uuid

__all__ = ["atomic_write", "atomic_write_text"]


def _tmp_beside(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: str | os.PathLike, write, *, binary: bool = False) -> None:
    """Call ``write(f)`` on a temp file beside ``path``, then move it onto ``path``.

    Example::

      atomic_write("plot.png", lambda f: fig.savefig(f, format="png"), binary=True)
    """
    path = os.fspath(path)
    tmp = _tmp_beside(path)
    try:
        with open(tmp, "xb" if binary else "x") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a reader sees the old file or the whole new one).

    Example::

      atomic_write_text("run/report.json", json.dumps(report) + "\\n")
    """
    atomic_write(path, lambda f: f.write(text))
