"""Goodput under preemption: collabtrain vs restart-all baselines, same kill schedule.

Four workers train `tinylm` on loopback. Over a fixed window a seeded schedule SIGKILLs a
random running worker on average every `--mean-interval` seconds (exponential gaps) and
starts a replacement `--replace-delay` seconds later, as a spot node is replaced. Each
system's samples committed in the window are compared with the same system without churn.

(a) collabtrain: a real coordinator and peer processes (`LocalCluster`, as
    `collabtrain-trainer local` runs them); a killed peer's replacement joins the running
    job. Samples committed = the coordinator's `samples_committed`.
(b) torchrun-elastic-style: N processes doing DDP over gloo. On any membership change
    (a loss, or a replacement arriving) every worker is stopped and a new generation of
    all available workers starts and resumes from the last checkpoint (rank 0 writes one
    every K steps). This MODELS torchrun's restart-all semantics; torchrun is not run.
(c) checkpoint-restart: as (b), but after a loss the job only restarts once the
    replacement is up, always at full size (no elastic resizing).

Samples committed for (b)/(c) = samples contained in the model state at the end of the
window: work done after the last checkpoint is lost when a generation is stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import print_table, write_result

PEERS = 4
MICRO = 64  # collabtrain micro-batch per peer: the DDP per-worker batch
TARGET = 256  # collabtrain target batch = the DDP global batch (4 x 64)


def schedule(seed: int, window: float, mean: float) -> list[tuple[float, int]]:
    """(seconds after the window starts, a random draw used to pick the victim)."""
    rng = random.Random(seed)
    events, t = [], 0.0
    while True:
        t += rng.expovariate(1.0 / mean)
        if t >= window:
            return events
        events.append((round(t, 2), rng.randrange(1 << 30)))


# --- (a) collabtrain --------------------------------------------------------------------


def run_collab(kills: list[tuple[float, int]], window: float, delay: float) -> dict[str, Any]:
    from collabtrain_trainer.config import LOOPBACK_TIMING, TrainerConfig
    from collabtrain_trainer.local import LocalCluster

    config = TrainerConfig.model_validate(
        {
            "job": "churn",
            "task": "tinylm",
            "target_batch_size": TARGET,
            "micro_batch_size": MICRO,
            "max_steps": 1_000_000,
            "seed": 0,
            "optimizer": {"name": "adamw", "lr": 3e-3},
            "compression": {"codec": "none"},
            "timing": LOOPBACK_TIMING.model_dump(),  # as `collabtrain-trainer local` uses
        }
    )
    workdir = Path(tempfile.mkdtemp(prefix="churn-collab-"))
    cluster = LocalCluster(config, workdir)
    pending: list[float] = []  # replacement start times
    killed = 0
    try:
        cluster.start_coordinator()
        cluster.wait_coordinator()
        for _ in range(PEERS):
            cluster.start_peer()
        first = cluster.wait_for(lambda s: s.step >= 1, 120, "the first step")
        t0, s0 = time.monotonic(), first.samples_committed
        todo = list(kills)
        status = first
        while (now := time.monotonic() - t0) < window:
            while todo and todo[0][0] <= now:
                _, draw = todo.pop(0)
                running = sorted(cluster.running_peers())
                if running:
                    cluster.kill_peer(running[draw % len(running)], signal.SIGKILL)
                    killed += 1
                    pending.append(now + delay)
            for due in [p for p in pending if p <= now]:
                pending.remove(due)
                cluster.start_peer()
            cluster.reap()
            status = cluster.status() or status
            time.sleep(0.1)
        status = cluster.status() or status
        return {
            "samples": status.samples_committed - s0,
            "steps": status.step - first.step,
            "kills": killed,
            "rounds_aborted": cluster.totals.rounds_aborted,
            "param_hashes_agree": cluster.totals.param_hashes_agree,
        }
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# --- (b), (c) torchrun ----------------------------------------------------------------

TORCHRUN_WORKER = Path(__file__).with_name("torchrun_worker.py")


def _start_agent(port: int, dir_: Path, index: int, elastic: bool, every: int) -> Any:
    """One torchrun agent with one worker: a node. Its own session, so a kill takes both."""
    nodes = f"1:{PEERS}" if elastic else f"{PEERS}:{PEERS}"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nodes}",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=churn",
        # The store lives in the driver (a preempted node must not take it down); the
        # last call is shortened from 30 s, as an elastic user on spot nodes would.
        "--rdzv-conf=is_host=false,last_call_timeout=2",
        "--max-restarts=1000",
        "--monitor-interval=0.5",
        str(TORCHRUN_WORKER),
        f"--dir={dir_}",
        f"--every={every}",
        f"--per-worker={TARGET // PEERS}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": _pythonpath()}
    log = open(dir_ / f"agent-{index}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _pythonpath() -> str:
    root = str(Path(__file__).resolve().parent.parent)
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)


def _process_tree(pid: int) -> list[int]:
    """pid and all its descendants, read from /proc (torchrun puts workers in new sessions)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                # The field after the ")" that ends the command name is the state, then ppid.
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(current := todo.pop())
        todo += children.get(current, [])
    return tree


def _kill_node(agent: Any) -> None:
    """A node is reclaimed: the agent and its workers die at once, nothing is told."""
    for pid in _process_tree(agent.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    agent.wait()


def _events(dir_: Path) -> list[dict[str, Any]]:
    path = dir_ / "events.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


def run_torchrun(
    kills: list[tuple[float, int]], window: float, delay: float, every: int, elastic: bool
) -> dict[str, Any]:
    """torchrun agents as nodes; a kill takes a node, its replacement starts `delay` later.

    elastic: `--nnodes 1:4`, so survivors restart at the smaller size and restart again
    when the replacement joins. Not elastic (checkpoint-restart): `--nnodes 4:4`, so the
    job waits for the replacement, then restarts at full size.
    """
    import torch.distributed as dist

    from collabtrain_trainer.local import free_port

    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    dir_ = Path(tempfile.mkdtemp(prefix="churn-torchrun-"))
    agents: dict[int, Any] = {}
    count = 0

    def add_node() -> None:
        nonlocal count
        agents[count] = _start_agent(port, dir_, count, elastic, every)
        count += 1

    try:
        launched = time.time()
        for _ in range(PEERS):
            add_node()
        while not any(e["kind"] == "step" for e in _events(dir_)):
            if time.time() - launched > 180:
                raise TimeoutError(f"torchrun workers did not start; logs in {dir_}")
            time.sleep(0.1)
        t0 = time.time()
        s0 = max(e["samples"] for e in _events(dir_) if e["kind"] == "step")
        pending: list[float] = []
        todo = list(kills)
        while (now := time.time() - t0) < window:
            while todo and todo[0][0] <= now:
                _, draw = todo.pop(0)
                alive = sorted(i for i, a in agents.items() if a.poll() is None)
                if alive:
                    _kill_node(agents.pop(alive[draw % len(alive)]))
                    pending.append(now + delay)
            for due in [p for p in pending if p <= now]:
                pending.remove(due)
                add_node()
            time.sleep(0.05)
        # What the job keeps: a live generation checkpoints and stops; a stalled one (a
        # restart under way) keeps only its last checkpoint.
        (dir_ / "stop").touch()
        stop_asked = time.time()
        while time.time() - stop_asked < 20 and not any(
            e["kind"] == "stopped" and e["t"] >= stop_asked for e in _events(dir_)
        ):
            time.sleep(0.1)
        kept = json.loads((dir_ / "ckpt.json").read_text())["samples"]
        events = _events(dir_)
        starts = [e for e in events if e["kind"] == "start" and t0 <= e["t"] < t0 + window]
        steps = [e for e in events if e["kind"] == "step" and t0 <= e["t"] < t0 + window]
        return {
            "samples": kept - s0,
            "raw_samples_computed": sum(e["samples"] - p["samples"] for p, e in _pairs(steps)),
            "kills": len(kills),
            "restarts": len(starts),
            "generations": [(round(e["t"] - t0, 2), e["world"]) for e in starts],
            "seconds_without_steps": round(_longest_gaps(steps, t0, window), 1),
        }
    finally:
        for agent in agents.values():
            _kill_node(agent)
        del store
        shutil.rmtree(dir_, ignore_errors=True)


def _pairs(steps: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Consecutive steps of one generation (a restart resets the sample count)."""
    return [(a, b) for a, b in itertools.pairwise(steps) if b["samples"] > a["samples"]]


def _longest_gaps(steps: list[dict[str, Any]], t0: float, window: float) -> float:
    """Seconds of the window spent with no step taken for more than 2 s at a time."""
    times = [t0] + [e["t"] for e in steps] + [t0 + window]
    return sum(b - a for a, b in itertools.pairwise(times) if b - a > 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--mean-interval", type=float, default=12.0)
    parser.add_argument("--replace-delay", type=float, default=5.0)
    parser.add_argument("--ckpt-every", type=int, default=50, help="DDP steps per checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.window, args.mean_interval = 20.0, 6.0
    kills = schedule(args.seed, args.window, args.mean_interval)
    print(f"kill schedule (s): {[t for t, _ in kills]}", flush=True)
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    plan = [
        ("collabtrain", lambda k: run_collab(k, args.window, args.replace_delay)),
        (
            "torchrun_elastic",
            lambda k: run_torchrun(k, args.window, args.replace_delay, args.ckpt_every, True),
        ),
        (
            "checkpoint_restart",
            lambda k: run_torchrun(k, args.window, args.replace_delay, args.ckpt_every, False),
        ),
    ]
    baseline: dict[str, float] = {}
    for system, run in plan:
        for churn in (False, True):
            if system == "checkpoint_restart" and not churn:
                # Without churn (c) is the same DDP job as (b): reuse its no-churn rate.
                rows.append({**rows[2], "system": system, "reused_from": "torchrun_elastic"})
                baseline[system] = baseline["torchrun_elastic"]
                continue
            began = time.monotonic()
            result = run(kills if churn else [])
            rate = result["samples"] / args.window
            if not churn:
                baseline[system] = rate
            rows.append(
                {
                    "system": system,
                    "churn": churn,
                    "samples_per_s": round(rate, 1),
                    "goodput": round(rate / baseline.get(system, rate), 3),
                    "run_seconds": round(time.monotonic() - began, 1),
                    "load_avg_1m_after": round(os.getloadavg()[0], 2),
                    **result,
                }
            )
            print_table(rows[-1:], ["system", "churn", "samples", "samples_per_s", "goodput"])
    by = {(r["system"], r["churn"]): r for r in rows}
    summary = {
        "collab_goodput": by[("collabtrain", True)]["goodput"],
        "torchrun_elastic_goodput": by[("torchrun_elastic", True)]["goodput"],
        "checkpoint_restart_goodput": by[("checkpoint_restart", True)]["goodput"],
        "advantage_vs_torchrun": round(
            by[("collabtrain", True)]["samples"]
            / max(1, by[("torchrun_elastic", True)]["samples"]),
            3,
        ),
        "settings": {
            "peers": PEERS,
            "task": "tinylm",
            "global_batch": TARGET,
            "window_s": args.window,
            "mean_kill_interval_s": args.mean_interval,
            "replace_delay_s": args.replace_delay,
            "ddp_checkpoint_every_steps": args.ckpt_every,
            "seed": args.seed,
            "kill_times_s": [t for t, _ in kills],
        },
        "baseline_note": (
            "torchrun_elastic models torchrun's restart-all semantics (stop every worker on "
            "any membership change, restart all available workers from the last checkpoint); "
            "torchrun itself was not run. Workers are forked from a fork server with torch "
            "preloaded (as collabtrain's peers are), so restart cost excludes the torch import."
        ),
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    print_table(rows, ["system", "churn", "samples", "samples_per_s", "goodput", "run_seconds"])
    name = "churn_quick" if args.quick else "churn"
    print(write_result(name, summary, rows))


if __name__ == "__main__":
    main()
