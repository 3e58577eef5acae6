"""The node watch against a real API server: notices seen as nodes are tainted and
cleared, pages followed, and node objects larger than aiohttp's line limit read."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest

from collabtrain_operator import nodes
from collabtrain_operator.kube import KubeClient, connection_info
from collabtrain_operator.nodes import NodeInterruptions

DISRUPTED = {"key": "karpenter.sh/disrupted", "effect": "NoSchedule"}


class Nodes:
    """Node objects this test makes (no kubelet behind them), deleted at the end."""

    def __init__(self, core: Any) -> None:
        self.core = core
        self.made: set[str] = set()

    def make(self, name: str, *, taints: list[dict[str, str]], images: int = 0) -> None:
        self.core.create_node({"metadata": {"name": name}, "spec": {"taints": taints}})
        self.made.add(name)
        if images:  # a node's status lists the images it holds, and can be large
            names = [[f"registry.example/{i}/{'x' * 1000}"] for i in range(images)]
            status = {"images": [{"names": n, "sizeBytes": 1} for n in names]}
            self.core.patch_node_status(name, {"status": status})

    async def taint(self, name: str, taints: list[dict[str, str]]) -> None:
        await asyncio.to_thread(self.core.patch_node, name, {"spec": {"taints": taints}})

    async def delete(self, name: str) -> None:
        await asyncio.to_thread(self.core.delete_node, name)
        self.made.discard(name)


@pytest.fixture
def test_nodes(api_client: Any) -> Iterator[Nodes]:
    from kubernetes import client

    made = Nodes(client.CoreV1Api(api_client))
    try:
        yield made
    finally:
        for name in made.made:
            made.core.delete_node(name)


async def until(condition: Any, what: str, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_notices_follow_the_nodes_taints(
    test_nodes: Nodes, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setattr(nodes, "PAGE_SIZE", "2")  # the test's nodes span pages
    prefix = f"watched-{secrets.token_hex(3)}"
    # 1.2 MB of JSON: over the line limit of aiohttp's reader.
    test_nodes.make(f"{prefix}-0", taints=[DISRUPTED], images=1200)
    for i in range(1, 5):
        test_nodes.make(f"{prefix}-{i}", taints=[])
    notices: list[int] = []

    async def main() -> None:
        requests: list[str] = []
        kube = KubeClient(
            lambda: connection_info(kopf.OperatorSettings()),
            on_request=lambda method, _: requests.append(method),
        )
        watch = NodeInterruptions(kube, on_notice=lambda: notices.append(1))

        def ours() -> dict[str, tuple[str, ...]]:
            return {k: v for k, v in watch.by_node.items() if k.startswith(prefix)}

        task = asyncio.create_task(watch.run())
        try:
            await asyncio.wait_for(watch.listed.wait(), 15)
            assert ours() == {f"{prefix}-0": ("karpenter.sh/disrupted",)}
            listed_notices = len(notices)
            assert requests.count("GET") >= 3  # five nodes at least, two to a page

            await test_nodes.taint(f"{prefix}-3", [DISRUPTED])
            await until(lambda: f"{prefix}-3" in watch.by_node, "the new notice")
            assert len(notices) == listed_notices + 1

            # The large node's taint cleared: its event is one line of 1.2 MB.
            await test_nodes.taint(f"{prefix}-0", [])
            await until(lambda: f"{prefix}-0" not in watch.by_node, "the cleared notice")
            await test_nodes.delete(f"{prefix}-3")
            await until(lambda: not ours(), "the deleted node's notice gone")
            assert not task.done()
            # One listing, one watch: nothing made it start over.
            assert requests == ["GET"] * (len(requests) - 1) + ["WATCH"]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await kube.close()

    asyncio.run(main())
