"""The coordinator's rules, driven directly with an injected clock."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from datetime import UTC, datetime

import pytest
from aiohttp.test_utils import TestClient, TestServer

from collabtrain_trainer import credentials
from collabtrain_trainer.config import TrainerConfig
from collabtrain_trainer.coordinator.deadline import AdaptiveDeadline
from collabtrain_trainer.coordinator.server import CoordinatorApp, CoordinatorSettings, identify
from collabtrain_trainer.coordinator.state import (
    FINAL_CHECKPOINT_GRACE_S,
    CoordinatorState,
    InvalidRequest,
    UnknownPeerError,
)
from collabtrain_trainer.protocol import (
    CheckpointResult,
    DrainRequest,
    Heartbeat,
    Instruction,
    JoinRequest,
    LastCheckpoint,
    LeaveRequest,
    ProgressReport,
    Rewind,
    RoundReady,
    RoundVote,
    WriterReport,
)

EXPIRY = 3.0
JOB_KEY = "unit-job-key"


def make_config(**overrides: object) -> TrainerConfig:
    raw: dict[str, object] = {
        "job": "unit",
        "target_batch_size": 100,
        "max_steps": 50,
        "timing": {
            "peer_expiry_s": EXPIRY,
            "initial_round_deadline_s": 10.0,
            "min_round_deadline_s": 2.0,
            "max_round_deadline_s": 60.0,
        },
    }
    raw.update(overrides)
    return TrainerConfig.model_validate(raw)


class Harness:
    """A coordinator, a clock, and helpers that act as peers."""

    def __init__(self, **overrides: object) -> None:
        self.now = 1000.0
        self.state = CoordinatorState(
            make_config(**overrides),
            now=self.now,
            job_key=JOB_KEY,
        )
        self.now += EXPIRY + 0.1  # past the start-up grace
        self.hashes: dict[str, str] = {}

    def join(self, peer_id: str, step: int = 0, param_hash: str | None = None) -> None:
        """Join as an honest peer: one at a step > 0 holds the job's certificate of it."""
        self.state.join(
            JoinRequest(
                peer_id=peer_id,
                state_url=f"http://{peer_id}",
                step=step,
                param_hash=param_hash,
                step_certificate=credentials.step_certificate(JOB_KEY, step) if step else None,
            ),
            self.now,
        )

    def report(
        self, peer_id: str, samples: int, *, step: int | None = None, param_hash: str = "h0"
    ) -> Instruction:
        return self.state.report(
            ProgressReport(
                peer_id=peer_id,
                step=self.state.step if step is None else step,
                param_hash=param_hash,
                samples=samples,
                loss=2.0,
            ),
            self.now,
        )

    def report_status(
        self, peer_id: str, checkpoint_status: WriterReport, param_hash: str = "h0"
    ) -> Instruction:
        return self.state.report(
            ProgressReport(
                peer_id=peer_id,
                step=self.state.step,
                param_hash=param_hash,
                checkpoint_status=checkpoint_status,
            ),
            self.now,
        )

    def advance(self, seconds: float, keep_alive: tuple[str, ...] = ()) -> None:
        self.now += seconds
        for peer_id in keep_alive:
            self.state.heartbeat(Heartbeat(peer_id=peer_id), self.now)
        self.state.tick(self.now)

    def vote(self, peer_id: str, round_id: int, ok: bool = True, weight: float = 50.0) -> str:
        decision = self.state.vote(
            RoundVote(
                peer_id=peer_id,
                round_id=round_id,
                ok=ok,
                weight=weight,
                total_weight=100.0,
                loss=1.5,
                reason="" if ok else "Connection closed by peer",
            ),
            self.now,
        )
        return decision.outcome

    def ready(self, peer_id: str, round_id: int) -> str:
        return self.state.ready(RoundReady(peer_id=peer_id, round_id=round_id), self.now).outcome

    def commit(self, peers: str, samples: int = 50) -> None:
        """Each of `peers` (one letter each) reports `samples`; the round that forms
        with them commits."""
        instruction = None
        for peer in peers:
            instruction = self.report(peer, samples)
        assert instruction is not None and instruction.round is not None
        for peer in peers:
            self.ready(peer, instruction.round.round_id)
            self.vote(peer, instruction.round.round_id)


def three_peers_in_a_round() -> tuple[Harness, int]:
    h = Harness()
    for peer in ("a", "b", "c"):
        h.join(peer)
    h.report("a", 40)
    h.report("b", 30)
    instruction = h.report("c", 30)
    assert instruction.action == "round" and instruction.round is not None
    return h, instruction.round.round_id


# --- credentials --------------------------------------------------------------------


def test_tokens_identify_exactly_their_holder() -> None:
    admin = credentials.admin_token(JOB_KEY)
    peer = credentials.peer_token(JOB_KEY, "job-peer-0-1")
    assert identify(f"Bearer {admin}", JOB_KEY) == credentials.Identity(peer_id=None)
    assert identify(f"Bearer {peer}", JOB_KEY) == credentials.Identity(peer_id="job-peer-0-1")
    forged = peer.replace("job-peer-0-1", "job-peer-1-1")  # same MAC, another id
    assert identify(f"Bearer {forged}", JOB_KEY) is None
    assert (
        identify(f"Bearer {credentials.peer_token('other-job', 'job-peer-0-1')}", JOB_KEY) is None
    )
    assert identify(f"Bearer {peer[:-1]}", JOB_KEY) is None
    assert identify(peer, JOB_KEY) is None  # no "Bearer "
    assert identify(None, JOB_KEY) is None


def test_step_certificates_and_state_tickets_bind_what_they_name() -> None:
    certificate = credentials.step_certificate(JOB_KEY, 7)
    assert credentials.step_certified(JOB_KEY, 7, certificate)
    assert not credentials.step_certified(JOB_KEY, 8, certificate)
    assert not credentials.step_certified("other-job", 7, certificate)
    assert not credentials.step_certified(JOB_KEY, 7, None)
    source = credentials.peer_token(JOB_KEY, "a")
    ticket = credentials.state_ticket(source, expires_at=2000)
    assert credentials.ticket_valid(source, ticket, now=1999)
    assert not credentials.ticket_valid(source, ticket, now=2001)  # expired
    assert not credentials.ticket_valid(credentials.peer_token(JOB_KEY, "b"), ticket, now=1999)
    assert not credentials.ticket_valid(source, "3000." + ticket.split(".")[1], now=1999)


def _http(
    requests: list[tuple[str, str, str | None, object]],
) -> list[tuple[int, dict[str, object] | str]]:
    """Send (method, path, token, json body) to a fresh coordinator app, in order."""
    settings = CoordinatorSettings(host="127.0.0.1", port=0)
    app = CoordinatorApp(make_config(), settings, job_key=JOB_KEY).make_app()

    async def scenario() -> list[tuple[int, dict[str, object] | str]]:
        answers: list[tuple[int, dict[str, object] | str]] = []
        async with TestClient(TestServer(app)) as client:
            for method, path, token, body in requests:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                response = await client.request(method, path, json=body, headers=headers)
                text = await response.text()
                is_json = response.content_type == "application/json"
                answers.append((response.status, await response.json() if is_json else text))
        return answers

    return asyncio.run(scenario())


def test_http_refuses_a_wrong_token_and_logs_without_it(caplog: pytest.LogCaptureFixture) -> None:
    admin = credentials.admin_token(JOB_KEY)
    with caplog.at_level(logging.WARNING):
        statuses = [
            status
            for status, _ in _http(
                [
                    ("GET", "/status", "wrong-token", None),
                    ("POST", "/peers/join", None, {}),
                    ("GET", "/status", admin, None),
                    ("GET", "/healthz", None, None),
                ]
            )
        ]
    assert statuses == [401, 401, 200, 200]
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 2
    assert all("wrong-token" not in m and admin not in m for m in caplog.messages)


def test_a_peer_token_speaks_only_for_its_peer_and_never_as_the_operator() -> None:
    a = credentials.peer_token(JOB_KEY, "a")
    join_a = {"peer_id": "a", "state_url": "http://10.0.0.1:9000"}
    answers = _http(
        [
            ("POST", "/peers/join", a, join_a),
            ("POST", "/peers/join", a, {**join_a, "peer_id": "b"}),  # a joins as b
            ("POST", "/peers/heartbeat", a, {"peer_id": "b"}),
            ("POST", "/peers/leave", a, {"peer_id": "b"}),
            ("POST", "/drain", a, {"peers": ["a"]}),  # an admin endpoint
            ("POST", "/checkpoint", a, {}),
            ("GET", "/status", a, None),
            ("POST", "/peers/heartbeat", credentials.admin_token(JOB_KEY), {"peer_id": "a"}),
            ("POST", "/peers/heartbeat", a, {"peer_id": "a"}),
        ]
    )
    assert [status for status, _ in answers] == [200, 403, 403, 403, 403, 403, 403, 403, 200]


def test_malformed_and_non_finite_fields_get_422_naming_the_field() -> None:
    a = credentials.peer_token(JOB_KEY, "a")
    admin = credentials.admin_token(JOB_KEY)
    report = {"peer_id": "a", "step": 0, "param_hash": "h0", "samples": 10}
    bad_bodies: list[tuple[str, dict[str, object], str]] = [
        ("/peers/report", {**report, "step": 10**9}, "step"),  # forged progress
        ("/peers/report", {**report, "step": 2**60}, "step"),
        ("/peers/report", {**report, "samples": -1}, "samples"),
        ("/peers/report", {**report, "samples_per_second": "Infinity"}, "samples_per_second"),
        ("/peers/report", {**report, "loss": "NaN"}, "loss"),
        ("/peers/report", {**report, "param_hash": "h" * 10_000}, "param_hash"),
        (
            "/rounds/vote",
            {"peer_id": "a", "round_id": 1, "ok": True, "total_weight": "Infinity"},
            "total_weight",
        ),
        (
            "/rounds/vote",
            {"peer_id": "a", "round_id": 1, "ok": True, "excluded_ranks": [-100]},
            "excluded_ranks",
        ),
        ("/peers/join", {"peer_id": "a", "state_url": "file:///etc/passwd"}, "state_url"),
        (
            "/peers/join",
            {"peer_id": "a", "state_url": "http://x", "step": 5, "param_hash": "h"},
            "step_certificate",
        ),  # a step nobody committed
    ]
    join = {"peer_id": "a", "state_url": "http://10.0.0.1:9000"}
    requests: list[tuple[str, str, str | None, object]] = [("POST", "/peers/join", a, join)]
    requests += [("POST", path, a, body) for path, body, _ in bad_bodies]
    requests += [("POST", "/drain", admin, {"peers": ["a"], "deadline_seconds": "NaN"})]
    requests += [("GET", "/status", admin, None)]
    answers = _http(requests)
    assert answers[0][0] == 200
    for (path, _, field), (status, body) in zip(bad_bodies, answers[1:], strict=False):
        assert status == 422, (path, field, status, body)
        assert field in str(body), (field, body)
    assert answers[-2][0] == 422
    status, body = answers[-1]
    assert status == 200 and isinstance(body, dict)
    assert body["step"] == 0 and body["peers"] == ["a"]


def test_the_ticker_survives_a_failing_pass(caplog: pytest.LogCaptureFixture) -> None:
    settings = CoordinatorSettings(host="127.0.0.1", port=0)
    coordinator = CoordinatorApp(make_config(), settings, job_key=JOB_KEY)
    passes: list[float] = []

    def tick(now: float) -> None:
        passes.append(now)
        if len(passes) == 1:
            raise OverflowError("one bad pass")

    coordinator.state.tick = tick  # type: ignore[method-assign]

    async def scenario() -> None:
        async with TestClient(TestServer(coordinator.make_app())):
            await asyncio.sleep(0.5)

    with caplog.at_level(logging.ERROR):
        asyncio.run(scenario())
    assert len(passes) >= 3
    assert any("tick failed" in r.getMessage() for r in caplog.records)


# --- deadline ---------------------------------------------------------------------------


def test_deadline_follows_measured_round_times_within_bounds() -> None:
    deadline = AdaptiveDeadline(30.0, 2.0, 60.0, factor=3.0, margin=1.0, window=3)
    assert deadline.seconds == 30.0
    deadline.observe_commit(0.2)
    assert deadline.seconds == 2.0  # 3 * 0.2 + 1 is below the minimum
    deadline.observe_commit(5.0)
    assert deadline.seconds == 16.0
    for _ in range(3):
        deadline.observe_commit(1.0)  # the slow round leaves the window
    assert deadline.seconds == 4.0
    deadline.observe_commit(100.0)
    assert deadline.seconds == 60.0


def test_deadline_grows_after_a_timeout() -> None:
    deadline = AdaptiveDeadline(4.0, 2.0, 10.0, backoff=1.5)
    deadline.observe_timeout()
    assert deadline.seconds == 6.0
    deadline.observe_timeout()
    deadline.observe_timeout()
    assert deadline.seconds == 10.0


def test_deadline_rejects_inverted_bounds() -> None:
    with pytest.raises(ValueError, match="minimum <= maximum"):
        AdaptiveDeadline(1.0, 5.0, 2.0)


# --- membership -------------------------------------------------------------------------


def test_silent_peers_expire_and_unknown_peers_must_rejoin() -> None:
    h = Harness()
    h.join("a")
    h.join("b")
    h.advance(EXPIRY / 2, keep_alive=("a",))
    h.advance(EXPIRY / 2 + 0.1, keep_alive=("a",))
    assert h.state.live_peers(h.now) == ["a"]
    assert h.state.peers_lost == 1
    with pytest.raises(UnknownPeerError):
        h.report("b", 10)


def test_each_join_gets_the_next_data_shard() -> None:
    h = Harness(data_shards=2)
    shards = [
        h.state.join(JoinRequest(peer_id=p, state_url="http://u"), h.now).data_shard for p in "abc"
    ]
    assert shards == [0, 1, 0]


def test_newcomer_is_told_to_sync_from_live_peers_holding_the_step() -> None:
    h = Harness()
    h.join("a")
    h.report("a", 0)
    response = h.state.join(JoinRequest(peer_id="b", state_url="http://b"), h.now)
    assert [s.peer_id for s in response.sync_from] == ["a"]


# --- rounds -----------------------------------------------------------------------------


def test_round_forms_when_live_samples_reach_the_target() -> None:
    h = Harness()
    for peer in ("a", "b", "c"):
        h.join(peer)
    assert h.report("a", 40).action == "train"
    assert h.report("b", 30).action == "train"
    instruction = h.report("c", 30)
    assert instruction.action == "round"
    assert instruction.round is not None
    assert instruction.round.members == ["a", "b", "c"]
    assert instruction.round.rank == 2
    assert h.report("a", 40).round is not None


def test_train_instruction_asks_each_peer_for_its_share() -> None:
    h = Harness()
    h.join("a")
    h.join("b")
    h.report("a", 20)
    assert h.report("b", 20).samples_needed == 30  # (100 - 40) / 2


def test_step_commits_exactly_once() -> None:
    h, round_id = three_peers_in_a_round()
    for peer in ("a", "b", "c"):
        assert h.ready(peer, round_id) in ("wait", "go")
    assert h.ready("a", round_id) == "go"
    assert h.vote("a", round_id) == "wait"
    assert h.vote("b", round_id) == "wait"
    assert h.vote("c", round_id) == "commit"
    assert h.state.step == 1
    # Repeated or late votes get the recorded decision and change nothing.
    assert h.vote("c", round_id) == "commit"
    assert h.vote("a", round_id) == "commit"
    assert h.state.step == 1
    assert h.state.samples_committed == 100


def test_member_lost_before_the_exchange_aborts_and_survivors_keep_their_samples() -> None:
    h, round_id = three_peers_in_a_round()
    h.ready("a", round_id)
    h.ready("b", round_id)
    h.advance(EXPIRY + 0.1, keep_alive=("a", "b"))  # c is gone
    assert h.ready("a", round_id) == "abort"
    assert h.state.step == 0
    assert h.state.rounds_aborted == 1
    # The survivors still hold 70 samples; with more they form a new round without c,
    # in a new membership epoch.
    first_epoch = h.state.epoch
    h.advance(0.01)
    h.report("a", 40)
    instruction = h.report("b", 60)
    assert instruction.action == "round" and instruction.round is not None
    assert instruction.round.members == ["a", "b"]
    assert instruction.round.epoch == first_epoch + 1


def test_member_lost_after_the_exchange_does_not_block_the_commit() -> None:
    h, round_id = three_peers_in_a_round()
    for peer in ("a", "b", "c"):
        h.ready(peer, round_id)
    h.vote("a", round_id)
    h.advance(EXPIRY + 0.1, keep_alive=("a", "b"))  # c died after the collectives
    assert h.vote("b", round_id) == "commit"
    assert h.state.step == 1


def test_failed_exchange_aborts_and_the_next_round_uses_a_fresh_group() -> None:
    h, round_id = three_peers_in_a_round()
    for peer in ("a", "b", "c"):
        h.ready(peer, round_id)
    epoch = h.state.epoch
    assert h.vote("a", round_id, ok=False) == "abort"
    assert h.vote("b", round_id) == "abort"
    assert h.state.step == 0
    # Nobody may start the next round before showing it is alive after the abort.
    h.advance(0.01)
    assert h.report("a", 40).action == "wait"
    h.report("b", 30)
    instruction = h.report("c", 30)
    assert instruction.round is not None
    assert instruction.round.epoch == epoch + 1
    assert instruction.round.store_prefix != f"collabtrain/{h.state.instance}/epoch{epoch}/"


def test_same_members_after_a_commit_reuse_the_epoch() -> None:
    h, round_id = three_peers_in_a_round()
    for peer in ("a", "b", "c"):
        h.ready(peer, round_id)
        h.vote(peer, round_id)
    epoch = h.state.epoch
    h.report("a", 40, param_hash="h1")
    h.report("b", 30, param_hash="h1")
    instruction = h.report("c", 30, param_hash="h1")
    assert instruction.round is not None and instruction.round.epoch == epoch


def test_round_past_its_deadline_aborts_and_the_deadline_grows() -> None:
    h, round_id = three_peers_in_a_round()
    h.ready("a", round_id)
    before = h.state.deadline.seconds
    h.advance(before + 0.1, keep_alive=("a", "b", "c"))
    assert h.state.decisions[round_id].outcome == "abort"
    assert "deadline" in h.state.decisions[round_id].reason
    assert h.state.deadline.seconds > before


def test_peer_with_a_different_hash_is_told_to_resync() -> None:
    h, round_id = three_peers_in_a_round()
    for peer in ("a", "b", "c"):
        h.ready(peer, round_id)
        h.vote(peer, round_id)
    assert h.report("a", 0, param_hash="good").action == "train"
    assert h.report("b", 0, param_hash="good").action == "train"
    instruction = h.report("c", 0, param_hash="bad")
    assert instruction.action == "resync"
    assert {s.peer_id for s in instruction.sync_from} == {"a", "b"}
    assert not h.state.param_hashes_agree


def test_peer_behind_the_step_is_told_to_resync() -> None:
    h, round_id = three_peers_in_a_round()
    for peer in ("a", "b"):
        h.ready(peer, round_id)
    h.ready("c", round_id)
    for peer in ("a", "b", "c"):
        h.vote(peer, round_id)
    h.join("d")
    assert h.report("d", 0, step=0).action == "wait"  # nobody has reported step 1 yet
    h.report("a", 0, param_hash="h1")
    instruction = h.report("d", 0, step=0)
    assert instruction.action == "resync"
    assert "behind" in instruction.reason


def test_non_member_waits_while_a_round_is_in_flight() -> None:
    h, _ = three_peers_in_a_round()
    h.join("d")
    assert h.report("d", 10).action == "wait"


def test_finished_run_tells_peers_to_stop() -> None:
    h = Harness(max_steps=1)
    h.join("a")
    instruction = h.report("a", 100)
    assert instruction.round is not None
    h.ready("a", instruction.round.round_id)
    h.vote("a", instruction.round.round_id, weight=100)
    assert h.report("a", 0, param_hash="h1").action == "stop"
    assert h.state.status(h.now).finished


# --- restarts ---------------------------------------------------------------------------


def test_restarted_coordinator_adopts_the_step_peers_report() -> None:
    h = Harness()
    h.join("a", step=7, param_hash="h7")
    h.join("b", step=7, param_hash="h7")
    assert h.state.step == 7
    h.report("a", 60, param_hash="h7")
    instruction = h.report("b", 60, param_hash="h7")
    assert instruction.round is not None and instruction.round.step == 7


def test_a_step_is_adopted_only_with_the_jobs_certificate() -> None:
    h = Harness()
    forged = JoinRequest(peer_id="m", state_url="http://m", step=10**9, param_hash="x")
    with pytest.raises(InvalidRequest, match="certificate"):
        h.state.join(forged, h.now)
    other_job = credentials.step_certificate("another-job", 10**9)
    with pytest.raises(InvalidRequest, match="certificate"):
        h.state.join(forged.model_copy(update={"step_certificate": other_job}), h.now)
    assert h.state.step == 0 and "m" not in h.state.peers
    h.join("a")
    with pytest.raises(InvalidRequest, match="beyond the committed step"):
        h.report("a", 10, step=10**9)
    h.advance(EXPIRY / 2, keep_alive=("a",))
    assert h.state.step == 0 and not h.state.finished
    assert h.state.status(h.now).step == 0
    # A peer that restored a checkpoint shows the certificate the writer kept with it.
    restored = ProgressReport(
        peer_id="a",
        step=12,
        param_hash="h12",
        step_certificate=credentials.step_certificate(JOB_KEY, 12),
    )
    h.state.report(restored, h.now)
    assert h.state.step == 12


def test_commits_count_recorded_samples_and_hand_out_certificates() -> None:
    h, round_id = three_peers_in_a_round()  # a 40, b 30, c 30 samples recorded
    decisions = [h.state.ready(RoundReady(peer_id=p, round_id=round_id), h.now) for p in "abc"]
    assert decisions[-1].outcome == "go" and decisions[-1].weights == [40, 30, 30]
    # b claims an inflated weight and total in its vote: neither is counted.
    for peer in "abc":
        h.vote(peer, round_id, weight=1e12 if peer == "b" else 35.0)
    assert h.state.step == 1 and h.state.samples_committed == 100
    decision = h.state.poll_vote(round_id, h.now)
    assert decision.outcome == "commit"
    progress = credentials.certified_progress(JOB_KEY, 1, decision.step_certificate)
    assert progress is not None and progress["samples"] == 100


def test_a_restarted_coordinator_takes_the_jobs_progress_from_a_certificate() -> None:
    """Samples, bytes and losses are signed into the certificate of each step: after a
    restart they come back with the first peer that shows its step, instead of zero."""
    h, round_id = three_peers_in_a_round()
    for peer in "abc":
        h.ready(peer, round_id)
    for peer in "abc":
        h.state.vote(
            RoundVote(
                peer_id=peer, round_id=round_id, ok=True, loss=2.5, bytes_sent=1000,
                bytes_fp32_equivalent=8000,
            ),
            h.now,
        )  # fmt: skip
    before = h.state.status(h.now)
    certificate = h.report("a", 0, param_hash="h1").step_certificate
    assert before.step == 1 and before.samples_committed == 100 and before.rounds_committed == 1

    restarted = Harness()
    assert restarted.state.status(restarted.now).samples_committed == 0
    forged = certificate_with(certificate, samples=10**6)
    request = JoinRequest(
        peer_id="a", state_url="http://a", step=1, param_hash="h1", step_certificate=forged
    )
    with pytest.raises(InvalidRequest, match="certificate"):
        restarted.state.join(request, restarted.now)
    restarted.state.join(
        request.model_copy(update={"step_certificate": certificate}), restarted.now
    )
    after = restarted.state.status(restarted.now)
    assert (after.step, after.samples_committed, after.bytes_sent) == (1, 100, 3000)
    assert after.bytes_fp32_equivalent == 24000
    assert after.initial_loss == after.loss == 2.5
    assert after.rounds_committed == 0  # nothing committed by this instance yet


def certificate_with(certificate: str | None, **changes: object) -> str:
    """The certificate's payload changed, its MAC kept: what a forger can make."""
    assert certificate is not None
    payload, _, mac = certificate.rpartition(".")
    body = {**json.loads(base64.urlsafe_b64decode(payload)), **changes}
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode() + "." + mac


def test_recorded_weights_are_capped_at_the_target_batch() -> None:
    h = Harness()
    h.join("a")
    h.join("b")
    h.report("a", 10)
    instruction = h.report("b", 10**12)  # b claims samples it never trained
    assert instruction.round is not None
    for peer in "ab":
        decision = h.state.ready(
            RoundReady(peer_id=peer, round_id=instruction.round.round_id), h.now
        )
    assert decision.weights == [10, 100]


def test_a_vote_naming_a_rank_outside_the_round_is_refused() -> None:
    h, round_id = three_peers_in_a_round()
    for peer in "abc":
        h.ready(peer, round_id)
    vote = RoundVote(peer_id="a", round_id=round_id, ok=True, excluded_ranks=[3])
    with pytest.raises(InvalidRequest, match="excluded_ranks"):
        h.state.vote(vote, h.now)
    assert h.state.round is not None and "a" not in h.state.round.votes
    assert [h.vote(p, round_id) for p in "abc"][-1] == "commit"


def test_sources_carry_tickets_for_that_source_only() -> None:
    h = Harness()
    h.join("a")
    h.report("a", 0, param_hash="h0")
    sources = h.state.sources(h.now)
    assert [s.peer_id for s in sources] == ["a"]
    a_token = credentials.peer_token(JOB_KEY, "a")
    assert credentials.ticket_valid(a_token, sources[0].ticket, h.state.wall_clock())
    b_token = credentials.peer_token(JOB_KEY, "b")
    assert not credentials.ticket_valid(b_token, sources[0].ticket, h.state.wall_clock())


def test_no_round_forms_during_the_grace_period_after_start() -> None:
    h = Harness()
    h.now = h.state.started_at + 0.1
    h.join("a", step=3, param_hash="h3")
    assert h.report("a", 500, param_hash="h3").action == "wait"
    h.now = h.state.started_at + EXPIRY + 0.2
    assert h.report("a", 500, param_hash="h3").action == "round"


def test_peer_leaving_mid_round_counts_as_gone() -> None:
    h, round_id = three_peers_in_a_round()
    h.ready("a", round_id)
    h.state.leave(LeaveRequest(peer_id="c"), h.now)
    assert h.state.decisions[round_id].outcome == "abort"


# --- drain and checkpoints ---------------------------------------------------------------


def test_draining_peer_is_never_the_checkpoint_writer() -> None:
    h = Harness(
        checkpoint={"endpoint": "minio:9000", "bucket": "b", "every_steps": 1},
    )
    h.join("a")
    h.join("b")
    h.report("a", 0)
    h.report("b", 0)
    assert h.state.checkpoint_writer == "a"
    response = h.state.drain(DrainRequest(peers=["a", "zz"]), h.now)
    assert response.draining == ["a"] and response.unknown == ["zz"]
    assert h.state.checkpoint_writer == "b"
    assert h.report("a", 0).action == "wait"  # drains: no more training


def test_checkpoint_duty_goes_to_the_writer_after_the_due_step() -> None:
    h = Harness(checkpoint={"endpoint": "minio:9000", "bucket": "b", "every_steps": 1})
    h.join("a")
    h.join("b")
    h.report("a", 50)
    instruction = h.report("b", 50)
    assert instruction.round is not None
    for peer in ("a", "b"):
        h.ready(peer, instruction.round.round_id)
        h.vote(peer, instruction.round.round_id)
    assert h.report("a", 0, param_hash="h1").checkpoint_step == 1
    assert h.report("b", 0, param_hash="h1").checkpoint_step is None
    h.state.report(
        ProgressReport(
            peer_id="a",
            step=1,
            param_hash="h1",
            checkpoint=CheckpointResult(step=1, uri="s3://b/unit/step-1"),
        ),
        h.now,
    )
    status = h.state.status(h.now)
    assert status.last_checkpoint is not None and status.last_checkpoint.step == 1
    assert h.report("a", 0, param_hash="h1").checkpoint_step is None


def test_writer_lost_hands_the_duty_over_with_the_last_snapshot_step() -> None:
    h = Harness(checkpoint={"endpoint": "minio:9000", "bucket": "b", "every_steps": 2})
    h.join("a")
    h.join("b")
    assert h.report("a", 0).checkpoint_writer
    assert not h.report("b", 0).checkpoint_writer
    # The writer took a snapshot of step 0 (uploading in the background).
    h.state.report(
        ProgressReport(peer_id="a", step=0, param_hash="h0", checkpoint=CheckpointResult(step=0)),
        h.now,
    )
    assert h.state.checkpoint_taken_step == 0
    # "a" goes silent: "b" becomes the writer and counts its interval from step 0.
    h.advance(EXPIRY + 0.5, keep_alive=("b",))
    instruction = h.report("b", 0)
    assert h.state.checkpoint_writer == "b"
    assert instruction.checkpoint_writer and instruction.checkpoint_last_step == 0


def test_writer_reports_fill_status_and_only_the_writer_sets_stale() -> None:
    h = Harness(checkpoint={"endpoint": "minio:9000", "bucket": "b", "every_steps": 5})
    h.join("a")
    h.join("b")
    h.report("a", 0)
    h.report("b", 0)
    assert h.state.checkpoint_writer == "a"
    done = LastCheckpoint(step=0, uri="s3://b/unit/step-0", time=datetime.now(UTC))
    h.state.heartbeat(
        Heartbeat(peer_id="b", checkpoint_status=WriterReport(stale=True, error="old")), h.now
    )
    status = h.state.status(h.now)
    assert not status.checkpoint_stale and status.checkpoint_error is None
    h.state.heartbeat(
        Heartbeat(
            peer_id="a",
            checkpoint_status=WriterReport(
                last_checkpoint=done, stale=True, error="store unreachable"
            ),
        ),
        h.now,
    )
    status = h.state.status(h.now)
    assert status.last_checkpoint == done
    assert status.checkpoint_stale and status.checkpoint_error == "store unreachable"
    h.state.heartbeat(Heartbeat(peer_id="a", checkpoint_status=WriterReport()), h.now)
    status = h.state.status(h.now)
    assert status.last_checkpoint == done  # a report without one never forgets it
    assert not status.checkpoint_stale and status.checkpoint_error is None


def test_a_restored_checkpoint_counts_against_staleness() -> None:
    h = Harness(checkpoint={"endpoint": "minio:9000", "bucket": "b", "every_steps": 2})
    h.join("a", step=40, param_hash="h40")
    assert h.state.step == 40
    assert not h.state.status(h.now).checkpoint_stale  # counts from the adopted step
    restored = LastCheckpoint(step=40, uri="s3://b/unit/step-40", time=datetime.now(UTC))
    h.report_status("a", WriterReport(last_checkpoint=restored), param_hash="h40")
    status = h.state.status(h.now)
    assert status.last_checkpoint == restored and not status.checkpoint_stale
    assert h.report("a", 0, param_hash="h40").checkpoint_last_step == 40


def test_no_writer_without_checkpoint_storage() -> None:
    h = Harness()
    h.join("a")
    h.report("a", 0)
    assert h.state.checkpoint_writer is None
    assert h.state.request_checkpoint(h.now) == (None, 0)


def test_when_every_holder_is_gone_training_goes_on_from_what_is_left() -> None:
    h = Harness()
    h.join("a", step=4, param_hash="h4")
    h.report("a", 0, param_hash="h4")
    h.advance(EXPIRY + 0.1)  # a is gone; nobody holds step 4
    h.join("b")
    h.report("b", 0, step=0, param_hash="seed")
    assert h.state.step == 0
    assert h.report("b", 100, step=0, param_hash="seed").action == "round"


def test_finished_run_is_not_rewound_by_a_late_peer() -> None:
    h = Harness(max_steps=1)
    h.join("a")
    instruction = h.report("a", 100)
    assert instruction.round is not None
    h.ready("a", instruction.round.round_id)
    h.vote("a", instruction.round.round_id, weight=100)
    h.state.leave(LeaveRequest(peer_id="a"), h.now)
    h.join("late")
    h.report("late", 0, step=0, param_hash="seed")
    h.advance(0.1, keep_alive=("late",))
    assert h.state.step == 1 and h.state.finished
    assert h.report("late", 0, step=0, param_hash="seed").action == "stop"


def test_member_that_reports_its_new_hash_late_stays_in_the_next_round() -> None:
    h, round_id = three_peers_in_a_round()
    for peer in ("a", "b", "c"):
        h.ready(peer, round_id)
        h.vote(peer, round_id)
    h.report("a", 50, param_hash="h1")
    instruction = h.report("b", 50, param_hash="h1")  # c has not reported since the commit
    assert instruction.round is not None
    assert instruction.round.members == ["a", "b", "c"]
    assert [s.peer_id for s in h.state.sources(h.now)] == ["a", "b"]


def test_member_that_must_resync_aborts_the_unformed_round() -> None:
    h, round_id = three_peers_in_a_round()
    for peer in ("a", "b", "c"):
        h.ready(peer, round_id)
        h.vote(peer, round_id)
    h.report("a", 50, param_hash="h1")
    next_round = h.report("b", 50, param_hash="h1").round
    assert next_round is not None
    assert h.report("c", 0, param_hash="different").action == "resync"
    assert h.state.decisions[next_round.round_id].outcome == "abort"


# --- what one peer's word can move ------------------------------------------------------


def _finished_with_writer(every_steps: int = 5) -> Harness:
    """Two peers commit the only step (max_steps 1); "a" is the checkpoint writer and has
    not written the final checkpoint yet."""
    h = Harness(
        max_steps=1,
        checkpoint={"endpoint": "minio:9000", "bucket": "b", "every_steps": every_steps},
    )
    h.join("a")
    h.join("b")
    h.commit("ab")
    assert h.state.step == 1 and h.state.checkpoint_writer == "a"
    return h


def test_only_the_writer_reports_checkpoints_and_never_beyond_the_committed_step() -> None:
    h = _finished_with_writer()
    assert not h.state.run_complete(h.now)  # waits for the final checkpoint
    forged = LastCheckpoint(step=2**53, uri="s3://b/forged", time=datetime(2100, 1, 1, tzinfo=UTC))
    # b is not the writer: neither its results nor its writer reports count, at any step.
    for step in (2**53, 1):
        h.state.report(
            ProgressReport(
                peer_id="b",
                step=1,
                param_hash="h1",
                checkpoint=CheckpointResult(step=step, uri="s3://b/forged"),
                checkpoint_status=WriterReport(
                    last_checkpoint=forged.model_copy(update={"step": step})
                ),
            ),
            h.now,
        )
        h.state.heartbeat(
            Heartbeat(
                peer_id="b",
                checkpoint_status=WriterReport(
                    last_checkpoint=forged.model_copy(update={"step": step})
                ),
            ),
            h.now,
        )
    h.state.report(
        ProgressReport(
            peer_id="b", step=1, param_hash="h1", checkpoint=CheckpointResult(step=1, error="no")
        ),
        h.now,
    )
    assert h.state.last_checkpoint is None and h.state.checkpoint_taken_step is None
    assert h.state.checkpoint_error is None
    assert not h.state.run_complete(h.now)
    # The writer cannot report a step beyond the committed one either.
    h.state.report(
        ProgressReport(
            peer_id="a",
            step=1,
            param_hash="h1",
            checkpoint=CheckpointResult(step=2**53, uri="s3://b/forged"),
            checkpoint_status=WriterReport(last_checkpoint=forged),
        ),
        h.now,
    )
    assert h.state.last_checkpoint is None and h.state.checkpoint_taken_step is None
    # Its real final checkpoint counts, with a time no later than the coordinator's clock.
    h.state.heartbeat(
        Heartbeat(
            peer_id="a",
            checkpoint_status=WriterReport(last_checkpoint=forged.model_copy(update={"step": 1})),
        ),
        h.now,
    )
    last = h.state.last_checkpoint
    assert last is not None and last.step == 1 and last.uri == "s3://b/forged"
    assert last.time <= datetime.now(UTC)
    assert h.state.run_complete(h.now)


def test_the_peers_keep_the_final_state_until_its_checkpoint_is_durable() -> None:
    """No deadline releases them: a final checkpoint that cannot be written makes the
    job wait (overdue, said on the job), and a new writer takes over a lost one."""
    h = _finished_with_writer()
    state = h.state
    writer_says = h.report("a", 0, param_hash="h1")
    assert writer_says.action == "wait" and writer_says.checkpoint_step == 1
    other_says = h.report("b", 0, param_hash="h1")
    assert other_says.action == "wait" and other_says.checkpoint_step is None
    h.advance(FINAL_CHECKPOINT_GRACE_S + 1, keep_alive=("a", "b"))
    status = state.status(h.now)
    assert not status.finished and status.final_checkpoint_overdue
    assert status.final_state_saved is None
    # The writer is lost; b becomes the writer and is asked for the final step.
    h.advance(EXPIRY + 1, keep_alive=("b",))
    assert state.checkpoint_writer == "b"
    assert h.report("b", 0, param_hash="h1").checkpoint_step == 1
    state.heartbeat(
        Heartbeat(
            peer_id="b",
            checkpoint_status=WriterReport(
                last_checkpoint=LastCheckpoint(step=1, uri="s3://b/1", time=datetime.now(UTC))
            ),
        ),
        h.now,
    )
    status = state.status(h.now)
    assert status.finished and status.final_state_saved is True
    assert not status.final_checkpoint_overdue
    assert h.report("b", 0, param_hash="h1").action == "stop"


def test_a_run_whose_final_state_is_gone_finishes_saying_it_is_not_saved() -> None:
    h = _finished_with_writer()
    assert not h.state.status(h.now).finished
    h.advance(EXPIRY + 1)  # both peers lost before the final checkpoint
    status = h.state.status(h.now)
    assert status.finished and status.final_state_saved is False


def test_only_the_writer_sets_the_checkpoint_error_from_a_result() -> None:
    h = _finished_with_writer()
    h.state.report(
        ProgressReport(
            peer_id="a", step=1, param_hash="h1", checkpoint=CheckpointResult(step=1, error="full")
        ),
        h.now,
    )
    assert h.state.checkpoint_error == "full"


def test_a_drained_writer_still_reports_the_upload_of_the_snapshot_it_took() -> None:
    h = _finished_with_writer()
    h.state.report(
        ProgressReport(peer_id="a", step=1, param_hash="h1", checkpoint=CheckpointResult(step=1)),
        h.now,
    )
    h.state.drain(DrainRequest(peers=["a"]), h.now)
    assert h.state.checkpoint_writer == "b"
    done = LastCheckpoint(step=1, uri="s3://b/unit/step-1", time=datetime.now(UTC))
    h.state.heartbeat(
        Heartbeat(peer_id="a", checkpoint_status=WriterReport(last_checkpoint=done)), h.now
    )
    assert h.state.last_checkpoint == done


def test_a_peer_that_restores_a_checkpoint_reports_it_with_its_certified_step() -> None:
    h = Harness(checkpoint={"endpoint": "minio:9000", "bucket": "b", "every_steps": 2})
    h.join("a")  # joined at step 0, then restored step 12 from storage
    restored = LastCheckpoint(step=12, uri="s3://b/unit/step-12", time=datetime.now(UTC))
    h.state.report(
        ProgressReport(
            peer_id="a",
            step=12,
            param_hash="h12",
            step_certificate=credentials.step_certificate(JOB_KEY, 12),
            checkpoint_status=WriterReport(last_checkpoint=restored),
        ),
        h.now,
    )
    assert h.state.step == 12 and h.state.last_checkpoint == restored


@pytest.mark.parametrize("first", ["a", "b"])
def test_a_tie_of_hashes_sends_nobody_to_resync(first: str) -> None:
    h = Harness()
    h.join("a")
    h.join("b")
    h.commit("ab")
    second = "b" if first == "a" else "a"
    actions = [
        h.report(first, 0, param_hash=f"{first}-hash").action,
        h.report(second, 0, param_hash=f"{second}-hash").action,
        h.report(first, 0, param_hash=f"{first}-hash").action,
    ]
    assert "resync" not in actions
    assert h.state.reference_hash(1) is None and not h.state.param_hashes_agree
    # A third peer's hash breaks the tie: the odd one out resyncs from the majority.
    h.join("c", step=1, param_hash=f"{second}-hash")
    instruction = h.report(first, 0, param_hash=f"{first}-hash")
    assert instruction.action == "resync"
    assert {s.peer_id for s in instruction.sync_from} == {second, "c"}


def test_excluded_ranks_count_only_where_every_vote_agrees(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h, round_id = three_peers_in_a_round()  # a 40, b 30, c 30 samples recorded
    for peer in "abc":
        h.ready(peer, round_id)
    with caplog.at_level(logging.WARNING):
        for peer, excluded in (("a", [2]), ("b", []), ("c", [])):  # a votes first
            h.state.vote(
                RoundVote(peer_id=peer, round_id=round_id, ok=True, excluded_ranks=excluded),
                h.now,
            )
    assert h.state.step == 1 and h.state.samples_committed == 100
    assert any("disagree on the excluded ranks" in m for m in caplog.messages)


def test_ranks_every_vote_excludes_are_not_counted() -> None:
    h, round_id = three_peers_in_a_round()
    for peer in "abc":
        h.ready(peer, round_id)
    for peer in "abc":
        h.state.vote(RoundVote(peer_id=peer, round_id=round_id, ok=True, excluded_ranks=[2]), h.now)
    assert h.state.step == 1 and h.state.samples_committed == 70


def test_credentials_that_are_not_ascii_get_401_and_422_not_500() -> None:
    a = credentials.peer_token(JOB_KEY, "a")
    join = {"peer_id": "a", "state_url": "http://a:1", "step": 5, "param_hash": "h5"}
    answers = _http(
        [
            ("GET", "/status", "admin.é", None),
            ("POST", "/peers/join", "peer:a.é", {"peer_id": "a", "state_url": "http://a:1"}),
            ("POST", "/peers/join", a, {**join, "step_certificate": "é"}),
        ]
    )
    assert [status for status, _ in answers] == [401, 401, 422]
    assert "step_certificate" in str(answers[2][1])


def test_a_member_that_hangs_while_heartbeating_is_left_out_until_it_reports() -> None:
    """Liveness by progress (issue 14): c's training thread hangs in formation while its
    heartbeat thread goes on. After one missed deadline the others form rounds without
    it; its next report brings it back."""
    h, round_id = three_peers_in_a_round()
    h.ready("a", round_id)
    h.ready("b", round_id)
    h.advance(10.1, keep_alive=("a", "b", "c"))  # past the deadline; c still heartbeats
    assert h.state.decisions[round_id].outcome == "abort"
    assert "c" in h.state.live_peers(h.now)
    h.now += 0.1
    h.report("a", 50)
    instruction = h.report("b", 50)
    assert instruction.round is not None and instruction.round.members == ["a", "b"]
    for peer in "ab":
        h.ready(peer, instruction.round.round_id)
        h.vote(peer, instruction.round.round_id)
    assert h.state.step == 1
    # c recovers: its report (at the old step) sends it to re-sync, then it is eligible.
    h.report("a", 0, param_hash="h1")
    h.report("b", 0, param_hash="h1")
    assert h.report("c", 0, step=0).action == "resync"
    h.report("c", 0, step=1, param_hash="h1")
    assert [r.peer_id for r in h.state.eligible(h.now)] == ["a", "b", "c"]


def test_rounds_that_keep_failing_in_the_exchange_find_and_bench_the_member() -> None:
    """c's data path to the others is broken (its HTTP to the coordinator works): every
    round with it fails in the exchange, on every rank. After two, rounds leave one
    member out at a time, the newest first; the round without c commits, and c is
    benched (a minute the first time), then tried again."""
    h = Harness()
    for peer in "abc":
        h.join(peer)

    def failing_round(members: str) -> None:
        h.advance(EXPIRY / 2, keep_alive=("a", "b", "c"))  # every member heard since
        instruction = None
        for peer in members:
            instruction = h.report(peer, 50)
        assert instruction is not None and instruction.round is not None
        assert instruction.round.members == list(members)
        for peer in members:
            h.ready(peer, instruction.round.round_id)
        for peer in members:
            h.vote(peer, instruction.round.round_id, ok=False)
        assert h.state.decisions[instruction.round.round_id].outcome == "abort"

    failing_round("abc")
    failing_round("abc")
    assert h.state.probe == "c"
    h.advance(EXPIRY / 2, keep_alive=("a", "b", "c"))
    h.commit("ab")
    assert h.state.step == 1
    benched = h.state.peers["c"]
    assert benched.times_benched == 1 and benched.benched_until >= h.now + 59
    assert [r.peer_id for r in h.state.eligible(h.now)] == ["a", "b"]
    h.advance(61, keep_alive=("a", "b", "c"))
    h.report("c", 0, step=1, param_hash="h1")
    assert "c" in [r.peer_id for r in h.state.eligible(h.now)]


def test_a_rewind_is_in_the_status_until_the_next_one() -> None:
    """The only peers holding step 2 die; a peer holding step 1 is left: training goes
    on from step 1, and /status says which step was lost (the operator, reading it every
    few seconds, could otherwise miss the step going back and forth)."""
    h = Harness()
    h.join("a")
    h.join("b")
    h.commit("ab")
    h.commit("ab")
    assert h.state.step == 2
    h.join("c", step=1, param_hash="h1")
    h.advance(EXPIRY / 2, keep_alive=("c",))
    h.report("c", 0, step=1, param_hash="h1")
    h.advance(EXPIRY / 2 + 0.5, keep_alive=("c",))  # a and b expire
    status = h.state.status(h.now)
    assert status.step == 1
    assert status.last_rewind is not None
    assert (status.last_rewind.lost, status.last_rewind.resumed) == (2, 1)


def test_rounds_whose_every_member_gets_stuck_in_the_exchange_also_start_the_search() -> None:
    """No member votes before the deadline (their collectives hang on the broken link):
    as when every vote fails, no one is to blame, so two such rounds start the search."""
    h = Harness()
    for peer in "abc":
        h.join(peer)
    for _ in range(2):
        h.advance(EXPIRY / 2, keep_alive=("a", "b", "c"))
        instruction = None
        for peer in "abc":  # the target batch needs all three
            instruction = h.report(peer, 34)
        assert instruction is not None and instruction.round is not None
        assert instruction.round.members == ["a", "b", "c"]
        for peer in "abc":
            h.ready(peer, instruction.round.round_id)
        h.advance(h.state.deadline.seconds + 0.1, keep_alive=("a", "b", "c"))
        assert h.state.decisions[instruction.round.round_id].outcome == "abort"
    assert h.state.probe == "c"


def test_a_step_is_durable_once_two_peers_hold_it_and_a_rewind_says_what_was_at_risk() -> None:
    """A step one peer holds is lost with that peer; one two peers reported holding is
    not. The status says which steps are durable, and a rewind whether it lost only
    steps above that (what a single peer's loss always risks) or more."""
    h = Harness()
    h.join("a")
    h.join("b")
    h.commit("ab")
    assert h.state.status(h.now).durable_step == 0  # nobody reported holding step 1 yet
    h.report("a", 0, step=1, param_hash="h1")
    assert h.state.status(h.now).durable_step == 0
    h.report("b", 0, step=1, param_hash="h1")
    assert h.state.status(h.now).durable_step == 1
    h.state.leave(LeaveRequest(peer_id="b", reason="done"), h.now)
    h.commit("a", samples=100)  # a trains alone: step 2 is held by a only
    h.report("a", 0, step=2, param_hash="h2")
    assert (h.state.step, h.state.status(h.now).durable_step) == (2, 1)
    h.join("c", step=1, param_hash="h1")
    h.advance(EXPIRY / 2, keep_alive=("c",))
    h.report("c", 0, step=1, param_hash="h1")
    h.advance(EXPIRY / 2 + 0.5, keep_alive=("c",))  # a expires
    status = h.state.status(h.now)
    assert status.last_rewind == Rewind(lost=2, resumed=1, durable=1)
    assert status.durable_step == 1


def test_training_waits_a_while_for_the_holders_of_a_durable_step_to_come_back() -> None:
    """a and b hold step 2 (durable) and go silent together (a partition); c holds step
    1. Training waits for them instead of redoing step 2 at once; one is back in time.
    Had none come back, training would go on from step 1 after durable_step_wait_s."""
    h = Harness()
    wait = h.state.timing.durable_step_wait_s
    h.join("a")
    h.join("b")
    h.commit("ab")
    h.commit("ab")
    h.report("a", 0, step=2, param_hash="h2")
    h.report("b", 0, step=2, param_hash="h2")
    assert h.state.durable_step == 2
    h.join("c", step=1, param_hash="h1")
    h.report("c", 0, step=1, param_hash="h1")
    h.advance(EXPIRY + 1, keep_alive=("c",))  # a and b expire
    h.advance(wait - 1, keep_alive=("c",))
    assert (h.state.step, h.state.last_rewind) == (2, None)
    h.join("a", step=2, param_hash="h2")  # the partition healed
    h.report("a", 0, step=2, param_hash="h2")
    h.advance(wait, keep_alive=("a", "c"))
    assert (h.state.step, h.state.last_rewind) == (2, None)
    # Now a is lost for good, and nobody else holds step 2.
    h.advance(EXPIRY + 1, keep_alive=("c",))
    h.advance(wait, keep_alive=("c",))
    assert h.state.step == 1
    assert h.state.last_rewind == Rewind(lost=2, resumed=1, durable=2)


def test_a_newcomer_that_catches_up_while_a_round_is_in_flight_is_waited_for() -> None:
    """Seen on loopback, where two peers commit a step every ~25 ms: the newcomer loads the
    step of the round in flight, that round commits, and unless the next round waits for it,
    it is one step behind at every report and never takes part."""
    h, round_id = three_peers_in_a_round()
    h.join("d")
    assert h.report("d", 0).action == "wait"  # it holds the step, but the round is not its
    for peer in ("a", "b", "c"):
        h.ready(peer, round_id)
        h.vote(peer, round_id)
    assert h.state.step == 1
    for peer in ("a", "b"):
        h.report(peer, 50, param_hash="h1")
    assert h.state.round is None or h.state.round.outcome is not None  # waiting for d
    assert h.report("d", 0, step=0).action == "resync"
    h.report("d", 0, param_hash="h1")
    assert h.report("c", 50, param_hash="h1").round is not None
    assert h.state.round is not None and "d" in h.state.round.members


def test_local_update_rounds_hold_inner_steps_of_target_batches_and_count_per_step_bytes() -> None:
    """With local updates a round forms at inner_steps x target batch samples, a member's
    weight is capped there, and the bytes against per-step fp32 count every target batch
    of the round (and come back with the step's certificate)."""
    h = Harness(local_updates={"inner_steps": 4})
    h.join("a")
    h.join("b")
    assert h.report("a", 100).action == "train"
    instruction = h.report("b", 250)
    # 50 samples short of the round: 25 from each peer.
    assert instruction.action == "train" and instruction.samples_needed == 25
    instruction = h.report("b", 10**9)
    assert instruction.round is not None
    round_id = instruction.round.round_id
    weights = [h.state.ready(RoundReady(peer_id=p, round_id=round_id), h.now) for p in "ab"]
    assert weights[-1].weights == [100, 400]
    for peer in "ab":
        h.state.vote(
            RoundVote(
                peer_id=peer, round_id=round_id, ok=True, bytes_sent=100,
                bytes_fp32_equivalent=1000,
            ),
            h.now,
        )  # fmt: skip
    status = h.state.status(h.now)
    assert status.step == 1 and status.samples_committed == 500 and status.inner_steps == 4
    # Per-step fp32 averaging would have exchanged 2000 bytes for each 100 samples.
    assert status.bytes_per_step_fp32 == 2000 * 5 and status.bytes_sent == 200
    certificate = h.report("a", 0, param_hash="h1").step_certificate
    progress = credentials.certified_progress(JOB_KEY, 1, certificate)
    assert progress is not None and progress["bytes_step_fp32"] == 10000
