"""Tests for the Flax model zoo (ntksap_jax.models).

Expected numbers are computed independently of the implementation: prunable
weight counts are hand-derived from the PyTorch architectures (and, for the
ImageNet ResNets, from torchvision's published parameter totals), and
numerical checks use ``jax.lax`` primitives directly.  The big models are
only traced (``jax.eval_shape``), never initialised, to keep the file fast.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ntksap_jax.models import (
    MLP,
    VGG,
    LotteryResNet,
    ResNet,
    get_model,
    list_models,
)

KEY = jax.random.key(0)
ALL_NAMES = (
    "mlp",
    "lenet300",
    "resnet20",
    "resnet32",
    "resnet56",
    "vgg11",
    "vgg16",
    "vgg19",
    "resnet18",
    "resnet34",
    "resnet50",
    "lenet5",
)
BN_FREE = ("mlp", "lenet300", "lenet5")


def input_shape(name: str, batch: int = 2) -> tuple[int, ...]:
    if name in ("mlp", "lenet300", "lenet5"):
        return (batch, 28, 28, 1)
    if name in ("resnet18", "resnet34", "resnet50"):
        return (batch, 224, 224, 3)
    return (batch, 32, 32, 3)


def flat(tree) -> dict[str, object]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def prunable_count(params) -> int:
    """Sum of sizes of leaves named 'kernel' with ndim > 1 (the library's default filter)."""
    total = 0
    for path, leaf in traverse_util.flatten_dict(params).items():
        if path[-1] == "kernel" and len(leaf.shape) > 1:
            total += int(np.prod(leaf.shape))
    return total


def abstract_variables(name: str, num_classes: int, shape=None, **kwargs):
    model = get_model(name, num_classes, **kwargs)
    shape = shape or input_shape(name)
    return model, jax.eval_shape(model.init, KEY, jnp.zeros(shape, jnp.float32))


def random_variables(abstract, seed: int = 0):
    """Concrete variables with the given shapes, filled by numpy (cheap; no XLA RNG compile)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "var":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        scale = math.sqrt(2.0 / np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0.1
        return jnp.asarray(rng.normal(0.0, scale, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope="module")
def resnet20():
    """(model, variables, x, init) -- the one real ResNet-20 init of the file.

    Eager (op-by-op) init: on CPU, XLA compiles each distinct RNG shape once and
    re-inits are then fast, whereas ``jax.jit(model.init)`` compiles 22 separate
    threefry instances (~17 s on 2 cores).
    """
    model = get_model("resnet20", 10)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    init = model.init
    variables = init(KEY, x)
    return model, variables, x, init


@pytest.fixture(scope="module")
def lenet300():
    model = get_model("lenet300", 10)
    x = jax.random.normal(jax.random.key(2), (5, 28, 28, 1))
    return model, model.init(KEY, x), x


# --------------------------------------------------------------------------- registry


def test_list_models_exact():
    assert list_models() == ALL_NAMES
    assert isinstance(list_models(), tuple)


def test_get_model_types_and_fields():
    assert isinstance(get_model("mlp", 10), MLP)
    assert get_model("lenet300", 10).features == (300, 100)
    assert get_model("resnet56", 10).depth == 56
    assert isinstance(get_model("resnet32", 10), LotteryResNet)
    assert isinstance(get_model("vgg19", 10), VGG) and get_model("vgg19", 10).depth == 19
    r50 = get_model("resnet50", 7, stem="cifar", bn_momentum=0.5)
    assert isinstance(r50, ResNet)
    assert (r50.depth, r50.stem, r50.num_classes, r50.bn_momentum) == (50, "cifar", 7, 0.5)
    for name in ALL_NAMES:
        model = get_model(name, 3)
        assert model.num_classes == 3
        if name not in BN_FREE:
            assert model.bn_momentum == 0.9 and model.bn_epsilon == 1e-5
    # the BN-free MLP accepts the BN fields harmlessly, so clone(bn_momentum=0.0) works everywhere
    assert get_model("mlp", 10).clone(bn_momentum=0.0).bn_momentum == 0.0


def test_get_model_unknown_name():
    with pytest.raises(ValueError) as err:
        get_model("resnet21", 10)
    msg = str(err.value)
    assert "resnet21" in msg
    for name in ALL_NAMES:
        assert name in msg


@pytest.mark.parametrize("bad", [0, -3])
def test_get_model_bad_num_classes(bad):
    with pytest.raises(ValueError, match=str(bad)):
        get_model("resnet20", bad)
    with pytest.raises(ValueError, match=str(bad)):
        LotteryResNet(num_classes=bad)


def test_bad_num_classes_message_is_the_shared_check():
    # models/common.check_num_classes uses ntksap_jax._checks.positive_int: the scorers' message.
    for bad in (0, -3, True, 2.5):
        with pytest.raises(ValueError) as err:
            get_model("mlp", bad)
        assert str(err.value) == f"num_classes must be a positive integer; got {bad!r}"
    assert get_model("mlp", np.int64(3)).num_classes == 3


def test_bad_stem_names_value_and_allowed():
    with pytest.raises(ValueError) as err:
        get_model("resnet18", 10, stem="tinyimagenet")
    msg = str(err.value)
    assert "tinyimagenet" in msg and "imagenet" in msg and "cifar" in msg


def test_unknown_and_fixed_kwargs():
    with pytest.raises(TypeError, match="widht"):
        get_model("resnet20", 10, widht=32)
    with pytest.raises(TypeError, match="depth"):
        get_model("resnet20", 10, depth=32)
    with pytest.raises(TypeError, match="stem"):
        get_model("vgg16", 10, stem="cifar")
    with pytest.raises(ValueError, match="17"):
        LotteryResNet(num_classes=10, depth=17)
    with pytest.raises(ValueError, match="12"):
        VGG(num_classes=10, depth=12)


# --------------------------------------------------------------------------- counts


# Hand-derived prunable (kernel, ndim > 1) counts.  CIFAR ResNets: stem 3*16*9 = 432;
# stage convs 16*16*9 = 2304, 16*32*9 = 4608, 32*32*9 = 9216, 32*64*9 = 18432,
# 64*64*9 = 36864; 1x1 shortcuts 16*32 = 512, 32*64 = 2048; fc 64*10 = 640.
EXPECTED_COUNTS = [
    ("resnet20", 10, None, 270_896),
    ("resnet32", 10, None, 432 + 10 * 2304 + 4608 + 9 * 9216 + 512 + 18432 + 9 * 36864 + 2048 + 640),
    ("resnet56", 10, None, 432 + 18 * 2304 + 4608 + 17 * 9216 + 512 + 18432 + 17 * 36864 + 2048 + 640),
    ("vgg16", 100, None, 14_761_664),
    # VGG-11: 3*64*9 + 64*128*9 + 128*256*9 + 256*256*9 + 256*512*9 + 3 * 512*512*9 + 512*10
    ("vgg11", 10, None, 1728 + 73728 + 294912 + 589824 + 1179648 + 3 * 2359296 + 5120),
    ("resnet18", 1000, None, 11_678_912),
    # torchvision ResNet-34 has 21,797,672 parameters, of which 2 * 8512 BN and 1000 fc bias.
    ("resnet34", 1000, None, 21_797_672 - 2 * 8512 - 1000),
    ("resnet50", 1000, None, 25_502_912),
    ("lenet300", 10, None, 784 * 300 + 300 * 100 + 100 * 10),
    ("mlp", 10, None, 784 * 512 + 512 * 512 + 512 * 10),
    # LeNet-5: conv 5*5*1*6, conv 5*5*6*16, then 16*5*5 -> 120 -> 84 -> 10
    ("lenet5", 10, None, 150 + 2400 + 400 * 120 + 120 * 84 + 84 * 10),
]


@pytest.mark.parametrize("name,num_classes,shape,expected", EXPECTED_COUNTS)
def test_prunable_counts(name, num_classes, shape, expected):
    _, variables = abstract_variables(name, num_classes, shape)
    assert prunable_count(variables["params"]) == expected


def test_resnet20_narrow_preset_count():
    # resnet20-narrow-mnist5k: the lottery ResNet-20 at width 8 (8-16-32) on 1-channel 28x28 images
    from ntksap_jax.presets import get_preset

    preset = get_preset("resnet20-narrow-mnist5k")
    model = preset.build_model()
    assert (model.depth, model.width, preset.input_shape) == (20, 8, (28, 28, 1))
    variables = jax.eval_shape(model.init, KEY, jnp.zeros((2, 28, 28, 1)))
    expected = (1 * 8 * 9 + 6 * 8 * 8 * 9 + 8 * 16 * 9 + 5 * 16 * 16 * 9 + 8 * 16
                + 16 * 32 * 9 + 5 * 32 * 32 * 9 + 16 * 32 + 32 * 10)
    assert prunable_count(variables["params"]) == expected


def test_lenet5_forward_against_lax():
    """LeNet-5's logits recomputed with lax primitives (conv padding 2 then VALID, 2x2 max-pools)."""
    model = get_model("lenet5", 10)
    x = jax.random.normal(jax.random.key(3), (3, 28, 28, 1))
    variables = model.init(KEY, x)
    p = variables["params"]

    def conv_relu_pool(h, layer, pad):
        h = jax.lax.conv_general_dilated(h, p[layer]["kernel"], (1, 1), [(pad, pad)] * 2,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=jax.lax.Precision.HIGHEST)
        h = jnp.maximum(h + p[layer]["bias"], 0.0)
        return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    h = conv_relu_pool(conv_relu_pool(x, "conv1", 2), "conv2", 0)
    assert h.shape == (3, 5, 5, 16)
    h = h.reshape(3, -1)
    for layer in ("dense_0", "dense_1"):
        h = jnp.maximum(h @ p[layer]["kernel"] + p[layer]["bias"], 0.0)
    expected = h @ p["fc"]["kernel"] + p["fc"]["bias"]
    np.testing.assert_allclose(model.apply(variables, x), expected, rtol=1e-4, atol=1e-4)
    assert [p[n]["kernel"].shape for n in ("conv1", "conv2", "dense_0", "dense_1", "fc")] == [
        (5, 5, 1, 6), (5, 5, 6, 16), (400, 120), (120, 84), (84, 10)]


def test_lenet300_count_literal():
    _, variables = abstract_variables("lenet300", 10)
    assert prunable_count(variables["params"]) == 266_200


def test_resnet18_cifar_stem_count():
    # imagenet-stem count, conv1 7*7*3*64 = 9408 -> 3*3*3*64 = 1728, fc 512*1000 -> 512*200
    _, variables = abstract_variables("resnet18", 200, (2, 64, 64, 3), stem="cifar")
    assert prunable_count(variables["params"]) == 11_678_912 - 9408 + 1728 - 512 * 1000 + 512 * 200
    assert variables["params"]["conv1"]["kernel"].shape == (3, 3, 3, 64)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_only_conv_dense_kernels_are_multidim(name):
    _, variables = abstract_variables(name, 10)
    for path, leaf in flat(variables["params"]).items():
        is_kernel = path.split("/")[-1] == "kernel"
        assert is_kernel == (len(leaf.shape) > 1), path
    for path, leaf in flat(variables.get("batch_stats", {})).items():
        assert len(leaf.shape) == 1, path
    assert ("batch_stats" in variables) == (name not in BN_FREE)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", ALL_NAMES)
def test_output_shapes_eval_shape(name):
    model, variables = abstract_variables(name, 13)
    x = jnp.zeros(input_shape(name, batch=3), jnp.float32)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    assert out.shape == (3, 13) and out.dtype == jnp.float32
    if name not in BN_FREE:
        out, state = jax.eval_shape(
            lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x
        )
        assert out.shape == (3, 13)
        assert jax.tree.map(lambda a: a.shape, state["batch_stats"]) == jax.tree.map(
            lambda a: a.shape, variables["batch_stats"]
        )


def test_resnet18_cifar_stem_tiny_imagenet_shape():
    model, variables = abstract_variables("resnet18", 200, (2, 64, 64, 3), stem="cifar")
    out, inter = jax.eval_shape(
        lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]),
        variables,
        jnp.zeros((2, 64, 64, 3)),
    )
    assert out.shape == (2, 200)
    inter = inter["intermediates"]
    assert inter["conv1"]["__call__"][0].shape == (2, 64, 64, 64)  # no downsampling in the stem
    assert inter["layer1_0"]["__call__"][0].shape == (2, 64, 64, 64)
    assert inter["layer4_1"]["__call__"][0].shape == (2, 8, 8, 512)


def test_real_forward_resnet20(resnet20):
    model, variables, x, _ = resnet20
    out = model.apply(variables, x)
    assert out.shape == (4, 10) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
    # the batch elements are different images -> different logits
    assert float(jnp.abs(out[0] - out[1]).max()) > 1e-4


def test_real_forward_mlp_flattens_any_trailing_shape(lenet300):
    model, variables, x = lenet300
    out = model.apply(variables, x)
    assert out.shape == (5, 10)
    out_flat = model.apply(variables, x.reshape(5, 784))
    np.testing.assert_allclose(np.asarray(out), np.asarray(out_flat), rtol=1e-6, atol=1e-6)
    # independent computation of the MLP
    p = variables["params"]
    assert set(p) == {"dense_0", "dense_1", "fc"}
    h = jax.nn.relu(x.reshape(5, -1) @ p["dense_0"]["kernel"] + p["dense_0"]["bias"])
    h = jax.nn.relu(h @ p["dense_1"]["kernel"] + p["dense_1"]["bias"])
    ref = h @ p["fc"]["kernel"] + p["fc"]["bias"]
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- names


def test_resnet20_param_names(resnet20):
    _, variables, _, _ = resnet20
    params = flat(variables["params"])
    assert params["blocks_3/shortcut_conv/kernel"].shape == (1, 1, 16, 32)
    assert params["blocks_6/shortcut_conv/kernel"].shape == (1, 1, 32, 64)
    assert "blocks_3/shortcut_bn/scale" in params
    assert not any(k.startswith("blocks_0/shortcut") for k in params)
    assert params["conv/kernel"].shape == (3, 3, 3, 16)
    assert "conv/bias" not in params and "blocks_0/conv1/bias" not in params
    assert params["fc/kernel"].shape == (64, 10) and params["fc/bias"].shape == (10,)
    blocks = {k.split("/")[0] for k in params if k.startswith("blocks_")}
    assert blocks == {f"blocks_{i}" for i in range(9)}
    shortcut_blocks = {k.split("/")[0] for k in params if "shortcut_conv" in k}
    assert shortcut_blocks == {"blocks_3", "blocks_6"}


def test_vgg_param_names():
    _, v16 = abstract_variables("vgg16", 100)
    p = v16["params"]
    assert "conv_12" in p and "conv_13" not in p and "bn_12" in p
    assert p["conv_0"]["bias"].shape == (64,)  # lottery VGG convs have biases
    assert p["fc"]["kernel"].shape == (512, 100)
    assert set(v16["batch_stats"]["bn_3"]) == {"mean", "var"}
    _, v11 = abstract_variables("vgg11", 10)
    assert "conv_7" in v11["params"] and "conv_8" not in v11["params"]
    _, v19 = abstract_variables("vgg19", 10)
    assert "conv_15" in v19["params"] and "conv_16" not in v19["params"]


def test_resnet_param_names_and_v15_stride():
    _, v18 = abstract_variables("resnet18", 1000)
    p = flat(v18["params"])
    assert p["conv1/kernel"].shape == (7, 7, 3, 64)
    assert not any(k.startswith("layer1_0/downsample") for k in p)
    assert p["layer2_0/downsample_conv/kernel"].shape == (1, 1, 64, 128)
    assert "layer2_0/downsample_bn/scale" in p and "layer2_1/downsample_conv/kernel" not in p
    assert p["fc/kernel"].shape == (512, 1000)

    model, v50 = abstract_variables("resnet50", 1000)
    p = flat(v50["params"])
    assert p["layer1_0/downsample_conv/kernel"].shape == (1, 1, 64, 256)  # channel change only
    assert "layer1_1/downsample_conv/kernel" not in p
    assert p["layer4_2/conv3/kernel"].shape == (1, 1, 512, 2048)
    # v1.5: the stride of layer2_0 is on its 3x3 conv2, not on conv1
    _, inter = jax.eval_shape(
        lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]),
        v50,
        jnp.zeros((1, 224, 224, 3)),
    )
    blk = inter["intermediates"]["layer2_0"]
    assert blk["conv1"]["__call__"][0].shape == (1, 56, 56, 128)
    assert blk["conv2"]["__call__"][0].shape == (1, 28, 28, 128)
    assert blk["downsample_conv"]["__call__"][0].shape == (1, 28, 28, 512)


# --------------------------------------------------------------------------- init


def test_init_statistics_resnet20(resnet20):
    _, variables, _, _ = resnet20
    params = variables["params"]
    w = np.asarray(params["blocks_8"]["conv2"]["kernel"], np.float64)
    assert w.shape == (3, 3, 64, 64)
    target = math.sqrt(2.0 / (3 * 3 * 64))
    assert abs(w.std() / target - 1.0) < 0.03
    assert abs(w.mean()) < 0.05 * target
    # plain normal, not truncated: ~4.55% of samples lie beyond 2 sigma and ~1.24% beyond
    # 2.5 sigma (jax's variance-corrected truncated normal never exceeds 2.27 sigma)
    assert 0.038 < np.mean(np.abs(w) > 2 * target) < 0.053
    assert 0.008 < np.mean(np.abs(w) > 2.5 * target) < 0.017
    # stem conv: fan_in 27 (432 samples -> loose tolerance)
    stem = np.asarray(params["conv"]["kernel"], np.float64)
    assert abs(stem.std() / math.sqrt(2.0 / 27) - 1.0) < 0.15
    fc = np.asarray(params["fc"]["kernel"], np.float64)
    assert abs(fc.std() / math.sqrt(2.0 / 64) - 1.0) < 0.15
    np.testing.assert_array_equal(np.asarray(params["fc"]["bias"]), 0.0)
    for path, leaf in flat(params).items():
        if path.endswith("scale"):
            np.testing.assert_array_equal(np.asarray(leaf), 1.0, err_msg=path)
        if path.endswith("bias"):
            np.testing.assert_array_equal(np.asarray(leaf), 0.0, err_msg=path)
    for path, leaf in flat(variables["batch_stats"]).items():
        expected = 0.0 if path.endswith("mean") else 1.0
        np.testing.assert_array_equal(np.asarray(leaf), expected, err_msg=path)


def test_init_statistics_mlp(lenet300):
    _, variables, _ = lenet300
    params = variables["params"]
    w = np.asarray(params["dense_0"]["kernel"], np.float64)
    assert w.shape == (784, 300)
    target = math.sqrt(2.0 / 784)
    assert abs(w.std() / target - 1.0) < 0.03
    assert abs(w.mean()) < 0.05 * target
    # plain, not truncated, normal (see test_init_statistics_resnet20)
    assert 0.040 < np.mean(np.abs(w) > 2 * target) < 0.051
    assert 0.010 < np.mean(np.abs(w) > 2.5 * target) < 0.015
    for layer in ("dense_0", "dense_1", "fc"):
        np.testing.assert_array_equal(np.asarray(params[layer]["bias"]), 0.0)


def test_init_vgg_biases_and_bn():
    """VGG conv biases are 0 (not PyTorch's uniform default), BN scale 1 / bias 0.

    Only the checked leaves are returned from the jitted init, so XLA drops the
    RNG for the 9M unused kernel entries and this stays cheap.
    """
    model = get_model("vgg11", 10)

    def picked(key, x):
        p = model.init(key, x)["params"]
        return (
            [p[f"conv_{i}"]["bias"] for i in range(8)],
            [p[f"bn_{i}"]["scale"] for i in range(8)],
            [p[f"bn_{i}"]["bias"] for i in range(8)],
            p["fc"]["bias"],
            p["conv_0"]["kernel"],
        )

    conv_b, bn_s, bn_b, fc_b, k0 = jax.jit(picked)(KEY, jnp.zeros((1, 32, 32, 3)))
    for leaf in conv_b + bn_b + [fc_b]:
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    for leaf in bn_s:
        np.testing.assert_array_equal(np.asarray(leaf), 1.0)
    assert k0.shape == (3, 3, 3, 64)  # fan_in 27, 1728 samples
    assert abs(float(np.std(np.asarray(k0, np.float64))) / math.sqrt(2.0 / 27) - 1.0) < 0.1


def test_deterministic_given_key(resnet20):
    model, variables, x, init = resnet20
    again = init(KEY, x)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = init(jax.random.key(123), x)
    assert not np.array_equal(
        np.asarray(other["params"]["conv"]["kernel"]), np.asarray(variables["params"]["conv"]["kernel"])
    )


# --------------------------------------------------------------------------- BN momentum


def test_bn_momentum_zero_sets_stem_running_mean(resnet20):
    model, variables, x, _ = resnet20
    model0 = model.clone(bn_momentum=0.0)
    _, state = model0.apply(variables, x, train=True, mutable=["batch_stats"])
    kernel = variables["params"]["conv"]["kernel"]
    y = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    mean = np.asarray(y, np.float64).mean(axis=(0, 1, 2))
    var = np.asarray(y, np.float64).var(axis=(0, 1, 2))  # biased, as Flax stores it
    np.testing.assert_allclose(np.asarray(state["batch_stats"]["bn"]["mean"]), mean, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state["batch_stats"]["bn"]["var"]), var, rtol=1e-4, atol=1e-5)


def test_bn_momentum_controls_every_bn_layer(resnet20):
    model, variables, x, _ = resnet20
    def apply(m):
        return m.apply(variables, x, train=True, mutable=["batch_stats"])[1]["batch_stats"]

    s0 = flat(apply(model.clone(bn_momentum=0.0)))
    s9 = flat(apply(model))  # default 0.9: ra = 0.9 * init + 0.1 * batch
    assert len(s0) == 2 * (1 + 9 * 2 + 2)  # mean+var of stem, 18 block BNs, 2 shortcut BNs
    for path in s0:
        init = 0.0 if path.endswith("mean") else 1.0
        np.testing.assert_allclose(
            np.asarray(s9[path]), 0.9 * init + 0.1 * np.asarray(s0[path]), rtol=1e-5, atol=1e-6,
            err_msg=path,
        )
        # momentum 0 really replaced the init value (every layer sees non-constant activations)
        assert float(np.abs(np.asarray(s0[path]) - init).max()) > 1e-3, path


@pytest.mark.parametrize("name", [n for n in ALL_NAMES if n not in BN_FREE])
def test_bn_fields_reach_every_batchnorm(name):
    """clone(bn_momentum=..., bn_epsilon=...) configures every nn.BatchNorm of every model."""
    import flax.linen as nn

    model, variables = abstract_variables(name, 10)
    seen = {}

    def spy(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
            m = context.module
            seen["/".join(m.scope.path)] = (m.momentum, m.epsilon, m.use_running_average)
        return next_fun(*args, **kwargs)

    x = jnp.zeros(input_shape(name, batch=2))
    clone = model.clone(bn_momentum=0.0, bn_epsilon=1e-3)
    with nn.intercept_methods(spy):
        jax.eval_shape(lambda v, x: clone.apply(v, x, train=True, mutable=["batch_stats"]), variables, x)
    bn_paths = {"/".join(k[:-1]) for k in traverse_util.flatten_dict(variables["batch_stats"])}
    assert set(seen) == bn_paths
    assert set(seen.values()) == {(0.0, 1e-3, False)}
    seen.clear()
    with nn.intercept_methods(spy):
        jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    assert set(seen) == bn_paths
    assert set(seen.values()) == {(0.9, 1e-5, True)}


def test_eval_with_batch_stats_equals_train_mode(resnet20):
    """Running stats := batch stats (momentum 0) makes eval mode reproduce train mode."""
    model, variables, x, _ = resnet20
    train_out, state = model.clone(bn_momentum=0.0).apply(
        variables, x, train=True, mutable=["batch_stats"]
    )
    eval_out = model.apply({**variables, **state}, x, train=False)
    np.testing.assert_allclose(np.asarray(eval_out), np.asarray(train_out), rtol=1e-4, atol=1e-4)
    stale = model.apply(variables, x, train=False)
    assert float(jnp.abs(stale - train_out).max()) > 1e-3


# --------------------------------------------------------------------------- padding


def test_resnet20_stride2_conv_matches_pytorch_padding(resnet20):
    model, variables, x, _ = resnet20
    _, inter = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    inter = inter["intermediates"]
    block_in = inter["blocks_2"]["__call__"][0]  # (4, 32, 32, 16)
    p = variables["params"]["blocks_3"]
    ref = jax.lax.conv_general_dilated(
        block_in, p["conv1"]["kernel"], (2, 2), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    got = inter["blocks_3"]["conv1"]["__call__"][0]
    assert got.shape == (4, 16, 16, 32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # Flax "SAME" would pad (0, 1) here and give a different result: the check can fail.
    same = jax.lax.conv_general_dilated(
        block_in, p["conv1"]["kernel"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    assert float(jnp.abs(same - got).max()) > 1e-3
    # 1x1 stride-2 projection samples the even pixels (PyTorch padding 0)
    sc = inter["blocks_3"]["shortcut_conv"]["__call__"][0]
    ref_sc = jnp.einsum("nhwc,cd->nhwd", block_in[:, ::2, ::2, :], p["shortcut_conv"]["kernel"][0, 0])
    np.testing.assert_allclose(np.asarray(sc), np.asarray(ref_sc), rtol=1e-5, atol=1e-5)


def test_resnet18_imagenet_stem_shapes_and_padding():
    model, variables = abstract_variables("resnet18", 10, (1, 224, 224, 3))
    _, inter = jax.eval_shape(
        lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]),
        variables,
        jnp.zeros((1, 224, 224, 3)),
    )
    inter = inter["intermediates"]
    assert inter["conv1"]["__call__"][0].shape == (1, 112, 112, 64)
    assert inter["layer1_0"]["__call__"][0].shape == (1, 56, 56, 64)  # after the 3x3/s2/p1 max pool
    assert inter["layer4_1"]["__call__"][0].shape == (1, 7, 7, 512)

    # numerical check of the 7x7/s2/p3 stem conv on a small input (real apply)
    x = jax.random.normal(jax.random.key(3), (1, 32, 32, 3))
    real = random_variables(jax.eval_shape(model.init, KEY, x))
    _, inter = jax.jit(
        lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"])
    )(real, x)
    got = inter["intermediates"]["conv1"]["__call__"][0]
    ref = jax.lax.conv_general_dilated(
        x, real["params"]["conv1"]["kernel"], (2, 2), ((3, 3), (3, 3)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    assert got.shape == (1, 16, 16, 64)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # after the max pool (3x3, s2, p1): 16 -> 8
    assert inter["intermediates"]["layer1_0"]["__call__"][0].shape == (1, 8, 8, 64)


# --------------------------------------------------------------------------- dtype


def test_float64_follows_params(resnet20):
    model, variables, x, _ = resnet20
    out32 = model.apply(variables, x)
    with jax.enable_x64(True):
        v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        x64 = jnp.asarray(x, jnp.float64)
        out64 = model.apply(v64, x64)
        assert out64.dtype == jnp.float64
        _, state = model.apply(v64, x64, train=True, mutable=["batch_stats"])
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(state))
        np.testing.assert_allclose(np.asarray(out64), np.asarray(out32), rtol=1e-3, atol=1e-3)
