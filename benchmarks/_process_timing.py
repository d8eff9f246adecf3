"""Whole-process timing of a prune for ``prune_speed.py``: ours (``ntksap-jax prune``) and, given a checkout
of it, the official NTK-SAP code (``main.py ... --pruner NTKSAP``), each split into phases.

Each side runs in a fresh subprocess under a small driver that records wall-clock times (``time.time()``)
at its phase boundaries and prints them as one ``TIMES {json}`` line; the parent notes the time just
before it starts the process and just after the process exits. Phases:

* ``import``: process start until the code is imported (the interpreter's own start included);
* ``init``: until the first pruning round starts (arguments, model, init, masks, scorer);
* ``first_iteration``: the first round (ours: compiling the scorer, or loading it from the cache);
* ``per_iteration``: the median of the later rounds;
* ``after``: the last round's end until the process exits (ours: report, masks.npz);
* ``total``: the whole process, as the parent saw it.

The official code loads CIFAR-10 through torchvision, which cannot be installed or download here, and it
trains after pruning. Its driver (run by the given Python with ``torch``, in a temp folder, the checkout
on ``sys.path``; nothing of it is copied here) puts a stand-in ``torchvision`` in ``sys.modules`` whose
CIFAR-10 has the real sizes (50,000/10,000 images of 3x32x32) and Gaussian images (NTK-SAP scores on
``randn_like`` of the batch and never looks at them), skips the evaluation of the test set that
``train_eval_loop`` runs before pruning, and exits when ``prune_loop`` returns: the process is the
official pruning, minus torchvision's import and reading CIFAR-10 from disk (both slightly in its favour).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

OUR_DRIVER = r"""
import json, sys, time
times = {}
import ntksap_jax.workflow as workflow
from ntksap_jax.cli import main
times["imported"] = time.time()
rounds = []
real_prune = workflow.prune
def prune(*args, progress=None, **kwargs):
    times["prune_start"] = time.time()
    def tick(t, row):
        rounds.append(time.time())
        if progress is not None:
            progress(t, row)
    return real_prune(*args, progress=tick, **kwargs)
workflow.prune = prune
code = main(sys.argv[1:])
times["rounds"] = rounds
times["end"] = time.time()
print("TIMES " + json.dumps(times), flush=True)
sys.exit(code)
"""

OFFICIAL_DRIVER = r"""
import json, os, sys, time, types
checkout = sys.argv[1]
sys.argv = [os.path.join(checkout, "main.py")] + sys.argv[2:]
sys.path.insert(0, checkout)
times = {}
import torch

class GaussianCIFAR(torch.utils.data.Dataset):
    # CIFAR's sizes, Gaussian 3x32x32 images (NTK-SAP scores on randn_like of the batch), labels i % classes.
    classes = 10
    def __init__(self, root, train=True, download=False, transform=None, target_transform=None):
        self.n = 50000 if train else 10000
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(int(i))
        return torch.randn(3, 32, 32, generator=g), int(i) % self.classes

class GaussianCIFAR100(GaussianCIFAR):
    classes = 100

def _no_data(*args, **kwargs):
    raise RuntimeError("the timing harness stands in for CIFAR-10/100 only")

class _Transform:
    def __init__(self, *args, **kwargs):
        pass
    def __call__(self, x):
        return x

tv = types.ModuleType("torchvision")
tv.datasets = types.ModuleType("torchvision.datasets")
tv.transforms = types.ModuleType("torchvision.transforms")
tv.datasets.CIFAR10, tv.datasets.CIFAR100 = GaussianCIFAR, GaussianCIFAR100
tv.datasets.MNIST = tv.datasets.ImageFolder = _no_data
tv.datasets.utils = types.SimpleNamespace(download_and_extract_archive=_no_data)
for name in ("Compose", "ToTensor", "Normalize", "RandomCrop", "RandomHorizontalFlip", "RandomResizedCrop",
             "Resize", "CenterCrop"):
    setattr(tv.transforms, name, _Transform)
sys.modules.update({"torchvision": tv, "torchvision.datasets": tv.datasets, "torchvision.transforms": tv.transforms})

import pandas as pd
import prune as official_prune
import train as official_train
from Pruners import pruners

def no_eval(*args, **kwargs):  # the test-set evaluation before pruning: not pruning
    return pd.DataFrame([[float("nan")] * 4], columns=["train_loss", "test_loss", "top1_accuracy", "top5_accuracy"])
official_train.train_eval_loop = no_eval

rounds = []
real_loop, real_mask = official_prune.prune_loop, pruners.Pruner.mask
def mask(self, *args, **kwargs):
    out = real_mask(self, *args, **kwargs)
    rounds.append(time.time())
    return out
pruners.Pruner.mask = mask
def prune_loop(*args, **kwargs):
    times["prune_start"] = time.time()
    real_loop(*args, **kwargs)
    times.update(rounds=rounds, end=time.time(), threads=torch.get_num_threads(), torch=torch.__version__)
    print("TIMES " + json.dumps(times), flush=True)
    sys.stdout.flush()
    os._exit(0)
official_prune.prune_loop = prune_loop
from Experiments import singleshot  # noqa: its `from prune import *` takes the timed loop
times["imported"] = time.time()
import runpy
runpy.run_path(sys.argv[0], run_name="__main__")
raise SystemExit("main.py returned without pruning")
"""


def phases(t0: float, t_exit: float, times: dict) -> dict:
    """Seconds of each phase from the driver's wall-clock ``times`` and the parent's start/exit times."""
    rounds = times["rounds"]
    later = [b - a for a, b in zip(rounds, rounds[1:])]
    return {
        "import": times["imported"] - t0,
        "init": times["prune_start"] - times["imported"],
        "first_iteration": rounds[0] - times["prune_start"],
        "per_iteration": statistics.median(later) if later else float("nan"),
        "iterations": len(rounds),
        "after": t_exit - rounds[-1],
        "total": t_exit - t0,
    }


def _run(cmd: list, env: dict, cwd: str | None = None) -> dict:
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    t_exit = time.time()
    rows = [line[6:] for line in proc.stdout.splitlines() if line.startswith("TIMES ")]
    if proc.returncode or not rows:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    times = json.loads(rows[-1])
    out = phases(t0, t_exit, times)
    out.update({k: times[k] for k in ("threads", "torch") if k in times})
    return out


def time_ours(prune_args: list, cache_dir: str) -> dict:
    """One ``ntksap-jax prune`` process with the CLI's own compilation cache in ``cache_dir``
    (``XDG_CACHE_HOME``; a ``JAX_COMPILATION_CACHE_DIR`` or ``JAX_PERSISTENT_CACHE_*`` of ours is dropped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT"))}
    env["XDG_CACHE_HOME"] = cache_dir
    with tempfile.TemporaryDirectory() as out:
        return _run([sys.executable, "-c", OUR_DRIVER, "prune", *prune_args, "--out", out, "--overwrite",
                     "--no-progress"], env)


def time_official(checkout: str, python: str, *, iterations: int, samples: int, compression: float,
                  seed: int = 0) -> dict:
    """The official ``main.py`` NTK-SAP pruning of ResNet-20 on (stand-in) CIFAR-10, as in its
    ``scripts/run.sh`` (``--prune-train-mode True``, ``--ntksap_R``, 0.8**compression), run by ``python``."""
    checkout = os.path.abspath(checkout)
    if not os.path.isfile(os.path.join(checkout, "main.py")):
        return {"error": f"{checkout} has no main.py (a checkout of the official NTK-SAP code?)"}
    argv = ["--dataset", "cifar10", "--model", "resnet20", "--model-class", "lottery", "--pruner", "NTKSAP",
            "--experiment", "singleshot", "--prune-epochs", str(iterations), "--ntksap_R", str(samples),
            "--compression", str(compression), "--prune-train-mode", "True", "--pre-epochs", "0",
            "--post-epochs", "0", "--seed", str(seed)]
    with tempfile.TemporaryDirectory() as cwd:
        return _run([python, "-c", OFFICIAL_DRIVER, checkout, *argv], dict(os.environ), cwd=cwd)
