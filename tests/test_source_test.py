"""POST /sources/{id}/test: a sample through validation, a cheap total, nothing written."""

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import text

from pipelines.core.db import get_engine
from testkit.datagen import sources_toml, write_csv
from tests.fakeapi import as_json, http_source, records


def table_counts() -> tuple:
    with get_engine().connect() as conn:
        return tuple(conn.execute(text(
            "SELECT (SELECT count(*) FROM observations), (SELECT count(*) FROM quarantine), "
            "(SELECT count(*) FROM jobs), (SELECT count(*) FROM source_state)")).one())


def test_file_sources_show_a_sample_and_total_and_write_nothing(client, write_sources, data_dir):
    write_csv(data_dir / "a.csv", 40, bad_every=3)
    write_csv(data_dir / "b.csv", 10, start=100)
    pq.write_table(pa.table({"id": ["x", "y"], "timestamp": ["2026-01-01T00:00:00Z"] * 2, "px": ["1", "2"]}),
                   data_dir / "c.parquet")
    write_sources(sources_toml("prices") + sources_toml("pq", "*.parquet").replace('format = "csv"',
                                                                                   'format = "parquet"'))
    before = table_counts()
    result = client.request("POST", "/sources/prices/test")["data"]
    assert result["connected"] is True and result["total_records"] == 50 and result["error"] is None
    assert [r["id"] for r in result["sample_data"]] == ["r00000000", "r00000001", "r00000003", "r00000004"]
    assert result["sample_data"][0]["metadata"] == {"hub": "hub-0"} and result["sample_data"][0]["value"] == 0.0
    assert result["sample_rejects"][0]["line"] == 4
    assert client.request("POST", "/sources/pq/test")["data"]["total_records"] == 2
    assert table_counts() == before


def test_the_total_leaves_out_the_lines_above_the_header(client, write_sources, data_dir):
    (data_dir / "r.csv").write_text("Settlement report\nprices in EUR\nid,timestamp,px\n"
                                    "a,2026-01-01T00:00:00Z,1\nb,2026-01-01T00:00:00Z,2\n")
    (data_dir / "r.json").write_text('[{"id": "a", "timestamp": "2026-01-01T00:00:00Z", "px": 1}]')
    write_sources(sources_toml("report", "r.csv").replace('format = "csv"', 'format = "csv"\nskip_lines = 2')
                  + sources_toml("doc", "r.json").replace('format = "csv"', 'format = "json"'))
    report = client.request("POST", "/sources/report/test")["data"]
    assert report["total_records"] == 2 and [r["id"] for r in report["sample_data"]] == ["a", "b"]
    doc = client.request("POST", "/sources/doc/test")["data"]
    assert doc["total_records"] is None and [r["id"] for r in doc["sample_data"]] == ["a"]


def test_unreachable_or_broken_sources_say_why(client, write_sources, api):
    api.routes["/ok"] = lambda q, h: as_json({"response": {"data": records(0, 8)}})
    write_sources(http_source("ok", f"{api.url}/ok") + http_source("down", "http://127.0.0.1:9/nothing")
                  + sources_toml("missing", "none-*.csv"))
    ok = client.request("POST", "/sources/ok/test")["data"]
    assert ok["connected"] is True and len(ok["sample_data"]) == 5 and ok["total_records"] is None
    down = client.request("POST", "/sources/down/test")["data"]
    assert down["connected"] is False and "connection failed" in down["error"]
    missing = client.request("POST", "/sources/missing/test")["data"]
    assert missing["connected"] is False and "no file matches" in missing["error"]
    r = client.http.post("/api/v1/sources/nope/test")
    assert r.status_code == 404


def test_a_source_test_needs_write_and_is_limited_per_key(api_url, write_sources, data_dir, configure):
    from cli.client import Client
    from tests.helpers import make_key

    write_csv(data_dir / "a.csv", 3)
    write_sources(sources_toml("prices", "a.csv"))
    configure(source_test_rate_limit_per_minute=2)
    with Client(api_url, make_key(["read"])) as reader:
        assert reader.http.post("/api/v1/sources/prices/test").status_code == 403
    with Client(api_url, make_key(["write"])) as writer:
        answers = [writer.http.post("/api/v1/sources/prices/test").status_code for _ in range(3)]
    assert answers == [200, 200, 429]
