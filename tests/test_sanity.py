"""Sanity checks (shuffle, re-init, invert), per-layer allocations, and collapse detection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntksap_jax import count_kept, get_model, init_masks, prune
from ntksap_jax.masks import global_topk
from ntksap_jax.scores import magnitude_scorer
from ntksap_jax.collapse import compression_grid, max_critical_compression, path_report, unit_report
from ntksap_jax.distributions import erk_densities, layer_counts, uniform_densities
from ntksap_jax.masks import collapsed_layers, named_leaves
from ntksap_jax.models import LotteryResNet
from ntksap_jax.sanity import reinit_params, shuffle_masks


@pytest.fixture(scope="module")
def resnet8():
    model = LotteryResNet(num_classes=10, depth=8, width=4)
    v = jax.jit(lambda k: model.init(k, jnp.zeros((1, 8, 8, 3))))(jax.random.key(0))
    return model, v["params"], v["batch_stats"]


def leaves(tree):
    return [m for m in jax.tree.leaves(tree)]


def test_shuffle_keeps_layer_counts_and_moves_positions(resnet8):
    _, params, _ = resnet8
    masks = global_topk(jax.tree.map(jnp.abs, params), init_masks(params), 0.1)
    shuffled = shuffle_masks(jax.random.key(1), masks)
    moved = 0
    for a, b in zip(leaves(masks), leaves(shuffled)):
        assert a.shape == b.shape and int(a.sum()) == int(b.sum())
        assert set(np.unique(np.asarray(b))) <= {0.0, 1.0}
        moved += int((np.asarray(a) != np.asarray(b)).sum())
    # Uniform relocation: a kept weight stays only with probability ≈ layer density.
    assert moved > 0.8 * count_kept(masks)
    again = shuffle_masks(jax.random.key(1), masks)
    for a, b in zip(leaves(again), leaves(shuffled)):
        np.testing.assert_array_equal(a, b)  # same key, same shuffle


def test_reinit_keeps_mask_and_draws_new_weights(resnet8):
    model, params, _ = resnet8
    masks = global_topk(jax.tree.map(jnp.abs, params), init_masks(params), 0.2)
    new = reinit_params(jax.random.key(9), model, jnp.zeros((1, 8, 8, 3)), masks)
    old_by_name, new_by_name = dict(named_leaves(params)), dict(named_leaves(new))
    for name, m in named_leaves(masks):
        if m is None:  # dense leaves (biases, BN) come from the new init unmasked
            continue
        p_old, p_new, m = old_by_name[name], new_by_name[name], np.asarray(m) != 0
        assert np.all(np.asarray(p_new)[~m] == 0)
        assert np.all(np.asarray(p_new)[m] != np.asarray(p_old)[m])


def fixed_scorer(values):
    def score(params, masks, batch_stats, key):
        return values
    return score


def test_invert_equals_normal_path_on_negated_scores():
    r = np.random.default_rng(0)
    params = {"a": {"kernel": jnp.zeros((6, 5))}, "b": {"kernel": jnp.zeros((5, 4))}}
    # Negative, zero and tied scores.
    s = {"a": {"kernel": jnp.asarray(r.integers(-3, 4, (6, 5)), jnp.float32)},
         "b": {"kernel": jnp.asarray(r.integers(-3, 4, (5, 4)), jnp.float32)}}
    neg = jax.tree.map(jnp.negative, s)
    for iterations in (1, 3):
        inv = prune(
            fixed_scorer(s), params, density=0.3, iterations=iterations, key=jax.random.key(0), invert=True
        ).masks
        ref = prune(fixed_scorer(neg), params, density=0.3, iterations=iterations, key=jax.random.key(0)).masks
        for a, b in zip(leaves(inv), leaves(ref)):
            np.testing.assert_array_equal(a, b)
    # The inverted mask keeps the lowest scores: every kept score ≤ every pruned one.
    flat_s = np.concatenate([np.asarray(s["a"]["kernel"]).ravel(), np.asarray(s["b"]["kernel"]).ravel()])
    flat_m = np.concatenate([np.asarray(m).ravel() for m in leaves(inv)])
    assert flat_s[flat_m == 1].max() <= flat_s[flat_m == 0].min()


def test_erk_densities_by_hand():
    masks = {"big": {"kernel": jnp.ones((100, 100))}, "small": {"kernel": jnp.ones((10, 2))}, "b": None}
    # raw: big (200/10000 = 0.02), small (12/20 = 0.6). density 0.1 of 10020 = 1002 kept.
    # eps·0.6 > 1 would make "small" dense: 20 kept there, 982 left for big -> 0.0982.
    dens = erk_densities(masks, 0.1)
    assert dens["small"]["kernel"] == 1.0 and dens["b"] is None
    assert dens["big"]["kernel"] == pytest.approx(982 / 10000)
    counts = layer_counts(masks, dens)
    assert counts["big"]["kernel"] + counts["small"]["kernel"] == 1002
    # Without capping, ratios follow (Σ shape / Π shape).
    d2 = erk_densities(masks, 0.02)
    assert d2["small"]["kernel"] / d2["big"]["kernel"] == pytest.approx(30.0)
    assert uniform_densities(masks, 0.3)["big"]["kernel"] == 0.3


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_distribution_fixes_per_layer_counts(resnet8, distribution):
    _, params, _ = resnet8
    masks0 = init_masks(params)
    result = prune(
        magnitude_scorer(), params, density=0.1, iterations=2, key=jax.random.key(0), distribution=distribution
    )
    dens = (uniform_densities if distribution == "uniform" else erk_densities)(masks0, 0.1)
    want = layer_counts(masks0, dens)
    for m, k in zip(leaves(result.masks), jax.tree.leaves(want)):
        assert int(m.sum()) == k
    # Within each layer the largest |θ| are kept.
    m, p = result.masks["blocks_1"]["conv1"]["kernel"], np.abs(np.asarray(params["blocks_1"]["conv1"]["kernel"]))
    assert p[np.asarray(m) == 1].min() >= p[np.asarray(m) == 0].max()


def test_unit_report_by_hand():
    k = np.ones((3, 3, 2, 4), np.float32)
    k[..., 1] = 0  # output unit 1 receives nothing
    k[:, :, 0, :] = 0  # input unit 0 feeds nothing
    rows = unit_report({"conv": {"kernel": jnp.asarray(k)}, "fc": {"kernel": jnp.ones((4, 3)), "bias": None}})
    assert rows[0] == {"name": "conv.kernel", "outputs": 4, "dead_outputs": 1, "inputs": 2, "dead_inputs": 1}
    assert rows[1]["dead_outputs"] == 0


def test_path_report_on_a_hand_built_mlp():
    model = get_model("mlp", 3, features=(4,))
    params = jax.jit(lambda k: model.init(k, jnp.zeros((1, 5))))(jax.random.key(0))["params"]
    masks = init_masks(params)
    m0 = np.ones((5, 4), np.float32)
    m0[:, 2] = 0  # hidden unit 2 receives nothing: its 3 outgoing weights are on no path
    m0[1, :] = 0  # input 1 is unused (its weights are already zero)
    m1 = np.ones((4, 3), np.float32)
    m1[0, 1] = 0
    masks["dense_0"]["kernel"], masks["fc"]["kernel"] = jnp.asarray(m0), jnp.asarray(m1)
    rep = path_report(model, params, masks, None, (5,))
    assert not rep["disconnected"]
    layers = {r["name"]: r for r in rep["layers"]}
    assert layers["dense_0.kernel"] == {"name": "dense_0.kernel", "kept": 12, "effective": 12}
    assert layers["fc.kernel"] == {"name": "fc.kernel", "kept": 11, "effective": 8}
    masks["fc"]["kernel"] = jnp.asarray(m1 * np.array([[1], [0], [1], [0]], np.float32) * 0)
    assert path_report(model, params, masks, None, (5,))["disconnected"]


def test_path_report_sees_residual_bypass(resnet8):
    model, params, batch_stats = resnet8
    masks = init_masks(params)
    masks["blocks_0"]["conv1"]["kernel"] = jnp.zeros_like(masks["blocks_0"]["conv1"]["kernel"])
    rep = path_report(model, params, masks, batch_stats, (8, 8, 3))
    layers = {r["name"]: r for r in rep["layers"]}
    assert not rep["disconnected"]  # the identity shortcut still carries signal
    assert layers["blocks_0.conv2.kernel"]["effective"] == 0 < layers["blocks_0.conv2.kernel"]["kept"]
    assert layers["blocks_1.conv1.kernel"]["effective"] == layers["blocks_1.conv1.kernel"]["kept"]
    masks["conv"]["kernel"] = jnp.zeros_like(masks["conv"]["kernel"])
    assert path_report(model, params, masks, batch_stats, (8, 8, 3))["disconnected"]


def test_max_critical_compression_stops_at_first_collapse():
    params = {"wide": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(100, 100)) * 10)},
              "thin": {"kernel": jnp.asarray(np.random.default_rng(1).normal(size=(10, 10)) * 0.01)}}
    # Magnitude prunes the small-weight "thin" layer first; it collapses once k < number of large weights.
    prune_at = lambda d: prune(magnitude_scorer(), params, density=d, key=jax.random.key(0)).masks  # noqa: E731
    # Every density below 10000/10100 = 0.990 keeps only "wide" weights, so "thin" collapses.
    res = max_critical_compression(prune_at, lambda m: bool(collapsed_layers(m)), densities=[0.995, 0.992, 0.5, 0.1])
    assert res["tried"] == [(0.995, False), (0.992, False), (0.5, True)]  # stops at the first collapse
    assert res["density"] == 0.992 and res["first_collapse_density"] == 0.5
    assert res["max_compression"] == pytest.approx(1 / 0.992)
    np.testing.assert_allclose(compression_grid(100, 2), [10**-0.5, 0.1, 10**-1.5, 0.01])
