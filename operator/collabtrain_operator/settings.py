"""The operator's settings: from the command line (main) or the environment the chart
gives it. A setting that is wrong raises ConfigurationError naming it."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collabtrain_operator import rendering

# The environment the chart gives the operator.
MASTER_KEY_FILE_ENV = "COLLABTRAIN_MASTER_KEY_FILE"
NETWORK_POLICIES_ENV = "COLLABTRAIN_NETWORK_POLICIES"
OPERATOR_NAMESPACE_ENV = "COLLABTRAIN_OPERATOR_NAMESPACE"
OPERATOR_POD_LABELS_ENV = "COLLABTRAIN_OPERATOR_POD_LABELS"
METRICS_FROM_ENV = "COLLABTRAIN_METRICS_FROM"
# The master key is random, 32 bytes or more (the chart makes 64 characters).
MIN_MASTER_KEY_BYTES = 32


class ConfigurationError(ValueError):
    """The operator's settings are unusable; the message names the setting."""


def read_master_key(path: str | None) -> bytes:
    """The operator's master key, from the file the chart mounts from its Secret. Every
    job's key (and through it every credential of the job) is derived from it."""
    if not path:
        raise ConfigurationError(
            f"no master key: set {MASTER_KEY_FILE_ENV} (or --master-key-file) to a file "
            f"holding at least {MIN_MASTER_KEY_BYTES} random bytes; the Helm chart mounts "
            "one from its Secret"
        )
    try:
        key = Path(path).read_bytes().strip()
    except OSError as error:
        raise ConfigurationError(
            f"the master key file {path} ({MASTER_KEY_FILE_ENV}) cannot be read: {error.strerror}"
        ) from None
    if len(key) < MIN_MASTER_KEY_BYTES:
        raise ConfigurationError(
            f"the master key file {path} ({MASTER_KEY_FILE_ENV}) is empty or shorter than "
            f"{MIN_MASTER_KEY_BYTES} bytes"
        )
    return key


def _json_env(name: str, default: Any, kind: type) -> Any:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = json.loads(text)
    except ValueError as error:
        raise ConfigurationError(f"{name} is not valid JSON: {error}") from None
    if not isinstance(value, kind):
        raise ConfigurationError(f"{name} must be a JSON {kind.__name__}")
    return value


def _bool_env(name: str, default: bool) -> bool:
    text = os.environ.get(name, "").strip().lower()
    if not text:
        return default
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ConfigurationError(f"{name} must be true or false, not {text!r}")


def network_access_from_env() -> rendering.NetworkAccess:
    labels = _json_env(OPERATOR_POD_LABELS_ENV, {}, dict)
    metrics_from = _json_env(METRICS_FROM_ENV, [], list)
    if not all(isinstance(key, str) and isinstance(v, str) for key, v in labels.items()):
        raise ConfigurationError(f"{OPERATOR_POD_LABELS_ENV} must map label names to strings")
    if not all(isinstance(peer, dict) for peer in metrics_from):
        raise ConfigurationError(f"{METRICS_FROM_ENV} must be a list of NetworkPolicyPeers")
    return rendering.NetworkAccess(
        operator_namespace=os.environ.get(OPERATOR_NAMESPACE_ENV) or None,
        operator_labels=labels,
        metrics_from=tuple(metrics_from),
    )


@dataclass(frozen=True)
class OperatorOptions:
    """Operator settings, from the command line (main) or the environment."""

    metrics_port: int | None = 8080
    reconcile_interval_seconds: float = 10.0
    # Where the operator reaches a job's coordinator. The default is the Service's DNS
    # name; an operator running outside the cluster (tests) points it elsewhere.
    coordinator_url_template: str = "http://{service}.{namespace}.svc:{port}"
    master_key_file: str | None = None
    # Render each job's NetworkPolicies (a job may still turn its own off).
    network_policies: bool = True
    network_access: rendering.NetworkAccess = field(default_factory=rendering.NetworkAccess)

    @classmethod
    def from_env(cls) -> OperatorOptions:
        """Raises ConfigurationError naming the variable that is wrong."""
        port = os.environ.get("COLLABTRAIN_METRICS_PORT", "8080")
        return cls(
            metrics_port=int(port) if port not in ("", "off") else None,
            reconcile_interval_seconds=float(
                os.environ.get("COLLABTRAIN_RECONCILE_INTERVAL_SECONDS", "10")
            ),
            coordinator_url_template=os.environ.get(
                "COLLABTRAIN_COORDINATOR_URL_TEMPLATE", cls.coordinator_url_template
            ),
            master_key_file=os.environ.get(MASTER_KEY_FILE_ENV) or None,
            network_policies=_bool_env(NETWORK_POLICIES_ENV, True),
            network_access=network_access_from_env(),
        )

    def coordinator_url(self, job: str, namespace: str) -> str:
        return self.coordinator_url_template.format(
            service=rendering.ChildNames(job).coordinator,
            namespace=namespace,
            port=rendering.COORDINATOR_PORTS["http"],
            job=job,
        )


def warn_if_operator_shut_out(options: OperatorOptions) -> None:
    """One warning at start-up when the jobs' NetworkPolicies will not let the operator
    in: without its namespace and pod labels they name no operator pods. Not an error:
    runs outside the chart (the bench, a local run) have neither, and a CNI that does not
    enforce NetworkPolicy lets the operator through anyway."""
    if not options.network_policies or options.network_access.operator_peer() is not None:
        return
    missing = [
        variable
        for variable, value in (
            (OPERATOR_NAMESPACE_ENV, options.network_access.operator_namespace),
            (OPERATOR_POD_LABELS_ENV, options.network_access.operator_labels),
        )
        if not value
    ]
    logging.getLogger(__name__).warning(
        "%s not set: the jobs' NetworkPolicies will let no operator pod reach the "
        "coordinators, so on a CNI that enforces NetworkPolicy the operator cannot read "
        "a coordinator's /status (progress, completion) nor ask it to drain or checkpoint. "
        "Set %s and %s (the Helm chart sets both), or %s=false",
        " and ".join(missing),
        OPERATOR_NAMESPACE_ENV,
        OPERATOR_POD_LABELS_ENV,
        NETWORK_POLICIES_ENV,
    )
