"""A convolutional accuracy study on real images: prune at initialization, train, test top-1 vs density.

LeNet-5 (``lenet5-mnist5k``) and a narrow ResNet-20 (width 8, ``resnet20-narrow-mnist5k``) on the
offline 5,000-image MNIST subset (4,000 train / 1,000 test, 28x28x1). Ten methods: NTK-SAP with
the finite-difference and the jvp estimator (T = the preset's 20 rounds, R = 1), PX, SynFlow and
iterative SNIP (100 rounds each, official), SNIP, GraSP, magnitude, random (one global ranking:
about the same density in every layer) and random with ERK layer densities (one-shot). The
data-driven methods (PX, SNIP, iterative SNIP, GraSP) score a class-balanced batch of 10 images
per class drawn with the seed (``ntksap_jax.data.balanced``). Densities ``0.8^k``, k in
{5, 10, 15, 20, 25}; 3 seeds; each seed's mask is pruned from the seed's ``init_model`` init and
trained from it with the preset's settings (data order seed = init seed); the dense network is
trained once per seed. Writes, per model, to ``--out-dir``:

* ``accuracy_conv_<model>.md``: mean ± std of the final test top-1 (%) per method and density,
  and the paired comparison with NTK-SAP (finite difference): per density, the seeds where a
  method's accuracy is above, equal to or below NTK-SAP's (wins-ties-losses);
* ``accuracy_conv_<model>.json``: every run, the configuration and the environment;
* ``accuracy_conv_<model>.png``: accuracy vs density, one line per method.

All three are rewritten (atomically) after each method. Progress lines go to stderr.

    python benchmarks/accuracy_conv.py --quick --models lenet5 --out-dir /tmp/conv   # 1 seed, 2 densities
    nohup nice -n 19 python benchmarks/accuracy_conv.py --models lenet5 > /tmp/conv.log 2>&1 &
"""

from __future__ import annotations

import sys

from _accuracy import PRESET_T, Study, Variant

STUDY = Study(
    name="accuracy_conv",
    settings={"lenet5": "lenet5-mnist5k", "resnet20narrow": "resnet20-narrow-mnist5k"},
    variants={
        "ntksap": Variant("NTK-SAP (fd)", "ntksap", PRESET_T),
        "ntksap_jvp": Variant("NTK-SAP (jvp)", "ntksap", PRESET_T, {"estimator": "jvp"}),
        "px": Variant("PX", "px", 100),
        "synflow": Variant("SynFlow", "synflow", 100),
        "snip": Variant("SNIP", "snip"),
        "iterative_snip": Variant("iterative SNIP", "iterative_snip", 100),
        "grasp": Variant("GraSP", "grasp"),
        "magnitude": Variant("magnitude", "magnitude"),
        "random": Variant("random", "random"),
        "random_erk": Variant("random (ERK)", "random", 1, distribution="erk"),
    },
    quick={"seeds": [0], "ks": [10, 20], "epochs": 2},
    full={"seeds": [0, 1, 2], "ks": [5, 10, 15, 20, 25], "epochs": None},  # epochs None: the preset's
    setting_option="--models",
    balanced=True,
    reference="ntksap",
)


if __name__ == "__main__":
    from _accuracy_run import main

    sys.exit(main(STUDY, __doc__))
