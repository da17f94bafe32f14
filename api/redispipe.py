"""The few Redis commands every request makes (its rate-limit count, the keys' generation), sent over
one connection per event loop that all requests share.

Redis answers commands in the order it receives them, so a call writes its commands in one write,
queues one future per reply, and the connection hands out replies as they are parsed (by hiredis):
many requests' calls interleave on the one connection with no pool, lock or task of their own. This
costs a fraction of redis-py's asyncio pipeline, which matters at thousands of requests a second;
everything else in Ingot uses redis-py. Failures raise redis-py's exceptions, so callers handle them
as any other Redis error. A call that gets no answer within its timeout closes the connection (the
replies still owed would be out of step) and the next call opens a new one.
"""

from __future__ import annotations

import asyncio
from collections import deque

import hiredis
import redis
from redis.asyncio.connection import parse_url

Command = tuple[str | bytes | int, ...]


def _pack(command: Command) -> bytes:
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: deque[asyncio.Future] = deque()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            future = self.waiting.popleft()
            if future.done():  # its caller timed out: the connection is being closed anyway
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(redis.ResponseError(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(redis.ConnectionError(f"connection to Redis lost: {exc or 'closed'}"))


class Pipe:
    def __init__(self, url: str, timeout: float = 2.0) -> None:
        self.options = parse_url(url)
        self.timeout = timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future | None = None

    async def call(self, *commands: Command) -> list:
        """The replies to COMMANDS, in order (an error reply raises redis.ResponseError)."""
        try:
            async with asyncio.timeout(self.timeout):
                protocol = await self._connected()
                return await self._send(protocol, commands)
        except TimeoutError:
            self.close()
            raise redis.TimeoutError(f"Redis did not answer within {self.timeout:g} s") from None
        except OSError as exc:
            raise redis.ConnectionError(f"cannot reach Redis: {exc}") from exc

    @staticmethod
    async def _send(protocol: _Protocol, commands: tuple[Command, ...]) -> list:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        protocol.waiting.extend(futures)
        assert protocol.transport is not None
        protocol.transport.write(b"".join(map(_pack, commands)))
        return [await future for future in futures]

    async def _connected(self) -> _Protocol:
        if self._protocol is not None and self._protocol.transport is not None:
            return self._protocol
        if self._connecting is None:  # the first caller connects; the others wait for it
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        if "path" in self.options:
            _transport, protocol = await loop.create_unix_connection(_Protocol, self.options["path"])
        else:
            _transport, protocol = await loop.create_connection(
                _Protocol, self.options.get("host", "localhost"), self.options.get("port", 6379))
        setup: list[Command] = []
        if self.options.get("password"):
            setup.append(("AUTH", *filter(None, (self.options.get("username"), self.options["password"]))))
        if self.options.get("db"):
            setup.append(("SELECT", self.options["db"]))
        if setup:
            try:
                await self._send(protocol, tuple(setup))
            except BaseException:
                if protocol.transport is not None:
                    protocol.transport.close()
                raise
        self._protocol = protocol
        return protocol

    def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None
