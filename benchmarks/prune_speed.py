"""NTK-SAP pruning speed: seconds per iteration, compile seconds, peak RSS, FLOPs and GFLOP/s.

For each preset (model + official NTK-SAP setting) this runs, in a fresh subprocess (so peak
RSS and compile time are per configuration), NTK-SAP pruning for some iterations of the real
exponential schedule after one compiling call, and reports:

* median and min seconds per iteration (after warm-up), compile seconds (first call minus a
  steady call), the projected total for all ``T`` iterations (compile + T × median);
* peak RSS of the process (``ru_maxrss``) and, on GPUs, peak device memory;
* FLOPs of one iteration from XLA's cost analysis of the lowered per-sample step(s) (times
  the number of weight samples), and achieved GFLOP/s; on CPU only, because XLA's GPU cost
  analysis undercounts convolutions (cuDNN custom calls) by orders of magnitude;
* the machine's measured peak: a large float32 matmul timed in the same run (before and after
  the configurations; the larger is reported), and each configuration's fraction of it.

ResNet-20 (``resnet20-cifar10``): T=20, R=5, 100 Gaussian inputs, eps=0.01; the official
PyTorch code takes about 2.5 s per iteration (57 s in all, 0.9 GB peak RSS) on the project's
2-core CPU. VGG-16 (``vgg16-cifar100``): T=100, R=1, 1,000 inputs in batches of 256.

    python benchmarks/prune_speed.py                                  # both presets, JSON + Markdown
    python benchmarks/prune_speed.py --presets resnet20-cifar10 --iterations 20
    python benchmarks/prune_speed.py --estimators finite_difference jvp --sample-loops sequential vmap
    python benchmarks/prune_speed.py --presets resnet20-cifar10 \
        --official ~/NTK-SAP --official-python ~/venv-torch/bin/python      # beside the official process

The whole ``ntksap-jax prune`` process of ResNet-20 at the official setting is also timed, phase by
phase (import, init, first iteration, per iteration, after, total; see ``_process_timing.py``), with a
cold compilation cache (a fresh folder) and then warm (the same folder again); with ``--official PATH``
(a checkout of the official NTK-SAP code, and ``--official-python``: a Python with ``torch`` and
``pandas``) its ``main.py`` NTK-SAP pruning is timed beside it, and the table gives ours ÷ official.
``--no-process`` skips this; ``--process-iterations k`` times the first k of the T rounds (both sides).

Writes ``benchmarks/results/prune_speed_<backend>.json`` and ``.md`` (``--out`` to change).
Timings are of this machine in this run; compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

OFFICIAL = {"resnet20-cifar10": {"seconds_per_iteration": 2.5, "seconds_total": 57.0, "peak_rss_gb": 0.9,
                                 "note": "official NTK-SAP (PyTorch), torch 2.13 CPU, 2 threads, "
                                         "the project's 2-core CPU"}}
RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_gb() -> float:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


def matmul_peak_gflops(size: int, repeats: int = 5) -> float:
    """Best-of-``repeats`` GFLOP/s of a ``size``×``size`` float32 matmul under jit."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(a))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def _flops(lowered) -> float:
    """XLA's FLOP count of a lowered computation, NaN where the backend gives none.

    Counted on the lowered (pre-backend) HLO where possible: after compilation for GPU the
    convolutions are cuDNN custom calls, which XLA's cost analysis counts as 0 FLOPs.
    """
    for get in (lambda: lowered.cost_analysis(), lambda: lowered.compile().cost_analysis()):
        try:
            cost = get()
        except Exception:  # noqa: BLE001 - a backend without cost analysis
            continue
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else None
        if cost and "flops" in cost:
            return float(cost["flops"])
    return float("nan")


def _conv_path() -> str:
    """Which CPU convolutions ran: oneDNN (the package's extension) or XLA's own."""
    import jax

    from ntksap_jax import _onednn

    if jax.default_backend() != "cpu":
        return "n/a"
    return "oneDNN" if _onednn.available() and jax.device_count() == 1 else "XLA"


def run_config(cfg: dict) -> dict:
    """One configuration, in this process: compile, time ``cfg['iterations']`` pruning rounds."""
    import jax
    import jax.numpy as jnp

    from ntksap_jax import count_kept, init_masks, ntksap_scorer, prune
    from ntksap_jax.presets import get_preset

    preset = get_preset(cfg["preset"])
    model = preset.build_model()
    shape = tuple(preset.input_shape)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, *shape), jnp.float32)))(jax.random.key(0))
    params, batch_stats = variables["params"], variables.get("batch_stats")
    samples, num_inputs, batch_size = preset.ntksap_samples, preset.ntksap_num_inputs, cfg["batch_size"]
    score = ntksap_scorer(model, shape, samples=samples, num_inputs=num_inputs, batch_size=batch_size,
                          estimator=cfg["estimator"], sample_loop=cfg["sample_loop"])
    masks = init_masks(params)

    t0 = time.perf_counter()
    jax.block_until_ready(score(params, masks, batch_stats, jax.random.key(123)))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(score(params, masks, batch_stats, jax.random.key(124)))
    steady = time.perf_counter() - t0

    # FLOPs of one iteration: XLA's count for each program one call runs, times its uses.
    key = jax.random.key(0)
    if jax.default_backend() != "cpu":
        # XLA's GPU cost analysis (jax 0.11.2) counted ResNet-50's 10,000-image iteration as
        # 5.9 TFLOP where the convolutions alone are about 490 TFLOP: not reported.
        flops = float("nan")
    else:
        # XLA counts no FLOPs inside a custom call, so the count comes from the same scorer traced
        # with XLA's convolutions (oneDNN off): the same algorithm on the same shapes.
        import ntksap_jax.conv as conv_module

        applies, conv_module._onednn_applies = conv_module._onednn_applies, lambda *a: False
        try:
            counted = ntksap_scorer(model, shape, samples=samples, num_inputs=num_inputs, batch_size=batch_size,
                                    estimator=cfg["estimator"], sample_loop=cfg["sample_loop"])
            flops = sum(uses * _flops(low) for low, uses in counted.lowered(params, masks, batch_stats, key))
        finally:
            conv_module._onednn_applies = applies

    T = preset.ntksap_iterations
    k = min(cfg["iterations"] or T, T)
    final = 0.8 ** 18  # 1.8% density, the reference run; the first k rounds of its T-round schedule
    result = prune(score, params, masks, density=final ** (k / T), iterations=k, key=jax.random.key(0),
                   batch_stats=batch_stats)
    secs = [row["seconds"] for row in result.history]
    med = statistics.median(secs)
    out = {
        **cfg,
        "model": preset.model,
        "T": T, "R": samples, "num_inputs": num_inputs,
        "weight_samples_per_iteration": samples * -(-num_inputs // batch_size),
        "iterations_timed": k,
        "density_after_timed": count_kept(result.masks) / sum(int(m.size) for m in jax.tree.leaves(result.masks)),
        "seconds_per_iteration_median": med,
        "seconds_per_iteration_min": min(secs),
        "compile_seconds": first - steady,
        "projected_total_seconds": (first - steady) + T * med,
        "peak_rss_gb": peak_rss_gb(),
        "gflop_per_iteration": flops / 1e9,
        "cpu_convolutions": _conv_path(),
        "gflops_achieved": flops / 1e9 / med,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
    }
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["peak_device_memory_gb"] = stats["peak_bytes_in_use"] / 1e9
    return out


PROCESS_PRESET = "resnet20-cifar10"
PROCESS_COMPRESSION = 18  # density 0.8**18, the official scripts' sparsest ResNet-20 level


def run_process(args) -> dict:
    """Our whole prune process, cold then warm cache, and the official one when ``args.official`` is given."""
    import tempfile

    from ntksap_jax.presets import get_preset
    from _process_timing import time_official, time_ours

    preset = get_preset(PROCESS_PRESET)
    T = preset.ntksap_iterations
    k = min(args.process_iterations or T, T)
    compression = PROCESS_COMPRESSION * k / T  # the first k rounds of the T-round schedule
    setting = {"model": preset.model, "dataset": "cifar10", "T": T, "iterations": k, "R": preset.ntksap_samples,
               "num_inputs": preset.ntksap_num_inputs, "density": 0.8 ** compression}
    prune_args = ["--model", preset.model, "--dataset", "cifar10", "--method", "ntksap",
                  "--density", repr(0.8 ** compression), "--iterations", str(k), "--samples", str(setting["R"]),
                  "--num-inputs", str(setting["num_inputs"]), "--seed", "0"]
    out = {"setting": setting}
    with tempfile.TemporaryDirectory() as cache:
        for name in ("ours_cold", "ours_warm"):
            print(f"timing {name} ...", file=sys.stderr, flush=True)
            out[name] = time_ours(prune_args, cache)
            print(json.dumps(out[name]), file=sys.stderr, flush=True)
    if args.official:
        print("timing the official process ...", file=sys.stderr, flush=True)
        out["official"] = time_official(args.official, args.official_python, iterations=k,
                                        samples=setting["R"], compression=compression)
        print(json.dumps(out["official"]), file=sys.stderr, flush=True)
    return out


def process_markdown(report: dict) -> list[str]:
    proc = report.get("process")
    if not proc:
        return []
    st, peak = proc["setting"], report["matmul_peak_gflops"]
    flops = next((r["gflop_per_iteration"] for r in report["configs"]
                  if r.get("preset") == PROCESS_PRESET and "error" not in r), float("nan"))
    lines = [f"## Whole process: ResNet-20, CIFAR-10, T={st['T']} (first {st['iterations']} timed), R={st['R']}, "
             f"{st['num_inputs']} Gaussian inputs, density {st['density']:.4g}", "",
             "| process | import s | init s | first iteration s | s/iteration (median) | after s | total s "
             "| GFLOP/s | % of peak |", "|---|---|---|---|---|---|---|---|---|"]
    names = {"ours_cold": "ntksap-jax prune, cold cache", "ours_warm": "ntksap-jax prune, warm cache",
             "official": "official main.py NTKSAP"}
    for key, label in names.items():
        r = proc.get(key)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error'][:100]} ||||||||")
            continue
        if key == "official":
            label += f" (torch {r.get('torch', '?')}, {r.get('threads', '?')} threads)"
        gf = flops / r["per_iteration"]
        lines.append(f"| {label} | {r['import']:.2f} | {r['init']:.2f} | {r['first_iteration']:.2f} "
                     f"| {r['per_iteration']:.2f} | {r['after']:.2f} | {r['total']:.1f} | {gf:.3g} "
                     f"| {100 * gf / peak:.0f}% |")
    lines += ["", "GFLOP/s: XLA's FLOP count of our iteration (the convolutions, forward and backward) ÷ each "
              "side's seconds per iteration (the official code runs the same algorithm on the same shapes)."]
    off = proc.get("official")
    for key in ("ours_cold", "ours_warm"):
        r = proc.get(key)
        if r and "error" not in r:
            ratio = ""
            if off and "error" not in off:
                ratio = (f"; ours ÷ official: whole process **{r['total'] / off['total']:.2f}×**, "
                         f"per iteration **{r['per_iteration'] / off['per_iteration']:.2f}×**")
            lines.append(f"- {names[key]}: {r['import'] + r['init']:.2f} s before the first round{ratio}")
    return lines + [""]


def markdown(report: dict) -> str:
    peak = report["matmul_peak_gflops"]
    lines = [
        f"# NTK-SAP pruning speed ({report['device']}, {report['backend']}, jax {report['jax']}, "
        f"{report['cpu_count']} CPUs)",
        "",
        f"Machine peak (float32 {report['matmul_size']}² matmul, this run): **{peak:.0f} GFLOP/s**.",
        "",
        "| preset | estimator | loop | s/iteration (median) | compile s | projected total s | peak RSS GB "
        "| GFLOP/iteration | GFLOP/s | % of peak | official s/it ÷ ours |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    timed = (report.get("process") or {}).get("official") or {}
    timed = timed if "per_iteration" in timed else None  # the official process, timed in this run
    for r in report["configs"]:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['estimator']} | {r['sample_loop']} | failed: {r['error'][:80]} |||||||")
            continue
        official = OFFICIAL.get(r["preset"], {}).get("seconds_per_iteration")
        if timed and r["preset"] == PROCESS_PRESET:
            official = timed["per_iteration"]
        ratio = f"{official / r['seconds_per_iteration_median']:.2f}×" if official else "—"
        lines.append(
            f"| {r['preset']} (T={r['T']}, R={r['R']}, {r['num_inputs']} inputs) | {r['estimator']} "
            f"| {r['sample_loop']} "
            f"| {r['seconds_per_iteration_median']:.2f} | {r['compile_seconds']:.1f} "
            f"| {r['projected_total_seconds']:.0f} "
            f"| {r['peak_rss_gb']:.2f} | {r['gflop_per_iteration']:.4g} | {r['gflops_achieved']:.3g} "
            f"| {100 * r['gflops_achieved'] / peak:.0f}% | {ratio} |"
        )
    if timed:
        lines += ["", f"Official s/it: the official process timed in this run ({timed['per_iteration']:.2f} s per "
                  "iteration, below).", ""]
    else:
        lines += ["", "Official PyTorch reference (same 2-core CPU, measured once, not in this run): ResNet-20 "
                  "2.5 s/iteration, 57 s in all, 0.9 GB peak RSS.", ""]
    return "\n".join(lines + process_markdown(report))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["resnet20-cifar10", "vgg16-cifar100"])
    p.add_argument("--estimators", nargs="+", default=["finite_difference"])
    p.add_argument("--sample-loops", nargs="+", default=["auto"])
    p.add_argument("--iterations", type=int, default=None,
                   help="rounds to time (default: all T when T <= 20, else 3, or 1 on CPU where a VGG-16 round "
                        "takes minutes); the total is projected to T")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--matmul-size", type=int, default=4096)
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/prune_speed_<backend>)")
    p.add_argument("--official", default=None, metavar="PATH",
                   help="a checkout of the official NTK-SAP code: time its main.py pruning beside ours")
    p.add_argument("--official-python", default="python3",
                   help="the Python that runs it, with torch and pandas (default python3)")
    p.add_argument("--process-iterations", type=int, default=None,
                   help="whole-process timing: rounds to run (default all T=20)")
    p.add_argument("--no-process", action="store_true", help="skip the whole-process timing")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        os.environ.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)
        print("RESULT " + json.dumps(run_config(json.loads(args.child))), flush=True)
        return 0

    # The parent only times a matmul: keep it from taking 75% of a GPU's memory while children run.
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    import jax

    from ntksap_jax.presets import get_preset
    from _report import write_report

    peak_before = matmul_peak_gflops(args.matmul_size)
    configs = []
    for preset in args.presets:
        for estimator in args.estimators:
            for loop in args.sample_loops:
                T = get_preset(preset).ntksap_iterations
                T_default = T if T <= 20 else (1 if jax.default_backend() == "cpu" else 3)
                cfg = {"preset": preset, "estimator": estimator, "sample_loop": loop,
                       "iterations": args.iterations or T_default, "batch_size": args.batch_size}
                print(f"running {cfg}", file=sys.stderr, flush=True)
                proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)],
                                      capture_output=True, text=True)
                rows = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode or not rows:
                    configs.append({**cfg, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
                else:
                    configs.append(json.loads(rows[-1]))
                print(json.dumps(configs[-1]), file=sys.stderr, flush=True)
    process = None if args.no_process else run_process(args)
    peak = max(peak_before, matmul_peak_gflops(args.matmul_size))
    report = {
        "benchmark": "prune_speed",
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "matmul_size": args.matmul_size,
        "matmul_peak_gflops": peak,
        "official_pytorch_reference": OFFICIAL,
        "configs": configs,
        "process": process,
    }
    stem = Path(args.out) if args.out else RESULTS / f"prune_speed_{report['backend']}"
    print(write_report(stem, report, markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
