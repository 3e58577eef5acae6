"""A newcomer's time from process start to its first contributed round, vs the raw link.

Two peers train a ~10.7M-parameter `tinylm` (width 512, 5 layers) with a real coordinator
on loopback (`LocalCluster`). Once they have committed a few steps a third peer is
started; the clock runs from `start_peer()` until that peer logs its first applied step
("step N applied", i.e. a round its gradient took part in). Peers are forked from
collabtrain's fork server with torch preloaded, so the torch import is not in the time.

The link figure is a plain socket copy over the same loopback of the bytes a newcomer
must fetch: parameters plus AdamW's two moment buffers, fp32 (12 bytes per parameter).
`fraction_of_link` = that copy's time / the join time, i.e. how much of the join is the
unavoidable transfer. 100M parameters is not measured: three 100M AdamW peers need
about 5 GB and a step takes many seconds on this 2-core shared machine.
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

from bench.common import print_table, write_result

TASK_ARGS = {"width": "512", "layers": "5", "heads": "8"}


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


def run_join(params_count: int) -> dict[str, Any]:
    from collabtrain_trainer.config import LOOPBACK_TIMING, TrainerConfig
    from collabtrain_trainer.local import LocalCluster

    config = TrainerConfig.model_validate(
        {
            "job": "join",
            "task": "tinylm",
            "task_args": TASK_ARGS,
            "target_batch_size": 32,
            "micro_batch_size": 8,
            "max_steps": 1_000_000,
            "seed": 0,
            "optimizer": {"name": "adamw", "lr": 1e-3},
            "compression": {"codec": "none"},
            # Slower than loopback's defaults: a 10M-parameter state takes a while to move.
            "timing": {
                **LOOPBACK_TIMING.model_dump(),
                "peer_expiry_s": 5.0,
                "initial_round_deadline_s": 60.0,
                "min_round_deadline_s": 10.0,
            },
        }
    )
    workdir = Path(tempfile.mkdtemp(prefix="join-bench-"))
    cluster = LocalCluster(config, workdir)
    try:
        cluster.start_coordinator()
        cluster.wait_coordinator()
        for _ in range(2):
            cluster.start_peer()
        cluster.wait_for(lambda s: s.step >= 3, 180, "3 steps by the first two peers")
        started = time.monotonic()
        newcomer = cluster.start_peer()
        state_loaded = None
        applied = re.compile(r"step \d+ applied")
        while time.monotonic() - started < 180:
            text = cluster.log_text(newcomer)
            if state_loaded is None and "state loaded from" in text:
                state_loaded = time.monotonic() - started
            if applied.search(text):
                join = time.monotonic() - started
                break
            time.sleep(0.05)
        else:
            raise TimeoutError("the newcomer contributed to no round within 180 s")
        status = cluster.status()
        return {
            "params": params_count,
            "join_seconds": round(join, 2),
            "state_loaded_seconds": round(state_loaded, 2) if state_loaded else None,
            "step_at_join": status.step if status else None,
        }
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.parse_args()
    from collabtrain_trainer.tasks import load_task

    count = sum(p.numel() for p in load_task("tinylm", TASK_ARGS, 0).model.parameters())
    began = time.monotonic()
    result = run_join(count)
    nbytes = 12 * count
    copy = min(socket_copy_seconds(nbytes) for _ in range(3))
    row = {
        **result,
        "state_bytes": nbytes,
        "socket_copy_seconds": round(copy, 3),
        "link_MB_per_s": round(nbytes / copy / 1e6, 1),
        "fraction_of_link": round(copy / result["join_seconds"], 4),
    }
    summary = {
        "join_seconds_100m": None,
        "join_seconds_100m_note": "not measured: ~5 GB for three 100M AdamW peers and "
        "multi-second steps on a 2-core shared machine; the 10M figure is join_seconds_10m",
        "join_seconds_10m": result["join_seconds"],
        "fraction_of_link": row["fraction_of_link"],
        "wall_seconds": round(time.monotonic() - began, 1),
    }
    print_table(
        [row],
        [
            "params",
            "join_seconds",
            "state_loaded_seconds",
            "socket_copy_seconds",
            "fraction_of_link",
        ],
    )
    print(write_result("join", summary, [row]))


if __name__ == "__main__":
    main()
