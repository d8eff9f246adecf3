"""A small accuracy study: prune at initialization, train, report test top-1 vs density.

For each method (NTK-SAP, SynFlow, SNIP, GraSP, magnitude, random), density ``0.8^k`` and seed,
the network of the data set's preset (``mlp-digits``, ``lenet300-mnist5k``) is initialised with
:func:`ntksap_jax.steps.init_model`, pruned from that init with the prune key it returns, and the
masked init is trained with the preset's settings. The dense network is trained once per seed as
the reference. Writes, per data set, to ``--out-dir``:

* ``accuracy_small_<dataset>.md``: rows methods, columns densities, cells mean ± std of the
  final test top-1 (%) over the seeds, the dense row, and a footer (machine, epochs, wall time);
* ``accuracy_small_<dataset>.json``: every run's numbers (per seed), the configuration and the
  environment;
* ``accuracy_small_<dataset>.png``: accuracy vs density (log x), one line per method with
  std error bars, dense as a horizontal line.

All three are rewritten (atomically) after each method, so a long run can be read while it goes.
Progress lines go to stderr. The machinery is shared with ``accuracy_conv.py``
(``benchmarks/_accuracy.py``, ``_accuracy_run.py``).

    python benchmarks/accuracy_small.py --quick --out-dir /tmp/acc   # smoke run: 1 seed, k 4/12/20, 5 epochs
    python benchmarks/accuracy_small.py --datasets digits            # the full study on digits
    nohup python benchmarks/accuracy_small.py > /tmp/accuracy_small.log 2>&1 &

Pruning rounds: NTK-SAP the preset's ``ntksap_iterations`` (T = 20, R = 1, 100 Gaussian inputs),
SynFlow 100 (official), SNIP, GraSP, magnitude and random 1 (one-shot, as the official code).
SNIP and GraSP score on a real labelled batch: the first ``10 × classes`` training examples of
``train_batches(10 × classes, seed=seed, epoch=0)``.
"""

from __future__ import annotations

import sys

from _accuracy import PRESET_T, Study, Variant

STUDY = Study(
    name="accuracy_small",
    settings={"digits": "mlp-digits", "mnist5k": "lenet300-mnist5k"},
    variants={
        "ntksap": Variant("NTK-SAP", "ntksap", PRESET_T),
        "synflow": Variant("SynFlow", "synflow", 100),
        "snip": Variant("SNIP", "snip"),
        "grasp": Variant("GraSP", "grasp"),
        "magnitude": Variant("magnitude", "magnitude"),
        "random": Variant("random", "random"),
    },
    quick={"seeds": [0], "ks": [4, 12, 20], "epochs": 5},
    full={"seeds": [0, 1, 2], "ks": [4, 8, 12, 16, 20], "epochs": None},  # epochs None: the preset's
)


if __name__ == "__main__":
    from _accuracy_run import main

    sys.exit(main(STUDY, __doc__))
