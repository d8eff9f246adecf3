"""Users' own models through the model abstraction (ntksap_jax.model) and prune_model.

The subjects are in tests/own_models.py, written the way users write models (the Flax examples'
ResNet with zero-initialised residual BatchNorm scales, a linen ViT with ``deterministic=``,
NNX modules, an Equinox MLP, a neural-tangents stax CNN). The references are independent of the
code under test: numpy counts, a float64 path construction, hand formulas for statistics and
initialisation, and twins of the same network written in another front end.
"""

from __future__ import annotations

import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import to_f64
from own_models import (
    FlaxExamplesResNet,
    LinenCNN,
    LinenMLP,
    NnxCNN,
    NnxMLP,
    ViT,
    equinox_mlp,
    linen_params_from_equinox,
    stax_cnn,
)
from ntksap_jax import (
    DegenerateMaskError, apply_masks, as_model, from_apply_fn, from_linen, from_nnx, init_masks, masked,
    ntksap_scorer, prune, prune_model
)
from ntksap_jax.validate import import_neural_tangents
from ntksap_jax.scores import magnitude_scorer, synflow_scorer
from ntksap_jax.analysis import ntk_spectrum
from ntksap_jax.collapse import path_report
from ntksap_jax.masks import named_leaves
from ntksap_jax.scores import kaiming_normal_reinit

IS_NONE = lambda t: t is None  # noqa: E731


def _nnx_cnn():
    return NnxCNN(rngs=nnx.Rngs(0))


def _nnx_mlp():
    return NnxMLP(rngs=nnx.Rngs(0))


def _equinox():
    pytest.importorskip("equinox")
    apply_fn, params, _ = equinox_mlp(jax.random.key(0))
    return from_apply_fn(apply_fn, params, name="EquinoxMLP")


def _stax():
    return from_apply_fn(*stax_cnn(jax.random.key(0)), name="StaxCNN")


# name -> (builder, one example's shape)
MODELS = {
    "flax_examples_resnet": (lambda: FlaxExamplesResNet(), (16, 16, 3)),
    "linen_vit": (lambda: ViT(), (16, 16, 3)),
    "nnx_cnn": (_nnx_cnn, (8, 8, 1)),
    "nnx_mlp": (_nnx_mlp, (8, 8, 1)),
    "equinox_mlp": (_equinox, (8, 8, 1)),
    "stax_cnn": (_stax, (8, 8, 1)),
}

#: Layers NTK-SAP and SynFlow do empty, measured: the ViT's query and key kernels (NTK-SAP at T = 3:
#: the second block's, 3 of 3 seeds, kaiming and own-init re-draws; SynFlow at T = 3, 20 and 100:
#: one or both blocks'). q·k is bilinear, so pruning one lowers the other's scores and iterative
#: pruning drives both to zero. The library must say so (a warning naming them).
EXPECTED_COLLAPSE = {"linen_vit": "MultiHeadDotProductAttention_0"}

#: Rounds per method. SynFlow runs at its own default (100): its no-collapse property needs many
#: rounds, and at T = 3 it empties the ResNet's 1x1 projection shortcut (ResNetBlock_2.conv_proj,
#: measured; none at T = 20 or 100).
ITERATIONS = {"ntksap": 3, "synflow": None}


def _train_mode_loss(model, params, state, x, y):
    logits, _ = model.apply(params, state, x, train=True, rng=jax.random.key(3))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.mark.parametrize("method", ["ntksap", "synflow"])
@pytest.mark.parametrize("name", list(MODELS))
def test_prune_model_on_users_models(name, method):
    build, shape = MODELS[name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = prune_model(build(), input_shape=shape, density=0.1, key=jax.random.key(0), method=method,
                             iterations=ITERATIONS[method],
                             **({"samples": 2, "num_inputs": 32} if method == "ntksap" else {}))
    report = result.report
    masks = result.library_masks
    # exactly round(d·N) kept, counted by numpy
    total = sum(int(np.size(m)) for m in jax.tree.leaves(masks))
    kept = sum(int(np.count_nonzero(np.asarray(m))) for m in jax.tree.leaves(masks))
    assert total == report["total_prunable"] > 0
    assert kept == report["total_kept"] == round(0.1 * total)
    # every kept weight on an input-output path (an independent float64 propagation)
    paths = path_report(result.model, result.variables["params"], masks, result.variables.get("batch_stats"), shape)
    assert paths["effective_kept"] == kept and not paths["disconnected"]
    # no prunable layer collapses, or, where the method does empty layers, it is never silent
    empty = [n for n, m in named_leaves(masks) if m is not None and not np.any(np.asarray(m))]
    messages = [str(w.message) for w in caught if "degenerate mask" in str(w.message)]
    if name in EXPECTED_COLLAPSE:
        assert empty and all(EXPECTED_COLLAPSE[name] in n and (".query." in n or ".key." in n) for n in empty), empty
        assert messages and all(n in messages[0] for n in empty)
    else:
        assert empty == [] and report["collapsed_layers"] == [] and messages == []
    # the masks come back in the model's own structure, and the params are θ₀ ⊙ m there
    native_masks = jax.tree.leaves(result.masks)
    assert sum(int(np.count_nonzero(np.asarray(m))) for m in native_masks) == kept
    # pruned weights stay exactly 0 under optax with momentum and weight decay
    tx = masked(optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9)), masks)
    params = apply_masks(result.variables["params"], masks)
    state = result.variables.get("batch_stats")
    opt_state = tx.init(params)
    x = jax.random.normal(jax.random.key(1), (8, *shape))
    y = jnp.arange(8) % 10
    grad_fn = jax.jit(lambda p: jax.grad(_train_mode_loss, argnums=1)(result.model, p, state, x, y))  # one program
    for _ in range(3):
        grads = grad_fn(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    for (n, m), (_, p) in zip(named_leaves(masks), named_leaves(params)):
        if m is not None:
            assert np.all(np.asarray(p)[np.asarray(m) == 0] == 0.0), n
    moved = [n for (n, m), (_, p0), (_, p1) in zip(named_leaves(masks), named_leaves(result.variables["params"]),
                                                   named_leaves(params)) if m is not None
             and not np.allclose(np.asarray(p1)[np.asarray(m) != 0], np.asarray(p0)[np.asarray(m) != 0])]
    assert moved  # the steps did train the kept weights


def test_zero_init_residual_resnet_collapses_only_when_zero_scales_are_kept():
    """The Flax examples' ResNet zero-initialises the last BatchNorm scale of each block. Scored as
    is, every weight of each branch scores exactly 0: the library names the layers and the mask
    collapses; scored at scale 1 (the default), no layer empties. (The scorer settings are
    ``test_prune_model_on_users_models``'s, so the persistent cache holds its programs.)"""
    shape = (16, 16, 3)
    model = FlaxExamplesResNet()
    variables = model.init(jax.random.key(0), jnp.zeros((1, *shape)), train=False)
    zero_scales = [n for n, p in named_leaves(variables["params"]) if n.endswith("scale") and not np.any(p)]
    assert len(zero_scales) == 4  # one per block, as the Flax examples write it
    with pytest.warns(UserWarning, match=r"degenerate mask: all scores 0 \(unrankable\) in .*ResNetBlock_0\.Conv_0"):
        kept_as_is = prune_model(model, input_shape=shape, density=0.1, key=jax.random.key(1), variables=variables,
                                 iterations=3, samples=2, num_inputs=32, zero_norm_scales="keep", off_path="keep")
    assert kept_as_is.report["collapsed_layers"] and kept_as_is.report["off_path_kept"] > 0
    assert kept_as_is.report["unit_scored_norm_scales"] == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed = prune_model(model, input_shape=shape, density=0.1, key=jax.random.key(1), variables=variables,
                            iterations=3, samples=2, num_inputs=32)
    assert fixed.report["collapsed_layers"] == [] and fixed.report["zero_score_layers"] == []
    assert sorted(fixed.report["unit_scored_norm_scales"]) == sorted(zero_scales)
    # training starts from the original init: the zero scales are still zero in the returned params
    for n, p in named_leaves(fixed.params):
        if n in zero_scales:
            assert not np.any(p)


def test_prune_reports_degenerate_masks_warn_raise_ignore():
    """A layer whose kernel is all zero scores 0 under magnitude: prune names it, and on_collapse
    decides between a warning, an exception and silence (the facts stay in diagnostics)."""
    params = {"a": {"kernel": jnp.ones((4, 6))}, "b": {"kernel": jnp.zeros((6, 3))}}
    score = magnitude_scorer()
    with pytest.warns(UserWarning, match=r"all scores 0 \(unrankable\) in b\.kernel"):
        prune(score, params, density=0.5, key=jax.random.key(0))
    with pytest.raises(DegenerateMaskError, match=r"b\.kernel"):
        prune(score, params, density=0.5, key=jax.random.key(0), on_collapse="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = prune(score, params, density=0.5, key=jax.random.key(0), on_collapse="ignore")
    assert res.diagnostics["zero_score_layers"] == ["b.kernel"]
    with pytest.raises(ValueError, match=r"on_collapse must be one of \['warn', 'raise', 'ignore'\]; got 'loud'"):
        prune(score, params, density=0.5, key=jax.random.key(0), on_collapse="loud")


# ------------------------------------------------------------------ front ends agree


def _copy_linen_to_nnx_cnn(linen_vars, module):
    from ntksap_jax.model import from_nnx as _from_nnx

    spec = _from_nnx(module)
    spec.update_nnx(module, linen_vars["params"], linen_vars["batch_stats"])
    return module


def test_linen_and_nnx_twins_give_the_same_ntksap_scores_and_masks():
    """One CNN written in linen and in NNX with copied weights: NTK-SAP scores equal to float32
    rounding (1e-6 relative: both run the same ops in another order at most), identical masks in
    float64 (where rounding cannot reorder the ranking)."""
    shape = (8, 8, 1)
    linen = LinenCNN()
    lv = linen.init(jax.random.key(0), jnp.zeros((1, *shape)))
    cnn = _copy_linen_to_nnx_cnn(lv, _nnx_cnn())
    nnx_model = from_nnx(cnn)
    assert jax.tree.structure(nnx_model.variables["params"]) == jax.tree.structure(lv["params"])
    masks = init_masks(lv["params"])
    kwargs = dict(samples=2, num_inputs=16, reinit="kaiming")
    s_linen = ntksap_scorer(linen, shape, **kwargs)(lv["params"], masks, lv["batch_stats"], jax.random.key(1))
    s_nnx = ntksap_scorer(nnx_model, shape, **kwargs)(nnx_model.variables["params"], masks,
                                                      nnx_model.variables["batch_stats"], jax.random.key(1))
    for a, b in zip(jax.tree.leaves(s_linen), jax.tree.leaves(s_nnx)):
        scale = float(jnp.max(jnp.abs(a)))
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6 * scale)

    with jax.enable_x64(True):
        lv64 = to_f64(lv)
        cnn64 = _copy_linen_to_nnx_cnn(lv64, NnxCNN(rngs=nnx.Rngs(0), ))
        cnn64_model = from_nnx(cnn64)
        p64 = to_f64(cnn64_model.variables["params"])
        s64 = to_f64(cnn64_model.variables["batch_stats"])
        r_linen = prune(ntksap_scorer(linen, shape, **kwargs), lv64["params"], density=0.1, iterations=3,
                        key=jax.random.key(2), batch_stats=lv64["batch_stats"], on_collapse="ignore")
        r_nnx = prune(ntksap_scorer(cnn64_model, shape, **kwargs), p64, density=0.1, iterations=3,
                      key=jax.random.key(2), batch_stats=s64, on_collapse="ignore")
    for a, b in zip(jax.tree.leaves(r_linen.masks), jax.tree.leaves(r_nnx.masks)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_equinox_and_linen_twins_agree():
    """An Equinox MLP (weights ``(out, in)``) and its linen twin (``(in, out)``, transposed copies):
    the same outputs, the same SynFlow scores (transposed) and masks, the same NTK-SAP objective
    gradient on identical draws, and kaiming re-draws with the right fan-in in each layout."""
    pytest.importorskip("equinox")
    apply_fn, eqx_params, _ = equinox_mlp(jax.random.key(0))
    eqx_model = from_apply_fn(apply_fn, eqx_params)
    linen = LinenMLP()
    lparams = linen_params_from_equinox(eqx_params)
    shape = (8, 8, 1)
    x = jax.random.normal(jax.random.key(1), (5, *shape))
    np.testing.assert_allclose(eqx_model.apply(eqx_model.variables["params"], None, x)[0],
                               linen.apply({"params": lparams}, x), rtol=1e-5, atol=1e-6)

    fp = eqx_model.variables["params"]  # {"layers.0.weight": (32, 64), "layers.0.bias": ...}
    emasks = init_masks(fp, eqx_model.prunable)
    lmasks = init_masks(lparams)
    s_eqx = synflow_scorer(eqx_model, shape)(fp, emasks, None, jax.random.key(0))
    s_lin = synflow_scorer(linen, shape)(lparams, lmasks, None, jax.random.key(0))
    for i in range(3):
        np.testing.assert_allclose(s_eqx[f"layers.{i}.weight"].T, s_lin[f"layers_{i}"]["kernel"], rtol=2e-5)
    r_eqx = prune_model(eqx_model, input_shape=shape, density=0.1, key=jax.random.key(0), method="synflow",
                        iterations=3)
    r_lin = prune_model(linen, input_shape=shape, density=0.1, key=jax.random.key(0), method="synflow",
                        iterations=3, variables={"params": lparams})
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(r_eqx.masks.layers[i].weight).T,
                                      np.asarray(r_lin.masks[f"layers_{i}"]["kernel"]))

    # NTK-SAP: the objective's mask gradient on the same θ, x, z (transposed where the layout is), in
    # float64: the finite difference cancels most of float32's digits
    from ntksap_jax.scores import ntksap_objective

    with jax.enable_x64(True):
        lp64, fp64, x64 = to_f64(lparams), to_f64(fp), jnp.asarray(x, jnp.float64)
        lm64, em64 = to_f64(lmasks), to_f64(emasks)
        z_lin = jax.tree.map(lambda m: None if m is None else jax.random.normal(jax.random.key(5), m.shape, m.dtype),
                             lm64, is_leaf=IS_NONE)
        z_eqx = {k: (None if v is None else z_lin[f"layers_{k.split('.')[1]}"]["kernel"].T) for k, v in em64.items()}
        g_lin = jax.grad(lambda m: ntksap_objective(lambda p, xb: linen.apply({"params": p}, xb), lp64, m, z_lin,
                                                    x64))(lm64)
        g_eqx = jax.grad(lambda m: ntksap_objective(eqx_model.eval_fn(None), fp64, m, z_eqx, x64))(em64)
        for i in range(3):
            want = g_lin[f"layers_{i}"]["kernel"]
            np.testing.assert_allclose(g_eqx[f"layers.{i}.weight"].T, want, rtol=1e-9,
                                       atol=1e-12 * float(jnp.max(jnp.abs(want))))


# ------------------------------------------------------------------ re-draws and fan-in


def _std_within(sample: np.ndarray, sigma: float) -> bool:
    # the sample standard deviation of n normal draws has standard error sigma / sqrt(2n); 6 of them
    return abs(sample.std() - sigma) < 6 * sigma / math.sqrt(2 * sample.size)


def test_kaiming_redraws_use_each_leafs_fan_in():
    """N(0, 2/fan_in) with fan_in per kind of leaf, checked on the drawn values: attention q/k/v
    kernels (in, heads, head_dim): in; the output kernel (heads, head_dim, D): heads·head_dim; a
    conv HWIO kernel: kh·kw·c_in; a dense (in, out): in; Equinox (out, in): in; NNX LinearGeneral
    likewise."""
    vit = as_model(ViT(dim=64, heads=4, mlp_dim=128), (16, 16, 3))
    params = vit.init(jax.random.key(0))["params"]
    masks = init_masks(params)
    theta = kaiming_normal_reinit(jax.random.key(1), params, masks, layout=vit.layout)
    attn = theta["block_0"]["MultiHeadDotProductAttention_0"]
    for name in ("query", "key", "value"):
        assert attn[name]["kernel"].shape == (64, 4, 16)
        assert _std_within(np.asarray(attn[name]["kernel"]), math.sqrt(2 / 64)), name
    assert _std_within(np.asarray(attn["out"]["kernel"]), math.sqrt(2 / 64))  # heads·head_dim = 64
    assert _std_within(np.asarray(theta["patch_embed"]["kernel"]), math.sqrt(2 / (4 * 4 * 3)))
    assert _std_within(np.asarray(theta["block_0"]["Dense_1"]["kernel"]), math.sqrt(2 / 128))
    # the old rule (prod(shape[:-1])) would give q/k/v sqrt(2/256): far outside the tolerance
    assert not _std_within(np.asarray(attn["query"]["kernel"]), math.sqrt(2 / 256))

    mha = from_nnx(nnx.MultiHeadAttention(num_heads=4, in_features=64, qkv_features=64, decode=False,
                                          rngs=nnx.Rngs(0)))
    p = mha.variables["params"]
    drawn = kaiming_normal_reinit(jax.random.key(3), p, init_masks(p), layout=mha.layout)
    assert _std_within(np.asarray(drawn["query"]["kernel"]), math.sqrt(2 / 64))
    assert _std_within(np.asarray(drawn["out"]["kernel"]), math.sqrt(2 / 64))

    pytest.importorskip("equinox")
    apply_fn, eqx_params, _ = equinox_mlp(jax.random.key(0), sizes=(256, 128, 10))
    eqx_model = from_apply_fn(apply_fn, eqx_params)
    fp = eqx_model.variables["params"]
    drawn = kaiming_normal_reinit(jax.random.key(2), fp, init_masks(fp, eqx_model.prunable), layout=eqx_model.layout)
    assert drawn["layers.0.weight"].shape == (128, 256)
    assert _std_within(np.asarray(drawn["layers.0.weight"]), math.sqrt(2 / 256))
    assert _std_within(np.asarray(drawn["layers.1.weight"]), math.sqrt(2 / 128))


def test_own_initializer_redraws_rerun_init():
    """reinit="init" (the default for users' models) draws the prunable leaves with the model's
    own initializers: the ViT's Dense layers are LeCun normal, std sqrt(1/in), not kaiming's."""
    from ntksap_jax.scores import make_reinit

    vit = as_model(ViT(dim=64, heads=4, mlp_dim=128), (16, 16, 3))
    params = vit.init(jax.random.key(0))["params"]
    masks = init_masks(params)
    theta = jax.jit(make_reinit(vit, "auto"))(jax.random.key(5), params, masks)
    dense = np.asarray(theta["block_0"]["Dense_1"]["kernel"])
    assert _std_within(dense, math.sqrt(1 / 128))  # flax's lecun_normal is truncated: std matches
    assert not np.allclose(dense, params["block_0"]["Dense_1"]["kernel"])
    np.testing.assert_array_equal(theta["block_0"]["LayerNorm_0"]["scale"], params["block_0"]["LayerNorm_0"]["scale"])
    zoo = as_model(__import__("ntksap_jax").get_model("mlp", 10, features=(64,)), (8, 8, 1))
    assert make_reinit(zoo, "auto").func is kaiming_normal_reinit  # the zoo keeps the official kaiming


# ------------------------------------------------------------------ normalisation and call conventions


def test_nnx_batch_statistics_are_the_official_ones_by_hand():
    """The first BatchNorm of the NNX CNN: mean and unbiased variance (ddof=1 over N·H·W) of the
    first conv's output, as PyTorch's running statistics after a momentum-1.0 pass."""
    with jax.enable_x64(True):
        cnn = _nnx_cnn()
        model = from_nnx(cnn)
        params = to_f64(model.variables["params"])
        state = to_f64(model.variables["batch_stats"])
        x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1), jnp.float64)
        stats = model.statistics(params, state, x)
        h = jax.lax.conv_general_dilated(x, params["conv1"]["kernel"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = np.asarray(h).reshape(-1, h.shape[-1])
        np.testing.assert_allclose(stats["bn1"]["mean"], h.mean(0), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(stats["bn1"]["var"], h.var(0, ddof=1), rtol=1e-12)


def test_linen_call_conventions_and_dropout_need_no_rng():
    """``deterministic=``, ``training=``, no mode argument, or a callable: each gets the right
    mode; a train-mode pass without an rng runs dropout as the identity; with one it drops."""

    class Training(nn.Module):
        @nn.compact
        def __call__(self, x, training: bool = False):
            x = nn.Dense(16)(x)
            return nn.Dropout(0.5, deterministic=not training)(x)

    class Custom(nn.Module):
        @nn.compact
        def __call__(self, x, mode: str = "eval"):
            return nn.Dropout(0.5, deterministic=mode == "eval")(nn.Dense(16)(x))

    x = jnp.ones((2, 4))
    for module, mode_kwargs in ((Training(), None), (Custom(), lambda train: {"mode": "train" if train else "eval"}),
                                (ViT(), None)):
        shape = (16, 16, 3) if isinstance(module, ViT) else (4,)
        xi = jnp.ones((2, *shape))
        model = from_linen(module, shape, mode_kwargs=mode_kwargs)
        v = model.init(jax.random.key(0))
        y_eval, _ = model.apply(v["params"], None, xi)
        y_train, _ = model.apply(v["params"], None, xi, train=True)
        np.testing.assert_allclose(y_train, y_eval, rtol=1e-6)  # dropout off without an rng
        y_drop, _ = model.apply(v["params"], None, xi, train=True, rng=jax.random.key(1))
        assert not np.allclose(y_drop, y_eval)  # and on with one
    del x
    with pytest.raises(ValueError, match=r"a plain function needs its params"):
        as_model(lambda p, x: x)


def test_snip_and_grasp_score_a_model_with_dropout():
    """SNIP and GraSP run the network in train mode; on the ViT (Dropout) they need no PRNG."""
    shape = (16, 16, 3)
    x = jax.random.normal(jax.random.key(0), (8, *shape))
    y = jnp.arange(8) % 10
    for method in ("snip", "grasp"):
        r = prune_model(ViT(), input_shape=shape, density=0.5, key=jax.random.key(0), method=method, data=(x, y),
                        on_collapse="ignore")
        assert r.report["total_kept"] == round(0.5 * r.report["total_prunable"])


# ------------------------------------------------------------------ NNX masks, optimizer, analysis


def test_nnx_masks_mirror_the_param_state_and_train_with_nnx_optimizer():
    cnn = _nnx_cnn()
    result = prune_model(cnn, input_shape=(8, 8, 1), density=0.2, key=jax.random.key(0), iterations=2, samples=1,
                         num_inputs=16)
    pure = nnx.to_pure_dict(nnx.state(cnn, nnx.Param))
    assert jax.tree.structure(jax.tree.map(lambda m, p: 0, result.masks, pure, is_leaf=IS_NONE)) == \
        jax.tree.structure(jax.tree.map(lambda p: 0, pure))
    result.model.update_nnx(cnn, result.params)  # θ₀ ⊙ m, written back with nnx.update
    kernel = np.asarray(cnn.conv1.kernel[...])
    assert np.all(kernel[np.asarray(result.masks["conv1"]["kernel"]) == 0] == 0)

    optimizer = nnx.Optimizer(cnn, masked(optax.sgd(0.1, momentum=0.9), result.masks), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (8, 8, 8, 1))
    y = jnp.arange(8) % 10

    def loss(module):
        return optax.softmax_cross_entropy_with_integer_labels(module(x), y).mean()

    for _ in range(3):
        grads = nnx.grad(loss)(cnn)
        optimizer.update(cnn, grads)
    kernel = np.asarray(cnn.conv1.kernel[...])
    m = np.asarray(result.masks["conv1"]["kernel"])
    assert np.all(kernel[m == 0] == 0) and np.any(
        kernel[m != 0] != np.asarray(result.params["conv1"]["kernel"])[m != 0]
    )


def test_spectrum_of_nnx_model_equals_its_linen_twin_float64():
    with jax.enable_x64(True):
        shape = (8, 8, 1)
        linen = LinenCNN(c1=4, c2=4)
        lv = to_f64(linen.init(jax.random.key(0), jnp.zeros((1, *shape))))
        cnn = NnxCNN(c1=4, c2=4, rngs=nnx.Rngs(0))
        from_nnx(cnn).update_nnx(cnn, lv["params"], lv["batch_stats"])
        nm = from_nnx(cnn)
        nv = to_f64(nm.variables)
        x = jax.random.normal(jax.random.key(1), (4, *shape), jnp.float64)
        a = ntk_spectrum(linen, lv, None, x)
        b = ntk_spectrum(nm, nv, None, x)
    np.testing.assert_allclose(b.eigenvalues, a.eigenvalues, rtol=1e-10, atol=1e-12 * a.eigenvalues[0])


def test_neural_tangents_public_door():
    nt = import_neural_tangents()
    init_fn, apply_fn, kernel_fn = nt.stax.serial(nt.stax.Dense(8), nt.stax.Relu(), nt.stax.Dense(1))
    _, params = init_fn(jax.random.key(0), (-1, 3))
    assert apply_fn(params, jnp.ones((2, 3))).shape == (2, 1)


# ------------------------------------------------------------------ every method on every kind of model


@pytest.mark.parametrize("name", ["nnx_cnn", "equinox_mlp", "stax_cnn"])
def test_every_method_on_every_front_end(name):
    """Each registered method (NTK-SAP with both estimators; the data-driven ones given data) prunes
    an NNX, an Equinox and a stax model to exactly round(d·N) weights, in the model's structure."""
    from ntksap_jax import list_scorers
    from ntksap_jax.scores import get_method

    build, shape = MODELS[name]
    model = build()
    x = jax.random.normal(jax.random.key(0), (16, *shape))
    y = jnp.arange(16) % 10
    runs = [(m, {}) for m in list_scorers()] + [("ntksap", {"estimator": "jvp"})]
    for method, extra in runs:
        kwargs = dict(extra)
        if method == "ntksap":
            kwargs.update(samples=1, num_inputs=16)
        if get_method(method).needs_data:  # SNIP, iterative SNIP, GraSP, PX
            kwargs["data"] = (x, y)
        result = prune_model(model, input_shape=shape, density=0.2, key=jax.random.key(1), method=method,
                             iterations=2, on_collapse="ignore", **kwargs)
        masks = result.library_masks
        total = sum(int(np.size(m)) for m in jax.tree.leaves(masks))
        kept = sum(int(np.count_nonzero(np.asarray(m))) for m in jax.tree.leaves(masks))
        assert kept == round(0.2 * total) == result.report["total_kept"], (method, extra)
        assert jax.tree.structure(jax.tree.map(lambda m: 0, result.masks, is_leaf=IS_NONE)) == \
            jax.tree.structure(jax.tree.map(lambda m: 0, result.model.to_native(masks), is_leaf=IS_NONE))


def test_validate_ntk_takes_an_nnx_model_float64():
    """Our kernel against neural-tangents' for an NNX CNN with BatchNorm (float64 tolerances)."""
    from ntksap_jax.validate import validate_ntk

    with jax.enable_x64(True):
        model = from_nnx(NnxCNN(c1=4, c2=4, rngs=nnx.Rngs(0)))
        variables = to_f64(model.variables)
        masks = init_masks(variables["params"])
        x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1), jnp.float64)
        result = validate_ntk(model, variables, masks, x, compare_own=False)
    assert result.passed and sum(r.passed is True for r in result.rows) >= 2


def test_calibrated_statistics_need_no_bn_momentum_field_float64():
    """A linen model whose BatchNorms hard-code momentum 0.9 (no ``bn_momentum`` field; it used to
    be required, and a dummy field gave 0.1x the statistics): the first BatchNorm's statistics are
    the stem convolution's mean and unbiased variance, by hand."""
    from ntksap_jax.model import calibrated_batch_stats

    with jax.enable_x64(True):
        model = FlaxExamplesResNet()
        v = to_f64(model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False))
        x = jax.random.normal(jax.random.key(1), (3, 8, 8, 3), jnp.float64)
        stats = calibrated_batch_stats(model, v["params"], None, v["batch_stats"], x)
        h = jax.lax.conv_general_dilated(x, v["params"]["conv_init"]["kernel"], (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = np.asarray(h).reshape(-1, h.shape[-1])
    # the model computes in float32 (dtype=jnp.float32, as the Flax examples write it): float32 rounding;
    # the biased variance would be off by 1/191 = 5e-3 (3·8·8 = 192 values per channel)
    np.testing.assert_allclose(stats["bn_init"]["mean"], h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["bn_init"]["var"], h.var(0, ddof=1), rtol=1e-5)
