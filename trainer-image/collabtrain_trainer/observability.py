"""Logs, metrics and traces for the coordinator and the peers.

- Logs are JSON lines on stderr carrying job, peer, step and round (`log_context`).
- Metrics go through the OpenTelemetry SDK into the Prometheus client registry, served as
  `/metrics` by each process; OTLP is added when `OTEL_EXPORTER_OTLP_ENDPOINT` is set and
  the OTLP exporter is installed.
- Traces (round phases) use the OpenTelemetry SDK; exported through OTLP when configured.

Secrets: nothing here logs request headers; callers never put the token in a message.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

__all__ = [
    "CONTENT_TYPE_LATEST",
    "LogContext",
    "configure_logging",
    "log_context",
    "metrics_text",
    "setup_telemetry",
    "timed",
]


@dataclass
class LogContext:
    """Fields every log line carries; the runtime updates them as it goes."""

    job: str = ""
    peer: str = ""
    step: int | None = None
    round: int | None = None


log_context = LogContext()

_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "job": log_context.job,
        }
        if log_context.peer:
            entry["peer"] = log_context.peer
        if log_context.step is not None:
            entry["step"] = log_context.step
        if log_context.round is not None:
            entry["round"] = log_context.round
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(job: str, peer: str = "", level: str | None = None) -> None:
    log_context.job = job
    log_context.peer = peer
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or os.environ.get("COLLABTRAIN_LOG_LEVEL", "INFO"))
    # aiohttp's access log would print one line per heartbeat.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _otlp_readers() -> list[MetricReader]:
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return []
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter,
        )
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    except ImportError:
        logging.getLogger(__name__).warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter is not installed; "
            "install opentelemetry-exporter-otlp-proto-http to export metrics"
        )
        return []
    return [PeriodicExportingMetricReader(OTLPMetricExporter())]


def _add_otlp_spans(provider: TracerProvider) -> None:
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter,
        )
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        return
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))


_configured = False


def setup_telemetry(service: str, job: str, instance: str) -> tuple[metrics.Meter, trace.Tracer]:
    """Install the meter and tracer providers once per process; return a meter and tracer."""
    global _configured
    if not _configured:
        resource = Resource.create(
            {"service.name": service, "service.instance.id": instance, "collabtrain.job": job}
        )
        readers: list[MetricReader] = [PrometheusMetricReader(), *_otlp_readers()]
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))
        tracer_provider = TracerProvider(resource=resource)
        _add_otlp_spans(tracer_provider)
        trace.set_tracer_provider(tracer_provider)
        _configured = True
    return metrics.get_meter("collabtrain"), trace.get_tracer("collabtrain")


def metrics_text() -> bytes:
    return generate_latest(REGISTRY)


@contextmanager
def timed() -> Iterator[list[float]]:
    """`with timed() as elapsed: ...` then `elapsed[0]` holds the seconds taken."""
    elapsed = [0.0]
    start = time.perf_counter()
    try:
        yield elapsed
    finally:
        elapsed[0] = time.perf_counter() - start
