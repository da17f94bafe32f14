"""Heavy readers beside pollers: does one reader's expensive query make everyone else wait?

    .venv/bin/python bench/readers.py [--rows 5000000] [--heavy 8] [--pollers 20] [--seconds 20]

A source of --rows observations; then, for --seconds, --heavy clients send the most expensive queries
the contract allows (`POST /data/query` sorted by value, a fresh filter each time so no total is
cached, a page 2,000 deep) while --pollers clients poll `GET /jobs/{id}` and one polls `/health`, all
against one `ingot api` process as it runs in production. It prints each kind's answers by status
and their p50/p99 (goals: pollers' p99 under 100 ms, `/health`'s under 50 ms), beside the same
pollers alone first (the baseline, same run), and fails unless every request got an answer (a heavy
query past the time limit answers 422 QUERY_TOO_EXPENSIVE).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter

import httpx
from harness import ROOT, Bench, LeanClient, free_port, rank, servers_with_a_job


async def clients(port: int, key: str, job_id: str, heavy: int, pollers: int, seconds: float) -> list:
    """Every client's answers as (kind, status, seconds) until SECONDS have passed. Each client is one
    keep-alive connection of `LeanClient`: the load shares the two cores with the server, and httpx's
    own CPU (about 3 ms a request here) and event loop would be counted in every latency."""
    results: list[tuple[str, int, float]] = []
    stop = time.monotonic() + seconds
    chance = random.Random(7)

    async def timed(client: LeanClient, kind: str, method: str, path: str, body: bytes = b"") -> None:
        began = time.perf_counter()
        try:
            status, _answer = await asyncio.wait_for(client.request(method, path, body), 60)
        except (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError):
            status = 0  # no answer at all
            client.close()
        results.append((kind, status, time.perf_counter() - began))

    async def heavy_client() -> None:
        client = LeanClient("127.0.0.1", port, {"X-API-Key": key})
        while time.monotonic() < stop:
            body = {"filters": {"value_range": {"min": chance.uniform(0, 50)}},
                    "sort": {"field": "value", "order": "desc"}, "pagination": {"page": 2000, "limit": 50}}
            await timed(client, "heavy query", "POST", "/api/v1/data/query", json.dumps(body).encode())
        client.close()

    async def poller(path: str, kind: str, pause: float) -> None:
        client = LeanClient("127.0.0.1", port, {"X-API-Key": key})
        while time.monotonic() < stop:
            await timed(client, kind, "GET", path)
            await asyncio.sleep(pause)
        client.close()

    await asyncio.gather(*(heavy_client() for _ in range(heavy)),
                         *(poller(f"/api/v1/jobs/{job_id}", "GET /jobs/{id}", 0.05) for _ in range(pollers)),
                         poller("/health", "GET /health", 0.05))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--heavy", type=int, default=8)
    parser.add_argument("--pollers", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    bench = Bench("", INGOT_LOG_LEVEL="WARNING")
    port = free_port()
    api = None
    try:
        from sqlalchemy import text

        from pipelines.core.db import autocommit, driver, get_engine
        from pipelines.ingestion import partitions

        key, job_id = servers_with_a_job()
        began = time.monotonic()
        with get_engine().begin() as connection:
            partitions.ensure(driver(connection), "heavy")
            connection.execute(text(
                "INSERT INTO observations (source, id, timestamp, value, metadata) "
                "SELECT 'heavy', 'r' || g, timestamptz '2026-01-01' + g * interval '1 second', "
                "(g::bigint * 7919 % 100000) / 1000.0, '{}' FROM generate_series(1, :n) g"), {"n": args.rows})
        with autocommit() as connection:
            connection.execute(text("VACUUM ANALYZE observations"))
        print(f"{args.rows:,} rows written in {time.monotonic() - began:.1f} s")
        api = subprocess.Popen([sys.executable, "-m", "cli.main", "api", "--no-migrate"], cwd=ROOT,
                               env=dict(os.environ, INGOT_API_PORT=str(port)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/api/v1/jobs/{job_id}", headers={"X-API-Key": key}).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the API did not come up")
            time.sleep(0.2)
        # The baseline first, in the same run: the pollers alone, on the same machine and server.
        alone = asyncio.run(clients(port, key, job_id, 0, args.pollers, args.seconds))
        beside = asyncio.run(clients(port, key, job_id, args.heavy, args.pollers, args.seconds))
    finally:
        if api is not None:
            api.terminate()
            api.wait(30)
        bench.stop()
    print(f"{args.pollers} pollers alone, then beside {args.heavy} heavy readers, {args.seconds:g} s each; "
          f"one API process, {os.cpu_count()} cores shared")
    unanswered = 0
    for label, results in (("alone", alone), ("beside heavy", beside)):
        for kind in ("heavy query", "GET /jobs/{id}", "GET /health"):
            times = sorted(t * 1000 for k, _s, t in results if k == kind)
            if not times:
                continue
            statuses = Counter(s for k, s, _t in results if k == kind)
            unanswered += statuses.get(0, 0)
            print(f"{label:13} {kind:15} {len(times):6} requests  p50 {rank(times, 0.5):8.1f} ms  "
                  f"p99 {rank(times, 0.99):8.1f} ms  "
                  f"answers {dict(sorted(statuses.items()))}")
    if unanswered:
        raise SystemExit(f"{unanswered} requests got no answer")


if __name__ == "__main__":
    main()
