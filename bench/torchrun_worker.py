"""The training script `torchrun` launches in churn_bench.py: DDP over gloo, resume, checkpoint.

This is what a torchrun elastic user runs: on every (re)start it resumes from the last
checkpoint, trains `tinylm` with DDP, and rank 0 writes a checkpoint every `--every`
steps. Rank 0 appends a line to `DIR/events.jsonl` when a generation starts and after
every step (`gen` tells generations apart), so the benchmark sees restarts and work
done. Once `DIR/stop` exists, rank 0 writes a last checkpoint and every rank exits 0:
what the checkpoint then holds is what the job kept.

    torchrun ... bench/torchrun_worker.py --dir DIR --every 50 --per-worker 64
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from bench.harness import TaskData


def save(
    model: nn.Module, optimizer: torch.optim.Optimizer, step: int, samples: int, dir_: Path
) -> None:
    """Checkpoint atomically; the sample count also goes to a small sidecar the driver reads."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
    torch.save({**state, "samples": samples}, dir_ / "ckpt.pt.tmp")
    os.replace(dir_ / "ckpt.pt.tmp", dir_ / "ckpt.pt")
    (dir_ / "ckpt.json.tmp").write_text(json.dumps({"step": step, "samples": samples}))
    os.replace(dir_ / "ckpt.json.tmp", dir_ / "ckpt.json")


def event(dir_: Path, **fields: object) -> None:
    with open(dir_ / "events.jsonl", "a") as log:
        log.write(json.dumps({"t": time.time(), **fields}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--per-worker", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # rank, world and the store come from torchrun's env
    rank, world = dist.get_rank(), dist.get_world_size()
    data = TaskData("tinylm", 8)
    model = data.model(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    step = samples = 0
    checkpoint = args.dir / "ckpt.pt"
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, samples = state["step"], state["samples"]
    ddp = nn.parallel.DistributedDataParallel(model)
    generator = torch.Generator().manual_seed(1000 * step + rank)  # fresh data after a resume
    if rank == 0:
        event(args.dir, kind="start", gen=os.getpid(), world=world, samples=samples, step=step)
    stop = args.dir / "stop"
    while True:
        halt = torch.tensor([float(rank == 0 and stop.exists())])
        dist.broadcast(halt, 0)  # every rank leaves at the same step
        if halt.item():
            if rank == 0:
                save(model, optimizer, step, samples, args.dir)
                event(args.dir, kind="stopped", step=step, samples=samples)
            break
        inputs, targets = data.train_batch(generator, args.per_worker)
        optimizer.zero_grad(set_to_none=True)
        data.loss(ddp(inputs), targets).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        step += 1
        samples += args.per_worker * world
        if rank == 0:
            if step % args.every == 0:
                save(model, optimizer, step, samples, args.dir)
            event(args.dir, kind="step", gen=os.getpid(), step=step, samples=samples)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
