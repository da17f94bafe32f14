"""Prometheus metrics at /metrics: HTTP traffic measured in this process, the rest read at scrape
time from PostgreSQL and Redis, so every API process reports the same truth about jobs and queues."""

from __future__ import annotations

import threading
import time
from functools import lru_cache
from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from starlette.types import Scope

from pipelines.core.settings import get_settings
from pipelines.jobs import status

REGISTRY = CollectorRegistry()
REQUESTS = Counter("ingot_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=REGISTRY)
LATENCY = Histogram("ingot_http_request_duration_seconds", "HTTP request latency", ["method", "route"],
                    registry=REGISTRY)


class DatabaseCollector:
    """Jobs, records and webhook attempts, counted where they are recorded: aggregated in SQL, and
    kept for a few seconds so that several scrapers (or one eager one) cost one read."""

    TTL = 10.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cached: tuple[float, status.Counts] | None = None

    def _counts(self) -> status.Counts:
        with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] > self.TTL:
                self._cached = (time.monotonic(), status.counts())
            return self._cached[1]

    def collect(self):
        counts = self._counts()
        family = GaugeMetricFamily("ingot_jobs", "Jobs by kind and state", labels=["kind", "state"])
        for (kind, state), n in sorted(counts.jobs.items()):
            family.add_metric([kind, state], n)
        yield family
        durations = HistogramMetricFamily("ingot_job_duration_seconds", "Job run time", labels=["kind"])
        for kind, histogram in sorted(counts.durations.items()):
            buckets = [(f"{bound:g}", n) for bound, n in sorted(histogram.buckets.items())]
            durations.add_metric([kind], buckets + [("+Inf", histogram.count)], histogram.total)
        yield durations
        ingested = CounterMetricFamily("ingot_records_ingested", "Rows loaded, by source", labels=["source"])
        quarantined = CounterMetricFamily("ingot_records_quarantined", "Rows quarantined, by source",
                                          labels=["source"])
        for source, ok, bad in counts.sources:
            ingested.add_metric([source], ok)
            quarantined.add_metric([source], bad)
        yield ingested
        yield quarantined
        deliveries = CounterMetricFamily("ingot_webhook_attempts", "Webhook delivery attempts by outcome",
                                         labels=["outcome"])
        for outcome, n in sorted(counts.attempts.items()):
            deliveries.add_metric([outcome], n)
        yield deliveries
        paused = GaugeMetricFamily("ingot_webhook_endpoints_paused",
                                   "Webhook endpoints paused by their circuit breaker (failing, probed now and then)")
        paused.add_metric([], counts.paused_endpoints)
        yield paused
        deleted = CounterMetricFamily("ingot_retention_deleted_rows", "Rows deleted by retention, by table",
                                      labels=["table"])
        for table, n in sorted(counts.deleted.items()):
            deleted.add_metric([table], n)
        yield deleted


class QueueCollector:
    def collect(self):
        from api.broker import broker_status, queue_depths

        family = GaugeMetricFamily("ingot_queue_depth", "Messages waiting, by queue", labels=["queue"])
        if broker_status():
            for queue, depth in queue_depths().items():
                family.add_metric([queue], depth)
        yield family


REGISTRY.register(DatabaseCollector())
REGISTRY.register(QueueCollector())


def route_template(scope: Scope) -> str:
    """The route template (/api/v1/jobs/{job_id}), never the raw path: labels stay bounded."""
    route = scope.get("route")
    if route is None:
        return "unmatched"
    known = _templates.get(id(route))
    if known is not None and known[0] is route:
        return known[1]
    # The route's own path, behind the prefixes it was included under (which hold no parameters): the
    # same for every request it serves.
    own = route.path_format
    parts = scope["path"].split("/")
    template = "/".join(parts[:len(parts) - own.count("/")]) + own
    _templates[id(route)] = (route, template)
    return template


_templates: dict[int, tuple[Any, str]] = {}  # routes are not hashable


@lru_cache(maxsize=1)
def _requests_by_key() -> Counter:
    """One series per key, route and status: registered only where INGOT_METRICS_KEY_LABELS asks for it."""
    return Counter("ingot_http_requests_by_key_total", "HTTP requests by API key (or user) id",
                   ["method", "route", "status", "key_id"], registry=REGISTRY)


@lru_cache(maxsize=4096)
def _series(method: str, route: str, status: int) -> tuple[Any, Any]:
    """The latency and count series of one method, route and status (labels() looked up once each)."""
    return LATENCY.labels(method, route), REQUESTS.labels(method, route, str(status))


def observe(method: str, route: str, status: int, seconds: float, key_id: str | None) -> None:
    """Count one answered request (see api.access)."""
    latency, requests = _series(method, route, status)
    latency.observe(seconds)
    requests.inc()
    if get_settings().metrics_key_labels:  # off by default: one series per key
        _requests_by_key().labels(method, route, str(status), key_id or "none").inc()


def install(app: FastAPI) -> None:
    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
