"""Prometheus metrics at /metrics: HTTP traffic measured in this process, the rest read at scrape
time from PostgreSQL and Redis, so every API process reports the same truth about jobs and queues."""

from __future__ import annotations

import time
from collections.abc import Iterator

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from pipelines.jobs import status

REGISTRY = CollectorRegistry()
REQUESTS = Counter("ingot_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=REGISTRY)
LATENCY = Histogram("ingot_http_request_duration_seconds", "HTTP request latency", ["method", "route"],
                    registry=REGISTRY)
_DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600)


class DatabaseCollector:
    """Jobs, records and webhook attempts, counted where they are recorded."""

    def collect(self):
        counts = status.counts()
        family = GaugeMetricFamily("ingot_jobs", "Jobs by kind and state", labels=["kind", "state"])
        for kind, state, n in counts.jobs:
            family.add_metric([kind, state], n)
        yield family
        yield from self._durations(counts.durations)
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
        for outcome, n in counts.attempts:
            deliveries.add_metric([outcome], n)
        yield deliveries

    @staticmethod
    def _durations(rows: list[tuple[str, float]]) -> Iterator[HistogramMetricFamily]:
        by_kind: dict[str, list[float]] = {}
        for kind, seconds in rows:
            by_kind.setdefault(kind, []).append(float(seconds))
        family = HistogramMetricFamily("ingot_job_duration_seconds", "Job run time", labels=["kind"])
        for kind, values in by_kind.items():
            buckets = [(str(b), sum(v <= b for v in values)) for b in _DURATION_BUCKETS]
            family.add_metric([kind], buckets + [("+Inf", len(values))], sum(values))
        yield family


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


def route_template(request: Request) -> str:
    """The route template (/api/v1/jobs/{job_id}), never the raw path: labels stay bounded."""
    if request.scope.get("route") is None:
        return "unmatched"
    params = {str(v): k for k, v in request.path_params.items()}
    parts = request.url.path.split("/")
    return "/".join(f"{{{params[part]}}}" if part in params else part for part in parts)


def install(app: FastAPI) -> None:
    @app.middleware("http")
    async def measure(request: Request, call_next):
        began = time.perf_counter()
        response = await call_next(request)
        path = route_template(request)
        LATENCY.labels(request.method, path).observe(time.perf_counter() - began)
        REQUESTS.labels(request.method, path, str(response.status_code)).inc()
        return response

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
