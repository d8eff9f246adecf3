"""The oneDNN convolution primitives (``ntksap_jax._onednn``) against XLA's convolution in float64.

The reference is ``lax.conv_general_dilated`` and JAX's own derivatives of it, in float64: an
independent implementation (Eigen) at a precision where its own error is negligible. oneDNN runs
in float32, so each comparison's tolerance is float32's: for one convolution, Higham's bound for
a sum of ``K = kh·kw·C`` products, ``|ŷ - y| ≤ γ_K · (|x| * |w|)`` elementwise with
``γ_K = K·u / (1 - K·u)``, ``u = 2⁻²⁴`` (the ``(|x| * |w|)`` term is the convolution of the
absolute values, computed in float64); for compositions of two or three convolutions, a relative
``1e-4`` of the largest entry (three products of sums of at most 54 terms, each at most ``K·u ≈
3e-6``, plus the float32 rounding of the inputs themselves).
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ntksap_jax import _onednn
from ntksap_jax.conv import conv_general_dilated

DN = ("NHWC", "HWIO", "NHWC")
U = 2.0**-24
ONEDNN_HEADERS = Path("/usr/include/oneapi/dnnl/dnnl.hpp").exists() or bool(os.environ.get("ONEDNN_ROOT"))

needs_onednn = pytest.mark.skipif(not _onednn.available(), reason="the oneDNN extension is not built here")

CASES = [  # (N, H, W, C, O, k, stride, explicit padding)
    (2, 8, 8, 3, 5, 3, 1, ((1, 1), (1, 1))),
    (2, 9, 7, 4, 3, 3, 2, ((1, 1), (1, 1))),
    (2, 8, 8, 4, 6, 1, 2, ((0, 0), (0, 0))),
    (1, 11, 11, 3, 4, 7, 2, ((3, 3), (3, 3))),
    (2, 6, 6, 3, 2, 3, 1, ((0, 2), (1, 0))),
]


def _ref(x, w, s, pad):
    return lax.conv_general_dilated(x, w, (s, s), pad, dimension_numbers=DN)


def _f64(*arrays):
    return [jnp.asarray(np.asarray(a, np.float64)) for a in arrays]


def _higham(k):
    return k * U / (1 - k * U)


def _rel(ref, got):
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return float(np.max(np.abs(ref - got)) / np.max(np.abs(ref)))


@needs_onednn
@pytest.mark.parametrize("n,h,w,c,o,k,s,pad", CASES)
def test_forward_and_both_transposes_within_float32_rounding(x64, n, h, w, c, o, k, s, pad):
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (n, h, w, c), jnp.float32)
    kern = jax.random.normal(keys[1], (k, k, c, o), jnp.float32)
    ours = lambda a, b: _onednn.conv(a, b, (s, s), pad)  # noqa: E731
    y = jax.jit(ours)(x, kern)
    assert y.dtype == jnp.float32
    x64_, w64 = _f64(x, kern)
    y64 = _ref(x64_, w64, s, pad)
    bound = _higham(k * k * c) * _ref(jnp.abs(x64_), jnp.abs(w64), s, pad)
    assert bool(jnp.all(jnp.abs(y - y64) <= bound))

    g = jax.random.normal(keys[2], y.shape, jnp.float32)
    dx, dw = jax.jit(lambda a, b: jax.vjp(ours, a, b)[1](g))(x, kern)
    (g64,) = _f64(g)
    dx64, dw64 = jax.vjp(lambda a, b: _ref(a, b, s, pad), x64_, w64)[1](g64)
    abs_vjp = jax.vjp(lambda a, b: _ref(a, b, s, pad), jnp.abs(x64_), jnp.abs(w64))[1](jnp.abs(g64))
    # backward-data sums k·k·O products per entry; backward-weights N·H'·W' products
    assert bool(jnp.all(jnp.abs(dx - dx64) <= _higham(k * k * o) * abs_vjp[0]))
    assert bool(jnp.all(jnp.abs(dw - dw64) <= _higham(n * y.shape[1] * y.shape[2]) * abs_vjp[1]))


@needs_onednn
@pytest.mark.parametrize("n,h,w,c,o,k,s,pad", CASES[:3])
def test_forward_mode_higher_order_and_vmap_match_float64(x64, n, h, w, c, o, k, s, pad):
    keys = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(keys[0], (n, h, w, c), jnp.float32)
    kern = jax.random.normal(keys[1], (k, k, c, o), jnp.float32)
    tx, tw = (jax.random.normal(key, a.shape, jnp.float32) for key, a in zip(keys[2:], (x, kern)))
    ours = lambda a, b: _onednn.conv(a, b, (s, s), pad)  # noqa: E731
    ref = lambda a, b: _ref(a, b, s, pad)  # noqa: E731
    x64_, w64, tx64, tw64 = _f64(x, kern, tx, tw)

    checks = {
        "jvp": lambda f, a, b, ta, tb: jax.jvp(f, (a, b), (ta, tb))[1],
        # reverse over forward: the NTK-SAP jvp estimator's mask gradient
        "grad of |jvp|²": lambda f, a, b, ta, tb: jax.grad(
            lambda b_: jnp.sum(jax.jvp(f, (a, b_), (ta, tb))[1] ** 2))(b),
        # forward over reverse: GraSP's Hessian-vector product
        "hvp": lambda f, a, b, ta, tb: jax.jvp(jax.grad(lambda b_: jnp.sum(jnp.tanh(f(a, b_)))), (b,), (tb,))[1],
        "vmap over examples": lambda f, a, b, ta, tb: jax.vmap(lambda xi: f(xi[None], b))(a),
        "vmap over kernels": lambda f, a, b, ta, tb: jax.vmap(lambda bi: f(a, bi))(jnp.stack([b, tb])),
        "per-example weight gradients": lambda f, a, b, ta, tb: jax.vmap(
            jax.grad(lambda b_, xi: jnp.sum(f(xi[None], b_) ** 2)), (None, 0))(b, a),
    }
    for name, check in checks.items():
        got = jax.jit(lambda a, b, ta, tb, check=check: check(ours, a, b, ta, tb))(x, kern, tx, tw)
        want = check(ref, x64_, w64, tx64, tw64)
        assert _rel(want, got) < 1e-4, name


@needs_onednn
def test_float32_nhwc_convolutions_lower_to_the_custom_call_and_float64_does_not(x64):
    conv = lambda a, b: conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=DN)  # noqa: E731
    f32 = jax.jit(conv).lower(jnp.ones((2, 8, 8, 3), jnp.float32), jnp.ones((3, 3, 3, 4), jnp.float32)).as_text()
    f64 = jax.jit(conv).lower(jnp.ones((2, 8, 8, 3), jnp.float64), jnp.ones((3, 3, 3, 4), jnp.float64)).as_text()
    assert "ntksap_onednn_conv_fwd" in f32
    assert "ntksap_onednn" not in f64 and "stablehlo.convolution" in f64
    nchw = jax.jit(lambda a, b: conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")))
    ones = jnp.ones((2, 3, 8, 8), jnp.float32), jnp.ones((4, 3, 3, 3), jnp.float32)
    assert "ntksap_onednn" not in nchw.lower(*ones).as_text()


@needs_onednn
@pytest.mark.slow(seconds=25)
def test_resnet20_ntksap_scores_agree_with_xla_convolutions(monkeypatch):
    """Fixed-key NTK-SAP scores with oneDNN and with XLA's path agree to float32 rounding."""
    import ntksap_jax.conv as conv_module
    from ntksap_jax import get_model, init_masks
    from ntksap_jax.scores import get_scorer

    model = get_model("resnet20", num_classes=10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    masks = init_masks(variables["params"])

    def scores():
        score = get_scorer("ntksap")(model, input_shape=(32, 32, 3), num_inputs=8, samples=1)
        return score(variables["params"], masks, variables["batch_stats"], jax.random.key(3))

    with_onednn = scores()
    monkeypatch.setattr(conv_module, "_onednn_applies", lambda *a: False)
    with_xla = scores()
    for a, b in zip(jax.tree.leaves(with_xla), jax.tree.leaves(with_onednn)):
        # sums of ~10⁴ float32 terms through 19 layers: relative 1e-3 of the layer's largest score
        assert _rel(a, b) < 1e-3


def test_turned_off_by_environment_and_warns_once_when_missing(monkeypatch, tmp_path):
    code = ("import jax, jax.numpy as jnp; from ntksap_jax.conv import conv_general_dilated as c;"
            "print(jax.jit(lambda a, b: c(a, b, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))"
            ".lower(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1))).as_text())")
    env = {**os.environ, "NTKSAP_JAX_ONEDNN": "0", "PYTHONWARNINGS": "error"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "ntksap_onednn" not in out.stdout and "stablehlo.convolution" in out.stdout
    # several host devices: XLA's convolution, which the SPMD partitioner can split over a mesh
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env.pop("NTKSAP_JAX_ONEDNN", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "ntksap_onednn" not in out.stdout and "stablehlo.convolution" in out.stdout

    monkeypatch.setattr(_onednn._State, "loaded", None)
    monkeypatch.setattr(_onednn._State, "warned", False)
    monkeypatch.setattr(_onednn, "library_path", lambda: None)
    monkeypatch.delenv("NTKSAP_JAX_ONEDNN", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not _onednn.available() and not _onednn.available()
    assert [w.category for w in caught] == [_onednn.OneDnnUnavailableWarning]
    assert "libdnnl-dev" in str(caught[0].message)


@pytest.mark.skipif(not ONEDNN_HEADERS, reason="oneDNN is not installed here, so the build skips the extension")
def test_the_extension_is_built_where_onednn_is_installed():
    assert _onednn.library_path() is not None


@needs_onednn
def test_strided_1x1_weight_gradient_of_one_small_image_is_right_and_does_not_crash():
    """oneDNN 2.6's strided 1x1 weight gradient corrupted the heap for one image of under 16
    channels (SynFlow's batch of one on a width-8 ResNet-20 crashed); ``conv.py`` now runs strided
    1x1 convolutions as unit-stride ones on every stride-th pixel. In a subprocess, since the
    failure was a crash; checked against float64 lax within Higham's bound (K = N·H'·W' products)."""
    code = """
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from ntksap_jax.conv import conv_general_dilated
jax.config.update("jax_enable_x64", True)
DN = ("NHWC", "HWIO", "NHWC")
for n, c in ((1, 8), (1, 3), (2, 4)):
    x = jax.random.normal(jax.random.key(0), (n, 28, 28, c), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (1, 1, c, 16), jnp.float32)
    g = jax.random.normal(jax.random.key(2), (n, 14, 14, 16), jnp.float32)
    conv = lambda x_, b: conv_general_dilated(x_, b, (2, 2), "VALID", dimension_numbers=DN)
    grad = jax.jit(lambda x, w: jax.vjp(lambda b: conv(x, b), w)[1](g)[0])
    for _ in range(100):
        got = grad(x, w).block_until_ready()
    x64, g64 = np.asarray(x, np.float64), np.asarray(g, np.float64)
    ref = lambda x_, b: lax.conv_general_dilated(x_, b, (2, 2), "VALID", dimension_numbers=DN)
    f = lambda x_, g_: jax.vjp(lambda b: ref(x_, b), w.astype(jnp.float64))[1](g_)[0]
    k = n * 14 * 14
    bound = k * 2.0**-24 / (1 - k * 2.0**-24) * f(np.abs(x64), np.abs(g64))
    assert bool(jnp.all(jnp.abs(got - f(x64, g64)) <= bound)), (n, c)
    assert "ntksap_onednn" in grad.lower(x, w).as_text()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), (out.returncode, out.stderr[-2000:])


@needs_onednn
def test_the_primitive_never_sees_a_strided_1x1_kernel():
    """``_onednn.conv`` itself reroutes strided 1x1 kernels to unit stride on every stride-th pixel (so
    no caller, these tests included, can reach oneDNN 2.6's heap-corrupting path) and refuses padded ones."""
    x, w = jnp.ones((1, 8, 8, 4), jnp.float32), jnp.ones((1, 1, 4, 6), jnp.float32)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda b: jnp.sum(_onednn.conv(x, b, (2, 2), ((0, 0), (0, 0))))))(w))
    assert "ntksap_onednn_conv_bwd_weights" in jaxpr and "strides=(2, 2)" not in jaxpr
    with pytest.raises(ValueError, match=r"no padded strided 1x1 kernels; got strides \(2, 2\)"):
        _onednn.conv(x, w, (2, 2), ((1, 1), (0, 0)))
