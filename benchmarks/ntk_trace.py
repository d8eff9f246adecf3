"""Exact NTK trace: ``ntksap_jax.ntk_trace`` vs neural-tangents' kernel followed by a trace.

For each model and batch size ``N`` (Gaussian inputs, BatchNorm statistics calibrated on the
batch and fixed, i.e. the eval-mode per-example kernel), every method computes
``tr Θ(x, x) = ‖J‖²_F`` inside one ``jax.jit``:

* ``ours``: :func:`ntksap_jax.ntk_trace` (one ``vjp``, ``vmap`` over the ``N·K`` one-hot cotangents,
  only squared norms kept; no Gram matrix);
* ``ours_per_example``: ``ntk_trace`` on one example at a time, summed in a Python loop
  (valid for per-example models such as eval-mode BatchNorm; ``N`` times fewer FLOPs, since a
  whole-batch cotangent that is one-hot on one example still runs the whole batch backward);
* ``nt_jc_full`` / ``nt_nvp_full``: neural-tangents ``empirical_ntk_fn(f, trace_axes=(),
  vmap_axes=0, implementation=JACOBIAN_CONTRACTION / NTK_VECTOR_PRODUCTS)`` -> ``(N, N, K, K)``,
  then ``einsum("iiaa->")``;
* ``nt_jc_traced`` / ``nt_nvp_traced``: the same with ``trace_axes=(-1,)`` -> ``(N, N)``, whose
  trace is *averaged* over the ``K`` outputs, so it is multiplied by ``K``.

(``STRUCTURED_DERIVATIVES`` and ``AUTO`` do not run on this JAX; see
``ntksap_jax._compat.neural_tangents``.)

Columns: compile seconds (``lower().compile()``), median seconds per call over ``--repeats``
calls after one warm-up call, peak memory of the compiled executable from XLA's
``memory_analysis()`` (arguments + outputs + temporaries − aliases; deterministic, per function;
for the per-example loop, the one-example executable), the trace's relative
difference from ``ours``, and the ratios theirs / ours of run time and peak memory, measured in
this one run. ``--rss`` adds the peak resident set size of a fresh subprocess per row (slow).

    python benchmarks/ntk_trace.py                              # MLP and ResNet-20, default batches (~5-8 min, 2 cores)
    python benchmarks/ntk_trace.py --models mlp --batches 8 32  # one model, chosen batches
    python benchmarks/ntk_trace.py --json /tmp/ntk_trace.json --rss

Timings are of this machine in this run; compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

DEFAULT_BATCHES = {"mlp": [8, 32, 64], "resnet20": [2, 4, 8]}
SHAPES = {"mlp": (28, 28, 1), "resnet20": (32, 32, 3)}
METHODS = {  # id -> label in the table
    "ours": "ours: ntk_trace",
    "ours_per_example": "ours: Σ per-example ntk_trace",
    "nt_jc_full": "nt JC, full kernel",
    "nt_nvp_full": "nt NVP, full kernel",
    "nt_jc_traced": "nt JC, trace_axes=(-1,) × K",
    "nt_nvp_traced": "nt NVP, trace_axes=(-1,) × K",
}


def setup(model_name: str, n: int, seed: int = 0):
    """``(f, params, x, K)``: eval-mode ``f(params, x)`` with BN statistics calibrated on ``x``."""
    import jax
    import jax.numpy as jnp

    from ntksap_jax import get_model
    from ntksap_jax.model import calibrated_batch_stats, masked_apply_fn

    model = get_model(model_name, 10)
    shape = SHAPES[model_name]
    key = jax.random.key(seed)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, *shape), jnp.float32), train=False))(
        jax.random.fold_in(key, 0))
    params = variables["params"]
    x = jax.random.normal(jax.random.fold_in(key, 1), (n, *shape), jnp.float32)
    stats = jax.jit(lambda p, s, xb: calibrated_batch_stats(model, p, None, s, xb))(
        params, variables.get("batch_stats"), x
    )
    return masked_apply_fn(model, None, stats), params, x, 10


def make_fn(method: str, f, k: int):
    """``fn(params, x) -> scalar trace`` for a method (not yet jitted)."""
    import jax.numpy as jnp

    from ntksap_jax import ntk_trace

    if method in ("ours", "ours_per_example"):
        return lambda p, x: ntk_trace(f, p, x)
    from ntksap_jax.validate import import_neural_tangents

    nt = import_neural_tangents()
    impl = nt.NtkImplementation.JACOBIAN_CONTRACTION if "_jc_" in method else nt.NtkImplementation.NTK_VECTOR_PRODUCTS
    if method.endswith("full"):
        kernel_fn = nt.empirical_ntk_fn(f, trace_axes=(), vmap_axes=0, implementation=impl)
        return lambda p, x: jnp.einsum("iiaa->", kernel_fn(x, None, p))  # (N, N, K, K)
    kernel_fn = nt.empirical_ntk_fn(f, trace_axes=(-1,), vmap_axes=0, implementation=impl)
    return lambda p, x: jnp.trace(kernel_fn(x, None, p)) * k  # (N, N), averaged over the K outputs


def peak_bytes(compiled) -> int:
    """Arguments + outputs + temporaries − aliased bytes of a compiled executable.

    (``peak_memory_in_bytes`` exists in jax 0.10 but on XLA:CPU it counts arguments and outputs
    only, not temporaries: 2.7 MB for an ``ntk_trace`` with 128 MB of temporaries.)
    """
    m = compiled.memory_analysis()
    return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def measure(method: str, f, params, x, k: int, repeats: int) -> dict:
    import jax

    fn = make_fn(method, f, k)
    per_example = method == "ours_per_example"
    xin = x[:1] if per_example else x
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(params, xin).compile()
    compile_s = time.perf_counter() - t0

    def call():
        if per_example:
            return sum(float(compiled(params, x[i : i + 1])) for i in range(x.shape[0]))
        return float(compiled(params, x))  # float() waits for the result

    value = call()  # warm-up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        runs.append(time.perf_counter() - t0)
    return {"method": method, "trace": value, "compile_s": compile_s, "run_s": statistics.median(runs),
            "runs_s": runs, "peak_bytes": peak_bytes(compiled)}


def child_rss(model_name: str, n: int, method: str, repeats: int) -> float:
    """``(peak, baseline)`` RSS in GB of a fresh process that sets up, compiles and runs one method.

    The baseline is the peak after imports (neural-tangents included), model set-up and inputs.
    """
    out = subprocess.run([sys.executable, __file__, "--child", model_name, str(n), method, "--repeats", str(repeats)],
                         capture_output=True, text=True, check=True)
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    return rss["peak_rss_gb"], rss["baseline_rss_gb"]


def _peak_rss_gb() -> float:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


def table(rows: list, rss: bool) -> str:
    head = ("| model | N | method | compile s | run s (median) | peak MB | rel. diff vs ours | time theirs/ours "
            "| memory theirs/ours |")
    sep = "|---|---|---|---|---|---|---|---|---|"
    if rss:
        head += " peak RSS GB (after set-up) |"
        sep += "---|"
    lines = [head, sep]
    for r in rows:
        line = (f"| {r['model']} | {r['n']} | {METHODS[r['method']]} | {r['compile_s']:.1f} | {r['run_s']:.4f} | "
                f"{r['peak_bytes'] / 2**20:.1f} | {r['rel_diff']:.1e} | {r['time_ratio']:.2f} | "
                f"{r['memory_ratio']:.2f} |")
        if rss:
            line += f" {r['peak_rss_gb']:.2f} ({r['baseline_rss_gb']:.2f}) |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["mlp", "resnet20"], choices=list(SHAPES))
    p.add_argument("--batches", type=int, nargs="+", default=None,
                   help=f"batch sizes for every model (default per model: {DEFAULT_BATCHES})")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                   help="the first is the reference of the ratios (default: all, ours first)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per method (after one warm-up call)")
    p.add_argument("--rss", action="store_true", help="also peak RSS of a fresh subprocess per row (slow)")
    p.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    p.add_argument("--child", nargs=3, metavar=("MODEL", "N", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        model_name, n, method = args.child
        f, params, x, k = setup(model_name, int(n))
        make_fn(method, f, k)  # imports neural-tangents where used
        baseline = _peak_rss_gb()
        measure(method, f, params, x, k, args.repeats)
        print(json.dumps({"peak_rss_gb": _peak_rss_gb(), "baseline_rss_gb": baseline}))
        return 0

    import jax

    start = time.perf_counter()
    rows = []
    for model_name in args.models:
        for n in args.batches or DEFAULT_BATCHES[model_name]:
            f, params, x, k = setup(model_name, n)
            ours = None
            for method in args.methods:
                r = {"model": model_name, "n": n, **measure(method, f, params, x, k, args.repeats)}
                if ours is None:  # the first method is the reference ("ours" unless --methods says otherwise)
                    ours = r
                r["rel_diff"] = abs(r["trace"] - ours["trace"]) / abs(ours["trace"])
                r["time_ratio"] = r["run_s"] / ours["run_s"]
                r["memory_ratio"] = r["peak_bytes"] / ours["peak_bytes"]
                if args.rss:
                    r["peak_rss_gb"], r["baseline_rss_gb"] = child_rss(model_name, n, method, args.repeats)
                rows.append(r)
                print(f"{model_name} N={n} {method}: compile {r['compile_s']:.1f} s, run {r['run_s']:.4f} s, "
                      f"peak {r['peak_bytes'] / 2**20:.1f} MB", file=sys.stderr, flush=True)
    wall = time.perf_counter() - start
    print(f"Exact NTK trace, float32, K = 10 outputs, Gaussian inputs, BN eval mode with calibrated statistics; "
          f"ratios are theirs / ours (\"{METHODS[args.methods[0]]}\") in this run; {args.repeats} timed calls.\n")
    print(table(rows, args.rss))
    print(f"\nwall time {wall:.0f} s, backend {jax.default_backend()}, jax {jax.__version__}, {platform.machine()}")
    if args.json:
        from ntksap_jax._io import atomic_write_text

        report = {"benchmark": "ntk_trace", "args": vars(args), "wall_seconds": wall, "rows": rows}
        atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
