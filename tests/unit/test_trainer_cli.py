"""The trainer's command line: where a peer's identity and the coordinator's ports come from."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from collabtrain_trainer import cli, errors
from collabtrain_trainer.config import PEER_ID_ENV, TrainerConfig
from collabtrain_trainer.coordinator import server


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "trainer.json"
    config = TrainerConfig(
        job="demo",
        coordinator_url="http://demo-coordinator.team-a.svc:7000",
    )
    path.write_text(config.model_dump_json())
    return path


def test_a_peer_without_an_id_refuses_to_start_instead_of_using_the_host_name(
    config_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_host_name() -> str:
        raise AssertionError("the peer id must not come from the host name")

    monkeypatch.setattr(socket, "gethostname", no_host_name)
    monkeypatch.setenv("COLLABTRAIN_PEER_TOKEN", "t")
    monkeypatch.delenv(PEER_ID_ENV, raising=False)
    monkeypatch.setenv("HOSTNAME", "some-host")
    monkeypatch.setenv("POD_NAME", "not-read-either")
    assert cli.main(["peer", "--config", str(config_path)]) == 2
    assert PEER_ID_ENV in capsys.readouterr().err


def test_the_coordinator_listens_on_the_ports_its_config_names(
    config_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[server.CoordinatorSettings] = []

    def fake_run(config: TrainerConfig, settings: server.CoordinatorSettings) -> int:
        seen.append(settings)
        return 0

    monkeypatch.setattr(server, "run_coordinator", fake_run)
    assert cli.main(["coordinator", "--config", str(config_path)]) == 0
    (settings,) = seen
    assert settings.port == 7000


def test_coordinator_ports_default_to_the_shared_constants() -> None:
    ports: dict[str, Any] = TrainerConfig(job="x").coordinator_ports()
    assert ports == {"http": 7000}


def test_local_runs_of_one_job_share_a_private_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from collabtrain_trainer.local import stored_job_key

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    first = stored_job_key("demo")
    assert len(first) == 64 and stored_job_key("demo") == first
    assert stored_job_key("other") != first
    path = tmp_path / "collabtrain" / "demo.job-key"
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("job", ["../escape", "a/b", "..", ".hidden", "", "dé", "x" * 300])
def test_a_job_name_that_is_not_a_plain_file_name_gets_no_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, job: str
) -> None:
    from collabtrain_trainer.local import stored_job_key

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    with pytest.raises(ValueError, match="cannot name its key file") as error:
        stored_job_key(job)
    assert repr(job) in str(error.value) and "rename the job" in str(error.value)
    assert not list(tmp_path.rglob("*.job-key"))
    assert stored_job_key("demo-1.v2_x")  # a plain name still works


@pytest.mark.parametrize(
    ("task", "cause"),
    [
        ("nosuchmodule:make_task", "No module named 'nosuchmodule'"),
        ("collabtrain_trainer.tasks:BUILTIN_TASKS", "is not callable"),
        ("collabtrain_trainer.tasks:shard_indices", "TypeError"),
    ],
)
def test_a_task_that_cannot_be_built_ends_the_peer_with_its_cause_for_the_operator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task: str, cause: str
) -> None:
    """Exit code 5 (TaskError), and the cause in the termination message the kubelet hands
    to the operator (in a pod the file exists: here a stand-in path)."""
    path = tmp_path / "trainer.json"
    path.write_text(
        TrainerConfig(job="demo", task=task, coordinator_url="http://127.0.0.1:9").model_dump_json()
    )
    termination_log = tmp_path / "termination-log"
    termination_log.touch()
    monkeypatch.setattr(errors, "TERMINATION_LOG", termination_log)
    monkeypatch.setenv("COLLABTRAIN_PEER_TOKEN", "t")
    monkeypatch.setenv(PEER_ID_ENV, "demo-peer-0-0")
    assert cli.main(["peer", "--config", str(path), "--advertise-host", "127.0.0.1"]) == 5
    message = termination_log.read_text()
    assert task in message and cause in message
