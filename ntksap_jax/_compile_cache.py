"""JAX's persistent compilation cache for the command line (private; the CLI turns it on).

Every ``ntksap-jax`` command keeps XLA's compiled programs in the user's cache folder
(``$XDG_CACHE_HOME/ntksap-jax/jax-compilation-cache``, else ``~/.cache/...``), so that a second run of
the same command compiles nothing.
Cached executables are XLA's own output for the same program: no result depends on the cache.
``--no-compile-cache`` or ``NTKSAP_JAX_COMPILE_CACHE=0`` turns it off; a cache the user configured
(``JAX_COMPILATION_CACHE_DIR``, or ``jax.config`` in their own process) is used as it is.

Example::

    path, why_not = enable_compile_cache()   # ("/home/me/.cache/ntksap-jax/jax-compilation-cache", None)
"""

from __future__ import annotations

import os

__all__ = ["ENV", "default_cache_dir", "enable_compile_cache"]

#: Set to 0 (or false, off, no) to run every command without the persistent cache.
ENV = "NTKSAP_JAX_COMPILE_CACHE"


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/ntksap-jax/jax-compilation-cache`` (``~/.cache`` without ``XDG_CACHE_HOME``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ntksap-jax", "jax-compilation-cache")


def enable_compile_cache(enabled: bool = True) -> tuple[str | None, str | None]:
    """Turn JAX's persistent compilation cache on, every program cached (no minimum compile time or
    size), unless turned off or already configured. Call it before anything compiles.

    Returns ``(folder in use or None, why it is off or None)``.
    """
    import jax

    if not enabled:
        return None, "--no-compile-cache"
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "off", "no"):
        return None, f"{ENV}={os.environ[ENV]}"
    configured = jax.config.jax_compilation_cache_dir
    if configured:  # the user's own setting wins
        return configured, None
    path = default_cache_dir()
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        return None, f"cannot create {path}: {e.strerror or e}"
    jax.config.update("jax_compilation_cache_dir", path)
    for name in ("jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes"):
        if name.upper() not in os.environ:
            jax.config.update(name, 0)
    return path, None
