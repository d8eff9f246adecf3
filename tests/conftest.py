"""Shared fixtures. Float64 checks use ``jax.enable_x64(True)`` locally, never globally.

Compilation cache: the suite turns on JAX's persistent compilation cache before JAX is imported,
through environment variables, so this process and every subprocess it starts (the README's
commands, the notebooks' kernels, the 8-device worker, the CLI runs) share one cache and each
program compiles once per run. It lives in ``.pytest_cache/jax-compilation-cache`` (kept between
runs; delete it, or point ``JAX_COMPILATION_CACHE_DIR`` elsewhere, for a cold run). Cached
executables are XLA's own output for the same program, so no result depends on it.

Two workers (pytest-xdist, ``-n 2 --dist loadgroup``, set in ``pyproject.toml``): a module whose
tests share a module-scoped fixture runs on one worker (``pytest_xdist_make_scheduler`` below);
the tests of every other module are scheduled one by one. Units run longest first (``SLOW_TESTS``
below gives the slow tests' costs on 2 cores and marks them ``slow``; a unit's cost is the sum over its
tests), so the two workers finish together.
``-n 0`` runs everything in one process, in the same order.
"""

import functools
import os
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".pytest_cache" / "jax-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # two workers may share one GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402


@functools.lru_cache(maxsize=None)  # read each file once (the scheduler asks per test)
def _shares_a_module_fixture(path: str) -> bool:
    """True if the test file at ``path`` (relative to the repository) defines a module- or
    session-scoped fixture, which its tests share (so they should run in one process)."""
    text = (ROOT / path).read_text()
    return re.search(r"""scope=["'](module|session)["']""", text) is not None


def _unit(nodeid: str) -> str:
    """The scheduling unit of a test: its file if the file shares a fixture, else the test itself."""
    path = nodeid.split("::", 1)[0]
    return path if _shares_a_module_fixture(path) else nodeid


def pytest_xdist_make_scheduler(config, log):
    """Under ``--dist loadgroup``: xdist's scope scheduler with this suite's units (``_unit``).
    (xdist's own ``xdist_group`` marks rename node ids, which pytest 9 no longer allows.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    return UnitScheduling(config, log)


#: The tests that take over ~12 s on 2 CPU cores (one worker, cold compilation cache), marked
#: ``slow(seconds=...)`` here in one place: ``pytest -m "not slow"`` is the quick tier. Keys are
#: node ids without "tests/"; a key without "[" marks every parametrisation. Costs are rough
#: (``--durations`` of 2026-12-07 runs, rounded) and only order the schedule.
SLOW_TESTS = {
    "test_parallel.py::test_worker_saw_eight_devices": 200,  # the 8-device worker (module fixture)
    "test_parallel.py::test_two_processes_prune_and_train_like_one": 35,
    "test_readme.py::test_bash_commands_run_as_written_resnet20_chain": 240,
    "test_readme.py::test_bash_commands_run_as_written_mlp_chain": 60,
    "test_readme.py::test_python_blocks_run_in_order": 130,
    "test_ntk.py::test_empirical_ntk_matches_jacobian_oracle_float64[1-resnet20_bn_eval]": 85,
    "test_ntk.py::test_empirical_ntk_matches_jacobian_oracle_float64[2-resnet20_bn_eval]": 35,
    "test_ntk.py::test_ntk_trace_matches_oracle_float64[resnet20_bn_eval]": 25,
    "test_ntk.py::test_vmap_over_weight_samples": 20,
    "test_ntk.py::test_ntk_gram_whole_and_blocked_match_oracle_float64[resnet20_bn_eval]": 35,
    "test_validate.py::test_empirical_ntk_equals_neural_tangents_float64[resnet20_masked]": 55,
    "test_validate.py::test_cli_validate_resnet20_prints_the_table": 35,
    "test_own_models.py::test_prune_model_on_users_models[flax_examples_resnet-ntksap]": 60,
    "test_own_models.py::test_zero_init_residual_resnet_collapses_only_when_zero_scales_are_kept": 40,
    "test_own_models.py::test_prune_model_on_users_models[linen_vit-ntksap]": 40,
    "test_own_models.py::test_calibrated_statistics_need_no_bn_momentum_field_float64": 28,
    "test_own_models.py::test_linen_and_nnx_twins_give_the_same_ntksap_scores_and_masks": 23,
    "test_own_models.py::test_prune_model_on_users_models[stax_cnn-ntksap]": 21,
    "test_ntksap.py::test_batches_split_like_the_official_data_loader": 35,
    "test_ntksap.py::test_scores_are_abs_of_summed_gradients_zero_on_pruned": 33,
    "test_ntksap.py::test_one_pass_statistics_equal_the_separate_train_mode_pass_float64": 45,
    "test_ntksap.py::test_sample_gradient_freezes_bn_statistics_float64": 23,
    "test_notebooks.py::test_executes_in_quick_mode": 80,
    "test_notebooks.py::test_quickstart_gpu_branch_trains_resnet20_on_cifar10": 20,
    "test_cli.py::test_ntksap_run_writes_masks_and_report": 18,
    "test_cli.py::test_a_second_identical_prune_compiles_nothing": 40,
    "test_baselines.py::test_synflow_resnet20_layer_densities_match_official": 16,
    "test_own_models.py::test_prune_model_on_users_models[flax_examples_resnet-synflow]": 25,
    "test_own_models.py::test_prune_model_on_users_models[linen_vit-synflow]": 15,
    "test_conv.py::test_resnet20_mask_gradient_matches_lax_convolutions": 15,
    "test_own_models.py::test_snip_and_grasp_score_a_model_with_dropout": 12,
    "test_ntksap.py::test_pruning_loop_compiles_the_scorer_once": 12,
    "test_own_models.py::test_prune_model_on_users_models[nnx_cnn-ntksap]": 10,
    "test_analysis.py::test_resnet_spectrum_matches_float64_oracle_and_averages_draws": 10,
    "test_accuracy_studies.py::test_conv_study_quick_run": 45,
}

#: Module fixtures that cost minutes: every test that uses one is slow too (``-m "not slow"`` must
#: not start them), at no extra cost in the schedule (the fixture's cost sits on the test above).
SLOW_FIXTURES = {"test_parallel.py": {"results"}}


def _cost(item) -> float:
    mark = item.get_closest_marker("slow")
    return float(mark.kwargs.get("seconds", 60)) if mark is not None else 0.0


def _mark_slow(item) -> None:
    nodeid = item.nodeid.removeprefix("tests/")
    for key in (nodeid, nodeid.split("[")[0]):
        if key in SLOW_TESTS:
            item.add_marker(pytest.mark.slow(seconds=SLOW_TESTS[key]))
            return
    if SLOW_FIXTURES.get(nodeid.split("::")[0], set()) & set(getattr(item, "fixturenames", ())):
        item.add_marker(pytest.mark.slow(seconds=0))


def pytest_collection_modifyitems(config, items):
    """Group tests that share a module fixture; order the units longest first (see module docstring)."""
    for item in items:
        _mark_slow(item)
    groups, order = {}, []
    for item in items:
        unit = _unit(item.nodeid)
        if unit not in groups:
            groups[unit] = []
            order.append(unit)
        groups[unit].append(item)
    cost = {unit: sum(_cost(i) for i in groups[unit]) for unit in order}
    order.sort(key=lambda u: -cost[u])  # stable: equal costs keep file order
    items[:] = [i for unit in order for i in groups[unit]]


def to_f64(tree):
    """Cast every floating leaf to float64 (Flax makes float32 params even with x64 on)."""
    return jax.tree.map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def official_name_to_ours(name: str) -> str:
    """Official PyTorch ResNet-20 layer name -> our dotted param path.

    ``conv`` -> ``conv.kernel``; ``blocks.3.conv1`` -> ``blocks_3.conv1.kernel``;
    ``blocks.3.shortcut.0`` -> ``blocks_3.shortcut_conv.kernel``; ``fc`` -> ``fc.kernel``.
    """
    if name in ("conv", "fc"):
        return f"{name}.kernel"
    _, index, rest = name.split(".", 2)
    return f"blocks_{index}.{'shortcut_conv' if rest == 'shortcut.0' else rest}.kernel"


def official_bn_stats(model, variables, x):
    """BatchNorm statistics as the official NTK-SAP code leaves them, by hand: a train-mode pass
    (each BatchNorm normalising with its batch's biased variance, Flax momentum 0 = PyTorch
    momentum 1.0), then every running variance made PyTorch's unbiased one (times n/(n-1), n
    the values per channel that BatchNorm saw). Needs a zoo-style model with ``bn_momentum``."""
    import flax.linen as nn

    counts = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.BatchNorm):
            counts[context.module.path] = args[0].size // args[0].shape[-1]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        _, st = model.clone(bn_momentum=0.0).apply(variables, x, train=True, mutable=["batch_stats"])
    st = jax.tree.map(lambda a: a, st["batch_stats"])
    for path, n in counts.items():
        node = st
        for k in path:
            node = node[k]
        node["var"] = node["var"] * n / (n - 1)
    return jax.lax.stop_gradient(st)
