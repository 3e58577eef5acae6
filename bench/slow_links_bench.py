"""Time to loss on slow links: DDP against collabtrain's full runtime, 4 peers behind
50 Mbit/s links.

Each peer is a process in its own network namespace (testbed.network), joined to a bridge
by a veth pair shaped with `tc tbf rate 50mbit` at both ends: a symmetric 50 Mbit/s link
per peer (netem is not available, so no added latency or loss). The coordinator listens
on the bridge, so its traffic crosses the peers' shaped links too.

The same four links carry, in one run:
- DDP: PyTorch DDP over gloo (an fp32 gradient all-reduce at every step, what users run
  today), four processes started with `ip netns exec`;
- collabtrain through its real runtime (`LocalCluster`: a coordinator and four peer
  processes that form rounds, heartbeat, exchange over process groups built per round,
  vote and commit), per mode: per-step averaging with fp32 and with the best per-step
  codec of codecs_bench, and local updates (DiLoCo) with the best setting of
  local_updates_bench.

Same model, seed, training split, global batch (4 x 16), optimizer (AdamW) and learning-
rate schedule. DDP evaluates every 10 steps with its clock paused. A runtime run cannot
pause: one peer saves the committed model every few steps with the wall time, and the
snapshots are evaluated after the run on the same held-out set. Its clock starts when the
last of the four peers trains its first micro-batch. Each mode's time is the median over
repeats of the time to the first held-out loss at or below each target: 2.25 (reached
early, in DDP's first hundred steps) and 2.0 (further into training, the headline).

Needs root (ip netns, tc, iptables). The network is removed at the end, also on failure
or SIGTERM.

    python -m bench.slow_links_bench [--quick] [--repeats 3] [--target-loss 2.25 2.0]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from bench.common import RESULTS, median, print_table, write_result
from bench.harness import Hyper, TaskData, held_out_loss, train
from testbed.network import PeerNetwork

PEERS = 4
RATE = "50mbit"
# DDP evaluates every this many steps; per-step runtime runs save a model as often, so
# neither side's time to a target is later than the other's by more steps.
DDP_EVAL_EVERY = 10
DDP_PORT = 29533
# The environment a traced runtime peer reads (see traced_peer_main).
TRACE_ENV = "COLLABTRAIN_BENCH_TRACE"


@contextmanager
def slow_network(peers: int, rate: str) -> Iterator[PeerNetwork]:
    """`peers` namespaces on a bridge, every link shaped to `rate` both ways."""
    network = PeerNetwork()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        network.create()
        for _ in range(peers):
            network.throttle(network.add_peer(), rate)
        yield network
    finally:
        network.destroy()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_netns_possible() -> str | None:
    """None when namespaces and tbf work here, else the failing command and its error."""
    if os.geteuid() != 0:
        return "not root: ip netns, tc and iptables need CAP_NET_ADMIN"
    network = PeerNetwork()
    try:
        network.create()
        network.throttle(network.add_peer(), RATE)
        return None
    except subprocess.CalledProcessError as exc:
        return f"`{' '.join(exc.cmd)}` failed: {(exc.stderr or '').strip()}"
    finally:
        network.destroy()


# ---------------------------------------------------------------- DDP


def measure_link(group: dist.ProcessGroup, megabytes: float = 2.0) -> float:
    """Mbit/s of a gloo send from rank 1 to rank 0 (one shaped upload + download)."""
    rank = dist.get_rank(group)
    payload = torch.zeros(int(megabytes * 1e6) // 4)
    dist.barrier(group=group)
    started = time.perf_counter()
    if rank == 1:
        dist.send(payload, dst=0, group=group)
    elif rank == 0:
        dist.recv(payload, src=1, group=group)
    seconds = torch.tensor([time.perf_counter() - started])
    dist.broadcast(seconds, src=0, group=group)
    return megabytes * 8 / float(seconds)


def ddp_worker(spec_path: str, rank: int) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)  # four peers share two cores
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{spec['master']}:{DDP_PORT}",
        rank=rank,
        world_size=PEERS,
        timeout=timedelta(seconds=300),
    )
    group = dist.group.WORLD
    assert group is not None
    hyper = Hyper(**spec["hyper"])
    data = TaskData(hyper.task, hyper.eval_examples, dict(hyper.task_args))
    link_mbit = measure_link(group)
    rows = []
    for repeat in range(spec["repeats"]):
        dist.barrier(group=group)
        record = train("ddp fp32", None, hyper, data, group, min(spec["targets"]))
        rows.append(
            {
                "mode": "ddp fp32",
                "repeat": repeat,
                "steps": record.steps,
                "samples": record.steps * PEERS * hyper.micro_batch,
                "final_eval_loss": record.final_eval_loss,
                "curve": record.curve,
                # All peers' sends, as the coordinator counts collabtrain's.
                "bytes_per_sample": record.bytes_fp32_per_step / hyper.micro_batch,
                "exchange_ms_median": record.exchange_ms_median,
                "loadavg_1min_after": os.getloadavg()[0],  # the machine is shared
            }
        )
        if rank == 0:
            print(f"  ddp fp32, repeat {repeat}: {_described(rows[-1])}", flush=True)
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps({"rows": rows, "link_mbit": link_mbit}))
    dist.destroy_process_group()


def run_ddp(network: PeerNetwork, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        spec = {**spec, "master": network.links[0].address, "out": os.path.join(tmp, "out.json")}
        spec_path = os.path.join(tmp, "spec.json")
        Path(spec_path).write_text(json.dumps(spec))
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for rank, link in enumerate(network.links):
                command = [sys.executable, "-m", "bench.slow_links_bench", "--ddp-worker"]
                procs.append(
                    subprocess.Popen(
                        ["ip", "netns", "exec", link.netns, *command, spec_path, str(rank)],
                        env={**os.environ, "GLOO_SOCKET_IFNAME": link.inside},
                        cwd=Path(__file__).resolve().parent.parent,
                    )
                )
            deadline = time.monotonic() + timeout
            for proc in procs:
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                if code != 0:
                    raise RuntimeError(f"a DDP peer exited with status {code}")
        finally:
            for proc in procs:  # `ip netns exec` execs, so these pids are the peers
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        result: dict[str, Any] = json.loads(Path(spec["out"]).read_text())
        return result


# ---------------------------------------------------------------- the runtime


@dataclass(frozen=True)
class Mode:
    label: str
    compression: dict[str, Any]
    inner_steps: int | None  # None: per-step averaging
    max_steps: int  # committed steps (rounds) before the run ends
    snapshot_every: int  # committed steps between saved models
    outer: dict[str, float] = field(default_factory=dict)  # outer_lr, outer_momentum
    overlap: bool = False  # local updates: train on while a round is in flight


def traced_peer_main(args: list[str]) -> int:
    """A LocalCluster peer (its `peer_main`) in its network namespace: it writes when it
    trained its first micro-batch and, where asked, the committed model every few steps
    with the wall time. The bench's instrument, installed here, not in the trainer."""
    from collabtrain_trainer import cli
    from collabtrain_trainer.peer import runtime, training
    from testbed.network import enter_netns

    enter_netns(os.environ["COLLABTRAIN_TEST_NETNS"])
    trace = json.loads(os.environ[TRACE_ENV])
    directory = Path(trace["dir"])
    peer_id = args[args.index("--peer-id") + 1]
    every = int(trace.get("snapshot_every", 0))
    last = int(trace.get("last_step", 0))
    real_train = training.Training.train_micro_batch
    real_apply = runtime.Peer._apply

    def train_micro_batch(self: Any, step: int) -> int:
        start = directory / f"{peer_id}.start"
        if not start.exists():
            start.write_text(repr(time.time()))
        return int(real_train(self, step))

    def apply(self: Any, averaged: torch.Tensor, new_step: int, *rest: Any) -> None:
        real_apply(self, averaged, new_step, *rest)
        if every and (new_step % every == 0 or new_step == last):
            # The committed model: with local updates the global one (after an overlapped
            # round the live model holds what was trained during it too).
            local = self.training.local
            model = local.state.model if local is not None else self.training.model
            state = {k: v.clone() for k, v in model.state_dict().items()}
            torch.save({"time": time.time(), "state": state}, directory / f"step-{new_step}.pt")

    training.Training.train_micro_batch = train_micro_batch
    runtime.Peer._apply = apply
    return int(cli.main(args))


def runtime_run(
    network: PeerNetwork, mode: Mode, hyper: Hyper, data: TaskData, repeat: int
) -> dict[str, Any]:
    from bench import slow_links_bench  # the fork server finds the peer main by this name
    from collabtrain_trainer.config import TrainerConfig
    from collabtrain_trainer.local import LocalCluster
    from collabtrain_trainer.tasks import load_task

    config = TrainerConfig.model_validate(
        {
            "job": "bench-slow-links",
            "task": "bench.local_updates_bench:tinylm_train_split",
            "task_args": {"steps": str(hyper.steps), **dict(hyper.task_args)},
            "target_batch_size": PEERS * hyper.micro_batch,
            "micro_batch_size": hyper.micro_batch,
            "max_steps": mode.max_steps,
            "min_peers": PEERS,
            "seed": hyper.seed,
            "optimizer": {"name": hyper.optimizer, "lr": hyper.lr},
            "compression": mode.compression,
            "local_updates": (
                {"inner_steps": mode.inner_steps, "overlap": mode.overlap, **mode.outer}
                if mode.inner_steps
                else None
            ),
        }
    )
    with tempfile.TemporaryDirectory() as workdir:
        trace_dir = Path(workdir) / "trace"
        trace_dir.mkdir()
        cluster = LocalCluster(
            config,
            Path(workdir) / "cluster",
            host=network.host_address,
            peer_main=slow_links_bench.traced_peer_main,
        )
        try:
            cluster.start_coordinator()
            cluster.wait_coordinator()
            for index, link in enumerate(network.links):
                trace = {
                    "dir": str(trace_dir),
                    "snapshot_every": mode.snapshot_every if index == 0 else 0,  # one saves
                    "last_step": mode.max_steps,
                }
                env = {**network.peer_env(link), TRACE_ENV: json.dumps(trace)}
                cluster.start_peer(env=env, host=link.address)
            status = cluster.wait_for(lambda s: s.finished, 1800, f"the {mode.label} run to end")
        finally:
            cluster.stop()
        starts = [float(path.read_text()) for path in trace_dir.glob("*.start")]
        assert len(starts) == PEERS, f"{len(starts)} of {PEERS} peers trained"
        began = max(starts)
        model = load_task(config.task, config.task_args, config.seed).model
        curve = []
        for path in sorted(trace_dir.glob("step-*.pt"), key=lambda p: int(p.stem[5:])):
            saved = torch.load(path, weights_only=True)
            model.load_state_dict(saved["state"])
            curve.append(
                (int(path.stem[5:]), saved["time"] - began, held_out_loss(model, data, None))
            )
    row = {
        "mode": mode.label,
        "repeat": repeat,
        "runtime": "full",
        "steps": status.step,
        "samples": status.samples_committed,
        "final_eval_loss": curve[-1][2] if curve else None,
        "curve": curve,
        "bytes_per_sample": status.bytes_sent / max(1, status.samples_committed),
        "compression_vs_per_step_fp32": status.bytes_per_step_fp32 / max(1, status.bytes_sent),
        "rounds_aborted": status.rounds_aborted,
        "param_hashes_agree": status.param_hashes_agree,
        "settings": asdict(mode),
        "loadavg_1min_after": os.getloadavg()[0],
    }
    print(f"  {mode.label}, repeat {repeat}: {_described(row)}", flush=True)
    return row


def _described(row: dict[str, Any]) -> str:
    if not row["curve"]:
        return f"{row['steps']} steps, {row['samples']} samples, no model saved"
    _, seconds, loss = row["curve"][-1]
    return f"{row['steps']} steps, {row['samples']} samples, loss {loss:.4f} at {seconds:.1f} s"


def seconds_to(target: float, curve: list[tuple[int, float, float]]) -> float | None:
    """When a run's held-out loss first reached `target` (None: it never did)."""
    return next((seconds for _, seconds, loss in curve if loss <= target), None)


# ---------------------------------------------------------------- the benchmark


def best_per_step_codec() -> tuple[str, dict[str, Any]]:
    """The best per-step codec within 1% of fp32 (codecs_bench's headline, tinylm AdamW)."""
    codecs = json.loads(_result("codecs.json").read_text())
    label = codecs.get("best_codec_within_1pct")
    for row in codecs["rows"]:
        if row["label"] == label and row["task"] == "tinylm" and row["series"] == "adamw":
            return label, row["settings"]
    raise SystemExit("codecs.json names no tinylm/adamw codec within 1% of fp32")


def best_local_setting() -> tuple[int, str, dict[str, Any], dict[str, float]]:
    """local_updates_bench's best setting within 1% of DDP on the default model, and the
    outer step it ran with."""
    from bench.local_updates_bench import CODECS

    found = json.loads(_result("local_updates.json").read_text())
    label = found["per_model"]["default"]["best_setting"]
    if label is None:
        raise SystemExit("local_updates.json has no setting within 1% of DDP")
    inner, codec = label.split(" ", 1)
    outer = {"outer_lr": found["outer_optimizer"]["lr"]}
    outer["outer_momentum"] = found["outer_optimizer"]["momentum"]
    return int(inner.removeprefix("H=")), codec, CODECS[codec].model_dump(), outer


def _result(name: str) -> Path:
    path = RESULTS / name
    if not path.exists():
        raise SystemExit(f"{path} is missing: run the benchmark that writes it first")
    return path


def plan(max_steps: int, quick: bool) -> list[Mode]:
    codec_label, codec = best_per_step_codec()
    inner, local_codec, local_settings, outer = best_local_setting()
    # Rounds enough to reach the target with room: local updates need more samples to get
    # there (local_updates.json), a round holding `inner` steps' worth.
    local = Mode(
        f"collab H={inner} {local_codec}",
        local_settings,
        inner,
        max(2, (3 if quick else 2) * max_steps // inner),
        1,
        outer,
    )
    return [
        Mode("collab fp32", {"codec": "none"}, None, max_steps, DDP_EVAL_EVERY),
        Mode(f"collab {codec_label}", codec, None, max_steps, DDP_EVAL_EVERY),
        local,
        replace(local, label=f"{local.label} overlap", overlap=True),
    ]


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    colors = ["tab:grey", "tab:blue", "tab:green", "tab:orange", "tab:red", "tab:purple"]
    palette = dict(zip(modes, colors, strict=False))
    fig, axes = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        _, seconds, losses = zip(*row["curve"], strict=True)
        label = row["mode"] if row["repeat"] == 0 else None
        axes.plot(seconds, losses, color=palette[row["mode"]], label=label)
    for target in summary["targets"]:
        axes.axhline(target, color="grey", linestyle="--")
    axes.set_xlabel("training seconds")
    axes.set_ylabel("held-out loss")
    axes.set_title(f"4 peers, {RATE} links each")
    axes.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: one repeat, easy target")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--target-loss", type=float, nargs="+", default=[2.25, 2.0])
    parser.add_argument("--max-steps", type=int, default=300, help="per-step runs' length")
    parser.add_argument("--ddp-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_worker:
        ddp_worker(args.ddp_worker[0], int(args.ddp_worker[1]))
        return

    problem = check_netns_possible()
    if problem is not None:
        raise SystemExit(f"slow-link benchmark impossible here: {problem}")
    # The learning-rate schedule spans 1500 steps in every mode, as in codecs_bench.
    hyper = Hyper(task="tinylm", steps=1500, eval_every=DDP_EVAL_EVERY)
    targets, repeats, max_steps = (
        sorted(args.target_loss, reverse=True),
        args.repeats,
        args.max_steps,
    )
    if args.quick:
        hyper = Hyper(task="tinylm", steps=1500, eval_every=DDP_EVAL_EVERY, eval_examples=128)
        targets, repeats, max_steps = [3.0], 1, 30
    modes = plan(max_steps, args.quick)
    data = TaskData(hyper.task, hyper.eval_examples, dict(hyper.task_args))

    started = time.perf_counter()
    print(f"{PEERS} peers, {RATE} links; target held-out losses {targets}; {repeats} repeats")
    with slow_network(PEERS, RATE) as network:
        ddp_spec = {"hyper": hyper.__dict__, "repeats": repeats, "targets": targets}
        ddp = run_ddp(network, ddp_spec, timeout=1200)
        rows: list[dict[str, Any]] = ddp["rows"]
        for repeat in range(repeats):  # interleaved, so drift in load spreads over modes
            for mode in modes:
                rows.append(runtime_run(network, mode, hyper, data, repeat))
    elapsed = time.perf_counter() - started

    mode_names = ["ddp fp32", *(m.label for m in modes)]

    def seconds(mode: str, target: float) -> float | None:
        runs = [seconds_to(target, r["curve"]) for r in rows if r["mode"] == mode]
        reached = [s for s in runs if s is not None]
        return median(reached) if len(reached) == len(runs) else None

    table = []
    for label in mode_names:
        runs = [r for r in rows if r["mode"] == label]
        entry: dict[str, Any] = {"mode": label}
        for target in targets:
            mine, ddp_seconds = seconds(label, target), seconds("ddp fp32", target)
            entry[f"seconds_to_{target}"] = mine
            entry[f"speedup_at_{target}"] = ddp_seconds / mine if ddp_seconds and mine else None
        # Throughput, whatever the loss: what the links and cores let each mode process.
        timed = [r for r in runs if r["curve"]]
        entry["samples_per_second"] = median([r["samples"] / r["curve"][-1][1] for r in timed])
        entry["bytes_per_sample"] = median([r["bytes_per_sample"] for r in runs])
        entry["runs_seconds"] = {
            str(target): [seconds_to(target, r["curve"]) for r in runs] for target in targets
        }
        table.append(entry)
    print_table(table, [c for c in table[0] if c != "runs_seconds"])
    headline = targets[-1]
    speedups = {row["mode"]: row[f"speedup_at_{headline}"] for row in table[1:]}
    reached = {mode: value for mode, value in speedups.items() if value is not None}
    best = max(reached, key=lambda mode: reached[mode]) if reached else None
    summary: dict[str, Any] = {
        "runtime": "full",
        "ddp_seconds": seconds("ddp fp32", headline),
        "speedup_vs_ddp": reached[best] if best else None,
        "best_mode": best,
        "speedups_vs_ddp": speedups,
        "goal_speedup_vs_ddp": 5.0,
        "target_loss": headline,
        "targets": targets,
        "link": f"tbf {RATE} both directions per peer, burst 32kb, latency 200ms",
        "link_mbit_measured": round(ddp["link_mbit"], 1),
        "peers": PEERS,
        "repeats": repeats,
        "hyperparameters": hyper.__dict__,
        "modes": [asdict(mode) for mode in modes],
        "per_mode": table,
        "quick": args.quick,
        "seconds": round(elapsed, 1),
        "measures": (
            "wall seconds until the held-out loss first reaches each target, median of "
            "repeats; speedup_vs_ddp is at target_loss, the lowest. DDP: training time "
            "with evaluation paused out. collabtrain: the full "
            "runtime (LocalCluster: coordinator and peer processes over the shaped links), "
            "from the last peer's first micro-batch to the wall time at which one peer "
            "applied the first committed step whose model reaches the target (evaluated "
            "after the run; snapshots every few steps, so a time is late by up to that). "
            "bytes_per_sample: what all peers sent per committed sample; DDP's is the fp32 "
            "ring all-reduce estimate, collabtrain's what the coordinator counted "
            "(bytes_sent / samples_committed)"
        ),
    }
    name = "slow_links_quick" if args.quick else "slow_links"
    path = write_result(name, summary, rows)
    plot(rows, summary, RESULTS / f"{name}.png")
    print(
        f"DDP {summary['ddp_seconds']} s to {headline}; speedups {speedups}; "
        f"link {summary['link_mbit_measured']} Mbit/s ({elapsed:.0f} s) -> {path}"
    )


if __name__ == "__main__":
    main()
