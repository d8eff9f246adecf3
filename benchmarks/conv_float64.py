"""float64 convolutions on CPU: XLA's own against the per-tap weight tangent, compile and run.

``ntksap_jax.conv.conv_general_dilated`` sends float64 convolutions to ``lax`` itself; float32
ones without oneDNN take the per-tap weight tangent (one matmul per kernel tap), which is fast to
run and slow to compile. This script times a float64 ResNet-20 NTK-SAP scorer (``samples``
weight samples of ``num_inputs`` Gaussian inputs, the size of the suite's float64 checks) in fresh
processes with the persistent compilation cache off, alternating the two routes: the first call
(trace, compile, run) and the median of the later calls, plus the largest relative difference of
the two routes' scores (float64 rounding).

Usage::

  python benchmarks/conv_float64.py [--rounds 2] [--calls 5] [--samples 2] [--num-inputs 12]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

RUN = r"""
import json, sys, time
import numpy as np
import jax, jax.numpy as jnp
import ntksap_jax.models.common as common
from ntksap_jax.conv import _taps_conv_general_dilated
route, calls, samples, num_inputs, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
if route == "taps":
    common.conv_general_dilated = _taps_conv_general_dilated  # the zoo's convs, resolved at call time
from ntksap_jax import get_model, init_masks, ntksap_scorer
jax.config.update("jax_enable_x64", True)
model = get_model("resnet20", 10)
v = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(0))
cast = lambda t: jax.tree.map(lambda a: a.astype(jnp.float64), t)
p, bs = cast(v["params"]), cast(v["batch_stats"])
m = init_masks(p)
score = ntksap_scorer(model, (32, 32, 3), samples=samples, num_inputs=num_inputs)
t = time.perf_counter(); s = jax.block_until_ready(score(p, m, bs, jax.random.key(3))); first = time.perf_counter() - t
later = []
for i in range(calls):
    t = time.perf_counter()
    jax.block_until_ready(score(p, m, bs, jax.random.key(3)))
    later.append(time.perf_counter() - t)
np.savez(out, *[np.asarray(x) for x in jax.tree.leaves(s)])
print(json.dumps({"first": first, "later": later}))
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per route (alternating)")
    ap.add_argument("--calls", type=int, default=5, help="timed calls after the first, per process")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--num-inputs", type=int, default=12)
    args = ap.parse_args(argv)
    env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false", "JAX_PLATFORMS": "cpu"}
    got = {"lax": [], "taps": []}
    with tempfile.TemporaryDirectory() as d:
        for _ in range(args.rounds):
            for route in ("lax", "taps"):
                out = os.path.join(d, f"{route}.npz")
                proc = subprocess.run([sys.executable, "-c", RUN, route, str(args.calls), str(args.samples),
                                       str(args.num_inputs), out], env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"{route} run failed:\n{proc.stderr[-3000:]}")
                got[route].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        import numpy as np

        a, b = np.load(os.path.join(d, "lax.npz")), np.load(os.path.join(d, "taps.npz"))
        diff = max(float(np.max(np.abs(a[k] - b[k])) / max(float(np.max(np.abs(a[k]))), 1e-300)) for k in a.files)
    print(f"float64 ResNet-20 NTK-SAP scorer, {args.samples} samples x {args.num_inputs} inputs, "
          f"{args.rounds} fresh processes per route, no compilation cache")
    print("| route | first call s (median) | later calls s (median) |")
    print("|---|---|---|")
    for route, runs in got.items():
        first = statistics.median(x["first"] for x in runs)
        later = statistics.median(t for x in runs for t in x["later"])
        print(f"| {route} | {first:.2f} | {later:.3f} |")
    print(f"largest relative difference of the scores, lax vs taps: {diff:.1e}")


if __name__ == "__main__":
    main()
