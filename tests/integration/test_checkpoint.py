"""Checkpoints against a real MinIO server: bit-exact round trips, a writer killed mid-upload,
a storage outage, corruption, retention, TLS, and credentials that never reach a log."""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from minio import Minio
from minio.error import S3Error

from collabtrain_trainer import credentials
from collabtrain_trainer.checkpoint import (
    CheckpointCorruptError,
    CheckpointReader,
    CheckpointStorageError,
    CheckpointStore,
    CheckpointWriter,
    CredentialsError,
    LatestPointer,
    LoadedCheckpoint,
    Snapshot,
    restore_state,
    snapshot_state,
)
from collabtrain_trainer.checkpoint.storage import MIN_PART_SIZE
from collabtrain_trainer.config import CheckpointConfig
from collabtrain_trainer.peer.checkpointing import PeerCheckpoints
from collabtrain_trainer.peer.model_state import param_hash
from collabtrain_trainer.peer.state_server import StateServer, fetch_state
from collabtrain_trainer.protocol import StateSource
from collabtrain_trainer.state_snapshot import (
    StateLayout,
    apply_snapshot,
    hash_tensors,
    model_tensors,
    take_snapshot,
)
from testbed import tools
from testbed.cluster import MinioServer, Pki
from testbed.processes import ManagedProcess, free_port, wait_until

pytestmark = pytest.mark.integration

AK_ENV, SK_ENV = "CT_TEST_CKPT_AK", "CT_TEST_CKPT_SK"
JOB = "job-a"


@pytest.fixture
def bucket(minio_server: MinioServer) -> str:
    name = f"ckpt-{secrets.token_hex(4)}"
    minio_server.client().make_bucket(name)
    return name


@pytest.fixture
def env(minio_server: MinioServer) -> dict[str, str]:
    return {AK_ENV: minio_server.access_key, SK_ENV: minio_server.secret_key}


@pytest.fixture
def config(minio_server: MinioServer, bucket: str) -> CheckpointConfig:
    return CheckpointConfig.model_validate(
        {
            "endpoint": minio_server.endpoint,
            "bucket": bucket,
            "prefix": "runs/",
            "secure": False,
            "keep_last": 2,
            "access_key_env": AK_ENV,
            "secret_key_env": SK_ENV,
        }
    )


@pytest.fixture
def make_writer(
    config: CheckpointConfig, env: dict[str, str]
) -> Iterator[Callable[..., CheckpointWriter]]:
    writers: list[CheckpointWriter] = []

    def make(cfg: CheckpointConfig | None = None, **options: Any) -> CheckpointWriter:
        cfg = cfg or config
        store = CheckpointStore(
            cfg, JOB, env=options.pop("env", env), connect_timeout_s=2.0, read_timeout_s=10.0
        )
        options = {"backoff_initial_s": 0.1, "backoff_max_s": 0.5, **options}
        writer = CheckpointWriter(cfg, JOB, store=store, **options)
        writers.append(writer)
        return writer

    yield make
    for writer in writers:
        writer.close(timeout=5.0, flush=False)


def reader(config: CheckpointConfig, env: dict[str, str]) -> CheckpointReader:
    return CheckpointReader(config, JOB, env=env)


def small_snapshot(step: int, megabytes: float = 0.01) -> Snapshot:
    """A one-tensor model whose weight is all `step`, as `snapshot_state` takes it."""
    model = small_model(megabytes)
    with torch.no_grad():
        model.weight.fill_(float(step))
    return snapshot_state(model, torch.optim.SGD(model.parameters(), lr=0.1), step, step, step)


def small_model(megabytes: float) -> torch.nn.Linear:
    return torch.nn.Linear(int(megabytes * 1024 * 1024 / 4), 1, bias=False)


def small_weight(loaded: LoadedCheckpoint) -> torch.Tensor:
    return model_tensors(loaded.objects["state"])["weight"]


def steps_in_bucket(client: Minio, config: CheckpointConfig) -> tuple[set[int], set[int]]:
    """(complete, incomplete) step folders, read straight from the bucket."""
    complete, seen = set(), set()
    root = f"{config.prefix.strip('/')}/{JOB}/"
    for item in client.list_objects(config.bucket, prefix=root, recursive=True):
        name = item.object_name or ""
        folder = name[len(root) :].split("/")[0]
        if folder.startswith("step-"):
            seen.add(int(folder[5:]))
            if name.endswith("/manifest.json"):
                complete.add(int(folder[5:]))
    return complete, seen - complete


def latest_in_bucket(client: Minio, config: CheckpointConfig) -> LatestPointer:
    response = client.get_object(config.bucket, f"{config.prefix.strip('/')}/{JOB}/latest")
    try:
        return LatestPointer.model_validate_json(response.read())
    finally:
        response.close()
        response.release_conn()


# -- a model that is large enough for multipart uploads -------------------------------------


def make_model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    # 1536x1024 fp32 = 6 MiB: above the 5 MiB part size, so parameters and both AdamW
    # moments go up as multipart uploads.
    model = torch.nn.Sequential(
        torch.nn.Linear(1024, 1536), torch.nn.LayerNorm(1536), torch.nn.Linear(1536, 8)
    )
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, data: torch.Generator
) -> list[float]:
    losses = []
    for _ in range(steps):
        inputs = torch.randn(16, 1024, generator=data)
        loss = (model(inputs) - torch.rand(16, 8)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_save_and_restore_is_bit_exact_and_training_continues(
    make_writer: Callable[..., CheckpointWriter],
    config: CheckpointConfig,
    env: dict[str, str],
    minio_server: MinioServer,
) -> None:
    model, optimizer = make_model(0)
    data = torch.Generator().manual_seed(1)
    train(model, optimizer, 3, data)
    writer = make_writer(part_size=MIN_PART_SIZE)
    snapshot = snapshot_state(model, optimizer, 3, 48, {"epoch": 0, "offset": 48}, data)
    saved_model = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    started = time.perf_counter()
    writer.submit(snapshot, 3)
    assert time.perf_counter() - started < 0.05, "submit must not wait on storage"
    expected_losses = train(model, optimizer, 3, data)  # the run that never stopped
    assert writer.flush(timeout=60)

    status = writer.status()
    assert status.last_checkpoint is not None and status.last_checkpoint.step == 3
    assert status.last_checkpoint.uri == f"s3://{config.bucket}/runs/{JOB}/step-000000003/"
    assert not status.stale and status.last_error is None and status.blocked_ms_last > 0

    client = minio_server.client()
    key = f"runs/{JOB}/step-000000003/state.bin"
    assert "-" in client.stat_object(config.bucket, key).etag, "expected a multipart upload"
    assert latest_in_bucket(client, config).step == 3

    loaded = reader(config, env).load_latest(layout=StateLayout.of(*make_model(1)))
    assert loaded is not None and loaded.step == 3 and loaded.skipped == ()
    assert loaded.manifest.format == 2 and loaded.manifest.state is not None
    assert set(loaded.manifest.objects) == {"metadata"}
    assert loaded.manifest.state.manifest.chunks > 1  # several ranged reads, in parallel

    # A different process's state: different init, different data position and RNGs.
    fresh, fresh_optimizer = make_model(99)
    fresh_data = torch.Generator().manual_seed(12345)
    torch.manual_seed(777)
    progress = restore_state(loaded.objects, fresh, fresh_optimizer, fresh_data)
    assert (progress.step, progress.samples_seen) == (3, 48)
    assert progress.data_position == {"epoch": 0, "offset": 48}
    for name, tensor in saved_model.items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    restored_optimizer = fresh_optimizer.state_dict()
    assert restored_optimizer["param_groups"] == saved_optimizer["param_groups"]
    for index, state in restored_optimizer["state"].items():
        for field, value in state.items():
            assert torch.equal(value, saved_optimizer["state"][index][field]), (index, field)
    # Same RNG streams and state, so the loss curve continues exactly where it stopped.
    assert train(fresh, fresh_optimizer, 3, fresh_data) == expected_losses

    # Its size and facts without downloading the state; a model it does not fit is
    # refused before any chunk is read.
    peeked = reader(config, env).peek_latest()
    assert peeked is not None and peeked.step == 3
    assert peeked.total_bytes == loaded.manifest.state.manifest.total_bytes + sum(
        entry.size for entry in loaded.manifest.objects.values()
    )
    facts = reader(config, env).load_latest(only={"metadata"})
    assert facts is not None and set(facts.objects) == {"metadata"}
    other = torch.nn.Linear(1024, 4)
    with pytest.raises(CheckpointCorruptError, match="does not fit this model"):
        reader(config, env).load_latest(
            layout=StateLayout.of(other, torch.optim.AdamW(other.parameters()))
        )


FORMAT_1 = Path(__file__).parent.parent / "fixtures" / "checkpoint-format1"


def test_a_checkpoint_in_the_first_format_still_restores(
    config: CheckpointConfig, env: dict[str, str], minio_server: MinioServer
) -> None:
    """A real format-1 checkpoint (parameters.pt, optimizer.pt), written by the writer as it
    was before the state stream: it restores bit for bit."""
    client = minio_server.client()
    for path in FORMAT_1.rglob("*"):
        if path.is_file() and path.name != "expected.pt":
            key = f"{config.prefix.strip('/')}/old/{path.relative_to(FORMAT_1)}"
            client.fput_object(config.bucket, key, str(path))
    loaded = CheckpointReader(config, "old", env=env).load_latest()
    assert loaded is not None and loaded.manifest.format == 1 and loaded.step == 3
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5)
    progress = restore_state(loaded.objects, model, optimizer, restore_global_rng=False)
    assert (progress.step, progress.samples_seen) == (3, 15)
    expected = torch.load(FORMAT_1 / "expected.pt", weights_only=True)
    for name, tensor in expected["model"].items():
        assert torch.equal(model.state_dict()[name], tensor), name
    restored = optimizer.state_dict()
    assert restored["param_groups"][0]["lr"] == 0.01
    for index, state in expected["optimizer"]["state"].items():
        for field, value in state.items():
            assert torch.equal(restored["state"][index][field], value), (index, field)


def test_a_checkpoint_format_from_the_future_is_named(
    make_writer: Callable[..., CheckpointWriter],
    config: CheckpointConfig,
    env: dict[str, str],
    minio_server: MinioServer,
) -> None:
    writer = make_writer()
    writer.submit(small_snapshot(1), 1)
    assert writer.flush(timeout=30)
    client = minio_server.client()
    key = f"runs/{JOB}/step-000000001/manifest.json"
    response = client.get_object(config.bucket, key)
    body = response.read().replace(b'"format": 2', b'"format": 3')
    response.close()
    response.release_conn()
    client.put_object(config.bucket, key, io.BytesIO(body), len(body))
    # As a newer writer would leave it: `latest` vouches for the new manifest.
    latest = LatestPointer(step=1, manifest=key, manifest_sha256=hashlib.sha256(body).hexdigest())
    pointer = latest.model_dump_json().encode()
    client.put_object(config.bucket, f"runs/{JOB}/latest", io.BytesIO(pointer), len(pointer))
    with pytest.raises(CheckpointCorruptError, match="checkpoint format 3 is not one this"):
        reader(config, env).load_latest()


def test_nothing_to_load_returns_none(config: CheckpointConfig, env: dict[str, str]) -> None:
    assert reader(config, env).load_latest() is None


KILLED_WRITER = textwrap.dedent(
    """
    import logging, sys, time, torch
    from collabtrain_trainer.checkpoint import CheckpointWriter, snapshot_state
    from collabtrain_trainer.config import CheckpointConfig

    logging.basicConfig(stream=sys.stdout, level=logging.DEBUG, format="%(message)s")
    config = CheckpointConfig.model_validate_json(sys.argv[1])
    writer = CheckpointWriter(config, sys.argv[2], part_size=5 * 1024 * 1024)
    big = torch.nn.Linear(24 * 1024 * 1024, 1, bias=False)  # 96 MiB: ~20 parts
    optimizer = torch.optim.SGD(big.parameters(), lr=0.1)
    writer.submit(snapshot_state(big, optimizer, 2, 2, 2), 2)
    print("submitted", flush=True)
    time.sleep(600)
    """
)


def test_writer_killed_mid_upload_leaves_latest_on_the_previous_checkpoint(
    make_writer: Callable[..., CheckpointWriter],
    config: CheckpointConfig,
    env: dict[str, str],
    minio_server: MinioServer,
) -> None:
    writer = make_writer()
    writer.submit(small_snapshot(1), 1)
    assert writer.flush(timeout=30)

    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, config.model_dump_json(), JOB],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen = []
    try:
        assert child.stdout is not None
        deadline = time.monotonic() + 120
        # The small metadata object goes first; once it is up, the 96 MiB multipart
        # upload of the state is under way.
        while time.monotonic() < deadline:
            line = child.stdout.readline()
            seen.append(line)
            if "object metadata uploaded" in line or not line:
                break
        assert any("object metadata uploaded" in line for line in seen), "".join(seen)
        time.sleep(0.05)
        os.killpg(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(10)

    client = minio_server.client()
    complete, incomplete = steps_in_bucket(client, config)
    assert complete == {1}, f"step 2 must not be complete; output: {''.join(seen)}"
    assert incomplete == {2}  # its metadata made it, its manifest did not
    with pytest.raises(S3Error, match="NoSuchKey"):  # killed inside the multipart upload
        client.stat_object(config.bucket, f"runs/{JOB}/step-000000002/state.bin")
    assert latest_in_bucket(client, config).step == 1
    loaded = reader(config, env).load_latest()
    assert loaded is not None and loaded.step == 1 and loaded.skipped == ()

    # The next complete checkpoint leaves the folder: as far as anyone can tell, its
    # writer may still be uploading (it is deleted once untouched for ABANDONED_AFTER).
    writer.submit(small_snapshot(3), 3)
    assert writer.flush(timeout=30)
    assert steps_in_bucket(client, config) == ({1, 3}, {2})


def test_storage_outage_goes_stale_and_recovers_without_blocking_training(
    make_writer: Callable[..., CheckpointWriter],
    config: CheckpointConfig,
    env: dict[str, str],
    minio_server: MinioServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    writer = make_writer(stale_after_s=1.5)
    writer.submit(small_snapshot(1), 1)
    assert writer.flush(timeout=30)
    assert not writer.status().stale

    minio_server.stop()
    try:
        step, slowest_submit = 1, 0.0
        deadline = time.monotonic() + 60
        while not writer.status().stale:
            assert time.monotonic() < deadline, f"never went stale: {writer.status()}"
            step += 1
            snapshot = small_snapshot(step)
            started = time.perf_counter()
            writer.submit(snapshot, step)
            slowest_submit = max(slowest_submit, time.perf_counter() - started)
            time.sleep(0.1)  # training goes on
        status = writer.status()
        assert slowest_submit < 0.05, "submit waited on storage during the outage"
        assert status.last_checkpoint is not None and status.last_checkpoint.step == 1
        assert status.last_error and minio_server.endpoint in status.last_error
        assert status.failed_attempts >= 1 and status.behind_since is not None
    finally:
        minio_server.start()

    assert writer.flush(timeout=60), writer.status()
    status = writer.status()
    assert status.last_checkpoint is not None and status.last_checkpoint.step == step
    assert not status.stale and status.last_error is None
    # Only the newest waiting snapshot was worth writing once storage came back (at most
    # one older one can have been in flight when it did).
    complete, _ = steps_in_bucket(minio_server.client(), config)
    assert step in complete and status.checkpoints_written <= 3
    assert status.superseded >= step - 3
    loaded = reader(config, env).load_latest()
    assert loaded is not None and loaded.step == step
    assert minio_server.secret_key not in caplog.text


@pytest.mark.parametrize("damage", ["flip-a-byte", "truncate", "delete", "manifest"])
def test_corrupt_checkpoint_is_detected_and_the_previous_one_loads(
    damage: str,
    make_writer: Callable[..., CheckpointWriter],
    config: CheckpointConfig,
    env: dict[str, str],
    minio_server: MinioServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer = make_writer()
    for step in (1, 2):
        writer.submit(small_snapshot(step, megabytes=0.5), step)
        assert writer.flush(timeout=30)

    client = minio_server.client()
    folder = f"runs/{JOB}/step-000000002/"
    target = folder + ("manifest.json" if damage == "manifest" else "state.bin")
    response = client.get_object(config.bucket, target)
    body = bytearray(response.read())
    response.close()
    response.release_conn()
    if damage == "delete":
        client.remove_object(config.bucket, target)
    else:
        if damage == "truncate":
            body = body[: len(body) // 2]
        else:
            body[len(body) // 2] ^= 0x01
        client.put_object(config.bucket, target, io.BytesIO(bytes(body)), len(body))

    caplog.set_level(logging.WARNING, logger="collabtrain_trainer.checkpoint")
    loaded = reader(config, env).load_latest()
    assert loaded is not None and loaded.step == 1
    assert len(loaded.skipped) == 1 and loaded.skipped[0].startswith("step 2:")
    expected = {
        "flip-a-byte": "BLAKE3",
        "truncate": "ends at byte",
        "delete": "missing",
        "manifest": "latest expects",
    }[damage]
    assert expected in loaded.skipped[0]
    assert "falling back" in caplog.text and expected in caplog.text
    assert torch.equal(small_weight(loaded), torch.full_like(small_weight(loaded), 1.0))

    # Only corrupt checkpoints left: refuse rather than silently start from scratch.
    client.remove_object(config.bucket, f"runs/{JOB}/step-000000001/state.bin")
    with pytest.raises(CheckpointCorruptError, match="no usable checkpoint"):
        reader(config, env).load_latest()


def test_retention_keeps_exactly_keep_last(
    make_writer: Callable[..., CheckpointWriter],
    config: CheckpointConfig,
    minio_server: MinioServer,
) -> None:
    writer = make_writer(config.model_copy(update={"keep_last": 3}))
    client = minio_server.client()
    for step in range(1, 8):
        writer.submit(small_snapshot(step), step)
        assert writer.flush(timeout=30)
        assert steps_in_bucket(client, config) == (set(range(max(1, step - 2), step + 1)), set())
        assert latest_in_bucket(client, config).step == step


def test_latest_never_moves_back_when_a_leaving_writer_finishes_late(
    make_writer: Callable[..., CheckpointWriter],
    config: CheckpointConfig,
    minio_server: MinioServer,
) -> None:
    """The writer that is leaving reads `latest`, then the new writer completes a later
    step before the leaving one writes: its conditional write is refused, it compares
    again and leaves `latest` on the later step."""
    leaving, new = make_writer(), make_writer()
    read_latest = leaving._read_latest
    raced: list[int] = []

    def read_then_lose_the_race() -> Any:
        found = read_latest()
        if not raced:
            raced.append(24)
            new.submit(small_snapshot(24), 24)
            assert new.flush(timeout=30)
        return found

    leaving._read_latest = read_then_lose_the_race  # type: ignore[method-assign]
    leaving.submit(small_snapshot(20), 20)
    assert leaving.flush(timeout=30)
    assert raced, "the race was not run"
    client = minio_server.client()
    assert latest_in_bucket(client, config).step == 24
    assert steps_in_bucket(client, config) == ({20, 24}, set())


def test_a_read_that_retention_prunes_under_it_reads_the_newer_checkpoint(
    make_writer: Callable[..., CheckpointWriter], config: CheckpointConfig, env: dict[str, str]
) -> None:
    """A live writer moves `latest` on and deletes the folders a reader is in the middle of
    reading: the reader takes the new checkpoint, not a corruption error."""
    writer = make_writer()
    for step in (1, 2):
        writer.submit(small_snapshot(step), step)
        assert writer.flush(timeout=30)
    racing = reader(config, env)
    load = racing.load
    raced: list[int] = []

    def load_while_the_writer_goes_on(step: int, **options: Any) -> LoadedCheckpoint:
        if not raced:
            raced.append(step)
            for newer in (3, 4):  # keep_last=2: steps 1 and 2 are deleted
                writer.submit(small_snapshot(newer), newer)
                assert writer.flush(timeout=30)
        return load(step, **options)

    racing.load = load_while_the_writer_goes_on  # type: ignore[method-assign]
    loaded = racing.load_latest()
    assert raced == [2], "the race was not run"
    assert loaded is not None
    assert (loaded.step, loaded.skipped) == (4, ())
    assert torch.all(small_weight(loaded) == 4.0)


def test_a_read_that_a_writer_keeps_outrunning_is_a_storage_error_not_corruption(
    make_writer: Callable[..., CheckpointWriter], config: CheckpointConfig, env: dict[str, str]
) -> None:
    """Every checkpoint is pruned before it can be read: the reader gives up with an error
    the restore retries, and does not call the bucket corrupt."""
    writer = make_writer()
    writer.submit(small_snapshot(1), 1)
    assert writer.flush(timeout=30)
    racing = reader(config, env)
    load = racing.load
    newest = [1]

    def load_after_two_newer(step: int, **options: Any) -> LoadedCheckpoint:
        for _ in range(2):  # keep_last=2: the step about to be read is deleted
            newest.append(newest[-1] + 1)
            writer.submit(small_snapshot(newest[-1]), newest[-1])
            assert writer.flush(timeout=30)
        return load(step, **options)

    racing.load = load_after_two_newer  # type: ignore[method-assign]
    with pytest.raises(CheckpointStorageError, match="kept changing") as raised:
        racing.load_latest()
    assert not isinstance(raised.value, CheckpointCorruptError)


def test_retention_leaves_a_folder_another_writer_is_still_uploading(
    make_writer: Callable[..., CheckpointWriter],
    config: CheckpointConfig,
    minio_server: MinioServer,
) -> None:
    writer = make_writer(config.model_copy(update={"keep_last": 1}))
    client = minio_server.client()
    # A leaving writer's upload of step 3, in progress: an object, no manifest yet.
    part = writer.store.layout.object_key(3, "state.bin")
    client.put_object(config.bucket, part, io.BytesIO(b"uploading"), length=9)
    for step in (4, 5):
        writer.submit(small_snapshot(step), step)
        assert writer.flush(timeout=30)
    assert steps_in_bucket(client, config) == ({5}, {3})


def test_secrets_never_reach_logs_or_errors(
    make_writer: Callable[..., CheckpointWriter],
    config: CheckpointConfig,
    minio_server: MinioServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # everything: ours, minio's, urllib3's
    wrong_secret = "wrong-" + secrets.token_urlsafe(16)
    bad_env = {AK_ENV: minio_server.access_key, SK_ENV: wrong_secret}
    writer = make_writer(env=bad_env)
    writer.submit(small_snapshot(1), 1)
    wait_until(lambda: writer.status().last_error is not None, "an auth failure", timeout=30)
    error = writer.status().last_error
    assert error is not None and "SignatureDoesNotMatch" in error
    assert "check the credentials" in error

    with pytest.raises(CheckpointStorageError) as info:
        reader(config, bad_env).load_latest()
    texts = [caplog.text, error, str(info.value), repr(info.value)]
    for secret in (wrong_secret, minio_server.secret_key):
        for text in texts:
            assert secret not in text
    assert "WARNING" in caplog.text  # the failure was logged, just without the secret

    with pytest.raises(CredentialsError, match=SK_ENV):
        CheckpointWriter(config, JOB, env={AK_ENV: "x"})


# -- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_minio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, str, str]]:
    """A second MinIO serving HTTPS with a throwaway CA: (endpoint, CA file, user, password)."""
    workdir = tmp_path_factory.mktemp("minio-tls")
    pki = Pki(workdir / "pki")
    pki.generate()
    certs = workdir / "certs"
    certs.mkdir()
    shutil.copy(pki.serving_cert, certs / "public.crt")
    shutil.copy(pki.serving_key, certs / "private.key")
    user, password = "tls-user", secrets.token_urlsafe(16)
    port = free_port()
    process = ManagedProcess(
        "minio-tls",
        [
            str(tools.find("minio")),
            "server",
            str(workdir / "data"),
            f"--address=127.0.0.1:{port}",
            f"--console-address=127.0.0.1:{free_port()}",
            f"--certs-dir={certs}",
            "--quiet",
        ],
        workdir / "minio.log",
        env={"MINIO_ROOT_USER": user, "MINIO_ROOT_PASSWORD": password, "MINIO_BROWSER": "off"},
    )
    try:
        endpoint = f"127.0.0.1:{port}"

        def ready() -> bool:
            import ssl
            import urllib.request

            context = ssl.create_default_context(cafile=str(pki.ca_cert))
            url = f"https://{endpoint}/minio/health/ready"
            with urllib.request.urlopen(url, context=context, timeout=2) as response:
                return bool(response.status == 200)

        wait_until(ready, "MinIO over TLS", process=process)
        yield endpoint, pki.ca_cert, user, password
    finally:
        process.stop()


def test_tls_with_a_private_ca(tls_minio: tuple[str, Path, str, str]) -> None:
    endpoint, ca_file, user, password = tls_minio
    tls_env = {AK_ENV: user, SK_ENV: password}
    config = CheckpointConfig.model_validate(
        {
            "endpoint": endpoint,
            "bucket": "tls-bucket",
            "secure": True,
            "ca_bundle_path": str(ca_file),
            "access_key_env": AK_ENV,
            "secret_key_env": SK_ENV,
        }
    )
    store = CheckpointStore(config, JOB, env=tls_env)
    if not store.client.bucket_exists("tls-bucket"):
        store.client.make_bucket("tls-bucket")
    with CheckpointWriter(config, JOB, store=store) as writer:
        writer.submit(small_snapshot(5), 5)
        assert writer.flush(timeout=30)
    loaded = CheckpointReader(config, JOB, env=tls_env).load_latest()
    assert loaded is not None and loaded.step == 5

    # Without the private CA the server's certificate is rejected, and the error says so.
    untrusted = config.model_copy(update={"ca_bundle_path": None})
    with pytest.raises(CheckpointStorageError, match=r"SSL|certificate"):
        CheckpointReader(untrusted, JOB, env=tls_env).load_latest()


def test_a_newcomer_reads_the_state_from_a_peer_and_a_checkpoint_of_that_step_at_once(
    make_writer: Callable[..., CheckpointWriter],
    config: CheckpointConfig,
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Same format in S3 as on the wire: the checkpoint's chunks mix with a live peer's."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    model, optimizer = make_model(0)
    train(model, optimizer, 2, torch.Generator().manual_seed(1))
    agreed = param_hash(model)
    writer = make_writer()
    writer.submit(snapshot_state(model, optimizer, 5, 80, 0, param_hash=agreed), 5)
    assert writer.flush(timeout=60)
    token = credentials.peer_token("job-key", "peer-a")
    server = StateServer("127.0.0.1", 0, token, lambda: take_snapshot(model, optimizer, 5, agreed))
    server.start()
    peer = StateSource(
        peer_id="peer-a",
        state_url=f"http://127.0.0.1:{server.port}",
        ticket=credentials.state_ticket(token, int(time.time()) + 60),
    )
    checkpoints = PeerCheckpoints(config, JOB, "newcomer")
    newcomer, newcomer_optimizer = make_model(7)
    layout = StateLayout.of(newcomer, newcomer_optimizer)
    try:
        assert checkpoints.source_for(6, agreed) is None  # not as fresh as the step
        assert checkpoints.source_for(5, "0" * 16) is None  # not the agreed state
        source = checkpoints.source_for(5, agreed)
        assert source is not None
        received, served_by = fetch_state([peer], 5, agreed, layout, checkpoint=source)
        assert sorted(served_by) == ["checkpoint of step 5", "peer-a"]
        apply_snapshot(received, newcomer, newcomer_optimizer)
        assert param_hash(newcomer) == agreed
    finally:
        server.stop()
    # With the peer gone, the checkpoint alone serves it.
    received, served_by = fetch_state([peer], 5, agreed, layout, checkpoint=source)
    assert served_by == ["checkpoint of step 5"]
    assert hash_tensors(model_tensors(received)) == agreed
