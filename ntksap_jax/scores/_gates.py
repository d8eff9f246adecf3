"""A jaxpr interpreter that evaluates any model with its ReLUs swapped (private; used by ``px.py``).

PX (``scores/px.py``) evaluates one network three ways: as it is, recording which ReLUs are on
(the *gates*); with every ReLU replaced by a multiplication with recorded gates; and with every
ReLU replaced by the identity. The official code does this by monkey-patching PyTorch's
``F.relu`` / ``F.leaky_relu`` (``lib/pruners.py``, class ``PX``, lines 428-434 and 463-472).
JAX has no such hook, and Flax's ``nn.relu`` is a plain function (no module to intercept), so
here the model's ``apply`` is traced to a jaxpr once and re-evaluated equation by equation,
whatever front end wrote it (linen, NNX, ``apply_fn``):

* ``jax.nn.relu`` (a ``custom_jvp_call`` around ``jit[name=relu]``; Flax's ``nn.relu`` is the
  same function) and ``jax.nn.leaky_relu`` (``jit[name=leaky_relu]``) are the activations;
* every other equation is re-bound as it is (convolutions, BatchNorm arithmetic, pooling,
  residual sums), call-like equations that contain an activation (``jit``, ``custom_jvp_call``,
  ``custom_vjp_call``, ``checkpoint``, ``closed_call``) are entered;
* any other nonlinearity (``tanh``, ``logistic``, ``erf``, ``exp``, ... or a ``jax.nn`` function
  such as ``gelu``, ``silu``, ``elu``, ``softplus``) raises a one-line ``ValueError`` naming it;
  so does an activation inside ``scan``/``while``/``cond`` (no order to replay gates in).

Not recognised: a ReLU written by hand as ``jnp.maximum(x, 0)`` or ``jnp.where(x > 0, x, 0)``
(Flax's own BatchNorm clips its variance with ``jnp.maximum(0., var)``, indistinguishable from
such a ReLU in a jaxpr); those run as written in every pass. Use ``jax.nn.relu``.

Example::

    gates = []
    y = evaluate(closed_jaxpr, [params_leaves..., x], mode="record", gates=gates)   # gates filled
    z = evaluate(closed_jaxpr, [w_leaves..., x * x], mode="gate", gates=gates)       # ReLU -> x * gate
"""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

__all__ = ["evaluate", "ACTIVATIONS"]

ACTIVATIONS = ("relu", "leaky_relu")

# jax.nn functions (their ``jit`` names) that are nonlinear and not piecewise linear with gates.
_UNSUPPORTED_NAMES = frozenset({
    "relu6", "elu", "celu", "selu", "gelu", "silu", "swish", "softplus", "sigmoid", "log_sigmoid", "soft_sign",
    "hard_tanh", "hard_sigmoid", "hard_silu", "hard_swish", "mish", "squareplus", "sparse_plus", "sparse_sigmoid",
    "glu", "softmax", "log_softmax", "_softmax", "_log_softmax", "logsumexp", "standardize",
})
# primitives through which a nonlinearity other than a gate would enter the network.
_UNSUPPORTED_PRIMITIVES = frozenset({
    "tanh", "logistic", "erf", "erfc", "erf_inv", "exp", "exp2", "expm1", "log", "log1p", "sin", "cos", "tan",
    "atan", "atan2", "sinh", "cosh", "asinh", "acosh", "atanh", "cbrt",
})
_CALLS = ("jit", "pjit", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "checkpoint", "remat",
          "closed_call", "core_call")
_CONTROL_FLOW = ("scan", "while", "cond")


def _inner(eqn) -> tuple[Any, list] | None:
    """``(jaxpr, consts)`` of a call-like equation (the function it calls), else ``None``."""
    if str(eqn.primitive) not in _CALLS:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if isinstance(sub, jcore.ClosedJaxpr):
            return sub.jaxpr, list(sub.consts)
        if isinstance(sub, jcore.Jaxpr):
            return sub, []
    return None


def _activation(eqn) -> str | None:
    """``"relu"`` / ``"leaky_relu"`` when ``eqn`` is ``jax.nn``'s, else ``None``."""
    prim = str(eqn.primitive)
    if prim in ("jit", "pjit") and eqn.params.get("name") in ACTIVATIONS:
        return eqn.params["name"]
    if prim == "custom_jvp_call":
        inner = _inner(eqn)
        if inner is not None and len(inner[0].eqns) == 1:
            return _activation(inner[0].eqns[0])
    return None


def _unsupported(eqn) -> str | None:
    """The name of an unsupported nonlinearity ``eqn`` applies, else ``None``: a ``jax.nn`` function's name
    (``gelu``: from the equation's traceback, as it is not a ``jit`` of its own), else the primitive's."""
    prim = str(eqn.primitive)
    if prim in ("jit", "pjit") and eqn.params.get("name") in _UNSUPPORTED_NAMES:
        return eqn.params["name"]
    if prim not in _UNSUPPORTED_PRIMITIVES:
        return None
    frames = getattr(getattr(eqn.source_info, "traceback", None), "frames", None) or ()
    caller = [f.function_name for f in frames if "nn/functions" in f.file_name.replace("\\", "/")]
    return f"{caller[0]} ({prim})" if caller else prim


@functools.lru_cache(maxsize=4096)
def _needs_entry(jaxpr) -> bool:
    """Whether ``jaxpr`` (recursively) applies an activation or an unsupported nonlinearity."""
    for eqn in jaxpr.eqns:
        if _activation(eqn) or _unsupported(eqn):
            return True
        inner = _inner(eqn)
        if inner is not None and _needs_entry(inner[0]):
            return True
        for sub in jcore.jaxprs_in_params(eqn.params) if str(eqn.primitive) in _CONTROL_FLOW else ():
            if _needs_entry(sub):
                return True
    return False


class _Gates:
    """The activation hook of one pass: ``record`` (evaluate, append the gates), ``gate`` (multiply by
    the recorded gates, in order) or ``linear`` (identity)."""

    def __init__(self, mode: str, gates: list):
        if mode not in ("record", "gate", "linear"):
            raise ValueError(f"mode must be 'record', 'gate' or 'linear'; got {mode!r}")
        self.mode, self.gates, self.used = mode, gates, 0

    def __call__(self, kind: str, x, slope=None):
        if self.mode == "linear":
            return x
        if self.mode == "gate":
            if self.used >= len(self.gates) or self.gates[self.used].shape != x.shape:
                raise ValueError("px: the gated pass applies its activations in another order or shape than the "
                                 "recording pass (a model whose activations depend on train/eval mode?)")
            gate = self.gates[self.used]
            self.used += 1
            return x * gate
        # relu's gate is 1 where the input is > 0 (official: torch.where(input > 0, 1.0, 0.0));
        # leaky_relu's is its derivative: 1 where x >= 0, else the negative slope (jax.nn.leaky_relu).
        if kind == "relu":
            gate = (x > 0).astype(x.dtype)
        else:
            gate = jnp.where(x >= 0, jnp.ones_like(x), jnp.asarray(slope, x.dtype) * jnp.ones_like(x))
        self.gates.append(lax.stop_gradient(gate))
        return x * gate


def evaluate(closed, args: list, *, mode: str, gates: list) -> list:
    """Evaluate ``closed`` (a ``ClosedJaxpr``) on ``args`` with its ReLUs handled by ``mode``.

    Args:
      closed: the traced model, e.g. ``jax.make_jaxpr(f)(*example_args)``.
      args: the flat input values (any JAX values: tracers of an enclosing ``jit``/``grad`` too).
      mode: ``"record"`` (the network as it is; each activation's gate appended to ``gates``),
        ``"gate"`` (each activation ``a(x)`` replaced by ``x · gates[i]``, in order) or
        ``"linear"`` (each activation replaced by the identity).
      gates: the list to fill (``record``) or read (``gate``).

    Returns:
      The flat outputs.

    Raises:
      ValueError: an unsupported nonlinearity (named), or activations inside lax control flow.
    """
    hook = _Gates(mode, gates)
    out = _eval(closed.jaxpr, list(closed.consts), list(args), hook)
    if mode == "gate" and hook.used != len(gates):
        raise ValueError(f"px: the gated pass applied {hook.used} activations, the recording pass {len(gates)}")
    return out


def _eval(jaxpr, consts: list, args: list, hook: _Gates) -> list:
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, val in zip(jaxpr.constvars, consts):
        env[v] = val
    for v, val in zip(jaxpr.invars, args):
        env[v] = val
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        outs = _eval_eqn(eqn, invals, hook)
        for v, val in zip(eqn.outvars, outs):
            env[v] = val
    return [read(v) for v in jaxpr.outvars]


def _eval_eqn(eqn, invals: list, hook: _Gates) -> list:
    kind = _activation(eqn)
    if kind is not None:
        return [hook(kind, invals[0], invals[1] if kind == "leaky_relu" else None)]
    name = _unsupported(eqn)
    if name is not None:
        raise ValueError(f"px supports only {' and '.join(ACTIVATIONS)} nonlinearities (jax.nn / flax.linen); "
                         f"the model applies {name}")
    inner = _inner(eqn)
    if inner is not None and _needs_entry(inner[0]):
        jaxpr, consts = inner  # the called jaxpr takes every operand (custom_jvp's consts included)
        return _eval(jaxpr, consts, invals, hook)
    if str(eqn.primitive) in _CONTROL_FLOW and any(_needs_entry(s) for s in jcore.jaxprs_in_params(eqn.params)):
        raise ValueError(f"px cannot replay activations inside lax.{eqn.primitive} (scan / while / cond); "
                         "unroll the loop (e.g. flax.linen.scan -> a Python loop)")
    out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))  # as jax.core.eval_jaxpr
    return list(out) if eqn.primitive.multiple_results else [out]
