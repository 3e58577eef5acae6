"""examples/custom-task end to end, in local mode: its script writes text shards to a real
MinIO, and real peers train its transformers GPT on them for one epoch."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from testbed.cluster import MinioServer
from tests.integration.test_trainer_checkpoint import _bucket_on
from tests.integration.trainer_fixtures import (
    ClusterFactory,
    assert_hashes_agree,
    make_cluster,
    trainer_fork_server,
)

__all__ = ["make_cluster", "trainer_fork_server"]

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom-task"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(300, func_only=True)
def test_the_example_gpt_trains_one_epoch_of_its_shards(
    make_cluster: ClusterFactory, minio_server: MinioServer
) -> None:
    storage: dict[str, Any] = _bucket_on(minio_server)
    bucket = storage["checkpoint"]["bucket"]
    records = _load("write_shards").write_shards(
        minio_server.client(), bucket, "corpus/", shards=4, records=48
    )
    cluster = make_cluster(
        env={**storage["env"], "PYTHONPATH": str(EXAMPLE)},
        task="gpt_task:make_task",
        task_args={"context": "32", "width": "32", "layers": "1", "heads": "2"},
        checkpoint=storage["checkpoint"],
        data={"prefix": "corpus/", "epochs": 1},
        target_batch_size=16,
        micro_batch_size=4,
        optimizer={"name": "adamw", "lr": 0.003},
    )
    cluster.start_peer()
    cluster.start_peer()
    status = cluster.wait_for(lambda s: s.finished, 240, "one epoch of the example's shards")

    assert status.data_epoch == 1 and status.samples_committed == records
    assert status.loss is not None and status.initial_loss is not None
    assert status.loss < status.initial_loss - 0.5, (status.initial_loss, status.loss)
    assert_hashes_agree(cluster)
