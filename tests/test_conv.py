"""``ntksap_jax.conv.conv_general_dilated`` against ``lax.conv_general_dilated`` in float64.

The reference is XLA's own convolution and its derivatives (an independent implementation:
ours writes the weight tangent as one matmul per kernel tap on CPU). In float64 the public function
routes to ``lax`` itself, so the per-tap path (what float32 takes without oneDNN) is checked here
through ``_taps_conv_general_dilated``, the same function without its float64 and oneDNN routes.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from conftest import to_f64
from ntksap_jax import get_model
from ntksap_jax.conv import _taps_conv_general_dilated as taps_conv
from ntksap_jax.conv import conv_general_dilated

DN = ("NHWC", "HWIO", "NHWC")

CASES = [  # (N, H, W, C, O, k, stride, padding)
    (2, 8, 8, 3, 5, 3, 1, ((1, 1), (1, 1))),
    (2, 9, 7, 4, 3, 3, 2, ((1, 1), (1, 1))),
    (2, 8, 8, 4, 6, 1, 2, "VALID"),
    (3, 7, 7, 2, 4, 3, 2, "SAME"),
    (1, 11, 11, 3, 4, 7, 2, ((3, 3), (3, 3))),
    (2, 6, 6, 3, 2, 3, 1, ((0, 2), (1, 0))),
]


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))


@pytest.mark.parametrize("n,h,w,c,o,k,s,pad", CASES)
def test_value_and_derivatives_match_lax_float64(x64, n, h, w, c, o, k, s, pad):
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (n, h, w, c), jnp.float64)
    kernel = jax.random.normal(keys[1], (k, k, c, o), jnp.float64)
    ref = lambda x, w: lax.conv_general_dilated(x, w, (s, s), pad, dimension_numbers=DN)  # noqa: E731
    ours = lambda x, w: taps_conv(x, w, (s, s), pad, dimension_numbers=DN)  # noqa: E731
    y = ref(x, kernel)
    np.testing.assert_array_equal(ours(x, kernel), y)  # the forward pass is lax's own
    tx = jax.random.normal(keys[2], x.shape, jnp.float64)
    tw = jax.random.normal(keys[3], kernel.shape, jnp.float64)
    g = jax.random.normal(keys[4], y.shape, jnp.float64)
    assert _rel(jax.jvp(ref, (x, kernel), (tx, tw))[1], jax.jvp(ours, (x, kernel), (tx, tw))[1]) < 1e-13
    for a, b in zip(jax.vjp(ref, x, kernel)[1](g), jax.jit(lambda x, w, g: jax.vjp(ours, x, w)[1](g))(x, kernel, g)):
        assert _rel(a, b) < 1e-13

    # reverse over forward (the "jvp" NTK-SAP estimator) and forward over reverse (GraSP's Hessian products)
    def sq_jvp(f):
        return lambda x, w: jnp.sum(jax.jvp(f, (x, w), (tx, tw))[1] ** 2)

    for a, b in zip(jax.grad(sq_jvp(ref), (0, 1))(x, kernel), jax.grad(sq_jvp(ours), (0, 1))(x, kernel)):
        assert _rel(a, b) < 1e-12
    hvp = lambda f: jax.jvp(jax.grad(lambda w: jnp.sum(jnp.tanh(f(x, w)))), (kernel,), (tw,))[1]  # noqa: E731
    assert _rel(hvp(ref), hvp(ours)) < 1e-12


def test_vmap_and_unsupported_layouts_fall_back(x64):
    x = jax.random.normal(jax.random.key(1), (4, 2, 6, 6, 4), jnp.float64)
    kernel = jax.random.normal(jax.random.key(2), (3, 3, 4, 4), jnp.float64)
    grad_ref = jax.vmap(
        jax.grad(lambda w, x: jnp.sum(lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN) ** 2)),
        (None, 0),
    )
    grad_ours = jax.vmap(
        jax.grad(lambda w, x: jnp.sum(taps_conv(x, w, (1, 1), "SAME", dimension_numbers=DN) ** 2)),
        (None, 0),
    )
    assert _rel(grad_ref(kernel, x), grad_ours(kernel, x)) < 1e-13
    # dilation, feature groups and NCHW layouts take lax's own path: identical values and gradients
    x2 = x[0]
    for kwargs, kern in [
        (dict(rhs_dilation=(2, 2), dimension_numbers=DN), kernel),
        (dict(feature_group_count=2, dimension_numbers=DN), kernel[:, :, :2]),
        (dict(dimension_numbers=("NCHW", "OIHW", "NCHW")), jnp.transpose(kernel, (3, 2, 0, 1))),
    ]:
        inp = jnp.transpose(x2, (0, 3, 1, 2)) if kwargs["dimension_numbers"][0] == "NCHW" else x2
        f_ref = lambda w, inp=inp, kwargs=kwargs: jnp.sum(  # noqa: E731
            lax.conv_general_dilated(inp, w, (1, 1), "SAME", **kwargs) ** 2
        )
        f_ours = lambda w, inp=inp, kwargs=kwargs: jnp.sum(conv_general_dilated(inp, w, (1, 1), "SAME", **kwargs) ** 2)  # noqa: E731
        np.testing.assert_array_equal(jax.grad(f_ref)(kern), jax.grad(f_ours)(kern))


def test_resnet20_mask_gradient_matches_lax_convolutions(x64):
    """Whole-network check: ResNet-20 weight gradients with every conv on the per-tap path vs every
    conv forced to lax's."""
    model = get_model("resnet20", 10)
    variables = to_f64(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    x = jax.random.normal(jax.random.key(3), (4, 32, 32, 3), jnp.float64)

    def loss(params):
        return jnp.sum(model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x) ** 2)

    def swap_to(conv):
        def swap(next_fun, args, kwargs, context):
            if isinstance(context.module, nn.Conv) and context.module.conv_general_dilated is conv_general_dilated:
                swapped.append(context.module.name)
                other = context.module.clone(conv_general_dilated=conv, parent=None)
                return other.apply({"params": context.module.variables["params"]}, *args, **kwargs)
            return next_fun(*args, **kwargs)
        return swap

    swapped = []
    with nn.intercept_methods(swap_to(taps_conv)):  # float64 would otherwise route to lax itself
        ours = jax.grad(loss)(variables["params"])
    assert len(swapped) == 21  # the stem, 18 block convs and 2 shortcut convs: all of them
    swapped.clear()
    with nn.intercept_methods(swap_to(lax.conv_general_dilated)):
        ref = jax.grad(loss)(variables["params"])
    assert len(swapped) == 21  # the stem, 18 block convs and 2 shortcut convs: all of them
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(ours)):
        assert _rel(a, b) < 1e-12


def test_float64_routes_to_lax_itself(x64):
    """float64 convolutions are XLA's own, derivatives included: bit-identical to ``lax``'s (the
    per-tap path only agrees to rounding), and the reverse-mode program holds no tap matmul."""
    x = jax.random.normal(jax.random.key(4), (2, 8, 8, 3), jnp.float64)
    kernel = jax.random.normal(jax.random.key(5), (3, 3, 3, 4), jnp.float64)

    def loss(conv):
        return lambda w: jnp.sum(jnp.tanh(conv(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=DN)))

    ours = jax.grad(loss(conv_general_dilated))
    np.testing.assert_array_equal(ours(kernel), jax.grad(loss(lax.conv_general_dilated))(kernel))
    assert "dot_general" not in str(jax.make_jaxpr(ours)(kernel))
    assert "dot_general" in str(jax.make_jaxpr(jax.grad(loss(taps_conv)))(kernel))  # the probe sees taps
