"""Shared by the benchmark scripts: write a report as JSON and its Markdown table, atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def write_report(stem: Path, report: dict, markdown: Callable[[dict], str]) -> str:
    """Write ``stem.json`` and ``stem.md`` (temp file + rename each) and return the table.

    Example::

      table = write_report(RESULTS / "scaling_cpu", report, markdown)
    """
    from ntksap_jax._io import atomic_write_text

    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stem.with_suffix(".json"), json.dumps(report, indent=1) + "\n")
    table = markdown(report)
    atomic_write_text(stem.with_suffix(".md"), table)
    return table
