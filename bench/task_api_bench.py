"""The per-step cost of the full task API against the classic one, through the real path.

The same model, data and optimizer twice, each as a real coordinator and two peers on
loopback (`LocalCluster`), alternating, `--repeats` times each:
- `classic`: the built-in `digits` task, `loss(output, target)` on `(inputs, targets)`;
- `full_api`: the same model and samples as a dict batch with `batch_loss`, two parameter
  groups, an `lr_schedule` (constant 1.0), `max_grad_norm` (so large that it never clips:
  the arithmetic stays the same, the norm is still computed every step).
bf16 is left out: it changes the arithmetic, not the API's cost. Timed: seconds per
committed step between step 5 and `--steps`, from the coordinator's status. The figure
`overhead_fraction` = full_api / classic - 1 (medians).

    python -m bench.task_api_bench [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import print_table, write_result

WARM_STEP = 5


def digits_full_api(args: dict[str, str]) -> Any:
    """`digits` through every part of the task API that does not change the arithmetic."""
    from collabtrain_trainer.tasks import DataShard, Task
    from collabtrain_trainer.tasks.digits import make_task

    classic = make_task(args)
    loss = classic.loss
    assert loss is not None

    def batches(shard: DataShard) -> Iterator[dict[str, Any]]:
        for inputs, targets in classic.batches(shard):
            yield {"inputs": inputs, "targets": targets}

    def param_groups(model: Any) -> list[dict[str, Any]]:
        params = list(model.parameters())
        return [
            {"params": [p for p in params if p.dim() >= 2]},
            {"params": [p for p in params if p.dim() < 2]},
        ]

    return Task(
        model=classic.model,
        batches=batches,
        batch_loss=lambda model, batch: loss(model(batch["inputs"]), batch["targets"]),
        param_groups=param_groups,
        lr_schedule=lambda step: 1.0,
        max_grad_norm=1e12,
    )


TASKS = {"classic": "digits", "full_api": "bench.task_api_bench:digits_full_api"}


def seconds_per_step(task: str, steps: int) -> float:
    from collabtrain_trainer.config import LOOPBACK_TIMING, TrainerConfig
    from collabtrain_trainer.local import LocalCluster

    config = TrainerConfig.model_validate(
        {
            "job": "task-api",
            "task": task,
            "target_batch_size": 64,
            "micro_batch_size": 8,
            "max_steps": steps,
            "min_peers": 2,
            "seed": 0,
            "optimizer": {"name": "adamw", "lr": 0.01},
            "compression": {"codec": "none"},
            "timing": LOOPBACK_TIMING.model_dump(),
        }
    )
    workdir = Path(tempfile.mkdtemp(prefix="task-api-bench-"))
    cluster = LocalCluster(config, workdir)
    try:
        cluster.start_coordinator()
        cluster.wait_coordinator()
        for _ in range(2):
            cluster.start_peer()
        cluster.wait_for(lambda s: s.step >= WARM_STEP, 300, f"step {WARM_STEP}")
        started = time.monotonic()
        cluster.wait_for(lambda s: s.step >= steps, 600, f"step {steps}")
        return (time.monotonic() - started) / (steps - WARM_STEP)
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one short run of each")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=45)
    args = parser.parse_args()
    repeats, steps = (1, 15) if args.quick else (args.repeats, args.steps)
    rows = []
    for repeat in range(repeats):
        # Alternating, so a slow spell of this shared machine hits both alike.
        for name, task in TASKS.items() if repeat % 2 == 0 else reversed(TASKS.items()):
            rows.append(
                {"api": name, "repeat": repeat, "seconds_per_step": seconds_per_step(task, steps)}
            )
            print_table(rows[-1:], ["api", "repeat", "seconds_per_step"])
    median = {
        name: statistics.median(r["seconds_per_step"] for r in rows if r["api"] == name)
        for name in TASKS
    }
    summary = {
        "classic_seconds_per_step": round(median["classic"], 4),
        "full_api_seconds_per_step": round(median["full_api"], 4),
        "overhead_fraction": round(median["full_api"] / median["classic"] - 1, 4),
        "task": "digits, AdamW, 2 peers, target batch 64 in micro-batches of 8, codec none",
        "runtime": "full: coordinator and two peer processes on loopback",
    }
    print_table([summary], list(summary)[:3])
    print(write_result("task_api_quick" if args.quick else "task_api", summary, rows))


if __name__ == "__main__":
    main()
