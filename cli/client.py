"""The Python client of the control plane; the CLI is built on it.

    from cli.client import Client
    client = Client("http://127.0.0.1:8000", api_key)
    job = client.wait(client.start_ingestion(["prices_csv"])["job_id"])
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

FINAL_STATES = {"succeeded", "failed", "cancelled"}


class IngotError(Exception):
    def __init__(self, status: int, code: str, message: str, details: dict | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, details or {}


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 30):
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs) -> dict[str, Any]:
        """The whole envelope of a call under /api/v1; IngotError for any error envelope."""
        response = self.http.request(method, f"/api/v1{path}", **kwargs)
        try:
            body = response.json()
        except ValueError:
            raise IngotError(response.status_code, "BAD_RESPONSE", response.text[:200]) from None
        if not response.is_success or not body.get("success", False):
            self._raise(response)
        return body

    @staticmethod
    def _raise(response: httpx.Response) -> None:
        """IngotError from an error envelope."""
        try:
            error = response.json().get("error") or {}
        except ValueError:
            error = {"code": "BAD_RESPONSE", "message": response.text[:200]}
        raise IngotError(response.status_code, error.get("code", "ERROR"), error.get("message", ""),
                         error.get("details"))

    def start_ingestion(self, sources: list[str] | None = None, *, mode: str | None = None,
                        batch_size: int | None = None, timeout: int | None = None) -> dict:
        options = {k: v for k, v in {"mode": mode, "batch_size": batch_size, "timeout": timeout}.items() if v}
        body: dict[str, Any] = {"options": options}
        if sources:
            body["sources"] = sources
        return self.request("POST", "/ingestion/start", json=body)["data"]

    def ingestion_status(self) -> dict:
        return self.request("GET", "/ingestion/status")["data"]

    def job(self, job_id: str) -> dict:
        return self.request("GET", f"/jobs/{job_id}")["data"]

    def jobs(self, *, kind: str | None = None, state: str | None = None, limit: int = 50,
             cursor: str | None = None) -> tuple[list[dict], str | None]:
        params = {k: v for k, v in {"kind": kind, "state": state, "limit": limit, "cursor": cursor}.items() if v}
        body = self.request("GET", "/jobs", params=params)
        return body["data"]["jobs"], body["meta"]["next_cursor"]

    def cancel(self, job_id: str) -> dict:
        return self.request("POST", f"/jobs/{job_id}/cancel")["data"]

    def stop_ingestion(self, job_id: str | None = None) -> dict:
        return self.request("POST", "/ingestion/stop", json={"job_id": job_id} if job_id else {})["data"]

    def start_export(self, fmt: str, *, filters: dict | None = None, columns: list[str] | None = None) -> dict:
        body: dict[str, Any] = {"format": fmt, "filters": filters or {}}
        if columns:
            body["columns"] = columns
        return self.request("POST", "/data/export", json=body)["data"]

    def export_status(self, export_id: str) -> dict:
        return self.request("GET", f"/data/export/{export_id}")["data"]

    def download(self, export_id: str, path: str, *, on_bytes: Callable[[int], None] | None = None) -> str:
        """Stream EXPORT_ID's file to PATH and verify its SHA-256; returns the hex digest."""
        import hashlib

        digest = hashlib.sha256()
        with self.http.stream("GET", f"/api/v1/data/export/{export_id}/download") as response:
            if not response.is_success:
                response.read()
                error = response.json().get("error", {})
                raise IngotError(response.status_code, error.get("code", "ERROR"), error.get("message", ""))
            expected = response.headers.get("x-checksum-sha256")
            with open(path, "wb") as fh:
                for chunk in response.iter_bytes(1 << 20):
                    fh.write(chunk)
                    digest.update(chunk)
                    if on_bytes:
                        on_bytes(len(chunk))
        if expected and digest.hexdigest() != expected:
            raise IngotError(0, "CHECKSUM_MISMATCH", f"downloaded file does not match sha256 {expected}")
        return digest.hexdigest()

    def sources(self) -> list[dict]:
        return self.request("GET", "/sources")["data"]["sources"]

    def quarantine(self, *, source: str | None = None, job_id: str | None = None, state: str | None = None,
                   limit: int = 100, cursor: str | None = None) -> tuple[list[dict], str | None]:
        """One page of quarantined rows (unresolved unless STATE is 'resolved' or 'all'), and the next cursor."""
        params = {"source": source, "job_id": job_id, "state": state, "limit": limit, "cursor": cursor}
        params = {k: v for k, v in params.items() if v}
        body = self.request("GET", "/ingestion/quarantine", params=params)
        return body["data"]["rows"], body["meta"]["next_cursor"]

    def curves(self, *, curve_key: str | None = None, asof_date: str | None = None, limit: int = 500,
               cursor: str | None = None, **filters: str) -> tuple[list[dict], str | None]:
        """One page of curve points (each curve's latest as-of date unless ASOF_DATE), and the next cursor."""
        params = {"curve_key": curve_key, "asof_date": asof_date, "limit": limit, "cursor": cursor, **filters}
        body = self.request("GET", "/curves", params={k: v for k, v in params.items() if v})
        return body["data"], body["meta"]["next_cursor"]

    def curve_diff(self, curve_key: str, asof_a: str, asof_b: str) -> list[dict]:
        params = {"curve_key": curve_key, "asof_a": asof_a, "asof_b": asof_b}
        return self.request("GET", "/curves/diff", params=params)["data"]

    def create_scenario(self, definition: dict) -> dict:
        return self.request("POST", "/scenarios", json=definition)["data"]

    def run_scenario(self, scenario_id: str) -> dict:
        """Queue a run; its `run_id` is a job id (`wait` follows it)."""
        return self.request("POST", f"/scenarios/{scenario_id}/run")["data"]

    def scenario_outputs(self, scenario_id: str, fmt: str = "json") -> dict | bytes:
        """The latest succeeded run's outputs: a dict for JSON, the file's bytes for CSV and PNG."""
        if fmt == "json":
            return self.request("GET", f"/scenarios/{scenario_id}/outputs")["data"]
        response = self.http.get(f"/api/v1/scenarios/{scenario_id}/outputs", params={"format": fmt})
        if response.is_error:
            self._raise(response)
        return response.content

    def scenario_metrics(self, scenario_id: str) -> dict:
        return self.request("GET", f"/scenarios/{scenario_id}/metrics/latest")["data"]

    def wait(self, job_id: str, *, poll: float = 0.5, timeout: float | None = None,
             on_update: Callable[[dict], None] | None = None) -> dict:
        """Poll JOB_ID until it ends (or TIMEOUT seconds pass: TimeoutError); return the job."""
        deadline = time.monotonic() + timeout if timeout else None
        while True:
            job = self.job(job_id)
            if on_update:
                on_update(job)
            if job["state"] in FINAL_STATES:
                return job
            if deadline and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout} s")
            time.sleep(poll)
