"""The node watch's rules, against a scripted client: pages, notices, expiry, errors.
Its integration with a real API server is in tests/integration/test_node_watch.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from collabtrain_operator import nodes
from collabtrain_operator.kube import KubeError
from collabtrain_operator.nodes import NodeInterruptions

DISRUPTED = {"key": "karpenter.sh/disrupted", "effect": "NoSchedule"}


def node(name: str, *taints: dict[str, str], version: str = "1") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "resourceVersion": version},
        "spec": {"taints": list(taints)},
    }


class ScriptedKube:
    """Answers lists from `listings` (one list of pages per listing) and watches from
    `watches` (one list of events, or an exception, per watch); then blocks."""

    def __init__(self, listings: list[Any], watches: list[Any]) -> None:
        self.listings = listings
        self.watches = watches
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.done = asyncio.Event()

    async def request(self, method: str, path: str, *, params: dict[str, str]) -> Any:
        self.requests.append(("list", dict(params)))
        pages = self.listings[0]
        page = pages.pop(0)
        if not pages:
            self.listings.pop(0)
        if isinstance(page, Exception):
            raise page
        return page

    async def watch(self, path: str, params: dict[str, str]) -> AsyncIterator[dict[str, Any]]:
        self.requests.append(("watch", dict(params)))
        if not self.watches:
            self.done.set()
            await asyncio.Event().wait()
        script = self.watches.pop(0)
        if isinstance(script, Exception):
            raise script
        for event in script:
            yield event


def page(*items: dict[str, Any], version: str = "10", more: str = "") -> dict[str, Any]:
    metadata = {"resourceVersion": version, **({"continue": more} if more else {})}
    return {"items": list(items), "metadata": metadata}


def run_until_idle(kube: ScriptedKube) -> tuple[NodeInterruptions, int]:
    notices = 0

    def noticed() -> None:
        nonlocal notices
        notices += 1

    async def main() -> NodeInterruptions:
        watch = NodeInterruptions(kube, on_notice=noticed)  # type: ignore[arg-type]
        task = asyncio.create_task(watch.run())
        await asyncio.wait_for(kube.done.wait(), 10)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return watch

    watch = asyncio.run(main())
    return watch, notices


def test_pages_are_followed_and_only_tainted_nodes_are_kept() -> None:
    kube = ScriptedKube(
        [[page(node("a"), node("b", DISRUPTED), more="c1"), page(node("c"), version="11")]],
        [],
    )
    watch, notices = run_until_idle(kube)
    assert watch.by_node == {"b": ("karpenter.sh/disrupted",)}
    assert watch.listed.is_set()
    assert notices == 1
    assert kube.requests == [
        ("list", {"limit": nodes.PAGE_SIZE}),
        ("list", {"limit": nodes.PAGE_SIZE, "continue": "c1"}),
        ("watch", {"resourceVersion": "11", "allowWatchBookmarks": "true"}),
    ]


def test_events_add_and_clear_notices_and_the_watch_resumes_where_it_ended() -> None:
    kube = ScriptedKube(
        [[page(node("a"), node("b"))]],
        [
            [
                {"type": "MODIFIED", "object": node("a", DISRUPTED, version="12")},
                {"type": "MODIFIED", "object": node("a", DISRUPTED, version="13")},
                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "14"}}},
            ],
            [
                {"type": "MODIFIED", "object": node("b", DISRUPTED, version="15")},
                {"type": "MODIFIED", "object": node("a", version="16")},
                {"type": "DELETED", "object": node("b", DISRUPTED, version="17")},
                {"type": "ADDED", "object": node("c", DISRUPTED, version="18")},
            ],
        ],
    )
    watch, notices = run_until_idle(kube)
    assert watch.by_node == {"c": ("karpenter.sh/disrupted",)}
    assert notices == 3  # a, b, c: a's unchanged taint the second time is no new notice
    watched_from = [params["resourceVersion"] for kind, params in kube.requests if kind == "watch"]
    assert watched_from == ["10", "14", "18"]


@pytest.mark.parametrize(
    "expiry",
    [
        [{"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}],
        KubeError(410, "Expired", "too old resource version"),
    ],
)
def test_an_expired_version_lists_again(expiry: Any) -> None:
    kube = ScriptedKube(
        [[page(node("a", DISRUPTED))], [page(node("b", DISRUPTED), version="20")]],
        [expiry],
    )
    watch, notices = run_until_idle(kube)
    assert watch.by_node == {"b": ("karpenter.sh/disrupted",)}  # a's notice went with it
    assert notices == 2
    assert [kind for kind, _ in kube.requests] == ["list", "watch", "list", "watch"]


def test_errors_are_retried_from_a_new_listing(caplog: pytest.LogCaptureFixture) -> None:
    kube = ScriptedKube(
        [[KubeError(503, "ServiceUnavailable", "etcd")], [page(node("a", DISRUPTED))]],
        [ConnectionResetError("reset"), [{"type": "MODIFIED", "object": {}}]],
    )
    kube.listings += [[page(node("a", DISRUPTED), version="30")] for _ in range(2)]
    watch, notices = run_until_idle(kube)
    assert watch.by_node == {"a": ("karpenter.sh/disrupted",)}
    assert notices == 1  # listed three times, noticed once
    assert [kind for kind, _ in kube.requests] == ["list"] + ["list", "watch"] * 3
    assert "503 ServiceUnavailable" in caplog.text
    assert "reset; listing again in 1 s" in caplog.text
    assert "watching nodes failed" in caplog.text  # a malformed event: logged with its trace
