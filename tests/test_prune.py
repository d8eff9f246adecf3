"""The pruning loop and schedules: exact counts per round, monotone masks, θ₀ ⊙ m output, seeds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntksap_jax.masks import count_total
from ntksap_jax.schedules import exponential_schedule, linear_schedule, paper_density_grid
from ntksap_jax import get_model, init_masks, ntksap_scorer, prune
from ntksap_jax.scores import magnitude_scorer, random_scorer


def test_schedules_by_hand():
    np.testing.assert_allclose(exponential_schedule(0.01, 2), [0.1, 0.01])
    np.testing.assert_allclose(exponential_schedule(0.8**18, 20)[-1], 0.8**18)
    np.testing.assert_allclose(exponential_schedule(0.8**18, 20), 0.8 ** (18 * np.arange(1, 21) / 20))
    np.testing.assert_allclose(linear_schedule(0.5, 2), [0.75, 0.5])
    np.testing.assert_allclose(
        paper_density_grid(), [0.64, 0.262144, 0.1073741824, 0.043980465111040035, 0.018014398509481993]
    )
    with pytest.raises(ValueError, match="iterations must be a positive integer; got 0"):
        exponential_schedule(0.1, 0)


@pytest.fixture(scope="module")
def mlp():
    model = get_model("mlp", 10, features=(32, 16))
    params = jax.jit(lambda k: model.init(k, jnp.zeros((1, 8, 8, 1))))(jax.random.key(0))["params"]
    return model, params


@pytest.mark.parametrize("density,iterations", [(0.5, 1), (0.1, 3), (0.018, 20), (1.0, 2)])
def test_exact_counts_every_round_and_monotone_masks(mlp, density, iterations):
    model, params = mlp
    total = count_total(init_masks(params))
    seen = []
    result = prune(random_scorer(), params, density=density, iterations=iterations, key=jax.random.key(1),
                   progress=lambda t, row: seen.append(t))
    want = [round(d * total) for d in exponential_schedule(density, iterations)]
    assert [r["kept"] for r in result.history] == want and seen == list(range(1, iterations + 1))
    assert int(sum(m.sum() for m in jax.tree.leaves(result.masks))) == want[-1]


def test_output_is_the_original_init_with_pruned_weights_zero(mlp):
    model, params = mlp
    result = prune(magnitude_scorer(), params, density=0.2, iterations=1, key=jax.random.key(0))
    for name in ("dense_0", "dense_1", "fc"):
        p, m, out = params[name]["kernel"], result.masks[name]["kernel"], result.params[name]["kernel"]
        assert np.all(np.asarray(out)[np.asarray(m) == 0] == 0)
        np.testing.assert_array_equal(np.asarray(out)[np.asarray(m) == 1], np.asarray(p)[np.asarray(m) == 1])
        np.testing.assert_array_equal(result.params[name]["bias"], params[name]["bias"])  # dense leaves untouched


def test_iterative_magnitude_keeps_nested_masks(mlp):
    model, params = mlp
    result = prune(magnitude_scorer(), params, density=0.05, iterations=5, key=jax.random.key(0))
    flat = np.concatenate([np.abs(np.asarray(params[n]["kernel"])).ravel() for n in ("dense_0", "dense_1", "fc")])
    kept = np.concatenate([np.asarray(result.masks[n]["kernel"]).ravel() for n in ("dense_0", "dense_1", "fc")])
    k = round(0.05 * flat.size)
    assert set(np.flatnonzero(kept)) == set(np.argsort(flat)[::-1][:k])


def test_same_seed_same_masks_other_seed_other_masks(mlp):
    model, params = mlp
    score = ntksap_scorer(model, (8, 8, 1), samples=2, num_inputs=16)
    run = lambda seed: prune(score, params, density=0.1, iterations=3, key=jax.random.key(seed)).masks  # noqa: E731
    a, b, c = run(3), run(3), run(4)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(jax.tree.leaves(a), jax.tree.leaves(c)))


def test_prune_rejects_bad_input(mlp):
    model, params = mlp
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]; got 0"):
        prune(random_scorer(), params, density=0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        prune(random_scorer(), params, density=0.5, schedule="cosine", key=jax.random.key(0))
    bad = init_masks(params)
    bad["fc"]["kernel"] = jnp.ones((3, 3))
    with pytest.raises(ValueError, match=r"fc\.kernel"):
        prune(random_scorer(), params, bad, density=0.5, key=jax.random.key(0))

    def nan_scorer(params, masks, batch_stats, key):
        return jax.tree.map(
            lambda m: None if m is None else jnp.full(m.shape, jnp.nan), masks, is_leaf=lambda t: t is None
        )

    with pytest.raises(ValueError, match="scores must be finite"):
        prune(nan_scorer, params, density=0.5, key=jax.random.key(0))


def test_float64_scores_beyond_float32_range_rank_correctly():
    params = {"a": {"kernel": jnp.zeros((2, 2))}}
    with jax.enable_x64(True):
        scores = {"a": {"kernel": jnp.asarray([[3e39, 2e39], [1e39, 5.0]], jnp.float64)}}

    def score(params, masks, batch_stats, key):
        return scores

    masks = prune(score, params, density=0.5, key=jax.random.key(0)).masks
    np.testing.assert_array_equal(masks["a"]["kernel"], [[1, 1], [0, 0]])
