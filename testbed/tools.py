"""Find or build the test bed's binaries: etcd, the Kubernetes control plane, kubectl,
kubelet, kube-proxy, CoreDNS, helm, KWOK, MinIO and Karpenter (its KWOK cloud provider,
with its CRDs beside it); and install the Debian packages real
nodes and image builds need (containerd, runc, buildah, ...).

Each tool is looked up in this order, the first acceptable copy winning:

1. the folder named by ``KUBEBUILDER_ASSETS`` (the controller-runtime envtest convention),
2. ``PATH``,
3. the cache ``${XDG_CACHE_HOME:-~/.cache}/collabtrain/tools/<name>-<version>/``,
4. a build with ``go`` from the Go module proxy at the pinned version, into that cache.

Copies found in 1. and 2. are accepted only when their version fits the pins (the API
server's minor, kubectl within one minor of it, an etcd new enough for it). Builds hold a
file lock, so two test runs that race build once. Run ``python -m testbed.tools`` to
provision everything ahead of time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

KUBERNETES_VERSION = "1.33.13"
ETCD_VERSION = "3.5.35"
KWOK_VERSION = "0.7.0"
HELM_VERSION = "3.19.5"
HELM_KUBERNETES_MINOR = 34  # the client-go minor helm 3.19 is built with
# MinIO tags releases as RELEASE.<date>, so the module proxy knows it by pseudo-version only.
MINIO_VERSION = "0.0.0-20260212201848-7aac2a2c5b7c"
COREDNS_VERSION = "1.15.0"
KARPENTER_VERSION = "1.15.0"
# Karpenter 1.15 needs Go 1.26.9 or newer; the Go module proxy serves this toolchain.
# Only Karpenter's build uses it.
KARPENTER_GO_TOOLCHAIN = "go1.27.3"

GO_PROXY = os.environ.get("GOPROXY", "https://proxy.golang.org").split(",")[0]
KUBERNETES_MINOR = int(KUBERNETES_VERSION.split(".")[1])


CNI_BIN = Path("/usr/lib/cni")  # where Debian's containernetworking-plugins puts them
# The Debian packages real nodes and image builds need, by a command each provides.
DEBIAN_PACKAGES = {
    "containerd": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "iptables": "iptables",
    "ip": "iproute2",
    "conntrack": "conntrack",
    str(CNI_BIN / "bridge"): "containernetworking-plugins",
    "buildah": "buildah",
    "debootstrap": "debootstrap",
}


class ToolError(RuntimeError):
    """A tool could not be found or built; the message says how to supply it."""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "collabtrain"


def log(message: str) -> None:
    print(f"[testbed] {message}", file=sys.stderr, flush=True)


def parse_version(text: str) -> tuple[int, ...] | None:
    match = re.search(r"v?(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(part) for part in match.groups()) if match else None


def binary_version(path: Path, *args: str) -> tuple[int, ...] | None:
    try:
        result = subprocess.run(
            [str(path), *args], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_version(result.stdout + result.stderr)


def same_kubernetes_minor(path: Path) -> bool:
    version = binary_version(path, "--version")
    return version is not None and version[:2] == (1, KUBERNETES_MINOR)


def kubectl_within_skew(path: Path) -> bool:
    version = binary_version(path, "version", "--client")
    return version is not None and version[0] == 1 and abs(version[1] - KUBERNETES_MINOR) <= 1


def etcd_fits(path: Path) -> bool:
    # Kubernetes 1.31+ needs the health endpoints of etcd 3.5.11 or newer (3.4 is too old).
    version = binary_version(path, "--version")
    return version is not None and (3, 5, 11) <= version < (3, 7, 0)


def helm_fits(path: Path) -> bool:
    version = binary_version(path, "version", "--short")
    return version is not None and version[0] == 3


def any_version(path: Path) -> bool:
    return os.access(path, os.X_OK)


@dataclass(frozen=True)
class Tool:
    name: str
    version: str
    accepts: Callable[[Path], bool]
    build: Callable[[Tool, Path], None]
    envtest_asset: bool = False  # shipped in a KUBEBUILDER_ASSETS folder

    @property
    def cache_dir(self) -> Path:
        return cache_root() / "tools" / f"{self.name}-{self.version}"


def go_binary_candidates() -> list[Path]:
    on_path = shutil.which("go")
    usual = [Path("/usr/local/go/bin/go"), Path.home() / "go/bin/go"]
    return [Path(on_path)] if on_path else [path for path in usual if path.is_file()]


def go_binary() -> str:
    found = go_binary_candidates()
    if not found:
        raise ToolError(
            "no `go` on PATH, so it cannot be built. Either install Go 1.24+ "
            "(https://go.dev/dl or your distribution's golang package), or supply the binaries: "
            "set KUBEBUILDER_ASSETS to a folder holding etcd, kube-apiserver, "
            "kube-controller-manager, kube-scheduler and kubectl, and put helm, kwok and minio "
            f"on PATH (or into {cache_root() / 'tools'}/<name>-<version>/)."
        )
    return str(found[0])


def run_go(
    args: list[str], workdir: Path, what: str, extra_env: dict[str, str] | None = None
) -> None:
    """Run one `go` command, printing a heartbeat so a long cold build visibly progresses."""
    env = {
        **os.environ,
        "GOFLAGS": "-mod=mod",
        "GOTOOLCHAIN": "local",
        "CGO_ENABLED": "0",
        "GOPROXY": os.environ.get("GOPROXY", "https://proxy.golang.org,direct"),
        **(extra_env or {}),
    }
    log_path = workdir / "build.log"
    started = time.monotonic()
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [go_binary(), *args], cwd=workdir, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
        while process.poll() is None:
            time.sleep(2)
            elapsed = time.monotonic() - started
            if int(elapsed) % 60 < 2:
                log(f"  still building {what} ({elapsed / 60:.0f} min so far, log: {log_path})")
    if process.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise ToolError(
            f"building {what} with `go {' '.join(args[:2])}` failed (exit {process.returncode}); "
            f"the end of {log_path}:\n{tail}"
        )
    log(f"  built {what} in {time.monotonic() - started:.0f} s")


def write_module(workdir: Path, requires: dict[str, str], replaces: dict[str, str]) -> None:
    lines = ["module collabtrain.local/toolbuild", "", "go 1.24.0", ""]
    lines += [f"require {module} {version}" for module, version in requires.items()]
    if replaces:
        lines += ["", "replace ("]
        lines += [f"\t{module} => {target}" for module, target in replaces.items()]
        lines.append(")")
    (workdir / "go.mod").write_text("\n".join(lines) + "\n")


def kubernetes_staging_replaces(version: str) -> dict[str, str]:
    """k8s.io/kubernetes requires its staging modules at v0.0.0, which the proxy does not
    serve; point each at its published v0.<minor>.<patch> (kubernetes/kubernetes#79384)."""
    url = f"{GO_PROXY}/k8s.io/kubernetes/@v/v{version}.mod"
    with urllib.request.urlopen(url, timeout=60) as response:
        go_mod = response.read().decode()
    staging = re.findall(r"^\s+(k8s\.io/[a-z0-9-]+) v0\.0\.0$", go_mod, flags=re.MULTILINE)
    published = "v0." + version.split(".", 1)[1]
    return {module: f"{module} {published}" for module in staging}


def build_kubernetes(tool: Tool, output: Path) -> None:
    major, minor, _ = KUBERNETES_VERSION.split(".")
    flags = [
        f"-X k8s.io/{pkg}.{key}={value}"
        for pkg in ("component-base/version", "client-go/pkg/version")
        for key, value in (
            ("gitVersion", f"v{KUBERNETES_VERSION}"),
            ("gitMajor", major),
            ("gitMinor", minor),
            ("gitTreeState", "clean"),
        )
    ]
    workdir = cache_root() / "build" / f"kubernetes-{KUBERNETES_VERSION}"
    workdir.mkdir(parents=True, exist_ok=True)
    write_module(
        workdir,
        {"k8s.io/kubernetes": f"v{KUBERNETES_VERSION}"},
        kubernetes_staging_replaces(KUBERNETES_VERSION),
    )
    ldflags = " ".join(["-s", "-w", *flags])
    package = f"k8s.io/kubernetes/cmd/{tool.name}"
    run_go(
        ["build", "-trimpath", "-ldflags", ldflags, "-o", str(output), package], workdir, tool.name
    )


def build_module_command(module: str, package: str) -> Callable[[Tool, Path], None]:
    """Build `package` from `module` at the tool's version inside a module of our own, for
    modules whose go.mod holds replace directives that `go install` refuses."""

    def build(tool: Tool, output: Path) -> None:
        workdir = cache_root() / "build" / f"{tool.name}-{tool.version}"
        workdir.mkdir(parents=True, exist_ok=True)
        write_module(workdir, {module: f"v{tool.version}"}, {})
        run_go(
            ["build", "-trimpath", "-ldflags", "-s -w", "-o", str(output), package],
            workdir,
            tool.name,
        )

    return build


def go_install(package: str, *version_flags: str) -> Callable[[Tool, Path], None]:
    """Build with `go install`, for modules whose go.mod has no replace directives.

    `version_flags` are `-X` settings a release build stamps in (`{version}` is filled).
    """

    def build(tool: Tool, output: Path) -> None:
        gobin = output.parent / "gobin"
        stamps = [f"-X {flag.format(version=tool.version)}" for flag in version_flags]
        ldflags = " ".join(["-s", "-w", *stamps])
        run_go(
            ["install", "-trimpath", "-ldflags", ldflags, f"{package}@v{tool.version}"],
            output.parent,
            tool.name,
            extra_env={"GOBIN": str(gobin), "GOFLAGS": ""},
        )
        shutil.move(str(gobin / tool.name), output)

    return build


def build_karpenter(tool: Tool, output: Path) -> None:
    """Karpenter with its KWOK cloud provider (NodeClaims become KWOK nodes), and its
    CRDs (NodePools, NodeClaims, NodeOverlays, CapacityBuffers, KWOKNodeClasses) copied
    into `crds/` beside the binary."""
    module = "sigs.k8s.io/karpenter"
    workdir = cache_root() / "build" / f"{tool.name}-{tool.version}"
    workdir.mkdir(parents=True, exist_ok=True)
    write_module(workdir, {module: f"v{tool.version}"}, {})
    toolchain = {"GOTOOLCHAIN": KARPENTER_GO_TOOLCHAIN}
    run_go(
        ["build", "-trimpath", "-ldflags", "-s -w", "-o", str(output), f"{module}/kwok"],
        workdir,
        tool.name,
        extra_env=toolchain,
    )
    source = subprocess.run(
        [go_binary(), "list", "-m", "-f", "{{.Dir}}", module],
        cwd=workdir,
        env={**os.environ, "GOFLAGS": "-mod=mod", **toolchain},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    crds = output.parent / "crds"
    crds.mkdir(exist_ok=True)
    for folder in ("pkg/apis/crds", "kwok/apis/crds"):
        for crd in (Path(source) / folder).glob("*.yaml"):
            shutil.copyfile(crd, crds / crd.name)


TOOLS: dict[str, Tool] = {
    tool.name: tool
    for tool in (
        Tool(
            "etcd",
            ETCD_VERSION,
            etcd_fits,
            build_module_command("go.etcd.io/etcd/server/v3", "go.etcd.io/etcd/server/v3"),
            envtest_asset=True,
        ),
        Tool("kube-apiserver", KUBERNETES_VERSION, same_kubernetes_minor, build_kubernetes, True),
        Tool(
            "kube-controller-manager", KUBERNETES_VERSION, same_kubernetes_minor, build_kubernetes
        ),
        Tool("kube-scheduler", KUBERNETES_VERSION, same_kubernetes_minor, build_kubernetes),
        Tool("kubectl", KUBERNETES_VERSION, kubectl_within_skew, build_kubernetes, True),
        # The real nodes: a kubelet and kube-proxy per node, CoreDNS for cluster DNS.
        Tool("kubelet", KUBERNETES_VERSION, same_kubernetes_minor, build_kubernetes),
        Tool("kube-proxy", KUBERNETES_VERSION, same_kubernetes_minor, build_kubernetes),
        Tool(
            "coredns",
            COREDNS_VERSION,
            any_version,
            build_module_command("github.com/coredns/coredns", "github.com/coredns/coredns"),
        ),
        Tool(
            "helm",
            HELM_VERSION,
            helm_fits,
            # What helm's release Makefile stamps: without it `helm version` says v3.19
            # and templates assume Kubernetes 1.20.
            go_install(
                "helm.sh/helm/v3/cmd/helm",
                "helm.sh/helm/v3/internal/version.version=v{version}",
                "helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1",
                f"helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor={HELM_KUBERNETES_MINOR}",
                "helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1",
                f"helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor={HELM_KUBERNETES_MINOR}",
            ),
        ),
        Tool("kwok", KWOK_VERSION, any_version, go_install("sigs.k8s.io/kwok/cmd/kwok")),
        Tool("minio", MINIO_VERSION, any_version, go_install("github.com/minio/minio")),
        Tool("karpenter", KARPENTER_VERSION, any_version, build_karpenter),
    )
}


def candidates(tool: Tool) -> list[Path]:
    found: list[Path] = []
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets:
        found.append(Path(assets) / tool.name)
    on_path = shutil.which(tool.name)
    if on_path:
        found.append(Path(on_path))
    return [path for path in found if path.is_file() and os.access(path, os.X_OK)]


def find(name: str, build: bool = True) -> Path:
    """Path of a working binary of tool `name`, building it into the cache if needed."""
    if name not in TOOLS:
        raise ToolError(f"unknown test-bed tool {name!r}; known: {', '.join(TOOLS)}")
    tool = TOOLS[name]
    for path in candidates(tool):
        if tool.accepts(path):
            return path
        log(f"ignoring {path}: its version does not fit {tool.name} {tool.version}")
    cached = tool.cache_dir / tool.name
    if cached.is_file():
        return cached
    if not build:
        raise ToolError(f"{tool.name} {tool.version} is not provisioned (looked in {cached})")
    try:
        go_binary()
    except ToolError as error:
        raise ToolError(
            f"{tool.name} {tool.version} was not found in KUBEBUILDER_ASSETS, on PATH or in "
            f"{tool.cache_dir}, and {error}"
        ) from None
    tool.cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(tool.cache_dir) + ".lock"):
        if cached.is_file():  # another run built it while we waited for the lock
            return cached
        log(f"building {tool.name} {tool.version} from the Go module proxy (once per machine)")
        staging = Path(tempfile.mkdtemp(prefix=f".{tool.name}-", dir=tool.cache_dir.parent))
        try:
            tool.build(tool, staging / tool.name)
            tool.cache_dir.mkdir(parents=True, exist_ok=True)
            for extra in staging.iterdir():  # files a build leaves beside its binary
                if extra.name != tool.name:
                    shutil.rmtree(tool.cache_dir / extra.name, ignore_errors=True)
                    shutil.move(extra, tool.cache_dir / extra.name)
            # The binary last, atomically: once it is there, the rest is too.
            os.replace(staging / tool.name, cached)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return cached


def missing_debian_packages() -> list[str]:
    missing = {
        package
        for command, package in DEBIAN_PACKAGES.items()
        if not (Path(command).exists() if command.startswith("/") else shutil.which(command))
    }
    return sorted(missing)


def ensure_debian_packages() -> None:
    """Install the Debian packages real nodes and image builds need (as root, once)."""
    if not missing_debian_packages():
        return
    cache_root().mkdir(parents=True, exist_ok=True)
    # `make test` prepares tools and images side by side, and both may get here.
    with FileLock(str(cache_root() / "apt.lock")):
        missing = missing_debian_packages()
        if not missing:
            return
        command = f"apt-get update && apt-get install -y {' '.join(missing)}"
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise ToolError(
                f"missing Debian packages {', '.join(missing)}: run `{command}` as root"
            )
        log(f"installing Debian packages: {' '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *missing]):
            result = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
            if result.returncode != 0:
                raise ToolError(
                    f"`{' '.join(argv)}` failed (exit {result.returncode}); install by hand "
                    f"with `{command}`:\n{result.stderr[-2000:]}"
                )


def find_all(names: list[str]) -> list[Path]:
    return [find(name) for name in names]


def provision_all() -> dict[str, Path]:
    """Every tool, in two streams on a cold machine: the Kubernetes binaries (one module,
    built one after the other) beside the rest; a build spends much of its time
    downloading or linking on one core, so two streams finish well before one."""
    kubernetes = [name for name, tool in TOOLS.items() if tool.build is build_kubernetes]
    others = [name for name in TOOLS if name not in kubernetes]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for stream in [pool.submit(find_all, names) for names in (kubernetes, others)]:
            stream.result()
    return {name: find(name) for name in TOOLS}


def main() -> int:
    started = time.monotonic()
    try:
        ensure_debian_packages()
        paths = provision_all()
    except (ToolError, RuntimeError) as error:
        log(f"error: {error}")
        return 1
    for name, path in paths.items():
        print(f"{name:24} {path}")
    log(f"all tools ready in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
