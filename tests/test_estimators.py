"""NTK-SAP's objective as an estimator of ``ε² tr Θ_m``, against a float64 ``jax.jacobian`` oracle.

With ``z ~ N(0, I)`` on the prunable kernels, ``E_z ‖J(θ⊙m) (εz⊙m)‖² = ε² tr Θ_m`` where
``Θ_m = J diag(m) Jᵀ`` is the NTK w.r.t. the prunable kernels only (the perturbation never
touches biases or BatchNorm parameters). The oracle builds that ``J`` with ``jax.jacobian``
and is independent of ``ntksap_jax.ntk``.

The statistical checks use fixed keys (deterministic) and a 4-standard-error band; each
also asserts that the same band rejects a reference 1.3× off, so the check can fail.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntksap_jax import apply_masks, get_model, init_masks
from ntksap_jax.scores import ntksap_objective
from ntksap_jax.model import calibrated_batch_stats, masked_apply_fn
from ntksap_jax.models.resnet_cifar import LotteryResNet
from ntksap_jax.ntk import gaussian_like

PROBES = 1000


def _is_none(t):
    return t is None


def oracle_kernel_trace(apply_fn, params, masks, x):
    """``tr Θ_m = ‖J(θ⊙m) diag(m)‖²_F`` with ``J`` w.r.t. the masked (prunable) leaves only."""

    @jax.jit  # arrays are arguments, not closed-over constants (XLA would fold them at compile time)
    def trace(params, masks, x):
        def g(kernels):
            full = jax.tree.map(lambda m, p, k: p if m is None else k, masks, params, kernels, is_leaf=_is_none)
            return apply_fn(apply_masks(full, masks), x)

        kernels = jax.tree.map(lambda m, p: None if m is None else p, masks, params, is_leaf=_is_none)
        return sum(jnp.sum(j**2) for j in jax.tree.leaves(jax.jacobian(g)(kernels)))

    return float(trace(params, masks, x))


def objective_samples(apply_fn, params, masks, x, key, *, eps, estimator, n=PROBES):
    """``n`` draws of ``ntksap_objective`` with independent ``z ~ N(0, I)`` on the masked leaves."""
    keys = jax.random.split(key, n)

    @jax.jit
    def draws(keys, params, masks, x):
        return jax.vmap(lambda k: ntksap_objective(apply_fn, params, masks, gaussian_like(k, masks), x, eps=eps,
                                                   estimator=estimator))(keys)

    return np.asarray(draws(keys, params, masks, x))


def within(samples, reference, k=4.0):
    """Is ``reference`` within ``k`` standard errors of the sample mean? Also returns the z-score."""
    se = samples.std(ddof=1) / np.sqrt(samples.size)
    z = (samples.mean() - reference) / se
    return abs(z) < k, z


def _init(model, x, seed=1):
    """Float64 variables like the model's init (kaiming-normal kernels, BN scale 1, biases 0), drawn
    with NumPy: ``model.init`` would compile one threefry kernel per leaf (seconds each on XLA:CPU)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)

    def leaf(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel" and len(s.shape) > 1:
            return jnp.asarray(rng.standard_normal(s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1])))
        return jnp.ones(s.shape, jnp.float64) if name in ("scale", "var") else jnp.zeros(s.shape, jnp.float64)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _random_masks(params, seed=2):
    """Keep each prunable weight with probability 1/2."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda m: jnp.asarray(rng.random(m.shape) < 0.5, m.dtype), init_masks(params))


def _normal(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def _mlp(masked, features=(16, 8), inputs=(6, 5), n=4, classes=3):
    model = get_model("mlp", classes, features=features)
    x = _normal((n, *inputs))
    params = _init(model, x)["params"]
    masks = _random_masks(params) if masked else init_masks(params)
    return masked_apply_fn(model, None, None), params, masks, x


def _bn_resnet(masked):
    model = LotteryResNet(num_classes=3, depth=8, width=2)
    x = _normal((4, 8, 8, 3))
    v = _init(model, x)
    params = v["params"]
    masks = _random_masks(params) if masked else init_masks(params)
    # BN statistics of the masked net on x; the objective masks the params itself, so apply_fn is the
    # unmasked eval-mode net with those statistics.
    stats = jax.jit(lambda p, m, s, xb: calibrated_batch_stats(model, p, m, s, xb))(params, masks, v["batch_stats"], x)
    return masked_apply_fn(model, None, stats), params, masks, x


CASES = {
    "mlp_dense": lambda: _mlp(False),
    "mlp_masked": lambda: _mlp(True),
    "resnet8_bn_masked": lambda: _bn_resnet(True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_jvp_objective_is_unbiased_for_eps2_trace_float64(x64, case):
    apply_fn, params, masks, x = CASES[case]()
    eps = 0.01
    trace = oracle_kernel_trace(apply_fn, params, masks, x)
    assert trace > 0
    samples = objective_samples(apply_fn, params, masks, x, jax.random.key(3), eps=eps, estimator="jvp")
    assert samples.dtype == np.float64
    ok, z = within(samples, eps**2 * trace)
    assert ok, f"jvp mean is {z:.2f} standard errors from eps^2 tr"
    # The check has power: a reference 30% off is rejected.
    wrong_ok, wrong_z = within(samples, 1.3 * eps**2 * trace)
    assert not wrong_ok, f"a 1.3x reference was accepted (z = {wrong_z:.2f}); too few probes"
    wrong_ok, wrong_z = within(samples, 0.7 * eps**2 * trace)
    assert not wrong_ok, f"a 0.7x reference was accepted (z = {wrong_z:.2f}); too few probes"


def test_jvp_objective_scales_exactly_as_eps_squared_float64(x64):
    apply_fn, params, masks, x = CASES["mlp_masked"]()
    z = gaussian_like(jax.random.key(4), masks)
    a = float(ntksap_objective(apply_fn, params, masks, z, x, eps=1e-2, estimator="jvp"))
    b = float(ntksap_objective(apply_fn, params, masks, z, x, eps=1e-5, estimator="jvp"))
    np.testing.assert_allclose(b / a, 1e-6, rtol=1e-12)


def test_masked_kernel_trace_differs_from_dense_so_the_mask_matters(x64):
    # Guards the masked case above: with the mask ignored the reference would be wrong and rejected.
    apply_fn, params, masks, x = CASES["mlp_masked"]()
    masked = oracle_kernel_trace(apply_fn, params, masks, x)
    dense = oracle_kernel_trace(apply_fn, params, init_masks(params), x)
    assert masked < 0.8 * dense
    samples = objective_samples(apply_fn, params, masks, x, jax.random.key(3), eps=0.01, estimator="jvp")
    assert not within(samples, 0.01**2 * dense)[0]


def test_finite_difference_bias_shrinks_with_eps_float64(x64):
    # A ReLU MLP with fan-in 64 (kernel std 0.18): eps = 0.1 moves the weights by 57% of their
    # scale, far from the linear regime (measured bias +33%, 20 s.e.); eps = 1e-3 is first order.
    apply_fn, params, masks, x = _mlp(False, features=(64, 64), inputs=(64,), n=6, classes=4)
    trace = oracle_kernel_trace(apply_fn, params, masks, x)
    bias, zs = {}, {}
    for eps in (1e-1, 1e-3):
        # The same probes for both eps (common random numbers): the difference is the eps dependence.
        s = objective_samples(apply_fn, params, masks, x, jax.random.key(5), eps=eps, estimator="finite_difference")
        bias[eps] = s.mean() / (eps**2 * trace) - 1
        zs[eps] = within(s, eps**2 * trace)[1]
    assert abs(bias[1e-3]) < abs(bias[1e-1]), bias
    # eps = 1e-3 is unbiased within noise; eps = 0.1 is biased far beyond it.
    assert abs(zs[1e-3]) < 4, zs
    assert abs(zs[1e-1]) > 4, zs
