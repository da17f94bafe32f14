"""Watching a job without polling: `GET /api/v1/jobs/{id}/events`, read with a standard SSE client
(httpx-sse). The stream tells each state, progress and counts, then `end`, and closes; three hundred
streams at once are served by the API process's one reader, not by a database connection each."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from httpx_sse import aconnect_sse, connect_sse
from sqlalchemy import text

from cli.client import Client
from pipelines.core.db import get_engine
from testkit.datagen import sources_toml, write_csv
from tests.helpers import make_key, watch_until_closed

pytestmark = pytest.mark.worker


def test_a_jobs_stream_tells_each_change_then_ends_and_closes(client, api_url, admin_key, worker, write_sources,
                                                             data_dir):
    write_csv(data_dir / "a.csv", 3000)
    write_sources(sources_toml("prices", "a.csv"))
    job_id = client.start_ingestion(["prices"], batch_size=500)["job_id"]
    with httpx.Client(base_url=api_url, headers={"X-API-Key": admin_key}, timeout=60) as http, \
            connect_sse(http, "GET", f"/api/v1/jobs/{job_id}/events") as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        events = list(source.iter_sse())  # until the server closes the stream
    changes = [e.json() for e in events if e.event == "job"]
    assert [e.event for e in events][-2:] == ["job", "end"]
    assert changes[0]["state"] in ("queued", "running") and changes[-1]["state"] == "succeeded"
    assert changes[-1]["records_processed"] == 3000 and changes[-1]["progress"] == 100
    assert all(a != b for a, b in zip(changes, changes[1:], strict=False))  # each event a change
    progress = [c["progress"] for c in changes]
    assert progress == sorted(progress)
    assert [int(e.id) for e in events if e.event == "job"] == list(range(1, len(changes) + 1))
    assert httpx.get(f"{api_url}/api/v1/jobs/{job_id}/events",
                     headers={"X-API-Key": make_key(["write"])}).status_code == 200  # any reader may watch
    assert httpx.get(f"{api_url}/api/v1/jobs/job_missing/events",
                     headers={"X-API-Key": admin_key}).status_code == 404


def _connections() -> int:
    with get_engine().connect() as conn:
        return conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
                            ).scalar_one()


def test_three_hundred_open_streams_cost_no_connection_each(client, api_url, admin_key, no_worker, write_sources,
                                                            data_dir, configure):
    configure(max_event_streams_per_key=300)
    write_csv(data_dir / "a.csv", 10)
    write_sources(sources_toml("prices", "a.csv"))
    job_id = client.start_ingestion(["prices"])["job_id"]  # queued: no worker takes it
    before = _connections()

    async def watch_all() -> tuple[list[list[str]], int]:
        opened = asyncio.Event()
        first_events = 0
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=api_url, headers={"X-API-Key": admin_key}, timeout=60,
                                     limits=limits) as http:
            async def one() -> list[str]:
                nonlocal first_events
                states = []
                async with aconnect_sse(http, "GET", f"/api/v1/jobs/{job_id}/events") as source:
                    async for event in source.aiter_sse():
                        if event.event == "job":
                            states.append(event.json()["state"])
                            if len(states) == 1:
                                first_events += 1
                                if first_events == 300:
                                    opened.set()
                return states

            streams = [asyncio.create_task(one()) for _ in range(300)]
            await asyncio.wait_for(opened.wait(), 60)
            during = await asyncio.to_thread(_connections)
            await asyncio.to_thread(client.cancel, job_id)  # the job ends: every stream hears it and closes
            return await asyncio.wait_for(asyncio.gather(*streams), 60), during

    states, during = asyncio.run(watch_all())
    assert during - before < 10, (before, during)  # the API's pool at most, not one per stream
    assert all(s[0] == "queued" and s[-1] == "cancelled" for s in states), states[:3]


def test_a_key_may_hold_only_so_many_streams_open_and_others_are_not_held_up(client, api_url, admin_key, no_worker,
                                                                              write_sources, data_dir, configure):
    """Streams wait as long as their job does: past `INGOT_MAX_EVENT_STREAMS_PER_KEY` open at once a key
    gets 429 QUOTA_EXCEEDED, another key still opens its own, and a stream closed by its client gives
    its place back."""
    configure(max_event_streams_per_key=3)
    write_csv(data_dir / "a.csv", 10)
    write_sources(sources_toml("prices", "a.csv"))
    job_id = client.start_ingestion(["prices"])["job_id"]  # queued: no worker takes it
    other = make_key(["admin"])
    path = f"/api/v1/jobs/{job_id}/events"

    def open_stream(http: httpx.Client) -> httpx.Response:
        answer = http.send(http.build_request("GET", path), stream=True)
        if answer.status_code == 200:
            answer.lines = answer.iter_lines()  # kept: dropping the reader would close the stream
            assert next(answer.lines).startswith("retry:")  # the stream has begun
        return answer

    with httpx.Client(base_url=api_url, headers={"X-API-Key": admin_key}, timeout=30) as mine, \
            httpx.Client(base_url=api_url, headers={"X-API-Key": other}, timeout=30) as theirs:
        held = [open_stream(mine) for _ in range(3)]
        assert [a.status_code for a in held] == [200] * 3
        refused = open_stream(mine)
        assert refused.status_code == 429 and "retry-after" not in refused.headers
        body = refused.read() and refused.json()
        assert body["error"]["code"] == "QUOTA_EXCEEDED"
        assert body["error"]["details"] == {"quota": "job event streams open", "used": 3, "allowed": 3}
        theirs_open = open_stream(theirs)
        assert theirs_open.status_code == 200  # another key is not held up
        held.pop().close()  # a client goes away: its place comes back once the API notices
        deadline = time.monotonic() + 15
        while (again := open_stream(mine)).status_code == 429:
            again.close()
            assert time.monotonic() < deadline, "a closed stream's place never came back"
            time.sleep(0.1)
        # The Python client's wait() polls when its key may open no more streams.
        threading.Timer(1.0, client.cancel, [job_id]).start()
        with Client(api_url, admin_key, retries=0) as waiting:
            assert waiting.wait(job_id, poll=0.1, timeout=30)["state"] == "cancelled"
        for answer in [*held, again, theirs_open]:
            answer.close()


def test_a_stream_ends_soon_after_its_key_is_revoked(client, api_url, admin_key, no_worker, write_sources, data_dir):
    """A key checked when its stream opened is checked again while it runs: revoked, its streams end
    within seconds; another key's stream on the same job goes on."""
    from pipelines.auth import keys
    from pipelines.core.db import session_scope

    write_csv(data_dir / "a.csv", 10)
    write_sources(sources_toml("prices", "a.csv"))
    job_id = client.start_ingestion(["prices"])["job_id"]  # queued: no worker takes it
    with session_scope() as session:
        row, doomed = keys.create_key(session, "doomed", ["read"])
        doomed_id = row.id

    def opened(key: str) -> tuple[httpx.Response, object]:
        http = httpx.Client(base_url=api_url, headers={"X-API-Key": key}, timeout=30)
        answer = http.send(http.build_request("GET", f"/api/v1/jobs/{job_id}/events"), stream=True)
        assert answer.status_code == 200
        lines = answer.iter_lines()
        assert next(lines).startswith("retry:")
        return answer, lines

    doomed_stream, doomed_lines = opened(doomed)
    other_stream, _other_lines = opened(admin_key)
    try:
        with session_scope() as session:
            assert keys.revoke(session, doomed_id)
        ended = threading.Event()

        def read_to_the_end() -> None:
            for _line in doomed_lines:
                pass
            ended.set()

        threading.Thread(target=read_to_the_end, daemon=True).start()
        assert ended.wait(15), "the revoked key's stream was still open"
        assert not other_stream.is_closed  # the admin's stream was not cut
        client.cancel(job_id)
    finally:
        doomed_stream.close()
        other_stream.close()


def test_a_stream_opened_with_a_bearer_token_ends_when_the_token_expires(api_url, admin_key, no_worker, write_sources,
                                                                        data_dir, configure):
    """A person's stream lasts no longer than the token it was opened with (which could open no other)."""
    configure(jwt_expiry_seconds=3)
    write_csv(data_dir / "a.csv", 10)
    write_sources(sources_toml("prices", "a.csv"))
    person = {"username": "watcher", "password": "a long enough password"}
    with httpx.Client(base_url=api_url, timeout=30) as http:
        made = http.post("/api/v1/users", headers={"X-API-Key": admin_key},
                         json={**person, "scopes": ["read", "write"]})
        assert made.status_code == 201, made.text
        token = http.post("/api/v1/auth/login", json=person).json()["data"]["access_token"]
        mine = {"Authorization": f"Bearer {token}"}
        started = http.post("/api/v1/ingestion/start", headers=mine, json={"sources": ["prices"]})
        job_id = started.json()["data"]["job_id"]
        states, took = watch_until_closed(http, job_id, mine)
    assert states == ["queued"] and took < 10  # ended with the token (3 s), not with the job (still queued)


def test_a_persons_stream_ends_soon_after_a_logout_or_when_they_are_disabled(api_url, admin_key, no_worker,
                                                                           write_sources, data_dir):
    """A token logged out ends the streams opened with it (not the same person's other token's); a
    person disabled ends them all."""
    write_csv(data_dir / "a.csv", 10)
    write_sources(sources_toml("prices", "a.csv"))
    person = {"username": "leaver", "password": "a long enough password"}
    http = httpx.Client(base_url=api_url, timeout=30)
    made = http.post("/api/v1/users", headers={"X-API-Key": admin_key}, json={**person, "scopes": ["read", "write"]})
    assert made.status_code == 201, made.text
    first, second = ({"Authorization": "Bearer " + http.post("/api/v1/auth/login", json=person).json()["data"]
                      ["access_token"]} for _ in range(2))
    job_id = http.post("/api/v1/ingestion/start", headers=first, json={"sources": ["prices"]}).json()["data"]["job_id"]

    def stream(headers) -> threading.Event:
        ended = threading.Event()
        answer = http.send(http.build_request("GET", f"/api/v1/jobs/{job_id}/events", headers=headers), stream=True)
        assert answer.status_code == 200
        lines = answer.iter_lines()
        assert next(lines).startswith("retry:")
        threading.Thread(target=lambda: (list(lines), ended.set()), daemon=True).start()
        return ended

    try:
        by_first, by_second = stream(first), stream(second)
        assert http.post("/api/v1/auth/logout", headers=first).status_code in (200, 204)
        assert by_first.wait(15), "the logged-out token's stream was still open"
        assert not by_second.is_set()  # the same person's other token: still watching
        disabled = http.post(f"/api/v1/users/{made.json()['data']['id']}/disable", headers={"X-API-Key": admin_key})
        assert disabled.status_code == 200
        assert by_second.wait(15), "a disabled person's stream was still open"
    finally:
        http.post(f"/api/v1/jobs/{job_id}/cancel", headers={"X-API-Key": admin_key})
        http.close()
