"""Image builds without building: prerequisites, archive freshness, the base's trimming, the
build's mounts and the error a failed step raises."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed import images


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    images.images_dir().mkdir(parents=True)
    return images.images_dir()


def test_an_archive_of_the_current_image_is_not_written_again(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (cache / "pause.tar").write_text("archive")
    (cache / "pause.id").write_text("abc123\n")

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("exported although the image did not change")

    monkeypatch.setattr(images, "run_logged", must_not_run)
    recipe = images.Recipe(images.PAUSE_IMAGE, "pause", images.build_pause)
    assert images.export(recipe, "abc123", cache / "pause.log") == cache / "pause.tar"


def test_a_changed_image_replaces_its_archive_and_stamp(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (cache / "pause.tar").write_text("old")
    (cache / "pause.id").write_text("old-id\n")
    pushed: list[str] = []

    def fake_push(args: list[str], what: str, log_path: Path) -> None:
        destination = args[-1]
        pushed.append(destination)
        Path(destination.split(":")[1]).write_text("new")

    monkeypatch.setattr(images, "run_logged", fake_push)
    recipe = images.Recipe(images.PAUSE_IMAGE, "pause", images.build_pause)
    archive = images.export(recipe, "new-id", cache / "pause.log")
    assert archive.read_text() == "new"
    assert (cache / "pause.id").read_text() == "new-id\n"
    assert pushed == [f"docker-archive:{cache / '.pause.tar.partial'}:{images.PAUSE_IMAGE}"]
    assert not (cache / ".pause.tar.partial").exists()


def test_the_base_loses_apt_lists_caches_and_the_hosts_resolver(tmp_path: Path) -> None:
    for name in ("var/lib/apt/lists/deb.debian.org_Packages", "var/cache/apt/pkgcache.bin"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    (tmp_path / "usr/share/doc/python3").mkdir(parents=True)
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/python3").write_text("keep")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/resolv.conf").write_text("nameserver 10.0.0.1\n")
    images.trim_rootfs(tmp_path)
    assert list((tmp_path / "var/lib/apt/lists").iterdir()) == []
    assert list((tmp_path / "var/cache/apt").iterdir()) == []
    assert list((tmp_path / "usr/share/doc").iterdir()) == []
    assert (tmp_path / "usr/bin/python3").read_text() == "keep"
    assert (tmp_path / "etc/resolv.conf").read_text() == ""


def test_python_images_get_the_base_the_uv_cache_and_the_ca_bundle_read_only(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "uv"))
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(images, "bud", lambda *args: calls.append(tuple(map(str, args))))
    monkeypatch.setattr(images, "HOST_CA_BUNDLE", tmp_path / "ca.crt")
    (tmp_path / "ca.crt").write_text("certs")
    images.python_image("trainer-image/Dockerfile")(images.TRAINER_IMAGE, cache / "t.log")
    [call] = calls
    assert call[0] == images.TRAINER_IMAGE
    assert call[1] == str(images.REPO_ROOT / "trainer-image/Dockerfile")
    extra = call[4:]
    assert f"BASE_IMAGE={images.BASE_IMAGE}" in extra
    assert f"UV_CACHE_DIR={images.UV_CACHE_IN_BUILD}" in extra
    assert f"{tmp_path / 'uv'}:{images.UV_CACHE_IN_BUILD}" in extra
    assert f"{tmp_path / 'ca.crt'}:{tmp_path / 'ca.crt'}:ro" in extra


def test_a_failed_step_names_itself_and_its_log(tmp_path: Path) -> None:
    log_path = tmp_path / "step.log"
    with pytest.raises(images.ImageError) as raised:
        images.run_logged(["sh", "-c", "echo boom; exit 3"], "building x", log_path)
    message = str(raised.value)
    assert message.startswith("building x failed (`sh` exited 3)")
    assert str(log_path) in message
    assert "boom" in message
