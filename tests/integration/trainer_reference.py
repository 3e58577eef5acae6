"""The reference for exactness tests: a plain torch.distributed gloo all_reduce of the
weighted contributions, run in its own processes (one group for all the steps checked)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import TCPStore  # type: ignore[attr-defined]

from collabtrain_trainer.local import _context, free_port


def _worker(rank: int, world: int, port: int, rounds: list[tuple[Tensor, float]], out: Any) -> None:
    store = TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timedelta(seconds=30))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    means = []
    for contribution, weight in rounds:
        weighted = contribution * weight
        total = torch.tensor([weight], dtype=torch.float32)
        dist.all_reduce(weighted)
        dist.all_reduce(total)
        means.append((weighted / total).tolist())
    if rank == 0:
        out.put(means)  # plain data: this process exits next
    dist.destroy_process_group()


def weighted_means_by_all_reduce(rounds: list[tuple[list[Tensor], list[float]]]) -> list[Tensor]:
    """For each round (contributions by rank, weights by rank): sum(w g) / sum(w)."""
    world = len(rounds[0][0])
    if any(len(contributions) != world for contributions, _ in rounds):
        raise ValueError("every round checked together must have the same number of members")
    port = free_port()
    queue = _context.Queue()
    workers = [
        _context.Process(
            target=_worker,
            args=(rank, world, port, [(c[rank], w[rank]) for c, w in rounds], queue),
        )
        for rank in range(world)
    ]
    for worker in workers:
        worker.start()
    try:
        means = queue.get(timeout=60)
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
    return [torch.tensor(mean, dtype=torch.float32) for mean in means]


@dataclass
class StepDump:
    """What a peer wrote about one committed step (faulty_peer.DUMP_DIR_ENV)."""

    peer: str
    step: int
    members: list[str]
    rank: int
    weight: float
    contribution: torch.Tensor
    average: torch.Tensor
    params_after: torch.Tensor  # flat


def load_step_dumps(dump_dir: Path) -> dict[int, list[StepDump]]:
    """The dumps of every committed step, by step."""
    by_step: dict[int, list[StepDump]] = {}
    for path in dump_dir.glob("*.pt"):
        raw = torch.load(path, weights_only=False)
        dump = StepDump(
            peer=path.name.split("-step")[0],
            step=int(raw["step"]),
            members=list(raw["members"]),
            rank=int(raw["rank"]),
            weight=float(raw["weight"]),
            contribution=raw["contribution"],
            average=raw["average"],
            params_after=torch.cat([v.reshape(-1) for v in raw["params_after"].values()]),
        )
        by_step.setdefault(dump.step, []).append(dump)
    return by_step
