"""Shared reporting for the benchmarks: machine description, a rich table, the JSON file, and
runs paired with their reference."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "cpu model"):
            return value.strip()
    return platform.processor() or None


def machine_info() -> dict[str, Any]:
    """What the figures were measured on; versions come from package metadata, not imports."""
    try:
        usable_cpus: int | None = len(os.sched_getaffinity(0))
    except AttributeError:
        usable_cpus = None
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus,
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "grpcio": _version("grpcio"),
        "platform": platform.platform(),
    }


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def print_table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Print ``rows`` as a table with ``columns`` in that order; numbers right-aligned."""
    table = Table(title=title)
    for column in columns:
        numeric = any(
            isinstance(row.get(column), int | float) and not isinstance(row.get(column), bool)
            for row in rows
        )
        table.add_column(column, justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(_cell(row.get(column)) for column in columns))
    Console().print(table)


def write_json(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    """Write ``payload`` plus "machine" and "timestamp" to ``out``; return the path written.

    ``out`` defaults to ./bench-results/<name>.json. An ``out`` that is an existing folder or has
    no suffix is taken as a folder and gets <name>.json inside it; missing folders are created.
    """
    if out is None:
        path = Path("bench-results") / f"{name}.json"
    elif out.is_dir() or not out.suffix:
        path = out / f"{name}.json"
    else:
        path = out
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        **payload,
        "machine": machine_info(),
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path


def interleaved(reference: Callable[[], float], measured: Callable[[], float], repeats: int,
                fmt: str = "{:,.0f}") -> tuple[str, str, dict[str, str]]:
    """``repeats`` runs of ``reference`` and ``measured``, interleaved in pairs: this small VM's
    noise drifts, and falls on both of a pair alike. Their medians, formatted with ``fmt``,
    and the ratio measured / reference as the median of the pairs' ratios with their range."""
    pairs = [(reference(), measured()) for _ in range(repeats)]
    ratios = sorted(m / r for r, m in pairs)
    return (fmt.format(statistics.median(r for r, _ in pairs)), fmt.format(statistics.median(m for _, m in pairs)),
            {"ratio": f"{statistics.median(ratios):.2f}", "ratio range": f"{ratios[0]:.2f}–{ratios[-1]:.2f}"})
