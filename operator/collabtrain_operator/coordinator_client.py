"""The operator's client of a job's coordinator, speaking `collabtrain_trainer.protocol`.

Every call is short and never raises for an unreachable coordinator: the coordinator
restarts, is scaled to zero while suspended, or (on a simulated cluster) never runs at
all, and reconciliation goes on without it. An answer that does not parse (a field of
the wrong type, a number that is not finite) is treated the same way, as no answer, with
one log line: the job's status must never be blocked on what a coordinator says.

The token passed in is the operator's admin token (`credentials.admin_token`); it is sent
in the Authorization header and appears in no log line.
"""

from __future__ import annotations

import json
import logging
import math
from typing import NoReturn, TypeVar

import aiohttp
from pydantic import BaseModel, ValidationError

from collabtrain_trainer.protocol import (
    TOKEN_HEADER,
    CheckpointRequest,
    CheckpointResponse,
    CoordinatorStatus,
    DrainRequest,
    DrainResponse,
)

ResponseT = TypeVar("ResponseT", bound=BaseModel)

STATUS_PATH = "/status"
DRAIN_PATH = "/drain"
CHECKPOINT_PATH = "/checkpoint"
MAX_RESPONSE_BYTES = 4 * 1024 * 1024

logger = logging.getLogger(__name__)


class MalformedAnswer(ValueError):
    """The coordinator's answer is not what the contract allows."""


def _refuse_constant(name: str) -> NoReturn:
    raise MalformedAnswer(f"{name} is not a number JSON allows")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as infinity
        raise MalformedAnswer(f"{text[:40]} is not a finite number")
    return value


def parse_answer(text: str, model: type[ResponseT]) -> ResponseT:
    """Parse a coordinator's JSON answer: NaN, Infinity and numbers too large for a float
    are refused (the operator writes these values into the job's status, and the API
    server accepts no JSON with them); then the contract's model."""
    data = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite)
    return model.model_validate(data)


def _describe(error: Exception) -> str:
    """What was wrong, by field, without the values (they came from a pod)."""
    if isinstance(error, ValidationError):
        problems = [
            f"{'.'.join(str(part) for part in issue['loc']) or '(root)'}: {issue['msg']}"
            for issue in error.errors(include_input=False, include_url=False)
        ]
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        return "; ".join(problems[:3]) + more
    return f"{type(error).__name__}: {str(error)[:200]}"


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body, read to its end; None as soon as it is known to exceed `limit`
    bytes (by its Content-Length, or while reading), without reading the rest.
    (`StreamReader.read(n)` is no substitute: it returns what is buffered so far, so a
    body that arrives in several pieces would be cut short.)"""
    if response.content_length is not None and response.content_length > limit:
        return None
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


class CoordinatorClient:
    def __init__(self, session: aiohttp.ClientSession, *, timeout_seconds: float = 3.0) -> None:
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)

    async def status(self, base_url: str, token: str) -> CoordinatorStatus | None:
        return await self._call("GET", base_url, STATUS_PATH, token, None, CoordinatorStatus)

    async def drain(self, base_url: str, token: str, request: DrainRequest) -> DrainResponse | None:
        return await self._call("POST", base_url, DRAIN_PATH, token, request, DrainResponse)

    async def checkpoint(
        self, base_url: str, token: str, request: CheckpointRequest
    ) -> CheckpointResponse | None:
        return await self._call(
            "POST", base_url, CHECKPOINT_PATH, token, request, CheckpointResponse
        )

    async def _call(
        self,
        method: str,
        base_url: str,
        path: str,
        token: str,
        request: BaseModel | None,
        response_model: type[ResponseT],
    ) -> ResponseT | None:
        url = base_url.rstrip("/") + path
        payload = request.model_dump(mode="json") if request is not None else None
        try:
            async with self._session.request(
                method,
                url,
                json=payload,
                headers={TOKEN_HEADER: f"Bearer {token}"},
                timeout=self._timeout,
            ) as response:
                if response.status in (401, 403):
                    logger.warning(
                        "coordinator %s %s refused the operator's admin token (%s): its job "
                        "key is not the one the operator derives (was the operator's master "
                        "key replaced since the job started?)",
                        method,
                        url,
                        response.status,
                    )
                    return None
                if response.status != 200:
                    logger.debug("coordinator %s %s answered %s", method, url, response.status)
                    return None
                body = await _read_bounded(response, MAX_RESPONSE_BYTES)
        except (aiohttp.ClientError, TimeoutError) as error:
            # The URL and the error type only: the token must never reach a log.
            logger.debug("coordinator %s %s unreachable: %s", method, url, type(error).__name__)
            return None
        try:
            if body is None:
                raise MalformedAnswer(f"the answer is larger than {MAX_RESPONSE_BYTES} bytes")
            return parse_answer(body.decode("utf-8"), response_model)
        except (ValueError, ValidationError) as error:  # JSON, UTF-8 and model errors
            logger.warning(
                "coordinator %s %s: unusable answer, taken as none: %s",
                method,
                url,
                _describe(error),
            )
            return None
