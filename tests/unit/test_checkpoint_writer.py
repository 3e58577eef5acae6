"""The writer's contract with training, against a store that cannot be reached (a real client
aimed at a closed loopback port): submit never waits, status goes stale, errors are clean.
Uploads against a real MinIO are in tests/integration/test_checkpoint.py."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from collabtrain_trainer.checkpoint import CheckpointWriter, Snapshot
from collabtrain_trainer.checkpoint.storage import CheckpointStore
from collabtrain_trainer.config import CheckpointConfig

SECRET = "unit-test-secret-key-0123456789"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def writer() -> Iterator[CheckpointWriter]:
    config = CheckpointConfig.model_validate(
        {
            "endpoint": f"127.0.0.1:{closed_port()}",
            "bucket": "nowhere",
            "secure": False,
            "access_key_env": "AK",
            "secret_key_env": "SK",
        }
    )
    store = CheckpointStore(
        config, "job", env={"AK": "unit-access", "SK": SECRET}, connect_timeout_s=0.5
    )
    writer = CheckpointWriter(
        config, "job", store=store, stale_after_s=0.3, backoff_initial_s=0.05, backoff_max_s=0.1
    )
    yield writer
    writer.close(timeout=1.0, flush=False)


def snapshot(step: int) -> Snapshot:
    return Snapshot.capture(step, {"metadata": {"step": step}, "parameters": torch.ones(4)})


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_unreachable_store_goes_stale_without_blocking_training(
    writer: CheckpointWriter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    slowest = 0.0
    for step in range(1, 6):
        started = time.perf_counter()
        assert writer.submit(snapshot(step), step)
        slowest = max(slowest, time.perf_counter() - started)
    assert slowest < 0.05
    wait_for(lambda: writer.status().stale)
    status = writer.status()
    assert status.last_checkpoint is None and status.failed_attempts >= 1
    assert status.last_error is not None and "cannot reach the endpoint" in status.last_error
    assert status.superseded >= 3  # only the newest waiting snapshot is kept
    assert status.coordinator_fields()["checkpoint_stale"] is True
    assert SECRET not in caplog.text and SECRET not in status.last_error


def test_submit_checks_its_arguments(writer: CheckpointWriter) -> None:
    with pytest.raises(ValueError, match="snapshot of step 2"):
        writer.submit(snapshot(2), 3)
    with pytest.raises(ValueError, match="not allowed"):
        writer.submit({"Bad/Name": torch.ones(1)}, 1)
    assert writer.submit(snapshot(5), 5)
    assert not writer.submit(snapshot(4), 4)  # older than one already queued


def test_plain_mappings_are_copied_and_the_copy_is_timed(writer: CheckpointWriter) -> None:
    state = {"parameters": {"w": torch.zeros(1000)}}
    writer.submit(state, 1)
    state["parameters"]["w"].add_(1)  # training goes on with the live tensors
    assert writer.status().blocked_ms_last > 0


def test_unserializable_state_is_dropped_with_a_reason(writer: CheckpointWriter) -> None:
    writer.submit(Snapshot.capture(1, {"metadata": {"hook": lambda: None}}), 1)
    wait_for(lambda: writer.status().last_error is not None)
    error = writer.status().last_error
    assert error is not None and "cannot be serialized" in error
    assert writer.flush(timeout=1.0)  # nothing left to retry


def test_close_without_flush_stops_retrying(writer: CheckpointWriter) -> None:
    writer.submit(snapshot(1), 1)
    wait_for(lambda: writer.status().failed_attempts >= 1)
    started = time.monotonic()
    assert not writer.close(timeout=1.0, flush=False)
    assert time.monotonic() - started < 2.0
    with pytest.raises(RuntimeError, match="after close"):
        writer.submit(snapshot(2), 2)
