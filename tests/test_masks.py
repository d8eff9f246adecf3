"""Masks: exact kept counts, the tie rule, errors, and an exact save/load round trip."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntksap_jax import apply_masks, count_kept, density_report, init_masks, load_masks, save_masks
from ntksap_jax.masks import check_structure, count_total, global_topk, global_topk_count, layerwise_topk
from ntksap_jax.masks import check_density, check_scores, collapsed_layers


def toy_params():
    rng = np.random.default_rng(0)
    return {
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32), "bias": jnp.zeros(4)},
        "bn": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
        "fc": {"kernel": jnp.asarray(rng.normal(size=(36, 5)), jnp.float32), "bias": jnp.zeros(5)},
    }


def test_default_filter_picks_kernels_only():
    masks = init_masks(toy_params())
    assert masks["conv"]["bias"] is None and masks["bn"]["scale"] is None and masks["fc"]["bias"] is None
    assert masks["conv"]["kernel"].shape == (3, 3, 2, 4) and masks["fc"]["kernel"].shape == (36, 5)
    assert count_total(masks) == 72 + 180
    custom = init_masks(toy_params(), lambda path, p: p.ndim == 4)
    assert custom["fc"]["kernel"] is None and count_total(custom) == 72


@pytest.mark.parametrize("density", [1.0, 0.5, 0.3, 0.1, 0.0425, 1 / 252])
def test_global_topk_keeps_exact_count_of_the_largest(density):
    params = toy_params()
    masks = init_masks(params)
    scores = jax.tree.map(jnp.abs, params)
    new = global_topk(scores, masks, density)
    k = round(density * 252)
    assert count_kept(new) == k
    # The kept set is exactly the k largest |θ| (no ties in continuous draws).
    flat = np.concatenate([np.abs(np.asarray(params["conv"]["kernel"])).ravel(),
                           np.abs(np.asarray(params["fc"]["kernel"])).ravel()])
    kept = np.concatenate([np.asarray(new["conv"]["kernel"]).ravel(), np.asarray(new["fc"]["kernel"]).ravel()])
    assert set(np.flatnonzero(kept)) == set(np.argsort(flat)[::-1][:k])
    assert new["fc"]["bias"] is None


def test_ties_prune_lowest_index_first_and_count_is_exact():
    # All-equal scores: the official threshold rule would prune everything or nothing.
    params = {"a": {"kernel": jnp.zeros((2, 5))}, "b": {"kernel": jnp.zeros((3, 2))}}
    masks = init_masks(params)
    scores = jax.tree.map(jnp.ones_like, params)
    new = global_topk(scores, masks, 0.5)
    assert count_kept(new) == 8
    # Leaf order a then b, row-major: the first 8 of 16 are pruned.
    np.testing.assert_array_equal(np.asarray(new["a"]["kernel"]).ravel(), [0] * 8 + [1] * 2)
    np.testing.assert_array_equal(np.asarray(new["b"]["kernel"]).ravel(), [1] * 6)


def test_pruned_entries_rank_last_and_traced_k_does_not_recompile():
    params = toy_params()
    masks = init_masks(params)
    scores = jax.tree.map(jnp.abs, params)
    traces = []

    def counted(s, m, k):
        traces.append(1)
        return global_topk_count(s, m, k)

    f = jax.jit(counted)
    m1 = f(scores, masks, jnp.int32(100))
    # Give pruned entries huge scores: they must stay pruned.
    boosted = jax.tree.map(lambda s: s, scores)
    for layer in ("conv", "fc"):
        boosted[layer]["kernel"] = jnp.where(m1[layer]["kernel"] == 0, 1e9, scores[layer]["kernel"])
    m2 = f(boosted, m1, jnp.int32(40))
    assert count_kept(m2) == 40 and len(traces) == 1
    for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m2)):
        assert np.all(np.asarray(b) <= np.asarray(a))


def test_layerwise_topk_keeps_exact_count_per_layer():
    params = toy_params()
    new = layerwise_topk(jax.tree.map(jnp.abs, params), init_masks(params), 0.25)
    assert int(new["conv"]["kernel"].sum()) == 18 and int(new["fc"]["kernel"].sum()) == 45


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), float("inf"), "x"])
def test_bad_density_is_rejected_naming_the_value(bad):
    with pytest.raises(ValueError, match=r"density must be"):
        check_density(bad)
    with pytest.raises(ValueError, match=r"density must be"):
        global_topk(toy_params(), init_masks(toy_params()), bad)


def test_non_finite_scores_are_rejected_naming_the_layer():
    params = toy_params()
    masks = init_masks(params)
    scores = jax.tree.map(jnp.abs, params)
    scores["fc"]["kernel"] = scores["fc"]["kernel"].at[0, 0].set(jnp.nan).at[1, 1].set(jnp.inf)
    with pytest.raises(ValueError, match=r"fc\.kernel \(1 NaN, 1 inf\)"):
        check_scores(scores, masks)
    # A non-finite score on an already-pruned entry is harmless.
    masks["fc"]["kernel"] = masks["fc"]["kernel"].at[0, 0].set(0).at[1, 1].set(0)
    check_scores(scores, masks)


def test_structure_mismatch_is_rejected():
    params = toy_params()
    masks = init_masks(params)
    check_structure(params, masks)
    bad = dict(masks)
    del bad["fc"]
    with pytest.raises(ValueError, match=r"missing from mask \['fc\.bias', 'fc\.kernel'\]"):
        check_structure(params, bad)
    bad = jax.tree.map(lambda m: m, masks, is_leaf=lambda t: t is None)
    bad["conv"]["kernel"] = jnp.ones((3, 3, 2, 5))
    with pytest.raises(ValueError, match=r"conv\.kernel.*\(3, 3, 2, 5\).*\(3, 3, 2, 4\)"):
        check_structure(params, bad)


def test_apply_masks_zeroes_pruned_and_leaves_dense_alone():
    params = toy_params()
    masks = global_topk(jax.tree.map(jnp.abs, params), init_masks(params), 0.2)
    out = apply_masks(params, masks)
    assert np.all(np.asarray(out["conv"]["kernel"])[np.asarray(masks["conv"]["kernel"]) == 0] == 0)
    np.testing.assert_array_equal(out["bn"]["scale"], params["bn"]["scale"])


def test_save_load_round_trip_is_exact_and_atomic(tmp_path):
    params = toy_params()
    masks = global_topk(jax.tree.map(jnp.abs, params), init_masks(params), 0.3)
    path = tmp_path / "masks.npz"
    save_masks(path, masks)
    assert sorted(os.listdir(tmp_path)) == ["masks.npz"]  # no temp file left behind
    back = load_masks(path, params)
    assert jax.tree.structure(back, is_leaf=lambda t: t is None) == jax.tree.structure(
        masks, is_leaf=lambda t: t is None
    )
    for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(back)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    with np.load(path) as data:
        assert sorted(data.files) == ["conv.kernel", "fc.kernel"] and data["fc.kernel"].dtype == bool


def test_failed_save_leaves_nothing(tmp_path):
    params = toy_params()
    masks = init_masks(params)
    masks["fc"]["kernel"] = masks["fc"]["kernel"] * 0.5  # not a 0/1 mask
    with pytest.raises(ValueError, match=r"fc\.kernel"):
        save_masks(tmp_path / "m.npz", masks)
    assert os.listdir(tmp_path) == []


def test_load_rejects_masks_of_another_model(tmp_path):
    params = toy_params()
    save_masks(tmp_path / "m.npz", init_masks(params))
    other = dict(params)
    other["fc"] = {"kernel": jnp.zeros((36, 7)), "bias": jnp.zeros(7)}
    with pytest.raises(ValueError, match=r"fc\.kernel.*\(36, 5\)"):
        load_masks(tmp_path / "m.npz", other)
    del other["fc"]
    with pytest.raises(ValueError, match=r"does not have.*fc\.kernel"):
        load_masks(tmp_path / "m.npz", other)


def test_density_report_and_collapse():
    params = toy_params()
    masks = init_masks(params)
    masks["conv"]["kernel"] = jnp.zeros_like(masks["conv"]["kernel"])
    rows = density_report(masks, order=["", "fc", "conv"])
    assert [r["name"] for r in rows] == ["fc.kernel", "conv.kernel"]
    assert rows[1] == {"name": "conv.kernel", "shape": [3, 3, 2, 4], "total": 72, "kept": 0, "density": 0.0}
    assert collapsed_layers(masks) == ["conv.kernel"]


def test_format_report_adds_the_count_columns_it_is_given():
    """The table knows no column beyond kept/total/density unless asked (the CLI's "on path" column is one)."""
    from ntksap_jax.masks import format_report

    rows = [{"name": "a.kernel", "shape": [2, 3], "kept": 4, "total": 6, "density": 4 / 6, "effective": 3},
            {"name": "b.kernel", "shape": [3, 1], "kept": 1, "total": 3, "density": 1 / 3, "effective": 1}]
    plain = format_report(rows).splitlines()
    assert "on path" not in plain[0] and plain[-1].split() == ["total", "5", "9", "55.5556%"]
    annotated = format_report(rows, {"on path": "effective"}).splitlines()
    assert annotated[0].endswith("  on path") and annotated[1].split()[-1] == "3" and annotated[-1].split()[-1] == "4"
