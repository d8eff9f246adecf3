"""Peak memory of one NTK-SAP weight sample at ImageNet scale, whole batch against micro-batches.

Compiles (never runs) one NTK-SAP sample step, ``ntksap_sample_gradient`` for ResNet-50 at
224x224, float32, on a batch of 256 Gaussian inputs (the official ImageNet setting's batch), with
``micro_batch=None`` (the whole batch at once) and with micro-batches, and records XLA's own
``compiled.memory_analysis()``: temporaries, arguments, outputs and aliases, ``peak = temp +
arguments`` (the issue's measure) and ``total = temp + arguments + outputs − aliases``. The params
are abstract (``jax.eval_shape``): nothing is allocated, so this runs on a laptop's CPU (about
a minute or two of compilation per size). XLA:CPU's buffer assignment is not a GPU's or a TPU's,
but the activations it must keep live are the same.

Writes ``benchmarks/results/imagenet_memory.json`` and ``.md``.

    python benchmarks/imagenet_memory.py --micro-batches 0 64 32 16
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
GB = 1e9


def measure(model, shape, micro_batch: int | None, estimator: str) -> dict:
    import jax
    import jax.numpy as jnp

    from ntksap_jax import init_masks
    from ntksap_jax.scores.ntksap import ntksap_sample_gradient

    v = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, *shape[1:]))), jax.random.key(0))
    params, batch_stats = v["params"], v["batch_stats"]
    masks = jax.eval_shape(init_masks, params)
    key = jax.eval_shape(lambda: jax.random.key(0))

    def step(p, m, bs, k):
        return ntksap_sample_gradient(model, p, m, bs, k, shape, estimator=estimator, micro_batch=micro_batch)

    t0 = time.perf_counter()
    compiled = jax.jit(step).lower(params, masks, batch_stats, key).compile()
    m = compiled.memory_analysis()
    temp, arg, out, alias = (int(m.temp_size_in_bytes), int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                             int(m.alias_size_in_bytes))
    return {"micro_batch": micro_batch, "estimator": estimator, "temp_bytes": temp, "argument_bytes": arg,
            "output_bytes": out, "alias_bytes": alias, "peak_bytes": temp + arg,
            "total_bytes": temp + arg + out - alias, "compile_s": round(time.perf_counter() - t0, 1)}


def markdown(report: dict) -> str:
    lines = [f"ResNet-50, {report['shape'][1]}x{report['shape'][2]}, batch {report['shape'][0]}, {report['dtype']}, "
             f"one `ntksap_sample_gradient` compiled on {report['backend']} (jax {report['jax']}); "
             "peak = temp + arguments, total = temp + arguments + outputs − aliases (GB = 1e9 bytes); "
             "compile seconds on a shared CPU, indicative only.", "",
             "| estimator | micro-batch | temp GB | arguments GB | outputs GB | peak GB | total GB | compile s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        mb = "whole batch" if r["micro_batch"] is None else str(r["micro_batch"])
        lines.append(f"| {r['estimator']} | {mb} | {r['temp_bytes'] / GB:.2f} | {r['argument_bytes'] / GB:.2f} | "
                     f"{r['output_bytes'] / GB:.2f} | {r['peak_bytes'] / GB:.2f} | {r['total_bytes'] / GB:.2f} | "
                     f"{r['compile_s']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[0, 64, 32, 16],
                        help="micro-batch sizes to compile; 0 is the whole batch (default 0 64 32 16)")
    parser.add_argument("--batch", type=int, default=256, help="Gaussian inputs per weight sample (default 256)")
    parser.add_argument("--resolution", type=int, default=224, help="image side (default 224)")
    parser.add_argument("--estimators", nargs="+", default=["finite_difference"],
                        help="finite_difference (official, default) and/or jvp")
    parser.add_argument("--out", default="imagenet_memory", help="results file stem under benchmarks/results")
    args = parser.parse_args(argv)

    import jax

    from _report import write_report
    from ntksap_jax import get_model

    model = get_model("resnet50", 1000)
    shape = (args.batch, args.resolution, args.resolution, 3)
    rows = []
    for estimator in args.estimators:
        for mb in args.micro_batches:
            rows.append(measure(model, shape, mb or None, estimator))
            print(rows[-1], flush=True)
    report = {"model": "resnet50", "shape": list(shape), "dtype": "float32", "backend": jax.default_backend(),
              "jax": jax.__version__, "rows": rows}
    print(write_report(RESULTS / args.out, report, markdown))


if __name__ == "__main__":
    main()
