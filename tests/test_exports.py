"""Exports as jobs: every format round-trips, files appear whole or not at all, downloads resume."""

import datetime as dt
import io
import json
import os
import signal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from sqlalchemy import text

from pipelines.core.db import get_engine
from pipelines.core.settings import get_settings
from pipelines.exports import export
from pipelines.ingestion.validate import ValidBatch
from tests import helpers
from tests.helpers import make_key, wait_for


@pytest.fixture
def worker(shared_worker):
    """This module's tests share one worker (tests/conftest.py)."""
    return shared_worker

UTC = dt.UTC
TRICKY = ["plain", 'comma, "quoted"', "new\nline", "tab\there", "ünïcödé ✓ 日本", "back\\slash", "", "{not json}"]


def seed(n: int, source: str = "exp", start: int = 0) -> None:
    """N rows with NULLs, unicode, delimiters and newlines in text, and times from many offsets."""
    rng = np.random.default_rng(start)
    idx = np.arange(start, start + n)
    base = dt.datetime(2026, 1, 1, tzinfo=UTC)
    stamps = [None if i % 97 == 0 else base + dt.timedelta(seconds=int(i) * 37, microseconds=int(i) % 1000)
              for i in idx]
    values = [None if i % 89 == 0 else float(v) for i, v in zip(idx, rng.normal(50, 20, n), strict=True)]
    batch = ValidBatch(
        pa.array([f"row-{i:07d}" for i in idx]),
        {"timestamp": pa.array(stamps, pa.timestamp("us", "UTC")), "value": pa.array(values, pa.float64())},
        {"note": pa.array([TRICKY[i % len(TRICKY)] for i in idx]), "n": pa.array(idx % 13),
         "flag": pa.array([bool(i % 2) for i in idx])},
        np.arange(n),
    )
    helpers.seed(source, "job_seed", batch)


def table(where: str = "TRUE") -> list[dict]:
    with get_engine().connect() as conn:
        rows = conn.execute(text(f"SELECT id, source, timestamp, value, metadata FROM observations WHERE {where} "
                                 "ORDER BY id, source")).mappings().all()
    return [dict(r) for r in rows]


def run_export(client, fmt, **body) -> dict:
    started = client.start_export(fmt, **body)
    job = client.wait(started["export_id"], timeout=120)
    assert job["state"] == "succeeded", job
    return job


def fetch(client, job, tmp_path) -> bytes:
    path = tmp_path / f"{job['id']}.{job['result']['format']}"
    client.download(job["id"], str(path))
    return path.read_bytes()


def test_every_format_round_trips_exactly(client, worker, tmp_path):
    seed(50_000)
    expected = table()
    for fmt in ("parquet", "csv", "jsonl"):
        job = run_export(client, fmt)
        data = fetch(client, job, tmp_path)
        assert job["result"]["row_count"] == 50_000 and job["result"]["file_size"] == len(data)
        stored = export.final_path(job["id"], fmt)
        assert stored.stat().st_mode & 0o777 == 0o600 and stored.parent.stat().st_mode & 0o777 == 0o700
        if fmt == "parquet":
            got = pq.read_table(io.BytesIO(data))
            assert got.schema.field("timestamp").type == pa.timestamp("us", "UTC")
            assert got.schema.field("value").type == pa.float64()
            rows = got.to_pylist()
        elif fmt == "csv":
            got = pacsv.read_csv(io.BytesIO(data), parse_options=pacsv.ParseOptions(newlines_in_values=True),
                                 convert_options=pacsv.ConvertOptions(
                                     column_types={"id": pa.string(), "metadata": pa.string(),
                                                   "timestamp": pa.timestamp("us", "UTC")},
                                     quoted_strings_can_be_null=False))
            rows = got.to_pylist()
            frame = pd.read_csv(io.BytesIO(data), dtype={"id": str, "metadata": str})
            assert len(frame) == 50_000 and frame["value"].dtype == np.float64
            stamps = pd.to_datetime(frame["timestamp"], utc=True)
            assert stamps.iloc[1] == pd.Timestamp(expected[1]["timestamp"])
        else:
            rows = [json.loads(line) for line in data.decode().splitlines()]
            for row in rows:
                if row["timestamp"] is not None:
                    row["timestamp"] = dt.datetime.fromisoformat(row["timestamp"])
        assert len(rows) == len(expected)
        for got_row, want in zip(rows, expected, strict=True):
            metadata = got_row["metadata"] if isinstance(got_row["metadata"], dict) else json.loads(got_row["metadata"])
            assert (got_row["id"], got_row["source"], got_row["timestamp"], got_row["value"], metadata) == (
                want["id"], want["source"], want["timestamp"], want["value"], want["metadata"]), fmt


def test_filters_columns_and_empty_results(client, worker, tmp_path):
    seed(2_000, "a")
    seed(500, "b", start=10_000)
    job = run_export(client, "csv", filters={"source": "b", "value_range": {"min": 50}},
                     columns=["id", "value"])
    frame = pd.read_csv(io.BytesIO(fetch(client, job, tmp_path)))
    assert list(frame.columns) == ["id", "value"]
    want = [r for r in table("source = 'b'") if r["value"] is not None and r["value"] >= 50]
    assert frame["id"].tolist() == [r["id"] for r in want] and frame["value"].tolist() == [r["value"] for r in want]
    start = "2026-01-01T02:00:00Z"
    job = run_export(client, "parquet", filters={"source": "a", "date_range": {"start": start}})
    got = pq.read_table(io.BytesIO(fetch(client, job, tmp_path)))
    assert got.num_rows == len(table(f"source = 'a' AND timestamp >= '{start}'"))
    empty = run_export(client, "csv", filters={"source": "nothing-here"})
    assert fetch(client, empty, tmp_path).decode() == "id,source,timestamp,value,metadata\n"
    empty = run_export(client, "parquet", filters={"source": "nothing-here"})
    assert pq.read_table(io.BytesIO(fetch(client, empty, tmp_path))).num_rows == 0
    assert client.export_status(empty["id"])["status"] == "succeeded"


def test_a_column_asked_for_twice_is_refused(client):
    """A file with two `id` columns breaks the tools that read it (pandas renames, Parquet readers refuse)."""
    answer = client.http.post("/api/v1/data/export", json={"format": "parquet", "columns": ["id", "value", "id"]})
    assert answer.status_code == 422
    assert "id given more than once" in str(answer.json()["error"]["details"])


def test_a_killed_export_is_redone_whole_and_never_served_half(client, worker, tmp_path):
    seed(400_000)
    started = client.start_export("parquet")
    export_id = started["export_id"]

    def running():
        with get_engine().connect() as conn:
            row = conn.execute(text("SELECT state, records_processed, lease_owner FROM jobs WHERE id = :id"),
                               {"id": export_id}).one()
        return row.state == "running" and row.records_processed > 0 and row

    row = wait_for(running, timeout=60, interval=0.01, message="the export to write a batch")
    assert client.http.get(f"/api/v1/data/export/{export_id}/download").status_code == 409
    assert not export.final_path(export_id, "parquet").exists()
    os.kill(int(row.lease_owner.rpartition(":")[2]), signal.SIGKILL)
    job = client.wait(export_id, timeout=120)
    assert job["state"] == "succeeded" and job["attempts"] == 2 and job["records_processed"] == 400_000
    again = run_export(client, "parquet")
    assert job["result"]["checksum"] == again["result"]["checksum"]  # identical to an uninterrupted export
    assert [p.name for p in export.exports_dir().iterdir() if p.name.startswith(".")] == []
    assert pq.read_table(io.BytesIO(fetch(client, job, tmp_path))).num_rows == 400_000


def test_downloads_resume_with_ranges_and_expire(client, worker, tmp_path):
    seed(3_000)
    job = run_export(client, "jsonl")
    url = f"/api/v1/data/export/{job['id']}/download"
    whole = client.http.get(url)
    assert whole.status_code == 200 and whole.headers["content-type"].startswith("application/x-ndjson")
    assert whole.headers["content-length"] == str(job["result"]["file_size"])
    assert f'ingot-export-{job["id"]}.jsonl' in whole.headers["content-disposition"]
    head = client.http.head(url)  # a download manager's first question: how big, resumable?
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(job["result"]["file_size"])
    assert head.headers["accept-ranges"] == "bytes" and head.headers["etag"] == whole.headers["etag"]
    first = client.http.get(url, headers={"Range": "bytes=0-999"})
    assert first.status_code == 206 and len(first.content) == 1000
    assert first.headers["content-range"] == f"bytes 0-999/{len(whole.content)}"
    rest = client.http.get(url, headers={"Range": "bytes=1000-"})
    assert first.content + rest.content == whole.content

    status = client.export_status(job["id"])
    assert status["status"] == "succeeded" and status["expires_at"].endswith("Z")
    assert status["checksum"] == job["result"]["checksum"]
    with get_engine().begin() as conn:
        conn.execute(text("UPDATE jobs SET result = jsonb_set(result, '{expires_at}', "
                          "to_jsonb((now() - interval '1 minute')::text)) WHERE id = :id"), {"id": job["id"]})
    assert export.expire() == [job["id"]]
    assert not export.final_path(job["id"], "jsonl").exists()
    assert client.export_status(job["id"])["status"] == "expired"
    r = client.http.get(url)
    assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"


@pytest.mark.parametrize("export_id", ["..%2F..%2Fetc%2Fpasswd", "job_..%2F..%2Fx", "%2Fetc%2Fpasswd",
                                       "job_0123456789abcdef01234567", "../../pyproject.toml"])
def test_unknown_or_hostile_ids_are_404(client, export_id):
    for suffix in ("", "/download"):
        r = client.http.get(f"/api/v1/data/export/{export_id}{suffix}")
        assert r.status_code == 404, (export_id, suffix, r.text)


def test_export_limits(client, api_url, configure, no_worker):  # exports stay queued, counted
    from cli.client import Client, IngotError

    settings = get_settings()
    key = make_key(["write"])
    with Client(api_url, key, retries=0) as limited:  # the refusal itself is what is tested
        for _ in range(settings.max_exports_per_key):
            limited.start_export("csv")
        with pytest.raises(IngotError) as info:
            limited.start_export("csv")
        assert info.value.status == 429 and "exports queued or running" in info.value.message
    configure(max_exports_per_key=100)
    with Client(api_url, make_key(["write"])) as limited:
        results = [limited.http.post("/api/v1/data/export", json={"format": "csv"})
                   for _ in range(settings.export_rate_limit_per_minute + 1)]
    assert [r.status_code for r in results[:-1]] == [202] * settings.export_rate_limit_per_minute
    last = results[-1]
    assert last.status_code == 429 and last.json()["error"]["code"] == "RATE_LIMIT_EXCEEDED"
    assert last.headers["X-RateLimit-Limit"] == str(settings.export_rate_limit_per_minute)
    assert last.headers["X-RateLimit-Remaining"] == "0" and int(last.headers["Retry-After"]) >= 1
    assert results[0].headers["X-RateLimit-Limit"] == str(settings.export_rate_limit_per_minute)
    read_only = make_key(["read"])
    with Client(api_url, read_only) as reader:
        with pytest.raises(IngotError) as info:
            reader.start_export("csv")
        assert info.value.status == 403


def test_short_disk_fails_the_export_clearly(client, start_worker):
    seed(1_000)
    start_worker(env={"INGOT_EXPORT_MIN_FREE_BYTES": str(10**18)})
    job = client.wait(client.start_export("csv")["export_id"], timeout=60)
    assert job["state"] == "failed" and job["error"].startswith("not enough disk space for exports")


def test_cancelling_an_export_removes_its_partial_file(client, worker):
    seed(400_000)
    export_id = client.start_export("jsonl")["export_id"]
    wait_for(lambda: client.job(export_id)["records_processed"] > 0, timeout=60, interval=0.01,
             message="the export to start writing")
    client.cancel(export_id)
    job = client.wait(export_id, poll=0.1, timeout=30)
    assert job["state"] == "cancelled"
    assert list(export.exports_dir().glob(f"*{export_id}*")) == []
    assert client.http.get(f"/api/v1/data/export/{export_id}/download").status_code == 409
