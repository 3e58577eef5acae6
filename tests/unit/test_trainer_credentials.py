"""What a peer takes from the wire: credentials that are not ASCII, a state source that
trickles, a state that carries another optimizer's hyperparameters."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
import torch
from torch import nn

from collabtrain_trainer import credentials
from collabtrain_trainer.coordinator.server import identify
from collabtrain_trainer.peer.model_state import load_state, serialize_state
from collabtrain_trainer.peer.state_server import (
    StateServer,
    StateTransferError,
    fetch_state,
    make_snapshot,
)

JOB_KEY = "unit-job-key"


# --- credentials ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    ["admin.é", "peer:a.é", "é.abc", "peer:é.abc", "admin.\ud800", "\ud800.abc", "admin.²"],
)
def test_a_token_that_is_not_ascii_proves_nothing(token: str) -> None:
    assert credentials.identify(JOB_KEY, token) is None
    assert identify(f"Bearer {token}", JOB_KEY) is None


def test_a_certificate_that_is_not_ascii_certifies_nothing() -> None:
    for certificate in ("é", "\ud800", credentials.step_certificate(JOB_KEY, 3) + "é"):
        assert not credentials.step_certified(JOB_KEY, 3, certificate)
    assert credentials.step_certified(JOB_KEY, 3, credentials.step_certificate(JOB_KEY, 3))


def test_a_certificate_carries_the_progress_it_was_signed_with() -> None:
    progress = {"samples": 640, "bytes": 10, "bytes_fp32": 80, "initial_loss": 2.3, "loss": 1.1}
    certificate = credentials.step_certificate(JOB_KEY, 9, progress)
    assert credentials.certified_progress(JOB_KEY, 9, certificate) == progress
    assert credentials.certified_progress(JOB_KEY, 8, certificate) is None  # another step
    assert credentials.certified_progress("another-job", 9, certificate) is None
    payload, _, mac = certificate.rpartition(".")
    assert credentials.certified_progress(JOB_KEY, 9, payload[:-4] + "AAA=." + mac) is None
    assert credentials.certified_progress(JOB_KEY, 9, "x" * 5000) is None


def test_a_bare_certificate_from_an_older_checkpoint_still_certifies_its_step() -> None:
    """Checkpoints written before progress was signed hold the bare MAC of the step."""
    legacy = hmac.new(JOB_KEY.encode(), b"collabtrain\0step\x009", hashlib.sha256).hexdigest()
    assert credentials.certified_progress(JOB_KEY, 9, legacy) == {}
    assert credentials.certified_progress(JOB_KEY, 10, legacy) is None


def test_a_ticket_needs_ascii_digits_and_an_ascii_mac() -> None:
    source = credentials.peer_token(JOB_KEY, "a")
    ticket = credentials.state_ticket(source, expires_at=2000)
    mac = ticket.split(".")[1]
    assert credentials.ticket_valid(source, ticket, now=1999)
    for bad in ("².{mac}", "٢٠٠٠.{mac}", "2000.é", "2000.\ud800", "9" * 5000 + ".{mac}", "."):
        assert not credentials.ticket_valid(source, bad.format(mac=mac), now=1999)


def test_the_state_server_answers_401_to_a_ticket_with_odd_digits() -> None:
    token = credentials.peer_token(JOB_KEY, "a")
    server = StateServer("127.0.0.1", 0, token, lambda: make_snapshot(b"x", 1, "h"))
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/state"
        for ticket in ("².abc", "2000.é"):
            # latin-1 on the wire, as a client may send it
            response = requests.get(url, headers={"Authorization": f"Bearer {ticket}"}, timeout=5)
            assert response.status_code == 401
        good = credentials.state_ticket(token, int(time.time()) + 60)
        response = requests.get(url, headers={"Authorization": f"Bearer {good}"}, timeout=5)
        assert response.status_code == 200 and response.content == b"x"
    finally:
        server.stop()


# --- state transfer ---------------------------------------------------------------------


@pytest.fixture
def trickling_source() -> Iterator[str]:
    """A state source that announces 1000 bytes and sends one every 50 ms."""

    class Trickle(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.send_header("X-Collabtrain-Step", "1")
            self.send_header("X-Collabtrain-Param-Hash", "h")
            self.send_header("X-Content-Sha256", "0" * 64)
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass  # the reader gave up

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_source_that_trickles_is_given_up_at_the_deadline(trickling_source: str) -> None:
    started = time.monotonic()
    with pytest.raises(StateTransferError, match="not received within") as error:
        fetch_state(trickling_source, "ticket", max_bytes=10_000, timeout_s=5.0, deadline_s=0.5)
    assert trickling_source in str(error.value)
    assert time.monotonic() - started < 3.0  # the whole body would take 50 s


# --- loading a state ----------------------------------------------------------------------


def test_a_loaded_state_keeps_this_peers_optimizer_hyperparameters() -> None:
    torch.manual_seed(0)
    source_model = nn.Linear(3, 2)
    source_optimizer = torch.optim.AdamW(
        source_model.parameters(), lr=1e6, betas=(0.1, 0.2), weight_decay=5.0, eps=1.0
    )
    for param in source_model.parameters():  # moments to carry over (as a step leaves them)
        source_optimizer.state[param] = {
            "step": torch.tensor(1.0),
            "exp_avg": torch.randn_like(param),
            "exp_avg_sq": torch.rand_like(param),
        }
    source_optimizer.param_groups[0]["injected"] = "from the source"
    data = serialize_state(source_model, source_optimizer, step=4)

    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    own = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    assert load_state(data, model, optimizer) == 4

    group = optimizer.param_groups[0]
    assert {k: v for k, v in group.items() if k != "params"} == own
    assert group["lr"] == 1e-3 and group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
    assert group["params"] == list(model.parameters())
    # The source's per-parameter state (moments) is kept.
    for source_param, param in zip(source_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(param, source_param)
        assert torch.equal(
            optimizer.state[param]["exp_avg"], source_optimizer.state[source_param]["exp_avg"]
        )
