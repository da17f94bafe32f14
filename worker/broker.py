"""kombu's Redis transport, with one Redis client per channel for the commands it sends.

kombu's Redis channel builds a new `redis.Redis` for every command it sends outside its event loop:
each publish (the API's, and every task event a worker sends Flower), each ack and each note of a
message handed out. redis-py fills a table of about 150 response callbacks in every client it builds
(67 µs here), and py-spy with `--gil` put that at a fifth of a worker main process's CPU and a
twentieth of the API's. A client holds no connection of its own (each command takes one from the
channel's pool and gives it back), so one client per channel and pool does the same work: a new one
only when the channel has replaced its pool (after a fork, or once it reconnects).

`register` puts this transport under kombu's `redis` and `rediss` names (`redis+socket` included),
the registry kombu keeps for transports of its own and of others; `worker.app` calls it when it is
imported, before any connection is made. RabbitMQ's transport is not touched.
"""

from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _client_for_pool = None  # (pool, the client built over it)

    def _create_client(self, asynchronous=False):
        if asynchronous:  # the event loop's own (BRPOP, LISTEN): kombu keeps those itself
            return super()._create_client(asynchronous=True)
        pool = self.pool
        if self._client_for_pool is None or self._client_for_pool[0] is not pool:
            self._client_for_pool = (pool, super()._create_client())
        return self._client_for_pool[1]


class Transport(kombu_redis.Transport):
    Channel = Channel


def register() -> None:
    for name in ("redis", "rediss"):
        TRANSPORT_ALIASES[name] = f"{__name__}:Transport"
