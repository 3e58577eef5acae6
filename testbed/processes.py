"""Child processes that never outlive the test run, free loopback ports, and readiness waits.

Every child is started in its own process group with a parent-death signal, so it is killed
when the test run ends, fails, is interrupted, or is itself killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

PR_SET_PDEATHSIG = 1


class TestbedError(RuntimeError):
    """A test-bed component failed to start or is misconfigured; the message says which."""

    __test__ = False  # not a test class, whatever pytest makes of the name


class PortInUseError(TestbedError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_port_free(port: int, component: str, flag: str, address: str = "127.0.0.1") -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As servers do: a stopped server's connections in TIME_WAIT do not block a restart.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError as error:
            raise PortInUseError(
                f"{component} cannot start: port {port} on {address} (its {flag}) is already "
                f"in use ({error.strerror}). Stop whatever listens there "
                f"(`ss -ltnp 'sport = :{port}'`) or let the test bed pick a free port."
            ) from None


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class _Spawner:
    """Starts every child from one thread that lives as long as this process.

    The parent-death signal fires when the *thread* that started the child ends, not the
    process: a node started from a short-lived thread (a preemption running beside a test)
    would otherwise be killed the moment that thread finished.
    """

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = (
            queue.SimpleQueue()
        )
        threading.Thread(target=self._serve, name="child-spawner", daemon=True).start()

    def _serve(self) -> None:
        while True:
            start, result = self._requests.get()
            try:
                result.set_result(start())
            except BaseException as error:  # handed to the caller's thread
                result.set_exception(error)

    def run(self, start: Callable[[], T]) -> T:
        result: Future[T] = Future()
        self._requests.put((start, result))
        return result.result()


_spawner_lock = threading.Lock()
_spawner: _Spawner | None = None


def spawn(start: Callable[[], T]) -> T:
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = _Spawner()
    return _spawner.run(start)


class ManagedProcess:
    """One child process with its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.popen = spawn(
            lambda: subprocess.Popen(
                self.argv,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 2500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after `grace` seconds."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self._log.close()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)


def wait_for(predicate: Callable[[], T], what: str, timeout: float = 60) -> T:
    """Poll `predicate` until it returns something truthy, and return that (for tests)."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


def wait_until(
    ready: Callable[[], bool],
    what: str,
    timeout: float = 60.0,
    process: ManagedProcess | None = None,
    interval: float = 0.2,
) -> None:
    """Poll `ready` until it is true; fail fast with the log tail if `process` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise TestbedError(
                f"{process.name} exited with code {process.popen.returncode} before {what}; "
                f"the end of {process.log_path}:\n{process.log_tail()}"
            )
        with contextlib.suppress(Exception):
            if ready():
                return
        time.sleep(interval)
    tail = f"; the end of {process.log_path}:\n{process.log_tail()}" if process else ""
    raise TestbedError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")
