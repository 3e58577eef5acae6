"""The peer's HTTP client for the coordinator (requests, one session per thread)."""

from __future__ import annotations

import threading
import time
from typing import TypeVar

import requests
from pydantic import BaseModel

from collabtrain_trainer.protocol import (
    TOKEN_HEADER,
    Heartbeat,
    HeartbeatResponse,
    Instruction,
    JoinRequest,
    JoinResponse,
    LeaveRequest,
    LeaveResponse,
    ProgressReport,
    RestoreProblem,
    RoundDecision,
    RoundReady,
    RoundVote,
    StoreRequest,
    StoreResponse,
    WriterReport,
)

M = TypeVar("M", bound=BaseModel)


class RejoinRequired(Exception):
    """The coordinator does not know this peer (it restarted or expired it)."""


class CoordinatorUnavailable(Exception):
    """The coordinator cannot be reached right now."""


class RequestRefused(Exception):
    """The coordinator refused what this peer sent (422): a bug or a state it will not
    accept, such as a step without this job's certificate. Retrying cannot help."""


class CoordinatorClient:
    def __init__(self, base_url: str, token: str, *, request_timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {TOKEN_HEADER: f"Bearer {token}"}
        self._timeout = request_timeout_s
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers.update(self._headers)
            self._local.session = session
        return session

    def _post(self, path: str, body: BaseModel, reply: type[M], timeout: float | None = None) -> M:
        try:
            response = self._session().post(
                self.base_url + path,
                data=body.model_dump_json(),
                headers={"Content-Type": "application/json"},
                timeout=timeout or self._timeout,
            )
        except requests.RequestException as error:
            raise CoordinatorUnavailable(f"{path}: {type(error).__name__}") from error
        if response.status_code == 409:
            raise RejoinRequired(path)
        if response.status_code in (401, 403):
            raise PermissionError(
                f"the coordinator refused this peer's token ({response.status_code}): check "
                "the peer token environment variable and that the peer id is the pod's name"
            )
        if response.status_code == 422:
            raise RequestRefused(f"the coordinator refused {path}: {response.text[:500]}")
        if response.status_code >= 500:
            raise CoordinatorUnavailable(f"{path}: HTTP {response.status_code}")
        response.raise_for_status()
        return reply.model_validate_json(response.content)

    def join(self, request: JoinRequest) -> JoinResponse:
        return self._post("/peers/join", request, JoinResponse)

    def heartbeat(
        self,
        peer_id: str,
        checkpoint_status: WriterReport | None = None,
        restore_problem: RestoreProblem | None = None,
    ) -> HeartbeatResponse:
        return self._post(
            "/peers/heartbeat",
            Heartbeat(
                peer_id=peer_id,
                checkpoint_status=checkpoint_status,
                restore_problem=restore_problem,
            ),
            HeartbeatResponse,
            timeout=5.0,
        )

    def report(self, report: ProgressReport) -> Instruction:
        return self._post("/peers/report", report, Instruction)

    def leave(self, peer_id: str, reason: str) -> None:
        self._post(
            "/peers/leave", LeaveRequest(peer_id=peer_id, reason=reason), LeaveResponse, timeout=3.0
        )

    def rendezvous(self, request: StoreRequest) -> StoreResponse:
        """One call on the coordinator's rendezvous store (a `get` may wait up to
        `wait_seconds` there). Raises like the other calls; torch sees the exception."""
        return self._post(
            "/rendezvous", request, StoreResponse, timeout=self._timeout + request.wait_seconds
        )

    def await_ready(self, request: RoundReady, until: float) -> RoundDecision:
        """Long-poll until every member is present ("go") or the round is abandoned."""
        return self._await("/rounds/ready", request, until)

    def await_decision(self, vote: RoundVote, until: float) -> RoundDecision:
        """Send the vote; long-poll until the coordinator commits or aborts the round."""
        return self._await("/rounds/vote", vote, until)

    def _await(self, path: str, body: BaseModel, until: float) -> RoundDecision:
        round_id = int(getattr(body, "round_id"))  # noqa: B009
        while True:
            try:
                decision = self._post(path, body, RoundDecision)
            except CoordinatorUnavailable:
                if time.monotonic() > until:
                    raise
                time.sleep(0.2)
                continue
            if decision.outcome != "wait":
                return decision
            if time.monotonic() > until:
                # The coordinator's own deadline will abort the round; report that locally.
                return RoundDecision(
                    round_id=round_id, outcome="abort", step=decision.step, reason="local deadline"
                )
