"""NTK spectra of masked networks against float64 ``jax.jacobian`` oracles and hand-derived Grams."""

import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import official_bn_stats
from ntksap_jax.analysis import spectrum as analysis
from ntksap_jax.analysis import ntk_spectrum, plot_densities, plot_spectrum, spectrum_study
from ntksap_jax.masks import init_masks
from ntksap_jax.models import get_model
from ntksap_jax.models.resnet_cifar import LotteryResNet
from ntksap_jax.scores.ntksap import kaiming_normal_reinit

IS_NONE = lambda t: t is None  # noqa: E731


def random_masks(seed, params, density):
    """Independent Bernoulli(density) masks on the kernels (numpy: no RNG kernels to compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda m: None if m is None else jnp.asarray(rng.random(m.shape) < density, m.dtype),
        init_masks(params), is_leaf=IS_NONE,
    )


def numpy_init(model, x, seed):
    """Float64 variables from numpy: kaiming-normal kernels, random BN scales/biases and biases.

    (Avoids compiling ``model.init``'s RNG; non-trivial BN params check that they are differentiated.)
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)

    def fill(path, s):
        name = path[-1].key
        if name == "kernel":
            return jnp.asarray(rng.normal(size=s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1])))
        if name == "scale":
            return jnp.asarray(1.0 + 0.2 * rng.normal(size=s.shape))
        if name == "var":
            return jnp.ones(s.shape, jnp.float64)
        return jnp.asarray(0.2 * rng.normal(size=s.shape))  # biases, BN biases, running means

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture
def count_traces(monkeypatch):
    """Counts how often the Gram computation is traced (once per compiled program)."""
    calls = []
    original = analysis._blocked_gram

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(analysis, "_blocked_gram", counting)
    return calls


# --------------------------------------------------------------------------- oracle: ResNet with BN


def oracle_gram_fn(model, masks, batch_stats_template, x):
    """Gram of the masked eval-mode net from whole-batch ``jax.jacobian`` (float64, BN stats of θ⊙m on x
    as the official code takes them: a train-mode pass, unbiased running variances)."""

    def gram(params):
        mp = jax.tree.map(lambda m, p: p if m is None else p * m, masks, params, is_leaf=IS_NONE)
        stats = official_bn_stats(model, {"params": mp, "batch_stats": batch_stats_template}, x)

        def f(p):
            mp_ = jax.tree.map(lambda m, q: q if m is None else q * m, masks, p, is_leaf=IS_NONE)
            return model.apply({"params": mp_, "batch_stats": stats}, x, train=False)

        jac = jax.jacobian(f)(params)  # leaves (N, K, *shape)
        n, k = x.shape[0], jax.eval_shape(f, params).shape[1]
        j = jnp.concatenate([leaf.reshape(n * k, -1) for leaf in jax.tree.leaves(jac)], axis=1)
        return j @ j.T

    return jax.jit(gram)


def test_resnet_spectrum_matches_float64_oracle_and_averages_draws(x64, count_traces):
    model = LotteryResNet(num_classes=3, depth=8, width=2)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 8, 8, 3)))
    v = numpy_init(model, x, 1)
    masks = random_masks(2, v["params"], 0.5)
    key = jax.random.key(7)

    study = spectrum_study(model, v, {"rand": masks}, x, key=key, draws=2, include_dense=False)
    assert len(count_traces) == 1  # one compiled program for both draws

    oracle = oracle_gram_fn(model, masks, v["batch_stats"], x)
    eigs, traces = [], []
    for d in range(2):
        params_d = kaiming_normal_reinit(jax.random.fold_in(key, d), v["params"], masks)
        g = oracle(params_d)
        g = np.asarray(g)
        eigs.append(np.sort(np.linalg.eigvalsh(g))[::-1])
        traces.append(np.trace(g))
    assert abs(traces[0] - traces[1]) > 1e-3 * traces[0]  # the draws really differ
    expected = np.mean(eigs, axis=0)

    s = study["spectra"]["rand"]
    lam = np.asarray(s["eigenvalues"])
    assert lam.shape == (15,)
    np.testing.assert_allclose(lam, expected, rtol=1e-8, atol=1e-12 * expected[0])
    np.testing.assert_allclose(s["traces_per_draw"], traces, rtol=1e-10)
    np.testing.assert_allclose(s["trace"], np.mean(traces), rtol=1e-10)
    np.testing.assert_allclose(lam.sum(), s["trace"], rtol=1e-10)
    np.testing.assert_allclose(s["condition_number"], expected[0] / expected[-1], rtol=1e-6)
    assert s["rank"] == 15 and 1.0 <= s["effective_rank"] <= 15.0

    # per-layer densities in forward order, counted independently
    kernels = {
        "conv.kernel": masks["conv"]["kernel"],
        "blocks_0.conv1.kernel": masks["blocks_0"]["conv1"]["kernel"],
        "fc.kernel": masks["fc"]["kernel"],
    }
    assert study["layers"][:2] == ["conv.kernel", "blocks_0.conv1.kernel"] and study["layers"][-1] == "fc.kernel"
    rows = {r["name"]: r for r in s["layers"]}
    assert [r["name"] for r in s["layers"]] == study["layers"]
    for name, m in kernels.items():
        assert rows[name]["kept"] == int(np.sum(np.asarray(m))) and rows[name]["total"] == m.size
    total = sum(r["total"] for r in s["layers"])
    assert s["density"] == pytest.approx(sum(r["kept"] for r in s["layers"]) / total)
    assert study["config"] == {
        "num_examples": 5, "num_outputs": 3, "draws": 2, "keyed": True, "dtype": "float64",
        "input_shape": [5, 8, 8, 3], "num_params": study["config"]["num_params"], "num_prunable": total,
    }
    json.dumps(study, allow_nan=False)


# --------------------------------------------------------------------------- hand-derived: a linear layer


class Linear(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(self.num_classes, use_bias=False)(x.reshape(x.shape[0], -1))


def test_linear_model_hand_derived_gram(x64):
    """Θ[i, j, a, b] = δ_ab Σ_p x_ip x_jp m_pa: block-diagonal over outputs, independent of W."""
    n, k = 6, 3
    model = Linear(k)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(n, 2, 2, 2)))
    v = numpy_init(model, x, 1)
    rng = np.random.default_rng(0)
    m = (rng.random((8, k)) < 0.5).astype(np.float64)
    m[:, 0] = 1.0  # output 0 keeps all 8 features: full rank 6; the others fewer than 6
    sub = m * (rng.random((8, k)) < 0.6)
    X = np.asarray(x).reshape(n, -1)

    def expected(mask):
        lam = np.concatenate([np.linalg.eigvalsh((X * mask[:, a]) @ X.T) for a in range(k)])
        ranks = sum(np.linalg.matrix_rank(X[:, mask[:, a] > 0]) if mask[:, a].any() else 0 for a in range(k))
        return np.sort(lam)[::-1], ranks

    results = {}
    for label, mask in (("m", m), ("sub", sub)):
        masks = {"Dense_0": {"kernel": jnp.asarray(mask)}}
        res = ntk_spectrum(model, v, masks, x)
        lam, rank = expected(mask)
        np.testing.assert_allclose(res.eigenvalues, lam, rtol=1e-9, atol=1e-12 * lam[0])
        assert res.rank == rank < n * k  # 8 features, < 6 kept per output: some exact zeros
        assert np.all(res.eigenvalues[rank:] == 0.0)  # numerically zero eigenvalues are exactly 0
        assert res.condition_number == np.inf
        np.testing.assert_allclose(res.trace, np.sum((X**2) @ mask), rtol=1e-12)
        assert res.density == pytest.approx(mask.mean())
        results[label] = res
    # Θ_m − Θ_sub is PSD: every eigenvalue of the sub-mask is at most that of the mask (Weyl)
    assert np.all(results["sub"].eigenvalues <= results["m"].eigenvalues * (1 + 1e-12))
    assert results["sub"].trace < results["m"].trace


def test_linear_model_float32_finds_the_exact_rank():
    """The production dtype: rounding noise of a float32 Gram is zeroed, real eigenvalues kept."""
    n, k = 12, 2
    model = Linear(k)
    rng = np.random.default_rng(5)
    X = rng.normal(size=(n, 10)) * np.logspace(0, -2, 10)  # graded features: κ ~ 1e5 overall
    X = X.astype(np.float32).astype(np.float64)  # the inputs the model sees
    m = np.ones((10, k))
    m[7:, 1] = 0.0  # output 1 keeps 7 features: rank 7 < 12; output 0 rank 10
    masks = {"Dense_0": {"kernel": jnp.asarray(m, jnp.float32)}}
    v = {"params": {"Dense_0": {"kernel": jnp.ones((10, k), jnp.float32)}}}
    res = ntk_spectrum(model, v, masks, jnp.asarray(X, jnp.float32))
    lam = np.sort(np.concatenate([np.linalg.eigvalsh((X * m[:, a]) @ X.T) for a in range(k)]))[::-1]
    assert res.rank == 17
    # float32 Gram: absolute errors of about 0.2 · eps · λ_max (the accumulation noise)
    np.testing.assert_allclose(res.eigenvalues[:17], lam[:17], rtol=1e-5, atol=np.finfo(np.float32).eps * lam[0])
    assert np.all(res.eigenvalues[17:] == 0.0) and res.condition_number == np.inf


def test_draws_need_a_key():
    model = Linear(2)
    x = jnp.ones((2, 3))
    v = {"params": {"Dense_0": {"kernel": jnp.ones((3, 2))}}}
    with pytest.raises(ValueError, match="needs a PRNG key"):
        ntk_spectrum(model, v, None, x, draws=2)
    with pytest.raises(ValueError, match="draws must be a positive integer"):
        ntk_spectrum(model, v, None, x, key=jax.random.key(0), draws=0)
    with pytest.raises(ValueError, match='"dense"'):
        spectrum_study(model, v, {"dense": init_masks(v["params"])}, x)


# --------------------------------------------------------------------------- MLP: dense reference and monotonicity


def test_mlp_study_dense_reference_and_last_layer_monotonicity(x64, count_traces):
    """No BN, one hidden layer: dropping classifier weights only removes terms, so the trace falls.

    (Pruning an inner layer need not lower the trace: J itself depends on the mask through the
    forward pass, e.g. removing a negative weight can switch a ReLU on.)
    """
    model = get_model("mlp", 3, features=(16,))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 2, 2, 2)))
    v = numpy_init(model, x, 1)
    ones = init_masks(v["params"])
    hidden = dict(ones, dense_0={"kernel": random_masks(3, v["params"], 0.5)["dense_0"]["kernel"], "bias": None})
    rng = np.random.default_rng(1)
    fc1 = np.asarray(ones["fc"]["kernel"]) * (rng.random((16, 3)) < 0.7)
    fc2 = fc1 * (rng.random((16, 3)) < 0.5)
    labelled = {
        "ones": ones,
        "hidden": hidden,
        "fc1": dict(hidden, fc={"kernel": jnp.asarray(fc1), "bias": None}),
        "fc2": dict(hidden, fc={"kernel": jnp.asarray(fc2), "bias": None}),
    }
    # chunk_size=4 with N=6: 2×2 Jacobian blocks, two padded examples
    study = spectrum_study(model, v, labelled, x, chunk_size=4)
    assert len(count_traces) == 1  # dense and every mask share one program
    sp = study["spectra"]
    assert list(sp) == ["dense", "ones", "hidden", "fc1", "fc2"]
    assert sp["dense"]["relative_trace"] == 1.0 and sp["dense"]["density"] == 1.0
    assert sp["ones"]["relative_trace"] == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(sp["ones"]["eigenvalues"], sp["dense"]["eigenvalues"], rtol=1e-12)
    assert sp["hidden"]["trace"] > sp["fc1"]["trace"] > sp["fc2"]["trace"]
    assert sp["fc2"]["relative_trace"] == pytest.approx(sp["fc2"]["trace"] / sp["dense"]["trace"])
    kept = np.sum(np.asarray(hidden["dense_0"]["kernel"])) + fc1.sum()
    assert sp["fc1"]["density"] == pytest.approx(kept / (8 * 16 + 16 * 3))
    assert [r["name"] for r in sp["fc1"]["layers"]] == ["dense_0.kernel", "fc.kernel"]
    assert sp["fc1"]["layers"][1]["kept"] == int(fc1.sum())

    # independent check of the dense spectrum (biases included) with a float64 jax.jacobian oracle
    jac = jax.jacobian(lambda p: model.apply({"params": p}, x))(v["params"])
    j = np.concatenate([np.asarray(leaf).reshape(18, -1) for leaf in jax.tree.leaves(jac)], axis=1)
    lam = np.sort(np.linalg.eigvalsh(j @ j.T))[::-1]
    np.testing.assert_allclose(sp["dense"]["eigenvalues"], lam, rtol=1e-9, atol=1e-12 * lam[0])
    assert sp["dense"]["condition_number"] == pytest.approx(lam[0] / lam[-1], rel=1e-6)
    json.dumps(study, allow_nan=False)


# --------------------------------------------------------------------------- plots


def _study():
    lam = lambda scale, zeros: [scale * 10.0 ** (-i / 3) for i in range(12 - zeros)] + [0.0] * zeros  # noqa: E731
    layers = lambda ds: [{"name": n, "kept": int(d * 100), "total": 100, "density": d}  # noqa: E731
                         for n, d in zip(("conv.kernel", "blocks_0.conv1.kernel", "fc.kernel"), ds)]
    return {
        "config": {"num_examples": 4, "num_outputs": 3, "draws": 2, "keyed": True},
        "layers": ["conv.kernel", "blocks_0.conv1.kernel", "fc.kernel"],
        "spectra": {
            "dense": {"eigenvalues": lam(100.0, 0), "trace": 150.0, "relative_trace": 1.0, "condition_number": 3.9e3,
                      "rank": 12, "density": 1.0, "layers": layers((1.0, 1.0, 1.0))},
            "ntksap": {"eigenvalues": lam(30.0, 2), "trace": 45.0, "relative_trace": 0.3, "condition_number": None,
                       "rank": 10, "density": 0.1, "layers": layers((0.5, 0.08, 0.0))},
            "random": {"eigenvalues": lam(10.0, 0), "trace": 15.0, "relative_trace": 0.1, "condition_number": 4e3,
                       "rank": 12, "density": 0.1, "layers": layers((0.1, 0.1, 0.1))},
        },
    }


def _is_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.01  # something was drawn


def test_plots_write_valid_pngs_atomically(tmp_path):
    study = _study()
    plot_spectrum(study, tmp_path / "spectrum.png")
    plot_densities(study, str(tmp_path / "densities.png"))
    assert sorted(os.listdir(tmp_path)) == ["densities.png", "spectrum.png"]  # no temp files left
    _is_png(tmp_path / "spectrum.png")
    _is_png(tmp_path / "densities.png")
    # overwriting works
    plot_spectrum(study, tmp_path / "spectrum.png")
    assert sorted(os.listdir(tmp_path)) == ["densities.png", "spectrum.png"]


def test_failed_plot_write_leaves_nothing(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    (tmp_path / "old.png").write_bytes(b"old")

    def broken(self, fname, *args, **kwargs):
        fname.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        plot_spectrum(_study(), tmp_path / "spectrum.png")
    with pytest.raises(OSError, match="disk full"):
        plot_densities(_study(), tmp_path / "old.png")
    assert os.listdir(tmp_path) == ["old.png"]
    assert (tmp_path / "old.png").read_bytes() == b"old"  # the previous file is intact


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'ntksap-jax\[validate\]'"):
        plot_spectrum(_study(), tmp_path / "s.png")
    assert os.listdir(tmp_path) == []


def test_cli_spectrum_writes_json_and_plots(tmp_path, capsys):
    """`ntksap-jax spectrum` on two masks from `ntksap-jax prune` (MLP on digits-shaped inputs)."""
    from ntksap_jax.cli import main
    from ntksap_jax.masks import load_masks

    runs = {}
    for method in ("magnitude", "random"):
        out = tmp_path / f"mlp-{method}"
        assert main(["prune", "--model", "mlp", "--dataset", "digits", "--method", method, "--density", "0.2",
                     "--seed", "3", "--out", str(out), "--no-progress"]) == 0
        runs[method] = out / "masks.npz"
    capsys.readouterr()
    out = tmp_path / "spectrum"
    code = main(["spectrum", "--model", "mlp", "--masks", str(runs["magnitude"]), str(runs["random"]),
                 "--batch", "6", "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["densities.png", "spectrum.json", "spectrum.png"]
    for png in ("densities.png", "spectrum.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    study = json.loads((out / "spectrum.json").read_text())
    assert list(study["spectra"]) == ["dense", "mlp-magnitude", "mlp-random"]
    assert study["dataset"] == "digits" and study["seed"] == 3  # taken from report.json
    assert study["spectra"]["dense"]["relative_trace"] == 1.0
    # Densities agree with the masks on disk (an independent count, not the study's own).
    model = get_model("mlp", 10)
    params = jax.jit(lambda k: model.init(k, jnp.zeros((1, 8, 8, 1))))(jax.random.key(0))["params"]
    for method, label in (("magnitude", "mlp-magnitude"), ("random", "mlp-random")):
        m = load_masks(runs[method], params)
        kept = sum(int(np.sum(a)) for a in jax.tree.leaves(m))
        total = sum(a.size for a in jax.tree.leaves(m))
        assert study["spectra"][label]["density"] == pytest.approx(kept / total)
        assert 0 < study["spectra"][label]["relative_trace"] < 1
    assert "| dense | 1.0000 |" in stdout and "| mlp-random | 0.2000 |" in stdout
    # Refuses to write into a non-empty folder, and a wrong model is one clear line.
    assert main(["spectrum", "--model", "mlp", "--masks", str(runs["random"]), "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["spectrum", "--model", "resnet20", "--masks", str(runs["random"]), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pruned for model 'mlp'" in err
