"""Start one container of a pod as a local process, the way a container runtime would.

The node agent runs ``python -I pod_launcher.py LAUNCH_SPEC.json`` in a new session (so
the whole pod is one process group). This script, standard library only:

1. asks for SIGUSR1 when the agent dies and then kills its whole process group, so no
   pod process outlives the agent, even one killed with SIGKILL;
2. enters a private mount namespace and a UTS namespace (hostname = pod name);
3. bind-mounts each volume folder (and the pod's hosts file) onto its mount path, so
   two pods see different files at the same path;
4. forks the command with the pod's environment and working directory, and exits with
   its status: the exit code, or 128 + signal number as container runtimes report.

SIGTERM reaches the command directly (the agent signals the process group), so the
launcher itself ignores it. A setup failure is written to ``launch_error_path`` for the
agent to report as a StartError, and the launcher exits 128.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
PR_SET_PDEATHSIG = 1
START_ERROR_EXIT_CODE = 128

_libc = ctypes.CDLL(None, use_errno=True)


class LaunchError(RuntimeError):
    pass


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise LaunchError(f"{what}: {os.strerror(errno)} (errno {errno})")


def _mount(source: str | None, target: str, flags: int) -> None:
    encoded_source = source.encode() if source is not None else None
    _check(
        _libc.mount(encoded_source, target.encode(), None, ctypes.c_ulong(flags), None),
        f"mount {source or '(remount)'} on {target}",
    )


def _prepare_target(source_is_dir: bool, target: Path) -> None:
    """Create the mount point on the host when missing: a file for a file, else a folder."""
    if source_is_dir:
        target.mkdir(parents=True, exist_ok=True)
    elif not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()


STAGING = Path("/run/collabtrain-pod-launcher")


def _would_hide_the_program(mount: dict[str, Any], spec: dict[str, Any]) -> bool:
    """Pods here share this machine's root file system, so a volume mounted over a folder
    that holds the program itself (an emptyDir at /tmp while the checkout and its virtual
    environment live under /tmp) would hide it. Such a volume is not mounted; when it is
    a temp folder, TMPDIR points at it instead."""
    target = Path(mount["target"])
    program = [Path(spec["argv"][0]), Path(__file__), Path(sys.executable)]
    needed = {*program, *(path.resolve() for path in program)}
    if not any(path == target or path.is_relative_to(target) for path in needed):
        return False
    spec["env"].setdefault("TMPDIR", mount["source"])
    print(
        f"[pod-launcher] not mounting the volume at {target}: it would hide "
        f"{spec['argv'][0]} on this machine; TMPDIR={spec['env']['TMPDIR']}",
        file=sys.stderr,
        flush=True,
    )
    return True


def _enter_namespaces(spec: dict[str, Any]) -> None:
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS), "unshare(CLONE_NEWNS | CLONE_NEWUTS)")
    # Without this, our bind mounts would propagate back to the host's shared mounts.
    _mount(None, "/", MS_REC | MS_PRIVATE)
    # Stage every source first, on a tmpfs only this namespace sees: a volume mounted over a
    # folder that holds other sources (an emptyDir at /tmp while the pod folders live under
    # /tmp) would otherwise hide them from the mounts that follow.
    STAGING.mkdir(parents=True, exist_ok=True)
    _check(
        _libc.mount(b"tmpfs", str(STAGING).encode(), b"tmpfs", ctypes.c_ulong(0), None),
        f"mount tmpfs on {STAGING}",
    )
    staged: list[Path] = []
    mounts = [mount for mount in spec["mounts"] if not _would_hide_the_program(mount, spec)]
    spec["mounts"] = mounts
    for index, mount in enumerate(mounts):
        source = Path(mount["source"])
        if not source.exists():
            raise LaunchError(
                f"volume source {source} for mount path {mount['target']} does not exist"
            )
        stage = STAGING / str(index)
        _prepare_target(source.is_dir(), stage)
        _mount(str(source), str(stage), MS_BIND | MS_REC)
        staged.append(stage)
    for mount, stage in zip(spec["mounts"], staged, strict=True):
        target = Path(mount["target"])
        _prepare_target(stage.is_dir(), target)
        _mount(str(stage), str(target), MS_BIND | MS_REC)
        if mount.get("read_only"):
            _mount(None, str(target), MS_BIND | MS_REMOUNT | MS_RDONLY)
    hostname = spec["hostname"].encode()[:64]
    _check(_libc.sethostname(hostname, len(hostname)), "sethostname")


def _kill_group(_signum: int, _frame: object) -> None:
    os.killpg(0, signal.SIGKILL)


class ErrorReport:
    """Where a launch error is written: the pod folder, opened before any mount can hide it."""

    def __init__(self, path: Path) -> None:
        self.name = path.name
        self.folder = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)

    def write(self, text: str) -> None:
        fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=self.folder)
        with os.fdopen(fd, "w") as file:
            file.write(text)


def _exec_command(spec: dict[str, Any], errors: ErrorReport) -> None:
    """In the forked child: restore default signal handling and become the command."""
    try:
        for signum in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        os.chdir(spec["working_dir"])
        os.execve(spec["argv"][0], spec["argv"], spec["env"])
    except BaseException as error:  # anything here must end this child, not run on as Python
        errors.write(f"exec {spec['argv'][0]}: {error}")
    os._exit(START_ERROR_EXIT_CODE)


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    errors = ErrorReport(Path(spec["launch_error_path"]))
    signal.signal(signal.SIGUSR1, _kill_group)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGUSR1)
    if os.getppid() != spec["agent_pid"]:  # the agent died before prctl took effect
        os.killpg(0, signal.SIGKILL)
    signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    try:
        _enter_namespaces(spec)
        # After the mounts: a working dir inside a volume is created in the volume.
        Path(spec["working_dir"]).mkdir(parents=True, exist_ok=True)
    except (LaunchError, OSError) as error:
        errors.write(str(error))
        print(f"[pod-launcher] {error}", file=sys.stderr, flush=True)
        return START_ERROR_EXIT_CODE
    child = os.fork()
    if child == 0:
        _exec_command(spec, errors)
    _pid, status = os.waitpid(child, 0)
    return _exit_code(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
