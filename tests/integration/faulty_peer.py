"""A peer with faults injected from the test side: the trainer's own `peer` command, with
some of `Peer`'s methods wrapped before it starts. Production code has no hooks; the tests
start every local peer through `main` here (LocalCluster's `peer_main`), and a peer
without the environment variables below runs unchanged.

FAULTS_ENV (JSON):
- pause_phase: "formation" (assignment received, not ready yet), "exchange" (process group
  built, before averaging), "vote" (averaged, before voting), "apply" (commit received,
  before the optimizer step) or "serve" (halfway through sending its state to a
  newcomer); the peer writes its pid to `marker` when it pauses there at step >=
  `pause_step`, then sleeps (its heartbeat thread goes on). Peers given the same marker
  pause once between them: whoever finds it written goes on.
- nan_step: the contribution of the first round at or after that step is NaN, once.
- slowdown: train this many times slower (and report the slower rate).
NETNS_ENV: a network namespace (testbed.network) the peer runs in.
DUMP_DIR_ENV: a folder; each committed step writes what the peer contributed, the average
it applied and its parameters after, so a test can recompute the step with
torch.distributed.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FAULTS_ENV = "COLLABTRAIN_TEST_FAULTS"
NETNS_ENV = "COLLABTRAIN_TEST_NETNS"  # a network namespace to run in (testbed.network)
DUMP_DIR_ENV = "COLLABTRAIN_TEST_DUMP_DIR"

log = logging.getLogger("collabtrain.peer")


def faults_env(**faults: Any) -> dict[str, str]:
    """The environment that starts a local peer with these faults."""
    return {FAULTS_ENV: json.dumps(faults)}


@dataclass
class Faults:
    pause_phase: str | None = None
    pause_step: int = 0
    marker: str | None = None
    nan_step: int | None = None
    slowdown: float = 1.0

    def maybe_pause(self, phase: str, step: int) -> None:
        if self.pause_phase != phase or step < self.pause_step:
            return
        if self.marker:
            try:
                with open(self.marker, "x") as marker:
                    marker.write(f"{os.getpid()}\n")
            except FileExistsError:
                return  # another peer paused on this marker
        log.warning("fault injection: pausing in phase %s", phase)
        time.sleep(3600)


def main(args: list[str]) -> int:
    from collabtrain_trainer import cli

    if os.environ.get(NETNS_ENV):
        from testbed.network import enter_netns

        enter_netns(os.environ[NETNS_ENV])

    raw = os.environ.get(FAULTS_ENV)
    dump_dir = os.environ.get(DUMP_DIR_ENV)
    if raw or dump_dir:
        _instrument(Faults(**json.loads(raw)) if raw else Faults(), dump_dir)
    return cli.main(args)


def _instrument(faults: Faults, dump_dir: str | None) -> None:
    from collabtrain_trainer.peer import rounds, runtime, state_server, training

    peer_class = runtime.Peer
    real_run_round = peer_class._run_round
    real_apply = peer_class._apply
    real_train = training.Training.train_micro_batch
    real_average = rounds.average
    # The round this process is in (one training thread) and what it sent in it.
    current: dict[str, Any] = {}

    @functools.wraps(real_run_round)
    def run_round(self: Any, assignment: Any) -> None:
        current.clear()
        current["assignment"] = assignment
        faults.maybe_pause("formation", assignment.step)
        real_run_round(self, assignment)
        if dump_dir and self.step == assignment.step + 1 and "result" in current:
            _dump(Path(dump_dir), self, assignment, current)

    @functools.wraps(real_average)
    def average(contribution: torch.Tensor, weight: float, *rest: Any, **kwargs: Any) -> Any:
        step = current["assignment"].step
        faults.maybe_pause("exchange", step)
        current["contribution"] = contribution.cpu().clone()
        current["weight"] = weight
        if faults.nan_step is not None and step >= faults.nan_step:
            faults.nan_step = None
            log.warning("fault injection: sending a NaN gradient")
            contribution = torch.full_like(contribution, float("nan"))
        result = real_average(contribution, weight, *rest, **kwargs)
        current["result"] = result
        faults.maybe_pause("vote", step)
        return result

    @functools.wraps(real_apply)
    def apply(self: Any, averaged: torch.Tensor, new_step: int, *rest: Any) -> None:
        faults.maybe_pause("apply", new_step - 1)
        real_apply(self, averaged, new_step, *rest)

    @functools.wraps(real_train)
    def train_micro_batch(self: Any, step: int) -> int:
        before = self.accumulator.recent_rate
        started = time.perf_counter()
        samples = real_train(self, step)
        elapsed = time.perf_counter() - started
        time.sleep(elapsed * (faults.slowdown - 1))
        # Report the rate the peer really trains at, as a slow machine would.
        rate = samples / max(elapsed * faults.slowdown, 1e-6)
        self.accumulator.recent_rate = rate if not before else 0.8 * before + 0.2 * rate
        return samples

    real_serve = state_server.StateServer._serve_chunk

    @functools.wraps(real_serve)
    def serve_chunk(self: Any, handler: Any, snapshot: Any, index: int) -> None:
        step = snapshot.manifest.step
        writes = handler.wfile

        class PausingHalfwayThroughTheBody:
            written = 0

            def write(self, data: bytes) -> int:
                self.written += 1
                if self.written != 2:
                    return int(writes.write(data))
                # The headers went first; this is the body's start.
                half = len(data) // 2
                writes.write(data[:half])
                writes.flush()
                faults.maybe_pause("serve", step)
                writes.write(data[half:])
                return len(data)

            def flush(self) -> None:
                writes.flush()

        handler.wfile = PausingHalfwayThroughTheBody()
        real_serve(self, handler, snapshot, index)

    state_server.StateServer._serve_chunk = serve_chunk  # type: ignore[method-assign]
    peer_class._run_round = run_round  # type: ignore[method-assign]
    peer_class._apply = apply  # type: ignore[method-assign]
    if faults.slowdown > 1:
        training.Training.train_micro_batch = train_micro_batch  # type: ignore[method-assign]
    rounds.average = average  # type: ignore[assignment]


def _dump(directory: Path, peer: Any, assignment: Any, sent: dict[str, Any]) -> None:
    torch.save(
        {
            "step": assignment.step,
            "members": assignment.members,
            "rank": assignment.rank,
            "weight": sent["weight"],
            "contribution": sent["contribution"],
            "average": sent["result"].average.cpu(),
            "params_after": {
                k: v.cpu().clone() for k, v in peer.training.model.state_dict().items()
            },
        },
        directory / f"{peer.peer_id}-step{assignment.step}.pt",
    )
