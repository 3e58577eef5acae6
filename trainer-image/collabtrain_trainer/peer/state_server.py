"""Each peer serves its state to newcomers over HTTP; newcomers fetch it in chunks, from
every source that serves the agreed step at once, and verify it.

- `GET /state` -> the manifest (JSON, `state_snapshot.StateManifest`): step, claimed
  parameter hash, the tensors' layout and one BLAKE3 digest per chunk.
- `GET /state/chunks/<snapshot id>/<index>` -> that chunk's raw bytes. A source keeps the
  last two snapshots it described, so a transfer that straddles a step still completes;
  an older one answers 410.

Both need `Authorization: Bearer <ticket>`, a state ticket the coordinator minted for this
source (see `credentials.state_ticket`). `/metrics` and `/healthz` are open.

A checkpoint in S3 holds the same stream (`state.bin`, its manifest inside the checkpoint's):
when it holds the very step a newcomer syncs to, it is one more source (`CheckpointSource`).

The newcomer checks each manifest against its own model before reading any chunk (layout,
size and tensor-count bounds), reads each chunk straight into its own tensors, checks the
chunk's digest, gives a failing source's chunks to the others (a broken transfer goes on
where it was), and checks the parameter hash against the one the coordinator agreed on,
never the one a source claims.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import queue
import re
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from pydantic import ValidationError

from collabtrain_trainer import credentials
from collabtrain_trainer.checkpoint import CheckpointReader, CheckpointStorageError
from collabtrain_trainer.checkpoint.layout import StateObject
from collabtrain_trainer.observability import CONTENT_TYPE_LATEST, metrics_text
from collabtrain_trainer.protocol import TOKEN_HEADER, StateSource
from collabtrain_trainer.state_snapshot import (
    StateLayout,
    StateManifest,
    StateMismatch,
    StateSnapshot,
    empty_like,
    hash_tensors,
    model_tensors,
)

log = logging.getLogger("collabtrain.peer")

_CHUNK_PATH = re.compile(r"^/state/chunks/([0-9a-f]{32})/(\d{1,9})$")
_KEPT_SNAPSHOTS = 2
STREAMS = 4  # chunks in flight per newcomer


class StateTransferError(Exception):
    """The state could not be fetched or did not verify."""


class StateServer:
    def __init__(
        self, host: str, port: int, token: str, snapshot: Callable[[], StateSnapshot]
    ) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass  # one line per request would drown the structured log

            def do_GET(self) -> None:
                if self.path == "/healthz":
                    self.send_body(200, b"ok", "text/plain")
                elif self.path == "/metrics":
                    self.send_body(200, metrics_text(), CONTENT_TYPE_LATEST)
                elif self.path == "/state" or self.path.startswith("/state/"):
                    if server._authorized(self):
                        server._serve_state(self)
                else:
                    self.send_body(404, b"not found", "text/plain")

            def send_body(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._token = token
        self._snapshot = snapshot
        # Snapshots a newcomer may still read chunks of, and when one was last asked for.
        self._served: OrderedDict[str, StateSnapshot] = OrderedDict()
        self._used: dict[str, float] = {}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="state-server", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits forever for a loop never started
            self._httpd.shutdown()
        self._httpd.server_close()

    def forget_idle(self, idle_s: float) -> list[str]:
        """Drop the snapshots nobody asked for within `idle_s` (a copy of the whole state
        each, held for newcomers mid-transfer); returns their ids."""
        cutoff = time.monotonic() - idle_s
        with self._lock:
            idle = [key for key, used in self._used.items() if used < cutoff]
            for key in idle:
                self._served.pop(key, None)
                del self._used[key]
        return idle

    def _authorized(self, handler: BaseHTTPRequestHandler) -> bool:
        header = handler.headers.get(TOKEN_HEADER, "")
        ticket = header.removeprefix("Bearer ")
        if header.startswith("Bearer ") and credentials.ticket_valid(
            self._token, ticket, time.time()
        ):
            return True
        log.warning(
            "refused a state request from %s: missing, wrong or expired ticket",
            handler.client_address[0],
        )
        handler.send_response(401)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
        return False

    def _serve_state(self, handler: BaseHTTPRequestHandler) -> None:
        send = handler.send_body  # type: ignore[attr-defined]
        if handler.path == "/state":
            snapshot = self._snapshot()
            snapshot_id = snapshot.manifest.snapshot_id
            with self._lock:
                self._served[snapshot_id] = snapshot
                self._served.move_to_end(snapshot_id)
                self._used[snapshot_id] = time.monotonic()
                while len(self._served) > _KEPT_SNAPSHOTS:
                    self._used.pop(self._served.popitem(last=False)[0], None)
            send(200, snapshot.manifest.model_dump_json().encode(), "application/json")
            return
        match = _CHUNK_PATH.match(handler.path)
        if match is None:
            send(404, b"not found", "text/plain")
            return
        with self._lock:
            served = self._served.get(match[1])
            if served is not None:
                self._used[match[1]] = time.monotonic()
        index = int(match[2])
        if served is None:
            send(410, b"this source has moved on from that snapshot", "text/plain")
        elif index >= served.manifest.chunks:
            send(404, b"no such chunk", "text/plain")
        else:
            self._serve_chunk(handler, served, index)

    def _serve_chunk(
        self, handler: BaseHTTPRequestHandler, snapshot: StateSnapshot, index: int
    ) -> None:
        start, end = snapshot.manifest.chunk_range(index)
        handler.send_response(200)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(end - start))
        handler.end_headers()
        try:
            for piece in snapshot.pieces(index):
                handler.wfile.write(piece)
        except (BrokenPipeError, ConnectionResetError):
            handler.close_connection = True  # the reader gave up on this chunk


class _Source:
    """Somewhere the chunks of a state can be read from: a live peer, or a checkpoint."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.failure: str | None = None
        self.chunks = 0  # chunks it served in this transfer

    def manifest(self, layout: StateLayout, timeout_s: float, give_up_at: float) -> StateManifest:
        raise NotImplementedError

    def read_chunk(
        self,
        manifest: StateManifest,
        index: int,
        into: list[memoryview],
        timeout_s: float,
        give_up_at: float,
    ) -> None:
        """Fill `into` with chunk `index`'s bytes (digest checked by the caller)."""
        raise NotImplementedError


class _PeerSource(_Source):
    def __init__(self, source: StateSource) -> None:
        super().__init__(source.peer_id)
        self.ticket = source.ticket
        try:
            url = urlsplit(source.state_url)
            if url.scheme == "http" and url.hostname:
                self.host, self.port = url.hostname, url.port or 80
                return
        except ValueError:
            pass  # a port that is not a number
        raise StateTransferError(f"state URL {source.state_url!r} is not http://host:port")

    def manifest(self, layout: StateLayout, timeout_s: float, give_up_at: float) -> StateManifest:
        # The manifest's size grows with the tensor count, which the layout bounds.
        limit = (1 << 20) + 4096 * layout.max_tensors
        buffer = memoryview(bytearray(limit))
        received = _request(self, "/state", [buffer], timeout_s, give_up_at, exact=False)
        try:
            manifest = StateManifest.model_validate_json(bytes(buffer[:received]))
            layout.check(manifest)
        except (ValidationError, StateMismatch) as error:
            raise StateTransferError(
                f"its manifest does not fit this model: {error}"[:800]
            ) from error
        return manifest

    def read_chunk(
        self,
        manifest: StateManifest,
        index: int,
        into: list[memoryview],
        timeout_s: float,
        give_up_at: float,
    ) -> None:
        path = f"/state/chunks/{manifest.snapshot_id}/{index}"
        _request(self, path, into, timeout_s, give_up_at, exact=True)


class CheckpointSource(_Source):
    """The state stream of a checkpoint in S3, read by ranged GETs: a source like any peer
    when the checkpoint holds the very step a newcomer syncs to."""

    def __init__(self, reader: CheckpointReader, step: int, state: StateObject) -> None:
        super().__init__(f"checkpoint of step {step}")
        self.reader = reader
        self.step = step
        self.state = state

    def manifest(self, layout: StateLayout, timeout_s: float, give_up_at: float) -> StateManifest:
        try:
            layout.check(self.state.manifest)
        except StateMismatch as error:
            raise StateTransferError(f"it does not fit this model: {error}"[:800]) from error
        return self.state.manifest

    def read_chunk(
        self,
        manifest: StateManifest,
        index: int,
        into: list[memoryview],
        timeout_s: float,
        give_up_at: float,
    ) -> None:
        try:
            self.reader.read_state_chunk(self.step, self.state, index, into)
        except CheckpointStorageError as error:  # corrupt or unreachable
            raise StateTransferError(str(error)) from None


@dataclass
class _Transfer:
    """One fetch: the chunks still to read, and the sources still usable."""

    manifest: StateManifest
    target: StateSnapshot
    sources: list[_Source]
    give_up_at: float
    timeout_s: float
    todo: queue.SimpleQueue[int] = field(default_factory=queue.SimpleQueue)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def live(self) -> list[_Source]:
        with self.lock:
            return [s for s in self.sources if s.failure is None]

    def fail(self, source: _Source, reason: str) -> None:
        with self.lock:
            if source.failure is not None:
                return
            source.failure = reason
        log.warning("state from %s unusable: %s", source.name, reason)


def fetch_state(
    sources: Iterable[StateSource],
    step: int,
    agreed_hash: str,
    layout: StateLayout,
    *,
    checkpoint: CheckpointSource | None = None,
    streams: int = STREAMS,
    timeout_s: float = 30.0,
    deadline_s: float = 120.0,
) -> tuple[StateSnapshot, list[str]]:
    """Fetch `step`'s state from the sources that serve it with `agreed_hash` (several at
    once, a share of the chunks each; a `checkpoint` of that step counts as one more),
    verified; return it and the sources it came from. A source that has not sent its
    chunks within `deadline_s` is given up (`timeout_s` bounds each read only: a source
    trickling a byte per read would otherwise hold the newcomer forever)."""
    started = time.monotonic()
    give_up_at = started + deadline_s

    def manifest_of(source: StateSource | _Source) -> tuple[_Source, StateManifest] | str:
        name = source.peer_id if isinstance(source, StateSource) else source.name
        try:
            candidate = _PeerSource(source) if isinstance(source, StateSource) else source
            manifest = candidate.manifest(layout, timeout_s, give_up_at)
            if manifest.step != step or manifest.param_hash != agreed_hash:
                raise StateTransferError(
                    f"it serves step {manifest.step} with hash {manifest.param_hash}, "
                    f"not step {step} with {agreed_hash}"
                )
            return candidate, manifest
        except StateTransferError as error:
            log.warning("state from %s unusable: %s", name, error)
            return f"{name}: {error}"

    # At once: each source copies and digests its state before it answers.
    listed: list[StateSource | _Source] = [*sources, *([checkpoint] if checkpoint else [])]
    with ThreadPoolExecutor(max(1, len(listed)), thread_name_prefix="state-manifest") as pool:
        answers = list(pool.map(manifest_of, listed))
    usable = [answer for answer in answers if not isinstance(answer, str)]
    problems = [answer for answer in answers if isinstance(answer, str)]
    if not usable:
        raise StateTransferError("no source serves the agreed state: " + "; ".join(problems))
    reference = usable[0][1]
    same = [s for s, m in usable if _same_bytes(m, reference)]
    for other, _ in usable:
        if other not in same:
            log.warning("state from %s unusable: it serves other bytes", other.name)
    manifests_at = time.monotonic()
    transfer = _Transfer(reference, empty_like(reference), same, give_up_at, timeout_s)
    for index in range(reference.chunks):
        transfer.todo.put(index)
    workers = [
        threading.Thread(target=_work, args=(transfer, n), name=f"state-fetch-{n}", daemon=True)
        for n in range(min(streams * len(same), reference.chunks))
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if not transfer.todo.empty():
        reasons = "; ".join(f"{s.name}: {s.failure}" for s in same if s.failure)
        raise StateTransferError(f"the state did not arrive whole: {reasons}")
    served_by = [s.name for s in same if s.failure is None and s.chunks]
    chunks_at = time.monotonic()
    loaded = hash_tensors(model_tensors(transfer.target))
    if loaded != agreed_hash:
        raise StateTransferError(
            f"state from {', '.join(served_by)} has parameter hash {loaded}, expected {agreed_hash}"
        )
    log.info(
        "state of step %d fetched: manifests %.3fs, %d chunks %.3fs, parameter hash %.3fs",
        step,
        manifests_at - started,
        reference.chunks,
        chunks_at - manifests_at,
        time.monotonic() - chunks_at,
    )
    return transfer.target, served_by


def _same_bytes(a: StateManifest, b: StateManifest) -> bool:
    return a.model_dump(exclude={"step_certificate"}) == b.model_dump(exclude={"step_certificate"})


def _work(transfer: _Transfer, worker: int) -> None:
    """Read chunks until none are left or no source is; a failing source's chunk goes back
    for another source."""
    while True:
        try:
            index = transfer.todo.get_nowait()
        except queue.Empty:
            return
        live = transfer.live()
        if not live:
            transfer.todo.put(index)
            return
        source = live[worker % len(live)]
        try:
            _fetch_chunk(transfer, source, index)
        except StateTransferError as error:
            transfer.fail(source, str(error))
            transfer.todo.put(index)
        else:
            with transfer.lock:
                source.chunks += 1


def _fetch_chunk(transfer: _Transfer, source: _Source, index: int) -> None:
    pieces = list(transfer.target.pieces(index))
    source.read_chunk(transfer.manifest, index, pieces, transfer.timeout_s, transfer.give_up_at)
    if transfer.target.chunk_digest(index) != transfer.manifest.chunk_digests[index]:
        raise StateTransferError(f"chunk {index} is corrupt (BLAKE3 mismatch)")


def _request(
    source: _PeerSource,
    path: str,
    into: list[memoryview],
    timeout_s: float,
    give_up_at: float,
    *,
    exact: bool,
) -> int:
    """GET `path` from `source` into the buffers `into`; return the bytes received. With
    `exact`, the body must fill them exactly; otherwise it must fit."""
    room = sum(len(view) for view in into)
    connection = http.client.HTTPConnection(source.host, source.port, timeout=timeout_s)
    watchdog: threading.Timer | None = None
    received = 0
    try:
        connection.connect()
        # The deadline holds for the whole body: cut the connection when it passes. (The
        # response takes the socket over, so it is held here.)
        watchdog = threading.Timer(
            max(0.0, give_up_at - time.monotonic()), _cut, (connection.sock,)
        )
        watchdog.daemon = True
        watchdog.start()
        connection.request("GET", path, headers={TOKEN_HEADER: f"Bearer {source.ticket}"})
        response = connection.getresponse()
        if response.status != 200:
            raise StateTransferError(f"{path} answered HTTP {response.status}")
        length = int(response.getheader("Content-Length") or -1)
        if length < 0 or length > room or (exact and length != room):
            raise StateTransferError(
                f"{path} is {length} bytes, more than the {room} this model's state can take"
                if length > room
                else f"{path} is {length} bytes, expected {room}"
            )
        for view in into:
            want = min(len(view), length - received)
            if want <= 0:
                break
            got = response.readinto(view[:want])
            received += got
            if got < want:
                break
        if received < length:
            if time.monotonic() >= give_up_at:
                raise StateTransferError(
                    f"{path} not received within the deadline ({received} of {length} bytes); "
                    "giving up on this source"
                )
            raise StateTransferError(f"{path} broke off after {received} of {length} bytes")
        return received
    except (OSError, http.client.HTTPException, ValueError) as error:
        if time.monotonic() >= give_up_at:
            raise StateTransferError(
                f"{path} not received within the deadline ({received} bytes so far); "
                "giving up on this source"
            ) from error
        raise StateTransferError(f"{path} failed: {type(error).__name__}: {error}") from error
    finally:
        if watchdog is not None:
            watchdog.cancel()
        connection.close()


def _cut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed
        sock.shutdown(socket.SHUT_RDWR)
