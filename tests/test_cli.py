"""The `ntksap-jax prune` command: outputs, refusals and one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ntksap_jax.cli import main


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


BASE = ["prune", "--model", "mlp", "--dataset", "digits", "--method", "magnitude"]


@pytest.mark.parametrize("args,match", [
    (["--model", "resnet99", "--density", "0.1"], "unknown model 'resnet99'; choose one of mlp, lenet300, resnet20"),
    (["--method", "obd", "--density", "0.1"], "unknown method 'obd'; choose one of "),
    (["--density", "0.1", "--distribution", "normal"],
     "unknown --distribution 'normal'; choose one of global, uniform, erk"),
    (["--density", "0.1", "--float64"], "--float64 applies to --method synflow only"),
    (["--dataset", "svhn", "--density", "0.1"], "unknown dataset 'svhn'"),
    (["--density", "0"], r"--density must be in (0, 1]; got 0.0"),
    (["--density", "1.5"], r"--density must be in (0, 1]; got 1.5"),
    (["--sparsity", "1.0"], r"--sparsity must be in [0, 1); got 1.0"),
    (["--density", "0.1", "--sparsity", "0.9"], "not allowed with argument"),
    (["--density", "0.1", "--iterations", "0"], "--iterations must be a positive integer; got 0"),
    (["--density", "0.1", "--estimator", "exact"], "unknown --estimator 'exact'"),
    (["--density", "0.1", "--stem", "cifar"], "--stem applies to resnet18/34/50 only"),
    ([], "one of the arguments --density --sparsity is required"),
])
def test_bad_input_exits_nonzero_with_one_line(tmp_path, capsys, args, match):
    argv = BASE + ["--out", str(tmp_path / "run")] + args
    if "--model" in args:  # replace the base model
        i = argv.index("--model")
        del argv[i:i + 2]
    if "--method" in args:
        i = argv.index("--method")
        del argv[i:i + 2]
    if "--dataset" in args:
        i = argv.index("--dataset")
        del argv[i:i + 2]
    code, out, err = run_cli(argv, capsys)
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("ntksap-jax: error: ") and match in err, err
    assert not (tmp_path / "run").exists()  # nothing created on bad input


def test_refuses_existing_dir_without_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.json").write_text("{}")
    code, _, err = run_cli(BASE + ["--density", "0.5", "--out", str(out)], capsys)
    assert code == 2 and "exists and is not empty; pass --overwrite" in err
    assert (out / "report.json").read_text() == "{}"
    code, _, err = run_cli(BASE + ["--density", "0.5", "--out", str(out), "--overwrite", "--no-progress"], capsys)
    assert code == 0 and json.loads((out / "report.json").read_text())["total_kept"] > 0


def test_unwritable_out_is_refused(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = run_cli(BASE + ["--density", "0.5", "--out", str(blocker / "run")], capsys)
    assert code == 2 and "cannot create --out" in err and err.count("\n") == 1
    code, _, err = run_cli(BASE + ["--density", "0.5", "--out", str(blocker)], capsys)
    assert code == 2 and "exists and is not a folder" in err


def test_read_only_out_is_refused(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("running as root, which ignores permission bits; the unwritable-path case is covered above")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = run_cli(BASE + ["--density", "0.5", "--out", str(ro)], capsys)
        assert code == 2 and "is not writable" in err
    finally:
        ro.chmod(0o700)


def test_ntksap_run_writes_masks_and_report(tmp_path):
    out = tmp_path / "run"
    cmd = [os.path.join(os.path.dirname(sys.executable), "ntksap-jax"), "prune", "--model", "resnet20", "--dataset",
           "cifar10", "--method", "ntksap", "--sparsity", "0.9", "--iterations", "2", "--samples", "1",
           "--num-inputs", "4", "--seed", "0", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "resnet20" and report["method"] == "ntksap"
    assert report["total_prunable"] == 270896
    assert report["total_kept"] == round(0.1 * 270896) == sum(layer["kept"] for layer in report["layers"])
    assert report["density_actual"] == pytest.approx(report["total_kept"] / 270896)
    assert report["density_target"] == pytest.approx(0.1)
    assert report["config"]["iterations"] == 2 and report["config"]["scorer"]["samples"] == 1
    assert report["config"]["scorer"]["eps"] == 0.01
    assert report["seconds"] > 0 and len(report["history"]) == 2
    names = [layer["name"] for layer in report["layers"]]
    assert names[0] == "conv.kernel" and names[-1] == "fc.kernel" and "blocks_3.shortcut_conv.kernel" in names
    for layer in report["layers"]:
        assert set(layer) == {"name", "shape", "total", "kept", "density", "dead_outputs", "effective"}
        assert 0 <= layer["effective"] <= layer["kept"] and 0 <= layer["dead_outputs"] <= layer["shape"][-1]
    with np.load(out / "masks.npz") as data:
        assert sorted(data.files) == sorted(names)
        assert sum(int(data[n].sum()) for n in data.files) == report["total_kept"]
    assert "fc.kernel" in proc.stdout and "target 10.0000%" in proc.stdout
    assert sorted(os.listdir(out)) == ["masks.npz", "report.json"]  # no temp files left
    # The masks load back onto the model's params.
    import jax
    import jax.numpy as jnp
    from ntksap_jax import count_kept, get_model, load_masks

    params = jax.eval_shape(
        lambda: get_model("resnet20", 10).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    )["params"]
    assert count_kept(load_masks(out / "masks.npz", params)) == report["total_kept"]


@pytest.mark.parametrize("method", ["ntksap", "random", "magnitude", "snip", "iterative_snip", "grasp", "synflow"])
def test_every_method_runs_from_the_cli(tmp_path, capsys, method):
    from ntksap_jax import list_scorers

    assert method in list_scorers()
    out = tmp_path / method
    argv = ["prune", "--model", "mlp", "--dataset", "digits", "--method", method, "--density", "0.2",
            "--iterations", "2", "--num-inputs", "20", "--samples", "1", "--out", str(out), "--no-progress"]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == method and report["total_kept"] == round(0.2 * report["total_prunable"])
    assert report["disconnected"] is False and report["collapsed_layers"] == []
    if method in ("snip", "iterative_snip", "grasp"):
        assert "Gaussian inputs with random labels" in err


def test_sanity_flags_are_applied_and_recorded(tmp_path, capsys):
    base = ["prune", "--model", "mlp", "--dataset", "digits", "--method", "magnitude", "--density", "0.3",
            "--no-progress"]
    reports, masks = {}, {}
    for name, flags in {"plain": [], "shuffle": ["--shuffle"], "invert": ["--invert"], "reinit": ["--reinit"],
                        "erk": ["--distribution", "erk"]}.items():
        code, _, err = run_cli(base + ["--out", str(tmp_path / name)] + flags, capsys)
        assert code == 0, err
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
        with np.load(tmp_path / name / "masks.npz") as data:
            masks[name] = {k: data[k] for k in data.files}
    per_layer = lambda r: [layer["kept"] for layer in r["layers"]]  # noqa: E731
    assert per_layer(reports["shuffle"]) == per_layer(reports["plain"])
    assert any(not np.array_equal(masks["shuffle"][k], masks["plain"][k]) for k in masks["plain"])
    assert all(not np.any(masks["invert"][k] & masks["plain"][k]) for k in masks["plain"])  # disjoint at 30%
    assert reports["reinit"]["config"]["init_seed"] != reports["plain"]["config"]["init_seed"]
    for k in masks["plain"]:
        np.testing.assert_array_equal(masks["reinit"][k], masks["plain"][k])
    assert per_layer(reports["erk"]) != per_layer(reports["plain"])


def test_dry_run_prints_the_resolved_plan_and_touches_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    code, stdout, err = run_cli(["prune", "--model", "resnet20", "--sparsity", "0.982", "--out", str(out),
                                 "--dry-run"], capsys)
    assert code == 0, err
    plan = json.loads(stdout)
    # The official CIFAR-10 defaults, resolved without computing anything.
    assert plan["command"] == "prune" and abs(plan["density"] - 0.018) < 1e-12
    assert plan["config"]["iterations"] == 20 and plan["config"]["scorer"]["samples"] == 5
    assert plan["config"]["scorer"]["num_inputs"] == 100 and plan["devices"] == "all"
    assert not out.exists()

    code, stdout, err = run_cli(["run", "--preset", "vgg16-cifar100", "--method", "synflow", "--density", "0.05",
                                 "--epochs", "3", "--devices", "4", "--model-parallel", "2", "--out", str(out),
                                 "--dry-run"], capsys)
    assert code == 0, err
    plan = json.loads(stdout)
    assert plan["train"]["epochs"] == 3 and plan["train"]["milestones"] == [60, 120]
    assert plan["prune"]["config"]["iterations"] == 100 and plan["prune"]["config"]["dataset"] == "cifar100"
    assert (plan["devices"], plan["model_parallel"], plan["dense"]) == (4, 2, True)
    assert not out.exists()


@pytest.mark.parametrize("args,match", [
    (["train", "--preset", "mlp-digits", "--masks", "missing/masks.npz"],
     "mask file 'missing/masks.npz' does not exist"),
    (["train", "--preset", "nope"], "unknown preset"),
    (["run", "--preset", "mlp-digits", "--density", "2"], "--density must be in (0, 1]"),
    (["run", "--preset", "mlp-digits", "--density", "0.1", "--process-id", "1"], "need --distributed"),
    (["train", "--preset", "mlp-digits", "--epochs", "0"], "--epochs must be a positive integer"),
])
def test_dry_run_reports_bad_input(tmp_path, capsys, args, match):
    code, out, err = run_cli(args + ["--out", str(tmp_path / "o"), "--dry-run"], capsys)
    assert code == 2 and match in err, err
    assert not (tmp_path / "o").exists()


def test_dry_run_refuses_a_non_empty_out(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    code, out, err = run_cli(["train", "--preset", "mlp-digits", "--out", str(tmp_path), "--dry-run"], capsys)
    assert code == 2 and "exists and is not empty" in err


@pytest.mark.parametrize("dataset,stem", [("imagenet2012", "imagenet"), ("imagenet", "imagenet"),
                                          ("tiny_imagenet", "cifar"), ("cifar10", "cifar")])
def test_resnet50_gets_the_stem_of_its_data(tmp_path, capsys, dataset, stem):
    """ImageNet-sized data (the loadable `imagenet2012` as well as its shape alias `imagenet`) gets the
    ImageNet stem (7x7 stride-2 conv + max pool); the 32- and 64-pixel sets the CIFAR stem."""
    code, out, err = run_cli(["prune", "--model", "resnet50", "--dataset", dataset, "--density", "0.1",
                              "--out", str(tmp_path / "o"), "--dry-run"], capsys)
    assert code == 0, err
    plan = json.loads(out)
    assert plan["config"]["model_kwargs"] == {"stem": stem}, plan["config"]
    assert plan["config"]["input_shape"] == ([224, 224, 3] if stem == "imagenet" else plan["config"]["input_shape"])


def _cache_free_env(tmp_path, name):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    env["XDG_CACHE_HOME"] = str(tmp_path / name)
    return env, tmp_path / name / "ntksap-jax" / "jax-compilation-cache"


_COUNTING_MAIN = """
import collections, json, sys
from jax import monitoring
counts = collections.Counter()
monitoring.register_event_listener(lambda event, **kwargs: counts.update([event]))
from ntksap_jax.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "requests": counts["/jax/compilation_cache/compile_requests_use_cache"],
                  "hits": counts["/jax/compilation_cache/cache_hits"]}))
"""


def test_a_second_identical_prune_compiles_nothing(tmp_path):
    """Every command keeps XLA's programs in the user's cache folder: JAX's own events say that the second
    identical run found every program it asked for there (hits == requests > 0), i.e. compiled nothing.
    --no-compile-cache and NTKSAP_JAX_COMPILE_CACHE=0 turn it off: no cache folder, and a second run finds
    nothing (JAX counts compile requests even without a cache folder; only hits need one)."""
    argv = ["prune", "--model", "mlp", "--dataset", "digits", "--method", "ntksap", "--density", "0.1",
            "--iterations", "2", "--samples", "1", "--num-inputs", "20", "--out", str(tmp_path / "run"), "--overwrite",
            "--no-progress"]

    def run(env, *extra):
        proc = subprocess.run([sys.executable, "-c", _COUNTING_MAIN, *argv, *extra], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        counts = json.loads(proc.stdout.strip().splitlines()[-1])
        assert counts["code"] == 0, proc.stderr[-2000:]
        return counts

    env, folder = _cache_free_env(tmp_path, "cache")
    first = run(env)
    assert first["requests"] > 0 and first["hits"] == 0 and folder.is_dir(), first
    second = run(env)
    assert second["requests"] == first["requests"] and second["hits"] == second["requests"], (first, second)
    for extra, name in ((["--no-compile-cache"], "off1"), ([], "off2")):
        env, folder = _cache_free_env(tmp_path, name)
        if name == "off2":
            env["NTKSAP_JAX_COMPILE_CACHE"] = "0"
        run(env, *extra)
        counts = run(env, *extra)
        assert counts["requests"] > 0 and counts["hits"] == 0 and not folder.exists(), (name, counts)
