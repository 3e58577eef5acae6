"""The operator's client of a job's coordinator, speaking `collabtrain_trainer.protocol`.

Every call is short and never raises for an unreachable coordinator: the coordinator
restarts, is scaled to zero while suspended, or (on a simulated cluster) never runs at
all, and reconciliation goes on without it.
"""

from __future__ import annotations

import logging
from typing import TypeVar

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

logger = logging.getLogger(__name__)


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
                if response.status != 200:
                    logger.debug("coordinator %s %s answered %s", method, url, response.status)
                    return None
                return response_model.model_validate(await response.json())
        except (aiohttp.ClientError, TimeoutError, ValueError, ValidationError) as error:
            # The URL and the error type only: the token must never reach a log.
            logger.debug("coordinator %s %s unreachable: %s", method, url, type(error).__name__)
            return None
