"""Compatibility shims for optional third-party packages (private).

Only :mod:`ntksap_jax._compat.neural_tangents` lives here: it lets
neural-tangents 0.6.5 (its last release, 2023) import under the JAX this project
installs by restoring names that JAX has since moved, and nothing else.
"""

from ntksap_jax._compat.neural_tangents import (
    INSTALL_HINT,
    SUPPORTED_IMPLEMENTATIONS,
    UNSUPPORTED_IMPLEMENTATIONS,
    NeuralTangentsUnavailable,
    import_neural_tangents,
    restore_jax_names,
)

__all__ = [
    "INSTALL_HINT",
    "SUPPORTED_IMPLEMENTATIONS",
    "UNSUPPORTED_IMPLEMENTATIONS",
    "NeuralTangentsUnavailable",
    "import_neural_tangents",
    "restore_jax_names",
]
