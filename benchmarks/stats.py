"""Summaries: every figure is the median of several measured runs (warm-up excluded), with min and max."""

from __future__ import annotations

import statistics
from typing import Any


def summary(values: list[float], unit: str) -> dict[str, Any]:
    """Median, min and max of the measured runs (the warm-up is never passed in)."""
    if not values:
        raise ValueError("no measured runs")
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": len(values),
        "values": values,
        "unit": unit,
    }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def fmt_rate(value: float, unit: str) -> str:
    if unit == "B/s":
        return f"{value / 1e9:.2f} GB/s" if value >= 1e8 else f"{value / 1e6:.1f} MB/s"
    if unit == "bit/s":
        return f"{value / 1e9:.2f} Gbit/s"
    if unit == "s":
        return f"{value * 1e3:.3f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "B":
        return f"{value / 1024:.1f} KiB"
    return f"{value:,.0f} {unit}"


def fmt_summary(s: dict[str, Any]) -> str:
    unit = s["unit"]
    return f"{fmt_rate(s['median'], unit)} [{fmt_rate(s['min'], unit)} … {fmt_rate(s['max'], unit)}]"


def rotated(names: list[str], run: int) -> list[str]:
    """``names`` in the order for round ``run``: each round starts one further along, so a
    disturbance on the machine, and the position in a round, fall on every contender alike."""
    if not names:
        return []
    shift = run % len(names)
    return names[shift:] + names[:shift]
