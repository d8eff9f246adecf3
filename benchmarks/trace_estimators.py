"""Bias of NTK-SAP's objective as an estimator of ``ε² tr Θ``: finite differences vs the jvp form.

With ``z ~ N(0, I)`` on the prunable kernels, ``E_z ‖J(θ⊙m) (εz⊙m)‖² = ε² tr Θ_m`` exactly,
where ``Θ_m`` is the NTK w.r.t. the prunable kernels only (the perturbation never touches
biases or BatchNorm parameters). ``ntksap_objective(..., estimator="jvp")`` computes that
quadratic form; the official ``"finite_difference"`` form ``‖f(θ⊙m) − f((θ+εz)⊙m)‖²`` equals
it only to first order in ``ε``.

Fixed-weights rows: one network (init weights ``θ₀``, one Gaussian batch ``x``, BatchNorm
statistics of the masked net on ``x``, then fixed, as NTK-SAP's scorer does), ``--probes``
draws of ``z``. The exact reference ``tr Θ_m`` is :func:`ntksap_jax.ntk_trace` of the function
of the kernel leaves (other params closed over), summed over single examples (the eval-mode
kernel is per-example). The three estimators share each ``z`` (common random numbers).

* "vs exact": ``mean(L) / (ε² tr Θ_m) − 1 ± std(L) / √n / (ε² tr Θ_m)``;
* "vs jvp": ``mean(L/ε²) / mean(L_jvp/ε²) − 1`` on the same probes, with the delta-method
  standard error ``std(L/ε² − R·L_jvp/ε²) / √n / mean(L_jvp/ε²)``. The jvp's probe noise cancels,
  so this isolates the finite difference's own bias (the jvp is exactly unbiased, which the
  "vs exact" jvp rows and ``tests/test_estimators.py`` check).

Weight-draw rows ("θ, x per probe"): each probe draws fresh kaiming kernels, a fresh Gaussian
batch and ``z`` exactly as the scorer does (:func:`ntksap_jax.scores.ntksap.ntksap_sample_draws`)
and recalibrates BatchNorm; reported "vs jvp" only (the exact trace would be needed per draw).

float64 rows (MLP by default) separate rounding from nonlinearity: at ``ε = 1e-3`` a float32
finite difference loses about 3 of its ~7 significant digits to cancellation.

    python benchmarks/trace_estimators.py                          # MLP (f32, f64) and ResNet-20 (f32)
    python benchmarks/trace_estimators.py --models mlp --probes-mlp 200    # quick look
    python benchmarks/trace_estimators.py --mask-density 0.1       # a random 10% mask instead of dense

Prints a Markdown table (and JSON with ``--json PATH``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time

EPS_FD = (0.01, 1e-3)  # default finite-difference eps values (--eps)
EPS_JVP = 0.01


def _is_none(t) -> bool:
    return t is None


def model_setup(name: str, shape, mlp_features):
    from ntksap_jax import get_model

    if name == "mlp":
        return get_model("mlp", 10, features=tuple(mlp_features)), tuple(shape)
    return get_model(name, 10), (32, 32, 3)


def random_masks(key, params, density: float):
    """Bernoulli(density) masks on the prunable leaves (all ones for density 1)."""
    import jax

    from ntksap_jax import init_masks
    from ntksap_jax.ntk import gaussian_like

    masks = init_masks(params)
    if density >= 1:
        return masks
    z = gaussian_like(key, masks)
    cut = jax.scipy.stats.norm.ppf(density)
    return jax.tree.map(lambda g: (g < cut).astype(g.dtype), z)


def exact_kernel_trace(make_apply, params, masks, stats, x, chunk: int) -> float:
    """``tr Θ_m`` w.r.t. the masked leaves: ``ntk_trace`` of ``k ↦ f((θ with kernels k)⊙m)``, by example chunks.

    Every array is a jit argument (closed-over arrays become constants that XLA folds at compile time).
    """
    import jax

    from ntksap_jax import apply_masks, ntk_trace

    @jax.jit
    def fn(params, masks, stats, xb):
        apply_fn = make_apply(stats)
        kernels = jax.tree.map(lambda m, p: None if m is None else p, masks, params, is_leaf=_is_none)

        def g(k, xc):
            full = jax.tree.map(lambda m, p, kk: p if m is None else kk, masks, params, k, is_leaf=_is_none)
            return apply_fn(apply_masks(full, masks), xc)

        return ntk_trace(g, kernels, xb)

    return sum(float(fn(params, masks, stats, x[i : i + chunk])) for i in range(0, x.shape[0], chunk))


def run_probes(probe, key, n: int, chunk: int, *operands):
    """``n`` probes ``probe(key_j, *operands) -> (E,)`` in jitted chunks (vmap over keys inside a chunk)."""
    import jax
    import numpy as np

    keys = jax.random.split(key, n)
    if chunk <= 1:
        step = jax.jit(probe)
        return np.stack([np.asarray(step(keys[j], *operands)) for j in range(n)])
    step = jax.jit(jax.vmap(probe, in_axes=(0,) + (None,) * len(operands)))
    return np.concatenate([np.asarray(step(keys[j : j + chunk], *operands)) for j in range(0, n, chunk)])


def stats_vs_exact(samples, eps, trace):
    ref = eps**2 * trace
    return float(samples.mean() / ref - 1), float(samples.std(ddof=1) / math.sqrt(samples.size) / ref)


def stats_vs_jvp(a, b):
    """``mean(a)/mean(b) − 1`` with a delta-method standard error (a, b paired)."""
    r = a.mean() / b.mean()
    return float(r - 1), float((a - r * b).std(ddof=1) / math.sqrt(a.size) / b.mean())


def measure(args, name: str, dtype_name: str) -> list[dict]:
    eps_fd = tuple(args.eps)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ntksap_jax import apply_masks
    from ntksap_jax.model import calibrated_batch_stats, masked_apply_fn
    from ntksap_jax.ntk import gaussian_like
    from ntksap_jax.scores.ntksap import bn_statistics, ntksap_objective, ntksap_sample_draws

    dtype = jnp.float64 if dtype_name == "float64" else jnp.float32
    model, shape = model_setup(name, args.mlp_shape, args.mlp_features)
    is_resnet = name != "mlp"
    n_probes = args.probes_resnet if is_resnet else args.probes_mlp
    chunk = 1 if is_resnet else args.chunk_mlp
    batch = args.batch_resnet if is_resnet else args.batch_mlp
    key = jax.random.key(args.seed)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, *shape), jnp.float32), train=False))(
        jax.random.fold_in(key, 0))
    cast = lambda t: jax.tree.map(lambda a: a.astype(dtype), t)  # noqa: E731
    params = cast(variables["params"])
    batch_stats = cast(variables.get("batch_stats"))
    masks = cast(jax.jit(random_masks, static_argnums=2)(jax.random.fold_in(key, 1), variables["params"],
                                                         args.mask_density))
    # Drawn in float32 and cast, so the float32 and float64 rows see the same inputs.
    x = jax.random.normal(jax.random.fold_in(key, 2), (batch, *shape), jnp.float32).astype(dtype)
    stats = jax.jit(lambda p, m, s, xb: calibrated_batch_stats(model, p, m, s, xb))(params, masks, batch_stats, x)
    make_apply = lambda s: masked_apply_fn(model, None, s)  # noqa: E731  (the objective applies the mask itself)

    t0 = time.perf_counter()
    trace = exact_kernel_trace(make_apply, params, masks, stats, x, chunk=1)
    trace_seconds = time.perf_counter() - t0

    def probe(k, params, masks, stats, x):
        apply_fn = make_apply(stats)
        z = gaussian_like(k, masks)
        vals = [ntksap_objective(apply_fn, params, masks, z, x, eps=e, estimator="finite_difference") for e in eps_fd]
        vals.append(ntksap_objective(apply_fn, params, masks, z, x, eps=EPS_JVP, estimator="jvp"))
        return jnp.stack(vals)

    t0 = time.perf_counter()
    fixed = run_probes(probe, jax.random.fold_in(key, 3), n_probes, chunk, params, masks, stats, x).astype(np.float64)
    probe_seconds = time.perf_counter() - t0

    rows = []
    base = {"model": name, "dtype": dtype_name, "probes": n_probes, "batch": batch, "mask_density": args.mask_density,
            "exact_trace": trace, "trace_seconds": trace_seconds}
    jvp_unit = fixed[:, -1] / EPS_JVP**2
    for j, (est, eps) in enumerate([("finite_difference", e) for e in eps_fd] + [("jvp", EPS_JVP)]):
        b, se = stats_vs_exact(fixed[:, j], eps, trace)
        row = {**base, "weights": "fixed θ₀, x", "estimator": est, "eps": eps, "bias_vs_exact": b, "se_vs_exact": se,
               "probe_seconds": probe_seconds}
        if est != "jvp":
            row["bias_vs_jvp"], row["se_vs_jvp"] = stats_vs_jvp(fixed[:, j] / eps**2, jvp_unit)
        rows.append(row)

    if args.draws:
        input_shape = (batch, *shape)

        def draw_probe(k, params, masks, batch_stats):
            theta, xb, z = ntksap_sample_draws(k, params, masks, input_shape)
            s = bn_statistics(model, apply_masks(theta, masks), batch_stats, xb)  # as the scorer does
            f = masked_apply_fn(model, None, s)
            vals = [ntksap_objective(f, theta, masks, z, xb, eps=e, estimator="finite_difference") for e in eps_fd]
            vals.append(ntksap_objective(f, theta, masks, z, xb, eps=EPS_JVP, estimator="jvp"))
            return jnp.stack(vals)

        t0 = time.perf_counter()
        drawn = run_probes(
            draw_probe, jax.random.fold_in(key, 4), n_probes, chunk, params, masks, batch_stats
        ).astype(np.float64)
        draw_seconds = time.perf_counter() - t0
        jvp_unit = drawn[:, -1] / EPS_JVP**2
        for j, eps in enumerate(eps_fd):
            b, se = stats_vs_jvp(drawn[:, j] / eps**2, jvp_unit)
            rows.append({**base, "exact_trace": None, "weights": "θ, x per probe", "estimator": "finite_difference",
                         "eps": eps, "bias_vs_jvp": b, "se_vs_jvp": se, "probe_seconds": draw_seconds})
    print(f"{name} {dtype_name}: exact trace {trace:.6g} in {trace_seconds:.1f} s, {n_probes} probes in "
          f"{probe_seconds:.1f} s" + (f", weight draws in {draw_seconds:.1f} s" if args.draws else ""),
          file=sys.stderr, flush=True)
    return rows


def _pm(b, se) -> str:
    return "—" if b is None else f"{100 * b:+.2f}% ± {100 * se:.2f}%"


def table(rows: list) -> str:
    lines = ["| model | weights | estimator | ε | dtype | probes | bias vs exact ε² tr Θ ± s.e. "
             "| bias vs jvp (paired) ± s.e. |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['weights']} | {r['estimator']} | {r['eps']:g} | {r['dtype']} "
                     f"| {r['probes']} | "
                     f"{_pm(r.get('bias_vs_exact'), r.get('se_vs_exact'))} "
                     f"| {_pm(r.get('bias_vs_jvp'), r.get('se_vs_jvp'))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["mlp", "resnet20"], choices=["mlp", "resnet20", "resnet32"])
    p.add_argument("--float64", nargs="*", default=["mlp"], help="models also measured in float64 (default: mlp)")
    p.add_argument("--mlp-shape", type=int, nargs="+", default=[32, 32, 3],
                   help="MLP input shape (default CIFAR 32 32 3: first layer fan-in 3072, kernel std 0.026)")
    p.add_argument("--mlp-features", type=int, nargs="+", default=[512, 512], help="MLP hidden widths")
    p.add_argument("--eps", type=float, nargs="+", default=list(EPS_FD), help="finite-difference eps values")
    p.add_argument("--probes-mlp", type=int, default=300)
    p.add_argument("--probes-resnet", type=int, default=300)
    p.add_argument("--batch-mlp", type=int, default=64, help="Gaussian inputs for the MLP")
    p.add_argument("--batch-resnet", type=int, default=16, help="Gaussian inputs for the ResNet")
    p.add_argument("--chunk-mlp", type=int, default=10, help="MLP probes vmapped per call (ResNets: 1, a loop)")
    p.add_argument("--mask-density", type=float, default=1.0, help="random Bernoulli mask density (1 = dense)")
    p.add_argument("--no-draws", dest="draws", action="store_false", help="skip the fresh-weights-per-probe rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    args = p.parse_args(argv)

    import jax

    start = time.perf_counter()
    rows = []
    for name in args.models:
        for dtype_name in ["float32"] + (["float64"] if name in args.float64 else []):
            with jax.enable_x64(True) if dtype_name == "float64" else contextlib.nullcontext():
                rows.extend(measure(args, name, dtype_name))
    wall = time.perf_counter() - start
    described = [f"{m} {tuple(args.mlp_features)} on {tuple(args.mlp_shape)} x{args.batch_mlp} inputs" if m == "mlp"
                 else f"{m} on (32, 32, 3) x{args.batch_resnet} inputs" for m in args.models]
    print(f"{'; '.join(described)}; mask density {args.mask_density}; BN calibrated on the batch; relative bias of "
          f"the probe mean against ε² tr Θ (kernels only), ± one standard error.\n")
    print(table(rows))
    print(f"\nwall time {wall:.0f} s, backend {jax.default_backend()}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"benchmark": "trace_estimators", "args": vars(args), "wall_seconds": wall, "rows": rows}, fh,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
