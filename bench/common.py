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


def bar_plot(path: Path, bars: dict[str, dict[str, float]], xlabel: str, title: str) -> None:
    """Horizontal grouped bars: one group per outer key, one bar per inner key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(bars)
    series = list(dict.fromkeys(name for inner in bars.values() for name in inner))
    height = 0.8 / max(1, len(series))
    fig, axes = plt.subplots(figsize=(9, 1.2 + 0.5 * len(groups) * max(1, len(series))))
    for i, name in enumerate(series):
        positions = [g + i * height for g in range(len(groups))]
        values = [bars[group].get(name, 0.0) for group in groups]
        axes.barh(positions, values, height=height, label=name)
    axes.set_yticks([g + height * (len(series) - 1) / 2 for g in range(len(groups))], groups)
    axes.invert_yaxis()
    axes.set_xlabel(xlabel)
    axes.set_title(title, fontsize=10)
    if len(series) > 1:
        axes.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def job_object(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A CollaborativeTrainingJob with `spec`, as the benches create them."""
    from collabtrain_operator.api import API_VERSION, KIND

    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
