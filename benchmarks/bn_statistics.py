"""How much NTK-SAP's BatchNorm convention moves its scores (ResNet-20, float64, one weight sample).

The official code takes BatchNorm statistics with a momentum-1.0 train-mode pass and normalises with
PyTorch's running variance, the *unbiased* batch variance. This script builds that reference by hand
(Flax momentum-0 train pass, then every variance times n/(n-1)) and compares with it, on identical
draws (θ, x, z), the per-sample mask gradient of

* ``ntksap_jax`` (``ntksap_sample_gradient``): should agree to float64 rounding;
* the same objective with Flax's biased variance: the gap the convention makes.

Writes ``benchmarks/results/bn_statistics_<backend>.json`` and ``.md``.

    python benchmarks/bn_statistics.py --inputs 16 100
"""

from __future__ import annotations

import argparse
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def measure(num_inputs: int, seed: int = 3) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ntksap_jax import apply_masks, get_model, init_masks
    from ntksap_jax.scores.ntksap import ntksap_objective, ntksap_sample_draws, ntksap_sample_gradient

    model = get_model("resnet20", 10)
    v = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    f64 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float64), t)  # noqa: E731
    params, bs = f64(v["params"]), f64(v["batch_stats"])
    masks = init_masks(params)
    key = jax.random.key(seed)
    shape = (num_inputs, 32, 32, 3)
    theta, x, z = ntksap_sample_draws(key, params, masks, shape)

    def stats(p, unbiased):
        counts = {}

        def record(next_fun, args, kwargs, context):
            if isinstance(context.module, nn.BatchNorm):
                counts[context.module.path] = args[0].size // args[0].shape[-1]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            _, st = model.clone(bn_momentum=0.0).apply({"params": p, "batch_stats": bs}, x, train=True,
                                                       mutable=["batch_stats"])
        st = jax.tree.map(lambda a: a, st["batch_stats"])
        if unbiased:
            for path, n in counts.items():
                node = st
                for k in path:
                    node = node[k]
                node["var"] = node["var"] * n / (n - 1)
        return jax.lax.stop_gradient(st)

    def objective(m, unbiased):
        frozen = stats(apply_masks(theta, m), unbiased)
        f = lambda p, xb: model.apply({"params": p, "batch_stats": frozen}, xb, train=False)  # noqa: E731
        return ntksap_objective(f, theta, m, z, x)

    def flat(tree):
        return np.concatenate([np.abs(np.ravel(leaf)) for leaf in jax.tree.leaves(tree)])

    official = flat(jax.jit(jax.grad(lambda m: objective(m, True)))(masks))
    biased = flat(jax.jit(jax.grad(lambda m: objective(m, False)))(masks))
    ours = flat(jax.jit(lambda m: ntksap_sample_gradient(model, params, m, bs, key, shape))(masks))

    def median_rel(a, b):
        return float(np.median(np.abs(a - b) / np.abs(b)))

    return {"num_inputs": num_inputs, "ours_vs_official": median_rel(ours, official),
            "biased_vs_official": median_rel(biased, official)}


def markdown(report: dict) -> str:
    lines = ["| inputs | ntksap_jax vs official (median rel.) | biased variance vs official (median rel.) |",
             "|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['num_inputs']} | {r['ours_vs_official']:.2g} | {r['biased_vs_official']:.2g} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, nargs="+", default=[16, 100], help="Gaussian inputs per sample")
    args = parser.parse_args(argv)

    import jax

    jax.config.update("jax_enable_x64", True)
    from _report import write_report

    rows = [measure(n) for n in args.inputs]
    report = {"model": "resnet20", "dtype": "float64", "backend": jax.default_backend(), "jax": jax.__version__,
              "rows": rows}
    print(write_report(RESULTS / f"bn_statistics_{jax.default_backend()}", report, markdown))


if __name__ == "__main__":
    main()
