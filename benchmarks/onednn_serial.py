"""oneDNN convolutions one at a time or overlapping: one ResNet-20 NTK-SAP sample step, both ways.

XLA:CPU runs independent custom calls (NTK-SAP's unperturbed and perturbed forward passes) on
several threads at once; each oneDNN call already uses every core through OpenMP. The extension
serialises its calls by default; ``NTKSAP_JAX_ONEDNN_SERIAL=0`` lets them overlap. This script
times the jitted ``ntksap_sample_gradient`` (ResNet-20, 100 Gaussian inputs, the official setting's
step) in fresh processes, alternating the two settings, and prints the medians and their ratio.

Usage::

  python benchmarks/onednn_serial.py [--rounds 3] [--steps 15]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

STEP = r"""
import functools, json, sys, time
import jax
from ntksap_jax import get_model, init_masks, init_model
from ntksap_jax._onednn import available
from ntksap_jax.scores.ntksap import ntksap_sample_gradient
assert available(), "the oneDNN extension is not built"
model = get_model("resnet20", num_classes=10)
variables, _ = init_model(model, (32, 32, 3), seed=0)
masks = init_masks(variables["params"])
step = jax.jit(functools.partial(ntksap_sample_gradient, model, input_shape=(100, 32, 32, 3)))
run = lambda i: jax.block_until_ready(step(variables["params"], masks, variables["batch_stats"], jax.random.key(i)))
run(0)
times = []
for i in range(int(sys.argv[1])):
    t = time.perf_counter(); run(i + 1); times.append(time.perf_counter() - t)
print(json.dumps(times))
"""


def time_steps(serial: bool, steps: int) -> list[float]:
    env = {**os.environ, "NTKSAP_JAX_ONEDNN_SERIAL": "1" if serial else "0"}
    out = subprocess.run([sys.executable, "-c", STEP, str(steps)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="process pairs, alternating (default 3)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per process (default 15)")
    opts = parser.parse_args(argv)
    times = {True: [], False: []}
    for _ in range(opts.rounds):
        for serial in (True, False):
            times[serial] += time_steps(serial, opts.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"one sample step, ResNet-20, 100 inputs: serialised {med[True] * 1e3:.0f} ms, overlapping "
          f"{med[False] * 1e3:.0f} ms (medians of {len(times[True])}); overlapping / serialised "
          f"{med[False] / med[True]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
