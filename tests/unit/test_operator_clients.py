"""The operator's HTTP clients against real loopback servers, and its settings."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import kopf
import pytest
from aiohttp import web

from collabtrain_operator import coordinator_client, kube, main, settings
from collabtrain_operator.coordinator_client import CoordinatorClient
from collabtrain_trainer.protocol import (
    CheckpointRequest,
    CheckpointResponse,
    CoordinatorStatus,
    DrainRequest,
    DrainResponse,
)

TOKEN = "t0ken"


def fake_coordinator(received: list[tuple[str, Any]]) -> web.Application:
    """A coordinator that speaks the contract: bearer token, protocol models."""

    def authorized(request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {TOKEN}"

    async def status(request: web.Request) -> web.Response:
        if not authorized(request):
            return web.Response(status=401)
        body = CoordinatorStatus(job="demo", max_steps=10, target_batch_size=64, step=3)
        return web.json_response(body.model_dump(mode="json"))

    async def drain(request: web.Request) -> web.Response:
        if not authorized(request):
            return web.Response(status=401)
        parsed = DrainRequest.model_validate(await request.json())
        received.append(("drain", parsed))
        return web.json_response(DrainResponse(draining=parsed.peers).model_dump(mode="json"))

    async def checkpoint(request: web.Request) -> web.Response:
        parsed = CheckpointRequest.model_validate(await request.json())
        received.append(("checkpoint", parsed))
        answer = CheckpointResponse(accepted=True, writer="demo-peer-0-0", step=3)
        return web.json_response(answer.model_dump(mode="json"))

    app = web.Application()
    app.router.add_get("/status", status)
    app.router.add_post("/drain", drain)
    app.router.add_post("/checkpoint", checkpoint)
    return app


def with_server(
    app: web.Application, body: Callable[[str, CoordinatorClient], Awaitable[None]]
) -> None:
    async def run() -> None:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            async with aiohttp.ClientSession() as session:
                await body(f"http://127.0.0.1:{port}", CoordinatorClient(session))
        finally:
            await runner.cleanup()

    asyncio.run(run())


def test_status_drain_and_checkpoint_use_the_contract() -> None:
    received: list[tuple[str, Any]] = []

    async def body(url: str, client: CoordinatorClient) -> None:
        status = await client.status(url, TOKEN)
        assert status is not None and status.step == 3
        answer = await client.drain(url, TOKEN, DrainRequest(peers=["demo-peer-1-0"]))
        assert answer is not None and answer.draining == ["demo-peer-1-0"]
        reply = await client.checkpoint(url, TOKEN, CheckpointRequest(reason="suspend"))
        assert reply is not None and reply.accepted

    with_server(fake_coordinator(received), body)
    assert [kind for kind, _ in received] == ["drain", "checkpoint"]


def test_wrong_token_and_unreachable_coordinator_give_none() -> None:
    async def body(url: str, client: CoordinatorClient) -> None:
        assert await client.status(url, "wrong") is None
        assert await client.status("http://127.0.0.1:9", TOKEN) is None

    with_server(fake_coordinator([]), body)


def test_malformed_answers_give_none() -> None:
    app = web.Application()

    async def garbage(request: web.Request) -> web.Response:
        return web.json_response({"step": "many"})

    app.router.add_get("/status", garbage)

    async def body(url: str, client: CoordinatorClient) -> None:
        assert await client.status(url, TOKEN) is None

    with_server(app, body)


def test_options_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLLABTRAIN_METRICS_PORT", "off")
    monkeypatch.setenv("COLLABTRAIN_COORDINATOR_URL_TEMPLATE", "http://127.0.0.1:1234/{job}")
    options = settings.OperatorOptions.from_env()
    assert options.metrics_port is None
    assert options.coordinator_url("demo", "ns") == "http://127.0.0.1:1234/demo"
    assert settings.OperatorOptions().coordinator_url("demo", "ns") == (
        "http://demo-coordinator.ns.svc:7000"
    )


def test_command_line() -> None:
    arguments = main.parse_args(["-n", "team-a", "--standalone", "--metrics-port", "9100"])
    assert arguments.namespace == ["team-a"]
    assert arguments.standalone and arguments.metrics_port == 9100


@pytest.mark.parametrize(
    ("path", "resource"),
    [
        ("/api/v1/namespaces/a/pods", "pods"),
        ("/api/v1/namespaces/a/pods/p", "pods"),
        (
            "/apis/collabtrain.io/v1alpha1/namespaces/a/collaborativetrainingjobs/j/status",
            "collaborativetrainingjobs/status",
        ),
    ],
)
def test_resource_of(path: str, resource: str) -> None:
    assert kube.resource_of(path) == resource


def test_kube_errors_say_what_kind_of_problem() -> None:
    assert kube.KubeError(409, "Conflict", "x").conflict
    assert kube.KubeError(422, "Invalid", "x").invalid
    assert not kube.KubeError(500, "InternalError", "x").invalid


def test_kube_client_sends_status_patches_with_a_precondition() -> None:
    seen: list[dict[str, Any]] = []
    app = web.Application()

    async def patch(request: web.Request) -> web.Response:
        seen.append(
            {
                "path": request.path,
                "type": request.headers["Content-Type"],
                "body": json.loads(await request.text()),
            }
        )
        return web.json_response({"metadata": {"resourceVersion": "8"}})

    app.router.add_route("PATCH", "/{tail:.*}", patch)

    async def body(url: str, _: CoordinatorClient) -> None:
        client = kube.KubeClient(lambda: kopf.ConnectionInfo(server=url))
        try:
            written = await client.patch_job_status("ns", "demo", "7", {"phase": "Running"})
            assert written == {"metadata": {"resourceVersion": "8"}}
        finally:
            await client.close()

    with_server(app, body)
    assert seen == [
        {
            "path": "/apis/collabtrain.io/v1alpha1/namespaces/ns"
            "/collaborativetrainingjobs/demo/status",
            "type": "application/merge-patch+json",
            "body": {"metadata": {"resourceVersion": "7"}, "status": {"phase": "Running"}},
        }
    ]


def test_the_operator_imports_no_torch() -> None:
    probe = (
        "import sys, collabtrain_operator.main, collabtrain_operator.handlers; "
        "assert 'torch' not in sys.modules, 'the operator imported torch'"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=120)


def test_the_operator_command_registers_the_handlers() -> None:
    """`collabtrain-operator` (main) must import the handlers: kopf would otherwise run
    with none, logging in with its own default and doing nothing."""
    probe = (
        "import kopf, collabtrain_operator.main; "
        "names = [h.id for h in kopf.get_default_registry()._activities.get_all_handlers()]; "
        "assert any('configure' in n for n in names), names"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=120)


# ------------------------------------------------------------- a coordinator gone bad


def serving(text: str, status: int = 200) -> web.Application:
    app = web.Application()

    async def answer(request: web.Request) -> web.Response:
        return web.Response(text=text, status=status, content_type="application/json")

    app.router.add_get("/status", answer)
    return app


GOOD = '{"job": "demo", "max_steps": 10, "target_batch_size": 64, "step": 3'


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (GOOD + ', "samples_per_second": null}', "samples_per_second"),
        (GOOD + ', "samples_per_second": Infinity}', "Infinity"),
        (GOOD + ', "loss": NaN}', "NaN"),
        (GOOD + ', "loss": 1e999}', "1e999"),
        (GOOD + ', "peers": "everyone"}', "peers"),
        (GOOD, "JSONDecodeError"),  # cut off
        ('{"job": "demo"}', "max_steps"),
    ],
)
def test_unusable_status_is_no_status_and_one_log_line_without_the_token(
    text: str, named: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A coordinator whose /status does not parse (a non-finite number, a wrong type)
    must not wedge the operator: the status is unknown, reconciliation goes on."""
    secret = "admin.0123456789abcdef"

    async def body(url: str, client: CoordinatorClient) -> None:
        with caplog.at_level(logging.DEBUG, logger="collabtrain_operator.coordinator_client"):
            assert await client.status(url, secret) is None

    with_server(serving(text), body)
    lines = [r.getMessage() for r in caplog.records if r.name.endswith("coordinator_client")]
    assert len(lines) == 1, lines
    assert named in lines[0] and "/status" in lines[0]
    assert caplog.records[-1].levelno == logging.WARNING
    assert secret not in caplog.text and "0123456789abcdef" not in caplog.text


def test_a_good_status_after_a_bad_one_is_read() -> None:
    answers = [GOOD + ', "samples_per_second": null}', GOOD + "}"]
    app = web.Application()

    async def answer(request: web.Request) -> web.Response:
        return web.Response(text=answers.pop(0), content_type="application/json")

    app.router.add_get("/status", answer)

    async def body(url: str, client: CoordinatorClient) -> None:
        assert await client.status(url, TOKEN) is None
        status = await client.status(url, TOKEN)
        assert status is not None and status.step == 3

    with_server(app, body)


def streaming(text: str, *, pieces: int, content_length: bool = False) -> web.Application:
    """/status that sends `text` in `pieces` writes, each flushed and followed by a pause,
    so the client sees it arrive in parts (chunked, unless `content_length`)."""
    data = text.encode()

    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if content_length:
            response.content_length = len(data)
        await response.prepare(request)
        size = -(-len(data) // pieces)
        for start in range(0, len(data), size):
            await response.write(data[start : start + size])
            await asyncio.sleep(0.02)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/status", answer)
    return app


def large_status(peers: int) -> str:
    body = CoordinatorStatus(
        job="demo",
        max_steps=10,
        target_batch_size=64,
        step=3,
        peers=[f"demo-peer-{slot}-{slot % 7}" for slot in range(peers)],
    )
    return body.model_dump_json()


@pytest.mark.parametrize("content_length", [False, True])
def test_a_large_status_sent_in_pieces_is_read_to_its_end(content_length: bool) -> None:
    """A status of a big job (here 123 KB) arrives in several TCP reads: the client must
    read to the end of the body, not take what is buffered after the first read."""
    text = large_status(6000)
    assert 100_000 < len(text) < 4 * 1024 * 1024

    async def body(url: str, client: CoordinatorClient) -> None:
        status = await client.status(url, TOKEN)
        assert status is not None, "a complete, valid status was taken as unusable"
        assert len(status.peers) == 6000

    with_server(streaming(text, pieces=8, content_length=content_length), body)


@pytest.mark.parametrize("content_length", [False, True])
def test_a_status_over_the_size_cap_is_refused(
    content_length: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Past the cap the answer is unusable, whether its length is declared or not."""
    monkeypatch.setattr(coordinator_client, "MAX_RESPONSE_BYTES", 50_000)
    text = large_status(6000)

    async def body(url: str, client: CoordinatorClient) -> None:
        with caplog.at_level(logging.WARNING, logger="collabtrain_operator.coordinator_client"):
            assert await client.status(url, TOKEN) is None

    with_server(streaming(text, pieces=8, content_length=content_length), body)
    assert "larger than 50000 bytes" in caplog.text


def test_refused_admin_token_is_said_without_the_token(caplog: pytest.LogCaptureFixture) -> None:
    async def body(url: str, client: CoordinatorClient) -> None:
        assert await client.status(url, "admin.feedface") is None

    with_server(fake_coordinator([]), body)
    (record,) = [r for r in caplog.records if r.name.endswith("coordinator_client")]
    assert record.levelno == logging.WARNING and "401" in record.getMessage()
    assert "feedface" not in caplog.text


# ------------------------------------------------------------------ operator settings


def test_master_key_is_read_from_the_file_the_chart_mounts(tmp_path: Path) -> None:
    key_file = tmp_path / "master-key"
    key_file.write_text("k" * 64 + "\n")
    assert settings.read_master_key(str(key_file)) == b"k" * 64


@pytest.mark.parametrize("content", [None, "", "   \n", "short"])
def test_missing_or_empty_master_key_names_the_variable(
    tmp_path: Path, content: str | None
) -> None:
    key_file = tmp_path / "master-key"
    if content is not None:
        key_file.write_text(content)
    with pytest.raises(settings.ConfigurationError, match=settings.MASTER_KEY_FILE_ENV):
        settings.read_master_key(str(key_file))
    with pytest.raises(settings.ConfigurationError, match="COLLABTRAIN_MASTER_KEY_FILE"):
        settings.read_master_key(None)


def test_operator_without_master_key_exits_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(settings.MASTER_KEY_FILE_ENV, raising=False)
    assert main.main(["--standalone"]) == 2
    assert "COLLABTRAIN_MASTER_KEY_FILE" in capsys.readouterr().err


def test_network_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(settings.OPERATOR_NAMESPACE_ENV, "ops")
    monkeypatch.setenv(settings.OPERATOR_POD_LABELS_ENV, '{"app": "op"}')
    monkeypatch.setenv(settings.METRICS_FROM_ENV, '[{"podSelector": {}}]')
    monkeypatch.setenv(settings.NETWORK_POLICIES_ENV, "false")
    options = settings.OperatorOptions.from_env()
    assert options.network_policies is False
    assert options.network_access.operator_namespace == "ops"
    assert options.network_access.operator_labels == {"app": "op"}
    assert options.network_access.metrics_from == ({"podSelector": {}},)
    monkeypatch.setenv(settings.METRICS_FROM_ENV, "[{not json")
    with pytest.raises(settings.ConfigurationError, match=settings.METRICS_FROM_ENV):
        settings.OperatorOptions.from_env()
    monkeypatch.setenv(settings.METRICS_FROM_ENV, "{}")
    with pytest.raises(settings.ConfigurationError, match="list"):
        settings.OperatorOptions.from_env()
