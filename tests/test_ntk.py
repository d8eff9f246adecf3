"""The NTK functions against float64 ``jax.jacobian`` oracles and hand-derived formulas."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import to_f64
from ntksap_jax import empirical_ntk, get_model, ntk_eigenvalues, ntk_trace
from ntksap_jax.ntk import ntk_trace_finite_difference
from ntksap_jax.ntk import ntk_trace_hutchinson, NtkImplementation
from ntksap_jax.ntk import gram_chunk_size, ntk_gram


def oracle_ntk(apply_fn, params, x1, x2):
    """Θ from full Jacobians: independent of the vjp/jvp code under test."""
    j1 = jax.jacobian(lambda p: apply_fn(p, x1))(params)
    j2 = jax.jacobian(lambda p: apply_fn(p, x2))(params)
    terms = jax.tree.map(
        lambda a, b: jnp.einsum("iaP,jbP->ijab", a.reshape(a.shape[:2] + (-1,)), b.reshape(b.shape[:2] + (-1,))), j1, j2
    )
    return sum(jax.tree.leaves(terms))


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))(x))
        x = jnp.tanh(nn.Conv(6, (3, 3), strides=(2, 1), padding="VALID")(x))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(3)(x)


def _mlp_case(key):
    model = get_model("mlp", 4, features=(16, 8))
    x = jax.random.normal(key, (5, 3, 2, 1), jnp.float64)
    params = to_f64(jax.jit(model.init)(jax.random.key(1), x)["params"])
    return (lambda p, xb: model.apply({"params": p}, xb)), params, x


def _cnn_case(key):
    model = SmallCNN()
    x = jax.random.normal(key, (4, 9, 7, 2), jnp.float64)
    params = to_f64(jax.jit(model.init)(jax.random.key(1), x)["params"])
    return (lambda p, xb: model.apply({"params": p}, xb)), params, x


def _resnet_case(key):
    model = get_model("resnet20", 3, width=4)
    x = jax.random.normal(key, (3, 8, 8, 3), jnp.float64)
    v = to_f64(jax.jit(lambda k, xb: model.init(k, xb))(jax.random.key(1), x))
    # Non-trivial eval-mode statistics, fixed.
    stats = jax.tree.map(
        lambda a: a + 0.1 * jnp.abs(jax.random.normal(jax.random.key(3), a.shape, a.dtype)), v["batch_stats"]
    )
    return (lambda p, xb: model.apply({"params": p, "batch_stats": stats}, xb, train=False)), v["params"], x


CASES = {"mlp": _mlp_case, "cnn_strided": _cnn_case, "resnet20_bn_eval": _resnet_case}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", list(NtkImplementation))
def test_empirical_ntk_matches_jacobian_oracle_float64(x64, case, impl):
    apply_fn, params, x1 = CASES[case](jax.random.key(0))
    x2 = x1[:2] * 0.5 + 0.1
    want = oracle_ntk(apply_fn, params, x1, x2)
    got = jax.jit(lambda p, a, b: empirical_ntk(apply_fn, p, a, b, implementation=impl))(params, x1, x2)
    assert got.dtype == jnp.float64
    assert got.shape == want.shape
    rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert rel < 1e-10, rel
    same = empirical_ntk(apply_fn, params, x1, implementation=impl)
    want_same = oracle_ntk(apply_fn, params, x1, x1)
    assert float(jnp.linalg.norm(same - want_same) / jnp.linalg.norm(want_same)) < 1e-10


@pytest.mark.parametrize("case", list(CASES))
def test_ntk_trace_matches_oracle_float64(x64, case):
    apply_fn, params, x = CASES[case](jax.random.key(0))
    theta = oracle_ntk(apply_fn, params, x, x)
    want = float(jnp.einsum("iiaa->", theta))
    got = float(jax.jit(lambda p, xb: ntk_trace(apply_fn, p, xb))(params, x))
    assert abs(got - want) / want < 1e-10
    chunked = float(ntk_trace(apply_fn, params, x, chunk_size=3))
    assert abs(chunked - want) / want < 1e-10


@pytest.mark.parametrize("case", ["mlp", "cnn_strided"])
def test_per_example_trace_matches_oracle_float64(x64, case):
    apply_fn, params, x = CASES[case](jax.random.key(0))
    want = float(jnp.einsum("iiaa->", oracle_ntk(apply_fn, params, x, x)))
    got = float(jax.jit(lambda p, xb: ntk_trace(apply_fn, p, xb, per_example=True))(params, x))
    assert abs(got - want) / want < 1e-10
    assert abs(float(ntk_trace(apply_fn, params, x, per_example=True, chunk_size=2)) - want) / want < 1e-10


def test_per_example_trace_is_wrong_for_batch_coupled_models(x64):
    """A model whose outputs mix examples: the per-example shortcut must differ from the oracle."""
    w = jnp.arange(12.0).reshape(4, 3) / 10
    apply_fn = lambda p, xb: jnp.tanh(xb @ p) + jnp.mean(xb @ p, axis=0)  # noqa: E731
    x = jax.random.normal(jax.random.key(1), (5, 4), jnp.float64)
    want = float(jnp.einsum("iiaa->", oracle_ntk(apply_fn, w, x, x)))
    assert abs(float(ntk_trace(apply_fn, w, x)) - want) / want < 1e-10
    assert abs(float(ntk_trace(apply_fn, w, x, per_example=True)) - want) / want > 1e-3


def test_linear_model_kernel_is_hand_derived(x64):
    # f(x) = x W: Θ[i, j, a, b] = δ_ab <x_i, x_j>, tr Θ = K ‖X‖²_F.
    w = jax.random.normal(jax.random.key(0), (5, 3), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (4, 5), jnp.float64)
    def apply_fn(p, xb):
        return xb @ p["w"]

    theta = empirical_ntk(apply_fn, {"w": w}, x)
    want = jnp.einsum("ip,jp->ij", x, x)[:, :, None, None] * jnp.eye(3)
    np.testing.assert_allclose(theta, want, rtol=1e-12, atol=1e-12)
    assert float(ntk_trace(apply_fn, {"w": w}, x)) == pytest.approx(3 * float(jnp.sum(x**2)), rel=1e-12)


def test_eigenvalues_are_those_of_the_oracle_gram(x64):
    apply_fn, params, x = _cnn_case(jax.random.key(2))
    theta = oracle_ntk(apply_fn, params, x, x)
    n, _, k, _ = theta.shape
    want = np.sort(np.linalg.eigvalsh(np.asarray(theta.transpose(0, 2, 1, 3).reshape(n * k, n * k))))[::-1]
    got = np.asarray(ntk_eigenvalues(apply_fn, params, x))
    assert got.shape == (n * k,)
    assert np.all(np.diff(got) <= 0)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * want[0])
    assert got.sum() == pytest.approx(float(ntk_trace(apply_fn, params, x)), rel=1e-10)


def test_hutchinson_is_unbiased(x64):
    apply_fn, params, x = _cnn_case(jax.random.key(0))
    exact = float(ntk_trace(apply_fn, params, x))
    keys = jax.random.split(jax.random.key(7), 2000)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: ntk_trace_hutchinson(apply_fn, params, x, k, 1)))(keys))
    stderr = draws.std(ddof=1) / np.sqrt(draws.size)
    assert abs(draws.mean() - exact) < 4 * stderr, (draws.mean(), exact, stderr)
    # The estimator is not trivially exact: single probes scatter.
    assert draws.std() > 0.05 * exact
    # num_probes averages: 2000 probes in one call land within 4 standard errors too.
    one_call = float(ntk_trace_hutchinson(apply_fn, params, x, jax.random.key(8), num_probes=2000))
    assert abs(one_call - exact) < 4 * stderr


def test_finite_difference_tends_to_jvp_norm(x64):
    apply_fn, params, x = _cnn_case(jax.random.key(0))
    key = jax.random.key(11)
    # ‖J v‖² for the same v the estimator draws (v ~ N(0, I) from the same key).
    from ntksap_jax.ntk import gaussian_like, jvp_squared_norm

    jv2 = float(jvp_squared_norm(apply_fn, params, x, gaussian_like(key, params)))
    errors = []
    for eps in (1e-1, 1e-2, 1e-3, 1e-4):
        fd = float(ntk_trace_finite_difference(apply_fn, params, x, key, eps)) / eps**2
        errors.append(abs(fd - jv2) / jv2)
    assert errors[-1] < 1e-3
    assert errors[0] > errors[-1]
    # Error shrinks roughly linearly in eps (first-order remainder).
    assert errors[2] < errors[1] < errors[0]


def test_vmap_over_weight_samples():
    apply_fn, _, x = _cnn_case(jax.random.key(0))
    model = SmallCNN()
    keys = jax.random.split(jax.random.key(3), 3)
    stacked = jax.vmap(lambda k: model.init(k, x.astype(jnp.float32))["params"])(keys)
    xs = x.astype(jnp.float32)
    batched = jax.jit(jax.vmap(lambda p: ntk_trace(apply_fn, p, xs)))(stacked)
    one_by_one = [float(ntk_trace(apply_fn, jax.tree.map(lambda a, i=i: a[i], stacked), xs)) for i in range(3)]
    np.testing.assert_allclose(np.asarray(batched), one_by_one, rtol=1e-5)


def test_bad_output_shape_is_rejected():
    with pytest.raises(ValueError, match=r"shape \(N, K\)"):
        ntk_trace(lambda p, x: (x * p).sum(), jnp.ones(3), jnp.ones((2, 3)))


def _oracle_gram(apply_fn, params, x):
    theta = oracle_ntk(apply_fn, params, x, x)
    n, _, k, _ = theta.shape
    return np.asarray(theta.transpose(0, 2, 1, 3).reshape(n * k, n * k))


@pytest.mark.parametrize("case", list(CASES))
def test_ntk_gram_whole_and_blocked_match_oracle_float64(x64, case):
    """Whole-batch rows, per-example rows, and both in blocks of 2 examples (N = 5, 4, 3: padded
    last blocks for the MLP and the ResNet)."""
    apply_fn, params, x = CASES[case](jax.random.key(0))
    want = _oracle_gram(apply_fn, params, x)
    for per_example in (False, True):
        for chunk in (None, 2):
            got = jax.jit(
                lambda p, xb, per_example=per_example, chunk=chunk: ntk_gram(
                    apply_fn, p, xb, per_example=per_example, chunk_size=chunk
                )
            )(params, x)
            assert got.shape == want.shape and got.dtype == jnp.float64
            rel = float(np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want))
            assert rel < 1e-10, (per_example, chunk, rel)


def test_ntk_gram_blocks_of_a_batch_coupled_model(x64):
    """Without per_example, blocks pull back the whole-batch output: right for coupled models too."""
    w = jnp.arange(12.0).reshape(4, 3) / 10
    apply_fn = lambda p, xb: jnp.tanh(xb @ p) + jnp.mean(xb @ p, axis=0)  # noqa: E731
    x = jax.random.normal(jax.random.key(1), (5, 4), jnp.float64)
    want = _oracle_gram(apply_fn, w, x)
    for chunk in (None, 2):
        got = np.asarray(ntk_gram(apply_fn, w, x, chunk_size=chunk))
        assert float(np.linalg.norm(got - want) / np.linalg.norm(want)) < 1e-10
    per_example = np.asarray(ntk_gram(apply_fn, w, x, per_example=True, chunk_size=2))
    assert float(np.linalg.norm(per_example - want) / np.linalg.norm(want)) > 1e-3


def test_ntk_gram_chunk_size_is_checked_and_sized():
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        ntk_gram(lambda p, xb: xb @ p, jnp.ones((3, 2)), jnp.ones((4, 3)), chunk_size=0)
    assert gram_chunk_size(256, 10, 272_474, 4) == 98  # ResNet-20, float32: 98 examples per 1 GiB block
    assert gram_chunk_size(64, 10, 272_474, 4) == 64
    assert gram_chunk_size(8, 10, 10**9, 8) == 1
