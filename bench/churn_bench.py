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
import os
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import print_table, write_result

PEERS = 4
MICRO = 16  # collabtrain micro-batch per peer
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


# --- (b), (c) restart-all DDP -----------------------------------------------------------


def _ddp_worker(
    rank: int, world: int, port: int, ckpt: str, every: int, gen: int, shared: Any
) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    from bench.harness import TaskData

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    data = TaskData("tinylm", 8)
    model = data.model(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    step, samples = 0, 0
    if os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, samples = state["step"], state["samples"]
    ddp = nn.parallel.DistributedDataParallel(model)
    generator = torch.Generator().manual_seed(gen * 1000 + rank)
    per_worker = TARGET // PEERS  # fixed per worker: a 3-worker generation has batch 192
    while True:
        inputs, targets = data.train_batch(generator, per_worker)
        optimizer.zero_grad(set_to_none=True)
        data.loss(ddp(inputs), targets).backward()
        optimizer.step()
        step += 1
        samples += per_worker * world
        if rank == 0:
            shared["model_samples"].value = samples
            shared["raw_samples"].value += per_worker * world
            if shared["first_step"].value == 0.0:
                shared["first_step"].value = time.monotonic()
            if step % every == 0:
                tmp = ckpt + ".tmp"
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "step": step,
                        "samples": samples,
                    },
                    tmp,
                )
                os.replace(tmp, ckpt)
                shared["ckpt_samples"].value = samples


def run_restart_all(
    kills: list[tuple[float, int]], window: float, delay: float, every: int, elastic: bool
) -> dict[str, Any]:
    from collabtrain_trainer import local  # its fork server preloads torch, as for (a)
    from collabtrain_trainer.local import free_port

    ctx = local._context
    shared = {
        # Lock-free: a worker SIGKILLed while holding a Value's lock would deadlock the rest.
        # Only rank 0 writes them (and the driver between generations).
        "model_samples": ctx.Value("q", 0, lock=False),
        "ckpt_samples": ctx.Value("q", 0, lock=False),
        "raw_samples": ctx.Value("q", 0, lock=False),
        "first_step": ctx.Value("d", 0.0, lock=False),
    }
    generations: list[tuple[float, int]] = []  # (launch time after the window starts, size)
    workdir = Path(tempfile.mkdtemp(prefix="churn-ddp-"))
    ckpt = str(workdir / "ckpt.pt")
    workers: list[Any] = []
    gen = 0
    startups: list[float] = []

    def launch(world: int) -> None:
        nonlocal gen
        gen += 1
        port = free_port()
        shared["first_step"].value = 0.0
        for rank in range(world):
            p = ctx.Process(target=_ddp_worker, args=(rank, world, port, ckpt, every, gen, shared))
            p.start()
            workers.append(p)

    def stop_all() -> None:
        for p in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
        for p in workers:
            p.join()
        workers.clear()
        # Work after the last checkpoint is gone.
        shared["model_samples"].value = shared["ckpt_samples"].value

    try:
        launched = time.monotonic()
        launch(PEERS)
        while shared["first_step"].value == 0.0:
            if time.monotonic() - launched > 120:
                raise TimeoutError("DDP workers did not start")
            time.sleep(0.05)
        startups.append(shared["first_step"].value - launched)
        t0, s0, r0 = time.monotonic(), shared["model_samples"].value, shared["raw_samples"].value
        available, pending, todo = PEERS, [], list(kills)
        waiting_since: float | None = None
        restarts = 0
        while (now := time.monotonic() - t0) < window:
            changed = False
            while todo and todo[0][0] <= now:
                todo.pop(0)
                available -= 1
                pending.append(now + delay)
                changed = True
            for due in [p for p in pending if p <= now]:
                pending.remove(due)
                available += 1
                changed = elastic or changed  # elastic: a newcomer restarts everyone
            if changed:
                stop_all()
                waiting_since = None
            want = available if elastic else (PEERS if available == PEERS else 0)
            if not workers and want > 0:
                restarts += 1
                generations.append((round(now, 2), want))
                waiting_since = time.monotonic()
                launch(want)
            if waiting_since is not None and shared["first_step"].value > 0.0:
                startups.append(shared["first_step"].value - waiting_since)
                waiting_since = None
            time.sleep(0.05)
        samples = shared["model_samples"].value - s0
        raw = shared["raw_samples"].value - r0
        return {
            "samples": samples,
            "raw_samples_computed": raw,
            "kills": len(kills),
            "restarts": restarts,
            "startup_seconds_median": round(sorted(startups)[len(startups) // 2], 2),
            "startup_seconds": [round(s, 2) for s in startups],
            "generations": generations,
        }
    finally:
        stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


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
            lambda k: run_restart_all(k, args.window, args.replace_delay, args.ckpt_every, True),
        ),
        (
            "checkpoint_restart",
            lambda k: run_restart_all(k, args.window, args.replace_delay, args.ckpt_every, False),
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
