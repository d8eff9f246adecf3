"""neural-tangents compatibility layer, `validate_ntk` and `ntksap-jax validate`.

The kernels are compared in float64 against neural-tangents 0.6.5 (an independent
implementation) for every implementation the compatibility layer supports.
"""

import importlib.util
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import to_f64
from ntksap_jax import get_model, init_masks, save_masks
from ntksap_jax._compat import (
    INSTALL_HINT,
    SUPPORTED_IMPLEMENTATIONS,
    UNSUPPORTED_IMPLEMENTATIONS,
    NeuralTangentsUnavailable,
    import_neural_tangents,
    restore_jax_names,
)
from ntksap_jax._compat import neural_tangents as compat
from ntksap_jax.cli import main

requires_nt = pytest.mark.skipif(
    importlib.util.find_spec("neural_tangents") is None, reason="neural-tangents not installed (the [validate] extra)"
)


class BNCNN(nn.Module):
    """conv -> BN -> relu -> conv -> BN -> relu -> pool -> dense: a small CNN with BatchNorm."""

    num_classes: int = 3
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, c in enumerate((4, 6)):
            x = nn.Conv(c, (3, 3), use_bias=False, name=f"conv_{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, name=f"bn_{i}")(x)
            x = nn.relu(x)
        return nn.Dense(self.num_classes, name="fc")(x.mean(axis=(1, 2)))


def random_masks(seed, params, density):
    """Bernoulli(density) masks drawn with NumPy (no per-shape RNG compilations)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda m: jnp.asarray(rng.random(m.shape) < density, m.dtype), init_masks(params))


# ---------------------------------------------------------------------------------------------- compat layer

RESTORABLE = [("jax.core", n) for n in compat._CORE_NAMES] + [("jax.interpreters.ad", "zeros_like_p")]


def test_restore_is_a_noop_when_jax_has_the_names(monkeypatch):
    """Simulate a JAX that still has every name: nothing is added or replaced."""
    import jax.core
    from jax.interpreters import ad  # noqa: F401  (side effect: puts jax.interpreters.ad in sys.modules)

    sentinels = {}
    for mod_name, name in RESTORABLE:
        mod = sys.modules[mod_name]
        sentinels[(mod_name, name)] = object()
        monkeypatch.setattr(mod, name, sentinels[(mod_name, name)], raising=False)
    util = types.ModuleType("jax.util")
    util.safe_map, util.safe_zip = object(), object()
    monkeypatch.setitem(sys.modules, "jax.util", util)
    monkeypatch.setattr(jax, "util", util, raising=False)
    before = (util.safe_map, util.safe_zip)

    assert restore_jax_names() == ()
    for (mod_name, name), s in sentinels.items():
        assert getattr(sys.modules[mod_name], name) is s
    assert (sys.modules["jax.util"].safe_map, sys.modules["jax.util"].safe_zip) == before


def test_restore_adds_exactly_the_missing_names(monkeypatch):
    import jax.core
    import jax.extend.core as jex_core
    from jax.interpreters import ad

    for mod_name, name in RESTORABLE:
        monkeypatch.delattr(sys.modules[mod_name], name, raising=False)
    monkeypatch.delitem(sys.modules, "jax.util", raising=False)
    monkeypatch.delattr(jax, "util", raising=False)

    restored = set(restore_jax_names())
    assert restored == {f"jax.core.{n}" for n in compat._CORE_NAMES} | {
        "jax.util", "jax.util.safe_map", "jax.util.safe_zip", "jax.interpreters.ad.zeros_like_p"}
    for n in compat._CORE_NAMES:
        assert getattr(jax.core, n) is getattr(jex_core, n)
    from jax.util import safe_map, safe_zip  # noqa: F401  the import neural-tangents does

    assert safe_zip([1, 2], "ab") == [(1, "a"), (2, "b")]
    assert safe_map(lambda a, b: a + b, [1, 2], [3, 4]) == [4, 6]
    with pytest.raises(ValueError, match="length mismatch"):
        safe_zip([1, 2], [1])
    assert isinstance(ad.zeros_like_p, jex_core.Primitive)
    assert restore_jax_names() == ()  # idempotent


def test_missing_package_gives_the_install_line(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "neural_tangents" else real(name, *a)
    )
    with pytest.raises(NeuralTangentsUnavailable, match=r"pip install 'ntksap-jax\[validate\]'"):
        import_neural_tangents()
    code = main(["validate", "--model", "mlp", "--dataset", "digits", "--batch", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and INSTALL_HINT in err


# ----------------------------------------------------------------------------------- kernels vs neural-tangents

def _mlp_case(key):
    model = get_model("mlp", 3, features=(16, 8))
    x = jax.random.normal(key, (5, 4, 4, 1))
    return model, x, 0.5


def _bn_cnn_case(key):
    model = BNCNN()
    x = jax.random.normal(key, (3, 6, 6, 2))
    return model, x, 0.6


def _resnet20_case(key):
    model = get_model("resnet20", 10)
    x = jax.random.normal(key, (2, 32, 32, 3))
    return model, x, 0.1


@requires_nt
@pytest.mark.parametrize("case", [_mlp_case, _bn_cnn_case, _resnet20_case], ids=["mlp", "bn_cnn", "resnet20_masked"])
def test_empirical_ntk_equals_neural_tangents_float64(x64, case):
    model, x, density = case(jax.random.key(1))
    variables = to_f64(jax.jit(lambda k: model.init(k, x[:1], train=False))(jax.random.key(0)))
    masks = to_f64(random_masks(2, variables["params"], density))
    from ntksap_jax.validate import validate_ntk

    # Our own second implementation is tested against a jax.jacobian oracle in test_ntk.py.
    result = validate_ntk(model, variables, masks, x.astype(jnp.float64), compare_own=False)
    assert result.dtype == "float64" and result.tolerance == 1e-10
    by_name = {r.implementation: r for r in result.rows}
    for name in SUPPORTED_IMPLEMENTATIONS:  # every supported implementation ran and agrees
        row = by_name[f"neural-tangents {name}"]
        assert row.passed and row.rel_frobenius < 1e-10, row
        assert row.trace_ours == pytest.approx(row.trace_theirs, rel=1e-10)
    traced = by_name["neural-tangents traced (-1,) x K"]  # neural-tangents averages traced axes
    assert traced.rel_frobenius < 1e-10
    for name in UNSUPPORTED_IMPLEMENTATIONS:
        assert by_name[f"neural-tangents {name}"].passed is None
    assert result.passed
    # Masking matters: pruned weights contribute nothing (the kernel is not the dense one).
    assert result.shape == (x.shape[0], x.shape[0], model.num_classes, model.num_classes)


@requires_nt
def test_validation_detects_a_wrong_kernel(monkeypatch):
    """A kernel off by 1e-4 (relative) must fail the float32 tolerance of 1e-5."""
    import ntksap_jax.validate as validate

    model, x, _ = _mlp_case(jax.random.key(1))
    variables = jax.jit(lambda k: model.init(k, x[:1]))(jax.random.key(0))
    real = validate.empirical_ntk
    monkeypatch.setattr(validate, "empirical_ntk", lambda *a, **k: real(*a, **k) * (1 + 1e-4))
    result = validate.validate_ntk(model, variables, None, x)
    rows = {r.implementation: r for r in result.rows}
    assert not result.passed
    assert not rows["neural-tangents JACOBIAN_CONTRACTION"].passed
    assert rows["neural-tangents JACOBIAN_CONTRACTION"].rel_frobenius == pytest.approx(1e-4, rel=1e-2)


def test_unknown_implementation_and_dtype_are_named():
    from ntksap_jax.validate import tolerance_for, validate_ntk

    with pytest.raises(ValueError, match="no NTK validation tolerance for dtype 'float16'"):
        tolerance_for(jnp.float16)
    if importlib.util.find_spec("neural_tangents") is not None:
        model, x, _ = _mlp_case(jax.random.key(1))
        variables = jax.jit(lambda k: model.init(k, x[:1]))(jax.random.key(0))
        with pytest.raises(ValueError, match="unknown neural-tangents implementation 'FAST'"):
            validate_ntk(model, variables, None, x, implementations=("FAST",))


# --------------------------------------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def resnet20_masks(tmp_path_factory):
    """A 10%-density random mask for resnet20 (seed 0 init), saved as `prune` would."""
    folder = tmp_path_factory.mktemp("r20")
    model = get_model("resnet20", 10)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(0))
    masks = random_masks(5, variables["params"], 0.1)
    save_masks(folder / "masks.npz", masks)
    return folder / "masks.npz"


@requires_nt
def test_cli_validate_resnet20_prints_the_table(resnet20_masks, capsys):
    code = main(["validate", "--model", "resnet20", "--masks", str(resnet20_masks), "--batch", "2"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "| implementation | max abs diff | rel. Frobenius error | trace ours / theirs | seconds |" in out
    for name in SUPPORTED_IMPLEMENTATIONS:
        line = next(row for row in out.splitlines() if row.startswith(f"| neural-tangents {name} "))
        assert line.rstrip().endswith("| yes |")
        assert float(line.split("|")[3]) < 1e-5  # relative Frobenius error in float32
    assert "STRUCTURED_DERIVATIVES | – | – | – | – | unsupported |" in out
    assert "density 10." in out or "density 9." in out
    assert "all supported implementations agree" in out


@pytest.mark.parametrize("content,match", [
    (b"this is not a zip file", "not a readable masks file"),
    (None, "not a readable masks file"),  # truncated npz
])
def test_cli_validate_corrupted_mask_file(resnet20_masks, tmp_path, capsys, content, match):
    bad = tmp_path / "masks.npz"
    bad.write_bytes(content if content is not None else resnet20_masks.read_bytes()[:200])
    code = main(["validate", "--model", "resnet20", "--masks", str(bad), "--batch", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and match in err and str(bad) in err, err


def test_cli_validate_mask_for_another_model(resnet20_masks, capsys):
    code = main(["validate", "--model", "mlp", "--dataset", "digits", "--masks", str(resnet20_masks)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "masks for params that the model does not have" in err and "--model mlp" in err


def test_cli_validate_missing_file_and_bad_batch(tmp_path, capsys):
    code = main(["validate", "--model", "mlp", "--masks", str(tmp_path / "nope.npz")])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err
    code = main(["validate", "--model", "mlp", "--batch", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--batch must be a positive integer; got 0" in err


def test_load_masks_rejects_non_binary_entries(tmp_path):
    from ntksap_jax import load_masks

    model = get_model("mlp", 3, features=(4,))
    params = jax.jit(lambda k: model.init(k, jnp.zeros((1, 5))))(jax.random.key(0))["params"]
    np.savez(tmp_path / "m.npz", **{"fc.kernel": np.full((4, 3), 0.5)})
    with pytest.raises(ValueError, match="entry 'fc.kernel' is not a 0/1 mask"):
        load_masks(tmp_path / "m.npz", params)
