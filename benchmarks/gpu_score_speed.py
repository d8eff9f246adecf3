"""Seconds per NTK-SAP scoring call (= one pruning iteration) on an accelerator, vmap vs sequential sample loop.

One JSON line per (model, sample loop) to stdout and appended to ``--out`` (default
``$OUT/gpu_bench.jsonl``, ``$OUT`` defaulting to /tmp): compile seconds (first call minus a steady call),
median steady seconds, peak device bytes. Settings are the official ones per benchmark: ResNet-20/CIFAR-10
R=5 x 100 inputs; VGG-16/CIFAR-100 R=1 x 1,000 inputs; ResNet-50/ImageNet R=1 x 10,000 inputs; batches of 256.

    python benchmarks/gpu_score_speed.py                     # all three
    python benchmarks/gpu_score_speed.py resnet20-cifar10    # one
    python benchmarks/gpu_score_speed.py --smoke              # tiny sizes, to check it runs (CPU)

Results measured on an NVIDIA H200 (jax 0.11.2): benchmarks/results/ntksap_score_h200_2026-11-26.jsonl.
The vmap loop on ResNet-50 (40 weight samples of 256 images at once) did not finish within the run's
limit and was stopped; use the sequential loop there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

# name -> (model, model kwargs, input shape, classes, samples R, num_inputs, batch, loops, steady repeats)
CONFIGS = {
    "resnet20-cifar10": ("resnet20", {}, (32, 32, 3), 10, 5, 100, 256, ("vmap", "sequential"), 5),
    "vgg16-cifar100": ("vgg16", {}, (32, 32, 3), 100, 1, 1000, 256, ("vmap", "sequential"), 3),
    "resnet50-imagenet": ("resnet50", {"stem": "imagenet"}, (224, 224, 3), 1000, 1, 10000, 256,
                          ("sequential", "vmap"), 1),
}


def smoke(config: tuple) -> tuple:
    """The same configuration at tiny sizes (one sample of 4 inputs, one loop)."""
    model, kwargs, shape, classes, _, _, _, loops, _ = config
    return model, kwargs, (16, 16, 3) if shape[0] == 32 else (64, 64, 3), classes, 1, 4, 4, loops[:1], 1


def time_config(name: str, config: tuple, log) -> None:
    """Compile and steady-state seconds of each sample loop of one configuration."""
    import jax
    import jax.numpy as jnp

    from ntksap_jax import get_model, init_masks, ntksap_scorer

    mname, kwargs, shape, classes, samples, n, batch, loops, reps = config
    model = get_model(mname, classes, **kwargs)
    v = jax.jit(lambda k: model.init(k, jnp.zeros((1, *shape)), train=False))(jax.random.key(0))
    params, bstats = v["params"], v.get("batch_stats")
    masks = init_masks(params)
    for loop in loops:
        try:
            score = ntksap_scorer(model, shape, samples=samples, num_inputs=n, batch_size=batch, sample_loop=loop)
            t0 = time.perf_counter()
            jax.block_until_ready(score(params, masks, bstats, jax.random.key(1)))
            first = time.perf_counter() - t0
            ts = []
            for r in range(reps):
                t0 = time.perf_counter()
                jax.block_until_ready(score(params, masks, bstats, jax.random.key(2 + r)))
                ts.append(time.perf_counter() - t0)
            log({"config": name, "loop": loop, "R": samples, "num_inputs": n, "batch": batch, "first_s": first,
                 "steady_median_s": statistics.median(ts), "steady_all": ts,
                 "compile_s_est": first - statistics.median(ts),
                 "peak_gpu_bytes": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")})
        except Exception as e:  # noqa: BLE001  one failing loop (e.g. out of memory) must not stop the others
            log({"config": name, "loop": loop, "error": f"{type(e).__name__}: {str(e)[:300]}"})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", metavar="CONFIG",
                        help=f"which to run (default all): {', '.join(CONFIGS)}")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check that it runs (also SMOKE=1)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "gpu_bench.jsonl"),
                        help="JSON lines file to append to (default $OUT/gpu_bench.jsonl, $OUT defaulting to /tmp)")
    args = parser.parse_args(argv)
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    import jax

    with open(args.out, "a") as out:
        def log(d):
            d["device"] = str(jax.devices()[0])
            print(json.dumps(d), flush=True)
            out.write(json.dumps(d) + "\n")
            out.flush()

        log({"jax": jax.__version__, "backend": jax.default_backend()})
        for name in args.configs or list(CONFIGS):
            config = smoke(CONFIGS[name]) if args.smoke or os.environ.get("SMOKE") else CONFIGS[name]
            time_config(name, config, log)


if __name__ == "__main__":
    main()
