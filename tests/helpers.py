"""What tests share beyond fixtures: polling with a deadline, ports, keys, seeding rows."""

from __future__ import annotations

import socket
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout: float = 30, interval: float = 0.1, message: str = "condition"):
    """Poll CONDITION until it returns something truthy; fail after TIMEOUT seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def make_key(scopes: list[str]) -> str:
    from pipelines.auth import keys
    from pipelines.core.db import session_scope

    with session_scope() as s:
        _row, key = keys.create_key(s, "test", scopes)
    return key


def seed(source: str, job_id: str, batch) -> None:
    """Write BATCH (a ValidBatch) into SOURCE's partition through the merge path, as a run would."""
    from pipelines.core.db import driver, get_engine
    from pipelines.ingestion import partitions
    from pipelines.ingestion.load import Loader

    with get_engine().begin() as connection:
        conn = driver(connection)
        partitions.ensure(conn, source)
        loader = Loader(source, job_id, direct=False)
        loader.load(conn, loader.prepare(batch))
