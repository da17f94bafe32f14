"""Webhook benchmark: N job-end events at a steady rate, delivered by a real worker to a local
receiver; deliveries/s and the p50/p99 latency from the event's commit to its receipt, beside a plain
loop of httpx POSTs to the same receiver.

    .venv/bin/python bench/webhooks.py [--events 10000] [--rate 200]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from harness import Bench, free_port


def receive(port: int, log_path: str, ready) -> None:
    log = open(log_path, "a", buffering=1)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            log.write(f"{self.headers.get('webhook-id', '-')} {time.time():.6f}\n")
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    ready.set()
    server.serve_forever()


WORKER = ["--pool", "prefork", "--concurrency", "4"]  # as `ingot up` runs its webhooks worker



def fire(events: int, rate: float) -> None:
    """End EVENTS jobs at RATE a second, relaying after each commit as a worker does."""
    from sqlalchemy import text

    from pipelines.core.db import get_engine
    from worker.dispatch import relay_webhooks

    per_tick = max(1, round(rate * 0.02))  # one commit every 20 ms
    began = time.perf_counter()
    for sent in range(0, events, per_tick):
        n = min(per_tick, events - sent)
        with get_engine().begin() as conn:
            ids = conn.execute(text(
                "INSERT INTO jobs (id, kind, state, progress, records_processed, records_failed, "
                "params, result, sources, queue, attempts, timeout_seconds, checkpoint) "
                "SELECT 'job_bench' || lpad((:start + g)::text, 20, '0'), 'ingestion', 'running', 0, 0, 0, "
                "'{}', '{}', '{}', 'ingest', 1, 60, '{}' FROM generate_series(0, :n - 1) g RETURNING id"
            ), {"start": sent, "n": n}).scalars().all()
            # the job ends: its event is written by the trigger, in this transaction
            conn.execute(text("UPDATE jobs SET state = 'succeeded', finished_at = now() WHERE id = ANY(:ids)"),
                         {"ids": ids})
        relay_webhooks()
        pause = began + (sent + n) / rate - time.perf_counter()
        if pause > 0:
            time.sleep(pause)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=200)
    args = parser.parse_args()
    port = free_port()
    bench = Bench("", worker_args=["--queues", "webhooks", *WORKER],
                  INGOT_WEBHOOK_ALLOW_PRIVATE="true")
    log_path = str(bench.home / "received.log")
    ready = multiprocessing.Event()
    server = multiprocessing.Process(target=receive, args=(port, log_path, ready), daemon=True)
    server.start()
    ready.wait(30)
    try:
        bench.start()
        from cli.client import Client

        with Client(f"http://127.0.0.1:{bench.port}", bench.key) as client:
            client.request("POST", "/webhooks", json={"url": f"http://127.0.0.1:{port}/hook",
                                                      "events": ["ingestion.completed"]})
        began = time.perf_counter()
        fire(args.events, args.rate)
        deadline = time.monotonic() + 120
        while sum(1 for _ in open(log_path)) < args.events and time.monotonic() < deadline:
            time.sleep(0.2)
        webhook_seconds = time.perf_counter() - began

        import httpx
        from sqlalchemy import text

        from pipelines.core.db import get_engine

        with get_engine().connect() as conn:
            committed = {i: t.timestamp() for i, t in conn.execute(text("SELECT id, created_at FROM webhook_events"))}
        latencies = []
        for line in open(log_path):
            event_id, at = line.split()
            if event_id in committed:
                latencies.append((float(at) - committed[event_id]) * 1000)
        with httpx.Client() as http:
            plain_began = time.perf_counter()
            for _ in range(args.events):
                http.post(f"http://127.0.0.1:{port}/plain", content=b'{"type":"plain"}')
            plain_seconds = time.perf_counter() - plain_began
    finally:
        bench.stop()
        server.terminate()
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    print(f"events: {args.events:,} fired at {args.rate:g}/s; delivered {len(latencies):,}")
    print(f"Ingot webhooks: {len(latencies) / webhook_seconds:8,.0f} deliveries/s over the run; latency from "
          f"commit to receipt p50 {p(0.5):.1f} ms, p99 {p(0.99):.1f} ms, max {latencies[-1]:.1f} ms, "
          f"mean {statistics.mean(latencies):.1f} ms")
    print(f"plain httpx POST loop: {args.events / plain_seconds:8,.0f} requests/s")


if __name__ == "__main__":
    main()
