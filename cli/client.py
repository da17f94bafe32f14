"""The Python client of the control plane, covering the whole API; the CLI is built on it.

    from cli.client import Client
    client = Client("http://127.0.0.1:8000", api_key)
    job = client.wait(client.start_ingestion(["prices_csv"])["job_id"])

Every error envelope is raised as `IngotError` carrying its HTTP status and the envelope's `code`
(`NOT_FOUND`, `CONFLICT`, ...). An answer of 429 or 503 (rate limited, at capacity, the database or
broker away) is tried again after the `Retry-After` the server gave, up to `retries` more times:
the server refused such a request before doing anything, so trying again is safe for every method.
A connection that could not be made is tried again the same way (nothing was sent).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
from httpx_sse import EventSource, SSEError

from pipelines.core.retry import retry_after

FINAL_STATES = {"succeeded", "failed", "cancelled"}


class IngotError(Exception):
    def __init__(self, status: int, code: str, message: str, details: dict | None = None,
                 request_id: str | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, details or {}
        self.request_id = request_id


def _present(**params: Any) -> dict[str, Any]:
    """The query parameters that were given (None and empty strings left out; 0 and False kept)."""
    return {k: v for k, v in params.items() if v is not None and v != ""}


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 30, *,
                 token: str | None = None, retries: int = 3, max_retry_wait: float = 60.0,
                 sleep: Callable[[float], None] = time.sleep, on_retry: Callable[[str, float], None] | None = None):
        """ON_RETRY(why, seconds), if given, hears of each wait before a call is tried again (a terminal
        can say so rather than sit silent)."""
        headers = {"X-API-Key": api_key} if api_key else {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.retries, self.max_retry_wait, self._sleep = retries, max_retry_wait, sleep
        self._on_retry = on_retry
        self.rate_limit: dict[str, int] = {}  # the last X-RateLimit-* figures the server sent

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transport -------------------------------------------------------------------------------

    def send(self, method: str, path: str, *, stream: bool = False, **kwargs) -> httpx.Response:
        """One call under /api/v1 (PATH absolute from the server root when it starts with `//`),
        retried on 429/503 and on connections that could not be made; IngotError for any error answer.
        With STREAM the body is left unread (close the response)."""
        url = path[1:] if path.startswith("//") else f"/api/v1{path}"
        for attempt in range(self.retries + 1):
            try:
                request = self.http.build_request(method, url, **kwargs)
                response = self.http.send(request, stream=stream)
            except httpx.ConnectError as exc:
                if attempt == self.retries:
                    raise
                self._wait(f"could not connect ({exc})", min(2.0 ** attempt, self.max_retry_wait))
                continue
            self.rate_limit = {name[len("x-ratelimit-"):]: int(value) for name, value in response.headers.items()
                               if name.startswith("x-ratelimit-") and value.isdigit()}
            wait = retry_after(response, self.max_retry_wait)
            if response.status_code in (429, 503) and attempt < self.retries:
                response.close()
                self._wait(f"answered {response.status_code}",
                           wait if wait is not None else min(2.0 ** attempt, self.max_retry_wait))
                continue
            if response.is_error:
                if stream:
                    response.read()
                self._raise(response)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait(self, why: str, seconds: float) -> None:
        if self._on_retry is not None:
            self._on_retry(why, seconds)
        self._sleep(seconds)

    def request(self, method: str, path: str, **kwargs) -> dict[str, Any]:
        """The whole envelope of a call under /api/v1; IngotError for any error envelope."""
        response = self.send(method, path, **kwargs)
        try:
            body = response.json()
        except ValueError:
            raise IngotError(response.status_code, "BAD_RESPONSE", response.text[:200]) from None
        if not body.get("success", False):
            self._raise(response)
        return body

    def _data(self, method: str, path: str, **kwargs) -> Any:
        return self.request(method, path, **kwargs)["data"]

    @staticmethod
    def _raise(response: httpx.Response) -> None:
        """IngotError from an error envelope."""
        try:
            body = response.json()
            error = body.get("error") or {}
        except ValueError:
            body, error = {}, {"code": "BAD_RESPONSE", "message": response.text[:200]}
        raise IngotError(response.status_code, error.get("code", "ERROR"), error.get("message", ""),
                         error.get("details"), body.get("request_id"))

    def _pages(self, fetch: Callable[[str | None], tuple[list[dict], str | None]]) -> Iterator[dict]:
        cursor: str | None = None
        while True:
            items, cursor = fetch(cursor)
            yield from items
            if not cursor:
                return

    # -- health and identity ---------------------------------------------------------------------

    def health(self) -> dict:
        return self._data("GET", "/health")

    def ready(self) -> dict:
        """/ready's checks; a 503 (not ready) is answered as it is, not raised."""
        response = self.http.get("/ready")
        return response.json()

    def status(self) -> dict:
        return self._data("GET", "/status")

    def me(self) -> dict:
        return self._data("GET", "/auth/me")

    def login(self, username: str, password: str) -> dict:
        """A bearer token for a user; the client sends it from now on."""
        token = self._data("POST", "/auth/login", json={"username": username, "password": password})
        self.http.headers.pop("X-API-Key", None)
        self.http.headers["Authorization"] = f"Bearer {token['access_token']}"
        return token

    def refresh(self) -> dict:
        """A fresh token for the one this client sends; the client sends the fresh one from now on."""
        token = self._data("POST", "/auth/refresh")
        self.http.headers["Authorization"] = f"Bearer {token['access_token']}"
        return token

    def logout(self) -> dict:
        """End the token this client sends, in every API process; the client forgets it."""
        answer = self._data("POST", "/auth/logout")
        self.http.headers.pop("Authorization", None)
        return answer

    # -- users (admin) -----------------------------------------------------------------------------

    def create_user(self, username: str, password: str, scopes: list[str]) -> dict:
        return self._data("POST", "/users", json={"username": username, "password": password, "scopes": scopes})

    def users(self) -> list[dict]:
        return self._data("GET", "/users")["users"]

    def disable_user(self, user_id: str) -> dict:
        """Disable a user: its tokens are refused from their next request."""
        return self._data("POST", f"/users/{user_id}/disable")

    # -- keys (admin) ------------------------------------------------------------------------------

    def create_key(self, name: str, scopes: list[str], *, expires_at: str | None = None,
                   rate_limit_per_minute: int | None = None, tier: str | None = None) -> dict:
        """A new key; its secret (`key`) is in this answer only."""
        body = _present(name=name, scopes=scopes, expires_at=expires_at, rate_limit_per_minute=rate_limit_per_minute,
                        tier=tier)
        return self._data("POST", "/keys", json=body)

    def keys(self) -> list[dict]:
        return self._data("GET", "/keys")["keys"]

    def revoke_key(self, key_id: str) -> dict:
        return self._data("DELETE", f"/keys/{key_id}")

    def rotate_key(self, key_id: str, *, grace_hours: float | None = None) -> dict:
        return self._data("POST", f"/keys/{key_id}/rotate", json=_present(grace_hours=grace_hours))

    # -- sources and ingestion ---------------------------------------------------------------------

    def sources(self) -> list[dict]:
        return self._data("GET", "/sources")["sources"]

    def source(self, source_id: str) -> dict:
        return self._data("GET", f"/sources/{source_id}")

    def test_source(self, source_id: str) -> dict:
        return self._data("POST", f"/sources/{source_id}/test")

    def start_ingestion(self, sources: list[str] | None = None, *, mode: str | None = None,
                        batch_size: int | None = None, timeout: int | None = None, force: bool = False) -> dict:
        body: dict[str, Any] = {"options": _present(mode=mode, batch_size=batch_size, timeout=timeout,
                                                    force=force or None)}
        if sources:
            body["sources"] = sources
        return self._data("POST", "/ingestion/start", json=body)

    def stop_ingestion(self, job_id: str | None = None) -> dict:
        return self._data("POST", "/ingestion/stop", json=_present(job_id=job_id))

    def ingestion_status(self) -> dict:
        return self._data("GET", "/ingestion/status")

    def quarantine(self, *, source: str | None = None, job_id: str | None = None, state: str | None = None,
                   limit: int = 100, cursor: str | None = None) -> tuple[list[dict], str | None]:
        """One page of quarantined rows (unresolved unless STATE is 'resolved' or 'all'), and the next cursor."""
        params = _present(source=source, job_id=job_id, state=state, limit=limit, cursor=cursor)
        body = self.request("GET", "/ingestion/quarantine", params=params)
        return body["data"]["rows"], body["meta"]["next_cursor"]

    def iter_quarantine(self, **filters: Any) -> Iterator[dict]:
        return self._pages(lambda cursor: self.quarantine(cursor=cursor, **filters))

    # -- jobs ----------------------------------------------------------------------------------------

    def job(self, job_id: str) -> dict:
        return self._data("GET", f"/jobs/{job_id}")

    def jobs(self, *, kind: str | None = None, state: str | None = None, limit: int = 50,
             cursor: str | None = None) -> tuple[list[dict], str | None]:
        body = self.request("GET", "/jobs", params=_present(kind=kind, state=state, limit=limit, cursor=cursor))
        return body["data"]["jobs"], body["meta"]["next_cursor"]

    def iter_jobs(self, **filters: Any) -> Iterator[dict]:
        return self._pages(lambda cursor: self.jobs(cursor=cursor, **filters))

    def cancel(self, job_id: str) -> dict:
        return self._data("POST", f"/jobs/{job_id}/cancel")

    def watch(self, job_id: str, *, timeout: float | None = None) -> Iterator[dict]:
        """JOB_ID as it changes, from its event stream (`GET /jobs/{id}/events`): each state, progress
        and counts, the last one final. No polling: the server says when something changed."""
        read_timeout = httpx.Timeout(self.http.timeout.connect, read=timeout or 60.0)
        response = self.send("GET", f"/jobs/{job_id}/events", stream=True, timeout=read_timeout,
                             headers={"Accept": "text/event-stream"})
        try:
            for event in EventSource(response).iter_sse():
                if event.event == "job":
                    yield event.json()
        finally:
            response.close()

    def wait(self, job_id: str, *, poll: float = 0.5, timeout: float | None = None,
             on_update: Callable[[dict], None] | None = None) -> dict:
        """Follow JOB_ID until it ends (or TIMEOUT seconds pass: TimeoutError); return the job. It listens
        to the job's event stream, and polls every POLL seconds only where the stream breaks off."""
        deadline = time.monotonic() + timeout if timeout else None
        try:
            for change in self.watch(job_id, timeout=timeout):
                if on_update:
                    on_update(change)
                if change["state"] in FINAL_STATES:
                    return self.job(job_id)
                if deadline and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {change['state']} after {timeout} s")
        except (httpx.TransportError, SSEError):
            pass  # a proxy that cuts streams, a restart: polling finishes the wait
        except IngotError as exc:
            if exc.code != "QUOTA_EXCEEDED":
                raise
            # this key already holds as many streams as it may: polling finishes the wait
        while True:
            job = self.job(job_id)
            if on_update:
                on_update(job)
            if job["state"] in FINAL_STATES:
                return job
            if deadline and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout} s")
            self._sleep(poll)

    # -- data: query and exports -------------------------------------------------------------------

    def query(self, *, filters: dict | None = None, limit: int = 100, page: int | None = None,
              cursor: str | None = None, sort: dict | None = None) -> dict:
        """One page of records: `{"records", "pagination"}` (cursor paging unless PAGE is given)."""
        pagination: dict[str, Any] = {"limit": limit, **_present(page=page, cursor=cursor)}
        body = _present(filters=filters or {}, pagination=pagination, sort=sort)
        return self._data("POST", "/data/query", json=body)

    def iter_records(self, *, filters: dict | None = None, limit: int = 1000, sort: dict | None = None
                     ) -> Iterator[dict]:
        def fetch(cursor: str | None) -> tuple[list[dict], str | None]:
            page = self.query(filters=filters, limit=limit, cursor=cursor, sort=sort)
            return page["records"], page["pagination"].get("next_cursor")

        return self._pages(fetch)

    def start_export(self, fmt: str, *, filters: dict | None = None, columns: list[str] | None = None) -> dict:
        body: dict[str, Any] = {"format": fmt, "filters": filters or {}}
        if columns:
            body["columns"] = columns
        return self._data("POST", "/data/export", json=body)

    def export_status(self, export_id: str) -> dict:
        return self._data("GET", f"/data/export/{export_id}")

    def download(self, export_id: str, path: str, *, on_bytes: Callable[[int], None] | None = None) -> str:
        """Stream EXPORT_ID's file to PATH and verify its SHA-256; returns the hex digest."""
        digest = hashlib.sha256()
        response = self.send("GET", f"/data/export/{export_id}/download", stream=True)
        try:
            expected = response.headers.get("x-checksum-sha256")
            with open(path, "wb") as fh:
                for chunk in response.iter_bytes(1 << 20):
                    fh.write(chunk)
                    digest.update(chunk)
                    if on_bytes:
                        on_bytes(len(chunk))
        finally:
            response.close()
        if expected and digest.hexdigest() != expected:
            raise IngotError(0, "CHECKSUM_MISMATCH", f"downloaded file does not match sha256 {expected}")
        return digest.hexdigest()

    # -- curves --------------------------------------------------------------------------------------

    def curves(self, *, curve_key: str | None = None, asof_date: str | None = None, limit: int = 500,
               cursor: str | None = None, **filters: str) -> tuple[list[dict], str | None]:
        """One page of curve points (each curve's latest as-of date unless ASOF_DATE), and the next cursor."""
        params = _present(curve_key=curve_key, asof_date=asof_date, limit=limit, cursor=cursor, **filters)
        body = self.request("GET", "/curves", params=params)
        return body["data"], body["meta"]["next_cursor"]

    def iter_curves(self, **filters: Any) -> Iterator[dict]:
        return self._pages(lambda cursor: self.curves(cursor=cursor, **filters))

    def curve_diff(self, curve_key: str, asof_a: str, asof_b: str) -> list[dict]:
        return self._data("GET", "/curves/diff", params={"curve_key": curve_key, "asof_a": asof_a, "asof_b": asof_b})

    def dimensions(self, *, include_counts: bool = False) -> dict:
        return self._data("GET", "/metadata/dimensions", params={"include_counts": include_counts})

    def locations(self, iso: str | None = None) -> list[dict]:
        return self._data("GET", "/locations/iso", params=_present(iso=iso))

    def location(self, location_id: str) -> dict:
        return self._data("GET", f"/locations/iso/{location_id}")

    # -- scenarios -----------------------------------------------------------------------------------

    def create_scenario(self, definition: dict) -> dict:
        return self._data("POST", "/scenarios", json=definition)

    def scenarios(self, *, limit: int = 50, cursor: str | None = None) -> tuple[list[dict], str | None]:
        body = self.request("GET", "/scenarios", params=_present(limit=limit, cursor=cursor))
        return body["data"]["scenarios"], body.get("meta", {}).get("next_cursor")

    def scenario(self, scenario_id: str) -> dict:
        return self._data("GET", f"/scenarios/{scenario_id}")

    def delete_scenario(self, scenario_id: str) -> dict:
        return self._data("DELETE", f"/scenarios/{scenario_id}")

    def run_scenario(self, scenario_id: str) -> dict:
        """Queue a run; its `run_id` is a job id (`wait` follows it)."""
        return self._data("POST", f"/scenarios/{scenario_id}/run")

    def scenario_runs(self, scenario_id: str, *, limit: int = 50, cursor: str | None = None
                      ) -> tuple[list[dict], str | None]:
        body = self.request("GET", f"/scenarios/{scenario_id}/runs", params=_present(limit=limit, cursor=cursor))
        return body["data"]["runs"], body.get("meta", {}).get("next_cursor")

    def scenario_run(self, scenario_id: str, run_id: str) -> dict:
        return self._data("GET", f"/scenarios/{scenario_id}/runs/{run_id}")

    def cancel_scenario_run(self, run_id: str) -> dict:
        return self._data("POST", f"/scenarios/runs/{run_id}/cancel")

    def set_scenario_run_state(self, run_id: str, state: str, reason: str | None = None) -> dict:
        """Admin: `cancelled`, `failed` (with a reason) or `queued` (run again)."""
        return self._data("POST", f"/scenarios/runs/{run_id}/state", json=_present(state=state, reason=reason))

    def scenario_outputs(self, scenario_id: str, fmt: str = "json") -> dict | bytes:
        """The latest succeeded run's outputs: a dict for JSON, the file's bytes for CSV and PNG."""
        if fmt == "json":
            return self._data("GET", f"/scenarios/{scenario_id}/outputs")
        return self.send("GET", f"/scenarios/{scenario_id}/outputs", params={"format": fmt}).content

    def scenario_metrics(self, scenario_id: str) -> dict:
        return self._data("GET", f"/scenarios/{scenario_id}/metrics/latest")

    # -- seed 000's names for the same calls (README, Compatibility): an Aurum script runs as it is ----

    get_curves = curves
    compare_curves = curve_diff
    get_dimensions = dimensions
    get_locations = locations
    get_location = location
    list_scenarios = scenarios
    get_scenario = scenario
    list_scenario_runs = scenario_runs
    get_scenario_run = scenario_run
    get_scenario_outputs = scenario_outputs
    get_scenario_metrics = scenario_metrics

    # -- webhooks ------------------------------------------------------------------------------------

    def create_webhook(self, url: str, events: list[str], *, secret: str | None = None) -> dict:
        """A new endpoint; its secret is in this answer only."""
        return self._data("POST", "/webhooks", json=_present(url=url, events=events, secret=secret))

    def webhooks(self) -> list[dict]:
        return self._data("GET", "/webhooks")["webhooks"]

    def webhook(self, webhook_id: str) -> dict:
        return self._data("GET", f"/webhooks/{webhook_id}")

    def delete_webhook(self, webhook_id: str) -> dict:
        return self._data("DELETE", f"/webhooks/{webhook_id}")

    def deliveries(self, webhook_id: str, *, limit: int = 50, cursor: str | None = None
                   ) -> tuple[list[dict], str | None]:
        body = self.request("GET", f"/webhooks/{webhook_id}/deliveries", params=_present(limit=limit, cursor=cursor))
        return body["data"]["deliveries"], body.get("meta", {}).get("next_cursor")

    def redeliver(self, webhook_id: str, delivery_id: str) -> dict:
        return self._data("POST", f"/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver")

    # -- administration ------------------------------------------------------------------------------

    def config(self) -> dict:
        return self._data("GET", "/config")

    def update_config(self, changes: dict) -> dict:
        return self._data("PUT", "/config", json=changes)

    def logs(self, *, level: str | None = None, source: str | None = None, job_id: str | None = None,
             start_time: str | None = None, end_time: str | None = None, limit: int = 100) -> list[dict]:
        params = _present(level=level, source=source, job_id=job_id, start_time=start_time, end_time=end_time,
                          limit=limit)
        return self._data("GET", "/logs", params=params)["logs"]

    def metrics(self) -> dict:
        return self._data("GET", "/metrics")
