"""HTTP sources against a real server on loopback, through a real worker."""

import socket
import threading
import time

import pytest
from sqlalchemy import text

from pipelines.core.db import get_engine
from pipelines.ingestion.sources.registry import SourceError
from tests.fakeapi import as_json, http_source, records


@pytest.fixture
def worker(shared_worker):
    """This module's tests share one worker (tests/conftest.py)."""
    return shared_worker


def stored(source: str) -> list[tuple]:
    with get_engine().connect() as conn:
        return [tuple(r) for r in conn.execute(
            text("SELECT id, value, metadata FROM observations WHERE source = :s ORDER BY id"), {"s": source})]


def ingest(client, source: str, **options) -> dict:
    return client.wait(client.start_ingestion([source], **options)["job_id"], timeout=90)


def test_every_pagination_style(client, worker, write_sources, api):
    data = records(0, 23)

    def by_page(q, h):
        page, size = int(q["page"]), int(q["length"])
        return as_json({"response": {"data": data[(page - 1) * size: page * size]}})

    def by_offset(q, h):
        offset, limit = int(q["offset"]), int(q["limit"])
        return as_json({"response": {"data": data[offset: offset + limit]}})

    def by_cursor(q, h):
        start = int(q.get("after") or 0)
        chunk = data[start: start + 8]
        nxt = str(start + 8) if start + 8 < len(data) else None
        return as_json({"response": {"data": chunk}, "meta": {"next": nxt}})

    def by_link_header(q, h):
        start = int(q.get("from", 0))
        headers = {"Content-Type": "application/json"}
        if start + 10 < len(data):
            headers["Link"] = f'</link?from={start + 10}>; rel="next"'
        return 200, headers, as_json({"response": {"data": data[start: start + 10]}})[2]

    def by_body_link(q, h):
        start = int(q.get("from", 0))
        nxt = f"{api.url}/bodylink?from={start + 5}" if start + 5 < len(data) else None
        return as_json({"response": {"data": data[start: start + 5]}, "links": {"next": nxt}})

    api.routes.update({"/page": by_page, "/offset": by_offset, "/cursor": by_cursor, "/link": by_link_header,
                       "/bodylink": by_body_link})
    write_sources(
        http_source("paged", f"{api.url}/page",
                    'pagination = { type = "page", param = "page", size_param = "length", size = 10 }')
        + http_source("offset", f"{api.url}/offset",
                      'pagination = { type = "offset", param = "offset", size_param = "limit", size = 10 }')
        + http_source("cursor", f"{api.url}/cursor",
                      'pagination = { type = "cursor", param = "after", cursor_path = "meta.next" }')
        + http_source("link", f"{api.url}/link", 'pagination = { type = "link" }')
        + http_source("bodylink", f"{api.url}/bodylink", 'pagination = { type = "link", next_path = "links.next" }')
    )
    job = client.wait(client.start_ingestion(["paged", "offset", "cursor", "link", "bodylink"])["job_id"], timeout=90)
    assert job["state"] == "succeeded", job
    assert job["records_processed"] == 5 * 23
    expected = [(r["id"], r["value"], {"area": r["area"]}) for r in data]
    for source in ("paged", "offset", "cursor", "link", "bodylink"):
        assert stored(source) == expected, source
    assert [c["query"]["page"] for c in api.calls_to("/page")] == ["1", "2", "3"]
    assert [c["query"]["offset"] for c in api.calls_to("/offset")] == ["0", "10", "20"]
    assert [c["query"].get("after") for c in api.calls_to("/cursor")] == [None, "8", "16"]
    assert len(api.calls_to("/link")) == 3 and len(api.calls_to("/bodylink")) == 5


def test_an_api_that_ignores_the_page_parameter_stops_the_run_at_the_second_page(client, worker, write_sources, api):
    """A misspelt page parameter: the API sends its first page whatever is asked. Without a check the run
    would ask for it max_pages (100,000) times; it stops at the repeat, and says what to look at."""
    data = records(0, 10)
    api.routes["/ignores"] = lambda q, h: as_json({"response": {"data": data}})  # reads only "pageNumber"
    api.routes["/same-cursor"] = lambda q, h: as_json({"response": {"data": data}, "meta": {"next": "abc"}})
    write_sources(
        http_source("ignores", f"{api.url}/ignores",
                    'pagination = { type = "page", param = "page", size_param = "length", size = 10 }')
        + http_source("repeats", f"{api.url}/same-cursor",
                      'pagination = { type = "cursor", param = "after", cursor_path = "meta.next" }'))
    for source, asked in (("ignores", "`page` = 2"), ("repeats", "`after` = 'abc'")):
        job = ingest(client, source)
        assert job["state"] == "failed", job
        assert f"sent the same page for {asked} as for the page before it" in job["error"], job["error"]
        assert "check `pagination` in sources.toml" in job["error"]
        assert stored(source) == [(r["id"], r["value"], {"area": r["area"]}) for r in data]  # the first page kept
    assert [c["query"]["page"] for c in api.calls_to("/ignores")] == ["1", "2"]
    assert [c["query"].get("after") for c in api.calls_to("/same-cursor")] == [None, "abc"]


def test_retries_429_with_retry_after_and_5xx_then_succeeds(client, worker, write_sources, api):
    state = {"limited": 0, "broken": 0}

    def limited(q, h):
        state["limited"] += 1
        if state["limited"] == 1:
            return 429, {"Retry-After": "1"}, b"slow down"
        return as_json({"response": {"data": records(0, 4)}})

    def broken(q, h):
        state["broken"] += 1
        if state["broken"] <= 3:
            return 503 if state["broken"] % 2 else 500, {}, b"oops"
        return as_json({"response": {"data": records(10, 4)}})

    api.routes.update({"/limited": limited, "/broken": broken})
    write_sources(http_source("limited", f"{api.url}/limited") + http_source("broken", f"{api.url}/broken"))
    job = ingest(client, "limited")
    assert job["state"] == "succeeded" and job["records_processed"] == 4
    first, second = api.calls_to("/limited")
    assert second["at"] - first["at"] >= 0.95  # Retry-After honoured
    job = ingest(client, "broken")
    assert job["state"] == "succeeded" and job["records_processed"] == 4 and state["broken"] == 4


def test_failures_are_clear_and_the_worker_lives_on(client, worker, write_sources, api, monkeypatch):
    def silent(q, h):
        time.sleep(3)
        return as_json({"response": {"data": []}})

    api.routes.update({
        "/silent": silent,
        "/garbage": lambda q, h: (200, {"Content-Type": "application/json"}, b'{"response": {"data": [1, 2'),
        "/huge": lambda q, h: as_json({"response": {"data": records(0, 500)}}),
        "/gone": lambda q, h: (404, {}, b"not here"),
        "/down": lambda q, h: (500, {}, b"always"),
    })
    write_sources(
        http_source("silent", f"{api.url}/silent", "retries = 1").replace("timeout = 2", "timeout = 0.5")
        + http_source("garbage", f"{api.url}/garbage")
        + http_source("huge", f"{api.url}/huge", "max_response_bytes = 2000")
        + http_source("gone", f"{api.url}/gone?token=${{NOT_SET_ANYWHERE}}")
        + http_source("gone2", f"{api.url}/gone")
        + http_source("down", f"{api.url}/down", "retries = 2")
    )
    began = time.monotonic()
    job = ingest(client, "silent")
    assert job["state"] == "failed" and time.monotonic() - began < 20
    assert job["error"] == f"source 'silent': {api.url}/silent: no whole answer within 0.5 s after 2 attempt(s)"
    job = ingest(client, "garbage")
    assert job["state"] == "failed" and "is not valid JSON" in job["error"]
    job = ingest(client, "huge")
    assert job["state"] == "failed" and "larger than 2,000 bytes" in job["error"]
    job = ingest(client, "gone")
    assert job["state"] == "failed"
    assert job["error"] == "source 'gone': environment variable NOT_SET_ANYWHERE is not set"
    job = ingest(client, "gone2")
    assert job["state"] == "failed" and job["error"] == f"source 'gone2': {api.url}/gone answered HTTP 404"
    job = ingest(client, "down")
    assert job["state"] == "failed" and job["error"].endswith("HTTP 500 after 3 attempt(s)")
    assert len(api.calls_to("/down")) == 3
    assert worker.process.poll() is None


def test_secrets_come_from_the_environment_and_never_show(client, start_worker, write_sources, api):
    secret = "s3cr3t-token-value"
    seen = []

    def guarded(q, h):
        seen.append((h.get("X-Api-Key"), q.get("key")))
        if h.get("X-Api-Key") != secret or q.get("key") != secret:
            return 401, {}, b"denied"
        return as_json({"response": {"data": records(0, 3)}})

    api.routes["/guarded"] = guarded
    write_sources(http_source("guarded", f"{api.url}/guarded",
                              'headers = { "X-Api-Key" = "${FEED_TOKEN}" }\nparams = { key = "${FEED_TOKEN}" }'))
    start_worker(env={"FEED_TOKEN": secret})
    job = ingest(client, "guarded")
    assert job["state"] == "succeeded" and seen == [(secret, secret)]
    detail = client.request("GET", "/sources/guarded")["data"]
    assert secret not in str(detail) and detail["config"]["headers"] == {"X-Api-Key": "${FEED_TOKEN}"}
    assert secret not in str(client.job(job["id"]))


def test_jsonl_and_csv_responses(client, worker, write_sources, api):
    import json

    lines = "\n".join(json.dumps(r) for r in records(0, 5)).encode() + b"\n{bad\n"
    api.routes["/lines"] = lambda q, h: (200, {}, lines)
    api.routes["/table"] = lambda q, h: (200, {"Content-Type": "text/csv"},
                                         b"id,period,value,area\nc1,2026-02-01T00:00:00Z,1.5,A0\nc2,nope,2,A1\n")
    write_sources(http_source("lines", f"{api.url}/lines").replace('format = "json"', 'format = "jsonl"')
                  + http_source("table", f"{api.url}/table").replace('format = "json"', 'format = "csv"'))
    job = client.wait(client.start_ingestion(["lines", "table"])["job_id"], timeout=60)
    assert job["state"] == "succeeded" and job["records_processed"] == 6 and job["records_failed"] == 2
    rows, _ = client.quarantine(job_id=job["id"])
    assert sorted((r["source"], r["line"], r["file"]) for r in rows) == [
        ("lines", 6, f"{api.url}/lines"), ("table", 2, f"{api.url}/table")]


def _fetcher(url: str, **fields):
    from pipelines.ingestion.sources.http import Fetcher
    from pipelines.ingestion.sources.registry import SourceConfig

    return Fetcher(SourceConfig(**{"id": "s", "type": "http", "url": url, "headers": {"X-Api-Key": "s3cret"},
                                   "retries": 0, "timeout": 5, **fields}))


def test_redirects_and_links_stay_on_the_declared_origin(api):
    from tests.fakeapi import FakeApi

    elsewhere = FakeApi()
    try:
        elsewhere.routes["/loot"] = lambda q, h: (200, {}, b'{"response": {"data": []}}')
        api.routes["/away"] = lambda q, h: (302, {"Location": f"{elsewhere.url}/loot"}, b"")
        api.routes["/here"] = lambda q, h: (301, {"Location": "/final"}, b"")
        api.routes["/final"] = lambda q, h: (200, {}, b"ok")
        own = _fetcher(f"{api.url}/here")
        assert own.get(f"{api.url}/here", {})[0] == b"ok"  # a redirect on the same origin is followed
        assert all(c["headers"].get("X-Api-Key") == "s3cret" for c in api.calls)
        with pytest.raises(SourceError, match="outside the source's origin"):
            _fetcher(f"{api.url}/away").get(f"{api.url}/away", {})
        assert elsewhere.calls == []  # never asked, let alone given the key

        localhost = api.url.replace("127.0.0.1", "localhost")  # the declared host; the other is 127.0.0.1
        allowed = _fetcher(f"{localhost}/away", allowed_hosts=["127.0.0.1"])
        assert allowed.get(f"{localhost}/away", {})[0] == b'{"response": {"data": []}}'
        assert len(elsewhere.calls) == 1 and "X-Api-Key" not in elsewhere.calls[0]["headers"]
    finally:
        elsewhere.close()


@pytest.mark.parametrize("trickled", ["headers", "body"])
def test_a_page_that_trickles_is_given_up_at_the_timeout(trickled):
    """A server that sends a byte every 0.1 s (well inside any per-read timeout) gets the source's
    timeout for the whole page, headers and body alike, not for ever."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Pad: " + b"a" * 400 + b"\r\n"
    body = b'{"response": {"data": []}}' + b" " * 400
    answer = head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    slow_from = 0 if trickled == "headers" else len(answer) - len(body)
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(answer[:slow_from])
            for i in range(slow_from, len(answer)):  # at most len(answer) x 0.1 s, and stopped at the end
                if stop.is_set():
                    return
                try:
                    conn.sendall(answer[i:i + 1])
                except OSError:
                    return
                time.sleep(0.1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        fetcher = _fetcher(f"http://127.0.0.1:{server.getsockname()[1]}/slow", timeout=1)
        began = time.monotonic()
        with pytest.raises(SourceError, match="no whole answer within 1 s after 1 attempt"):
            fetcher.get(fetcher.source.url, {})
        assert time.monotonic() - began < 2.5
    finally:
        stop.set()
        server.close()
        thread.join(5)


def test_through_a_proxy_the_client_keeps_httpx_transport(monkeypatch):
    """A proxy named in the environment is still used (httpx's own transport honours it); without one,
    pages go through the deadline transport."""
    from pipelines.core import httpclock

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert isinstance(httpclock.transport(), httpclock.DeadlineTransport)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert httpclock.transport() is None


def test_a_next_link_to_another_host_is_not_followed(client, worker, write_sources, api):
    api.routes["/first"] = lambda q, h: as_json({"response": {"data": records(0, 3)},
                                                 "next": "http://169.254.169.254/latest/meta-data"})
    write_sources(http_source("nexty", f"{api.url}/first",
                              'pagination = { type = "link", next_path = "next" }'))
    job = client.wait(client.start_ingestion(["nexty"])["job_id"], timeout=60)
    assert job["state"] == "failed" and "outside the source's origin" in job["error"]
    assert job["records_processed"] == 3  # the first page, from the declared origin, is kept


def test_a_secret_in_the_url_path_is_never_shown(client, start_worker, write_sources, api):
    token = "tok-8f3a9c21d7"
    bad = records(0, 2)
    bad[1]["value"] = "n/a"  # one row for quarantine, whose `file` names the page
    api.routes[f"/{token}/data"] = lambda q, h: as_json({"response": {"data": bad}})
    write_sources(http_source("hidden", f"{api.url}/${{PATH_TOKEN}}/data")
                  + http_source("gone", f"{api.url}/${{PATH_TOKEN}}/missing"))
    start_worker(env={"PATH_TOKEN": token})
    ok = client.wait(client.start_ingestion(["hidden"])["job_id"], timeout=60)
    assert ok["state"] == "succeeded" and ok["records_failed"] == 1
    rows, _ = client.quarantine(source="hidden")
    assert rows[0]["file"] == f"{api.url}/${{PATH_TOKEN}}/data" and token not in str(rows)
    failed = client.wait(client.start_ingestion(["gone"])["job_id"], timeout=60)
    assert failed["state"] == "failed" and "${PATH_TOKEN}" in failed["error"] and token not in failed["error"]
    assert token not in client.http.get("/api/v1/sources/gone").text


# --- compressed pages: unpacked with a ceiling --------------------------------------------------

CSV_LINE = b"h00001,2026-02-01T00:00:00Z,1.5,A1\n"


def bomb(expanded_mb: int) -> bytes:
    """A CSV page of EXPANDED_MB megabytes, gzip by its content (identical members, one a megabyte
    unpacked), then gzipped again as its Content-Encoding: a few kilobytes on the wire."""
    import gzip

    header = gzip.compress(b"id,period,value,area\n")
    member = gzip.compress(CSV_LINE * ((1 << 20) // len(CSV_LINE)), 9)
    return gzip.compress(header + member * expanded_mb, 9)


def high_water_mark(pid: int) -> int:
    """PID's peak resident memory so far, in bytes (Linux's VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def test_a_page_that_unpacks_past_the_limit_is_refused_without_being_held(client, start_worker, write_sources,
                                                                          api):
    import gzip

    from tests.helpers import api_processes, wait_for

    page = bomb(500)
    assert len(page) < 100_000
    api.routes["/bomb"] = lambda q, h: (200, {"Content-Type": "text/csv", "Content-Encoding": "gzip"}, page)
    honest = gzip.compress(b"id,period,value,area\n" + CSV_LINE + b"h00002,2026-02-01T01:00:00Z,2.5,A2\n")
    api.routes["/honest"] = lambda q, h: (200, {"Content-Encoding": "gzip"}, gzip.compress(honest))
    write_sources(http_source("bomb", f"{api.url}/bomb").replace('format = "json"', 'format = "csv"')
                  + http_source("honest", f"{api.url}/honest").replace('format = "json"', 'format = "csv"'))

    # In a worker: the job fails saying why, and the pool process barely grows.
    worker = start_worker(beat=False)  # (with beat, every process's command line says "beat")
    wait_for(worker.pool_pids, timeout=30, message="the worker's pool process")
    pool = worker.pool_pids()[0]
    before = high_water_mark(pool)
    job = ingest(client, "bomb")
    assert job["state"] == "failed", job
    assert "larger than 67,108,864 bytes once unpacked" in job["error"], job["error"]
    assert high_water_mark(pool) - before < 50 * 2**20
    assert stored("bomb") == []
    # A page compressed twice over within the limit still loads.
    assert ingest(client, "honest")["state"] == "succeeded" and len(stored("honest")) == 2

    # In the API's own process, testing the source: refused, and the process barely grows.
    with api_processes(1) as (url,):
        import httpx
        import psutil

        pid = next(c.pid for c in psutil.net_connections("tcp")
                   if c.status == "LISTEN" and c.laddr.port == int(url.rsplit(":", 1)[1]))
        before = high_water_mark(pid)
        answer = httpx.post(f"{url}/api/v1/sources/bomb/test", headers=client.http.headers, timeout=60)
        assert answer.status_code == 200, answer.text
        result = answer.json()["data"]
        assert result["connected"] is True and "once unpacked" in result["error"], result
        assert high_water_mark(pid) - before < 50 * 2**20


def test_inflate_counts_every_member_and_refuses_past_the_limit():
    import gzip
    import zlib

    from pipelines.ingestion.sources import inflate

    two_members = gzip.compress(b"a" * 1000) + gzip.compress(b"b" * 1000)
    assert inflate.inflate(two_members, "gzip", 2000) == b"a" * 1000 + b"b" * 1000
    assert inflate.inflate(two_members, "gzip", 2000, keep=False) == b""
    with pytest.raises(inflate.TooLarge):
        inflate.inflate(two_members, "gzip", 1999, keep=False)
    assert inflate.inflate(zlib.compress(b"xyz" * 100), "deflate", 300) == b"xyz" * 100
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    assert inflate.inflate(raw.compress(b"raw" * 10) + raw.flush(), "deflate", 30) == b"raw" * 10
    with pytest.raises(zlib.error):
        inflate.inflate(gzip.compress(b"c" * 5000)[:-20], "gzip", 10_000)  # cut short
    with pytest.raises(inflate.Unsupported):
        inflate.inflate(b"..", "br", 10)
