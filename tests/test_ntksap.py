"""The NTK-SAP scorer: its mask gradient against central differences in float64, its
draws, its BatchNorm handling, and its compile-once behaviour."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import official_bn_stats, to_f64
from ntksap_jax import apply_masks, get_model, init_masks, ntksap_scorer, prune
from ntksap_jax.masks import count_total
from ntksap_jax.scores import ntksap_objective
from ntksap_jax.models import LotteryResNet
from ntksap_jax.scores import (
    apply_with_batch_statistics,
    bn_statistics,
    kaiming_normal_reinit,
    ntksap_sample_draws,
    ntksap_sample_gradient,
)


# ---------------------------------------------------------------- hand-written reference net
def tiny_apply(p, x):
    h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    return h @ p["l2"]["kernel"]


def tiny_case(dtype=jnp.float64):
    r = np.random.default_rng(0)
    params = {
        "l1": {"kernel": jnp.asarray(r.normal(size=(6, 7)) / 2, dtype),
               "bias": jnp.asarray(r.normal(size=7) / 5, dtype)},
        "l2": {"kernel": jnp.asarray(r.normal(size=(7, 3)) / 2, dtype)},
    }
    # A non-binary mask point so that no derivative vanishes by accident.
    masks = {
        "l1": {"kernel": jnp.asarray(r.uniform(0.5, 1.5, (6, 7)), dtype), "bias": None},
        "l2": {"kernel": jnp.asarray(r.uniform(0.5, 1.5, (7, 3)), dtype)},
    }
    z = {
        "l1": {"kernel": jnp.asarray(r.normal(size=(6, 7)), dtype), "bias": None},
        "l2": {"kernel": jnp.asarray(r.normal(size=(7, 3)), dtype)},
    }
    x = jnp.asarray(r.normal(size=(5, 6)), dtype)
    return params, masks, z, x


def hand_objective_fd(m, params, z, x, eps):
    """Σ_batch ‖f(θ⊙m) − f((θ+εz)⊙m)‖², written out by hand."""
    a = {"l1": {"kernel": params["l1"]["kernel"] * m["l1"]["kernel"], "bias": params["l1"]["bias"]},
         "l2": {"kernel": params["l2"]["kernel"] * m["l2"]["kernel"]}}
    b = {"l1": {"kernel": (params["l1"]["kernel"] + eps * z["l1"]["kernel"]) * m["l1"]["kernel"],
                "bias": params["l1"]["bias"]},
         "l2": {"kernel": (params["l2"]["kernel"] + eps * z["l2"]["kernel"]) * m["l2"]["kernel"]}}
    d = tiny_apply(a, x) - tiny_apply(b, x)
    return jnp.sum(d * d)


def hand_objective_jvp(m, params, z, x, eps):
    """‖J(θ⊙m)(εz⊙m)‖² with J from jax.jacobian (a full Jacobian, not a jvp)."""
    a = {"l1": {"kernel": params["l1"]["kernel"] * m["l1"]["kernel"], "bias": params["l1"]["bias"]},
         "l2": {"kernel": params["l2"]["kernel"] * m["l2"]["kernel"]}}
    jac = jax.jacobian(
        lambda k1, k2: tiny_apply({"l1": {"kernel": k1, "bias": a["l1"]["bias"]}, "l2": {"kernel": k2}}, x),
        argnums=(0, 1),
    )(a["l1"]["kernel"], a["l2"]["kernel"])
    t1, t2 = eps * z["l1"]["kernel"] * m["l1"]["kernel"], eps * z["l2"]["kernel"] * m["l2"]["kernel"]
    jv = jnp.einsum("nkij,ij->nk", jac[0], t1) + jnp.einsum("nkij,ij->nk", jac[1], t2)
    return jnp.sum(jv * jv)


def central_difference(fn, masks, leaf, index, h=1e-5):
    def at(delta):
        m = jax.tree.map(lambda t: t, masks, is_leaf=lambda t: t is None)
        m[leaf]["kernel"] = m[leaf]["kernel"].at[index].add(delta)
        return fn(m)

    return (at(h) - at(-h)) / (2 * h)


@pytest.mark.parametrize("estimator,hand", [("finite_difference", hand_objective_fd), ("jvp", hand_objective_jvp)])
def test_mask_gradient_matches_central_difference_float64(x64, estimator, hand):
    params, masks, z, x = tiny_case()
    eps = 0.05
    ours = jax.grad(lambda m: ntksap_objective(tiny_apply, params, m, z, x, eps=eps, estimator=estimator))(masks)
    assert ours["l1"]["bias"] is None
    # Objective values agree with the hand-written ones, then the gradient with central differences.
    assert float(ntksap_objective(tiny_apply, params, masks, z, x, eps=eps, estimator=estimator)) == pytest.approx(
        float(hand(masks, params, z, x, eps)), rel=1e-12)
    fn = lambda m: hand(m, params, z, x, eps)  # noqa: E731
    for leaf, index in [("l1", (0, 0)), ("l1", (5, 6)), ("l1", (2, 3)), ("l2", (0, 0)), ("l2", (6, 2)), ("l2", (3, 1))]:
        want = float(central_difference(fn, masks, leaf, index))
        got = float(ours[leaf]["kernel"][index])
        assert got == pytest.approx(want, rel=1e-7, abs=1e-12 * max(1.0, abs(want))), (leaf, index)


def test_jvp_and_finite_difference_agree_as_eps_shrinks(x64):
    params, masks, z, x = tiny_case()
    gaps = []
    for eps in (1e-1, 1e-3, 1e-5):
        fd = float(ntksap_objective(tiny_apply, params, masks, z, x, eps=eps, estimator="finite_difference"))
        jv = float(ntksap_objective(tiny_apply, params, masks, z, x, eps=eps, estimator="jvp"))
        gaps.append(abs(fd - jv) / jv)
    assert gaps[0] > 1e-3 and gaps[-1] < 1e-4 and gaps[2] < gaps[1] < gaps[0]


def test_unknown_estimator_is_rejected():
    params, masks, z, x = tiny_case(jnp.float32)
    with pytest.raises(ValueError, match=r"unknown estimator 'exact'.*finite_difference.*jvp"):
        ntksap_objective(tiny_apply, params, masks, z, x, estimator="exact")


# ---------------------------------------------------------------- Flax models with BatchNorm
def tiny_resnet():
    """A lottery ResNet-8 (one block per stage: BN, projection shortcuts) that compiles fast."""
    return LotteryResNet(num_classes=10, depth=8, width=2)


@pytest.fixture(scope="module")
def small_resnet():
    model = tiny_resnet()
    v = jax.jit(lambda k: model.init(k, jnp.zeros((1, 8, 8, 3))))(jax.random.key(0))
    return model, v["params"], v["batch_stats"]


def test_sample_gradient_freezes_bn_statistics_float64(x64, small_resnet):
    model, params, batch_stats = small_resnet
    params, batch_stats = to_f64(params), to_f64(batch_stats)
    masks = init_masks(params)
    key = jax.random.key(5)
    got = jax.jit(lambda m: ntksap_sample_gradient(model, params, m, batch_stats, key, (6, 8, 8, 3)))(masks)
    theta, x, z = ntksap_sample_draws(key, params, masks, (6, 8, 8, 3))
    eps = 0.01

    def objective(m, frozen):
        masked = apply_masks(theta, m)
        if frozen is None:  # statistics recomputed from this m (what the official code does NOT differentiate)
            _, st = model.clone(bn_momentum=0.0).apply(
                {"params": masked, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            frozen = st["batch_stats"]
        moved = jax.tree.map(
            lambda mm, p, zz: p if mm is None else (p + eps * zz) * mm, m, theta, z, is_leaf=lambda t: t is None
        )
        f = lambda p: model.apply({"params": p, "batch_stats": frozen}, x, train=False)  # noqa: E731
        d = f(masked) - f(moved)
        return jnp.sum(d * d)

    # Statistics of the unperturbed masked net at the base point, by hand: the first BN sees the stem conv output.
    stem = jax.lax.conv_general_dilated(
        x, theta["conv"]["kernel"], (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    stats = bn_statistics(model, apply_masks(theta, masks), batch_stats, x)
    np.testing.assert_allclose(stats["bn"]["mean"], stem.mean(axis=(0, 1, 2)), rtol=1e-10, atol=1e-12)
    # the official code normalises with PyTorch's running_var after a momentum-1.0 pass: the
    # unbiased variance (ddof=1 over N·H·W = 384 values), 384/383 times Flax's biased one
    np.testing.assert_allclose(stats["bn"]["var"], stem.var(axis=(0, 1, 2), ddof=1), rtol=1e-10, atol=1e-12)

    frozen_fn = jax.jit(lambda m: objective(m, stats))
    moving_fn = jax.jit(lambda m: objective(m, None))
    worst_moving = 0.0
    for leaf, index in [("conv", (1, 1, 0, 0)), ("blocks_0", None), ("blocks_1", None), ("fc", (0, 3))]:
        if leaf in ("blocks_0", "blocks_1"):
            sub = "conv1"
            idx = (0, 1, 1, 1)
            def fn_at(fn, delta, leaf=leaf, sub=sub, idx=idx):
                m = jax.tree.map(lambda t: t, masks, is_leaf=lambda t: t is None)
                m[leaf][sub]["kernel"] = m[leaf][sub]["kernel"].at[idx].add(delta)
                return fn(m)
            g = float(got[leaf][sub]["kernel"][idx])
        else:
            def fn_at(fn, delta, leaf=leaf, index=index):
                m = jax.tree.map(lambda t: t, masks, is_leaf=lambda t: t is None)
                m[leaf]["kernel"] = m[leaf]["kernel"].at[index].add(delta)
                return fn(m)
            g = float(got[leaf]["kernel"][index])
        h = 1e-5
        frozen = float((fn_at(frozen_fn, h) - fn_at(frozen_fn, -h)) / (2 * h))
        moving = float((fn_at(moving_fn, h) - fn_at(moving_fn, -h)) / (2 * h))
        assert g == pytest.approx(frozen, rel=1e-6, abs=1e-10), leaf
        worst_moving = max(worst_moving, abs(moving - g) / abs(g))
    # ...and the frozen-statistics gradient really differs from differentiating through the statistics.
    assert worst_moving > 1e-3


@pytest.mark.parametrize("estimator", ["finite_difference", "jvp"])
def test_one_pass_statistics_equal_the_separate_train_mode_pass_float64(x64, small_resnet, estimator):
    """apply_with_batch_statistics (statistics taken during the forward pass) against the
    two-pass reference of the official code: a train-mode pass with momentum 0 (Flax's biased
    variance), its variances made unbiased by hand (times n/(n-1), n the values per channel
    each BatchNorm saw), then eval mode with those statistics."""
    model, params, batch_stats = small_resnet
    params, batch_stats = to_f64(params), to_f64(batch_stats)
    masks = init_masks(params)
    key = jax.random.key(7)
    theta, x, z = ntksap_sample_draws(key, params, masks, (6, 8, 8, 3))
    masked = apply_masks(theta, masks)

    def bn_statistics(model, p, bs, xb):  # the separate momentum-0 pass, unbiased by hand
        return official_bn_stats(model, {"params": p, "batch_stats": bs}, xb)

    ref_stats = bn_statistics(model, masked, batch_stats, x)
    y, stats = apply_with_batch_statistics(model, masked, batch_stats, x)
    for a, b in zip(jax.tree.leaves(ref_stats), jax.tree.leaves(stats)):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(y, model.apply({"params": masked, "batch_stats": ref_stats}, x), rtol=1e-12, atol=1e-12)

    def reference(m):
        frozen = bn_statistics(model, apply_masks(theta, m), batch_stats, x)
        apply_fn = lambda p, xb: model.apply({"params": p, "batch_stats": frozen}, xb, train=False)  # noqa: E731
        return ntksap_objective(apply_fn, theta, m, z, x, estimator=estimator)

    want = jax.jit(jax.grad(reference))(masks)
    got = jax.jit(
        lambda m: ntksap_sample_gradient(model, params, m, batch_stats, key, (6, 8, 8, 3), estimator=estimator)
    )(masks)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12 * float(jnp.max(jnp.abs(a))))


def test_one_pass_statistics_reject_statistics_no_batchnorm_owns():
    class OwnNorm(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            mean = self.variable("batch_stats", "mean", jnp.zeros, (x.shape[-1],))
            return nn.Dense(3)(x.reshape(x.shape[0], -1) - mean.value.mean())

    model = OwnNorm()
    v = model.init(jax.random.key(0), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"batch_stats entries \['<root>'\] were not set by an nn.BatchNorm"):
        apply_with_batch_statistics(model, v["params"], v["batch_stats"], jnp.ones((2, 4)))


def test_draws_are_fresh_kaiming_weights_and_gaussian_inputs():
    model = get_model("mlp", 10, features=(512,))
    params = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3))))(jax.random.key(0))["params"]
    masks = init_masks(params)
    theta, x, z = ntksap_sample_draws(jax.random.key(1), params, masks, (100, 32, 32, 3))
    k = np.asarray(theta["dense_0"]["kernel"])
    assert k.std() == pytest.approx(math.sqrt(2 / 3072), rel=0.01) and abs(k.mean()) < 1e-3
    assert not np.allclose(k, params["dense_0"]["kernel"])
    np.testing.assert_array_equal(theta["dense_0"]["bias"], params["dense_0"]["bias"])  # biases kept
    assert x.shape == (100, 32, 32, 3) and float(x.std()) == pytest.approx(1.0, rel=0.01)
    assert z["dense_0"]["bias"] is None and float(z["fc"]["kernel"].std()) == pytest.approx(1.0, rel=0.15)
    theta2, x2, _ = ntksap_sample_draws(jax.random.key(2), params, masks, (100, 32, 32, 3))
    assert not np.allclose(theta2["dense_0"]["kernel"], k) and not np.allclose(x2, x)
    # Reinit ignores the weights it is given: weight-agnostic.
    again = kaiming_normal_reinit(jax.random.key(7), jax.tree.map(lambda a: a * 100, params), masks)
    np.testing.assert_array_equal(
        again["fc"]["kernel"], kaiming_normal_reinit(jax.random.key(7), params, masks)["fc"]["kernel"]
    )


def test_scores_are_abs_of_summed_gradients_zero_on_pruned(small_resnet):
    model, params, batch_stats = small_resnet
    masks = init_masks(params)
    masks["fc"]["kernel"] = masks["fc"]["kernel"].at[:, 0].set(0)
    key = jax.random.key(3)
    score = ntksap_scorer(model, (8, 8, 3), samples=2, num_inputs=6, sample_loop="sequential")
    s = score(params, masks, batch_stats, key)
    grad = jax.jit(lambda k: ntksap_sample_gradient(model, params, masks, batch_stats, k, (6, 8, 8, 3)))
    g = [grad(jax.random.fold_in(jax.random.fold_in(key, r), 0)) for r in range(2)]
    want = jnp.abs(g[0]["fc"]["kernel"] + g[1]["fc"]["kernel"]) * (masks["fc"]["kernel"] != 0)
    # float32: the finite difference at eps = 0.01 cancels ~4 digits, so compare at 1e-3.
    np.testing.assert_allclose(s["fc"]["kernel"], want, rtol=1e-3, atol=1e-5 * float(want.max()))
    assert np.all(np.asarray(s["fc"]["kernel"][:, 0]) == 0)
    # |Σ g| is not Σ |g|: the signs of different samples cancel somewhere.
    assert float(jnp.sum(jnp.abs(g[0]["fc"]["kernel"]) + jnp.abs(g[1]["fc"]["kernel"]))) > float(jnp.sum(want)) * 1.01
    assert s["fc"]["bias"] is None and s["bn"]["scale"] is None
    # Same key, same scores; vmap mode agrees with the sequential loop.
    s_again = score(params, masks, batch_stats, key)
    np.testing.assert_array_equal(s_again["blocks_2"]["conv2"]["kernel"], s["blocks_2"]["conv2"]["kernel"])
    sv = ntksap_scorer(model, (8, 8, 3), samples=2, num_inputs=6, sample_loop="vmap")(params, masks, batch_stats, key)
    for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(sv)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6 * float(jnp.max(jnp.abs(a))))


def test_batches_split_like_the_official_data_loader(small_resnet):
    model, params, batch_stats = small_resnet
    masks = init_masks(params)
    key = jax.random.key(4)
    # 10 inputs in batches of 4: weight samples of 4, 4 and 2 inputs.
    s = ntksap_scorer(model, (8, 8, 3), samples=1, num_inputs=10, batch_size=4)(params, masks, batch_stats, key)
    grad = jax.jit(
        lambda k, n: ntksap_sample_gradient(model, params, masks, batch_stats, k, (n, 8, 8, 3))["fc"]["kernel"],
        static_argnums=1,
    )
    g = [grad(jax.random.fold_in(jax.random.fold_in(key, 0), b), n) for b, n in enumerate([4, 4, 2])]
    want = jnp.abs(g[0] + g[1] + g[2])
    np.testing.assert_allclose(s["fc"]["kernel"], want, rtol=1e-3, atol=1e-5 * float(want.max()))


def test_pruning_loop_compiles_the_scorer_once():
    model = tiny_resnet()
    v = jax.jit(lambda k: model.init(k, jnp.zeros((1, 8, 8, 3))))(jax.random.key(0))
    traces = []

    def counting_reinit(key, params, masks):
        traces.append(1)  # runs only while tracing
        return kaiming_normal_reinit(key, params, masks)

    score = ntksap_scorer(model, (8, 8, 3), samples=2, num_inputs=4, reinit=counting_reinit)
    result = prune(score, v["params"], batch_stats=v["batch_stats"], density=0.2, iterations=4, key=jax.random.key(1))
    assert len(traces) == 1
    total = count_total(init_masks(v["params"]))
    assert [row["kept"] for row in result.history] == [round(0.2 ** (t / 4) * total) for t in (1, 2, 3, 4)]


@pytest.mark.parametrize("kwargs,match", [
    ({"samples": 0}, "samples must be a positive integer; got 0"),
    ({"num_inputs": 2.5}, "num_inputs must be a positive integer; got 2.5"),
    ({"eps": -1.0}, "eps must be a positive finite number; got -1.0"),
    ({"sample_loop": "scan"}, "unknown sample_loop 'scan'"),
])
def test_bad_scorer_config_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ntksap_scorer(get_model("mlp", 10), (8, 8, 1), **kwargs)
