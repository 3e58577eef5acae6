"""Trust boundaries of a running job (issue 13), against real coordinator and peer
processes: a peer speaks only for itself, forged and malformed numbers are refused while
training goes on, the rendezvous store keeps intruders out of the members' keys, nothing
secret is on an unauthenticated endpoint, and state comes only from a vouched-for source
with the agreed hash."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import requests
import torch

from collabtrain_trainer import credentials
from collabtrain_trainer.local import LocalCluster
from collabtrain_trainer.peer.model_state import param_hash
from collabtrain_trainer.peer.runtime import Peer
from collabtrain_trainer.peer.state_server import StateServer, StateTransferError, fetch_state
from collabtrain_trainer.protocol import TOKEN_HEADER, CoordinatorStatus, StateSource
from collabtrain_trainer.state_snapshot import StateLayout, take_snapshot
from tests.integration.trainer_fixtures import (
    ClusterFactory,
    assert_each_step_committed_once,
    assert_hashes_agree,
    fast_config,
    make_cluster,
    trainer_fork_server,
    wait_for_step,
)

__all__ = ["make_cluster", "trainer_fork_server"]

pytestmark = pytest.mark.integration


def _post(cluster: LocalCluster, path: str, token: str, body: object) -> requests.Response:
    # `data=` with json.dumps lets NaN and Infinity through as JSON literals, as a hostile
    # client would send them (requests' `json=` refuses them itself).
    return requests.post(
        cluster.config.coordinator_url + path,
        data=json.dumps(body),
        headers={TOKEN_HEADER: f"Bearer {token}", "Content-Type": "application/json"},
        timeout=5,
    )


def _state_url(cluster: LocalCluster, peer_id: str) -> str:
    match = re.search(r"serving state and /metrics on (http://[\d.:]+)", cluster.log_text(peer_id))
    assert match, f"{peer_id} did not log its state URL"
    return match[1]


@pytest.mark.timeout(90, func_only=True)
def test_a_peer_can_neither_forge_progress_nor_speak_for_others(
    make_cluster: ClusterFactory,
) -> None:
    cluster = make_cluster(max_steps=60)
    honest, dishonest = cluster.start_peer(), cluster.start_peer()
    before = wait_for_step(cluster, 3, timeout=60)
    token = credentials.peer_token(cluster.job_key, dishonest)
    report = {"peer_id": dishonest, "step": before.step, "param_hash": "x", "samples": 8}
    vote = {"peer_id": dishonest, "round_id": 1, "ok": True}
    refused = {
        "forged step": ("/peers/report", {**report, "step": 10**9}, "step"),
        "Infinity rate": (
            "/peers/report",
            {**report, "samples_per_second": float("inf")},
            "samples_per_second",
        ),
        "NaN loss": ("/peers/report", {**report, "loss": float("nan")}, "loss"),
        "negative rank": ("/rounds/vote", {**vote, "excluded_ranks": [-100]}, "excluded_ranks"),
        "Infinity total": ("/rounds/vote", {**vote, "total_weight": float("inf")}, "total_weight"),
        "uncertified step": (
            "/peers/join",
            {"peer_id": dishonest, "state_url": "http://x:1", "step": 10**9, "param_hash": "x"},
            "step_certificate",
        ),
    }
    for what, (path, body, field) in refused.items():
        response = _post(cluster, path, token, body)
        assert response.status_code == 422 and field in response.text, (what, response.text)
    # Its token is its own: not another peer's, not the operator's.
    assert _post(cluster, "/peers/leave", token, {"peer_id": honest}).status_code == 403
    assert _post(cluster, "/peers/heartbeat", token, {"peer_id": honest}).status_code == 403
    assert _post(cluster, "/drain", token, {"peers": [honest]}).status_code == 403
    assert _post(cluster, "/checkpoint", token, {}).status_code == 403
    assert (
        requests.get(
            cluster.config.coordinator_url + "/status",
            headers={TOKEN_HEADER: f"Bearer {token}"},
            timeout=5,
        ).status_code
        == 403
    )

    # The coordinator is up, its /status parses in the model the operator reads, and
    # training goes on with both peers (the honest one was neither removed nor drained).
    after = wait_for_step(cluster, before.step + 5, timeout=60)
    assert isinstance(after, CoordinatorStatus)
    assert not after.finished and after.step < cluster.config.max_steps
    assert sorted(after.peers) == sorted([honest, dishonest]) and not after.draining
    assert cluster.coordinator is not None and cluster.coordinator.poll() is None
    assert_each_step_committed_once(cluster)
    assert_hashes_agree(cluster)


@pytest.mark.timeout(90, func_only=True)
def test_the_rendezvous_store_serves_only_the_epochs_members(
    make_cluster: ClusterFactory,
) -> None:
    cluster = make_cluster(max_steps=60)
    peers = [cluster.start_peer(), cluster.start_peer()]
    before = cluster.wait_for(lambda s: len(s.peers) == 2 and s.step >= 2, 60, "two peers")

    # What anyone in the cluster can read: /metrics, without a token.
    metrics = requests.get(cluster.config.coordinator_url + "/metrics", timeout=5).text
    assert "collabtrain_step" in metrics
    secrets_of_the_job = [
        cluster.job_key,
        credentials.admin_token(cluster.job_key).split(".")[1],
        *(credentials.peer_token(cluster.job_key, p).split(".")[1] for p in peers),
    ]
    assert not any(secret in metrics for secret in secrets_of_the_job)

    prefix = f"collabtrain/{before.instance}/epoch{before.membership_epoch}/"
    read = {"op": "get", "keys": [prefix + "0"]}
    write = {"op": "set", "keys": [prefix + "0"], "value": "Zm9yZ2Vk"}
    # Without a token; with the token of a peer that is not a member; a member's token on
    # a key outside its epoch: all refused, while training goes on.
    outsider = credentials.peer_token(cluster.job_key, "not-a-member")
    member = credentials.peer_token(cluster.job_key, peers[0])
    attempts = [
        ("wrong-token", {"peer_id": peers[0], **write}, 401),
        (outsider, {"peer_id": "not-a-member", **read}, 403),
        (outsider, {"peer_id": "not-a-member", **write}, 403),
        (member, {"peer_id": peers[1], **write}, 403),  # speaking for another member
        (member, {"peer_id": peers[0], "op": "set", "keys": ["collabtrain/x"], "value": ""}, 403),
    ]
    flood_until = time.monotonic() + 3
    while time.monotonic() < flood_until:
        for token, body, status in attempts:
            assert _post(cluster, "/rendezvous", token, body).status_code == status, body
    after = wait_for_step(cluster, before.step + 5, timeout=60)
    assert after.rounds_aborted == before.rounds_aborted
    assert_each_step_committed_once(cluster)
    assert_hashes_agree(cluster)


@pytest.mark.timeout(90, func_only=True)
def test_state_is_served_only_with_a_ticket_for_that_peer_and_within_a_size_bound(
    make_cluster: ClusterFactory,
) -> None:
    # The source must still serve when the checks below run (the fixture stops the job).
    cluster = make_cluster(max_steps=100_000)
    source, other = cluster.start_peer(), cluster.start_peer()
    cluster.wait_for(lambda s: len(s.peers) == 2 and s.step >= 2, 60, "both peers training")
    url = _state_url(cluster, source)
    expires = int(time.time()) + 60

    assert requests.get(url + "/state", timeout=5).status_code == 401
    # The other peer's own token, and a ticket minted for the other peer, open nothing here.
    other_token = credentials.peer_token(cluster.job_key, other)
    for wrong in (other_token, credentials.state_ticket(other_token, expires)):
        response = requests.get(
            url + "/state", headers={TOKEN_HEADER: f"Bearer {wrong}"}, timeout=5
        )
        assert response.status_code == 401
    expired = credentials.state_ticket(
        credentials.peer_token(cluster.job_key, source), int(time.time()) - 1
    )
    assert requests.get(url + "/state", headers=_bearer(expired), timeout=5).status_code == 401
    ticket = credentials.state_ticket(credentials.peer_token(cluster.job_key, source), expires)
    manifest = requests.get(url + "/state", headers=_bearer(ticket), timeout=5).json()
    assert manifest["step"] >= 2
    newcomer = Peer(fast_config(coordinator_url="http://127.0.0.1:9"), "n", "unused")
    try:
        layout = newcomer.state_layout
        with pytest.raises(StateTransferError, match="HTTP 401"):
            fetch_state(
                [StateSource(peer_id=source, state_url=url, ticket=expired)],
                manifest["step"],
                manifest["param_hash"],
                layout,
            )
        tight = StateLayout(layout.model, layout.params, max_bytes=1000, max_tensors=100)
        with pytest.raises(StateTransferError, match="more than the 1000"):
            fetch_state(
                [StateSource(peer_id=source, state_url=url, ticket=ticket)],
                manifest["step"],
                manifest["param_hash"],
                tight,
            )
    finally:
        newcomer.server.stop()


def _bearer(ticket: str) -> dict[str, str]:
    return {TOKEN_HEADER: f"Bearer {ticket}"}


def test_a_newcomer_keeps_its_state_when_a_source_serves_another_one(tmp_path: Path) -> None:
    """A source that lies about its hash (or serves junk) is refused, and the newcomer's
    own state is left exactly as it was."""
    job_key = "k"
    config = fast_config(coordinator_url="http://127.0.0.1:9")  # never called here
    newcomer = Peer(config, "newcomer", credentials.peer_token(job_key, "newcomer"))
    liar_token = credentials.peer_token(job_key, "liar")

    tampered = Peer(config, "tampered", credentials.peer_token(job_key, "tampered"))
    with torch.no_grad():
        for parameter in tampered.training.model.parameters():
            parameter.add_(1.0)
    # Parameters that are not the agreed ones under the agreed hash, and another model.
    lie = take_snapshot(tampered.training.model, tampered.training.optimizer, 5, newcomer.seed_hash)
    other = fast_config(coordinator_url="http://127.0.0.1:9", task_args={"hidden": "48"})
    stranger = Peer(other, "stranger", credentials.peer_token(job_key, "stranger"))
    junk = take_snapshot(
        stranger.training.model, stranger.training.optimizer, 5, newcomer.seed_hash
    )
    stranger.server.stop()
    servers = [
        StateServer("127.0.0.1", 0, liar_token, lambda snapshot=snapshot: snapshot)
        for snapshot in (lie, junk)
    ]
    tampered.server.stop()
    for server in servers:
        server.start()
    try:
        before = {k: v.clone() for k, v in newcomer.training.model.state_dict().items()}
        agreed = "0123456789abcdef"  # what the coordinator says step 5 hashes to
        sources = [
            StateSource(
                peer_id="liar",
                state_url=f"http://127.0.0.1:{server.port}",
                ticket=credentials.state_ticket(liar_token, int(time.time()) + 60),
            )
            for server in servers
        ]
        assert not newcomer._sync_from(sources, 5, agreed)
        assert newcomer.step == 0 and newcomer.hash == newcomer.seed_hash
        assert param_hash(newcomer.training.model) == newcomer.seed_hash
        after = newcomer.training.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    finally:
        for server in servers:
            server.stop()
        newcomer.server.stop()
