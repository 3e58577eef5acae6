"""Interruption notices on nodes, from one plain list-and-watch of all nodes.

Not a kopf index: kopf gives every watched object a worker and holds all handlers back
until each object of the first listing is indexed, and every indexed object wakes every
waiting worker, so start-up costs time quadratic in the objects listed. With 5,000
nodes the operator created no pod for minutes. Nodes matter here only for their
interruption taints, so one watch keeps those, and only for the nodes that have one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from collabtrain_operator.kube import KubeClient, KubeError
from collabtrain_operator.planning import node_interruptions_from_body

NODES_PATH = "/api/v1/nodes"
PAGE_SIZE = "500"
RETRY_MAX_SECONDS = 30.0

logger = logging.getLogger(__name__)


class NodeInterruptions:
    """`by_node`: node name -> its interruption taints, for the nodes that carry one.
    `on_notice` is called when a node gets a notice it did not have."""

    def __init__(self, kube: KubeClient, on_notice: Callable[[], None]) -> None:
        self.kube = kube
        self.on_notice = on_notice
        self.by_node: dict[str, tuple[str, ...]] = {}
        self.listed = asyncio.Event()  # set once the first listing is in

    async def run(self) -> None:
        """List, then watch from the listing's version; list again when the version has
        expired or after an error (backing off), forever."""
        delay = 1.0
        while True:
            try:
                version: str | None = await self._list()
                delay = 1.0
                while version is not None:
                    version = await self._watch(version)
            except (KubeError, aiohttp.ClientError, OSError, ValueError) as error:
                logger.warning(
                    "watching nodes for interruption notices: %s; listing again in %.0f s",
                    error,
                    delay,
                )
            except Exception:  # a bug must not end the watch for good
                logger.exception("watching nodes failed; listing again in %.0f s", delay)
            else:
                continue  # the version expired: list again at once
            await asyncio.sleep(delay)
            delay = min(2 * delay, RETRY_MAX_SECONDS)

    async def _list(self) -> str:
        found: dict[str, tuple[str, ...]] = {}
        params = {"limit": PAGE_SIZE}
        while True:
            page = await self.kube.request("GET", NODES_PATH, params=params)
            for node in page.get("items") or []:
                if taints := node_interruptions_from_body(node):
                    found[node["metadata"]["name"]] = taints
            metadata = page.get("metadata") or {}
            if not metadata.get("continue"):
                break
            params = {"limit": PAGE_SIZE, "continue": metadata["continue"]}
        noticed = any(self.by_node.get(name) != taints for name, taints in found.items())
        self.by_node = found
        self.listed.set()
        if noticed:
            self.on_notice()
        version: str = metadata["resourceVersion"]
        return version

    async def _watch(self, version: str) -> str | None:
        """Apply one watch stream's events; the version to resume from, or None when it
        has expired (410 Gone: list again)."""
        params = {"resourceVersion": version, "allowWatchBookmarks": "true"}
        try:
            async for event in self.kube.watch(NODES_PATH, params):
                node: dict[str, Any] = event.get("object") or {}
                if event.get("type") == "ERROR":
                    if node.get("code") == 410:
                        return None
                    raise KubeError(node.get("code", 500), node.get("reason", ""), str(node))
                version = node["metadata"]["resourceVersion"]
                if event["type"] != "BOOKMARK":
                    self._apply(event["type"], node)
        except KubeError as error:
            if error.status == 410:
                return None
            raise
        return version

    def _apply(self, kind: str, node: dict[str, Any]) -> None:
        name = node["metadata"]["name"]
        taints = node_interruptions_from_body(node) if kind != "DELETED" else ()
        if not taints:
            self.by_node.pop(name, None)
        elif self.by_node.get(name) != taints:
            self.by_node[name] = taints
            self.on_notice()
