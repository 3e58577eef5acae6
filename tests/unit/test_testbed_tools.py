"""Tool provisioning: lookup order, version checks and the error when nothing can supply a tool."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from testbed import tools


def fake_binary(folder: Path, name: str, version_output: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\necho '{version_output}'\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No tools anywhere: empty PATH, no KUBEBUILDER_ASSETS, an empty cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    monkeypatch.setattr(tools, "go_binary_candidates", lambda: [])
    return tmp_path


def test_kubebuilder_assets_wins_over_path(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    minor = tools.KUBERNETES_MINOR
    assets = fake_binary(isolated / "assets", "kube-apiserver", f"Kubernetes v1.{minor}.1")
    fake_binary(isolated / "empty-path", "kube-apiserver", f"Kubernetes v1.{minor}.2")
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(assets.parent))
    assert tools.find("kube-apiserver") == assets


def test_a_binary_of_the_wrong_version_is_skipped_for_the_cache(isolated: Path) -> None:
    fake_binary(isolated / "empty-path", "kube-apiserver", "Kubernetes v1.20.0")
    cached = fake_binary(
        tools.TOOLS["kube-apiserver"].cache_dir, "kube-apiserver", "Kubernetes v1.99.0"
    )
    assert tools.find("kube-apiserver") == cached


def test_kubectl_within_one_minor_is_accepted(isolated: Path) -> None:
    minor = tools.KUBERNETES_MINOR
    near = fake_binary(isolated / "empty-path", "kubectl", f"Client Version: v1.{minor - 1}.4")
    assert tools.find("kubectl") == near
    near.unlink()
    fake_binary(isolated / "empty-path", "kubectl", f"Client Version: v1.{minor - 2}.0")
    with pytest.raises(tools.ToolError):
        tools.find("kubectl")


def test_etcd_too_old_for_this_kubernetes_is_refused(isolated: Path) -> None:
    fake_binary(isolated / "empty-path", "etcd", "etcd Version: 3.4.23")
    assert not tools.etcd_fits(isolated / "empty-path" / "etcd")
    fake_binary(isolated / "ok", "etcd", "etcd Version: 3.5.35")
    assert tools.etcd_fits(isolated / "ok" / "etcd")


def test_missing_tool_and_no_go_names_the_tool_and_the_ways_to_supply_it(isolated: Path) -> None:
    with pytest.raises(tools.ToolError) as error:
        tools.find("kube-scheduler")
    message = str(error.value)
    assert "kube-scheduler" in message
    assert "no `go` on PATH" in message
    assert "KUBEBUILDER_ASSETS" in message


def test_not_building_reports_where_it_looked(isolated: Path) -> None:
    with pytest.raises(tools.ToolError, match=r"minio .* is not provisioned"):
        tools.find("minio", build=False)


def test_unknown_tool_is_refused() -> None:
    with pytest.raises(tools.ToolError, match="unknown test-bed tool"):
        tools.find("no-such-tool")


def test_cache_location_follows_xdg(isolated: Path) -> None:
    tool = tools.TOOLS["helm"]
    assert tool.cache_dir == isolated / "cache" / "collabtrain" / "tools" / f"helm-{tool.version}"
    assert os.environ["XDG_CACHE_HOME"] in str(tool.cache_dir)


def test_a_missing_package_names_itself_and_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tools, "DEBIAN_PACKAGES", {"/nonexistent/tool": "some-package"})
    monkeypatch.setattr(tools.os, "geteuid", lambda: 1000)
    with pytest.raises(tools.ToolError) as failure:
        tools.ensure_debian_packages()
    message = str(failure.value)
    assert "some-package" in message
    assert "apt-get update && apt-get install -y some-package" in message
    assert "\n" not in message
