"""A coordinator and peers as separate processes on this machine, on loopback.

Used by `collabtrain-trainer local` (like `torchrun --standalone`) and by the integration
tests, which also kill, throttle and restart its processes.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from collabtrain_trainer.config import TrainerConfig
from collabtrain_trainer.credentials import admin_token, peer_token
from collabtrain_trainer.protocol import TOKEN_HEADER, CoordinatorStatus

# The fork server imports these once; every process forked from it starts in a fraction of
# a second instead of importing torch (and torch.optim's lazy import of dynamo) again. A
# process has one fork server: whoever else forks from it must keep this list in its own.
FORK_SERVER_PRELOAD = [
    "torch",
    "torch._dynamo",
    "sklearn.datasets",
    "collabtrain_trainer.cli",
    "collabtrain_trainer.peer.runtime",
    "collabtrain_trainer.coordinator.server",
]
_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(FORK_SERVER_PRELOAD)


def _nothing() -> None:
    pass


def warm_up() -> None:
    """Start the fork server now (it imports torch once), so the first peer starts fast."""
    process = _context.Process(target=_nothing)
    process.start()
    process.join()


def _cli_main(args: list[str]) -> int:
    from collabtrain_trainer.cli import main

    return main(args)


CommandMain = Callable[[list[str]], int]


def _child_main(args: list[str], env: dict[str, str], log_path: str, command: CommandMain) -> None:
    """Runs in the forked child: its own session, its own log, the given environment."""
    os.setsid()
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.clear()
    os.environ.update(env)
    # What a fresh interpreter would do with the PYTHONPATH it is given (a task's module).
    for entry in reversed(env.get("PYTHONPATH", "").split(os.pathsep)):
        if entry and entry not in sys.path:
            sys.path.insert(0, entry)
    sys.exit(command(args))


class ChildProcess:
    """A `cli` command in a process forked from the preloaded fork server."""

    def __init__(
        self, args: list[str], env: dict[str, str], log_path: Path, command: CommandMain = _cli_main
    ) -> None:
        self._process = _context.Process(
            target=_child_main, args=(args, env, str(log_path), command), daemon=False
        )
        self._process.start()
        assert self._process.pid is not None
        self.pid: int = self._process.pid

    def poll(self) -> int | None:
        return self._process.exitcode

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int | None:
        self._process.join(timeout)
        if self._process.exitcode is None and timeout is not None:
            raise subprocess.TimeoutExpired("collabtrain child", timeout)
        return self._process.exitcode


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class PeerProcess:
    peer_id: str
    process: ChildProcess
    log_path: Path
    counted: bool = False  # its exit has been accounted for


@dataclass
class RunTotals:
    """The run over coordinator restarts. The job's progress (bytes, losses) survives a
    restart in the step certificates, so the newest status has it; what each instance
    counts on its own (rounds aborted, hash agreement) is summed or and-ed."""

    instances: dict[str, CoordinatorStatus] = field(default_factory=dict)
    last: CoordinatorStatus | None = None
    initial_loss: float | None = None
    param_hashes_agree: bool = True

    def observe(self, status: CoordinatorStatus) -> None:
        self.instances[status.instance] = status
        self.last = status
        if self.initial_loss is None and status.initial_loss is not None:
            self.initial_loss = status.initial_loss
        self.param_hashes_agree = self.param_hashes_agree and status.param_hashes_agree

    @property
    def bytes_sent(self) -> int:
        return self.last.bytes_sent if self.last else 0

    @property
    def bytes_fp32_equivalent(self) -> int:
        return self.last.bytes_fp32_equivalent if self.last else 0

    @property
    def bytes_per_step_fp32(self) -> int:
        return self.last.bytes_per_step_fp32 if self.last else 0

    @property
    def rounds_aborted(self) -> int:
        return sum(s.rounds_aborted for s in self.instances.values())


_PLAIN_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")


def stored_job_key(job: str) -> str:
    """The job key of local runs of `job`, made once and kept with mode 0600 under
    `${XDG_STATE_HOME:-~/.local/state}/collabtrain/`, so that a later run of the same job
    resumes its checkpoints (their step certificates verify only with the same key).

    The job's name becomes the file's name, so it must be a plain file name."""
    if not _PLAIN_FILE_NAME.fullmatch(job):
        raise ValueError(
            f"job name {job!r} cannot name its key file: use at most 200 letters, digits, "
            "'.', '_' and '-', not starting with '.' (rename the job in its config)"
        )
    state_home = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    path = state_home / "collabtrain" / f"{job}.job-key"
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32))
    return path.read_text().strip()


class LocalCluster:
    def __init__(
        self,
        config: TrainerConfig,
        workdir: Path,
        *,
        env: dict[str, str] | None = None,
        job_key: str | None = None,
        peer_main: CommandMain = _cli_main,
        host: str = "127.0.0.1",
    ) -> None:
        """`peer_main` runs a peer's command line in its process (a module-level function,
        so that the fork server can import it); the default is the trainer's CLI. `host`
        is the address the coordinator listens on."""
        self.workdir = workdir
        self.peer_main = peer_main
        self.host = host
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        # What the operator does on Kubernetes: the coordinator gets the job key, each
        # peer its own token, and this runner talks to /status as the admin. A run that is
        # to resume another's checkpoints needs that run's key (see `stored_job_key`).
        self.job_key = job_key or secrets.token_hex(32)
        self.config = config.model_copy(
            update={
                "coordinator_url": f"http://{host}:{self.port}",
            }
        )
        self.config_path = workdir / "trainer.json"
        self.config_path.write_text(self.config.model_dump_json(indent=2))
        self.env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "COLLABTRAIN_TORCH_THREADS": "1",
            **(env or {}),
        }
        self.coordinator_env = {**self.env, self.config.job_key_env: self.job_key}
        self.coordinator: ChildProcess | None = None
        self.coordinator_starts = 0
        self.peers: dict[str, PeerProcess] = {}
        self.peers_started = 0
        self.peers_lost = 0
        self.totals = RunTotals()
        self._session = requests.Session()
        self._session.headers[TOKEN_HEADER] = f"Bearer {admin_token(self.job_key)}"

    # --- processes -------------------------------------------------------------------

    def start_coordinator(self) -> None:
        self.coordinator_starts += 1
        self.coordinator = ChildProcess(
            [
                "coordinator",
                "--config",
                str(self.config_path),
                "--host",
                self.host,
            ],
            env=self.coordinator_env,
            log_path=self.workdir / "coordinator.log",
        )

    def wait_coordinator(self, timeout: float = 30.0) -> None:
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            if self.coordinator is not None and self.coordinator.poll() is not None:
                raise RuntimeError(
                    f"the coordinator exited with {self.coordinator.returncode}; "
                    f"see {self.workdir / 'coordinator.log'}"
                )
            with contextlib.suppress(requests.RequestException):
                if self._session.get(f"{self.config.coordinator_url}/healthz", timeout=1).ok:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"the coordinator did not answer within {timeout}s")

    def kill_coordinator(self) -> None:
        if self.coordinator is not None:
            _kill_group(self.coordinator, signal.SIGKILL)
            self.coordinator.wait()

    def start_peer(self, env: dict[str, str] | None = None, host: str = "127.0.0.1") -> str:
        """`host`: the address the peer serves state on (and others reach it at)."""
        self.peers_started += 1
        peer_id = f"peer-{self.peers_started}"
        peer_env = {
            **self.env,
            self.config.peer_token_env: peer_token(self.job_key, peer_id),
            **(env or {}),
        }
        log_path = self.workdir / f"{peer_id}.log"
        process = ChildProcess(
            [
                "peer",
                "--config",
                str(self.config_path),
                "--peer-id",
                peer_id,
                "--advertise-host",
                host,
                "--bind-host",
                host,
            ],
            env=peer_env,
            log_path=log_path,
            command=self.peer_main,
        )
        self.peers[peer_id] = PeerProcess(peer_id, process, log_path)
        return peer_id

    def kill_peer(self, peer_id: str, signum: int = signal.SIGKILL) -> None:
        _kill_group(self.peers[peer_id].process, signum)

    def reap(self) -> list[PeerProcess]:
        """Peers that exited since the last call; a non-zero exit counts as lost."""
        exited = []
        for peer in self.peers.values():
            if not peer.counted and peer.process.poll() is not None:
                peer.counted = True
                if peer.process.returncode != 0:
                    self.peers_lost += 1
                exited.append(peer)
        return exited

    def running_peers(self) -> list[str]:
        return [p.peer_id for p in self.peers.values() if p.process.poll() is None]

    def stop(self, grace: float = 5.0) -> None:
        """Ask every process to stop, then kill what is left; always reaps."""
        processes = [p.process for p in self.peers.values()]
        if self.coordinator is not None:
            processes.append(self.coordinator)
        for process in processes:
            if process.poll() is None:
                _kill_group(process, signal.SIGTERM)
        until = time.monotonic() + grace
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.0, until - time.monotonic()))
        for process in processes:
            if process.poll() is None:
                _kill_group(process, signal.SIGKILL)
                process.wait()
        self._session.close()

    # --- observing -------------------------------------------------------------------

    def status(self) -> CoordinatorStatus | None:
        try:
            response = self._session.get(f"{self.config.coordinator_url}/status", timeout=2)
        except requests.RequestException:
            return None
        if not response.ok:
            return None
        status = CoordinatorStatus.model_validate_json(response.content)
        self.totals.observe(status)
        return status

    def wait_for(
        self, predicate: Any, timeout: float, what: str, interval: float = 0.1
    ) -> CoordinatorStatus:
        until = time.monotonic() + timeout
        last: CoordinatorStatus | None = None
        while time.monotonic() < until:
            status = self.status()
            if status is not None:
                last = status
                if predicate(status):
                    return status
            self.reap()
            time.sleep(interval)
        raise TimeoutError(f"waited {timeout}s for {what}; last status: {last}")

    def log_text(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _kill_group(process: ChildProcess, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)
