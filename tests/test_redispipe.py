"""The API's shared Redis connection: many requests' commands interleaved on it, each call answered
with its own replies, errors kept to the call that caused them, and a lost connection opened again."""

from __future__ import annotations

import asyncio
import os

import pytest
import redis

from api.redispipe import Pipe


def run(coroutine):
    return asyncio.run(coroutine)


def test_interleaved_calls_each_get_their_own_replies():
    async def scenario() -> list:
        pipe = Pipe(os.environ["INGOT_REDIS_URL"])

        async def one(i: int) -> list:
            key = f"ingot:test:pipe:{i}"
            return await pipe.call(("SET", key, i), ("INCRBY", key, i), ("GET", key), ("DEL", key))

        try:
            return await asyncio.gather(*(one(i) for i in range(200)))
        finally:
            pipe.close()

    replies = run(scenario())
    assert replies == [[b"OK", 2 * i, str(2 * i).encode(), 1] for i in range(200)]


def test_an_error_reply_fails_its_own_call_only():
    async def scenario() -> tuple:
        pipe = Pipe(os.environ["INGOT_REDIS_URL"])
        try:
            await pipe.call(("SET", "ingot:test:pipe:text", "x"))
            failed = asyncio.ensure_future(pipe.call(("INCR", "ingot:test:pipe:text")))
            fine = asyncio.ensure_future(pipe.call(("GET", "ingot:test:pipe:text"), ("DEL", "ingot:test:pipe:text")))
            with pytest.raises(redis.ResponseError, match="not an integer"):
                await failed
            return await fine
        finally:
            pipe.close()

    assert run(scenario()) == [b"x", 1]


def test_a_dropped_connection_is_opened_again_and_an_unreachable_redis_is_a_redis_error():
    async def scenario() -> list:
        pipe = Pipe(os.environ["INGOT_REDIS_URL"])
        try:
            assert await pipe.call(("PING",)) == [b"PONG"]
            pipe.close()  # as when Redis restarts
            return await pipe.call(("PING",))
        finally:
            pipe.close()

    assert run(scenario()) == [b"PONG"]

    async def nowhere() -> None:
        await Pipe("redis://127.0.0.1:9/0", timeout=2).call(("PING",))

    with pytest.raises(redis.ConnectionError):
        run(nowhere())
