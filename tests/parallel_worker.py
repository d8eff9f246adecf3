"""Run by tests/test_parallel.py in a subprocess with 8 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``): computes every quantity once on one
device and once on a mesh, and writes the comparisons as JSON for the test to assert on.

Usage: ``python tests/parallel_worker.py OUT.json``
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from ntksap_jax import get_model, init_masks, ntksap_scorer, prune, train
from ntksap_jax.parallel import make_mesh, place, replicated, shard_batch
from ntksap_jax.steps import pruned_weights_are_zero
from ntksap_jax.data import DatasetInfo, _ArrayDataset, load
from ntksap_jax.model import as_model
from ntksap_jax.models.resnet_cifar import LotteryResNet
from ntksap_jax.scores.ntksap import make_reinit, ntksap_sample_draws
from ntksap_jax.scores import snip_scorer
from ntksap_jax.optim import sgd
from ntksap_jax.steps import create_train_state, evaluate, shard_state, train_step


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def rel_err(a, b):
    """Largest per-leaf ``max|a-b| / max|a|``."""
    return max(float(np.max(np.abs(x - y)) / max(np.max(np.abs(x)), 1e-30)) for x, y in zip(leaves(a), leaves(b)))


def masks_report(one, many):
    a, b = leaves(one), leaves(many)
    differ = sum(int(np.sum(x != y)) for x, y in zip(a, b))
    # every device holds the same mask: each addressable shard of a replicated mask is the whole mask
    same_everywhere = all(
        m.sharding.is_fully_replicated
        and all(np.array_equal(np.asarray(s.data), np.asarray(m)) for s in m.addressable_shards)
        for m in jax.tree.leaves(many)
    )
    return {"differ": differ, "total": int(sum(x.size for x in a)), "same_on_every_device": bool(same_everywhere)}


def setup(name, shape):
    model = LotteryResNet(depth=8, num_classes=10) if name == "resnet8" else get_model(name, 10)
    v = model.init(jax.random.key(0), jnp.zeros((1, *shape)), train=False)
    return model, v["params"], v.get("batch_stats")


def on_mesh(mesh, *trees):
    return [None if t is None else place(t, replicated(mesh)) for t in trees]


def scores(out, mesh):
    for name, shape in (("mlp", (8, 8, 1)), ("resnet20", (32, 32, 3))):
        model, p, bs = setup(name, shape)
        m0 = init_masks(p)
        # 12 inputs over 8 devices: an uneven split (XLA pads; BatchNorm statistics must ignore the padding).
        for estimator in ("jvp", "finite_difference") if name == "mlp" else ("finite_difference",):
            score = ntksap_scorer(model, shape, samples=2, num_inputs=12, estimator=estimator)
            one = score(p, m0, bs, jax.random.key(3))
            with jax.set_mesh(mesh):
                many = score(*on_mesh(mesh, p, m0, bs), jax.random.key(3))
            out[f"{name}/{estimator}/float32"] = rel_err(one, many)
        one32 = one  # finite difference, float32, one device
        # float64 (params, statistics and masks, so the scores too): the mesh changes nothing but
        # the order of sums, so the two agree to float64 rounding and the masks are identical.
        with jax.enable_x64(True):
            p64, m64 = (jax.tree.map(lambda a: a.astype(jnp.float64), t) for t in (p, m0))
            bs64 = None if bs is None else jax.tree.map(lambda a: a.astype(jnp.float64), bs)
            score = ntksap_scorer(model, shape, samples=2, num_inputs=12)
            one = score(p64, m64, bs64, jax.random.key(3))
            with jax.set_mesh(mesh):
                many = score(*on_mesh(mesh, p64, m64, bs64), jax.random.key(3))
            out[f"{name}/finite_difference/float64"] = rel_err(one, many)
            out[f"{name}/finite_difference/float64/dtype"] = str(jax.tree.leaves(many)[0].dtype)
            r1 = prune(score, p64, m64, density=0.1, iterations=2, key=jax.random.key(1), batch_stats=bs64)
            r8 = prune(score, p64, m64, density=0.1, iterations=2, key=jax.random.key(1), batch_stats=bs64, mesh=mesh)
            out[f"{name}/masks/float64"] = masks_report(r1.masks, r8.masks)
        # float32's own sensitivity for these scores, on ONE device: the hand-written scores in
        # float32 on the scorer's draws, against the same with every input moved by one float32 ulp
        # (3 random sign patterns; the largest distance). And float32's error against float64 on
        # the same draws, which that sensitivity should explain.
        if name == "resnet20":
            base, *moved = handwritten_scores(model, shape, p, m0, bs, dtype=jnp.float32,
                                              perturbs=(None, *(jax.random.key(100 + k) for k in range(3))))
            out[f"{name}/finite_difference/float32/handwritten"] = rel_err(base, one32)
            out[f"{name}/finite_difference/float32/ulp_sensitivity"] = max(rel_err(base, m) for m in moved)
            [in64] = handwritten_scores(model, shape, p, m0, bs, dtype=jnp.float64)
            out[f"{name}/finite_difference/float32/own_error"] = rel_err(in64, one32)
        if name == "mlp":
            # float32 masks: the MLP's scores agree to ~1e-6, well inside its rank gaps
            score = ntksap_scorer(model, shape, samples=2, num_inputs=12)
            r1 = prune(score, p, density=0.1, iterations=3, key=jax.random.key(1), batch_stats=bs)
            r8 = prune(score, p, density=0.1, iterations=3, key=jax.random.key(1), batch_stats=bs, mesh=mesh)
            out["mlp/masks/float32"] = masks_report(r1.masks, r8.masks)
            # a baseline: SNIP on Gaussian inputs with random labels (scores on a split batch)
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                snip = snip_scorer(model, shape, num_classes=10, num_inputs=12)
            one = snip(p, m0, bs, jax.random.key(5))
            with jax.set_mesh(mesh):
                many = snip(*on_mesh(mesh, p, m0, bs), jax.random.key(5))
            out["mlp/snip/float32"] = rel_err(one, many)


ULP = 2.0**-23  # float32's relative spacing at 1: x * (1 ± ULP) is x's neighbouring float32 value


def ulp_perturbed(x, key):
    """``x`` with every value moved by about one float32 ulp, a random sign each (float32 in, float32 out)."""
    return x * (1 + ULP * jax.random.rademacher(key, x.shape, jnp.float32))


def handwritten_scores(model, shape, p, m0, bs, *, dtype, perturbs=(None,), samples=2, num_inputs=12, eps=0.01):
    """NTK-SAP's finite-difference scores (key 3) written out independently of the scorer, on the
    scorer's own float32 draws θ, x, z of each sample, evaluated in ``dtype`` on one device: a list
    of score trees, one per entry of ``perturbs`` (one compiled gradient serves them all).

    ``perturbs``: None, or a PRNG key to move every input x by one float32 ulp first (``ulp_perturbed``).
    """
    spec = as_model(model, shape)
    reinit = make_reinit(spec, "auto")
    draws = [ntksap_sample_draws(jax.random.fold_in(jax.random.fold_in(jax.random.key(3), r), 0), p, m0,
                                 (num_inputs, *shape), reinit=reinit) for r in range(samples)]
    with jax.enable_x64(dtype == jnp.float64):
        cast = lambda t: jax.tree.map(lambda a: None if a is None else jnp.asarray(a, dtype), t,  # noqa: E731
                                      is_leaf=lambda a: a is None)
        m, bs_d = cast(m0), None if bs is None else cast(bs)

        def objective(m, theta, x, z):
            masked = jax.tree.map(lambda mm, t: t if mm is None else t * mm, m, theta, is_leaf=lambda a: a is None)
            moved = jax.tree.map(lambda mm, t, zz: t if mm is None else (t + eps * zz) * mm, m, theta, z,
                                 is_leaf=lambda a: a is None)
            stats = spec.statistics(masked, bs_d, x)
            d = spec.apply(masked, stats, x)[0] - spec.apply(moved, stats, x)[0]
            return jnp.sum(d * d)

        grad = jax.jit(jax.grad(objective))
        results = []
        for perturb in perturbs:
            total = None
            for r, (theta, x, z) in enumerate(draws):
                if perturb is not None:
                    x = ulp_perturbed(x, jax.random.fold_in(perturb, r))
                g = grad(m, cast(theta), jnp.asarray(x, dtype), cast(z))
                total = g if total is None else jax.tree.map(jnp.add, total, g)
            results.append(jax.tree.map(
                lambda mm, g: None if mm is None else np.abs(np.asarray(g, np.float64)) * (np.asarray(mm) != 0),
                m, total, is_leaf=lambda a: a is None))
        return results


def vmap_loop(out, mesh):
    """The vmap sample loop (the accelerator default) on the mesh against the sequential loop on one device."""
    # ResNet-8 (ResNet-20's family, one block a stage: BatchNorm, stride-2 and shortcut convolutions
    # all there): what is checked, BatchNorm statistics of vmapped samples on a mesh, needs no depth.
    for name, shape in (("mlp", (8, 8, 1)), ("resnet8", (8, 8, 3))):
        model, p, bs = setup(name, shape)
        with jax.enable_x64(True):
            p64, m64 = (jax.tree.map(lambda a: a.astype(jnp.float64), t) for t in (p, init_masks(p)))
            bs64 = None if bs is None else jax.tree.map(lambda a: a.astype(jnp.float64), bs)
            seq = ntksap_scorer(model, shape, samples=2, num_inputs=12, sample_loop="sequential")
            vm = ntksap_scorer(model, shape, samples=2, num_inputs=12, sample_loop="vmap")
            one = seq(p64, m64, bs64, jax.random.key(3))
            with jax.set_mesh(mesh):
                many = vm(*on_mesh(mesh, p64, m64, bs64), jax.random.key(3))
            out[f"{name}/vmap/float64"] = rel_err(one, many)


def synthetic(num_train=48, num_test=20):
    rng = np.random.default_rng(0)
    info = DatasetInfo("synthetic", (32, 32, 3), 10, num_train, num_test, True)
    x = rng.standard_normal((num_train + num_test, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, num_train + num_test).astype(np.int32)
    return _ArrayDataset(info, x[:num_train], y[:num_train], x[num_train:], y[num_train:],
                         np.arange(num_train), np.arange(num_test))


class UlpPerturbed:
    """The same data set with every training image moved by one float32 ulp (``ulp_perturbed``,
    a fixed random sign pattern per batch and ``seed``). Trained on ONE device, its distance from
    the plain run is float32's own sensitivity for that training run."""

    def __init__(self, data, seed):
        self.data, self.info, self.seed = data, data.info, seed

    def steps_per_epoch(self, batch_size):
        return self.data.steps_per_epoch(batch_size)

    def train_batches(self, batch_size, *, seed, epoch):
        for i, b in enumerate(self.data.train_batches(batch_size, seed=seed, epoch=epoch)):
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), epoch), i)
            yield {**b, "image": np.asarray(ulp_perturbed(jnp.asarray(b["image"]), key))}

    def eval_batches(self, batch_size, *, split="test"):
        return self.data.eval_batches(batch_size, split=split)


def training(out, mesh, mesh_mp):
    for name, shape, data in (("mlp", (8, 8, 1), load("digits")), ("resnet20", (32, 32, 3), synthetic())):
        model, p, bs = setup(name, shape)
        variables = {"params": p, **({"batch_stats": bs} if bs else {})}
        # the scores part's scorer settings: its compiled program is reused (persistent cache)
        masks = prune(ntksap_scorer(model, shape, samples=2, num_inputs=12), p, density=0.2,
                      key=jax.random.key(2), batch_stats=bs).masks
        kw = dict(epochs=2, batch_size=16, lr=0.05, weight_decay=5e-4, eval_batch_size=16, progress=False)
        with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d8:
            # MLP: two digits epochs (89 steps each); ResNet-20: 3 steps per epoch on 48 synthetic images.
            # The mesh run stops after epoch 1 and resumes from its own checkpoint.
            r1 = train(model, variables, masks, data, out_dir=d1, **kw)
            train(model, variables, masks, data, out_dir=d8, mesh=mesh, stop_after=1, **kw)
            r8 = train(model, variables, masks, data, out_dir=d8, mesh=mesh, resume=True, **kw)
            out[f"{name}/train/files"] = sorted(os.listdir(d8))
            out[f"{name}/train/checkpoints"] = sorted(os.listdir(os.path.join(d8, "checkpoints")))
        mp = train(model, variables, masks, data, mesh=mesh_mp, **kw)
        # float32's sensitivity: one device, training images moved by one ulp (3 sign patterns)
        ulp = [train(model, variables, masks, UlpPerturbed(data, seed), **kw) for seed in range(3)]
        for seed, r in enumerate(ulp):
            out[f"{name}/train/ulp{seed}/params"] = rel_err(r1.state.params, r.state.params)
            if bs:
                out[f"{name}/train/ulp{seed}/batch_stats"] = rel_err(r1.state.batch_stats, r.state.batch_stats)
            out[f"{name}/train/ulp{seed}/rows"] = {
                k: [r1.history[-1][k], r.history[-1][k]] for k in ("train_loss", "test_loss")
            }
        for label, r in (("data", r8), ("model_parallel", mp)):
            out[f"{name}/train/{label}/params"] = rel_err(r1.state.params, r.state.params)
            if bs:  # BatchNorm running statistics over the global batch
                out[f"{name}/train/{label}/batch_stats"] = rel_err(r1.state.batch_stats, r.state.batch_stats)
            row1, row = r1.history[-1], r.history[-1]
            out[f"{name}/train/{label}/rows"] = {k: [row1[k], row[k]] for k in row1 if k != "seconds"}
            out[f"{name}/train/{label}/epochs"] = [r1.epoch, r.epoch, len(r.history)]
            out[f"{name}/train/{label}/pruned_zero"] = pruned_weights_are_zero(r.state.params, masks)
        out[f"{name}/train/data/param_sharding"] = str(jax.tree.leaves(r8.state.params)[0].sharding.spec)
        out[f"{name}/train/model_parallel/specs"] = {
            jax.tree_util.keystr(k): str(v.sharding.spec)
            for k, v in jax.tree_util.tree_flatten_with_path(mp.state.params)[0]
        }
        out[f"{name}/train/model_parallel/eval"] = [
            evaluate(r1.state, data, 16), evaluate(mp.state, data, 16, mesh=mesh_mp)
        ]
    # float64, the arbiter: three steps of ResNet-20 on each mesh agree with one device to float64 rounding
    model, p, bs = setup("resnet20", (32, 32, 3))
    batch = next(iter(synthetic().train_batches(16, seed=0, epoch=0)))
    with jax.enable_x64(True):
        variables = jax.tree.map(lambda a: a.astype(jnp.float64), {"params": p, "batch_stats": bs})
        batch = {**batch, "image": batch["image"].astype(np.float64)}
        s1 = create_train_state(model, variables, None, sgd(0.05, momentum=0.9))
        s8, smp = shard_state(s1, mesh), shard_state(s1, mesh_mp)
        for _ in range(3):
            s1, _m = train_step(s1, batch)
            with jax.set_mesh(mesh):
                s8, _m = train_step(s8, shard_batch(batch, mesh))
                jax.block_until_ready(s8)
            with jax.set_mesh(mesh_mp):
                smp, _m = train_step(smp, shard_batch(batch, mesh_mp))
                jax.block_until_ready(smp)
        for label, s in (("data", s8), ("model_parallel", smp)):
            out[f"resnet20/train/float64/{label}/params"] = rel_err(s1.params, s.params)
            out[f"resnet20/train/float64/{label}/batch_stats"] = rel_err(s1.batch_stats, s.batch_stats)
            out[f"resnet20/train/float64/{label}/dtype"] = str(jax.tree.leaves(s.params)[0].dtype)


def errors(out, mesh):
    msgs = {}
    try:
        shard_batch({"image": np.zeros((12, 2))}, mesh)
    except ValueError as e:
        msgs["shard_batch"] = str(e)
    try:
        model, p, bs = setup("mlp", (8, 8, 1))
        train(model, {"params": p}, None, load("digits"), epochs=1, batch_size=12, lr=0.1, mesh=mesh, progress=False)
    except ValueError as e:
        msgs["train_batch"] = str(e)
    try:
        make_mesh(8, model_parallel=3)
    except ValueError as e:
        msgs["model_parallel"] = str(e)
    try:
        make_mesh(9)
    except ValueError as e:
        msgs["num_devices"] = str(e)
    out["errors"] = msgs


def cli(out):
    from ntksap_jax.cli import main

    with tempfile.TemporaryDirectory() as d:
        codes = []
        for n in ("1", "8"):
            codes.append(main(["prune", "--model", "mlp", "--dataset", "digits", "--method", "ntksap", "--density",
                               "0.1", "--iterations", "3", "--seed", "0", "--out", os.path.join(d, n), "--devices", n,
                               "--no-progress"]))
        a = np.load(os.path.join(d, "1", "masks.npz"))
        b = np.load(os.path.join(d, "8", "masks.npz"))
        out["cli"] = {
            "codes": codes,
            "differ": int(sum(np.sum(a[k] != b[k]) for k in a.files)),
            "mesh": json.load(open(os.path.join(d, "8", "report.json")))["environment"]["mesh"],
        }
        out["cli_bad_devices"] = main(["prune", "--model", "mlp", "--dataset", "digits", "--method", "magnitude",
                                       "--density", "0.1", "--out", os.path.join(d, "x"), "--devices", "9"])


def main():
    assert jax.device_count() == 8, jax.devices()
    out = {"devices": jax.device_count()}
    mesh = make_mesh()
    mesh_mp = make_mesh(8, model_parallel=2)
    import time

    parts = [
        p for p in (scores, vmap_loop, training, errors, cli) if os.environ.get("PARTS", p.__name__).count(p.__name__)
    ]
    for part in parts:
        t0 = time.perf_counter()
        if part is training:
            part(out, mesh, mesh_mp)
        elif part is cli:
            part(out)
        else:
            part(out, mesh)
        print(f"{part.__name__}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
