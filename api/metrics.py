"""Prometheus metrics at /metrics: HTTP traffic measured in this process, the rest read at scrape
time from PostgreSQL and Redis, so every API process reports the same truth about jobs and queues."""

from __future__ import annotations

import threading
import time
from functools import lru_cache
from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from starlette.types import Scope

from pipelines.core.settings import get_settings
from pipelines.jobs import status

REGISTRY = CollectorRegistry()
REQUESTS = Counter("ingot_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=REGISTRY)
LATENCY = Histogram("ingot_http_request_duration_seconds", "HTTP request latency", ["method", "route", "status"],
                    registry=REGISTRY)
RATE_LIMITED = Counter("ingot_http_rate_limited_total", "Requests refused past a rate limit, by limit",
                       ["limit"], registry=REGISTRY)
HEADERS_TIMED_OUT = Counter("ingot_http_connections_timed_out_total",
                            "Connections closed for not sending a request's headers in time (api.protocol)",
                            registry=REGISTRY)
STARTED = time.time()
ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, process_resident_memory_bytes, ...


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
        oldest = GaugeMetricFamily("ingot_queue_oldest_job_age_seconds",
                                   "How long the oldest queued job of each queue has waited (0: none waits): "
                                   "how far behind the workers are", labels=["queue"])
        for queue, age in sorted(status.oldest_queued().items()):
            oldest.add_metric([queue], age)
        yield oldest


class ProcessHealthCollector:
    """What this API process holds and reaches: database connections in use, Redis, its uptime."""

    def collect(self):
        from pipelines.core import adb
        from pipelines.core.db import get_engine

        pool = GaugeMetricFamily("ingot_db_pool_connections", "This process's database connections, by pool and state",
                                 labels=["pool", "state"])
        for name, limited in (("requests", True), ("other", False)):
            engine_pool = get_engine(limited=limited).pool
            pool.add_metric([name, "in_use"], engine_pool.checkedout())
            pool.add_metric([name, "idle"], engine_pool.checkedin())
        busy, idle = adb.in_use()
        pool.add_metric(["async", "in_use"], busy)
        pool.add_metric(["async", "idle"], idle)
        yield pool
        redis_up = GaugeMetricFamily("ingot_redis_up", "1 if Redis answered a PING at this scrape, else 0")
        redis_up.add_metric([], 1 if _redis_answers() else 0)
        yield redis_up
        uptime = GaugeMetricFamily("ingot_process_uptime_seconds", "Seconds since this API process started")
        uptime.add_metric([], time.time() - STARTED)
        yield uptime


def _redis_answers() -> bool:
    import redis

    from pipelines.core import embedded

    try:
        return bool(redis.Redis.from_url(embedded.redis_url(get_settings()), socket_timeout=1,
                                         socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


REGISTRY.register(DatabaseCollector())
REGISTRY.register(QueueCollector())
REGISTRY.register(ProcessHealthCollector())


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
    return LATENCY.labels(method, route, str(status)), REQUESTS.labels(method, route, str(status))


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
