"""A newcomer's time from process start to its first contributed round, and its state
transfer against the raw link, through the product's real path.

`sources` peers (1 or 2) train `tinylm` with a real coordinator on loopback
(`LocalCluster`), once at about 10M parameters (width 512, 5 layers) and once at about
100M (width 1024, 12 layers). Once they have committed a few steps a newcomer is started;
the clock runs from `start_peer()` until that peer logs its first applied step ("step N
applied", i.e. a round its gradient took part in). Peers are forked from collabtrain's
fork server with torch preloaded, so the torch import is not in the time. The newcomer's
own log line "state loaded from ...: (N bytes in T s)" gives the transfer: every source's
manifest, the chunks (several in flight, from every source at once), their BLAKE3
digests, and the parameter hash check; the rest of the join is building the model,
computing a micro-batch and waiting for the next round to form.

The link figure is a plain socket copy over the same loopback of the same number of
bytes, in one stream. `fraction_of_link` = that copy's time / the transfer's time (the
100M row with the most sources, in the summary); `join_fraction_of_link` the same against
the whole join.

Beside them, `idle_transfer_seconds`: the largest state between two processes with
nothing training and no coordinator (a source's `StateServer`, `fetch_state`), to show
how much of the transfer is the product's own cost and how much the shared CPU.

    python -m bench.join_bench [--quick]   # --quick: the 10M model only
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, bar_plot, print_table, write_result

# name: (model arguments, target batch, micro-batch). The 100M model's step takes seconds
# on a CPU core, so it trains on batches of 8: one micro-batch per peer per step.
MODELS = {
    "10m": ({"width": "512", "layers": "5", "heads": "8"}, 32, 8),
    "100m": ({"width": "1024", "layers": "12", "heads": "16"}, 8, 4),
}


def socket_copy_seconds(nbytes: int) -> float:
    """Send nbytes over a loopback TCP connection; seconds until all were received."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    received = [0]

    def sink() -> None:
        conn, _ = server.accept()
        with conn:
            while received[0] < nbytes:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                received[0] += len(chunk)

    thread = threading.Thread(target=sink)
    thread.start()
    payload = bytes(1 << 20)
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as client:
        left = nbytes
        while left > 0:
            client.sendall(payload[: min(left, len(payload))])
            left -= min(left, len(payload))
    thread.join()
    elapsed = time.perf_counter() - started
    server.close()
    return elapsed


def _state_of(model: str) -> tuple[Any, Any]:
    """The tinylm model of that size with its AdamW state materialised."""
    import torch

    from collabtrain_trainer.tasks import load_task

    net = load_task("tinylm", MODELS[model][0], 0).model
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for param in net.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    return net, optimizer


def _serve_idle(model: str, answers: Any) -> None:
    from collabtrain_trainer import credentials
    from collabtrain_trainer.peer.model_state import param_hash
    from collabtrain_trainer.peer.state_server import StateServer
    from collabtrain_trainer.state_snapshot import take_snapshot

    net, optimizer = _state_of(model)
    agreed = param_hash(net)
    snapshot = take_snapshot(net, optimizer, 1, agreed)
    token = credentials.peer_token("bench", "idle-source")
    server = StateServer("127.0.0.1", 0, token, lambda: snapshot)
    server.start()
    answers.put((server.port, agreed, credentials.state_ticket(token, int(time.time()) + 3600)))
    time.sleep(3600)


def idle_transfer_seconds(model: str) -> float:
    """The same state between two processes with nothing training and no coordinator: a
    source's `StateServer` (a spawned process) and `fetch_state` here. Best of 3."""
    import multiprocessing

    from collabtrain_trainer.peer.state_server import fetch_state
    from collabtrain_trainer.protocol import StateSource
    from collabtrain_trainer.state_snapshot import StateLayout

    context = multiprocessing.get_context("spawn")
    answers = context.Queue()
    child = context.Process(target=_serve_idle, args=(model, answers), daemon=True)
    child.start()
    try:
        port, agreed, ticket = answers.get(timeout=600)
        source = StateSource(
            peer_id="idle-source", state_url=f"http://127.0.0.1:{port}", ticket=ticket
        )
        layout = StateLayout.of(*_state_of(model))
        times = []
        for _ in range(3):
            started = time.perf_counter()
            fetch_state([source], 1, agreed, layout)
            times.append(time.perf_counter() - started)
        return min(times)
    finally:
        child.kill()
        child.join()


_LOADED = re.compile(r"state loaded from ([^:]+): .*\((\d+) bytes in ([0-9.]+)s")


def run_join(model: str, sources: int) -> dict[str, Any]:
    from collabtrain_trainer.config import LOOPBACK_TIMING, TrainerConfig
    from collabtrain_trainer.local import LocalCluster
    from collabtrain_trainer.tasks import load_task

    task_args, target, micro = MODELS[model]
    params_count = sum(p.numel() for p in load_task("tinylm", task_args, 0).model.parameters())
    config = TrainerConfig.model_validate(
        {
            "job": "join",
            "task": "tinylm",
            "task_args": task_args,
            "target_batch_size": target,
            "micro_batch_size": micro,
            "max_steps": 1_000_000,
            "seed": 0,
            "optimizer": {"name": "adamw", "lr": 1e-3},
            "compression": {"codec": "none"},
            # Slower than loopback's defaults: big states take a while to move and steps
            # take seconds, during which heartbeats compete for two cores.
            "timing": {
                **LOOPBACK_TIMING.model_dump(),
                "peer_expiry_s": 15.0,
                "initial_round_deadline_s": 120.0,
                "min_round_deadline_s": 60.0,
            },
        }
    )
    workdir = Path(tempfile.mkdtemp(prefix="join-bench-"))
    cluster = LocalCluster(config, workdir)
    try:
        cluster.start_coordinator()
        cluster.wait_coordinator()
        for _ in range(sources):
            cluster.start_peer()
        cluster.wait_for(lambda s: s.step >= 3, 600, f"3 steps by the first {sources} peers")
        started = time.monotonic()
        newcomer = cluster.start_peer()
        loaded = None
        applied = re.compile(r"step \d+ applied")
        while time.monotonic() - started < 600:
            text = cluster.log_text(newcomer)
            loaded = loaded or _LOADED.search(text)
            if applied.search(text):
                join = time.monotonic() - started
                break
            time.sleep(0.05)
        else:
            raise TimeoutError("the newcomer contributed to no round within 600 s")
        if loaded is None:
            raise RuntimeError("the newcomer contributed without loading the state")
        status = cluster.status()
        return {
            "model": model,
            "params": params_count,
            "sources": sources,
            "served_by": loaded[1].split(", "),
            "join_seconds": round(join, 2),
            "transfer_seconds": float(loaded[3]),
            "state_bytes": int(loaded[2]),
            "step_at_join": status.step if status else None,
        }
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the 10M model only")
    args = parser.parse_args()
    began = time.monotonic()
    rows = []
    for model in ["10m"] if args.quick else list(MODELS):
        for sources in (1, 2):
            result = run_join(model, sources)
            nbytes = result["state_bytes"]
            copy = min(socket_copy_seconds(nbytes) for _ in range(3))
            rows.append(
                {
                    **result,
                    "socket_copy_seconds": round(copy, 3),
                    "link_MB_per_s": round(nbytes / copy / 1e6, 1),
                    "transfer_MB_per_s": round(nbytes / result["transfer_seconds"] / 1e6, 1),
                    "fraction_of_link": round(copy / result["transfer_seconds"], 3),
                    "join_fraction_of_link": round(copy / result["join_seconds"], 4),
                }
            )
            print_table(rows[-1:], ["model", "sources", "join_seconds", "transfer_seconds"])
    largest = list(MODELS)[-1] if not args.quick else "10m"
    idle = idle_transfer_seconds(largest)
    idle_copy = min(socket_copy_seconds(rows[-1]["state_bytes"]) for _ in range(3))
    print(f"idle transfer of the {largest} state: {idle:.3f}s (socket copy {idle_copy:.3f}s)")
    headline = rows[-1]  # the largest model, the most sources
    by = {(row["model"], row["sources"]): row for row in rows}
    summary = {
        "join_seconds_100m": by[("100m", 2)]["join_seconds"] if ("100m", 2) in by else None,
        "join_seconds_10m": by[("10m", 2)]["join_seconds"],
        "fraction_of_link": headline["fraction_of_link"],
        "transfer_seconds": headline["transfer_seconds"],
        "hash": "BLAKE3 per 8 MiB chunk; BLAKE3 parameter hash over the whole model (all cores)",
        "idle_model": largest,
        "idle_transfer_seconds": round(idle, 3),
        "idle_fraction_of_link": round(idle_copy / idle, 3),
        "idle_note": (
            "StateServer and fetch_state between two processes with nothing training and no "
            "coordinator: what the transfer costs when it does not share the CPU with training"
        ),
        "wall_seconds": round(time.monotonic() - began, 1),
    }
    print_table(
        rows,
        [
            "model",
            "sources",
            "join_seconds",
            "transfer_seconds",
            "socket_copy_seconds",
            "transfer_MB_per_s",
            "fraction_of_link",
        ],
    )
    name = "join_quick" if args.quick else "join"
    print(write_result(name, summary, rows))
    bar_plot(
        RESULTS / f"{name}.png",
        {
            f"{row['params'] / 1e6:.0f}M parameters, {row['sources']} source(s)": {
                "join (start to first contributed round)": row["join_seconds"],
                "state transfer": row["transfer_seconds"],
                "socket copy of the state": row["socket_copy_seconds"],
            }
            for row in rows
        },
        "seconds",
        "a newcomer joining on loopback",
    )


if __name__ == "__main__":
    main()
