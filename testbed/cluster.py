"""A real Kubernetes control plane, KWOK and MinIO on loopback, for tests and the demo.

`ControlPlane` starts etcd and kube-apiserver, and, unless `api_only`, the
controller-manager (Deployments, ReplicaSets, garbage collection, namespace deletion) and
the scheduler. `Kwok` simulates nodes and pod lifecycles at scale. `MinioServer` is a real
S3 endpoint. All bind 127.0.0.1 on free ports and clean up after themselves.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import secrets
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from testbed import tools
from testbed.processes import ManagedProcess, ensure_port_free, free_port, wait_until

SERVICE_CIDR = "10.96.0.0/16"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


@dataclass
class Pki:
    """A throwaway CA, the API server's serving certificate, its client certificate for
    kubelets, and the service-account keys."""

    directory: Path
    address: str = "127.0.0.1"

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def serving_cert(self) -> Path:
        return self.directory / "apiserver.crt"

    @property
    def serving_key(self) -> Path:
        return self.directory / "apiserver.key"

    @property
    def kubelet_client_cert(self) -> Path:
        return self.directory / "apiserver-kubelet-client.crt"

    @property
    def kubelet_client_key(self) -> Path:
        return self.directory / "apiserver-kubelet-client.key"

    @property
    def sa_key(self) -> Path:
        return self.directory / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.directory / "sa.pub"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    def generate(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        ca_key = _key()
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "collabtrain-testbed-ca")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        self.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        self.ca_key.write_bytes(_pem_key(ca_key))
        self.ca_key.chmod(0o600)
        names: list[x509.GeneralName] = [
            x509.DNSName(name)
            for name in ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc")
        ]
        ips = {"127.0.0.1", "10.96.0.1", self.address}
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in sorted(ips)]
        self.issue("kube-apiserver", None, self.serving_cert, self.serving_key, names)
        # What the API server shows a kubelet when it fetches logs or runs exec.
        self.issue(
            "kube-apiserver-kubelet-client",
            "system:masters",
            self.kubelet_client_cert,
            self.kubelet_client_key,
        )
        sa_key = _key()
        self.sa_key.write_bytes(_pem_key(sa_key))
        self.sa_pub.write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def issue(
        self,
        common_name: str,
        organization: str | None,
        cert_path: Path,
        key_path: Path,
        names: list[x509.GeneralName] | None = None,
    ) -> None:
        """A key and a certificate signed by this CA: a serving certificate for `names`, or
        a client certificate of user `common_name` in group `organization`."""
        ca = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
        assert isinstance(ca_key, rsa.RSAPrivateKey)
        subject = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        if organization:
            subject.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
        now = datetime.datetime.now(datetime.UTC)
        key = _key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert_path.write_bytes(
            builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
        )
        key_path.write_bytes(_pem_key(key))
        key_path.chmod(0o600)


@dataclass
class ControlPlane:
    """etcd + kube-apiserver (+ controller-manager + scheduler unless `api_only`).

    The API server listens on `address`: loopback by default; the real nodes' host bridge
    address when pods must reach it through the `kubernetes` Service.
    """

    api_only: bool = False
    address: str = "127.0.0.1"
    apiserver_port: int | None = None
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="collabtrain-cp-")))
    processes: list[ManagedProcess] = field(default_factory=list)
    token: str = field(default_factory=lambda: secrets.token_hex(16))

    @property
    def url(self) -> str:
        return f"https://{self.address}:{self.apiserver_port}"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def pki(self) -> Pki:
        return Pki(self.workdir / "pki", self.address)

    def start(self) -> ControlPlane:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        started = time.monotonic()
        binaries = {
            name: tools.find(name)
            for name in ("etcd", "kube-apiserver")
            + (() if self.api_only else ("kube-controller-manager", "kube-scheduler"))
        }
        if self.apiserver_port is None:
            self.apiserver_port = free_port()
        ensure_port_free(self.apiserver_port, "kube-apiserver", "--secure-port", self.address)
        self.pki.generate()
        etcd_port, etcd_peer_port = free_port(), free_port()
        etcd = self._spawn(
            "etcd",
            [
                str(binaries["etcd"]),
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer_port}",
                f"--initial-cluster=default=http://127.0.0.1:{etcd_peer_port}",
                "--unsafe-no-fsync",  # throwaway data: durability costs seconds per test
                "--log-level=warn",
            ],
        )
        wait_until(
            lambda: b'"health":"true"' in http_get(f"http://127.0.0.1:{etcd_port}/health"),
            "etcd to become healthy",
            process=etcd,
        )

        tokens = self.workdir / "tokens.csv"
        tokens.write_text(f'{self.token},admin,admin-uid,"system:masters"\n')
        tokens.chmod(0o600)
        disabled = "ServiceAccount" if self.api_only else ""  # no token controller to serve it
        apiserver = self._spawn(
            "kube-apiserver",
            [
                str(binaries["kube-apiserver"]),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                f"--bind-address={self.address}",
                f"--advertise-address={self.address}",
                f"--secure-port={self.apiserver_port}",
                f"--tls-cert-file={self.pki.serving_cert}",
                f"--tls-private-key-file={self.pki.serving_key}",
                f"--client-ca-file={self.pki.ca_cert}",
                f"--kubelet-client-certificate={self.pki.kubelet_client_cert}",
                f"--kubelet-client-key={self.pki.kubelet_client_key}",
                # Node names are not in any DNS the API server asks.
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                f"--token-auth-file={tokens}",
                # Kubelets act as themselves: the Node authorizer and NodeRestriction let a
                # node touch only its own Node and the pods bound to it.
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={self.pki.sa_pub}",
                f"--service-account-signing-key-file={self.pki.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                f"--disable-admission-plugins={disabled}",
                "--profiling=false",
            ],
        )
        self.write_kubeconfig(self.kubeconfig)
        wait_until(
            lambda: http_get(f"{self.url}/readyz", self.token, self.pki.ca_cert) == b"ok",
            "kube-apiserver /readyz",
            timeout=90,
            process=apiserver,
        )
        if not self.api_only:
            cm_port, scheduler_port = free_port(), free_port()
            controller_manager = self._spawn(
                "kube-controller-manager",
                [
                    str(binaries["kube-controller-manager"]),
                    f"--kubeconfig={self.kubeconfig}",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={cm_port}",
                    "--leader-elect=false",
                    f"--service-account-private-key-file={self.pki.sa_key}",
                    f"--root-ca-file={self.pki.ca_cert}",
                    "--use-service-account-credentials=false",
                    "--concurrent-gc-syncs=5",
                ],
            )
            scheduler = self._spawn(
                "kube-scheduler",
                [
                    str(binaries["kube-scheduler"]),
                    f"--kubeconfig={self.kubeconfig}",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={scheduler_port}",
                    "--leader-elect=false",
                ],
            )
            for process, port in ((controller_manager, cm_port), (scheduler, scheduler_port)):
                healthz = f"https://127.0.0.1:{port}/healthz"
                wait_until(
                    lambda url=healthz: http_get(url) == b"ok",  # type: ignore[misc]
                    f"{process.name} /healthz",
                    process=process,
                )
        parts = "API server" if self.api_only else "control plane"
        print(f"[testbed] {parts} ready at {self.url} in {time.monotonic() - started:.1f} s")

    def crash_and_restart(self, name: str) -> None:
        """SIGKILL one of the control plane's processes ("etcd", "kube-apiserver") and
        start it again as it was, keeping its data; returns once the API server is ready."""
        index = next(i for i, p in enumerate(self.processes) if p.name == name)
        crashed = self.processes[index]
        crashed.kill()
        restarted = ManagedProcess(name, crashed.argv, crashed.log_path)
        self.processes[index] = restarted
        wait_until(
            lambda: http_get(f"{self.url}/readyz", self.token, self.pki.ca_cert) == b"ok",
            f"kube-apiserver /readyz after {name} restarted",
            timeout=90,
            process=restarted,
        )

    def _spawn(self, name: str, argv: list[str]) -> ManagedProcess:
        process = ManagedProcess(name, argv, self.workdir / f"{name}.log")
        self.processes.append(process)
        return process

    def write_node_kubeconfig(self, node: str, path: Path) -> None:
        """A kubeconfig for the kubelet of `node`: a client certificate of user
        `system:node:<node>` in group `system:nodes`, as kubelet TLS bootstrap would give."""
        cert, key = path.with_suffix(".crt"), path.with_suffix(".key")
        self.pki.issue(f"system:node:{node}", "system:nodes", cert, key)
        user = {"client-certificate": str(cert), "client-key": str(key)}
        self.write_kubeconfig(path, user)

    def write_kubeconfig(self, path: Path, user: dict[str, str] | None = None) -> None:
        ca_data = base64.b64encode(self.pki.ca_cert.read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "testbed",
                    "cluster": {"server": self.url, "certificate-authority-data": ca_data},
                }
            ],
            "users": [{"name": "admin", "user": user or {"token": self.token}}],
            "contexts": [{"name": "testbed", "context": {"cluster": "testbed", "user": "admin"}}],
            "current-context": "testbed",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)


def http_get(url: str, token: str | None = None, ca: Path | None = None) -> bytes:
    context = ssl.create_default_context(cafile=str(ca)) if ca else ssl._create_unverified_context()
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=5, context=context) as response:
        return bytes(response.read())


@dataclass
class Kwok:
    """KWOK managing the nodes annotated `kwok.x-k8s.io/node: fake` and their pods."""

    kubeconfig: Path
    # Seconds from a node's creation to Ready: 0, or what a cloud VM takes to boot.
    node_start_delay_s: float = 0.0
    workdir: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="collabtrain-kwok-"))
    )
    process: ManagedProcess | None = None

    def start(self) -> Kwok:
        port = free_port()
        argv = [
            str(tools.find("kwok")),
            f"--kubeconfig={self.kubeconfig}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
            "--cidr=10.0.0.1/16",
            "--node-ip=10.0.0.1",
            f"--server-address=127.0.0.1:{port}",
        ]
        if self.node_start_delay_s:
            stages = self.workdir / "stages.yaml"
            stages.write_text(kwok_node_stages(self.node_start_delay_s))
            argv.append(f"--config={stages}")
        self.process = ManagedProcess("kwok", argv, self.workdir / "kwok.log")
        wait_until(
            lambda: http_get(f"http://127.0.0.1:{port}/healthz") == b"ok",
            "kwok /healthz",
            process=self.process,
        )
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def kwok_node_stages(delay_s: float) -> str:
    """Node stages that boot a node the way a kubelet does: NotReady at once (so the
    node controller taints it not-ready and nothing is scheduled there), Ready `delay_s`
    later. KWOK's own initialize and heartbeat stages are read from its module source
    (where its build left it); given any node stage, KWOK uses none of its defaults."""
    cache = subprocess.run(
        [tools.go_binary(), "env", "GOMODCACHE"], capture_output=True, text=True, check=True
    ).stdout.strip()
    source = Path(cache) / f"sigs.k8s.io/kwok@v{tools.KWOK_VERSION}/kustomize/stage/node"
    ready = '.status.conditions.[] | select( .type == "Ready" ) | .status'
    booting = {
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": "Stage",
        "metadata": {"name": "node-booting"},
        "spec": {
            "resourceRef": {"apiGroup": "v1", "kind": "Node"},
            "selector": {"matchExpressions": [{"key": ready, "operator": "DoesNotExist"}]},
            "next": {
                "statusTemplate": (
                    "conditions:\n"
                    "- type: Ready\n"
                    "  status: 'False'\n"
                    "  reason: KubeletNotReady\n"
                    "  message: booting\n"
                    "  lastHeartbeatTime: {{ Now | Quote }}\n"
                    "  lastTransitionTime: {{ Now | Quote }}\n"
                )
            },
        },
    }
    initialize = yaml.safe_load((source / "fast" / "node-initialize.yaml").read_text())
    initialize["spec"]["selector"] = {
        "matchExpressions": [{"key": ready, "operator": "In", "values": ["False"]}]
    }
    initialize["spec"]["delay"] = {"durationMilliseconds": int(delay_s * 1000)}
    heartbeat = yaml.safe_load((source / "heartbeat" / "node-heartbeat.yaml").read_text())
    return yaml.safe_dump_all([booting, initialize, heartbeat])


def kwok_node(
    name: str,
    labels: dict[str, str] | None = None,
    taints: list[dict[str, str]] | None = None,
    cpu: str = "32",
    memory: str = "256Gi",
    gpus: int = 0,
) -> dict[str, Any]:
    """A Node manifest KWOK will manage (heartbeats, Ready, running its pods)."""
    capacity = {"cpu": cpu, "memory": memory, "pods": "110"}
    if gpus:
        capacity["nvidia.com/gpu"] = str(gpus)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_NODE_ANNOTATION: "fake"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                **(labels or {}),
            },
        },
        "spec": {"taints": taints or []},
        "status": {"allocatable": capacity, "capacity": capacity},
    }


@dataclass
class MinioServer:
    """A real MinIO server on `address` (loopback by default); `stop()` + `start()` keep its
    data and port."""

    address: str = "127.0.0.1"
    access_key: str = "collabtrain-test"
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    port: int = field(default_factory=free_port)
    workdir: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="collabtrain-minio-"))
    )
    process: ManagedProcess | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def start(self) -> MinioServer:
        ensure_port_free(self.port, "minio", "--address", self.address)
        console_port = free_port()
        self.process = ManagedProcess(
            "minio",
            [
                str(tools.find("minio")),
                "server",
                str(self.workdir / "data"),
                f"--address={self.address}:{self.port}",
                f"--console-address=127.0.0.1:{console_port}",
                "--quiet",
            ],
            self.workdir / "minio.log",
            env={
                "MINIO_ROOT_USER": self.access_key,
                "MINIO_ROOT_PASSWORD": self.secret_key,
                "MINIO_BROWSER": "off",
                "MINIO_UPDATE": "off",
            },
        )
        wait_until(
            lambda: http_get(f"{self.url}/minio/health/ready") == b"",
            "MinIO /minio/health/ready",
            process=self.process,
        )
        return self

    def stop(self) -> None:
        """Stop the server, keeping its data (an outage, not a wipe)."""
        if self.process is not None:
            self.process.stop()
            self.process = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def s3_env(self) -> dict[str, str]:
        """The environment a trainer reads this server's credentials from."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def shard_store(self, bucket: str, prefix: str) -> Any:
        """The trainer's reader of the data shards under `prefix` (listed)."""
        from collabtrain_trainer.config import TrainerConfig
        from collabtrain_trainer.dataset import ShardStore

        config = TrainerConfig.model_validate(
            {
                "job": "shards",
                "checkpoint": {"endpoint": self.endpoint, "bucket": bucket, "secure": False},
                "data": {"prefix": prefix},
            }
        )
        store = ShardStore(config, self.s3_env())
        store.list()
        return store

    def client(self) -> Any:
        from minio import Minio

        return Minio(self.endpoint, self.access_key, self.secret_key, secure=False)


def describe(value: Any) -> str:
    return json.dumps(value, indent=1, default=str)[:2000]
