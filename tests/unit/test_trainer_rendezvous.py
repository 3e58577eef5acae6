"""The coordinator's rendezvous store: only the current epoch's members, only under its
prefix, bounded."""

from __future__ import annotations

import base64

import pytest

from collabtrain_trainer.coordinator.rendezvous import RendezvousRefused, RendezvousStore
from collabtrain_trainer.protocol import StoreRequest

PREFIX = "collabtrain/abc/epoch3/"


def request(op: str, *keys: str, value: bytes | None = None, **fields: object) -> StoreRequest:
    encoded = base64.b64encode(value).decode() if value is not None else None
    return StoreRequest.model_validate(
        {"peer_id": "a", "op": op, "keys": list(keys), "value": encoded, **fields}
    )


def call(
    store: RendezvousStore, body: StoreRequest, prefix: str | None = PREFIX
) -> list[bytes | None]:
    store.authorize(body, prefix)
    return [base64.b64decode(v) if v is not None else None for v in store.apply(body).values]


def test_members_set_and_get_under_their_epochs_prefix() -> None:
    store = RendezvousStore()
    assert call(store, request("get", PREFIX + "0")) == [None]
    call(store, request("set", PREFIX + "0", value=b"addr"))
    assert call(store, request("get", PREFIX + "0", PREFIX + "1")) == [b"addr", None]
    assert store.apply(request("add", PREFIX + "n", amount=2)).counter == 2
    assert store.apply(request("add", PREFIX + "n", amount=3)).counter == 5
    call(store, request("compare_set", PREFIX + "c", value=b"x", expected=""))
    assert call(store, request("get", PREFIX + "c")) == [b"x"]
    assert call(store, request("delete", PREFIX + "c")) == [b"x"]


def test_non_members_and_other_prefixes_are_refused() -> None:
    store = RendezvousStore()
    with pytest.raises(RendezvousRefused, match="not a member") as refused:
        store.authorize(request("get", PREFIX + "0"), None)
    assert refused.value.status == 403
    with pytest.raises(RendezvousRefused, match="outside") as refused:
        store.authorize(request("set", PREFIX + "0", "collabtrain/abc/epoch2/0", value=b""), PREFIX)
    assert refused.value.status == 403


def test_a_new_epoch_drops_the_old_keys_and_bad_values_are_refused() -> None:
    store = RendezvousStore()
    call(store, request("set", PREFIX + "0", value=b"old"))
    new_prefix = "collabtrain/abc/epoch4/"
    assert call(store, request("get", new_prefix + "0"), prefix=new_prefix) == [None]
    assert store.data == {}
    call(store, request("set", new_prefix + "k", value=b"text"), prefix=new_prefix)
    with pytest.raises(RendezvousRefused, match="counter"):
        store.apply(request("add", new_prefix + "k", amount=1))
    with pytest.raises(RendezvousRefused, match="base64"):
        store.apply(request("set", new_prefix + "k").model_copy(update={"value": "!!"}))
