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


@pytest.fixture
def core(api_client: Any) -> Iterator[Any]:
    from kubernetes import client

    api = client.CoreV1Api(api_client)
    made: list[str] = []
    api.made = made
    try:
        yield api
    finally:
        for name in made:
            api.delete_node(name)


def make_node(core: Any, name: str, *, taints: list[dict[str, str]], annotation: str = "") -> None:
    core.create_node(
        {
            "metadata": {"name": name, "annotations": {"padding": annotation}},
            "spec": {"taints": taints},
        }
    )
    core.made.append(name)


async def until(condition: Any, what: str, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_notices_follow_the_nodes_taints(
    core: Any, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setattr(nodes, "PAGE_SIZE", "2")  # the test's nodes span pages
    prefix = f"watched-{secrets.token_hex(3)}"
    # Over aiohttp's 128 KiB line limit, as a real node with many images can be.
    large = "x" * 200_000
    make_node(core, f"{prefix}-0", taints=[DISRUPTED], annotation=large)
    for i in range(1, 5):
        make_node(core, f"{prefix}-{i}", taints=[])
    ours = lambda watch: {k: v for k, v in watch.by_node.items() if k.startswith(prefix)}  # noqa: E731
    notices: list[int] = []

    async def main() -> None:
        kube = KubeClient(lambda: connection_info(kopf.OperatorSettings()))
        watch = NodeInterruptions(kube, on_notice=lambda: notices.append(1))
        task = asyncio.create_task(watch.run())
        try:
            await asyncio.wait_for(watch.listed.wait(), 15)
            assert ours(watch) == {f"{prefix}-0": ("karpenter.sh/disrupted",)}
            listed_notices = len(notices)

            await asyncio.to_thread(
                core.patch_node, f"{prefix}-3", {"spec": {"taints": [DISRUPTED]}}
            )
            await until(lambda: f"{prefix}-3" in watch.by_node, "the new notice")
            assert len(notices) == listed_notices + 1

            # The large node's taint cleared: its event is one line over 128 KiB.
            await asyncio.to_thread(core.patch_node, f"{prefix}-0", {"spec": {"taints": []}})
            await until(lambda: f"{prefix}-0" not in watch.by_node, "the cleared notice")
            await asyncio.to_thread(core.delete_node, f"{prefix}-3")
            core.made.remove(f"{prefix}-3")
            await until(lambda: not ours(watch), "the deleted node's notice gone")
            assert not task.done()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await kube.close()

    asyncio.run(main())
