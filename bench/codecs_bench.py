"""Compression at equal quality: every codec on the same 4-peer training run.

Four peers are four real processes in one gloo group on loopback. Each trains the same
seeded model on the same samples with the same hyperparameters, once per codec, averaging
gradients with collabtrain's `average()` (reduce-scatter by all_to_all + all_gather;
PowerSGD by all_reduce). Per codec: the final held-out loss, the bytes this peer actually
put on the wire per step (`ExchangeResult.bytes_sent`, metadata included) and the ratio
against a plain fp32 ring all-reduce of the same gradient. The headline grid is tinylm
with AdamW; three tinylm codecs are repeated with momentum SGD, and the digits MLP runs
the whole grid with AdamW.

What it does not measure: the coordinator/peer runtime (membership, rounds, target batch,
churn) and time on a slow link (see slow_links_bench.py). Codec speed on CPU is recorded
(`exchange_ms_median`) but the machine is shared, so treat it as indicative only.

    python -m bench.codecs_bench [--quick] [--steps N] [--no-digits] [--no-sgd]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bench.common import RESULTS, print_table, write_result
from bench.harness import Hyper, TaskData, run_group, train
from collabtrain_trainer.config import CompressionConfig

PEERS = 4
TOPK_RATIOS = (0.05, 0.015, 0.004)  # about 12x, 33x and 120x fewer bytes than fp32
POWERSGD_RANKS = (1, 2, 4)
# The headline grid uses AdamW, the runtime's default and the best fp32 loss here. Error
# feedback with Adam starves small-gradient coordinates (Adam would give them full-size
# steps; top-k sends them rarely), so a few codecs are also run with momentum SGD, the
# optimizer the top-k and PowerSGD papers pair with error feedback.
SGD = {"optimizer": "sgd", "lr": 0.15, "momentum": 0.9}
SGD_CODECS = ("none", "topk 0.015 +EF", "powersgd r4 +EF")


@dataclass(frozen=True)
class Variant:
    label: str
    compression: CompressionConfig
    hyper: Hyper
    series: str  # "adamw" (the headline grid) or "sgd"


def codec_grid() -> list[tuple[str, CompressionConfig]]:
    grid = [
        ("none", CompressionConfig(codec="none")),
        ("fp16", CompressionConfig(codec="fp16")),
        ("int8", CompressionConfig(codec="int8", block_size=256)),
        ("int4", CompressionConfig(codec="int4", block_size=256)),
    ]
    for ratio in TOPK_RATIOS:
        for feedback in (True, False):
            label = f"topk {ratio:g}" + (" +EF" if feedback else " noEF")
            config = CompressionConfig(codec="topk", ratio=ratio, error_feedback=feedback)
            grid.append((label, config))
    for rank in POWERSGD_RANKS:
        config = CompressionConfig(codec="powersgd", rank=rank, error_feedback=True)
        grid.append((f"powersgd r{rank} +EF", config))
    return grid


def variants(hyper: Hyper, with_sgd: bool) -> list[Variant]:
    grid = codec_grid()
    found = [Variant(label, config, hyper, "adamw") for label, config in grid]
    if with_sgd:
        sgd = replace(hyper, **SGD)  # type: ignore[arg-type]
        found += [Variant(label, c, sgd, "sgd") for label, c in grid if label in SGD_CODECS]
    return found


def _worker(rank: int, port: int, task: str, todo: list[Variant], out: str) -> None:
    torch.set_num_threads(1)  # four peers share two cores
    # A diverging codec would log an exclusion per rank per step; the loss says enough.
    logging.getLogger("collabtrain_trainer.averaging.exchange").setLevel(logging.ERROR)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=PEERS
    )
    group = dist.group.WORLD
    assert group is not None
    data = TaskData(task, todo[0].hyper.eval_examples, dict(todo[0].hyper.task_args))
    rows = []
    for variant in todo:
        record = train(variant.label, variant.compression, variant.hyper, data, group)
        row = {**record.as_row(), "series": variant.series, "optimizer": variant.hyper.optimizer}
        if rank == 0:
            print(
                f"  {task} [{variant.series}] {variant.label}: loss "
                f"{record.final_eval_loss:.4f} ({record.train_seconds:.0f} s)",
                flush=True,
            )
        rows.append(row)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def run_task(task: str, todo: list[Variant]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = run_group(_worker, (task, todo), PEERS)
    for row in rows:
        row["task"] = task
        row["ratio_vs_fp32"] = row["bytes_fp32_per_step"] / row["bytes_sent_per_step"]
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Within-1% flags against the `none` row of the same series; the best ratio among them."""
    fp32 = next(r for r in rows if r["label"] == "none")["final_eval_loss"]
    for row in rows:
        loss = row["final_eval_loss"]
        row["loss_vs_fp32"] = loss / fp32 - 1 if math.isfinite(loss) else None
        row["within_1pct"] = math.isfinite(loss) and loss <= fp32 * 1.01
    within = [r for r in rows if r["within_1pct"] and r["label"] != "none"]
    best = max(within, key=lambda r: r["ratio_vs_fp32"], default=None)
    return {
        "fp32_final_loss": fp32,
        "best_codec_within_1pct": best["label"] if best else None,
        "best_ratio_within_1pct": best["ratio_vs_fp32"] if best else None,
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows}, key=lambda t: t != "tinylm")
    fig, axes = plt.subplots(len(tasks), 2, figsize=(14, 5.5 * len(tasks)), squeeze=False)
    for (bars, curves), task in zip(axes, tasks, strict=True):
        task_rows = [r for r in rows if r["task"] == task]
        fp32 = next(r for r in task_rows if r["label"] == "none")["final_eval_loss"]
        # Runs far off (diverged ones included) are listed by name: they would flatten the axes.
        shown = [r for r in task_rows if r["loss_vs_fp32"] is not None and r["loss_vs_fp32"] < 2]
        off = [f"{r['series']}: {r['label']}" for r in task_rows if r not in shown]
        names = [f"{r['series']}: {r['label']}  ({r['ratio_vs_fp32']:.1f}x)" for r in shown]
        values = [100 * r["loss_vs_fp32"] for r in shown]
        colors = ["tab:green" if r["within_1pct"] else "tab:red" for r in shown]
        bars.barh(names, values, color=colors)
        bars.axvline(1, color="grey", linestyle="--", label="1% over fp32")
        bars.invert_yaxis()
        bars.set_xlabel("final held-out loss over fp32 of the same optimizer (%)")
        title = f"{task}: 4 peers; label (bytes ratio vs fp32 all-reduce)"
        if off:
            title += f"\nmore than 200% over (not drawn): {', '.join(off)}"
        bars.set_title(title, fontsize=9)
        bars.tick_params(axis="y", labelsize=7)
        bars.legend(fontsize=7)
        for row in shown:
            steps, _, losses = zip(*row["curve"], strict=True)
            dashed = row["series"] != "adamw"
            curves.plot(
                steps,
                losses,
                label=f"{row['series']}: {row['label']}",
                linewidth=1,
                linestyle="--" if dashed else "-",
            )
        low = min(r["final_eval_loss"] for r in shown)
        curves.set_ylim(low * 0.98, fp32 * 1.5)
        curves.set_xlabel("step")
        curves.set_ylabel("held-out loss")
        curves.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps")
    parser.add_argument("--steps", type=int, default=None, help="tinylm steps (default 400)")
    parser.add_argument("--no-digits", action="store_true", help="skip the digits MLP")
    parser.add_argument("--no-sgd", action="store_true", help="skip the momentum-SGD rows")
    args = parser.parse_args()

    tinylm = Hyper(task="tinylm", steps=400, lr=3e-3, eval_every=50)
    digits = Hyper(task="digits", steps=200, lr=1e-2, eval_every=25)
    if args.steps:
        tinylm = replace(tinylm, steps=args.steps)
    if args.quick:
        tinylm = replace(tinylm, steps=20, eval_every=10, eval_examples=128)
        digits = replace(digits, steps=20, eval_every=10)
    plan = [("tinylm", variants(tinylm, with_sgd=not args.no_sgd))]
    if not args.no_digits:
        plan.append(("digits", variants(digits, with_sgd=False)))

    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    summaries: dict[str, dict[str, Any]] = {}
    for task, todo in plan:
        print(f"{task}: {len(todo)} runs of {todo[0].hyper.steps} steps, {PEERS} peers")
        task_rows = run_task(task, todo)
        for series in dict.fromkeys(r["series"] for r in task_rows):
            series_rows = [r for r in task_rows if r["series"] == series]
            hyper = next(v.hyper for v in todo if v.series == series)
            summaries[f"{task}/{series}"] = {**summarize(series_rows), "hyperparameters": hyper}
        rows.extend(task_rows)
    elapsed = time.perf_counter() - started

    columns = [
        "task",
        "series",
        "label",
        "final_eval_loss",
        "loss_vs_fp32",
        "within_1pct",
        "bytes_sent_per_step",
        "ratio_vs_fp32",
        "exchange_ms_median",
        "train_seconds",
        "params_agree",
    ]
    print_table(rows, columns)
    headline = summaries["tinylm/adamw"]
    summary: dict[str, Any] = {
        **{k: v for k, v in headline.items() if k != "hyperparameters"},
        "goal_ratio_within_1pct": 32,
        "goal_met": (headline["best_ratio_within_1pct"] or 0) >= 32,
        "peers": PEERS,
        "per_series": {
            k: {**v, "hyperparameters": v["hyperparameters"].__dict__} for k, v in summaries.items()
        },
        "quick": args.quick,
        "seconds": round(elapsed, 1),
        "loadavg_1min_at_end": round(os.getloadavg()[0], 1),  # two cores, shared
        "measures": (
            "collabtrain's average() inside a synchronous 4-process gloo training loop on "
            "loopback, not the coordinator/peer runtime (no rounds, no target batch, no "
            "churn); the headline keys are tinylm with AdamW; loss is the final held-out "
            "loss; bytes are ExchangeResult.bytes_sent per peer per step, metadata included; "
            "the ratio is against a plain fp32 ring all-reduce of the same gradient; "
            "within_1pct compares with the `none` row of the same task and optimizer"
        ),
    }
    name = "codecs_quick" if args.quick else "codecs"
    path = write_result(name, summary, rows)
    plot(rows, RESULTS / f"{name}.png")
    for key, value in summaries.items():
        print(
            f"{key}: fp32 loss {value['fp32_final_loss']:.4f}; best within 1%: "
            f"{value['best_codec_within_1pct']} at {value['best_ratio_within_1pct']}x"
        )
    print(f"({elapsed:.0f} s) -> {path}")


if __name__ == "__main__":
    main()
