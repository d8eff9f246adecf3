"""NTK trace kept by NTK-SAP's mask vs a random mask with the same per-layer densities.

For each seed, ResNet-20 (CIFAR-10 shapes) is initialised and pruned with NTK-SAP exactly
as ``ntksap-jax prune --seed S`` does (``init_key, prune_key = split(key(S))``, density 0.1
by default, T rounds of the exponential schedule, R weight samples of 100 Gaussian inputs,
finite differences at eps = 0.01). The random baseline is the CLI's ``--shuffle`` mask:
:func:`ntksap_jax.sanity.shuffle_masks` with key ``fold_in(prune_key, 7919)``, i.e. NTK-SAP's
per-layer kept counts with the kept positions drawn uniformly within each layer.

For a network ``m`` (dense, NTK-SAP, random) and weights ``θ`` the kept trace is
``tr Θ_m(x, x) / tr Θ_dense(x, x)`` on one fixed Gaussian batch ``x`` (``--batch`` inputs),
with BatchNorm statistics calibrated for each network on ``x`` (as NTK-SAP's scorer does)
and then fixed, so the kernel is the per-example NTK of the eval-mode network
(:func:`ntksap_jax.model.masked_apply_fn`). Two weight settings:

* "draws": the mean of the ratio over ``--draws`` fresh kaiming-normal kernels
  (``kaiming_normal_reinit(fold_in(trace_key, 1 + w), θ₀, masks)``) — weight-agnostic,
  as NTK-SAP's own objective is. All three networks see the same draws, so the column
  "NTK-SAP − random" is a paired difference with its standard error over draws;
* "init": the actual init ``θ₀`` the mask was pruned from.

``Θ`` is the NTK w.r.t. the prunable kernels (what NTK-SAP's objective measures; ``J``
w.r.t. the kernels, everything else closed over); ``--all-params`` adds the NTK w.r.t. all
params (kernels plus biases and BatchNorm scales/offsets, which are never pruned). The two
agreed to 0.1% of the ratio in a 3-seed run.

The exact trace is :func:`ntksap_jax.ntk_trace` summed over single examples: the
eval-mode kernel is per-example, and one example at a time costs ``N·K`` one-example
backward passes instead of ``N·K`` whole-batch ones.

    python benchmarks/kept_trace.py                          # 3 seeds, T=20, R=5 (the official setting)
    python benchmarks/kept_trace.py --iterations 10 --masks-dir /tmp/kept_masks   # quicker; reuse masks
    python benchmarks/kept_trace.py --seeds 0 --iterations 2 --draws 1 --batch 8   # smoke test

On a 2-core CPU, NTK-SAP pruning takes ~2-4 min per seed at T=10 and about twice that at T=20;
the traces ~10 s per weight draw (3 networks × 64 examples). ``--masks-dir`` caches the masks.

Prints a Markdown table per parameter set (and JSON with ``--json PATH``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

SHUFFLE_KEY = 7_919  # as ntksap_jax.cli: the --shuffle mask's key is fold_in(prune_key, SHUFFLE_KEY)
TRACE_KEY = 104_729  # trace batch and weight draws: fold_in(key(seed), TRACE_KEY)
INPUT_SHAPE = (32, 32, 3)


def _is_none(t) -> bool:
    return t is None


def split_kernels(params, masks):
    """The prunable leaves of ``params`` (``None`` elsewhere)."""
    import jax

    return jax.tree.map(lambda m, p: None if m is None else p, masks, params, is_leaf=_is_none)


def merge_kernels(params, masks, kernels):
    """``params`` with its prunable leaves replaced by ``kernels``."""
    import jax

    return jax.tree.map(lambda m, p, k: p if m is None else k, masks, params, kernels, is_leaf=_is_none)


def make_trace_fns(model, batch_stats, all_params: bool):
    """``traces(θ, m, x) -> {"kernels": tr, ["all": tr]}``: exact traces, one jitted call per example."""
    import jax

    from ntksap_jax import ntk_trace
    from ntksap_jax.model import calibrated_batch_stats, masked_apply_fn

    @jax.jit
    def stats_fn(theta, masks, x):
        return calibrated_batch_stats(model, theta, masks, batch_stats, x)

    @jax.jit
    def one(theta, masks, stats, x1):
        f = masked_apply_fn(model, masks, stats)
        out = {"kernels": ntk_trace(lambda k, xb: f(merge_kernels(theta, masks, k), xb),
                                    split_kernels(theta, masks), x1)}
        if all_params:
            out["all"] = ntk_trace(f, theta, x1)
        return out

    def traces(theta, masks, x):
        stats = stats_fn(theta, masks, x)
        total = {}
        for i in range(x.shape[0]):
            for k, v in one(theta, masks, stats, x[i : i + 1]).items():
                total[k] = total.get(k, 0.0) + float(v)
        return total

    return traces


def run_seed(args, seed: int) -> dict:
    import jax
    import jax.numpy as jnp

    from ntksap_jax import count_kept, get_model, init_masks, ntksap_scorer, prune
    from ntksap_jax.sanity import shuffle_masks
    from ntksap_jax.masks import collapsed_layers, load_masks, save_masks
    from ntksap_jax.scores.ntksap import kaiming_normal_reinit

    model = get_model("resnet20", 10)
    init_key, prune_key = jax.random.split(jax.random.key(seed))
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, *INPUT_SHAPE), jnp.float32), train=False))(init_key)
    params, batch_stats = variables["params"], variables["batch_stats"]
    dense = init_masks(params)
    score = ntksap_scorer(model, INPUT_SHAPE, samples=args.samples, num_inputs=args.num_inputs, eps=args.eps,
                          estimator=args.estimator)
    cache = None
    if args.masks_dir:
        os.makedirs(args.masks_dir, exist_ok=True)
        cache = os.path.join(args.masks_dir, f"ntksap_resnet20_seed{seed}_T{args.iterations}_R{args.samples}_"
                                             f"n{args.num_inputs}_eps{args.eps:g}_{args.estimator}_d{args.density:g}.npz")
    t0 = time.perf_counter()
    if cache and os.path.exists(cache):
        ntksap_masks = load_masks(cache, params)
        print(f"seed {seed}: NTK-SAP masks loaded from {cache}", file=sys.stderr, flush=True)
    else:
        ntksap_masks = prune(score, params, dense, density=args.density, iterations=args.iterations, key=prune_key,
                             batch_stats=batch_stats).masks
        if cache:
            save_masks(cache, ntksap_masks)
    prune_seconds = time.perf_counter() - t0
    nets = {"dense": dense, "ntksap": ntksap_masks,
            "random": shuffle_masks(jax.random.fold_in(prune_key, SHUFFLE_KEY), ntksap_masks)}
    total = sum(int(m.size) for m in jax.tree.leaves(dense))

    trace_key = jax.random.fold_in(jax.random.key(seed), TRACE_KEY)
    x = jax.random.normal(jax.random.fold_in(trace_key, 0), (args.batch, *INPUT_SHAPE), jnp.float32)
    reinit = jax.jit(kaiming_normal_reinit)
    weights = {"init": [params], "draws": [reinit(jax.random.fold_in(trace_key, 1 + w), params, dense)
                                           for w in range(args.draws)]}
    traces = make_trace_fns(model, batch_stats, args.all_params)
    psets = ("kernels", "all") if args.all_params else ("kernels",)
    t0 = time.perf_counter()
    ratios = {}  # (weights, param set, net) -> list of per-weight ratios
    raw = {}
    for wname, thetas in weights.items():
        for j, theta in enumerate(thetas):
            tr = {name: traces(theta, m, x) for name, m in nets.items()}
            raw[f"{wname}_{j}"] = tr
            for pset in psets:
                for name in ("ntksap", "random"):
                    ratios.setdefault((wname, pset, name), []).append(tr[name][pset] / tr["dense"][pset])
    trace_seconds = time.perf_counter() - t0
    out = {
        "seed": seed,
        "density_actual": count_kept(ntksap_masks) / total,
        "collapsed_layers_ntksap": collapsed_layers(ntksap_masks),
        "prune_seconds": prune_seconds,
        "trace_seconds": trace_seconds,
        "ratios": {f"{w}/{p}/{n}": statistics.fmean(v) for (w, p, n), v in ratios.items()},
        # paired over weight draws: mean and standard error of (NTK-SAP ratio - random ratio)
        "draws_difference": {p: _mean_se([a - b for a, b in zip(ratios[("draws", p, "ntksap")],
                                                                 ratios[("draws", p, "random")])]) for p in psets},
        "ratios_per_draw": {f"{w}/{p}/{n}": v for (w, p, n), v in ratios.items()},
        "traces": raw,
    }
    print(f"seed {seed}: pruned in {prune_seconds:.0f} s, traces in {trace_seconds:.0f} s; "
          + ", ".join(f"{k}={v:.4f}" for k, v in out["ratios"].items()), file=sys.stderr, flush=True)
    return out


def _mean_se(values) -> tuple[float, float]:
    if len(values) < 2:
        return statistics.fmean(values), float("nan")
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def _mean_std(values) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(rows: list, pset: str) -> str:
    lines = [
        "| seed | NTK-SAP (draws) | random (draws) | NTK-SAP − random (draws, paired ± s.e.) | NTK-SAP (init θ₀) "
        "| random (init θ₀) |",
        "|---|---|---|---|---|---|",
    ]
    cols = {k: [] for k in ("dn", "dr", "diff", "in", "ir")}
    for r in rows:
        v = r["ratios"]
        dn, dr = v[f"draws/{pset}/ntksap"], v[f"draws/{pset}/random"]
        i_n, i_r = v[f"init/{pset}/ntksap"], v[f"init/{pset}/random"]
        d, se = r["draws_difference"][pset]
        for k, val in zip(cols, (dn, dr, d, i_n, i_r)):
            cols[k].append(val)
        lines.append(f"| {r['seed']} | {dn:.4f} | {dr:.4f} | {d:+.4f} ± {se:.4f} | {i_n:.4f} | {i_r:.4f} |")
    lines.append("| mean ± std over seeds | " + " | ".join(_mean_std(cols[k]) for k in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iterations", type=int, default=20, help="NTK-SAP pruning rounds T (official: 20)")
    p.add_argument("--samples", type=int, default=5, help="weight samples R per round (official: 5)")
    p.add_argument("--num-inputs", type=int, default=100, help="Gaussian inputs per sample (official: 100)")
    p.add_argument("--eps", type=float, default=0.01)
    p.add_argument("--estimator", default="finite_difference", choices=["finite_difference", "jvp"])
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=64, help="Gaussian inputs for the trace")
    p.add_argument("--draws", type=int, default=8, help="fresh kaiming weight draws averaged")
    p.add_argument("--all-params", action="store_true",
                   help="also the trace w.r.t. all params (kernels, biases, BatchNorm); doubles the trace time")
    p.add_argument("--masks-dir", default=None,
                   help="cache NTK-SAP masks here (one .npz per seed and setting); reused when present")
    p.add_argument("--json", default=None, help="also write the results as JSON to this path")
    args = p.parse_args(argv)

    import jax

    start = time.perf_counter()
    rows = [run_seed(args, s) for s in args.seeds]
    wall = time.perf_counter() - start
    print(f"ResNet-20, density {args.density} (actual {rows[0]['density_actual']:.4f}), NTK-SAP T={args.iterations}, "
          f"R={args.samples}, {args.num_inputs} inputs, eps={args.eps}, {args.estimator}; trace on {args.batch} "
          f"Gaussian inputs, BN calibrated per network; draws = mean over {args.draws} fresh kaiming draws "
          f"(the paired column: NTK-SAP minus random on the same draws). "
          f"Entries: tr Θ_mask / tr Θ_dense.\n")
    for pset, title in (("kernels", "Θ w.r.t. the prunable kernels (NTK-SAP's objective)"),
                        ("all", "Θ w.r.t. all params (kernels, biases, BatchNorm)"))[: 2 if args.all_params else 1]:
        print(f"**{title}**\n")
        print(table(rows, pset))
        print()
    print(f"wall time {wall:.0f} s (prune {sum(r['prune_seconds'] for r in rows):.0f} s, traces "
          f"{sum(r['trace_seconds'] for r in rows):.0f} s), backend {jax.default_backend()}")
    if args.json:
        from ntksap_jax._io import atomic_write_text

        report = {"benchmark": "kept_trace", "args": vars(args), "wall_seconds": wall, "seeds": rows}
        atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
