"""One torch.distributed process group per membership epoch.

The coordinator names each epoch by a fresh store prefix. A peer keeps the group while the
epoch stays the same (same members, nothing failed) and rebuilds it only when the epoch
changes, which is when membership changed or a collective failed.

Groups meet in the coordinator's rendezvous store, over its authenticated HTTP API (see
`coordinator.rendezvous`): `CoordinatorStore` is torch's Store interface on top of it.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore, Store  # type: ignore[attr-defined]

from collabtrain_trainer.protocol import StoreRequest, StoreResponse

log = logging.getLogger("collabtrain.averaging")

# One long poll of a `get` on the coordinator; the store asks again until its timeout.
_POLL_S = 5.0

StoreCall = Callable[[StoreRequest], StoreResponse]


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


class CoordinatorStore(Store):
    """torch.distributed's Store, kept by the coordinator: `call` sends one request as
    `peer_id` (with its token). Process groups use set, get and wait."""

    def __init__(self, call: StoreCall, peer_id: str, timeout: timedelta) -> None:
        super().__init__()
        self._call = call
        self._peer_id = peer_id
        self._timeout_s = timeout.total_seconds()

    def _request(self, op: str, keys: list[str], **fields: object) -> StoreResponse:
        request = StoreRequest.model_validate(
            {"peer_id": self._peer_id, "op": op, "keys": keys, **fields}
        )
        return self._call(request)

    def _read(self, keys: list[str], timeout_s: float) -> list[bytes]:
        until = time.monotonic() + timeout_s
        while True:
            wait = max(0.0, min(_POLL_S, until - time.monotonic()))
            values = self._request("get", keys, wait_seconds=wait).values
            if None not in values:
                return [base64.b64decode(v) for v in values if v is not None]
            if time.monotonic() >= until:
                missing = [k for k, v in zip(keys, values, strict=True) if v is None]
                raise TimeoutError(f"rendezvous keys not set within {timeout_s:.0f}s: {missing}")

    def set(self, key: str, value: bytes | str) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)
        self._request("set", [key], value=base64.b64encode(data).decode())

    def get(self, key: str) -> bytes:
        return self._read([key], self._timeout_s)[0]

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        self._read(list(keys), timeout.total_seconds() if timeout else self._timeout_s)

    def check(self, keys: list[str]) -> bool:
        return None not in self._request("get", list(keys)).values

    def add(self, key: str, amount: int) -> int:
        counter = self._request("add", [key], amount=amount).counter
        assert counter is not None
        return counter

    def compare_set(self, key: str, expected: bytes | str, desired: bytes | str) -> bytes:
        def encoded(value: bytes | str) -> str:
            return base64.b64encode(value.encode() if isinstance(value, str) else value).decode()

        answer = self._request(
            "compare_set", [key], expected=encoded(expected), value=encoded(desired)
        )
        return base64.b64decode(answer.values[0] or "")

    def delete_key(self, key: str) -> bool:
        return self._request("delete", [key]).values[0] is not None


class EpochGroups:
    """Holds the process group of the current membership epoch, on the default world."""

    def __init__(self, call: StoreCall, peer_id: str, backend: str) -> None:
        self.call = call
        self.peer_id = peer_id
        self.backend = backend
        self.epoch_key: tuple[str, int, int] | None = None  # (prefix, rank, world size)
        self.groups_built = 0

    def get(self, prefix: str, rank: int, world_size: int, timeout: timedelta) -> dist.ProcessGroup:
        key = (prefix, rank, world_size)
        if key == self.epoch_key and dist.is_initialized():
            return self._world()
        self.close()
        store = CoordinatorStore(self.call, self.peer_id, timeout)
        dist.init_process_group(
            self.backend,
            store=PrefixStore(prefix, store),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
        self.epoch_key = key
        self.groups_built += 1
        log.info(
            "process group built: %s rank %d of %d (%s)", prefix, rank, world_size, self.backend
        )
        return self._world()

    @staticmethod
    def _world() -> dist.ProcessGroup:
        group = dist.group.WORLD
        assert group is not None
        return group

    def close(self) -> None:
        """Drop the group; after a failed collective this also closes its connections, so
        members still blocked in it fail fast instead of waiting for their timeout."""
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as error:  # a broken group may fail to tear down cleanly
                log.warning("destroying the process group failed: %s", error)
        self.epoch_key = None
