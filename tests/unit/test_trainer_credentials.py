"""What a peer takes from the wire: credentials that are not ASCII, tickets with odd
digits. (State transfer: test_trainer_state_transfer.py.)"""

from __future__ import annotations

import hashlib
import hmac
import time

import pytest
import requests
import torch
from torch import nn

from collabtrain_trainer import credentials
from collabtrain_trainer.coordinator.server import identify
from collabtrain_trainer.peer.state_server import StateServer
from collabtrain_trainer.state_snapshot import take_snapshot

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
    model = nn.Linear(2, 1)
    snapshot = take_snapshot(model, torch.optim.SGD(model.parameters(), lr=0.1), 1, "h")
    server = StateServer("127.0.0.1", 0, token, lambda: snapshot)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/state"
        for ticket in ("².abc", "2000.é"):
            # latin-1 on the wire, as a client may send it
            response = requests.get(url, headers={"Authorization": f"Bearer {ticket}"}, timeout=5)
            assert response.status_code == 401
        good = credentials.state_ticket(token, int(time.time()) + 60)
        response = requests.get(url, headers={"Authorization": f"Bearer {good}"}, timeout=5)
        assert response.status_code == 200 and response.json()["step"] == 1
    finally:
        server.stop()
