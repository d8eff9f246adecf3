"""The command line's workflows are library functions: the CLI's outputs are theirs, and a method's needs come
from its declaration (``Method``), not from the caller branching on its name."""

import json

import jax
import numpy as np
import pytest

from ntksap_jax import get_method, prune_model, register_scorer
from ntksap_jax.cli import main
from ntksap_jax.masks import load_masks
from ntksap_jax.runs import ConfigError, cli_flag, prune_zoo, resolve_prune
from ntksap_jax.scores import magnitude_scorer, ntksap_scorer


def test_the_prune_command_is_prune_zoo(tmp_path, capsys):
    """`ntksap-jax prune` writes exactly what `prune_zoo(resolve_prune(...))` returns."""
    argv = ["prune", "--model", "mlp", "--dataset", "digits", "--method", "ntksap", "--density", "0.1",
            "--iterations", "3", "--samples", "1", "--seed", "4", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    capsys.readouterr()
    plan = resolve_prune(model="mlp", dataset="digits", method="ntksap", density=0.1, iterations=3, samples=1, seed=4)
    pruned = prune_zoo(plan)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"] == json.loads(json.dumps(plan.config))
    for key in ("total_kept", "total_prunable", "layers", "effective_kept", "dead_units", "collapsed_layers"):
        assert report[key] == json.loads(json.dumps(pruned.report[key])), key
    on_disk = load_masks(tmp_path / "masks.npz", pruned.variables["params"])
    for a, b in zip(jax.tree.leaves(on_disk), jax.tree.leaves(pruned.masks)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resolve_prune_spells_arguments_as_the_caller_does():
    with pytest.raises(ConfigError, match=r"^num_inputs must be a positive integer; got 0$"):
        resolve_prune(model="mlp", dataset="digits", density=0.1, num_inputs=0)
    with pytest.raises(ConfigError, match=r"^--num-inputs must be a positive integer; got 0$"):
        resolve_prune(model="mlp", dataset="digits", density=0.1, num_inputs=0, spell=cli_flag)
    with pytest.raises(ConfigError, match=r"^unknown dataset 'svhn'; choose one of cifar10, "):
        resolve_prune(model="mlp", dataset="svhn", density=0.1)


def test_defaults_come_from_the_method_and_the_data_set():
    """NTK-SAP's official T and R by data set (20 and 5 on CIFAR-10, 100 and 1 elsewhere: the official
    scripts), other methods' rounds from their declaration; data-driven methods get the class count."""
    r20 = resolve_prune(model="resnet20", dataset="cifar10", density=0.1).config
    assert (r20["iterations"], r20["scorer"]["samples"], r20["scorer"]["num_inputs"]) == (20, 5, 100)
    vgg = resolve_prune(model="vgg16", dataset="cifar100", density=0.1).config
    assert (vgg["iterations"], vgg["scorer"]["samples"], vgg["scorer"]["num_inputs"]) == (100, 1, 1000)
    assert resolve_prune(model="mlp", dataset="digits", method="synflow", density=0.1).config["iterations"] == 100
    snip = resolve_prune(model="mlp", dataset="digits", method="snip", density=0.1).config
    assert snip["iterations"] == 1 and snip["scorer"] == {"num_classes": 10, "num_inputs": 100, "batch_size": 256}
    assert resolve_prune(model="mlp", dataset="digits", method="magnitude", density=0.1).config["scorer"] == {}


def test_methods_declare_what_they_need():
    assert get_method("snip").needs_data and get_method("grasp").needs_data and not get_method("ntksap").needs_data
    assert (get_method("ntksap").default_iterations, get_method("synflow").default_iterations) == (20, 100)
    assert {"samples", "num_inputs", "eps", "estimator", "sample_loop"} <= set(get_method("ntksap").options)
    assert get_method("magnitude").options == ()


def test_a_registered_method_is_used_as_declared():
    """A user's method: prune_model takes its default rounds from the declaration and refuses options it lacks."""
    name = "test_runs_magnitude_10"
    try:
        get_method(name)
    except ValueError:
        register_scorer(name, magnitude_scorer, default_iterations=10)
    from ntksap_jax.models import get_model

    result = prune_model(get_model("mlp", 10), input_shape=(8, 8, 1), density=0.2, key=jax.random.key(0), method=name)
    assert result.report["iterations"] == 10 and len(result.history) == 10
    with pytest.raises(ValueError, match="takes no samples"):
        prune_model(get_model("mlp", 10), input_shape=(8, 8, 1), density=0.2, key=jax.random.key(0), method=name,
                    samples=2)


def test_score_functions_count_their_compilations():
    from ntksap_jax import init_masks, prune
    from ntksap_jax.models import get_model

    model = get_model("mlp", 10, features=(16,))
    params = model.init(jax.random.key(0), np.zeros((1, 8, 8, 1)))["params"]
    score = ntksap_scorer(model, (8, 8, 1), samples=2, num_inputs=10, batch_size=4)  # batches 4, 4, 2
    prune(score, params, init_masks(params), density=0.3, iterations=3, key=jax.random.key(1))
    assert score.traces == 2  # one program per batch size (4 and the short 2), none per round
    lowered = score.lowered(params, init_masks(params), None, jax.random.key(0))
    assert sorted(uses for _, uses in lowered) == [2, 4]  # 2 samples x (two batches of 4, one of 2)
