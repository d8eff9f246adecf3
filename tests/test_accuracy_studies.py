"""The accuracy studies of ``benchmarks/`` (``accuracy_small.py``, ``accuracy_conv.py``): the paired
comparison on a hand-made record, and a quick run of the conv study end to end (files, counts, checks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import _accuracy  # noqa: E402


def _record(accs: dict) -> dict:
    """A minimal study record: ``accs[(method, k, seed)] = test_top1``."""
    return {"config": {"reference": "ntksap", "methods": ["ntksap", "px", "random"], "ks": [5, 10],
                       "seeds": [0, 1, 2], "labels": {"ntksap": "NTK-SAP", "px": "PX"}},
            "runs": [{"method": m, "k": k, "seed": s, "test_top1": a} for (m, k, s), a in accs.items()]}


def test_paired_table_counts_wins_ties_losses_per_density():
    accs = {("ntksap", k, s): 0.9 for k in (5, 10) for s in (0, 1, 2)}
    accs.update({("px", 5, 0): 0.95, ("px", 5, 1): 0.9, ("px", 5, 2): 0.85,   # 1-1-1
                 ("px", 10, 0): 0.91, ("px", 10, 1): 0.92, ("px", 10, 2): 0.93,  # 3-0-0
                 ("random", 5, 0): 0.1})  # one seed only: 0-0-1, the other density has no run
    table = _accuracy.paired_table(_record(accs))
    assert "| PX | 1-1-1 | 3-0-0 | 4-1-1 |" in table
    assert "| random | 0-0-1 | — | 0-0-1 |" in table
    assert "| NTK-SAP |" not in table  # the reference is not compared with itself
    assert _accuracy.paired_table({**_record(accs), "runs": []}) == ""


def test_conv_study_quick_run(tmp_path):
    """``accuracy_conv.py --quick`` (2 epochs) on three methods and one density: every output written and consistent."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "accuracy_conv.py"), "--quick", "--models", "lenet5",
           "--methods", "ntksap", "px", "random_erk", "--ks", "15", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stem = tmp_path / "accuracy_conv_lenet5"
    assert {p.name for p in tmp_path.iterdir()} == {stem.name + ext for ext in (".json", ".md", ".png")}
    record = json.loads(stem.with_suffix(".json").read_text())
    assert record["complete"] and record["setting"] == "lenet5" and record["dataset"] == "mnist5k"
    runs = {r["method"]: r for r in record["runs"]}
    assert sorted(runs) == ["ntksap", "px", "random_erk"] and len(record["runs"]) == 3 and len(record["dense"]) == 1
    assert record["config"]["iterations"] == {"ntksap": 20, "px": 100, "random_erk": 1}
    assert record["config"]["prune_batch"] == 100 and record["config"]["data_methods"] == ["px"]
    total = 150 + 2400 + 48000 + 10080 + 840
    for method, r in runs.items():
        assert r["total"] == total and r["pruned_weights_zero"]
        if method != "random_erk":  # one global ranking keeps exactly round(d N); ERK rounds per layer
            assert r["kept"] == round(0.8 ** 15 * total)
    erk = {row["name"]: row["kept"] / row["total"] for row in runs["random_erk"]["layers"]}
    assert erk["conv1.kernel"] > erk["dense_0.kernel"]  # ERK keeps small layers denser
    table = stem.with_suffix(".md").read_text()
    assert table == proc.stdout.strip() + "\n"
    assert "| PX | " in table and "| random (ERK) | " in table and "Paired with NTK-SAP (fd)" in table
    replot = subprocess.run(cmd[:2] + ["--replot", "--models", "lenet5", "--out-dir", str(tmp_path)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert replot.returncode == 0 and stem.with_suffix(".md").read_text() == table
