"""Device scaling: NTK-SAP pruning and a training epoch on 1..N devices, through ``jax.sharding``.

For each device count ``n`` this runs, in a fresh subprocess, the library's own multi-device
path (``prune(..., mesh=make_mesh(n))``, ``train(..., mesh=make_mesh(n))``) and reports:

* ``mlp-digits`` pruning: NTK-SAP at the preset's setting (T=20 rounds, 100 Gaussian inputs),
  median seconds per round after the compiling first round, and whether the masks equal the
  one-device masks;
* a training epoch of ``mlp-digits`` on digits (batch 64, 22 steps): the second epoch's
  seconds (the first compiles), and the test accuracy;
* ResNet-20 NTK-SAP rounds at the official setting (R=5, 100 inputs; ``--resnet20-rounds``,
  0 to skip): median seconds per round after the first.

On CPU the ``n`` devices are simulated (``--xla_force_host_platform_device_count=n``) and share
this machine's cores: expect no speed-up there (XLA:CPU already spreads one device's work over
all cores); the numbers show what the SPMD path costs. On GPUs and TPUs ``n`` is the first
``n`` real devices. Speed-ups are ratios against ``n = 1`` measured in the same run.

    python benchmarks/scaling.py                       # 1 and 2 devices
    python benchmarks/scaling.py --devices 1 2 4 8 --resnet20-rounds 0

Writes ``benchmarks/results/scaling_<backend>.json`` and ``.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run_child(n: int, resnet20_rounds: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ntksap_jax import get_model, ntksap_scorer, prune, train
    from ntksap_jax.presets import get_preset
    from ntksap_jax.parallel import make_mesh
    from ntksap_jax.data import load
    from ntksap_jax.steps import init_model

    mesh = None if n == 1 else make_mesh(n)
    out = {"devices": n, "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind}

    preset = get_preset("mlp-digits")
    model = preset.build_model()
    variables, prune_key = init_model(model, preset.input_shape, 0)
    score = ntksap_scorer(model, preset.input_shape, samples=preset.ntksap_samples,
                          num_inputs=preset.ntksap_num_inputs)
    result = prune(score, variables["params"], density=0.1, iterations=preset.ntksap_iterations, key=prune_key,
                   mesh=mesh)
    seconds = [row["seconds"] for row in result.history]
    out["mlp_prune"] = {"first_round_s": seconds[0], "median_round_s": statistics.median(seconds[1:]),
                        "rounds": len(seconds)}
    out["_masks"] = [np.asarray(m) for m in jax.tree.leaves(result.masks)]

    data = load("digits")
    kw = preset.train_kwargs()
    kw.update(epochs=2, progress=False)
    epochs = []
    res = train(model, variables, result.masks, data, mesh=mesh, callback=lambda row: epochs.append(row), **kw)
    out["mlp_train_epoch"] = {"first_epoch_s": epochs[0]["seconds"], "epoch_s": epochs[1]["seconds"],
                              "steps": data.steps_per_epoch(kw["batch_size"]),
                              "test_top1": res.history[-1]["test_top1"]}

    if resnet20_rounds > 0:
        model = get_model("resnet20", 10)
        v = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(0))
        score = ntksap_scorer(model, (32, 32, 3), samples=5, num_inputs=100)
        t0 = time.perf_counter()
        r = _first_rounds(score, v, resnet20_rounds + 1, mesh)
        out["resnet20_prune"] = {"first_round_s": r[0], "median_round_s": statistics.median(r[1:]),
                                 "rounds_timed": len(r) - 1, "wall_s": time.perf_counter() - t0}
    return out


def _first_rounds(score, variables, k: int, mesh) -> list:
    """Seconds of the first ``k`` rounds of ResNet-20's official schedule (T=20 to 1.8%)."""
    from ntksap_jax import prune
    import jax

    class Stop(Exception):
        pass

    seconds = []

    def progress(t, row):
        seconds.append(row["seconds"])
        if t >= k:
            raise Stop

    try:
        prune(score, variables["params"], batch_stats=variables["batch_stats"], density=0.8 ** 18, iterations=20,
              key=jax.random.key(1), mesh=mesh, progress=progress)
    except Stop:
        pass
    return seconds


def markdown(report: dict) -> str:
    rows = report["runs"]
    base = rows[0]
    lines = [
        f"Device scaling on {report['machine']} ({base['backend']}, {base['device_kind']}); "
        f"{'simulated CPU devices sharing the same cores' if base['backend'] == 'cpu' else 'real devices'}.",
        "",
        "| devices | MLP prune s/round | speed-up | masks = 1 device | MLP train epoch s | speed-up | test top-1 |"
        + (" ResNet-20 prune s/round | speed-up |" if "resnet20_prune" in base else ""),
        "|---|---|---|---|---|---|---|" + ("---|---|" if "resnet20_prune" in base else ""),
    ]
    for r in rows:
        line = (f"| {r['devices']} | {r['mlp_prune']['median_round_s']:.4f} | "
                f"{base['mlp_prune']['median_round_s'] / r['mlp_prune']['median_round_s']:.2f}x | "
                f"{'yes' if r['masks_equal_one_device'] else 'NO'} | {r['mlp_train_epoch']['epoch_s']:.3f} | "
                f"{base['mlp_train_epoch']['epoch_s'] / r['mlp_train_epoch']['epoch_s']:.2f}x | "
                f"{100 * r['mlp_train_epoch']['test_top1']:.2f}% |")
        if "resnet20_prune" in r:
            line += (f" {r['resnet20_prune']['median_round_s']:.2f} | "
                     f"{base['resnet20_prune']['median_round_s'] / r['resnet20_prune']['median_round_s']:.2f}x |")
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2], help="device counts (default 1 2)")
    ap.add_argument("--resnet20-rounds", type=int, default=2,
                    help="ResNet-20 NTK-SAP rounds timed after the first (default 2; 0 skips)")
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/scaling_<backend>)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child is not None:
        import numpy as np

        out = run_child(args.child, args.resnet20_rounds)
        np.savez(args.child_out + ".npz", *out.pop("_masks"))
        with open(args.child_out, "w") as f:
            json.dump(out, f)
        return 0

    if sorted(args.devices) != args.devices or args.devices[0] != 1:
        ap.error(f"--devices must start at 1 and increase (ratios are against 1 device); got {args.devices}")
    import tempfile

    import numpy as np

    from _report import write_report

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.devices:
            env = dict(os.environ)
            if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu" and not _has_accelerator():
                flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
                env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
            path = os.path.join(tmp, f"{n}.json")
            cmd = [sys.executable, __file__, "--child", str(n), "--child-out", path,
                   "--resnet20-rounds", str(args.resnet20_rounds)]
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, check=True)
            run = json.load(open(path))
            run["process_s"] = time.perf_counter() - t0
            masks = np.load(path + ".npz")
            if not runs:
                ref = masks
            run["masks_equal_one_device"] = all(np.array_equal(ref[k], masks[k]) for k in ref.files)
            runs.append(run)
            print(json.dumps({k: v for k, v in run.items()}), flush=True)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
              "date": time.strftime("%Y-%m-%d"), "runs": runs}
    backend = runs[0]["backend"]
    stem = Path(args.out) if args.out else RESULTS / f"scaling_{backend}"
    print(write_report(stem, report, markdown))
    return 0


def _has_accelerator() -> bool:
    """Whether JAX would pick a GPU/TPU here (checked in a child, so this process stays clean)."""
    code = "import jax; print(jax.default_backend())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return out.stdout.strip() not in ("cpu", "")


if __name__ == "__main__":
    sys.exit(main())
