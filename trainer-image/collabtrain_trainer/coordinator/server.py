"""The coordinator's HTTP service (aiohttp), with the rendezvous store of process groups."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web
from aiohttp.typedefs import Middleware
from opentelemetry.metrics import CallbackOptions, Observation
from pydantic import BaseModel, ValidationError

from collabtrain_trainer import credentials
from collabtrain_trainer.config import TrainerConfig
from collabtrain_trainer.coordinator.rendezvous import (
    MAX_WAIT_S,
    RendezvousRefused,
    RendezvousStore,
)
from collabtrain_trainer.coordinator.state import (
    CoordinatorState,
    InvalidRequest,
    UnknownPeerError,
)
from collabtrain_trainer.observability import (
    CONTENT_TYPE_LATEST,
    configure_logging,
    metrics_text,
    setup_telemetry,
)
from collabtrain_trainer.protocol import (
    TOKEN_HEADER,
    CheckpointRequest,
    CheckpointResponse,
    DrainRequest,
    Heartbeat,
    JoinRequest,
    LeaveRequest,
    LeaveResponse,
    ProgressReport,
    RoundDecision,
    RoundReady,
    RoundVote,
    StoreRequest,
    UnknownPeer,
)

log = logging.getLogger("collabtrain.coordinator")

_PUBLIC_PATHS = {"/healthz", "/metrics"}
# A long poll answers "wait" after this long; the peer asks again (and stays visible).
_LONG_POLL_S = 2.0
_POLL_INTERVAL_S = 0.01
_TICK_S = 0.1

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_IDENTITY = web.RequestKey("identity", credentials.Identity)  # who the token speaks for
_ADMIN_PATHS = {"/status", "/drain", "/checkpoint"}


def identify(header: str | None, job_key: str) -> credentials.Identity | None:
    """Who an `Authorization: Bearer <token>` header speaks for, if anyone."""
    if not header or not header.startswith("Bearer "):
        return None
    return credentials.identify(job_key, header[len("Bearer ") :])


@dataclass
class CoordinatorSettings:
    host: str
    port: int


def _auth_middleware(job_key: str) -> Middleware:
    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in _PUBLIC_PATHS:
            return await handler(request)
        identity = identify(request.headers.get(TOKEN_HEADER), job_key)
        # Log who and where, never what they sent.
        if identity is None:
            log.warning(
                "refused %s %s from %s: missing or wrong token",
                request.method,
                request.path,
                request.remote,
            )
            return web.json_response({"error": "missing or wrong token"}, status=401)
        if (request.path in _ADMIN_PATHS) != identity.is_admin:
            log.warning(
                "refused %s %s from %s: %s may not call it",
                request.method,
                request.path,
                request.remote,
                "the operator" if identity.is_admin else f"peer {identity.peer_id}",
            )
            needed = "the operator's admin token" if request.path in _ADMIN_PATHS else "a peer's"
            return web.json_response({"error": f"{request.path} needs {needed}"}, status=403)
        request[_IDENTITY] = identity
        try:
            return await handler(request)
        except InvalidRequest as error:
            log.warning("refused %s from %s: %s", request.path, request.remote, error)
            return web.json_response({"error": error.message, "field": error.field}, status=422)

    return check_token


async def _parse(request: web.Request, model: type[M]) -> M:
    try:
        body = model.model_validate_json(await request.read())
    except ValidationError as error:
        fields = ", ".join(".".join(map(str, e["loc"])) for e in error.errors())
        log.warning("refused %s from %s: invalid %s", request.path, request.remote, fields)
        raise web.HTTPUnprocessableEntity(
            text=error.json(include_url=False, include_input=False),
            content_type="application/json",
        ) from error
    # A peer speaks only for itself.
    peer_id = getattr(body, "peer_id", None)
    identity = request[_IDENTITY]
    if peer_id is not None and peer_id != identity.peer_id:
        log.warning(
            "refused %s from %s: peer %s sent it as %s",
            request.path,
            request.remote,
            identity.peer_id,
            peer_id,
        )
        raise web.HTTPForbidden(
            text=f'{{"error": "this token speaks for {identity.peer_id}, not for peer_id"}}',
            content_type="application/json",
        )
    return body


def _reply(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(
        text=model.model_dump_json(), status=status, content_type="application/json"
    )


class CoordinatorApp:
    def __init__(self, config: TrainerConfig, settings: CoordinatorSettings, job_key: str) -> None:
        self.config = config
        self.settings = settings
        self.job_key = job_key
        self.state = CoordinatorState(
            config,
            now=time.monotonic(),
            job_key=job_key,
        )
        self.rendezvous_store = RendezvousStore()
        self._committed_seen = 0
        meter, _ = setup_telemetry("collabtrain-coordinator", config.job, self.state.instance)
        self._round_seconds = meter.create_histogram(
            "collabtrain_round_duration_seconds", unit="s", description="formation to commit"
        )
        meter.create_observable_gauge(
            "collabtrain_step", [self._observe(lambda s: s.step)], description="committed steps"
        )
        meter.create_observable_gauge(
            "collabtrain_peers",
            [self._observe(lambda s: len(s.live_peers(time.monotonic())))],
            description="live peers",
        )
        meter.create_observable_gauge(
            "collabtrain_samples_in_round",
            [self._observe(lambda s: s.status(time.monotonic()).samples_in_round)],
        )
        meter.create_observable_gauge(
            "collabtrain_samples_per_second",
            [self._observe(lambda s: s.status(time.monotonic()).samples_per_second)],
        )
        meter.create_observable_gauge(
            "collabtrain_rounds_aborted", [self._observe(lambda s: s.rounds_aborted)]
        )
        meter.create_observable_gauge(
            "collabtrain_round_deadline_seconds", [self._observe(lambda s: s.deadline.seconds)]
        )
        meter.create_observable_gauge(
            "collabtrain_bytes_sent", [self._observe(lambda s: s.bytes_sent)], unit="By"
        )
        meter.create_observable_gauge(
            "collabtrain_compression_ratio",
            [
                self._observe(
                    lambda s: s.bytes_per_step_fp32 / s.bytes_sent if s.bytes_sent else 1.0
                )
            ],
        )
        meter.create_observable_gauge("collabtrain_loss", [self._observe(lambda s: s.loss or 0.0)])

    def _observe(
        self, read: Callable[[CoordinatorState], float]
    ) -> Callable[[CallbackOptions], list[Observation]]:
        def callback(_: CallbackOptions) -> list[Observation]:
            return [Observation(read(self.state), {"job": self.config.job})]

        return callback

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[_auth_middleware(self.job_key)])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/status", self.status)
        app.router.add_post("/drain", self.drain)
        app.router.add_post("/checkpoint", self.checkpoint)
        app.router.add_post("/peers/join", self.join)
        app.router.add_post("/peers/heartbeat", self.heartbeat)
        app.router.add_post("/peers/report", self.report)
        app.router.add_post("/peers/leave", self.leave)
        app.router.add_post("/rounds/ready", self.ready)
        app.router.add_post("/rounds/vote", self.vote)
        app.router.add_post("/rendezvous", self.rendezvous)
        app.cleanup_ctx.append(self._ticker)
        return app

    async def _ticker(self, _: web.Application):  # type: ignore[no-untyped-def]
        async def run() -> None:
            while True:
                try:
                    self.state.tick(time.monotonic())
                    self._record_round_durations()
                except Exception:
                    # One bad pass must not stop expiry and round formation for good.
                    log.exception("coordinator tick failed; trying again")
                await asyncio.sleep(_TICK_S)

        task = asyncio.create_task(run())
        yield
        task.cancel()

    def _record_round_durations(self) -> None:
        durations = self.state.round_durations
        for duration in durations[self._committed_seen :]:
            self._round_seconds.record(duration, {"job": self.config.job})
        self._committed_seen = len(durations)

    # --- handlers --------------------------------------------------------------------

    async def healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=metrics_text(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(self, _: web.Request) -> web.Response:
        return _reply(self.state.status(time.monotonic()))

    async def drain(self, request: web.Request) -> web.Response:
        body = await _parse(request, DrainRequest)
        return _reply(self.state.drain(body, time.monotonic()))

    async def checkpoint(self, request: web.Request) -> web.Response:
        await _parse(request, CheckpointRequest)
        writer, step = self.state.request_checkpoint(time.monotonic())
        return _reply(CheckpointResponse(accepted=writer is not None, writer=writer, step=step))

    async def join(self, request: web.Request) -> web.Response:
        body = await _parse(request, JoinRequest)
        return _reply(self.state.join(body, time.monotonic()))

    async def heartbeat(self, request: web.Request) -> web.Response:
        body = await _parse(request, Heartbeat)
        try:
            return _reply(self.state.heartbeat(body, time.monotonic()))
        except UnknownPeerError:
            return _reply(UnknownPeer(), status=409)

    async def report(self, request: web.Request) -> web.Response:
        body = await _parse(request, ProgressReport)
        try:
            return _reply(self.state.report(body, time.monotonic()))
        except UnknownPeerError:
            return _reply(UnknownPeer(), status=409)

    async def leave(self, request: web.Request) -> web.Response:
        body = await _parse(request, LeaveRequest)
        return _reply(LeaveResponse(left=self.state.leave(body, time.monotonic())))

    async def _long_poll(
        self, first: RoundDecision, poll: Callable[[], RoundDecision]
    ) -> web.Response:
        decision = first
        until = time.monotonic() + _LONG_POLL_S
        while decision.outcome == "wait" and time.monotonic() < until:
            await asyncio.sleep(_POLL_INTERVAL_S)
            decision = poll()
        return _reply(decision)

    async def ready(self, request: web.Request) -> web.Response:
        body = await _parse(request, RoundReady)
        try:
            first = self.state.ready(body, time.monotonic())
        except UnknownPeerError:
            return _reply(UnknownPeer(), status=409)
        return await self._long_poll(
            first, lambda: self.state.poll_ready(body.round_id, time.monotonic())
        )

    async def rendezvous(self, request: web.Request) -> web.Response:
        body = await _parse(request, StoreRequest)
        store = self.rendezvous_store
        try:
            store.authorize(body, self.state.rendezvous_prefix(body.peer_id))
            answer = store.apply(body)
            until = time.monotonic() + min(body.wait_seconds, MAX_WAIT_S)
            # A get waits (bounded) for keys the other members have not set yet.
            while body.op == "get" and None in answer.values and time.monotonic() < until:
                await asyncio.sleep(_POLL_INTERVAL_S)
                store.authorize(body, self.state.rendezvous_prefix(body.peer_id))
                answer = store.apply(body)
        except RendezvousRefused as error:
            log.warning("refused /rendezvous from %s: %s", body.peer_id, error)
            return web.json_response({"error": str(error)}, status=error.status)
        return _reply(answer)

    async def vote(self, request: web.Request) -> web.Response:
        body = await _parse(request, RoundVote)
        try:
            first = self.state.vote(body, time.monotonic())
        except UnknownPeerError:
            return _reply(UnknownPeer(), status=409)
        return await self._long_poll(
            first, lambda: self.state.poll_vote(body.round_id, time.monotonic())
        )


def run_coordinator(config: TrainerConfig, settings: CoordinatorSettings) -> int:
    configure_logging(config.job, peer="coordinator")
    job_key = os.environ.get(config.job_key_env)
    if not job_key:
        log.error(
            "the job key is missing: set the environment variable %s (from the job's Secret)",
            config.job_key_env,
        )
        return 2
    coordinator = CoordinatorApp(config, settings, job_key)
    log.info(
        "coordinator %s for job %s on %s:%d (rounds of %d samples, max steps %d)",
        coordinator.state.instance,
        config.job,
        settings.host,
        settings.port,
        config.round_samples,
        config.max_steps,
    )

    async def serve() -> None:
        runner = web.AppRunner(coordinator.make_app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("coordinator stopping")
        await runner.cleanup()

    asyncio.run(serve())
    return 0
