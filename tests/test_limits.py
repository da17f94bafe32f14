"""Limits that cannot be sidestepped: the body counted as it arrives, rate-limit buckets per principal
(per address for logging in and for credentials that fail), the limit's headers on every answer, and
503 (not 500) while the database is away."""

import asyncio
import json
import secrets
import socket
import time

import httpx
import pytest

from api.main import create_app
from tests.helpers import make_key, wait_for

MiB = 1024 * 1024


def _call(app, method: str, path: str, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[int, dict]:
    """One request straight through the ASGI app, its body in CHUNKS, with exactly HEADERS."""
    sent: list[dict] = []
    pending = list(chunks)

    async def receive():
        if pending:
            body = pending.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(pending)}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80)}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body or b"{}")


@pytest.mark.parametrize("claimed", [[(b"content-length", b"1"), (b"transfer-encoding", b"chunked")],
                                     [(b"transfer-encoding", b"chunked")], []],
                         ids=["length 1 and chunked", "chunked", "no length"])
def test_the_body_is_counted_as_it_arrives_whatever_the_headers_say(admin_key, claimed):
    headers = [(b"x-api-key", admin_key.encode()), (b"content-type", b"application/json"), *claimed]
    status, body = _call(create_app(), "POST", "/api/v1/webhooks", headers, [b" " * (256 * 1024)] * 8)  # 2 MiB
    assert status == 413 and body["error"]["code"] == "PAYLOAD_TOO_LARGE"


def test_a_chunked_body_within_the_limit_is_read(api_url):
    def chunks():
        yield b'{"username": "nobody", '
        yield b'"password": "wrong"}'

    answer = httpx.post(f"{api_url}/api/v1/auth/login", content=chunks(), headers={"Content-Type": "application/json"})
    assert answer.status_code == 401  # read and judged, not refused for being chunked


def _closed_within(conn: socket.socket, seconds: float, trickle: bytes = b"") -> float | None:
    """Seconds until the server closes CONN (sending one byte of TRICKLE every 0.1 s meanwhile), or None
    if it is still open after SECONDS."""
    began = time.monotonic()
    conn.settimeout(0.1)
    for byte in trickle or b"\0" * int(seconds * 10):
        try:
            if trickle:
                conn.send(bytes([byte]))
            if conn.recv(4096) == b"":
                return time.monotonic() - began
        except TimeoutError:
            pass
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - began
        if time.monotonic() - began > seconds:
            return None
    return None


def test_a_connection_must_send_its_headers_within_the_request_deadline(api_url, configure):
    """Slowloris: a connection that sends nothing, or trickles its request line and headers a byte at a
    time, is closed at the request deadline (uvicorn alone keeps either open for good), on a kept-alive
    connection too; headers that take a while but arrive in time are answered, and a person's request
    on another connection meanwhile is not held up."""
    from api.metrics import HEADERS_TIMED_OUT

    configure(api_request_timeout_seconds=1)
    address = ("127.0.0.1", int(api_url.rsplit(":", 1)[1]))
    before = HEADERS_TIMED_OUT._value.get()
    trickled = b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 200
    with socket.create_connection(address) as idle:
        assert 0.8 < (_closed_within(idle, 6) or 99) < 3
    with socket.create_connection(address) as slow:
        assert httpx.get(f"{api_url}/api/v1/health").status_code == 200
        assert 0.8 < (_closed_within(slow, 6, trickled) or 99) < 3
    with socket.create_connection(address) as kept:  # a first request answered, then the next trickled
        kept.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert kept.recv(4096).startswith(b"HTTP/1.1 200")
        assert 0.8 < (_closed_within(kept, 6, trickled) or 99) < 3
    with socket.create_connection(address) as patient:  # slow, but whole within the deadline
        for part in (b"GET /api/v1/health HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
            patient.sendall(part)
            time.sleep(0.25)
        assert patient.recv(4096).startswith(b"HTTP/1.1 200")
    assert HEADERS_TIMED_OUT._value.get() - before == 3


def test_headers_past_a_megabyte_are_refused_with_431_and_smaller_ones_served(api_url):
    """httptools sets no limit on a request's headers and holds each one whole (8 MB were answered):
    past MAX_HEADER_BYTES they are refused as they arrive."""
    from api.protocol import MAX_HEADER_BYTES

    address = ("127.0.0.1", int(api_url.rsplit(":", 1)[1]))
    with socket.create_connection(address) as huge:
        huge.settimeout(10)
        try:
            huge.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (2 * MAX_HEADER_BYTES)
                         + b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we were still sending: read what it said
        assert huge.recv(4096).startswith(b"HTTP/1.1 431 ")
    large = httpx.get(f"{api_url}/api/v1/health", headers={"X-Large": "a" * (MAX_HEADER_BYTES // 4)})
    assert large.status_code == 200


def test_a_key_has_one_bucket_however_it_is_spelled(api_url, configure):
    configure(rate_limit_per_minute=6)
    key = make_key(["read"])
    spellings = [{"X-API-Key": key}, {"Authorization": f"Bearer {key}"}, {"authorization": f"bearer {key}"}]
    with httpx.Client(base_url=api_url) as http:
        answers = [http.get("/api/v1/jobs", headers=spellings[i % 3]) for i in range(7)]
    assert [a.status_code for a in answers] == [200] * 6 + [429]
    assert answers[-1].json()["error"]["code"] == "RATE_LIMIT_EXCEEDED"


def test_invented_keys_share_their_address_bucket(api_url, configure):
    configure(unauthenticated_rate_limit_per_minute=5)
    with httpx.Client(base_url=api_url) as http:
        answers = [http.get("/api/v1/jobs", headers={"X-API-Key": f"ingot_{secrets.token_hex(16)}"})
                   for _ in range(6)]
    assert [a.status_code for a in answers] == [401] * 5 + [429]


def test_login_is_limited_per_address_whatever_key_header_comes_with_it(api_url, configure):
    configure(login_rate_limit_per_minute=3)
    with httpx.Client(base_url=api_url) as http:
        answers = [http.post("/api/v1/auth/login", json={"username": "u", "password": "p"},
                             headers={"X-API-Key": f"ingot_{secrets.token_hex(16)}"}) for _ in range(4)]
    assert [a.status_code for a in answers] == [401, 401, 401, 429]


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/api/v1/jobs/job_missing", 404),
    ("GET", "/api/v1/jobs?limit=0", 422),
    ("POST", "/api/v1/ingestion/stop", 200),
    ("GET", "/api/v1/nothing-here", 404),
])
def test_every_answer_carries_the_rate_limit_headers(api_url, admin_key, method, path, status):
    answer = httpx.request(method, f"{api_url}{path}", headers={"X-API-Key": admin_key})
    assert answer.status_code == status
    assert int(answer.headers["X-RateLimit-Limit"]) >= int(answer.headers["X-RateLimit-Remaining"]) >= 0
    unauthenticated = httpx.get(f"{api_url}/api/v1/jobs")
    assert unauthenticated.status_code == 401 and "X-RateLimit-Remaining" in unauthenticated.headers


def test_a_database_away_is_503_and_the_api_recovers_by_itself(api_url, admin_key, configure):
    from pipelines.core import runtime
    from pipelines.core.db import dispose_engine

    with httpx.Client(base_url=api_url, headers={"X-API-Key": admin_key}) as http:
        assert http.get("/api/v1/jobs").status_code == 200
        runtime.value("rate_limit_per_minute")  # the limiter's settings, read while the database is there
        configure(database_url="postgresql+psycopg://ingot@127.0.0.1:9/nothing")  # a port nobody listens on
        dispose_engine()
        try:
            away = http.get("/api/v1/jobs")
            assert away.status_code == 503 and away.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
            assert away.headers["Retry-After"] == "5"
            assert http.get("/ready").status_code == 503
            assert http.get("/api/v1/health").status_code == 200  # liveness never waits on the database
        finally:
            configure.undo()
            dispose_engine()
        assert http.get("/api/v1/jobs").status_code == 200
        assert http.get("/ready").status_code == 200



def test_the_async_routes_answer_503_while_postgresql_restarts_and_none_after(api_url, admin_key):
    """The routes served on the event loop (a job, the ingestion status) hold their own connections:
    with PostgreSQL stopped they answer 503 at once, and the first request after it is back is served
    (the broken connections are dropped, not handed to callers one by one)."""
    from pgserver import pg_ctl  # type: ignore[attr-defined]

    from pipelines.core import embedded

    server = embedded._postgres
    if server is None:
        pytest.skip("INGOT_TEST_DATABASE_URL is set: the tests do not own that PostgreSQL, so cannot restart it")
    with httpx.Client(base_url=f"{api_url}/api/v1", headers={"X-API-Key": admin_key}, timeout=30) as http:
        paths = ["/ingestion/status", "/jobs/job_missing"]
        assert [http.get(p).status_code for p in paths] == [200, 404]
        for _ in range(3):  # several connections open in the pool
            assert http.get(paths[0]).status_code == 200
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
        try:
            began = time.monotonic()
            away = [http.get(p) for p in paths]
            assert [r.status_code for r in away] == [503, 503], [r.text for r in away]
            assert all(r.json()["error"]["code"] == "SERVICE_UNAVAILABLE" for r in away)
            assert time.monotonic() - began < 5  # refused at once, not after a pool's timeout
        finally:
            server.ensure_postgres_running()
        assert [http.get(p).status_code for p in paths * 3] == [200, 404] * 3


def _secret(home: str) -> str:
    from pipelines.core.settings import Settings

    return Settings(home=home).secret_file("racing_secret", lambda: secrets.token_hex(16))


def test_a_generated_secret_is_one_and_private_however_many_processes_race(tmp_path):
    import multiprocessing

    home = tmp_path / "home"
    # Six fresh processes (not forks of this threaded one), forked from one server that has imported
    # this module once: they race as six `ingot` processes would, without paying six imports.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    with context.Pool(6) as pool:
        values = pool.map(_secret, [str(home)] * 12)
    assert len(set(values)) == 1 and len(values[0]) == 32
    assert (home / "racing_secret").stat().st_mode & 0o777 == 0o600
    assert home.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in home.iterdir()) == ["racing_secret"]  # no temporary file left behind


def test_webhooks_and_exports_belong_to_their_creator(api_url, admin_key):
    from cli.client import Client

    with Client(api_url, make_key(["write"])) as owner, Client(api_url, make_key(["write"])) as other, \
            Client(api_url, admin_key) as admin:
        hook = owner.request("POST", "/webhooks", json={"url": "http://127.0.0.1:9/hook",
                                                         "events": ["job.cancelled"]})["data"]
        export_id = owner.start_export("csv")["export_id"]
        for path in (f"/api/v1/webhooks/{hook['id']}", f"/api/v1/webhooks/{hook['id']}/deliveries",
                     f"/api/v1/data/export/{export_id}", f"/api/v1/data/export/{export_id}/download"):
            answer = other.http.get(path)
            assert answer.status_code == 404 and answer.json()["error"]["code"] == "NOT_FOUND", path
            assert owner.http.get(path).status_code in (200, 409), path  # 409: the export is not ready yet
            assert admin.http.get(path).status_code in (200, 409), path
        assert other.http.delete(f"/api/v1/webhooks/{hook['id']}").status_code == 404
        assert other.request("GET", "/webhooks")["data"]["webhooks"] == []
        assert [h["id"] for h in owner.request("GET", "/webhooks")["data"]["webhooks"]] == [hook["id"]]
        assert hook["id"] in [h["id"] for h in admin.request("GET", "/webhooks")["data"]["webhooks"]]


def test_a_key_may_hold_only_so_many_webhooks(api_url, configure):
    from cli.client import Client

    configure(max_webhooks_per_key=2)
    body = {"url": "http://127.0.0.1:9/hook", "events": ["job.cancelled"]}
    with Client(api_url, make_key(["write"])) as owner:
        made = [owner.http.post("/api/v1/webhooks", json=body).status_code for _ in range(3)]
        assert made == [201, 201, 409]
        first = owner.request("GET", "/webhooks")["data"]["webhooks"][0]["id"]
        assert owner.http.delete(f"/api/v1/webhooks/{first}").status_code == 200
        assert owner.http.post("/api/v1/webhooks", json=body).status_code == 201  # room again
    with Client(api_url, make_key(["write"])) as other:  # the cap is per key
        assert other.http.post("/api/v1/webhooks", json=body).status_code == 201


# --- who is calling: decided by configuration, not by the caller ---------------------------------


def _logins(url: str, forwarded_for: list[str]) -> list[int]:
    """One failed login per entry, each for an account of its own, claiming to be forwarded for it."""
    with httpx.Client(base_url=url, timeout=30) as http:
        return [http.post("/api/v1/auth/login", json={"username": f"who-{i}", "password": "p"},
                          headers={"X-Forwarded-For": claimed}).status_code
                for i, claimed in enumerate(forwarded_for)]


def test_forwarded_headers_count_only_from_a_trusted_proxy(api_url):
    from pipelines.core.settings import get_settings
    from tests.helpers import api_processes

    most = get_settings().login_rate_limit_per_minute
    invented = [f"203.0.113.{i}" for i in range(most + 1)]
    # No proxy trusted (the tests' API, served as `ingot api` serves it): loopback is loopback, whatever
    # it says.
    assert _logins(api_url, invented) == [401] * most + [429]
    with api_processes(1, INGOT_TRUSTED_PROXIES="127.0.0.1") as (url,):  # behind a proxy on loopback
        assert _logins(url, invented) == [401] * (most + 1)  # each forwarded address its own bucket
        assert _logins(url, ["198.51.100.7"] * (most + 1)) == [401] * most + [429]


def test_an_account_waits_longer_after_each_failure_from_any_address(api_url, configure):
    from pipelines.auth import users
    from pipelines.auth.limits import FREE_FAILURES
    from pipelines.core.db import session_scope

    configure(login_rate_limit_per_minute=1000)  # the address's own limit is not what is tried here
    with session_scope() as session:
        users.create_user(session, "dana", "the right password", ["read"])
    with httpx.Client(base_url=api_url, timeout=30) as http:
        def attempt(password: str, username: str = "dana") -> httpx.Response:
            return http.post("/api/v1/auth/login", json={"username": username, "password": password})

        assert [attempt("wrong").status_code for _ in range(FREE_FAILURES)] == [401] * FREE_FAILURES
        held = attempt("the right password")  # even the right password waits: the account is held
        assert held.status_code == 429 and int(held.headers["Retry-After"]) >= 1
        assert attempt("x", "DANA ").status_code == 429  # the same account whatever its spelling
        assert attempt("wrong", "someone-else").status_code == 401  # other accounts are not held
        wait_for(lambda: attempt("the right password").status_code == 200, timeout=10,
                 message="the account's delay to pass")
        assert attempt("wrong").status_code == 401  # a success starts the count again


@pytest.mark.parametrize(("failures", "delay"), [(0, 0), (4, 0), (5, 1), (6, 2), (10, 32), (14, 512), (15, 900),
                                                  (10_000, 900)])
def test_login_delay_grows_to_a_ceiling(failures, delay):
    from pipelines.auth.limits import login_delay

    assert login_delay(failures) == delay


def test_an_accounts_wait_runs_from_the_moment_of_its_last_failure_not_its_whole_second():
    """The fifth failure late in a second, a try early in the next: a second was not yet over (kept in
    whole seconds, the record said it was, and the 1 s wait was none)."""
    from pipelines.auth.limits import FREE_FAILURES, Account

    account = Account.named("dana")
    stored = dict((command[2], command[3]) for command in account.failed(100.9) if command[0] == "HSET")
    reply = [str(FREE_FAILURES).encode(), str(stored["last"]).encode()]  # as Redis gives them back
    assert Account.wait_left(reply, 101.05) == 1
    assert Account.wait_left(reply, 101.89) == 1  # any part of a second left is a second in Retry-After
    assert Account.wait_left(reply, 101.9) == 0
    assert Account.wait_left([str(FREE_FAILURES).encode(), b"100"], 100.5) == 1  # a whole-second record
    assert Account.wait_left([None, None], 100.0) == 0


def test_without_redis_logging_in_is_503_and_keys_still_work(admin_key):
    from tests.helpers import api_processes, free_port

    with api_processes(1, INGOT_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0") as (url,):
        login = httpx.post(f"{url}/api/v1/auth/login", json={"username": "u", "password": "p"}, timeout=30)
        assert login.status_code == 503 and login.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
        assert login.headers["Retry-After"]
        assert httpx.get(f"{url}/api/v1/jobs", headers={"X-API-Key": admin_key}, timeout=30).status_code == 200


def test_authentication_cannot_be_disabled_on_a_public_address():
    import subprocess
    import sys

    from tests.helpers import ROOT

    env = {**__import__("os").environ, "INGOT_AUTH_DISABLED": "true", "INGOT_API_HOST": "0.0.0.0"}
    run = subprocess.run([sys.executable, "-m", "cli.main", "api", "--no-migrate"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "INGOT_AUTH_DISABLED" in run.stderr


def test_tiers_are_token_buckets_chosen_when_a_key_is_made(api_url, configure):
    """Each tier a rate and a burst: a key spends its burst at once, then gets tokens back at its rate;
    `premium` holds more than `basic`; `--tier` and `"tier"` choose, and the key shows its tier."""
    from pipelines.auth import keys
    from pipelines.core.db import session_scope

    configure(rate_limit_per_minute=120, rate_limit_burst=2, rate_limit_tiers="premium=600/5")
    with session_scope() as session:  # the admin making the keys is not what is limited here
        admin = {"X-API-Key": keys.create_key(session, "admin", ["admin"], tier="unlimited")[1]}
    made = {tier: httpx.post(f"{api_url}/api/v1/keys", headers=admin,
                             json={"name": tier, "scopes": ["read"], "tier": tier}).json()["data"]
            for tier in ("basic", "premium", "unlimited")}
    assert [made[t]["tier"] for t in made] == ["basic", "premium", "unlimited"]
    bad = httpx.post(f"{api_url}/api/v1/keys", headers=admin, json={"name": "x", "scopes": ["read"], "tier": "gold"})
    assert bad.status_code == 422 and "tier must be among" in bad.text
    with httpx.Client(base_url=api_url) as http:
        def burst(tier: str, n: int) -> list[int]:
            return [http.get("/api/v1/jobs", headers={"X-API-Key": made[tier]["key"]}).status_code for _ in range(n)]

        assert burst("basic", 3) == [200, 200, 429]
        refused = http.get("/api/v1/jobs", headers={"X-API-Key": made["basic"]["key"]})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"  # 2 tokens a second
        wait_for(lambda: burst("basic", 1) == [200], timeout=5, interval=0.2, message="a token back")
        assert burst("premium", 6) == [200] * 5 + [429]
        answer = http.get("/api/v1/jobs", headers={"X-API-Key": made["unlimited"]["key"]})
        assert answer.status_code == 200 and int(answer.headers["X-RateLimit-Limit"]) >= 10_000_000
    listed = ingot_cli("keys", "create", "--name", "cli-premium", "--scopes", "read", "--tier", "premium")
    assert listed.returncode == 0, listed.stderr
    shown = httpx.get(f"{api_url}/api/v1/keys", headers=admin).json()["data"]["keys"]
    assert {k["name"]: k["tier"] for k in shown}["cli-premium"] == "premium"


def ingot_cli(*args: str):
    import subprocess
    import sys

    from tests.helpers import ROOT

    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_a_redis_that_forgot_the_limit_script_is_sent_it_again(api_url, configure):
    """The bucket script goes to Redis by its SHA-1; a Redis restarted or flushed answers NOSCRIPT, and
    the request is counted all the same (the script sent whole once)."""
    from tests.helpers import broker

    configure(rate_limit_per_minute=5)
    key = make_key(["read"])
    with httpx.Client(base_url=api_url, headers={"X-API-Key": key}) as http:
        first = http.get("/api/v1/jobs")
        broker().script_flush()
        second = http.get("/api/v1/jobs")
    assert first.status_code == second.status_code == 200
    assert [first.headers["X-RateLimit-Remaining"], second.headers["X-RateLimit-Remaining"]] == ["4", "3"]
