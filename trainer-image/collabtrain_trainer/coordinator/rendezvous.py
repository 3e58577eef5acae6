"""The rendezvous store of the current membership epoch, kept by the coordinator.

torch.distributed builds a process group by exchanging addresses through a key-value
store. torch's own TCPStore has no authentication (anyone who reaches its port can list,
read, write and delete keys), so the coordinator keeps the keys itself and serves them over
its authenticated API (`/rendezvous`, see `protocol.StoreRequest`): a peer may use only the
keys under the prefix of the epoch it is a member of. Keys of older epochs are dropped.

Pure logic, like `state`: the server does the waiting.
"""

from __future__ import annotations

import base64
import binascii

from collabtrain_trainer.protocol import StoreRequest, StoreResponse

# Far above what a process group of 4096 members writes (a few keys per rank).
MAX_KEYS = 50_000
MAX_WAIT_S = 10.0


class RendezvousRefused(ValueError):
    """The request is outside what its peer may touch, or too much: the caller answers 403
    (not a member, another prefix) or 422 (bad value, store full)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _decode(field: str, value: str | None) -> bytes:
    try:
        return base64.b64decode(value or "", validate=True)
    except binascii.Error as error:
        raise RendezvousRefused(422, f"{field} is not base64") from error


def _encode(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode()


class RendezvousStore:
    def __init__(self) -> None:
        self.prefix: str | None = None
        self.data: dict[str, bytes] = {}

    def authorize(self, request: StoreRequest, prefix: str | None) -> None:
        """`prefix`: the current epoch's key prefix if the caller is one of its members."""
        if prefix is None:
            raise RendezvousRefused(
                403, f"peer {request.peer_id} is not a member of the current epoch"
            )
        if prefix != self.prefix:  # a new epoch: the old group's keys are of no use
            self.prefix, self.data = prefix, {}
        outside = [key for key in request.keys if not key.startswith(prefix)]
        if outside:
            raise RendezvousRefused(403, f"keys outside this epoch's prefix: {outside[:3]}")

    def apply(self, request: StoreRequest) -> StoreResponse:
        """Run one call on the store (`get` answers what is there now)."""
        keys, data = request.keys, self.data
        if request.op == "get":
            return StoreResponse(values=[_encode(data.get(key)) for key in keys])
        key = keys[0]
        if key not in data and len(data) >= MAX_KEYS:
            raise RendezvousRefused(422, f"the store holds {MAX_KEYS} keys already")
        if request.op == "set":
            data[key] = _decode("value", request.value)
        elif request.op == "add":
            try:
                current = int(data.get(key, b"0") or b"0") + request.amount
            except ValueError as error:
                raise RendezvousRefused(422, f"{key} does not hold a counter") from error
            data[key] = str(current).encode()
            return StoreResponse(values=[_encode(data[key])], counter=current)
        elif request.op == "compare_set":
            expected = _decode("expected", request.expected)
            if data.get(key, b"") == expected:
                data[key] = _decode("value", request.value)
        else:  # delete
            return StoreResponse(values=[_encode(data.pop(key, None))])
        return StoreResponse(values=[_encode(data.get(key))])
