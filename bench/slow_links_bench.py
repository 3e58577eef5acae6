"""Time to loss on slow links: DDP vs collabtrain, 4 peers behind 50 Mbit/s links.

Each peer is a process in its own network namespace, joined by a veth pair to a bridge
that lives in a fifth namespace, so nothing is added to the host's own network: the
addresses (10.213.7.0/24) exist only inside these namespaces, which have no default route.
Both ends of every veth are shaped with `tc ... tbf rate 50mbit` (a symmetric 50 Mbit/s
link per peer; netem is not available, so no added latency or loss).

The same four processes then train tinylm to a fixed held-out loss with (a) PyTorch DDP
over gloo (fp32 all-reduce of the gradient, what users run today), (b) collabtrain's
`average()` with codec `none` and (c) with the best codec of codecs_bench (read from
bench/results/codecs.json), and (d) by default also with top-k 0.015 + error feedback,
the codec that sends 33x fewer bytes but misses the 1% quality bar of codecs_bench.
Same model, seed, samples, global batch and optimizer (AdamW, as codecs_bench's headline);
runs are interleaved and repeated, and the reported time is the median. The clock runs
only while training: evaluation (every few steps) is paused out.

What it does not measure: the coordinator/peer runtime (round formation, heartbeats,
HTTP), which adds fixed per-round latency to (b) and (c); links with delay or loss.

Needs root (ip netns, tc). Namespaces are removed at the end, also on failure or signal.

    python -m bench.slow_links_bench [--quick] [--repeats 3] [--target-loss 2.25]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from bench.common import RESULTS, median, print_table, write_result
from bench.harness import Hyper, TaskData, train
from collabtrain_trainer.config import CompressionConfig

PEERS = 4
SUBNET = "10.213.7"  # a private /24 that exists only inside this benchmark's namespaces
RATE = "50mbit"
PORT = 29533
PREFIX = "ctbsl"  # namespace names: ctbsl<pid>-p<i>, ctbsl<pid>-hub
# Also timed by default: the codec that reaches the 32x goal in bytes, whatever its loss.
ALSO = "topk 0.015 +EF"


# ---------------------------------------------------------------- network namespaces


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _in(ns: str, *command: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", ns, *command], check=True, capture_output=True, text=True
    )


def _remove_stale_namespaces() -> None:
    """Namespaces left by a run of this benchmark whose process is gone (killed -9)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        match = re.match(rf"({PREFIX}(\d+)-\S+)", line)
        if match and not Path(f"/proc/{match.group(2)}").exists():
            subprocess.run(["ip", "netns", "del", match.group(1)], capture_output=True)


class SlowNetwork:
    """Four peer namespaces and a hub namespace with a bridge; tbf on every veth end."""

    def __init__(self, peers: int, rate: str) -> None:
        tag = f"{PREFIX}{os.getpid()}"
        self.hub = f"{tag}-hub"
        self.peers = [f"{tag}-p{i}" for i in range(peers)]
        self.rate = rate
        self.created: list[str] = []

    def address(self, rank: int) -> str:
        return f"{SUBNET}.{rank + 1}"

    @staticmethod
    def peer_ifname(rank: int) -> str:
        return f"ctbp{rank}"

    def up(self) -> None:
        _remove_stale_namespaces()
        for ns in [self.hub, *self.peers]:
            _ip("netns", "add", ns)
            self.created.append(ns)
            _in(ns, "ip", "link", "set", "lo", "up")
        _in(self.hub, "ip", "link", "add", "br0", "type", "bridge")
        _in(self.hub, "ip", "link", "set", "br0", "up")
        shape = ["root", "tbf", "rate", self.rate, "burst", "32kbit", "latency", "400ms"]
        for rank, ns in enumerate(self.peers):
            inner, outer = self.peer_ifname(rank), f"ctbh{rank}"
            # Both ends are born inside their namespaces: the host's netns never sees them.
            _ip(
                "link",
                "add",
                inner,
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                outer,
                "netns",
                self.hub,
            )
            _in(self.hub, "ip", "link", "set", outer, "master", "br0")
            _in(self.hub, "ip", "link", "set", outer, "up")
            _in(ns, "ip", "addr", "add", f"{self.address(rank)}/24", "dev", inner)
            _in(ns, "ip", "link", "set", inner, "up")
            _in(ns, "tc", "qdisc", "add", "dev", inner, *shape)  # upload
            _in(self.hub, "tc", "qdisc", "add", "dev", outer, *shape)  # download

    def down(self) -> None:
        # Deleting a namespace deletes the veth ends, bridge and qdiscs inside it.
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.created.clear()


@contextmanager
def slow_network(peers: int, rate: str) -> Iterator[SlowNetwork]:
    net = SlowNetwork(peers, rate)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        net.up()
        yield net
    finally:
        net.down()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_netns_possible() -> str | None:
    """None when namespaces and tbf work here, else the failing command and its error."""
    if os.geteuid() != 0:
        return "not root: ip netns and tc need CAP_NET_ADMIN"
    probe = f"{PREFIX}{os.getpid()}-probe"
    commands = [
        ["ip", "netns", "add", probe],
        ["ip", "-n", probe, "link", "add", "ctbq0", "type", "veth", "peer", "name", "ctbq1"],
        ["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "ctbq0", "root", "tbf",
         "rate", RATE, "burst", "32kbit", "latency", "400ms"],
    ]  # fmt: skip
    try:
        for command in commands:
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                return f"`{' '.join(command)}` failed: {done.stderr.strip()}"
        return None
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)


# ---------------------------------------------------------------- the peers


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


def worker(spec_path: str, rank: int) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)  # four peers share two cores
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{spec['master']}:{PORT}",
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
        for mode in spec["modes"]:
            config = CompressionConfig(**mode["compression"]) if mode["compression"] else None
            dist.barrier(group=group)
            record = train(mode["label"], config, hyper, data, group, spec["target_loss"])
            row = {**record.as_row(), "mode": mode["label"], "repeat": repeat}
            row["reached"] = record.final_eval_loss <= spec["target_loss"]
            row["loadavg_1min_after"] = os.getloadavg()[0]  # the machine is shared
            rows.append(row)
            if rank == 0:
                print(
                    f"  repeat {repeat} {mode['label']}: {record.steps} steps, "
                    f"{record.train_seconds:.1f} s, loss {record.final_eval_loss:.4f}",
                    flush=True,
                )
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps({"rows": rows, "link_mbit": link_mbit}))
    dist.destroy_process_group()


def run_peers(net: SlowNetwork, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        spec = {**spec, "master": net.address(0), "out": os.path.join(tmp, "out.json")}
        spec_path = os.path.join(tmp, "spec.json")
        Path(spec_path).write_text(json.dumps(spec))
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for rank, ns in enumerate(net.peers):
                env = {**os.environ, "GLOO_SOCKET_IFNAME": net.peer_ifname(rank)}
                command = [sys.executable, "-m", "bench.slow_links_bench", "--worker", spec_path]
                procs.append(
                    subprocess.Popen(
                        ["ip", "netns", "exec", ns, *command, "--rank", str(rank)],
                        env=env,
                        cwd=Path(__file__).resolve().parent.parent,
                    )
                )
            deadline = time.monotonic() + timeout
            for proc in procs:
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                if code != 0:
                    raise RuntimeError(f"peer exited with status {code}")
        finally:
            for proc in procs:  # `ip netns exec` execs, so these pids are the peers
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        result: dict[str, Any] = json.loads(Path(spec["out"]).read_text())
        return result


# ---------------------------------------------------------------- the benchmark


def best_codec(path: Path) -> tuple[str, dict[str, Any]]:
    """The best codec within 1% of fp32 from codecs_bench, as (label, CompressionConfig)."""
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `python -m bench.codecs_bench` first")
    codecs = json.loads(path.read_text())
    label = codecs.get("best_codec_within_1pct")
    if label is None:
        raise SystemExit(f"{path} names no codec within 1% of fp32; pass --codec-label")
    return label, _tinylm_row(codecs["rows"], label)["settings"]


def _tinylm_row(rows: list[dict[str, Any]], label: str) -> dict[str, Any]:
    """The headline (tinylm, AdamW) row of codecs.json with this label."""
    for row in rows:
        if row["label"] == label and row["task"] == "tinylm" and row["series"] == "adamw":
            return row
    raise SystemExit(f"codecs.json has no tinylm/adamw row labelled {label!r}")


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.5))
    medians = [median([r["train_seconds"] for r in rows if r["mode"] == m]) for m in modes]
    palette = ["tab:grey", "tab:blue", "tab:green", "tab:orange", "tab:purple"]
    bars.bar(modes, medians, color=palette[: len(modes)])
    for i, mode in enumerate(modes):
        points = [r["train_seconds"] for r in rows if r["mode"] == mode]
        bars.scatter([i] * len(points), points, color="black", s=10, zorder=3)
    bars.set_ylabel(f"seconds to held-out loss {summary['target_loss']}")
    bars.set_title(f"4 peers, {RATE} links (median, dots: repeats)")
    colors = dict(zip(modes, palette, strict=False))
    for row in rows:
        _, seconds, losses = zip(*row["curve"], strict=True)
        first = row["repeat"] == 0
        curves.plot(
            seconds, losses, color=colors[row["mode"]], label=row["mode"] if first else None
        )
    curves.axhline(summary["target_loss"], color="grey", linestyle="--")
    curves.set_xlabel("training seconds")
    curves.set_ylabel("held-out loss")
    curves.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: one repeat, easy target")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target-loss", type=float, default=2.25)
    parser.add_argument("--max-steps", type=int, default=1500, help="cap per run")
    parser.add_argument("--timeout", type=float, default=1500, help="seconds for all runs")
    parser.add_argument("--codec-label", help="override the codec read from codecs.json")
    parser.add_argument(
        "--also",
        action="append",
        default=None,
        help=f"another codecs.json label to time (default: {ALSO!r}, the ~32x codec)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.rank)
        return

    problem = check_netns_possible()
    if problem is not None:
        raise SystemExit(f"slow-link benchmark impossible here: {problem}")
    codecs_path = RESULTS / "codecs.json"
    if args.quick and not codecs_path.exists():
        codecs_path = RESULTS / "codecs_quick.json"  # a smoke run may follow a quick one
    label, settings = best_codec(codecs_path)
    if args.codec_label:
        rows = json.loads(codecs_path.read_text())["rows"]
        label, settings = args.codec_label, _tinylm_row(rows, args.codec_label)["settings"]
    hyper = Hyper(task="tinylm", steps=args.max_steps, eval_every=10)
    target, repeats = args.target_loss, args.repeats
    if args.quick:
        hyper = Hyper(task="tinylm", steps=60, eval_every=10, eval_examples=128)
        target, repeats = 3.0, 1
    modes: list[dict[str, Any]] = [
        {"label": "ddp fp32", "compression": None},
        {"label": "collab none", "compression": {"codec": "none"}},
        {"label": f"collab {label}", "compression": settings},
    ]
    codec_rows = json.loads(codecs_path.read_text())["rows"]
    for also in [ALSO] if args.also is None else args.also:
        modes.append(
            {"label": f"collab {also}", "compression": _tinylm_row(codec_rows, also)["settings"]}
        )
    spec = {"hyper": hyper.__dict__, "modes": modes, "repeats": repeats, "target_loss": target}

    started = time.perf_counter()
    print(f"4 peers, {RATE} links; target held-out loss {target}; {repeats} repeats")
    with slow_network(PEERS, RATE) as net:
        result = run_peers(net, spec, args.timeout)
    elapsed = time.perf_counter() - started
    rows = result["rows"]

    def seconds(mode: str) -> float | None:
        runs = [r for r in rows if r["mode"] == mode]
        if not all(r["reached"] for r in runs):
            return None  # a run hit the step cap: no time to report
        return median([r["train_seconds"] for r in runs])

    def ratio(slow: float | None, fast: float | None) -> float | None:
        return slow / fast if slow and fast else None

    ddp, none, best = (seconds(m["label"]) for m in modes[:3])
    table = []
    for mode in modes:
        runs = [r for r in rows if r["mode"] == mode["label"]]
        table.append(
            {
                "mode": mode["label"],
                "median_seconds": seconds(mode["label"]),
                "runs_seconds": [round(r["train_seconds"], 1) for r in runs],
                "median_steps": median([r["steps"] for r in runs]),
                "step_ms": median([1000 * r["train_seconds"] / r["steps"] for r in runs]),
                "exchange_ms": median([r["exchange_ms_median"] for r in runs]),
                "bytes_per_step": runs[0]["bytes_sent_per_step"],
            }
        )
    print_table(table, list(table[0]))
    summary: dict[str, Any] = {
        "ddp_seconds": ddp,
        "collab_none_seconds": none,
        "collab_best_seconds": best,
        "speedup_vs_ddp": ratio(ddp, best),
        "best_codec": label,
        "extra_modes": {m["label"]: seconds(m["label"]) for m in modes[3:]},
        "extra_speedups_vs_ddp": {m["label"]: ratio(ddp, seconds(m["label"])) for m in modes[3:]},
        "target_loss": target,
        "link": f"tbf {RATE} both directions per peer, burst 32kbit, latency 400ms",
        "link_mbit_measured": round(result["link_mbit"], 1),
        "loadavg_1min_during": [round(r["loadavg_1min_after"], 1) for r in rows],
        "peers": PEERS,
        "repeats": repeats,
        "hyperparameters": hyper.__dict__,
        "per_mode": table,
        "quick": args.quick,
        "seconds": round(elapsed, 1),
        "measures": (
            "training wall time (evaluation paused out) until the held-out loss first reaches "
            "the target, median of repeats; collabtrain modes use average() in a synchronous "
            "training loop, not the coordinator/peer runtime; DDP bytes_per_step is the fp32 "
            "ring all-reduce estimate, not a capture"
        ),
    }
    name = "slow_links_quick" if args.quick else "slow_links"
    path = write_result(name, summary, rows)
    plot(rows, summary, RESULTS / f"{name}.png")
    print(
        f"DDP {ddp} s, collab none {none} s, collab {label} {best} s, "
        f"speedup {summary['speedup_vs_ddp']}; link {summary['link_mbit_measured']} Mbit/s "
        f"({elapsed:.0f} s) -> {path}"
    )


if __name__ == "__main__":
    main()
