"""Each peer serves its state to newcomers over HTTP; newcomers stream and verify it.

`GET /state` (`Authorization: Bearer <ticket>`, a state ticket the coordinator minted for
this peer, see `credentials.state_ticket`) answers the serialized model and optimizer with
headers naming the step, the parameter hash and the sha256 of the body. The reader stops
at a size bound, checks the sha256 while streaming, and checks the parameter hash after
loading against the hash the coordinator agreed on, never the one the server claims.
`/metrics` and `/healthz` are open.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests
import urllib3

from collabtrain_trainer import credentials
from collabtrain_trainer.observability import CONTENT_TYPE_LATEST, metrics_text
from collabtrain_trainer.protocol import TOKEN_HEADER, certificate_or_none

log = logging.getLogger("collabtrain.peer")

STEP_HEADER = "X-Collabtrain-Step"
HASH_HEADER = "X-Collabtrain-Param-Hash"
SHA256_HEADER = "X-Content-Sha256"
# The coordinator's certificate of the step (see `credentials`): the newcomer keeps it, so
# that it can show the step to a restarted coordinator. Not checked here: the coordinator
# checks it when it matters.
CERTIFICATE_HEADER = "X-Collabtrain-Step-Certificate"
_CHUNK = 1 << 16


@dataclass(frozen=True)
class StateSnapshot:
    data: bytes
    step: int
    param_hash: str
    sha256: str
    step_certificate: str | None = None


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
                    self._send(200, b"ok", "text/plain")
                elif self.path == "/metrics":
                    self._send(200, metrics_text(), CONTENT_TYPE_LATEST)
                elif self.path == "/state":
                    server._serve_state(self)
                else:
                    self._send(404, b"not found", "text/plain")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._token = token
        self._snapshot = snapshot
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

    def _serve_state(self, handler: BaseHTTPRequestHandler) -> None:
        header = handler.headers.get(TOKEN_HEADER, "")
        ticket = header.removeprefix("Bearer ")
        if not header.startswith("Bearer ") or not credentials.ticket_valid(
            self._token, ticket, time.time()
        ):
            log.warning(
                "refused a state request from %s: missing, wrong or expired ticket",
                handler.client_address[0],
            )
            handler.send_response(401)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        snapshot = self._snapshot()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(len(snapshot.data)))
        handler.send_header(STEP_HEADER, str(snapshot.step))
        handler.send_header(HASH_HEADER, snapshot.param_hash)
        handler.send_header(SHA256_HEADER, snapshot.sha256)
        if snapshot.step_certificate:
            handler.send_header(CERTIFICATE_HEADER, snapshot.step_certificate)
        handler.end_headers()
        view = memoryview(snapshot.data)
        for start in range(0, len(view), _CHUNK):
            handler.wfile.write(view[start : start + _CHUNK])


def make_snapshot(
    data: bytes, step: int, param_hash: str, step_certificate: str | None = None
) -> StateSnapshot:
    return StateSnapshot(
        data=data,
        step=step,
        param_hash=param_hash,
        sha256=hashlib.sha256(data).hexdigest(),
        step_certificate=step_certificate,
    )


def fetch_state(
    state_url: str,
    ticket: str,
    max_bytes: int,
    timeout_s: float = 30.0,
    deadline_s: float = 120.0,
) -> StateSnapshot:
    """Stream a peer's state, checking the body's sha256 as it arrives; refuse a body
    larger than `max_bytes` before reading past it, and give up on a source that has not
    sent it all within `deadline_s` (`timeout_s` bounds each read only: a source
    trickling a byte per read would otherwise hold the newcomer forever)."""
    give_up_at = time.monotonic() + deadline_s
    try:
        with requests.get(
            state_url.rstrip("/") + "/state",
            headers={TOKEN_HEADER: f"Bearer {ticket}"},
            stream=True,
            # No single read outlasts the deadline either.
            timeout=(timeout_s, min(timeout_s, deadline_s)),
            allow_redirects=False,  # the ticket goes to the source and nowhere else
        ) as response:
            if response.status_code != 200:
                raise StateTransferError(f"{state_url} answered HTTP {response.status_code}")
            expected_sha = response.headers[SHA256_HEADER]
            step = int(response.headers[STEP_HEADER])
            claimed_hash = response.headers[HASH_HEADER]
            certificate = response.headers.get(CERTIFICATE_HEADER)
            if int(response.headers.get("Content-Length", 0)) > max_bytes:
                raise StateTransferError(
                    f"state from {state_url} is {response.headers['Content-Length']} bytes, "
                    f"more than the {max_bytes} this model's state can take"
                )
            digest = hashlib.sha256()
            chunks = []
            received = 0
            for chunk in _chunks(response):
                if time.monotonic() > give_up_at:
                    raise StateTransferError(
                        f"state from {state_url} not received within {deadline_s:g}s "
                        f"({received} bytes so far); giving up on this source"
                    )
                received += len(chunk)
                if received > max_bytes:
                    raise StateTransferError(
                        f"state from {state_url} exceeds {max_bytes} bytes; stopped reading"
                    )
                digest.update(chunk)
                chunks.append(chunk)
    except (requests.RequestException, urllib3.exceptions.HTTPError, KeyError, ValueError) as error:
        raise StateTransferError(f"fetching state from {state_url} failed: {error}") from error
    if digest.hexdigest() != expected_sha:
        raise StateTransferError(f"state from {state_url} is corrupt: sha256 mismatch")
    data = b"".join(chunks)
    return StateSnapshot(
        data=data,
        step=step,
        param_hash=claimed_hash,
        sha256=expected_sha,
        step_certificate=certificate_or_none(certificate),
    )


def _chunks(response: requests.Response) -> Iterator[bytes]:
    """The body as it arrives: each chunk is what one read of the socket returned (at most
    `_CHUNK` bytes), so the caller sees time pass even when the source sends a byte at a
    time. (`iter_content` waits for a whole chunk before it yields.)"""
    raw = response.raw
    read1 = getattr(raw, "read1", None)
    if read1 is None:  # urllib3 before 2.1: whole chunks
        yield from response.iter_content(_CHUNK)
        return
    while chunk := read1(_CHUNK):
        yield chunk
