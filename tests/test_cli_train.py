"""`ntksap-jax train` and `ntksap-jax run`: outputs, the init a mask is trained from, one-line errors."""

import json

import jax
import numpy as np
import pytest

from ntksap_jax.cli import main


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_run_prunes_then_trains_pruned_and_dense(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["run", "--preset", "mlp-digits", "--method", "magnitude", "--density", "0.1",
                                 "--epochs", "3", "--seed", "2", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    assert "| dense | 1.0000 | 3 |" in stdout and "| magnitude pruned | 0.1000 | 3 |" in stdout
    summary = json.loads((out / "run_report.json").read_text())
    assert summary["preset"] == "mlp-digits" and summary["seed"] == 2
    for label in ("dense", "magnitude pruned"):
        assert 0.5 < summary["results"][label]["test_top1"] <= 1.0
    for sub in ("dense", "pruned"):
        rows = [json.loads(line) for line in (out / sub / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [1, 2, 3]
        assert rows[-1]["test_count"] == 360  # every test image, once
    # The pruned network was trained from the init the mask was pruned on: magnitude keeps the largest
    # |θ₀|, so the kept weights of the last checkpoint started from exactly those (an independent check
    # through the init: re-create θ₀ with the CLI's seed convention and compare the kept set).
    from ntksap_jax import get_model, load_masks
    from ntksap_jax.masks import count_kept

    model = get_model("mlp", 10)
    init_key, _ = jax.random.split(jax.random.key(2))
    params0 = jax.jit(lambda k: model.init(k, np.zeros((1, 8, 8, 1), np.float32)))(init_key)["params"]
    masks = load_masks(out / "masks.npz", params0)
    k = count_kept(masks)
    mags = np.concatenate([np.abs(np.asarray(params0[n]["kernel"])).ravel() for n in sorted(params0)])
    kept_mags = np.concatenate([np.abs(np.asarray(params0[n]["kernel"]))[np.asarray(masks[n]["kernel"]) > 0]
                                for n in sorted(params0)])
    assert kept_mags.min() >= np.sort(mags)[-k]  # the k largest of θ₀


def test_train_takes_the_init_seed_from_the_mask_report_and_resumes(tmp_path, capsys):
    prune_dir = tmp_path / "p"
    assert main(["prune", "--model", "mlp", "--dataset", "digits", "--method", "random", "--density", "0.2",
                 "--seed", "5", "--out", str(prune_dir), "--no-progress"]) == 0
    out = tmp_path / "t"
    code, stdout, err = run_cli(["train", "--preset", "mlp-digits", "--masks", str(prune_dir / "masks.npz"),
                                 "--epochs", "2", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    report = json.loads((out / "train_report.json").read_text())
    assert report["seed"] == 5 and report["label"] == "pruned" and report["epochs_done"] == 2
    assert "| pruned | 0.2000 | 2 |" in stdout
    # Resuming a finished run continues nothing and keeps one line per epoch.
    code, _, err = run_cli(["train", "--preset", "mlp-digits", "--masks", str(prune_dir / "masks.npz"),
                            "--epochs", "2", "--out", str(out), "--resume", "--no-progress"], capsys)
    assert code == 0, err
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    # Without --resume or --overwrite an existing run is refused.
    code, _, err = run_cli(["train", "--preset", "mlp-digits", "--epochs", "1", "--out", str(out)], capsys)
    assert code == 2 and "pass --overwrite" in err


@pytest.mark.parametrize("argv,match", [
    (["train", "--preset", "mlp-imagenet"], "unknown preset 'mlp-imagenet'"),
    (["run", "--preset", "nope", "--density", "0.1"], "unknown preset 'nope'"),
    (["train", "--preset", "mlp-digits", "--epochs", "0"], "--epochs must be a positive integer; got 0"),
    (["run", "--preset", "mlp-digits", "--density", "1.5"], "--density must be in (0, 1]"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, match):
    code, _, err = run_cli(argv + ["--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err.count("\n") == 1 and match in err, err


def test_missing_data_set_names_what_to_download(tmp_path, capsys):
    code, _, err = run_cli(["train", "--preset", "resnet20-cifar10", "--data-dir", str(tmp_path / "tfds"),
                            "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err.count("\n") == 1 and "--data-dir" in err and "cifar10" in err, err


def test_mask_for_another_model_is_refused(tmp_path, capsys):
    prune_dir = tmp_path / "p"
    assert main(["prune", "--model", "lenet300", "--dataset", "mnist5k", "--method", "random", "--density", "0.5",
                 "--out", str(prune_dir), "--no-progress"]) == 0
    capsys.readouterr()
    code, _, err = run_cli(["train", "--preset", "mlp-digits", "--masks", str(prune_dir / "masks.npz"),
                            "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err.count("\n") == 1 and "pruned for model 'lenet300'" in err, err
    (prune_dir / "report.json").unlink()  # without the report, the shapes still give it away
    code, _, err = run_cli(["train", "--preset", "mlp-digits", "--masks", str(prune_dir / "masks.npz"),
                            "--out", str(tmp_path / "o2")], capsys)
    assert code == 2 and err.count("\n") == 1 and "preset mlp-digits" in err, err
