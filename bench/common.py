"""Shared helpers of the benchmark scripts: tables, JSON results, medians."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import os

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_result(name: str, summary: dict[str, Any], rows: Sequence[dict[str, Any]]) -> Path:
    """Write bench/results/<name>.json: the summary keys at top level, rows beside them."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**summary, "rows": list(rows), "machine": machine()}, indent=2))
    return path


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    widths = [max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(
            "  ".join(cell(row.get(c, "")).ljust(w) for c, w in zip(columns, widths, strict=True))
        )


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))
