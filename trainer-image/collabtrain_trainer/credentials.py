"""Who may say what: every credential of a job, derived with HMAC-SHA256 from one key.

Torch-free: the operator imports it to mint what the trainer checks.

- The operator holds a master key (a file from the chart's Secret). A job's key is derived
  from it and the job's namespace and name, so the operator never reads a Secret back: it
  can always derive again. The coordinator gets the job key (the job's Secret). Not the
  job's uid: a job deleted and applied again resumes its checkpoints, whose step
  certificates must still verify.
- Each peer gets its own token, derived from the job key and its peer id (the pod's name),
  in a Secret of its own. The coordinator binds every peer call to the id in the token.
- The operator's admin token (drain, checkpoint) is derived from the job key; no peer token
  passes for it.
- Step certificates: the coordinator signs each step it commits, together with the job's
  progress up to it (samples, bytes, losses). After it restarts it only adopts a step a
  peer can show a certificate for, so no peer can forge progress, and it takes the job's
  progress from that certificate, so its counters do not start again from zero.
- State tickets: a newcomer fetches state with a ticket the coordinator minted for that
  source peer (keyed by the source's own token), so the newcomer sends nothing of its own
  to whatever address a source declared.

A token is `<identity>.<hex MAC>`: `admin.<mac>` or `peer:<peer id>.<mac>`. The identity
is not secret; the MAC is checked in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ADMIN = "admin"
_PEER_PREFIX = "peer:"


def _mac(key: str | bytes, *parts: str) -> str:
    key_bytes = key.encode() if isinstance(key, str) else key
    # NUL separates the parts: no part can contain it, so no two part lists collide.
    message = "\0".join(("collabtrain", *parts)).encode()
    return hmac.new(key_bytes, message, hashlib.sha256).hexdigest()


def _equal(given: str, expected: str) -> bool:
    """Constant-time comparison of a value from the wire with the one expected. Compares
    bytes: `hmac.compare_digest` raises TypeError on a str that is not ASCII, and a value
    that cannot even be encoded (a lone surrogate) is simply not valid."""
    try:
        return hmac.compare_digest(given.encode(), expected.encode())
    except (UnicodeError, TypeError):
        return False


def job_key(master_key: bytes, namespace: str, name: str) -> str:
    """The job's key: the same for a job applied again under the same name, so that it
    can resume from its checkpoints."""
    return _mac(master_key, "job", namespace, name)


def peer_token(job_key: str, peer_id: str) -> str:
    identity = _PEER_PREFIX + peer_id
    return f"{identity}.{_mac(job_key, identity)}"


def admin_token(job_key: str) -> str:
    return f"{ADMIN}.{_mac(job_key, ADMIN)}"


@dataclass(frozen=True)
class Identity:
    """Who a valid token speaks for: the operator (admin) or one peer."""

    peer_id: str | None  # None: the admin

    @property
    def is_admin(self) -> bool:
        return self.peer_id is None


def identify(job_key: str, token: str) -> Identity | None:
    """The identity a token proves, or None when it proves nothing."""
    identity, _, mac = token.rpartition(".")
    if not identity:
        return None
    try:
        expected = _mac(job_key, identity)
    except UnicodeError:  # an identity no token was ever minted for
        return None
    if not _equal(mac, expected):
        return None
    if identity == ADMIN:
        return Identity(peer_id=None)
    if identity.startswith(_PEER_PREFIX) and len(identity) > len(_PEER_PREFIX):
        return Identity(peer_id=identity[len(_PEER_PREFIX) :])
    return None


# Longer than any certificate this module makes (its progress is a few numbers).
MAX_CERTIFICATE_LENGTH = 1024


def step_certificate(job_key: str, step: int, progress: Mapping[str, Any] | None = None) -> str:
    """`<payload>.<mac>`: the payload is the step and `progress` (JSON numbers), base64url."""
    body = json.dumps({**(progress or {}), "step": step}, sort_keys=True, separators=(",", ":"))
    payload = base64.urlsafe_b64encode(body.encode()).decode()
    return f"{payload}.{_mac(job_key, 'step', payload)}"


def certified_progress(job_key: str, step: int, certificate: str | None) -> dict[str, Any] | None:
    """The progress a valid certificate of `step` carries, without the step; None when it
    is not a valid certificate of `step`. A certificate made before progress was signed
    with it (a bare MAC, in older checkpoints) is still valid and carries none."""
    if not certificate or len(certificate) > MAX_CERTIFICATE_LENGTH:
        return None
    payload, dot, mac = certificate.rpartition(".")
    if not dot:
        return {} if _equal(certificate, _mac(job_key, "step", str(step))) else None
    try:
        if not _equal(mac, _mac(job_key, "step", payload)):
            return None
        progress = json.loads(base64.urlsafe_b64decode(payload.encode()))
    except (UnicodeError, binascii.Error, ValueError):
        return None
    if not isinstance(progress, dict) or progress.pop("step", None) != step:
        return None
    return progress


def step_certified(job_key: str, step: int, certificate: str | None) -> bool:
    return certified_progress(job_key, step, certificate) is not None


def state_ticket(source_token: str, expires_at: int) -> str:
    """A ticket to fetch state from the peer holding `source_token`, valid until
    `expires_at` (Unix seconds)."""
    return f"{expires_at}.{_mac(source_token, 'state', str(expires_at))}"


def ticket_valid(own_token: str, ticket: str, now: float) -> bool:
    """Checked by the source peer with its own token."""
    expires, _, mac = ticket.partition(".")
    # ASCII digits only ("²".isdigit() is True, int("²") raises), and few of them (int()
    # refuses thousands of digits).
    if not (expires.isascii() and expires.isdigit() and len(expires) <= 20):
        return False
    if int(expires) < now:
        return False
    return _equal(mac, _mac(own_token, "state", expires))
