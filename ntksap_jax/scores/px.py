"""PX (Iurada, Ciccone & Tommasi, CVPR 2024), as the official code computes it.

"Finding Lottery Tickets in Vision Models via Data-driven Spectral Foresight Pruning" bounds the
NTK trace through the network's path decomposition and keeps its data-dependent part (which
ReLUs each example switches on), which NTK-SAP's Gaussian inputs drop. Official code:
``iurada/px-ntk-pruning``, ``lib/pruners.py`` at ``ed6c40e``, class ``PX`` (lines 397-484):

1. *Activation gates* (lines 455, 463-466, 428-430): the network as it is, eval mode
   (BatchNorm on its running statistics), on the real batch ``x``; each ReLU's input is
   recorded and its gate is ``1`` where the input is ``> 0``, else ``0`` (line 433).
2. *Path-activation network* ``z1`` (lines 446-452, 468-469, under ``no_grad``): a copy in
   train mode with every ``state_dict`` entry set to 1 (kernels *and* biases; the masks are kept,
   so a kernel is its mask ``m``), fed ``x²``, each ReLU replaced by ``input · gate``.
3. *Path-kernel network* ``z2`` (lines 437-443, 471-473): a copy in train mode with every
   ``state_dict`` entry squared (kernels and biases: ``w = θ²⊙m``), fed ones, each ReLU replaced
   by the identity.
4. ``R = Σ z1 ⊙ z2`` summed over the scoring batches (``backward`` accumulates, line 474), and
   ``score = |∂R/∂u| · θ²`` (line 484) where ``u`` is the path-kernel copy's raw parameter
   (``θ²``, the mask multiplying in the forward pass) and ``θ`` the model's raw weight: 0 on
   pruned entries.

Exclusions (lines 439 and 448): entries whose name contains ``bn`` or ``fc`` (or the masks) are
neither squared nor set to 1. On the official models (``lottery_resnet``, ``lottery_vgg``,
``imagenet_resnet``) those are the BatchNorm layers and the classifier ``fc``; here, whatever the
front end, they are (a) every normalisation layer (the leaves of a module that owns a
normalisation scale, :attr:`ntksap_jax.model.Model.norm_scale`: scale, bias) and (b) the *head*,
the module owning the prunable weight the forward pass uses last (kernel and bias). Both networks
use them as they are (the head as ``θ⊙m``); the head's score is then ``|∂R/∂θ_head| · θ_head²``
(the official ``p1.grad`` of an unsquared parameter). ``keep_head=False`` treats the head like
every other layer (a pure path kernel). One official quirk is not reproduced: a ResNet's
shortcut BatchNorm is named ``shortcut.1`` there, so the official code squares it / sets it to 1;
here every normalisation layer is left alone.

Activations: ReLU (``jax.nn.relu`` = ``flax.linen.relu``) and leaky ReLU (``jax.nn.leaky_relu``),
found in the traced program whatever the front end (``_gates.py``); any other nonlinearity is a
one-line ``ValueError`` naming it. A leaky ReLU's gate is its derivative (1 or the negative
slope). The official code routes ``F.leaky_relu`` to its ReLU hook (lines 464, 471-472; gates 0/1
and a ReLU in the recording pass), which only agrees for ReLU networks. Max pooling, average
pooling and residual sums run as they are in every pass, as in the official code.

Data: PX needs real examples (``data=(x, y)``; ``y`` only checked, the class-balanced selection
is :func:`ntksap_jax.data.class_balanced`); the official code scores a class-balanced subset
(``get_balanced_subset``, lines 403-426) in batches of 128 and runs 100 rounds
(``launch_scripts/*.sh``: ``'rounds': 100``, ``--batch_size=128``).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from ntksap_jax._checks import is_none as _is_none
from ntksap_jax.masks import path_name
from ntksap_jax.model import as_model
from ntksap_jax.scores._data import params_dtype, prune_data
from ntksap_jax.scores._gates import evaluate
from ntksap_jax.scores._protocol import ScoreFn, TraceCounter

__all__ = ["px_scorer", "px_objective", "px_roles"]

PyTree = Any


def _group(path) -> str:
    name = path_name(path)
    return name.rsplit(".", 1)[0] if "." in name else ""


def _first_use(jaxpr, leaf_of: dict, order: dict, counter: list) -> None:
    """``order[leaf] = n``: the position of each input leaf's first use, entering call-like equations."""
    for eqn in jaxpr.eqns:
        sub = next((p for k in ("jaxpr", "call_jaxpr") if (p := eqn.params.get(k)) is not None), None)
        inner = getattr(sub, "jaxpr", sub)
        if inner is not None and hasattr(inner, "invars") and len(inner.invars) == len(eqn.invars):
            _first_use(inner, {iv: leaf_of[v] for iv, v in zip(inner.invars, eqn.invars)
                               if not isinstance(v, jcore.Literal) and v in leaf_of}, order, counter)
            continue
        counter[0] += 1
        for v in eqn.invars:
            if not isinstance(v, jcore.Literal) and v in leaf_of and leaf_of[v] not in order:
                order[leaf_of[v]] = counter[0]


def px_roles(model, params: PyTree, masks: PyTree, closed) -> list[str]:
    """Each params leaf's role, in ``jax.tree.leaves(params)`` order: ``"head"`` (the module whose
    prunable weight the forward pass uses last), ``"norm"`` (a normalisation layer's leaves) or
    ``"path"`` (squared in the path kernel, set to 1 in the path-activation network).

    ``closed`` is the model traced with the params leaves as its first inputs.

    Example::

      roles = px_roles(model, params, masks, jax.make_jaxpr(f)(params, state, x))   # [..., 'head', 'head']
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    mask_leaves = jax.tree.leaves(masks, is_leaf=_is_none)
    groups = [_group(p) for p, _ in flat]
    norm = {g for (p, leaf), g in zip(flat, groups) if model.norm_scale(p, leaf)}
    order: dict = {}
    _first_use(closed.jaxpr, {v: i for i, v in enumerate(closed.jaxpr.invars[: len(flat)])}, order, [0])
    prunable = [i for i, m in enumerate(mask_leaves) if m is not None]
    head = groups[max(prunable, key=lambda i: order.get(i, -1))] if prunable else None
    return ["head" if g == head else "norm" if g in norm else "path" for g in groups]


def _networks(params, masks, roles, dtype):
    """``(w_act, w_ones, kernel(u), u0)``: the recording net ``θ⊙m``, the path-activation net, the
    path-kernel net as a function of its raw leaves ``u``, and ``u`` itself (``θ²`` or ``θ``)."""
    p = jax.tree.leaves(params)
    m = jax.tree.leaves(masks, is_leaf=_is_none)
    p = [a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in p]
    m = [None if k is None else k.astype(dtype) for k in m]
    w_act = [a if k is None else a * k for a, k in zip(p, m)]
    w_ones = [w if r != "path" else (jnp.ones_like(a) if k is None else k)
              for w, a, k, r in zip(w_act, p, m, roles)]
    u0 = [a * a if r == "path" else a for a, r in zip(p, roles)]

    def kernel(u):
        return [b if k is None or r == "norm" else b * k for b, k, r in zip(u, m, roles)]

    return w_act, w_ones, kernel, u0


def px_objective(closed_eval, closed_train, u, kernel, w_act, w_ones, state_leaves, batches) -> jax.Array:
    """``R = Σ_b Σ z1_b ⊙ z2_b``: the path-activation outputs (under ``stop_gradient``) times the
    path-kernel outputs, summed over the batches ``[x_b, ...]`` (official lines 463-474).

    Args:
      closed_eval, closed_train: the model traced in eval and train mode, inputs
        ``(*params leaves, *state leaves, x)``.
      u: the path-kernel network's raw leaves (differentiate ``R`` w.r.t. them).
      kernel: ``kernel(u)`` -> the leaves the path-kernel network runs with (masks applied).
      w_act, w_ones: the recording and path-activation networks' leaves.
      state_leaves: the normalisation statistics' leaves.
      batches: input batches ``(n_b, *input_shape)``.

    Returns:
      A scalar.
    """
    total = 0.0
    w_pk = kernel(u)
    for x in batches:
        gates: list = []
        evaluate(closed_eval, [*w_act, *state_leaves, x], mode="record", gates=gates)
        z1 = evaluate(closed_train, [*w_ones, *state_leaves, x * x], mode="gate", gates=gates)[0]
        z2 = evaluate(closed_train, [*w_pk, *state_leaves, jnp.ones_like(x)], mode="linear", gates=[])[0]
        total = total + jnp.sum(jax.lax.stop_gradient(z1) * z2)
    return total


def _trace(model, params, state, x, train: bool):
    """The model traced on ``(*params leaves, *state leaves, x)`` (shapes only; no FLOPs spent)."""
    spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), (params, state, x))
    return jax.make_jaxpr(lambda p, s, xb: model.apply(p, s, xb, train=train)[0])(*spec)


def px_scorer(
    model,
    input_shape: Sequence[int],
    *,
    num_classes: int,
    data=None,
    num_inputs: int | None = None,
    batch_size: int = 128,
    keep_head: bool = True,
) -> ScoreFn:
    """Build the PX score function ``score(params, masks, batch_stats, key) -> scores``.

    ``scores = |∂R/∂u| · θ²`` with ``R`` of :func:`px_objective` on the real batches and ``u`` the
    path-kernel network's raw leaves (``θ²``; ``θ`` for the kept head and normalisation layers);
    see the module docstring for each step and the official line it follows. ``key`` is unused:
    the batches are fixed.

    Args:
      model: a linen or NNX module or a :class:`ntksap_jax.model.Model` whose nonlinearities are
        ``jax.nn.relu`` / ``jax.nn.leaky_relu`` (anything else: ``ValueError`` naming it).
      input_shape: one example's shape, e.g. ``(32, 32, 3)``.
      num_classes: number of classes (checks the labels).
      data: required ``(x, y)``: ``x`` of shape ``(N, *input_shape)``, ``y`` int labels ``(N,)``
        (pick a class-balanced set with :func:`ntksap_jax.data.class_balanced`, as the official code).
      num_inputs: examples per call (default all of ``data``).
      batch_size: largest batch (official 128); BatchNorm's batch statistics are per batch.
      keep_head: leave the classifier as it is in both auxiliary networks (the official ``fc``
        exclusion); ``False`` squares it / sets it to 1 like every other layer.

    Returns:
      ``score(params, masks, batch_stats, key)``: a pytree shaped like ``masks`` (``None`` on dense
      leaves), non-negative, 0 on pruned entries, in the params' dtype. It compiles once.

    Raises:
      ValueError: no data, bad data, or an unsupported nonlinearity (at the first call).

    Example::

      xs, ys = class_balanced(x_train, y_train, 10, num_classes=10)
      score = px_scorer(model, (32, 32, 3), num_classes=10, data=(xs, ys))
      result = prune(score, params, batch_stats=bs, density=0.018, iterations=100, key=jax.random.key(0))
    """
    if data is None:
        raise ValueError("px needs real examples: pass data=(x, y) (PX scores which ReLUs real inputs switch on; "
                         "the command line loads a class-balanced training batch)")
    if not isinstance(keep_head, bool):
        raise ValueError(f"keep_head must be True or False; got {keep_head!r}")
    input_shape = tuple(int(s) for s in input_shape)
    model = as_model(model, input_shape)
    pdata = prune_data("px", input_shape, num_classes=num_classes, data=data, num_inputs=num_inputs,
                       batch_size=batch_size)
    counter = TraceCounter()

    @jax.jit
    @counter.wrap
    def _score(params, masks, batch_stats, x, y):
        dtype = params_dtype(params)
        batches = [xb for xb, _ in pdata.batches(None, x, y, dtype)]
        state = batch_stats or None
        traced = {n: (_trace(model, params, state, batches[0][:n], False), _trace(model, params, state,
                                                                                 batches[0][:n], True))
                  for n in sorted({b.shape[0] for b in batches})}
        roles = px_roles(model, params, masks, traced[batches[0].shape[0]][0])
        if not keep_head:
            roles = ["path" if r == "head" else r for r in roles]
        w_act, w_ones, kernel, u0 = _networks(params, masks, roles, dtype)
        state_leaves = jax.tree.leaves(state)

        def objective(u):
            total = 0.0
            for xb in batches:
                closed_eval, closed_train = traced[xb.shape[0]]
                total = total + px_objective(closed_eval, closed_train, u, kernel, w_act, w_ones, state_leaves, [xb])
            return total

        grads = jax.grad(objective)(u0)
        theta = jax.tree.leaves(params)
        flat = [None if k is None else jnp.abs(g) * (t.astype(dtype) ** 2)
                for k, g, t in zip(jax.tree.leaves(masks, is_leaf=_is_none), grads, theta)]
        return jax.tree.unflatten(jax.tree.structure(masks, is_leaf=_is_none), flat)

    x, y = pdata.arrays

    def score(params, masks, batch_stats, key):
        return _score(params, masks, batch_stats, x, y)

    return ScoreFn(score, counter, lambda p, m, bs, k: [(_score.lower(p, m, bs, x, y), 1)])
