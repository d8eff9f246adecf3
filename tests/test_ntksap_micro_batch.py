"""NTK-SAP scored in micro-batches (issue 18, part 3): the same scores as the whole batch.

The reference is the unbatched path of the same scorer (statistics and gradient from one pass over
the whole batch, the code the fidelity test checks against the official PyTorch scorer), on the
same keys, in float64. The micro-batched path draws the same ``(θ, x, z)``, takes the BatchNorm
statistics from one pass over the whole batch and sums the mask gradient over chunks: only the
order of floating-point sums differs. Tolerance: ``rtol=1e-10`` with ``atol = 1e-12 × max|score|``:
float64's unit round-off is 1.1e-16, and re-associating the per-example sums moved the scores
below by at most 8.9e-15 × max|score| (finite difference; 3.3e-16 with jvp; 2.4e-12 relative on
the smallest entries, where the finite difference cancels), so the tolerance has a margin of ~100x
and still catches any real error: statistics taken per chunk instead of over the whole batch move
the scores by 1.2 × max|score|; a dropped or doubled example moves them by order 1/n.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import to_f64
from ntksap_jax import init_masks, ntksap_scorer
from ntksap_jax.scores import _ntksap_batching as batching
from ntksap_jax.scores.ntksap import ntksap_sample_gradient

SHAPE = (8, 8, 3)


class SmallBNNet(nn.Module):
    """Two convolutions, each followed by BatchNorm (the second's statistics depend on the first's
    train-mode normalisation), then a dense head: small enough to compile quickly."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        for features, stride in ((4, 1), (6, 2)):
            x = nn.Conv(features, (3, 3), strides=stride)(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.0)(x))
        return nn.Dense(3)(x.mean(axis=(1, 2)))


@pytest.fixture(scope="module")
def small_bn_net():
    """The small BatchNorm CNN, float64."""
    model = SmallBNNet()
    with jax.enable_x64(True):
        v = jax.jit(lambda k: model.init(k, jnp.zeros((1, *SHAPE))))(jax.random.key(0))
        return model, to_f64(v["params"]), to_f64(v["batch_stats"])


def _flat(tree):
    return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])


def _assert_equal_f64(got, want):
    got, want = _flat(got), _flat(want)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())


@pytest.mark.slow(seconds=15)
@pytest.mark.parametrize("estimator", ["finite_difference", "jvp"])
def test_micro_batched_scores_equal_whole_batch_scores_float64(small_bn_net, estimator):
    """10 inputs in batches of 7 (weight samples of 7 and 3 inputs) in micro-batches of 2: 7 -> 4
    chunks of 2 (one padded slot), 3 -> 2 chunks of 2 (one padded slot)."""
    model, params, batch_stats = small_bn_net
    with jax.enable_x64(True):
        masks = init_masks(params)
        masks = jax.tree.map(lambda m: m.at[..., 0].set(0.0), masks)  # some pruned entries
        key = jax.random.key(7)
        opts = dict(samples=1, num_inputs=10, batch_size=7, estimator=estimator, sample_loop="sequential")
        want = ntksap_scorer(model, SHAPE, **opts)(params, masks, batch_stats, key)
        assert float(np.abs(_flat(want)).max()) > 0
        score = ntksap_scorer(model, SHAPE, micro_batch=2, **opts)
        _assert_equal_f64(score(params, masks, batch_stats, key), want)
        assert score.traces == 2  # one compiled step per batch size, as without micro-batches
        assert score.micro_batches == {3: 2, 7: 2}


def test_micro_batched_sample_gradient_pads_with_zero_weight_float64(small_bn_net):
    """7 examples in chunks of at most 3: 3 chunks of 3 with two padded slots (weight 0)."""
    model, params, batch_stats = small_bn_net
    with jax.enable_x64(True):
        masks = init_masks(params)
        key = jax.random.key(3)

        def grad(micro):
            return jax.jit(lambda m: ntksap_sample_gradient(model, params, m, batch_stats, key, (7, *SHAPE),
                                                            micro_batch=micro))(masks)

        assert batching.chunks(7, 3) == (3, 3)
        _assert_equal_f64(grad(3), grad(None))


@pytest.mark.slow(seconds=10)
def test_vmap_loop_micro_batches_too_float64(small_bn_net):
    model, params, batch_stats = small_bn_net
    with jax.enable_x64(True):
        masks = init_masks(params)
        key = jax.random.key(2)
        opts = dict(samples=2, num_inputs=6, sample_loop="vmap")
        want = ntksap_scorer(model, SHAPE, **opts)(params, masks, batch_stats, key)
        score = ntksap_scorer(model, SHAPE, micro_batch=4, **opts)
        _assert_equal_f64(score(params, masks, batch_stats, key), want)
        assert score.micro_batches == {6: 3}


@pytest.mark.slow(seconds=15)
def test_auto_picks_a_micro_batch_that_fits_the_budget(small_bn_net, monkeypatch):
    """``auto`` with a budget between the whole batch's compiled peak and a small chunk's picks a
    micro-batch whose compiled step fits, and scores equal the whole batch's."""
    model, params, batch_stats = small_bn_net
    with jax.enable_x64(True):
        masks = init_masks(params)
        key = jax.random.key(9)
        opts = dict(samples=1, num_inputs=32, batch_size=32)
        want = ntksap_scorer(model, SHAPE, **opts)
        low = want.lowered(params, masks, batch_stats, key)[0][0]
        whole = batching.compiled_peak_bytes(low.compile())
        small = ntksap_scorer(model, SHAPE, micro_batch=4, **opts).lowered(params, masks, batch_stats, key)[0][0]
        # halfway between a chunk of 4's peak and the whole batch's: the statistics pass over the whole batch
        # is a fixed cost that chunks do not shrink (jax 0.12: a chunk of 1 still takes 0.67 of the whole's peak)
        budget = (whole + batching.compiled_peak_bytes(small.compile())) // 2
        monkeypatch.setattr(batching, "device_memory_budget", lambda: budget)
        score = ntksap_scorer(model, SHAPE, micro_batch="auto", **opts)
        got = score(params, masks, batch_stats, key)
        (micro,) = score.micro_batches.values()
        assert micro is not None and micro < 32
        low = score.lowered(params, masks, batch_stats, key)[0][0]
        assert batching.compiled_peak_bytes(low.compile()) <= budget
        assert score.traces == 1  # the candidates compiled by "auto" are not counted
        _assert_equal_f64(got, want(params, masks, batch_stats, key))
    if jax.default_backend() == "cpu":  # XLA:CPU reports no limit: "auto" scores whole batches
        monkeypatch.undo()
        assert batching.device_memory_budget() is None


def test_chunks_never_exceed_the_micro_batch_and_pad_less_than_one_per_chunk():
    for n in range(1, 70):
        for micro in range(1, 80):
            c, s = batching.chunks(n, micro)
            assert s <= micro
            assert c * s >= n and c * s - n < c
            assert batching.chunk_size(n, micro) == (None if c == 1 else s)
    assert batching.chunks(232, 64) == (4, 58) and batching.chunk_size(32, 64) is None


def test_pick_micro_batch_from_a_linear_peak():
    peaks = []

    def peak(micro):
        peaks.append(micro)
        return 10 * (256 if micro is None else micro) + 100

    assert batching.pick_micro_batch(peak, 256, 1000) == 86  # 10·86 + 100 ≤ 1000 < 10·94 + 100 (ceil(256/c))
    assert peaks == [None, 128, 32, 86]
    assert batching.pick_micro_batch(peak, 256, 10**6) is None
    assert batching.pick_micro_batch(peak, 256, None) is None
    with pytest.raises(ValueError, match=r"^micro_batch='auto': one example per chunk needs .* over the budget"):
        batching.pick_micro_batch(peak, 256, 50)


@pytest.mark.parametrize("value,match", [
    (0, "micro_batch must be a positive integer, 'auto' or None; got 0"),
    (-4, "micro_batch must be a positive integer, 'auto' or None; got -4"),
    (2.5, r"micro_batch must be a positive integer, 'auto' or None; got 2\.5"),
    ("big", "micro_batch must be a positive integer, 'auto' or None; got 'big'"),
    (True, "micro_batch must be a positive integer, 'auto' or None; got True"),
])
def test_bad_micro_batch_is_rejected_in_one_line(value, match):
    with pytest.raises(ValueError, match=match) as info:
        ntksap_scorer(SmallBNNet(), SHAPE, micro_batch=value)
    assert "\n" not in str(info.value)


def test_auto_with_the_vmap_loop_is_rejected_in_one_line():
    with pytest.raises(ValueError, match=r"^micro_batch='auto' sizes the sequential loop's step") as info:
        ntksap_scorer(SmallBNNet(), SHAPE, micro_batch="auto", sample_loop="vmap")
    assert "\n" not in str(info.value)


def test_command_line_micro_batch_is_resolved_and_checked():
    """``--micro-batch`` reaches the scorer's configuration (``report.json``'s ``config``), checked
    before any device is touched."""
    from ntksap_jax.runs import ConfigError, cli_flag, resolve_prune

    plan = resolve_prune(model="resnet50", dataset="imagenet", density=0.1, micro_batch="32", spell=cli_flag)
    assert plan.config["scorer"]["micro_batch"] == 32
    assert resolve_prune(model="resnet50", dataset="imagenet", density=0.1, micro_batch="auto",
                         spell=cli_flag).config["scorer"]["micro_batch"] == "auto"
    with pytest.raises(ConfigError, match=r"^--micro-batch must be a positive integer, 'auto' or None; got '0'$"):
        resolve_prune(model="resnet50", dataset="imagenet", density=0.1, micro_batch="0", spell=cli_flag)
    assert "micro_batch" not in resolve_prune(model="resnet20", method="synflow", density=0.1).config["scorer"]


def test_prune_model_takes_micro_batch_and_reports_it():
    from ntksap_jax import prune_model

    result = prune_model(SmallBNNet(), input_shape=SHAPE, density=0.5, key=jax.random.key(0), iterations=1,
                         samples=1, num_inputs=6, micro_batch=4)
    assert result.report["scorer"]["micro_batch"] == 4
    assert result.report["scorer"]["micro_batches"] == {"6": 3}  # 6 inputs: 2 chunks of 3
