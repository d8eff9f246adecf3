"""Start-up of a prune (issue 18, part 2): the init is one compiled program and so are the masks, with
the same values as before; a fresh ``ntksap-jax prune`` compiles a handful of programs before its first
round, however many leaves the model has."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ntksap_jax.masks import apply_masks, apply_masks_jit, init_masks
from ntksap_jax.model import as_model
from ntksap_jax.models import get_model
from ntksap_jax.steps import init_model
from ntksap_jax.workflow import split_key, unit_norm_scales


def _leaves(tree):
    return [(jax.tree_util.keystr(p), np.asarray(x)) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def _bitwise_equal(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_init_model_gives_the_params_and_keys_of_before():
    """``init_model(model, shape, seed)`` (keys from one compiled program) gives bitwise the keys of eager
    ``split(key(seed))`` and bitwise the params of the CLI's path before this change, ``jit(model.init)`` on
    the first of them: threefry is integer arithmetic, so the same key gives the same bits however it is
    compiled.

    The eager, op-by-op ``module.init`` is NOT bitwise the same: the random bits are, but XLA fuses the
    float transform of truncated-normal / variance-scaling draws into one loop under jit and rounds some
    entries differently (about half of ResNet-20's conv kernels' entries, by at most 2 ulp; jax 0.10.2 CPU).
    The CLI has drawn its init under jit since the training split (commit 3582b26), so that is the meaning
    a seed has kept; the eager init stays within 2 ulp of it."""
    model = get_model("resnet20", 10)
    shape = (32, 32, 3)
    variables, prune_key = init_model(model, shape, seed=3)
    k_init, k_prune = jax.random.split(jax.random.key(3))  # eager, as init_model did before
    assert _bitwise_equal(np.asarray(jax.random.key_data(prune_key)), np.asarray(jax.random.key_data(k_prune)))
    before = jax.jit(as_model(model, shape).init)(k_init)
    new, old = _leaves(variables), _leaves(before)
    assert [n for n, _ in new] == [n for n, _ in old]
    assert all(_bitwise_equal(a, b) for (_, a), (_, b) in zip(new, old))
    eager = _leaves(model.init(k_init, jnp.zeros((1, *shape), jnp.float32), train=False))
    assert [n for n, _ in eager] == [n for n, _ in new]
    for (name, a), (_, b) in zip(eager, new):
        assert np.max(np.abs(a - b) / np.spacing(np.maximum(np.abs(a), np.abs(b))), initial=0) <= 2, name


def test_split_key_is_split():
    key = jax.random.key(11)
    for a, b in zip(split_key(key), jax.random.split(key)):
        assert _bitwise_equal(np.asarray(jax.random.key_data(a)), np.asarray(jax.random.key_data(b)))


def test_one_program_masks_equal_the_per_leaf_ones():
    """``init_masks`` builds every mask in one compiled program: ones of each prunable leaf's shape and
    dtype, ``None`` elsewhere (also for ``None`` params and under a trace); ``apply_masks_jit`` is
    ``apply_masks``."""
    params = {"a": {"kernel": jnp.ones((3, 4), jnp.bfloat16), "bias": jnp.zeros(4)},
              "b": {"kernel": jnp.full((2, 2, 4, 5), 2.0)}, "c": None, "d": {"kernel": jnp.zeros(3)}}
    masks = init_masks(params)
    assert masks["a"]["bias"] is None and masks["c"] is None and masks["d"]["kernel"] is None
    assert masks["a"]["kernel"].dtype == jnp.bfloat16 and masks["a"]["kernel"].shape == (3, 4)
    assert masks["b"]["kernel"].shape == (2, 2, 4, 5) and bool(jnp.all(masks["b"]["kernel"] == 1))
    traced = jax.jit(lambda p: init_masks(p, lambda path, leaf: leaf.ndim == 4))(params)
    assert traced["a"]["kernel"] is None and traced["b"]["kernel"].shape == (2, 2, 4, 5)
    assert init_masks({"x": {"bias": jnp.zeros(2)}}) == {"x": {"bias": None}}
    masks["b"]["kernel"] = masks["b"]["kernel"].at[0].set(0)
    for (_, a), (_, b) in zip(_leaves(apply_masks(params, masks)), _leaves(apply_masks_jit(params, masks))):
        assert _bitwise_equal(a, b)


def test_unit_norm_scales_in_one_program():
    spec = as_model(get_model("resnet20", 10), (32, 32, 3))
    params = jax.jit(spec.init)(jax.random.key(0))["params"]
    params["blocks_0"]["bn2"]["scale"] = jnp.zeros_like(params["blocks_0"]["bn2"]["scale"])
    out, names = unit_norm_scales(spec, params)
    assert names == ["blocks_0.bn2.scale"]
    assert bool(jnp.all(out["blocks_0"]["bn2"]["scale"] == 1))
    assert out["blocks_0"]["bn1"]["scale"] is params["blocks_0"]["bn1"]["scale"]
    same, none = unit_norm_scales(spec, out)
    assert none == [] and same is out


_COUNT_BEFORE_FIRST_ROUND = """
import json, logging, sys
import jax
jax.config.update("jax_log_compiles", True)
names = []
class Count(logging.Handler):
    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("Compiling "):
            names.append(msg.split()[1])
logging.getLogger("jax").addHandler(Count())
logging.getLogger("jax").setLevel(logging.WARNING)
import ntksap_jax.workflow as workflow
class FirstRound(Exception):
    pass
def stop(*args, **kwargs):
    raise FirstRound
workflow.prune = stop  # the pruning rounds start here
from ntksap_jax.cli import main
try:
    main(sys.argv[1:])
except FirstRound:
    print(json.dumps(names))
"""


def test_a_fresh_prune_compiles_three_programs_before_its_first_round(tmp_path):
    """Before its first round, a fresh ``ntksap-jax prune`` of ResNet-20 (no compilation cache, new process)
    compiles three programs: the key split, the model's init (all 22 weight leaves' random draws in one
    program) and the masks (all 20 kernels' ones in one program). It compiled 16 before (an eager key, split
    and unstack, a float conversion and one broadcast per mask shape), each a backend compilation of its own
    (25-100 ms on a busy 2-core CPU)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT"))}
    argv = ["prune", "--model", "resnet20", "--dataset", "cifar10", "--density", "0.1", "--iterations", "1",
            "--samples", "1", "--num-inputs", "8", "--out", str(tmp_path / "run"), "--no-progress",
            "--no-compile-cache"]
    proc = subprocess.run([sys.executable, "-c", _COUNT_BEFORE_FIRST_ROUND, *argv], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(names) == ["jit(_ones)", "jit(_seed_keys)", "jit(init)"], names
