"""Errors that end a peer process, each with its exit code. The cause goes to the
container's termination message, where the operator reads it and quotes it on the job
(condition `PeersFailing`), so a user sees it without reading a pod log."""

from __future__ import annotations

import contextlib
from pathlib import Path

from collabtrain_trainer.protocol import EXIT_DATA_ERROR, EXIT_TASK_ERROR

# Where the kubelet reads a container's termination message (the pod spec's default).
TERMINATION_LOG = Path("/dev/termination-log")
_MAX_MESSAGE = 4000  # the kubelet keeps at most 4096 bytes


class PeerFatal(Exception):
    """This peer cannot go on, and another attempt will not do better without a change."""

    exit_code = 1


class TaskError(PeerFatal):
    """The task cannot be loaded, returns the wrong type, or its first step fails."""

    exit_code = EXIT_TASK_ERROR


class DataError(PeerFatal):
    """The task's data yields no batches or cannot be read."""

    exit_code = EXIT_DATA_ERROR


def write_termination_message(text: str) -> None:
    """Leave `text` where the kubelet reads it. Only where the kubelet made the file (in a
    pod); elsewhere there is none, and creating one under /dev would be wrong."""
    if not TERMINATION_LOG.is_file():
        return
    with contextlib.suppress(OSError):  # read-only or gone: the log still has it
        TERMINATION_LOG.write_text(text[:_MAX_MESSAGE])
