"""`collabtrain-trainer`: the coordinator, a peer, or a whole local run.

    collabtrain-trainer coordinator --config trainer.json [--port 7000]
    collabtrain-trainer peer --config trainer.json [--peer-id NAME]   # or $COLLABTRAIN_PEER_ID
    collabtrain-trainer local --peers 3 --task tinylm --max-steps 20 --codec none \\
        [--respawn] [--summary summary.json] \\
        [--checkpoint-endpoint http://127.0.0.1:9000 --checkpoint-bucket B \\
         --checkpoint-every-steps 10]   # credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, get_args
from urllib.parse import urlparse

from collabtrain_trainer.config import (
    LOOPBACK_TIMING,
    PEER_ID_ENV,
    CodecName,
    TrainerConfig,
)
from collabtrain_trainer.errors import PeerFatal, write_termination_message

log = logging.getLogger("collabtrain.cli")


def _load_config(path: str) -> TrainerConfig:
    try:
        return TrainerConfig.model_validate_json(Path(path).read_text())
    except OSError as error:
        raise SystemExit(f"cannot read the trainer config {path}: {error}") from error
    except ValueError as error:
        raise SystemExit(f"the trainer config {path} is not valid:\n{error}") from error


def _coordinator(args: argparse.Namespace) -> int:
    from collabtrain_trainer.coordinator.server import CoordinatorSettings, run_coordinator

    config = _load_config(args.config)
    ports = config.coordinator_ports()
    settings = CoordinatorSettings(
        host=args.host,
        port=args.port or ports["http"],
    )
    return run_coordinator(config, settings)


def _peer(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    token = os.environ.get(config.peer_token_env)
    if not token:
        message = (
            f"the peer's token is missing: set the environment variable {config.peer_token_env} "
            "(on Kubernetes, the operator fills it from the peer's own Secret)"
        )
        print(message, file=sys.stderr)  # logging is not configured yet
        write_termination_message(message)
        return 2
    # The pod's name (downward API) on Kubernetes; never the host name, which is cut to 63
    # characters and would make two peers of a long-named job one and the same.
    peer_id = args.peer_id or os.environ.get(PEER_ID_ENV)
    if not peer_id:
        message = (
            f"the peer id is missing: pass --peer-id or set the environment variable "
            f"{PEER_ID_ENV} (the operator sets it to the pod's name)"
        )
        print(message, file=sys.stderr)
        write_termination_message(message)
        return 2
    from collabtrain_trainer.observability import configure_logging

    configure_logging(config.job, peer=peer_id)
    import torch

    threads = os.environ.get("COLLABTRAIN_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    from collabtrain_trainer.peer.runtime import Peer

    # Outside a pod (no $POD_IP) the address the host name resolves to.
    advertise = (
        args.advertise_host
        or os.environ.get("POD_IP")
        or socket.gethostbyname(socket.gethostname())
    )
    from collabtrain_trainer.peer.client import RequestRefused

    try:
        peer = Peer(
            config,
            peer_id,
            token,
            advertise_host=advertise,
            bind_host=args.bind_host,
            state_port=args.state_port,
        )
        return peer.run()
    except PeerFatal as error:
        return _fatal(str(error), error.exit_code)
    except PermissionError as error:
        return _fatal(str(error), 3)
    except RequestRefused as error:
        return _fatal(str(error), 4)


def _fatal(message: str, exit_code: int) -> int:
    """Log why this peer gives up and leave it for the operator to quote on the job."""
    logging.getLogger("collabtrain.peer").error("%s", message)
    write_termination_message(message)
    return exit_code


def _checkpoint_config(args: argparse.Namespace) -> dict[str, Any] | None:
    """`--checkpoint-endpoint` takes host:port (TLS) or an http:// or https:// URL."""
    if not args.checkpoint_endpoint:
        if args.checkpoint_bucket or args.checkpoint_every_steps:
            raise SystemExit(
                "--checkpoint-bucket/--checkpoint-every-steps need --checkpoint-endpoint"
            )
        return None
    if not args.checkpoint_bucket:
        raise SystemExit("--checkpoint-endpoint needs --checkpoint-bucket")
    parsed = urlparse(args.checkpoint_endpoint)
    secure = parsed.scheme != "http"
    endpoint = parsed.netloc if parsed.scheme in ("http", "https") else args.checkpoint_endpoint
    return {
        "endpoint": endpoint,
        "bucket": args.checkpoint_bucket,
        "prefix": args.checkpoint_prefix,
        "secure": secure,
        "every_steps": args.checkpoint_every_steps or 10,
    }


def _local_updates_config(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.inner_steps is None:
        if args.outer_lr is not None or args.outer_momentum is not None or args.overlap:
            raise SystemExit(
                "--outer-lr/--outer-momentum/--overlap need --inner-steps (local updates)"
            )
        return None
    outer = {"outer_lr": args.outer_lr, "outer_momentum": args.outer_momentum}
    return {"inner_steps": args.inner_steps, "overlap": args.overlap} | {
        k: v for k, v in outer.items() if v is not None
    }


def _local_config(args: argparse.Namespace) -> TrainerConfig:
    task_defaults = {"tinylm": (3e-3, 256), "digits": (1e-2, 256)}
    lr, target = task_defaults.get(args.task, (1e-3, 256))
    return TrainerConfig.model_validate(
        {
            "job": args.job,
            "task": args.task,
            "target_batch_size": args.target_batch_size or target,
            "micro_batch_size": args.micro_batch_size,
            "max_steps": args.max_steps,
            "seed": args.seed,
            "optimizer": {"name": args.optimizer, "lr": args.lr or lr},
            "compression": {"codec": args.codec},
            "local_updates": _local_updates_config(args),
            "checkpoint": _checkpoint_config(args),
            "timing": LOOPBACK_TIMING.model_dump(),
        }
    )


def _local(args: argparse.Namespace) -> int:
    from collabtrain_trainer.local import LocalCluster, stored_job_key

    config = _local_config(args)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="collabtrain-local-"))
    # With checkpoints, a later run of the same job resumes them: it needs the same key.
    try:
        job_key = stored_job_key(config.job) if config.checkpoint is not None else None
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    cluster = LocalCluster(config, workdir, job_key=job_key)
    stopping: list[int] = []

    def on_signal(signum: int, _: Any) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    print(
        f"collabtrain local: {args.peers} peers, task {args.task}, codec {args.codec}, "
        f"{args.max_steps} steps of {config.target_batch_size} samples; logs in {workdir}",
        flush=True,
    )
    outcome = "finished"
    last_step = -1
    status = None
    try:
        cluster.start_coordinator()
        cluster.wait_coordinator()
        for _ in range(args.peers):
            _announce(cluster, cluster.start_peer())
        last_print = 0.0
        while True:
            if stopping:
                outcome = "interrupted"
                break
            if time.monotonic() - started > args.timeout:
                outcome = f"timed out after {args.timeout:.0f}s"
                break
            if cluster.coordinator is not None and cluster.coordinator.poll() is not None:
                outcome = f"the coordinator exited with {cluster.coordinator.returncode}"
                break
            status = cluster.status() or status
            for peer in cluster.reap():
                code = peer.process.returncode
                finished = status is not None and status.finished
                if code != 0:
                    print(f"  {peer.peer_id} died (exit {code})", flush=True)
                if args.respawn and not finished:
                    print(f"  respawning a peer for {peer.peer_id}", flush=True)
                    _announce(cluster, cluster.start_peer())
            if status is not None and (
                status.step != last_step or time.monotonic() - last_print > 5
            ):
                last_step, last_print = status.step, time.monotonic()
                loss = f"{status.loss:.4f}" if status.loss is not None else "-"
                print(
                    f"step {status.step}/{status.max_steps}  loss {loss}  "
                    f"peers {len(status.peers)}  "
                    f"samples {status.samples_in_round}/{config.round_samples}  "
                    f"epoch {status.membership_epoch}  aborted {status.rounds_aborted}",
                    flush=True,
                )
            if status is not None and status.finished:
                break
            if not cluster.running_peers() and not args.respawn:
                outcome = "every peer exited before the last step"
                break
            time.sleep(0.2)
        if status is not None and status.finished:
            # Peers leave on their own once they learn the run is over.
            until = time.monotonic() + 15
            while cluster.running_peers() and time.monotonic() < until:
                time.sleep(0.1)
            cluster.reap()
            status = cluster.status() or status  # the writer reports the final checkpoint
    finally:
        cluster.stop()
    elapsed = time.monotonic() - started
    summary = _summary(cluster, status, elapsed, args, outcome)
    print(json.dumps(summary, indent=2), flush=True)
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if outcome == "finished" else 1


def _announce(cluster: Any, peer_id: str) -> None:
    print(f"  started {peer_id} (pid {cluster.peers[peer_id].process.pid})", flush=True)


def _summary(
    cluster: Any, status: Any, elapsed: float, args: argparse.Namespace, outcome: str
) -> dict[str, Any]:
    totals = cluster.totals
    steps = status.step if status is not None else 0
    return {
        "outcome": outcome,
        "task": args.task,
        "codec": args.codec,
        "peers": args.peers,
        "steps": steps,
        "initial_loss": totals.initial_loss,
        "final_loss": status.loss if status is not None else None,
        "peers_joined": cluster.peers_started,
        "peers_lost": cluster.peers_lost,
        "param_hashes_agree": totals.param_hashes_agree,
        "bytes_sent": totals.bytes_sent,
        "bytes_fp32_equivalent": totals.bytes_fp32_equivalent,
        "inner_steps": args.inner_steps,
        # Against per-step fp32 averaging of the same samples (local updates send less often).
        "compression_vs_per_step_fp32": (
            round(totals.bytes_per_step_fp32 / totals.bytes_sent, 2) if totals.bytes_sent else None
        ),
        "samples_committed": status.samples_committed if status is not None else 0,
        "rounds_aborted": totals.rounds_aborted,
        "wall_seconds": round(elapsed, 2),
        "steps_per_second": round(steps / elapsed, 3) if elapsed > 0 else 0.0,
        "coordinator_starts": cluster.coordinator_starts,
        "last_checkpoint": (
            status.last_checkpoint.model_dump(mode="json")
            if status is not None and status.last_checkpoint is not None
            else None
        ),
        "workdir": str(cluster.workdir),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="collabtrain-trainer", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)

    coordinator = commands.add_parser("coordinator", help="run the coordinator service")
    coordinator.add_argument("--config", required=True, help="trainer config JSON (trainer.json)")
    coordinator.add_argument("--host", default="0.0.0.0", help="address to listen on")
    coordinator.add_argument(
        "--port", type=int, default=None, help="HTTP port (default: from coordinator_url)"
    )
    coordinator.set_defaults(run=_coordinator)

    peer = commands.add_parser("peer", help="run one peer")
    peer.add_argument("--config", required=True, help="trainer config JSON (trainer.json)")
    peer.add_argument("--peer-id", default=None, help=f"default: ${PEER_ID_ENV}")
    peer.add_argument(
        "--advertise-host", default=None, help="address others fetch state from (default: $POD_IP)"
    )
    peer.add_argument("--bind-host", default="0.0.0.0", help="address the state server listens on")
    peer.add_argument("--state-port", type=int, default=0, help="state server port (0: any free)")
    peer.set_defaults(run=_peer)

    local = commands.add_parser("local", help="a coordinator and N peers as local processes")
    local.add_argument("--peers", type=int, default=3)
    local.add_argument("--task", default="tinylm", help="tinylm, digits or module:function")
    local.add_argument("--max-steps", type=int, default=20)
    local.add_argument("--codec", default="none", choices=get_args(CodecName))
    local.add_argument("--respawn", action="store_true", help="start a new peer whenever one dies")
    local.add_argument("--summary", default=None, help="write the run's summary JSON here")
    local.add_argument("--target-batch-size", type=int, default=None)
    local.add_argument("--micro-batch-size", type=int, default=16)
    local.add_argument("--optimizer", default="adamw", choices=["sgd", "adam", "adamw"])
    local.add_argument(
        "--inner-steps",
        type=int,
        default=None,
        metavar="H",
        help="local updates (DiLoCo): rounds of H steps' samples, each peer taking an inner "
        "optimizer step per micro-batch, then averaging the compressed pseudo-gradient "
        "(default: average gradients every step)",
    )
    local.add_argument("--outer-lr", type=float, default=None, help="with --inner-steps (0.7)")
    local.add_argument(
        "--outer-momentum", type=float, default=None, help="with --inner-steps (0.9, Nesterov)"
    )
    local.add_argument(
        "--overlap",
        action="store_true",
        help="with --inner-steps: train on while a round is in flight (its outer step lands "
        "one round late)",
    )
    local.add_argument("--lr", type=float, default=None)
    local.add_argument("--seed", type=int, default=0)
    local.add_argument("--job", default="local")
    local.add_argument("--workdir", default=None, help="logs and config (default: a temp dir)")
    local.add_argument(
        "--timeout", type=float, default=600.0, help="give up after this many seconds"
    )
    local.add_argument(
        "--checkpoint-endpoint",
        default=None,
        help="S3-compatible store for checkpoints: host:port (TLS) or http(s)://host:port; "
        "credentials from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    )
    local.add_argument("--checkpoint-bucket", default=None)
    local.add_argument("--checkpoint-prefix", default="")
    local.add_argument(
        "--checkpoint-every-steps", type=int, default=None, help="default 10 with an endpoint"
    )
    local.set_defaults(run=_local)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
