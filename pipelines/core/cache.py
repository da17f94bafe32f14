"""A small read-through cache in Redis, shared by every API process, for answers that change only
when data is loaded (the curve dimensions). Writers drop the entries they make stale once their
transaction commits; a TTL bounds how long a missed drop (Redis unreachable then) can last."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any

import redis

from pipelines.core import embedded
from pipelines.core.settings import get_settings

log = logging.getLogger(__name__)
PREFIX = "ingot:cache:"
TTL_SECONDS = 300


def _client() -> redis.Redis:
    return _client_for(embedded.redis_url(get_settings()))


@functools.lru_cache(maxsize=4)
def _client_for(url: str) -> redis.Redis:
    """One client (and its pool of connections) per Redis, not a new connection for every read: under
    load, connecting was a fifth of the data query's time in the API (py-spy, bench/readers.py)."""
    return redis.Redis.from_url(url, socket_timeout=2)


def cached(key: str, compute: Callable[[], Any], ttl: int = TTL_SECONDS) -> Any:
    """KEY's cached value, or COMPUTE's (stored for TTL seconds). Redis down: COMPUTE, uncached."""
    try:
        hit = _client().get(PREFIX + key)
        if hit is not None:
            return json.loads(hit)
    except redis.RedisError:
        return compute()
    value = compute()
    try:
        _client().set(PREFIX + key, json.dumps(value, default=str), ex=ttl)
    except redis.RedisError:
        log.warning("cache: could not store %s", key)
    return value


def drop(*groups: str) -> None:
    """Forget every entry whose key starts with one of GROUPS."""
    try:
        client = _client()
        for group in groups:
            for key in client.scan_iter(match=f"{PREFIX}{group}*", count=500):
                client.delete(key)
    except redis.RedisError:
        log.warning("cache: could not drop %s (entries expire within %s s)", groups, TTL_SECONDS)
