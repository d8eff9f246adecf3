"""Where the test suite's time goes to XLA: compile seconds per test and per jitted function.

Runs ``python -m pytest ARGS`` (default: the whole suite) with an empty JAX compilation cache and a
``sitecustomize`` on ``PYTHONPATH`` that records JAX's own compile events
(``jax.monitoring``: ``/jax/core/compile/{jaxpr_trace,jaxpr_to_mlir_module,backend_compile}_duration``)
in the test process, both pytest-xdist workers and every subprocess they start (the README's
commands, the notebooks' kernels, the 8-device worker), each event tagged with the test that was
running (``PYTEST_CURRENT_TEST``, which subprocesses inherit). Prints and writes a Markdown table:
the suite's wall time, its compile seconds, and the tests and functions that compile longest.

Seconds are wall-clock on the machine as loaded by the run (two workers share the cores), so they
add up to more than one core's worth; compare runs made the same way, alone.

Usage::

  python benchmarks/suite_compile_profile.py --out benchmarks/results/test_suite/compile_profile.md
  python benchmarks/suite_compile_profile.py -- -m "not slow"      # the quick tier
  python benchmarks/suite_compile_profile.py --raw events.tsv -- -n 0 tests/test_ntk.py
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
EVENTS = ("jaxpr_trace_duration", "jaxpr_to_mlir_module_duration", "backend_compile_duration")

SITECUSTOMIZE = '''
import os
if os.environ.get("NTKSAP_COMPILE_PROFILE"):
    import jax.monitoring
    _log = open(os.path.join(os.environ["NTKSAP_COMPILE_PROFILE"], f"{os.getpid()}.tsv"), "a", buffering=1)

    def _listen(event, duration, **kwargs):
        if event.rsplit("/", 1)[-1] in EVENTS:
            test = os.environ.get("PYTEST_CURRENT_TEST", "-").split(" (")[0]
            _log.write(f"{event}\\t{duration:.4f}\\t{test}\\t{kwargs.get('fun_name', '')}\\n")

    jax.monitoring.register_event_duration_secs_listener(_listen)
'''.replace("EVENTS", repr(set(EVENTS)))


def read_events(folder: pathlib.Path) -> list[tuple[str, float, str, str]]:
    """``(event, seconds, test, function)`` rows from every process's log in ``folder``."""
    rows = []
    for path in folder.glob("*.tsv"):
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 4:
                rows.append((parts[0].rsplit("/", 1)[-1], float(parts[1]), parts[2], parts[3]))
    return rows


def report(rows, wall: float, exit_code: int, args: list[str], top: int) -> str:
    by_event, by_test, by_fun = collections.Counter(), collections.Counter(), collections.Counter()
    count_fun, programs = collections.Counter(), collections.Counter()
    for event, seconds, test, fun in rows:
        by_event[event] += seconds
        by_test[test] += seconds
        by_fun[fun] += seconds
        count_fun[fun] += 1
        if event == "backend_compile_duration":
            programs[test] += 1
    total = sum(by_event.values())
    lines = [
        f"# Compile profile: `pytest {' '.join(args)}`",
        "",
        f"Wall time {wall:.0f} s (exit code {exit_code}); XLA compile events {total:.0f} s in all: "
        + ", ".join(f"{e} {by_event[e]:.0f} s" for e in EVENTS) + ".",
        "Seconds are wall-clock under the run's own load (two workers), summed over processes.",
        "",
        "| compile s | programs | test |",
        "|---|---|---|",
    ]
    lines += [f"| {s:.1f} | {programs[t]} | `{t}` |" for t, s in by_test.most_common(top)]
    lines += ["", "| compile s | events | function |", "|---|---|---|"]
    lines += [f"| {s:.1f} | {count_fun[f]} | `{f}` |" for f, s in by_fun.most_common(top)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the Markdown report here too")
    parser.add_argument("--top", type=int, default=40, help="rows per table (default 40)")
    parser.add_argument("--raw", help="also write every event here, one tab-separated row each: "
                                      "event, seconds, test, function (to slice by test and function)")
    parser.add_argument("pytest_args", nargs="*", help="after `--`: pytest's arguments (default: tests)")
    opts = parser.parse_args(argv)
    args = opts.pytest_args or ["-q", "tests"]
    with tempfile.TemporaryDirectory() as site, tempfile.TemporaryDirectory() as logs, \
            tempfile.TemporaryDirectory() as cache:
        pathlib.Path(site, "sitecustomize.py").write_text(SITECUSTOMIZE)
        env = {**os.environ, "NTKSAP_COMPILE_PROFILE": logs, "JAX_COMPILATION_CACHE_DIR": cache,
               "PYTHONPATH": os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))}
        start = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT, env=env)
        wall = time.perf_counter() - start
        rows = read_events(pathlib.Path(logs))
        text = report(rows, wall, code, args, opts.top)
        if opts.raw:
            pathlib.Path(opts.raw).write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))
    print(text)
    if opts.out:
        out = pathlib.Path(opts.out)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(out)
    return code


if __name__ == "__main__":
    sys.exit(main())
