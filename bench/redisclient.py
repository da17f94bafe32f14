"""What the API's hand-written Redis connection (api/redispipe.py) saves over redis-py.

Every API request makes one Redis round trip: its rate-limit count, with the keys' generation read in
the same trip (two commands). This sends that trip N times from C concurrent callers on one event
loop, three ways, against the same Redis in the same run, rounds interleaved:

- `redispipe`: api/redispipe.Pipe, as the API sends it (one shared connection, replies parsed by hiredis);
- `redis-py pipeline`: redis.asyncio's pipeline (transaction=False) on a shared client (its pool);
- `redis-py plain`: the two commands as two awaited calls on the same client.

It prints calls a second and microseconds of CPU a call (process time, so Redis's own work is not
counted), and checks that every call got both replies.

    .venv/bin/python bench/redisclient.py [--calls 20000] [--clients 50] [--rounds 3] [--redis URL]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COMMANDS = (("INCR", "bench:redisclient:count"), ("GET", "bench:redisclient:generation"))


async def _drive(call, calls: int, clients: int) -> tuple[float, float]:
    """(calls a second, µs of CPU a call) for CALLS calls from CLIENTS concurrent callers."""
    left = calls
    replies = 0

    async def client() -> None:
        nonlocal left, replies
        while left > 0:
            left -= 1
            got = await call()
            assert len(got) == 2, got
            replies += 1

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert replies == calls, (replies, calls)
    return calls / wall, cpu / calls * 1e6


async def main(args: argparse.Namespace) -> None:
    import redis.asyncio as aioredis

    from api.redispipe import Pipe

    pipe = Pipe(args.redis)
    client = aioredis.Redis.from_url(args.redis, max_connections=args.clients)

    async def by_pipe():
        return await pipe.call(*COMMANDS)

    async def by_pipeline():
        async with client.pipeline(transaction=False) as p:
            for command in COMMANDS:
                p.execute_command(*command)
            return await p.execute()

    async def by_calls():
        return [await client.execute_command(*command) for command in COMMANDS]

    ways = {"redispipe": by_pipe, "redis-py pipeline": by_pipeline, "redis-py plain": by_calls}
    for call in ways.values():  # connections made and code warm before anything is timed
        await _drive(call, 500, args.clients)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, call in ways.items():
            results[name].append(await _drive(call, args.calls, args.clients))
    base = statistics.median(cpu for _, cpu in results["redispipe"])
    print(f"{args.calls:,} calls of 2 commands from {args.clients} concurrent callers, {args.rounds} rounds "
          f"(medians), Redis at {args.redis}")
    print(f"{'':20} {'calls/s':>10} {'CPU µs a call':>14} {'x redispipe':>12}")
    for name, rows in results.items():
        rate = statistics.median(r for r, _ in rows)
        cpu = statistics.median(c for _, c in rows)
        print(f"{name:20} {rate:10,.0f} {cpu:14.1f} {cpu / base:12.2f}")
    pipe.close()
    await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis", default=os.environ.get("INGOT_REDIS_URL", "redis://127.0.0.1:6379/15"))
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(main(args))
    except ImportError:
        asyncio.run(main(args))
