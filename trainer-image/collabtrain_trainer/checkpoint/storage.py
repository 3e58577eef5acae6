"""The S3 side of checkpoints: a `minio` client built from the config, credentials from the
environment, hashed uploads and downloads, listing and deletion of step folders, and error
messages that never carry credentials.

AWS S3, MinIO and any S3-compatible endpoint work: the client speaks plain S3 (SigV4,
multipart uploads, ListObjectsV2, DeleteObjects).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

import certifi
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError
from urllib3.exceptions import HTTPError as Urllib3HTTPError

from collabtrain_trainer.checkpoint.layout import (
    MANIFEST_NAME,
    CheckpointLayout,
)
from collabtrain_trainer.config import CheckpointConfig

MIB = 1024 * 1024
# S3 rejects multipart parts under 5 MiB (except the last one).
MIN_PART_SIZE = 5 * MIB
DEFAULT_PART_SIZE = 16 * MIB
_READ_CHUNK = 1 * MIB
MISSING_CODES = frozenset({"NoSuchKey", "NoSuchObject", "NotFound"})

# Signed query strings and headers that could leak through an error's URL or text.
_SIGNATURE_PATTERNS = (
    re.compile(r"(X-Amz-(?:Credential|Signature|Security-Token)=)[^&\s]+", re.IGNORECASE),
    re.compile(r"(Credential=)[^,\s]+"),
    re.compile(r"(Signature=)[0-9a-fA-F]+"),
)


class CheckpointStorageError(RuntimeError):
    """Talking to the checkpoint store failed; the message holds no credentials."""


class CredentialsError(CheckpointStorageError):
    """The environment variables that should hold the store's credentials are missing."""


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str = field(repr=False)

    def __repr__(self) -> str:
        return "Credentials(access_key=***, secret_key=***)"


def credentials_from_env(
    config: CheckpointConfig, env: Mapping[str, str] | None = None
) -> Credentials:
    """Read the access and secret key from the variables the config names (filled from the
    job's Secret on Kubernetes)."""
    source = os.environ if env is None else env
    access_key = source.get(config.access_key_env, "")
    secret_key = source.get(config.secret_key_env, "")
    missing = [
        name
        for name, value in (
            (config.access_key_env, access_key),
            (config.secret_key_env, secret_key),
        )
        if not value
    ]
    if missing:
        raise CredentialsError(
            f"checkpoint storage credentials missing: set the environment variable(s) "
            f"{', '.join(missing)} (named by checkpoint.access_key_env / secret_key_env; on "
            "Kubernetes they come from the job's credentials Secret)"
        )
    return Credentials(access_key=access_key, secret_key=secret_key)


def redact(text: str, secrets: tuple[str, ...]) -> str:
    """`text` with every secret and every signature-like fragment replaced by ***."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    for pattern in _SIGNATURE_PATTERNS:
        text = pattern.sub(r"\1***", text)
    return text


def make_http_client(
    config: CheckpointConfig, *, connect_timeout_s: float = 10.0, read_timeout_s: float = 120.0
) -> urllib3.PoolManager:
    """The connection pool the `minio` client uses: TLS verified against the config's CA
    bundle (else SSL_CERT_FILE, else certifi), bounded timeouts, and only a couple of
    quick retries: the writer retries whole objects with its own backoff, so long retry
    chains here would only hide an outage from `status()`."""
    ca_certs = config.ca_bundle_path or os.environ.get("SSL_CERT_FILE") or certifi.where()
    if config.ca_bundle_path and not os.path.isfile(config.ca_bundle_path):
        raise CheckpointStorageError(
            f"checkpoint.ca_bundle_path {config.ca_bundle_path!r} is not a readable file: "
            "mount the CA bundle there or clear the field to use the system CAs"
        )
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=ca_certs,
        retries=urllib3.Retry(total=2, backoff_factor=0.1, status_forcelist=[500, 502, 503, 504]),
    )


def make_client(
    config: CheckpointConfig,
    credentials: Credentials,
    *,
    connect_timeout_s: float = 10.0,
    read_timeout_s: float = 120.0,
) -> Minio:
    """The `minio` client of the job's storage (checkpoints, and data shards)."""
    return Minio(
        config.endpoint,
        access_key=credentials.access_key,
        secret_key=credentials.secret_key,
        secure=config.secure,
        http_client=make_http_client(
            config, connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s
        ),
    )


def describe_error(exc: BaseException, what: str) -> str:
    """One line saying which operation failed and why (not yet redacted)."""
    if isinstance(exc, S3Error):
        reason = f"S3 error {exc.code}: {exc.message}"
        if exc.code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"}:
            reason += " (check the credentials in the job's Secret and the bucket policy)"
        elif exc.code == "NoSuchBucket":
            reason += " (create the bucket or fix checkpoint.bucket)"
    elif isinstance(exc, ServerError):
        reason = f"server error HTTP {exc.status_code}"
    elif isinstance(exc, InvalidResponseError):
        reason = "the endpoint did not answer like an S3 server (check checkpoint.endpoint)"
    elif isinstance(exc, Urllib3HTTPError):
        reason = f"cannot reach the endpoint: {type(exc).__name__}: {exc}"
    else:
        reason = f"{type(exc).__name__}: {exc}"
    return f"{what}: {reason}"


class _HashingReader:
    """A read()-able view of a buffer that hashes what the uploader reads, so hashing
    overlaps with the parallel part uploads instead of adding a pass over the bytes."""

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self._position = 0
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else min(len(self._data), self._position + size)
        chunk = self._data[self._position : end]
        self.sha256.update(chunk)
        self._position = end
        return bytes(chunk)

    @property
    def position(self) -> int:
        return self._position


class _ViewsReader:
    """A read()-able stream over several buffers laid end to end (a state's tensors), so
    the uploader reads parts straight from them: one copy into each part, no whole-state
    buffer."""

    def __init__(self, views: list[memoryview]) -> None:
        self._views = [view for view in views if len(view)]
        self._index = 0
        self._offset = 0
        self.position = 0

    def read(self, size: int = -1) -> bytes:
        pieces = []
        wanted = size if size >= 0 else sum(len(v) for v in self._views)
        while wanted > 0 and self._index < len(self._views):
            view = self._views[self._index]
            piece = view[self._offset : self._offset + wanted]
            pieces.append(piece)
            wanted -= len(piece)
            self._offset += len(piece)
            if self._offset == len(view):
                self._index, self._offset = self._index + 1, 0
        data = b"".join(pieces)
        self.position += len(data)
        return data


@dataclass(frozen=True)
class StepListing:
    complete: frozenset[int]  # step folders holding a manifest
    incomplete: frozenset[int]  # step folders without one
    # When each step folder last had an object written (the newest object's time).
    written_at: Mapping[int, datetime] = field(default_factory=dict)


class CheckpointStore:
    """One job's checkpoint folder in one bucket, through a `minio` client."""

    def __init__(
        self,
        config: CheckpointConfig,
        job: str,
        *,
        client: Minio | None = None,
        env: Mapping[str, str] | None = None,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 120.0,
    ) -> None:
        self.config = config
        self.layout = CheckpointLayout(bucket=config.bucket, prefix=config.prefix, job=job)
        credentials = credentials_from_env(config, env)
        self._secrets = (credentials.secret_key, credentials.access_key)
        self.client = client or make_client(
            config, credentials, connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s
        )

    @property
    def bucket(self) -> str:
        return self.config.bucket

    def redact(self, text: str) -> str:
        return redact(text, self._secrets)

    def error(self, exc: BaseException, what: str) -> CheckpointStorageError:
        """A storage error for `exc` whose message is safe to log and to show in status."""
        where = f"{what} (endpoint {self.config.endpoint}, bucket {self.bucket})"
        return CheckpointStorageError(self.redact(describe_error(exc, where)))

    def put(self, key: str, data: memoryview, *, part_size: int) -> tuple[int, str]:
        """Upload `data` to `key` (multipart above `part_size`); returns size and sha256."""
        reader = _HashingReader(data)
        self.client.put_object(
            self.bucket,
            key,
            reader,  # type: ignore[arg-type]  # duck-typed: minio only calls read()
            length=len(data),
            part_size=max(part_size, MIN_PART_SIZE),
        )
        if reader.position != len(data):
            raise CheckpointStorageError(
                f"upload of {key} read {reader.position} of {len(data)} bytes"
            )
        return len(data), reader.sha256.hexdigest()

    def put_views(self, key: str, views: list[memoryview], *, part_size: int, parallel: int) -> int:
        """Upload the buffers `views`, end to end, to `key`: multipart, `parallel` parts in
        flight. Returns the size. No hash here: the caller's manifest digests the bytes."""
        length = sum(len(view) for view in views)
        reader = _ViewsReader(views)
        self.client.put_object(
            self.bucket,
            key,
            reader,  # type: ignore[arg-type]  # duck-typed: minio only calls read()
            length=length,
            part_size=max(part_size, MIN_PART_SIZE),
            num_parallel_uploads=parallel,
        )
        if reader.position != length:
            raise CheckpointStorageError(
                f"upload of {key} read {reader.position} of {length} bytes"
            )
        return length

    def get_range_into(self, key: str, offset: int, views: list[memoryview]) -> int:
        """Read `key` from `offset` straight into the buffers `views` (one ranged GET);
        returns the bytes received, which fall short only when the object is shorter."""
        length = sum(len(view) for view in views)
        response = self.client.get_object(self.bucket, key, offset=offset, length=length)
        received = 0
        try:
            for view in views:
                while len(view):
                    got = response.readinto(view)
                    if not got:
                        return received
                    received += got
                    view = view[got:]
            return received
        finally:
            response.close()
            response.release_conn()

    def get(self, key: str, *, expected_size: int | None = None) -> tuple[bytes, str]:
        """Download `key`; returns its bytes and sha256. Reading stops one byte past
        `expected_size` so an oversized object cannot exhaust memory."""
        response = self.client.get_object(self.bucket, key)
        try:
            digest = hashlib.sha256()
            buffer = io.BytesIO()
            limit = None if expected_size is None else expected_size + 1
            for chunk in response.stream(_READ_CHUNK):
                digest.update(chunk)
                buffer.write(chunk)
                if limit is not None and buffer.tell() >= limit:
                    break
            return buffer.getvalue(), digest.hexdigest()
        finally:
            response.close()
            response.release_conn()

    def get_for_update(self, key: str, *, expected_size: int) -> tuple[bytes, str] | None:
        """`key`'s bytes and ETag, for a `put_if_unchanged` of it; None when it does not
        exist."""
        try:
            response = self.client.get_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in MISSING_CODES:
                return None
            raise
        try:
            data = response.read(expected_size + 1)
            return data, response.headers.get("ETag", "").strip('"')
        finally:
            response.close()
            response.release_conn()

    def put_if_unchanged(self, key: str, data: bytes, etag: str | None) -> bool:
        """S3's conditional write: replace `key` only if it still has `etag` (or, for
        None, does not exist yet). False when another writer changed it first.
        minio-py's put_object sends no If-Match, so this is its own single PUT; a server
        without conditional writes (501) gets a plain one."""
        headers: dict[str, str | list[str] | tuple[str]] = {"Content-Type": "application/json"}
        headers.update({"If-Match": f'"{etag}"'} if etag else {"If-None-Match": "*"})
        try:
            self.client._put_object(self.bucket, key, data, headers)
        except S3Error as exc:
            if exc.code == "PreconditionFailed":
                return False
            if exc.code != "NotImplemented":
                raise
            self.client._put_object(self.bucket, key, data, {"Content-Type": "application/json"})
        return True

    def get_if_exists(
        self, key: str, *, expected_size: int | None = None
    ) -> tuple[bytes, str] | None:
        """Like `get`, but None when the object does not exist."""
        try:
            return self.get(key, expected_size=expected_size)
        except S3Error as exc:
            if exc.code in MISSING_CODES:
                return None
            raise

    def list_steps(self) -> StepListing:
        """Step folders under the job, split by whether their manifest exists."""
        seen: set[int] = set()
        complete: set[int] = set()
        written_at: dict[int, datetime] = {}
        for item in self.client.list_objects(self.bucket, prefix=self.layout.root, recursive=True):
            name = item.object_name or ""
            step = self.layout.step_of_key(name)
            if step is None:
                continue
            seen.add(step)
            if name == self.layout.object_key(step, MANIFEST_NAME):
                complete.add(step)
            modified = item.last_modified
            if modified is not None and (step not in written_at or modified > written_at[step]):
                written_at[step] = modified
        return StepListing(
            complete=frozenset(complete),
            incomplete=frozenset(seen - complete),
            written_at=written_at,
        )

    def delete_step(self, step: int) -> None:
        """Delete every object in one step folder."""
        prefix = self.layout.step_prefix(step)
        # The manifest goes first so a half-deleted folder reads as incomplete, never as a
        # complete checkpoint with missing objects.
        keys = [
            item.object_name
            for item in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)
            if item.object_name
        ]
        manifest = self.layout.manifest_key(step)
        if manifest in keys:
            self.client.remove_object(self.bucket, manifest)
            keys.remove(manifest)
        if not keys:
            return
        errors = list(self.client.remove_objects(self.bucket, [DeleteObject(k) for k in keys]))
        if errors:
            first = errors[0]
            raise CheckpointStorageError(
                f"could not delete {len(errors)} object(s) under {prefix}, first "
                f"{first.name}: {first.code} {first.message}"
            )
