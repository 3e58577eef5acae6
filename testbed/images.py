"""Build the test bed's container images daemonless with buildah, and write each as an archive
that `ctr images import` loads.

- ``localhost/collabtrain/base:bookworm``: Debian's minbase with Python 3 (debootstrap), made
  once per machine. No image registry is reachable here, so the Dockerfiles' production bases
  (python:3.11-slim, pytorch/pytorch) cannot be pulled; both images build on this one.
- ``localhost/collabtrain/pause:1``: the pod sandbox, the static program in testbed/pause.
- the operator and trainer images, from the repository's Dockerfiles with ``BASE_IMAGE`` set
  to the base. ``buildah bud --layers`` keeps every step's layer, so a source change rebuilds
  a small layer, never torch.

PyPI is reached through a TLS proxy whose CA only the host trusts: RUN steps get the host's
CA bundle mounted read-only over the base's, and the host's uv cache (so torch is copied from
it, not downloaded), both through ``--volume``; neither ends up in an image.

The archives (uncompressed docker-archive, which names the image for a plain `ctr images
import`) live in ``${XDG_CACHE_HOME:-~/.cache}/collabtrain/images/<name>.tar`` and are
written again only when the image id changed. A file lock makes concurrent runs build once.
Run ``python -m testbed.images`` to build everything ahead of time (as root); ``--check``
also runs each image's entrypoint as its non-root user.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from testbed.tools import ToolError, cache_root, ensure_debian_packages, go_binary, log

BASE_IMAGE = "localhost/collabtrain/base:bookworm"
PAUSE_IMAGE = "localhost/collabtrain/pause:1"
OPERATOR_IMAGE = "localhost/collabtrain-operator:testbed"
TRAINER_IMAGE = "localhost/collabtrain-trainer:testbed"

REPO_ROOT = Path(__file__).resolve().parent.parent
PAUSE_SOURCE = REPO_ROOT / "testbed" / "pause"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# Where RUN steps see the host's uv cache (the Dockerfiles' UV_CACHE_DIR build argument): a
# folder every Debian root has, so the mount point leaves no empty folder in a layer.
UV_CACHE_IN_BUILD = "/mnt"
# Build-context files no image needs; bytecode the host's test runs leave in the source
# would otherwise make a COPY miss the layer cache.
IGNORED_IN_CONTEXT = ("**/__pycache__", "**/*.pyc")
BUILDAH = ("buildah", "--storage-driver", "overlay")


class ImageError(RuntimeError):
    """An image could not be built or exported; the message says what and where its log is."""


@dataclass(frozen=True)
class BuiltImage:
    ref: str
    image_id: str  # buildah's image id (hex sha256)
    archive: Path  # uncompressed docker-archive for `ctr images import`


def images_dir() -> Path:
    return cache_root() / "images"


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise ImageError("building images needs root (debootstrap, buildah's overlay storage)")
    ensure_debian_packages()  # buildah and debootstrap among them


def run_logged(
    args: list[str],
    what: str,
    log_path: Path,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> None:
    """Run one build command, its output appended to `log_path`, with a heartbeat a minute."""
    started = time.monotonic()
    with log_path.open("a") as log_file:
        log_file.write(f"$ {shlex.join(args)}\n")
        log_file.flush()
        process = subprocess.Popen(
            args,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        while True:
            try:
                process.wait(timeout=60)
                break
            except subprocess.TimeoutExpired:
                minutes = (time.monotonic() - started) / 60
                log(f"  still {what} ({minutes:.0f} min so far, log: {log_path})")
    if process.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise ImageError(
            f"{what} failed (`{args[0]}` exited {process.returncode}); the end of {log_path}:\n"
            + tail
        )


def buildah(*args: str) -> str:
    """A short buildah command's stdout; its error output goes into the exception."""
    result = subprocess.run([*BUILDAH, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ImageError(f"`buildah {shlex.join(args)}` failed: {result.stderr.strip()}")
    return result.stdout.strip()


def image_id(ref: str) -> str | None:
    result = subprocess.run(
        [*BUILDAH, "inspect", "--type", "image", "--format", "{{.FromImageID}}", ref],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return None  # no image of that name
    return result.stdout.strip() or None


def trim_rootfs(root: Path) -> None:
    """Drop what only apt and people read: package lists, caches, logs, documentation."""
    for pattern in (
        "var/lib/apt/lists/*",
        "var/cache/apt/*",
        "var/cache/debconf/*-old",
        "var/log/*",
        "usr/share/doc/*",
        "usr/share/man/*",
        "usr/share/info/*",
    ):
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    # debootstrap copies the host's; the runtime provides the container's own.
    for name in ("etc/resolv.conf", "etc/hostname"):
        (root / name).write_text("")


def build_base(log_path: Path) -> None:
    """debootstrap straight into a scratch container's root, then commit it."""
    container = buildah("from", "scratch")
    try:
        root = Path(buildah("mount", container))
        packages = ",".join(BASE_PACKAGES)
        debootstrap = ["debootstrap", "--variant=minbase", f"--include={packages}"]
        run_logged([*debootstrap, DEBIAN_SUITE, str(root), DEBIAN_MIRROR], "debootstrap", log_path)
        trim_rootfs(root)
        buildah("umount", container)
        buildah(
            "config",
            "--env",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--env",
            "LANG=C.UTF-8",
            "--cmd",
            "/bin/bash",
            container,
        )
        buildah("commit", "--quiet", container, BASE_IMAGE)
    finally:
        subprocess.run([*BUILDAH, "rm", container], capture_output=True, check=False)


def ensure_base() -> None:
    if image_id(BASE_IMAGE) is not None:
        return
    log_path = images_dir() / "logs" / "base.log"
    log_path.write_text("")
    log(f"making {BASE_IMAGE} with debootstrap (once per machine; log: {log_path})")
    started = time.monotonic()
    build_base(log_path)
    log(f"  made {BASE_IMAGE} in {time.monotonic() - started:.0f} s")


def host_uv_cache() -> Path:
    configured = os.environ.get("UV_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "uv"


def bud(ref: str, dockerfile: Path, context: Path, log_path: Path, *extra: str) -> None:
    ignore_file = images_dir() / "context.dockerignore"
    ignore_file.write_text("\n".join(IGNORED_IN_CONTEXT) + "\n")
    # --force-rm: a failed step's container (for the trainer, gigabytes) is not left behind.
    args = [*BUILDAH, "bud", "--layers", "--force-rm", "--pull=never", "--network=host"]
    args += ["--ignorefile", str(ignore_file), "--file", str(dockerfile), "--tag", ref]
    run_logged([*args, *extra, str(context)], f"building {ref}", log_path)


def python_image(dockerfile: str) -> Callable[[str, Path], None]:
    """A build of one of the repository's Dockerfiles on the test bed's base."""

    def build(ref: str, log_path: Path) -> None:
        uv_cache = host_uv_cache()
        uv_cache.mkdir(parents=True, exist_ok=True)
        extra = ["--build-arg", f"BASE_IMAGE={BASE_IMAGE}"]
        extra += ["--build-arg", f"UV_CACHE_DIR={UV_CACHE_IN_BUILD}"]
        extra += ["--volume", f"{uv_cache}:{UV_CACHE_IN_BUILD}"]
        if HOST_CA_BUNDLE.is_file():
            extra += ["--volume", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"]
        bud(ref, REPO_ROOT / dockerfile, REPO_ROOT, log_path, *extra)

    return build


def build_pause(ref: str, log_path: Path) -> None:
    context = images_dir() / "pause-context"
    context.mkdir(exist_ok=True)
    env = {**os.environ, "CGO_ENABLED": "0", "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod"}
    try:
        go = go_binary()
    except ToolError as error:
        raise ImageError(f"the pause program cannot be compiled: {error}") from None
    # No VCS stamp: the binary, and so the image id, must not change with every commit.
    flags = ["-trimpath", "-buildvcs=false", "-ldflags=-s -w"]
    output = str(context / "pause")
    compile_it = [go, "build", *flags, "-o", output, "."]
    run_logged(compile_it, "compiling the pause program", log_path, cwd=PAUSE_SOURCE, env=env)
    bud(ref, PAUSE_SOURCE / "Dockerfile", context, log_path)


@dataclass(frozen=True)
class Recipe:
    ref: str
    name: str  # of its archive and log
    build: Callable[[str, Path], None]


RECIPES = (
    Recipe(PAUSE_IMAGE, "pause", build_pause),
    Recipe(OPERATOR_IMAGE, "collabtrain-operator", python_image("operator/Dockerfile")),
    Recipe(TRAINER_IMAGE, "collabtrain-trainer", python_image("trainer-image/Dockerfile")),
)


def export(recipe: Recipe, current_id: str, log_path: Path) -> Path:
    """The image's archive, written again only when the image id changed."""
    archive = images_dir() / f"{recipe.name}.tar"
    stamp = archive.with_suffix(".id")
    if archive.is_file() and stamp.is_file() and stamp.read_text().strip() == current_id:
        return archive
    started = time.monotonic()
    partial = archive.with_name(f".{archive.name}.partial")
    partial.unlink(missing_ok=True)
    stamp.unlink(missing_ok=True)
    push = [*BUILDAH, "push", "--quiet", current_id, f"docker-archive:{partial}:{recipe.ref}"]
    try:
        run_logged(push, f"exporting {recipe.ref}", log_path)
    except ImageError:
        partial.unlink(missing_ok=True)  # gigabytes for the trainer
        raise
    os.replace(partial, archive)  # atomic: a reader never sees half an archive
    stamp.write_text(current_id + "\n")
    size = archive.stat().st_size / 2**20
    log(f"  exported {recipe.ref} ({size:.0f} MiB) in {time.monotonic() - started:.0f} s")
    return archive


def ensure_image(recipe: Recipe) -> BuiltImage:
    log_path = images_dir() / "logs" / f"{recipe.name}.log"
    log_path.write_text("")
    started = time.monotonic()
    previous_id = image_id(recipe.ref)
    recipe.build(recipe.ref, log_path)
    current_id = image_id(recipe.ref)
    if current_id is None:
        raise ImageError(f"building {recipe.ref} left no image of that name (log: {log_path})")
    if previous_id not in (None, current_id):
        # The replaced image, now untagged, and the layers only it used (an old torch layer
        # is gigabytes); the layers the new image shares stay. Refused while in use: fine.
        subprocess.run([*BUILDAH, "rmi", previous_id], capture_output=True, check=False)
    log(f"  {recipe.ref} is {current_id[:12]} ({time.monotonic() - started:.0f} s)")
    return BuiltImage(recipe.ref, current_id, export(recipe, current_id, log_path))


def ensure_images() -> list[BuiltImage]:
    """Build (or find current) the pause, operator and trainer images and their archives."""
    check_prerequisites()
    (images_dir() / "logs").mkdir(parents=True, exist_ok=True)
    with FileLock(str(images_dir() / "build.lock")):
        ensure_base()
        return [ensure_image(recipe) for recipe in RECIPES]


# What `--check` runs in each image, as the images' non-root user.
SMOKE_TESTS = {
    OPERATOR_IMAGE: [["collabtrain-operator", "--help"]],
    TRAINER_IMAGE: [
        ["collabtrain-trainer", "--help"],
        ["python", "-c", "import torch; print('torch', torch.__version__)"],
    ],
}


def smoke_test(ref: str, commands: list[list[str]]) -> None:
    """Run `commands` in a throwaway container of `ref` as UID 65532 (buildah run)."""
    container = buildah("from", "--pull=never", "--quiet", ref)
    try:
        for command in commands:
            output = buildah("run", "--user", "65532:65532", container, "--", *command)
            log(f"  {ref}: `{' '.join(command)}` ok: {output.splitlines()[0]}")
    finally:
        subprocess.run([*BUILDAH, "rm", container], capture_output=True, check=False)


def main() -> int:
    started = time.monotonic()
    try:
        built = ensure_images()
        if "--check" in sys.argv[1:]:
            for ref, commands in SMOKE_TESTS.items():
                smoke_test(ref, commands)
    except (ImageError, ToolError) as error:
        log(f"error: {error}")
        return 1
    for image in built:
        size = image.archive.stat().st_size / 2**20
        print(f"{image.ref:40} {image.image_id[:12]} {size:6.0f} MiB {image.archive}")
    log(f"images ready in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
