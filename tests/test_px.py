"""PX (scores/px.py): the formula against a hand-derived closed form and a float64 path enumeration, the
official layer exclusions, the zoo and users' models, one-line errors, class-balanced scoring sets, the CLI.

Tolerances: float32 results against float64 NumPy references use rtol 1e-5 (a few float32 roundings of
sums of at most a few dozen terms); float64 against float64 uses rtol 1e-10 (summation order only).
"""

import itertools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntksap_jax import prune_model
from ntksap_jax.cli import main
from ntksap_jax.data import balanced_batch, class_balanced, load
from ntksap_jax.masks import init_masks
from ntksap_jax.model import as_model, from_apply_fn
from ntksap_jax.models import get_model
from ntksap_jax.scores import get_method, px_scorer


class Tiny(nn.Module):
    """x (2) -> Dense 2, no bias -> relu -> Dense 1, no bias."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(2, use_bias=False, name="hidden")(x.reshape((x.shape[0], -1))))
        return nn.Dense(1, use_bias=False, name="out")(h)


def _kernels(path, leaf):
    return leaf.ndim > 1


@pytest.mark.parametrize("keep_head", [True, False])
def test_tiny_two_layer_relu_net_matches_the_hand_derived_formula(keep_head):
    # Closed form: gates g_j(x) = [Σ_i x_i W1_ij > 0]. Path-activation net (W1 -> 1, x -> x²):
    # z1(x) = Σ_j |x|² g_j(x) v_j with v = W2 (head kept) or 1. Path-kernel net (W1 -> W1², ReLU -> id, x -> 1):
    # z2 = Σ_j (Σ_i W1_ij²) u_j with u = W2 (kept) or W2². R = Σ_x z1(x) z2, z1 under no_grad. So
    # ∂R/∂(W1_ij²) = S u_j and ∂R/∂u_j = S Σ_i W1_ij², with S = Σ_x z1(x); scores |∂R/∂·| θ².
    x = np.random.RandomState(0).randn(5, 2).astype(np.float32)
    params = Tiny().init(jax.random.key(0), x)["params"]
    s = px_scorer(Tiny(), (2,), num_classes=1, data=(x, np.zeros(5, int)), keep_head=keep_head)(
        params, init_masks(params, _kernels), None, jax.random.key(0))
    w1 = np.asarray(params["hidden"]["kernel"], np.float64)
    w2 = np.asarray(params["out"]["kernel"], np.float64)[:, 0]
    gates = (x.astype(np.float64) @ w1 > 0).astype(np.float64)
    v, u = (w2, w2) if keep_head else (np.ones(2), w2**2)
    big_s = np.sum((x.astype(np.float64) ** 2).sum(1)[:, None] * gates * v)
    np.testing.assert_allclose(s["hidden"]["kernel"], np.abs(big_s * u)[None, :] * w1**2, rtol=1e-5)
    np.testing.assert_allclose(s["out"]["kernel"][:, 0], np.abs(big_s * (w1**2).sum(0)) * w2**2, rtol=1e-5)


class Mlp3432(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = x.reshape((x.shape[0], -1))
        for i, width in enumerate((4, 3)):
            h = nn.relu(nn.Dense(width, name=f"d{i}")(h))
        return nn.Dense(2, name="head")(h)


def _path_sums(layers, x_in, gates):
    """``z[k]`` and ``dz[k][(layer, kind, index)]``: the network as a sum over its paths. A path starts at an
    input ``i`` (value ``x_in[i]``, first edge ``W_0[i, u_0]``) or at layer ``s``'s bias (value 1, first edge
    ``b_s[u_s]``) and runs through one unit ``u_l`` of each later layer (edges ``W_l[u_{l-1}, u_l]``); its
    term is the product of its value, its edges and the gates ``gates[l][u_l]`` of the hidden units it passes."""
    n_layers = len(layers)
    widths = [w.shape[1] for w, _ in layers]
    z, dz = np.zeros(widths[-1]), [dict() for _ in range(widths[-1])]
    sources = [(0, i) for i in range(len(x_in))] + [(s, None) for s in range(n_layers)]
    for start, i in sources:
        for units in itertools.product(*[range(n) for n in widths[start:]]):
            u = dict(zip(range(start, n_layers), units))
            edges = [((0, "kernel", (i, u[0])), layers[0][0][i, u[0]])] if i is not None else \
                [((start, "bias", u[start]), layers[start][1][u[start]])]
            edges += [((la, "kernel", (u[la - 1], u[la])), layers[la][0][u[la - 1], u[la]])
                      for la in range(start + 1, n_layers)]
            value = x_in[i] if i is not None else 1.0
            factor = value * np.prod([gates[la][u[la]] for la in range(start, n_layers - 1)])
            values = [e[1] for e in edges]
            k = u[n_layers - 1]
            z[k] += factor * np.prod(values)
            for j, (key, _) in enumerate(edges):
                dz[k][key] = dz[k].get(key, 0.0) + factor * np.prod(values[:j] + values[j + 1:])
    return z, dz


def test_float64_scores_equal_a_direct_sum_over_paths():
    # A 3-4-3-2 MLP with biases, some weights pruned, two scoring batches: R = Σ_x Σ_k z1_k(x) z2_k with both
    # networks written as explicit sums over their input-output paths (bias paths included), and
    # ∂R/∂u_e = Σ_x Σ_k z1_k(x) ∂z2_k/∂u_e summed over the paths through e.
    with jax.enable_x64(True):
        rs = np.random.RandomState(1)
        x = rs.randn(6, 3)
        model = Mlp3432()
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model.init(jax.random.key(3), x)["params"])
        params = jax.tree.map(lambda a: a + 0.1 * jnp.asarray(rs.randn(*a.shape)), params)  # nonzero biases
        masks = init_masks(params, _kernels)
        masks["d0"]["kernel"] = masks["d0"]["kernel"].at[0, 1].set(0.0).at[2, 3].set(0.0)
        masks["d1"]["kernel"] = masks["d1"]["kernel"].at[1, 2].set(0.0)
        s = px_scorer(model, (3,), num_classes=2, data=(x, np.zeros(6, int)), batch_size=4)(
            params, masks, None, jax.random.key(0))
        names = ["d0", "d1", "head"]
        theta = [(np.asarray(params[n]["kernel"]), np.asarray(params[n]["bias"])) for n in names]
        m = [np.asarray(masks[n]["kernel"]) for n in names]
        act = [(w * mk, b) for (w, b), mk in zip(theta, m)]
        ones = [(mk, np.ones_like(b)) for (_, b), mk in zip(theta[:2], m[:2])] + [act[2]]  # head kept
        kernel = [(w**2 * mk, b**2) for (w, b), mk in zip(theta[:2], m[:2])] + [act[2]]
        grads = {}
        for xb in x:
            h, gates = xb, []
            for w, b in act[:2]:
                pre = h @ w + b
                gates.append((pre > 0).astype(float))
                h = np.maximum(pre, 0)
            z1, _ = _path_sums(ones, xb**2, gates)
            _, dz2 = _path_sums(kernel, np.ones(3), [np.ones(4), np.ones(3)])
            for k in range(2):
                for key, d in dz2[k].items():
                    grads[key] = grads.get(key, 0.0) + z1[k] * d
        for layer, name in enumerate(names):
            w = theta[layer][0]
            # the chain rule through the mask: ∂R/∂u = m ∂R/∂w (official p1.grad with w = u·m)
            g = np.array([[grads.get((layer, "kernel", (a, b)), 0.0) for b in range(w.shape[1])]
                          for a in range(w.shape[0])]) * m[layer]
            np.testing.assert_allclose(np.asarray(s[name]["kernel"]), np.abs(g) * w**2, rtol=1e-10, atol=1e-300)
        assert np.all(np.asarray(s["d0"]["kernel"])[[0, 2], [1, 3]] == 0)  # pruned entries score 0


def test_zoo_mlp_scores_are_finite_nonnegative_deterministic_and_zero_when_pruned():
    model = get_model("mlp", 10)
    spec = as_model(model, (8, 8, 1))
    params = spec.init(jax.random.key(0))["params"]
    x, y = balanced_batch(load("digits"), 3, seed=0)
    masks = init_masks(params, spec.prunable)
    masks["dense_1"]["kernel"] = masks["dense_1"]["kernel"].at[:5].set(0.0)
    score = px_scorer(model, (8, 8, 1), num_classes=10, data=(x, y))
    s1 = score(params, masks, None, jax.random.key(0))
    s2 = score(params, masks, None, jax.random.key(1))
    assert jax.tree.structure(s1) == jax.tree.structure(masks) and score.traces == 1
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        assert np.all(np.isfinite(a)) and np.all(np.asarray(a) >= 0) and np.array_equal(a, b)
    assert np.all(np.asarray(s1["dense_1"]["kernel"])[:5] == 0)
    assert get_method("px").default_iterations == 100 and get_method("px").requires_data


@pytest.mark.slow(seconds=35)
def test_resnet20_on_a_tiny_batch():
    model = get_model("resnet20", 10)
    spec = as_model(model, (32, 32, 3))
    v = spec.init(jax.random.key(0))
    x = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
    s = px_scorer(model, (32, 32, 3), num_classes=10, data=(x, np.arange(2)))(
        v["params"], init_masks(v["params"], spec.prunable), v["batch_stats"], jax.random.key(0))
    leaves = jax.tree.leaves(s)
    assert len(leaves) == 22 and all(np.all(np.isfinite(a)) and np.all(np.asarray(a) >= 0) for a in leaves)
    assert all(float(np.max(a)) > 0 for a in leaves)


def test_own_models_linen_with_a_call_convention_and_apply_fn_twins_agree():
    from own_models import LinenCNN, LinenMLP, equinox_mlp, linen_params_from_equinox

    x = np.random.RandomState(0).randn(8, 8, 8, 1).astype(np.float32)
    y = np.arange(8) % 4
    cnn = as_model(LinenCNN(num_classes=4), (8, 8, 1))  # train= convention, BatchNorm
    v = cnn.init(jax.random.key(0))
    s = px_scorer(cnn, (8, 8, 1), num_classes=4, data=(x, y))(v["params"], init_masks(v["params"], cnn.prunable),
                                                              v["batch_stats"], jax.random.key(0))
    assert all(np.all(np.isfinite(a)) and float(np.max(a)) > 0 for a in jax.tree.leaves(s))
    # The same MLP as Equinox through apply_fn and as linen: equal scores (layouts transposed).
    apply_fn, eqx_params, _ = equinox_mlp(jax.random.key(1), sizes=(64, 16, 16, 4))
    eqx_model = from_apply_fn(apply_fn, eqx_params, input_shape=(8, 8, 1))
    ev = eqx_model.get_variables()
    s_eqx = px_scorer(eqx_model, (8, 8, 1), num_classes=4, data=(x, y))(
        ev["params"], init_masks(ev["params"], eqx_model.prunable), None, jax.random.key(0))
    lin_params = linen_params_from_equinox(eqx_params)
    lin = LinenMLP(sizes=(16, 16, 4))
    s_lin = px_scorer(lin, (8, 8, 1), num_classes=4, data=(x, y))(
        lin_params, init_masks(lin_params, _kernels), None, jax.random.key(0))
    native = eqx_model.to_native(s_eqx)
    for i in range(3):  # float32: vmapped matrix-vector products vs batched matmuls sum in other orders (seen 2e-5)
        np.testing.assert_allclose(np.asarray(native.layers[i].weight).T, s_lin[f"layers_{i}"]["kernel"], rtol=1e-4)


class GeluNet(nn.Module):
    act: str = "gelu"

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4)(x.reshape((x.shape[0], -1)))
        h = {"gelu": nn.gelu, "tanh": jnp.tanh, "silu": nn.silu}[self.act](h)
        return nn.Dense(2)(h)


@pytest.mark.parametrize("act,named", [("gelu", "gelu (tanh)"), ("tanh", "'tanh'"), ("silu", "silu")])
def test_an_unsupported_activation_is_a_one_line_error_naming_it(act, named):
    x = np.ones((2, 3), np.float32)
    params = GeluNet(act).init(jax.random.key(0), x)["params"]
    score = px_scorer(GeluNet(act), (3,), num_classes=2, data=(x, np.zeros(2, int)))
    with pytest.raises(ValueError, match="px supports only relu and leaky_relu") as e:
        score(params, init_masks(params, _kernels), None, jax.random.key(0))
    assert named.strip("'") in str(e.value) and "\n" not in str(e.value)


def test_no_data_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"px needs real examples: pass data=\(x, y\)") as e:
        prune_model(get_model("mlp", 10), input_shape=(8, 8, 1), density=0.5, key=jax.random.key(0), method="px")
    assert "\n" not in str(e.value)


def test_leaky_relu_gate_is_its_slope():
    # One hidden leaky unit, no biases: z1 = Σ_x |x|² g(x) v, g = 1 (pre >= 0) or the slope 0.1.
    class Leaky(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1, use_bias=False, name="o")(nn.leaky_relu(nn.Dense(1, use_bias=False, name="h")(x), 0.1))

    x = np.array([[1.0, 2.0], [-1.0, -3.0]], np.float32)
    p = Leaky().init(jax.random.key(0), x)["params"]
    s = px_scorer(Leaky(), (2,), num_classes=1, data=(x, np.zeros(2, int)))(p, init_masks(p, _kernels), None,
                                                                            jax.random.key(0))
    w1, v = np.asarray(p["h"]["kernel"])[:, 0].astype(np.float64), float(p["o"]["kernel"][0, 0])
    g = np.where(x @ w1 >= 0, 1.0, 0.1)
    big_s = np.sum((x.astype(np.float64) ** 2).sum(1) * g * v)
    np.testing.assert_allclose(s["h"]["kernel"][:, 0], np.abs(big_s * v) * w1**2, rtol=1e-5)


def test_class_balanced_takes_exactly_k_of_each_class_deterministically():
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 0, 2, 2])
    x = np.arange(len(y)) * 10
    xs, ys = class_balanced(x, y, 3, num_classes=3, seed=4)
    assert list(ys) == [0, 1, 2] * 3 and np.array_equal(y[xs // 10], ys)  # each x comes with its own label
    assert np.array_equal(class_balanced(x, y, 3, num_classes=3, seed=4)[0], xs)
    assert not all(np.array_equal(class_balanced(x, y, 3, num_classes=3, seed=s)[0], xs) for s in range(5, 10))
    with pytest.raises(ValueError, match=r"^class 1 has 3 examples; examples_per_class=4 needs 4 of each class$"):
        class_balanced(x, y, 4, num_classes=3)
    with pytest.raises(ValueError, match="^class 3 has 0 examples"):
        class_balanced(x, y, 1, num_classes=4)
    xb, yb = balanced_batch(load("digits"), 5, seed=0)
    assert xb.shape == (50, 8, 8, 1) and list(np.bincount(yb)) == [5] * 10


def test_workflow_scores_snip_on_a_class_balanced_subset():
    x, y = balanced_batch(load("digits"), 8, seed=1)
    r = prune_model(get_model("mlp", 10), input_shape=(8, 8, 1), density=0.5, key=jax.random.key(0), method="snip",
                    data=(x, y), examples_per_class=3)
    assert r.report["scorer"]["data"] == "30 labelled examples" and r.report["scorer"]["examples_per_class"] == 3
    with pytest.raises(ValueError, match="examples_per_class applies to the data-driven methods; 'synflow'"):
        prune_model(get_model("mlp", 10), input_shape=(8, 8, 1), density=0.5, key=jax.random.key(0),
                    method="synflow", examples_per_class=3)


def test_cli_prune_px_loads_a_balanced_batch(tmp_path, capsys):
    out = tmp_path / "p"
    code = main(["prune", "--model", "mlp", "--dataset", "digits", "--method", "px", "--density", "0.1",
                 "--iterations", "2", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["examples_per_class"] == 10 and report["config"]["scorer_data"] == "100 labelled " \
        "training images"
    assert abs(report["density_actual"] - 0.1) < 1e-4
    assert main(["prune", "--model", "mlp", "--dataset", "digits", "--method", "synflow", "--density", "0.1",
                 "--examples-per-class", "3", "--out", str(tmp_path / "q")]) == 2
    assert "--examples-per-class applies to the data-driven methods" in capsys.readouterr().err


@pytest.mark.slow(seconds=20)
def test_cli_run_px_on_the_digits_preset(tmp_path, capsys):
    out = tmp_path / "r"
    code = main(["run", "--preset", "mlp-digits", "--method", "px", "--density", "0.1", "--iterations", "3",
                 "--epochs", "1", "--no-dense", "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "| px pruned | 0.1000 | 1 |" in captured.out
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["examples_per_class"] == 10 and report["method"] == "px"
