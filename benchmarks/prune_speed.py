"""Seconds per NTK-SAP pruning iteration, compile seconds and peak RSS, printed as JSON.

Default: ResNet-20 at the official setting (T=20 iterations, R=5 weight samples, 100
Gaussian inputs, eps=0.01, density 0.8^18). For reference, on the project's 2-core CPU
machine the official PyTorch code takes about 2.5 s per iteration (57 s in all, 0.9 GB).

    python benchmarks/prune_speed.py                       # the official setting
    python benchmarks/prune_speed.py --iterations 3        # quicker look
    python benchmarks/prune_speed.py --compare-loops       # sequential vs vmap sample loop

Timings are of this machine in this run; compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time


def peak_rss_gb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


def setup(model_name: str, dataset_shape, classes: int):
    import jax
    import jax.numpy as jnp

    from ntksap_jax import get_model

    model = get_model(model_name, classes)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, *dataset_shape), jnp.float32)))(jax.random.key(0))
    return model, variables["params"], variables.get("batch_stats")


def time_prune(args) -> dict:
    import jax

    from ntksap_jax import count_kept, init_masks, ntksap_scorer, prune

    model, params, batch_stats = setup(args.model, (32, 32, 3), 10)
    score = ntksap_scorer(model, (32, 32, 3), samples=args.samples, num_inputs=args.num_inputs, eps=args.eps,
                          estimator=args.estimator, sample_loop=args.sample_loop)
    masks = init_masks(params)
    # Compile (and run once) outside the timed loop: compile seconds = first call - a steady call.
    t0 = time.perf_counter()
    jax.block_until_ready(score(params, masks, batch_stats, jax.random.key(123)))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(score(params, masks, batch_stats, jax.random.key(124)))
    steady = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = prune(score, params, masks, density=args.density, iterations=args.iterations, key=jax.random.key(args.seed),
                   batch_stats=batch_stats)
    total = time.perf_counter() - t0
    per_iter = [row["seconds"] for row in result.history]
    return {
        "benchmark": "prune_speed",
        "model": args.model,
        "method": "ntksap",
        "iterations": args.iterations,
        "samples": args.samples,
        "num_inputs": args.num_inputs,
        "eps": args.eps,
        "estimator": args.estimator,
        "sample_loop": args.sample_loop,
        "density_target": args.density,
        "density_actual": count_kept(result.masks) / sum(int(m.size) for m in jax.tree.leaves(result.masks)),
        "seconds_per_iteration_median": statistics.median(per_iter),
        "seconds_per_iteration_min": min(per_iter),
        "seconds_prune_total": total,
        "compile_seconds": first - steady,
        "peak_rss_gb": peak_rss_gb(),
        "official_pytorch_reference": {"seconds_per_iteration": 2.5, "seconds_total": 57, "peak_rss_gb": 0.9,
                                       "note": "official NTK-SAP, torch 2.13 CPU, 2 threads, same 2-core machine"},
        "ratio_official_over_ours_per_iteration": 2.5 / statistics.median(per_iter),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "machine": platform.machine(),
    }


def compare_loops(args) -> dict:
    """One scoring call with R weight samples in each sample-loop mode (after compiling)."""
    import jax

    from ntksap_jax import init_masks, ntksap_scorer

    model, params, batch_stats = setup(args.model, (32, 32, 3), 10)
    masks = init_masks(params)
    out = {"benchmark": "sample_loop", "model": args.model, "samples": args.samples, "num_inputs": args.num_inputs,
           "backend": jax.default_backend()}
    for mode in ("sequential", "vmap"):
        score = ntksap_scorer(model, (32, 32, 3), samples=args.samples, num_inputs=args.num_inputs, sample_loop=mode)
        t0 = time.perf_counter()
        jax.block_until_ready(score(params, masks, batch_stats, jax.random.key(0)))
        compile_and_run = time.perf_counter() - t0
        runs = []
        for i in range(2):
            t0 = time.perf_counter()
            jax.block_until_ready(score(params, masks, batch_stats, jax.random.key(1 + i)))
            runs.append(time.perf_counter() - t0)
        out[mode] = {"seconds": min(runs), "first_call_seconds": compile_and_run}
    out["vmap_over_sequential"] = out["vmap"]["seconds"] / out["sequential"]["seconds"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--num-inputs", type=int, default=100)
    p.add_argument("--eps", type=float, default=0.01)
    p.add_argument("--estimator", default="finite_difference")
    p.add_argument("--sample-loop", default="auto")
    p.add_argument("--density", type=float, default=0.8**18)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare-loops", action="store_true", help="time sequential vs vmap sample loops instead")
    args = p.parse_args(argv)
    result = compare_loops(args) if args.compare_loops else time_prune(args)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
