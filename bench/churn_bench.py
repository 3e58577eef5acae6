"""Goodput under preemption: collabtrain vs torchrun, same kill schedules.

Four workers train `tinylm` on loopback. Over a fixed window a seeded schedule SIGKILLs a
random running worker on average every `--mean-interval` seconds (exponential gaps) and
starts a replacement `--replace-delay` seconds later, as a spot node is replaced. Each
system's samples committed in the window are compared with the same system without
churn; `--repeats` schedules (seeds seed, seed + 1, ...) run interleaved, medians taken.

(a) collabtrain: a real coordinator and peer processes (`LocalCluster`, as
    `collabtrain-trainer local` runs them); a killed peer's replacement joins the running
    job. Samples committed = the coordinator's `samples_committed`. Also with local
    updates (`collabtrain_local_updates`: rounds of 16 target batches, int4
    pseudo-gradients, the best setting of local_updates_bench): a killed peer loses the
    inner steps it took since the last commit.
(b) torchrun elastic: four real `torchrun` agents (`--nnodes 1:4`, c10d rendezvous, one
    worker each) running `torchrun_worker.py`: DDP over gloo, resume from the last
    checkpoint on every start, rank 0 checkpoints every K steps. A kill takes a node
    (agent and worker); the survivors' agents restart their workers, and again when the
    replacement's agent arrives.
(c) checkpoint-restart: the same with `--nnodes 4:4`: after a loss the job waits for the
    replacement, then restarts at full size from the last checkpoint.

Samples committed for (b)/(c) = what the checkpoint holds at the end of the window (a
live generation is asked to checkpoint and stop; work since the last checkpoint of a
generation that died is lost).
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

from bench.common import RESULTS, bar_plot, median, print_table, write_result

PEERS = 4
MICRO = 64  # collabtrain micro-batch per peer: the DDP per-worker batch
TARGET = 256  # collabtrain target batch = the DDP global batch (4 x 64)


def schedule(seed: int, window: float, mean: float) -> list[tuple[float, int]]:
    """(seconds after the window starts, a random draw used to pick the victim)."""
    rng = random.Random(seed)
    events: list[tuple[float, int]] = []
    t = 0.0
    while True:
        t += rng.expovariate(1.0 / mean)
        if t >= window:
            return events
        events.append((round(t, 2), rng.randrange(1 << 30)))


# --- (a) collabtrain --------------------------------------------------------------------


LOCAL_UPDATES = {"inner_steps": 16}


def run_collab(
    kills: list[tuple[float, int]], window: float, delay: float, local_updates: bool = False
) -> dict[str, Any]:
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
            "compression": {"codec": "int4" if local_updates else "none"},
            "local_updates": LOCAL_UPDATES if local_updates else None,
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
        # The store lives in the driver: a preempted node must not take it down. The
        # rendezvous timeouts are torchrun's defaults; shorter ones made survivors
        # re-form without nodes still on their way back and restart again (see README).
        "--rdzv-conf=is_host=false",
        "--max-restarts=1000",
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
    store = dist.TCPStore(  # type: ignore[attr-defined]
        "127.0.0.1", port, is_master=True, wait_for_workers=False
    )
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
        # No checkpoint at all (a node lost before the first one): the job kept nothing.
        sidecar = dir_ / "ckpt.json"
        kept = json.loads(sidecar.read_text())["samples"] if sidecar.exists() else 0
        events = _events(dir_)
        starts = [e for e in events if e["kind"] == "start" and t0 <= e["t"] < t0 + window]
        steps = [e for e in events if e["kind"] == "step" and t0 <= e["t"] < t0 + window]
        return {
            # Below zero when the job ends behind where the window opened; counted as 0.
            "samples": max(0, kept - s0),
            "kept_samples": kept,
            "samples_at_window_start": s0,
            "raw_samples_computed": _computed(steps),
            "kills": len(kills),
            "restarts": len(starts),
            "generations": [(round(e["t"] - t0, 2), e["world"]) for e in starts],
            "seconds_without_steps": round(_seconds_without_steps(steps, t0, window), 1),
        }
    finally:
        for agent in agents.values():
            _kill_node(agent)
        del store
        shutil.rmtree(dir_, ignore_errors=True)


def _computed(steps: list[dict[str, Any]]) -> int:
    """Samples computed over these step events by all generations, kept or lost."""
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for e in steps:
        first.setdefault(e["gen"], e["samples"])
        last[e["gen"]] = e["samples"]
    # A generation's first step in the window already holds one step of its work: close
    # enough at 50+ steps per generation.
    return sum(last[g] - first[g] for g in last)


def _seconds_without_steps(steps: list[dict[str, Any]], t0: float, window: float) -> float:
    """Seconds of the window spent in gaps of more than 2 s between steps."""
    times = [t0] + [float(e["t"]) for e in steps] + [t0 + window]
    return sum(b - a for a, b in itertools.pairwise(times) if b - a > 2)


SYSTEMS = ("collabtrain", "collabtrain_local_updates", "torchrun_elastic", "checkpoint_restart")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--mean-interval", type=float, default=12.0)
    parser.add_argument("--replace-delay", type=float, default=5.0)
    parser.add_argument("--ckpt-every", type=int, default=50, help="DDP steps per checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="repeat r uses seed + r")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"a subset of {', '.join(SYSTEMS)}"
    )
    parser.add_argument("--output", default="churn", help="bench/results/<output>.json")
    args = parser.parse_args()
    systems = [s for s in SYSTEMS if s in args.systems.split(",")]
    if "checkpoint_restart" in systems and "torchrun_elastic" not in systems:
        parser.error("checkpoint_restart shares torchrun_elastic's no-churn runs: add it")
    if args.quick:
        args.window, args.mean_interval, args.repeats = 20.0, 6.0, 1
    runners = {
        "collabtrain": lambda k: run_collab(k, args.window, args.replace_delay),
        "collabtrain_local_updates": lambda k: run_collab(
            k, args.window, args.replace_delay, local_updates=True
        ),
        "torchrun_elastic": lambda k: run_torchrun(
            k, args.window, args.replace_delay, args.ckpt_every, True
        ),
        "checkpoint_restart": lambda k: run_torchrun(
            k, args.window, args.replace_delay, args.ckpt_every, False
        ),
    }
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    schedules = []
    # Repeats are interleaved (every system once per repeat, same kill schedule), so a
    # slow spell on the shared machine lands on all systems rather than on one.
    for repeat in range(args.repeats):
        kills = schedule(args.seed + repeat, args.window, args.mean_interval)
        schedules.append([t for t, _ in kills])
        print(f"repeat {repeat}: kill schedule (s) {schedules[-1]}", flush=True)
        for system in systems:
            # Without churn checkpoint-restart is the same 4-node DDP job as elastic.
            for churn in (False, True) if system != "checkpoint_restart" else (True,):
                began = time.monotonic()
                result = runners[system](kills if churn else [])
                rows.append(
                    {
                        "system": system,
                        "churn": churn,
                        "repeat": repeat,
                        "samples_per_s": round(result["samples"] / args.window, 1),
                        "run_seconds": round(time.monotonic() - began, 1),
                        "load_avg_1m_after": round(os.getloadavg()[0], 2),
                        **result,
                    }
                )
                print_table(rows[-1:], ["system", "churn", "repeat", "samples", "samples_per_s"])
                sys.stdout.flush()

    def rate(system: str, churn: bool) -> float:
        if system == "checkpoint_restart" and not churn:
            system = "torchrun_elastic"
        found = [r["samples_per_s"] for r in rows if (r["system"], r["churn"]) == (system, churn)]
        return median(found)

    table: list[dict[str, Any]] = [
        {
            "system": system,
            "no_churn_samples_per_s": rate(system, False),
            "churn_samples_per_s": rate(system, True),
            "goodput": round(rate(system, True) / rate(system, False), 3),
        }
        for system in systems
    ]
    goodput = {row["system"]: row["goodput"] for row in table}
    both = {"collabtrain", "torchrun_elastic"} <= set(systems)
    summary = {
        "collab_goodput": goodput.get("collabtrain"),
        "collab_local_updates_goodput": goodput.get("collabtrain_local_updates"),
        "torchrun_elastic_goodput": goodput.get("torchrun_elastic"),
        "checkpoint_restart_goodput": goodput.get("checkpoint_restart"),
        # Same wall time with churn, so the ratio of rates is the ratio of samples.
        "advantage_vs_torchrun": (
            round(rate("collabtrain", True) / max(1e-9, rate("torchrun_elastic", True)), 3)
            if both
            else None
        ),
        "medians": table,
        "settings": {
            "peers": PEERS,
            "task": "tinylm",
            "global_batch": TARGET,
            "local_updates": LOCAL_UPDATES | {"codec": "int4"},
            "collab_micro_batch": MICRO,
            "window_s": args.window,
            "mean_kill_interval_s": args.mean_interval,
            "replace_delay_s": args.replace_delay,
            "ddp_checkpoint_every_steps": args.ckpt_every,
            "repeats": args.repeats,
            "seeds": [args.seed + r for r in range(args.repeats)],
            "kill_times_s": schedules,
        },
        "baseline_note": (
            "torchrun_elastic and checkpoint_restart run real torchrun agents (c10d "
            "rendezvous with torchrun's default timeouts, the store outside the agents), "
            "one worker each, nnodes 1:4 and 4:4; killing a node SIGKILLs its agent and "
            "worker. Their samples are what the final checkpoint holds."
        ),
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    print_table(table, ["system", "no_churn_samples_per_s", "churn_samples_per_s", "goodput"])
    name = f"{args.output}_quick" if args.quick else args.output
    print(write_result(name, summary, rows))
    bar_plot(
        RESULTS / f"{name}.png",
        {
            row["system"]: {
                "no churn": row["no_churn_samples_per_s"],
                "churn": row["churn_samples_per_s"],
            }
            for row in table
        },
        "samples committed per second (median of repeats)",
        f"4 workers, {args.repeats} seeded kill schedules, {args.window:g} s each",
    )


if __name__ == "__main__":
    main()
