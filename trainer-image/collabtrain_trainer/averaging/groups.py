"""One torch.distributed process group per membership epoch.

The coordinator names each epoch by a fresh store prefix. A peer keeps the group while the
epoch stays the same (same members, nothing failed) and rebuilds it only when the epoch
changes, which is when membership changed or a collective failed.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore, TCPStore  # type: ignore[attr-defined]

log = logging.getLogger("collabtrain.averaging")


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


class EpochGroups:
    """Holds the process group of the current membership epoch, on the default world."""

    def __init__(self, store_host: str, store_port: int, backend: str) -> None:
        self.store_host = store_host
        self.store_port = store_port
        self.backend = backend
        self.epoch_key: tuple[str, int, int] | None = None  # (prefix, rank, world size)
        self.groups_built = 0

    def retarget(self, store_host: str, store_port: int) -> None:
        """The coordinator (and so the store) moved or restarted: forget the old group."""
        if (store_host, store_port) != (self.store_host, self.store_port):
            self.close()
        self.store_host, self.store_port = store_host, store_port

    def get(self, prefix: str, rank: int, world_size: int, timeout: timedelta) -> dist.ProcessGroup:
        key = (prefix, rank, world_size)
        if key == self.epoch_key and dist.is_initialized():
            return self._world()
        self.close()
        store = TCPStore(
            self.store_host,
            self.store_port,
            is_master=False,
            timeout=timeout,
            wait_for_workers=False,
        )
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
