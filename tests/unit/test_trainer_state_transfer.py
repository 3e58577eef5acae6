"""The state a newcomer fetches: chunked raw tensors over real HTTP servers on loopback,
several sources at once, a source that breaks off, lies, trickles or moves on."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
import torch
from torch import nn

from collabtrain_trainer import credentials
from collabtrain_trainer.peer.model_state import param_hash
from collabtrain_trainer.peer.state_server import StateServer, StateTransferError, fetch_state
from collabtrain_trainer.protocol import TOKEN_HEADER, StateSource
from collabtrain_trainer.state_snapshot import (
    StateLayout,
    StateSnapshot,
    apply_snapshot,
    take_snapshot,
)

JOB_KEY = "unit-job-key"
SMALL_CHUNKS = 4096  # the smallest a manifest may name: many chunks, tensors split across them


def trained(seed: int, **optimizer_args: Any) -> tuple[nn.Sequential, torch.optim.Optimizer]:
    """A model of a few tensors (one spanning several chunks) after one AdamW step."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(40, 50), nn.LayerNorm(50), nn.Linear(50, 3))
    optimizer = torch.optim.AdamW(model.parameters(), **{"lr": 1e-3, **optimizer_args})
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    optimizer.step()
    return model, optimizer


def fresh() -> tuple[nn.Sequential, torch.optim.Optimizer]:
    torch.manual_seed(99)
    model = nn.Sequential(nn.Linear(40, 50), nn.LayerNorm(50), nn.Linear(50, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


class Sources:
    """Real state servers, each serving a snapshot (or what a test makes of one)."""

    def __init__(self) -> None:
        self.servers: list[StateServer] = []

    def add(self, snapshot: StateSnapshot, name: str | None = None) -> StateSource:
        peer_id = name or f"source-{len(self.servers)}"
        token = credentials.peer_token(JOB_KEY, peer_id)
        server = StateServer("127.0.0.1", 0, token, lambda: snapshot)
        server.start()
        self.servers.append(server)
        return StateSource(
            peer_id=peer_id,
            state_url=f"http://127.0.0.1:{server.port}",
            ticket=credentials.state_ticket(token, int(time.time()) + 60),
        )


@pytest.fixture
def sources() -> Iterator[Sources]:
    made = Sources()
    yield made
    for server in made.servers:
        server.stop()


def test_a_state_split_over_many_chunks_arrives_whole_from_two_sources(
    sources: Sources,
) -> None:
    model, optimizer = trained(0)
    snapshot = take_snapshot(model, optimizer, 7, param_hash(model), chunk_bytes=SMALL_CHUNKS)
    assert snapshot.manifest.chunks > 4
    both = [sources.add(snapshot), sources.add(snapshot)]
    target, target_optimizer = fresh()
    own = {k: v for k, v in target_optimizer.param_groups[0].items() if k != "params"}

    received, served_by = fetch_state(
        both, 7, param_hash(model), StateLayout.of(target, target_optimizer)
    )
    assert sorted(served_by) == ["source-0", "source-1"]  # each served a share
    apply_snapshot(received, target, target_optimizer)

    assert param_hash(target) == param_hash(model)
    mine, theirs = target_optimizer.state_dict()["state"], optimizer.state_dict()["state"]
    assert mine.keys() == theirs.keys()
    for index, state in theirs.items():
        for key, value in state.items():
            assert torch.equal(mine[index][key], value), (index, key)
    # The source's per-parameter state is taken; the hyperparameters stay this peer's.
    assert {k: v for k, v in target_optimizer.param_groups[0].items() if k != "params"} == own


def test_a_source_of_another_model_or_too_large_a_state_is_refused_before_any_chunk(
    sources: Sources,
) -> None:
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(40, 51), nn.LayerNorm(51), nn.Linear(51, 3))
    other_optimizer = torch.optim.AdamW(other.parameters())
    source = sources.add(take_snapshot(other, other_optimizer, 3, param_hash(other)))
    target, target_optimizer = fresh()
    layout = StateLayout.of(target, target_optimizer)
    with pytest.raises(StateTransferError, match=r"does not fit this model: .*0\.weight"):
        fetch_state([source], 3, param_hash(other), layout)

    # Moments typed unlike their parameter would break this peer's next optimizer step.
    model, optimizer = trained(0)
    first = next(model.parameters())
    optimizer.state[first]["exp_avg"] = optimizer.state[first]["exp_avg"].double()
    source = sources.add(take_snapshot(model, optimizer, 3, param_hash(model)))
    with pytest.raises(StateTransferError, match="optimizer/0/exp_avg is float64"):
        fetch_state([source], 3, param_hash(model), layout)

    model, optimizer = trained(0)
    source = sources.add(take_snapshot(model, optimizer, 3, param_hash(model)))
    tight = StateLayout(layout.model, layout.params, max_bytes=1000, max_tensors=100)
    with pytest.raises(StateTransferError, match="more than the 1000 this model's state"):
        fetch_state([source], 3, param_hash(model), tight)


def test_a_source_that_breaks_off_hands_its_chunks_to_the_other(
    sources: Sources, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model, optimizer = trained(0)
    snapshot = take_snapshot(model, optimizer, 7, param_hash(model), chunk_bytes=SMALL_CHUNKS)
    broken = sources.add(snapshot, "broken")
    healthy = sources.add(snapshot, "healthy")
    real_serve = StateServer._serve_chunk
    broken_port = sources.servers[0].port

    def serve_chunk(self: StateServer, handler: Any, served: StateSnapshot, index: int) -> None:
        if self.port != broken_port or index < 2:
            real_serve(self, handler, served, index)
            return
        # Headers promising the whole chunk, half of it, then the connection drops.
        handler.send_response(200)
        handler.send_header("Content-Length", str(SMALL_CHUNKS))
        handler.end_headers()
        handler.wfile.write(bytes(SMALL_CHUNKS // 2))
        handler.close_connection = True

    monkeypatch.setattr(StateServer, "_serve_chunk", serve_chunk)
    target, target_optimizer = fresh()
    received, served_by = fetch_state(
        [broken, healthy], 7, param_hash(model), StateLayout.of(target, target_optimizer)
    )
    apply_snapshot(received, target, target_optimizer)
    assert param_hash(target) == param_hash(model)
    assert served_by == ["healthy"]
    assert "state from broken unusable" in caplog.text
    assert "broke off after" in caplog.text


def test_a_corrupt_chunk_or_a_false_hash_is_caught(
    sources: Sources, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer = trained(0)
    agreed = param_hash(model)
    snapshot = take_snapshot(model, optimizer, 7, agreed, chunk_bytes=SMALL_CHUNKS)
    flipped = [t.clone() for t in snapshot.tensors]
    flipped[0].view(-1)[5] += 1.0  # bytes that do not match the manifest's digest
    source = sources.add(StateSnapshot(snapshot.manifest, flipped))
    target, target_optimizer = fresh()
    layout = StateLayout.of(target, target_optimizer)
    with pytest.raises(StateTransferError, match="chunk 0 is corrupt"):
        fetch_state([source], 7, agreed, layout)

    # A source whose manifest and chunks agree, but whose parameters are not the agreed
    # ones although it claims their hash.
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    lie = sources.add(take_snapshot(model, optimizer, 7, agreed))
    with pytest.raises(StateTransferError, match=f"expected {agreed}"):
        fetch_state([lie], 7, agreed, layout)


def test_a_source_keeps_the_last_two_snapshots_it_described(sources: Sources) -> None:
    model, optimizer = trained(0)
    snapshots = []
    for step in (1, 2, 3):
        with torch.no_grad():
            next(model.parameters()).add_(1.0)  # each step's bytes differ
        snapshots.append(take_snapshot(model, optimizer, step, param_hash(model)))
    current = iter(snapshots)
    token = credentials.peer_token(JOB_KEY, "a")
    server = StateServer("127.0.0.1", 0, token, lambda: next(current))
    server.start()
    sources.servers.append(server)
    ticket = credentials.state_ticket(token, int(time.time()) + 60)
    headers = {TOKEN_HEADER: f"Bearer {ticket}"}
    url = f"http://127.0.0.1:{server.port}/state"
    for _ in snapshots:
        assert requests.get(url, headers=headers, timeout=5).status_code == 200
    answers = [
        requests.get(
            f"{url}/chunks/{s.manifest.snapshot_id}/0", headers=headers, timeout=5
        ).status_code
        for s in snapshots
    ]
    assert answers == [410, 200, 200]
    assert requests.get(f"{url}/chunks/{snapshots[2].manifest.snapshot_id}/0").status_code == 401

    # A copy of the state is not held once nobody reads it: the one read last stays
    # while it is read, then goes too.
    ids = [s.manifest.snapshot_id for s in snapshots]
    time.sleep(0.3)
    assert requests.get(f"{url}/chunks/{ids[2]}/0", headers=headers, timeout=5).status_code == 200
    assert server.forget_idle(0.2) == [ids[1]]
    answers = [
        requests.get(f"{url}/chunks/{i}/0", headers=headers, timeout=5).status_code for i in ids
    ]
    assert answers == [410, 410, 200]
    time.sleep(0.3)
    assert server.forget_idle(0.2) == [ids[2]]


@pytest.fixture
def trickling_source() -> Iterator[StateSource]:
    """A source with a real manifest whose chunks come a byte every 50 ms."""
    model, optimizer = trained(0)
    manifest = take_snapshot(model, optimizer, 1, param_hash(model)).manifest

    class Trickle(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            body = manifest.model_dump_json().encode() if self.path == "/state" else b""
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) or manifest.total_bytes))
            self.end_headers()
            try:
                self.wfile.write(body)
                for _ in range(0 if body else 1000):
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
        yield StateSource(
            peer_id="trickle", state_url=f"http://127.0.0.1:{httpd.server_address[1]}", ticket="t"
        )
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_source_that_trickles_is_given_up_at_the_deadline(trickling_source: StateSource) -> None:
    model, _ = trained(0)
    target, target_optimizer = fresh()
    started = time.monotonic()
    with pytest.raises(StateTransferError, match="not received within the deadline"):
        fetch_state(
            [trickling_source],
            1,
            param_hash(model),
            StateLayout.of(target, target_optimizer),
            timeout_s=5.0,
            deadline_s=0.5,
        )
    assert time.monotonic() - started < 3.0  # the whole body would take minutes
