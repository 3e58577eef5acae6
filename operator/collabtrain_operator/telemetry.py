"""The operator's OpenTelemetry metrics, served in the Prometheus format on /metrics."""

from __future__ import annotations

from collections.abc import Iterable
from wsgiref.simple_server import WSGIServer

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import start_http_server

from collabtrain_operator.api import PeerCounts

# Replacement latency is seconds to minutes: a spot node's pod is recreated at once but
# waits for the scheduler.
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


class Telemetry:
    def __init__(self, *, metrics_port: int | None) -> None:
        self._reader = PrometheusMetricReader()
        self._provider = MeterProvider(
            resource=Resource.create({"service.name": "collabtrain-operator"}),
            metric_readers=[self._reader],
        )
        self._server: WSGIServer | None = None
        if metrics_port is not None:
            self._server, _ = start_http_server(metrics_port)
        meter = self._provider.get_meter("collabtrain_operator")
        self._peers: dict[tuple[str, str], PeerCounts] = {}
        self.reconciles = meter.create_counter(
            "collabtrain_operator_reconciles", description="Reconciliations by result."
        )
        self.preemptions = meter.create_counter(
            "collabtrain_operator_preemptions", description="Peers lost to preemption."
        )
        self.failures = meter.create_counter(
            "collabtrain_operator_failures", description="Peers that exited with an error."
        )
        self.pods_created = meter.create_counter(
            "collabtrain_operator_pods_created", description="Peer pods created."
        )
        self.api_requests = meter.create_counter(
            "collabtrain_operator_api_requests",
            description="Requests the operator sent to the Kubernetes API, by method and resource.",
        )
        self.replacement_latency = meter.create_histogram(
            "collabtrain_operator_replacement_latency",
            unit="s",
            description="From a lost peer observed to its replacement pod created.",
            explicit_bucket_boundaries_advisory=list(_LATENCY_BUCKETS),
        )
        self.reconcile_duration = meter.create_histogram(
            "collabtrain_operator_reconcile_duration", unit="s", description="One reconciliation."
        )
        meter.create_observable_gauge(
            "collabtrain_operator_peers",
            callbacks=[self._observe_peers],
            description="Peers by state (desired, active, ready, pending, on_demand) and job.",
        )

    def record_peers(self, namespace: str, job: str, counts: PeerCounts | None) -> None:
        if counts is None:
            self._peers.pop((namespace, job), None)
        else:
            self._peers[(namespace, job)] = counts

    def record_api_request(self, method: str, resource: str) -> None:
        self.api_requests.add(1, {"method": method, "resource": resource})

    def _observe_peers(self, options: CallbackOptions) -> Iterable[Observation]:
        for (namespace, job), counts in list(self._peers.items()):
            for state, value in counts.model_dump().items():
                yield Observation(value, {"namespace": namespace, "job": job, "state": state})

    def shutdown(self) -> None:
        self._provider.shutdown()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
