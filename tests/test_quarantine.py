"""Quarantine holds each bad row once: re-runs count sightings, fixed lines are resolved."""

import psycopg
from sqlalchemy import text

from pipelines.core import migrate
from pipelines.core.db import get_engine
from testkit.datagen import sources_toml, write_csv


def entries(client, **filters) -> list[dict]:
    rows, cursor = client.quarantine(**filters, limit=1000)
    assert cursor is None
    return sorted(rows, key=lambda r: (r["file"], r["line"]))


def test_reruns_count_each_bad_row_once_and_fixes_resolve_it(client, worker, write_sources, data_dir):
    _good, bad = write_csv(data_dir / "a.csv", 30, bad_every=10)  # bad at lines 11, 21, 31
    write_sources(sources_toml("prices"))
    # An unchanged file is skipped by the next run; forced runs read it again, and meet its bad rows.
    runs = [client.wait(client.start_ingestion(["prices"], force=i > 0)["job_id"], timeout=60) for i in range(3)]
    assert all(r["state"] == "succeeded" and r["records_failed"] == 3 for r in runs)
    skipped = client.wait(client.start_ingestion(["prices"])["job_id"], timeout=60)
    assert skipped["state"] == "succeeded" and skipped["records_failed"] == 0
    assert skipped["result"]["sources"]["prices"]["unchanged"] == ["data/a.csv"]

    held = entries(client, source="prices")
    assert [(q["line"], q["times_seen"]) for q in held] == [(line, 3) for line in bad]
    assert all(q["job_id"] == runs[0]["id"] and q["last_seen_job_id"] == runs[2]["id"] for q in held)
    assert all(q["resolved_at"] is None for q in held)
    # each run still lists what it met
    assert [q["line"] for q in entries(client, job_id=runs[1]["id"])] == bad

    # line 11 fixed, line 21 still bad but different, line 31 unchanged
    lines = (data_dir / "a.csv").read_text().splitlines()
    lines[10] = lines[10].replace("n/a", "1.5")
    lines[20] = lines[20].replace("n/a", "oops")
    (data_dir / "a.csv").write_text("\n".join(lines) + "\n")
    fixed = client.wait(client.start_ingestion(["prices"])["job_id"], timeout=60)
    assert fixed["state"] == "succeeded" and fixed["records_failed"] == 2

    open_now = entries(client, source="prices")
    assert [(q["line"], q["raw"]["px"], q["times_seen"]) for q in open_now] == [(21, "oops", 1), (31, "n/a", 4)]
    resolved = entries(client, source="prices", state="resolved")
    assert [(q["line"], q["raw"]["px"]) for q in resolved] == [(11, "n/a"), (21, "n/a")]
    assert all(q["resolved_by_job_id"] == fixed["id"] and q["resolved_at"] for q in resolved)
    assert len(entries(client, source="prices", state="all")) == 4
    assert [q["line"] for q in entries(client, job_id=fixed["id"])] == [21, 31]

    # the bad content comes back: its entry is open again, seen once more
    lines[10] = lines[10].replace("1.5", "n/a")
    (data_dir / "a.csv").write_text("\n".join(lines) + "\n")
    client.wait(client.start_ingestion(["prices"])["job_id"], timeout=60)
    back = [q for q in entries(client, source="prices") if q["line"] == 11]
    assert len(back) == 1 and back[0]["times_seen"] == 4 and back[0]["resolved_at"] is None


def test_an_unknown_state_or_cursor_is_a_validation_error(client):
    from cli.client import IngotError

    for params in ({"state": "maybe"}, {"cursor": "bm90IG91cnM"}):
        try:
            client.request("GET", "/ingestion/quarantine", params=params)
        except IngotError as exc:
            assert exc.status == 422 and exc.code == "VALIDATION_ERROR"
        else:
            raise AssertionError(f"{params} was accepted")


def test_the_migration_folds_copies_left_by_earlier_reruns():
    url = get_engine().url.render_as_string(hide_password=False).replace("+psycopg", "")
    try:
        migrate.downgrade("0006")
        with psycopg.connect(url) as conn:
            for job in ("job_1", "job_2", "job_3"):
                conn.execute("INSERT INTO quarantine (source, job_id, file, line, reason, raw) VALUES "
                             "('s', %s, 'a.csv', 5, 'bad', '{\"px\": \"n/a\", \"id\": \"r5\"}'), "
                             "('s', %s, 'a.csv', 9, 'bad', '{\"px\": \"x\"}')", (job, job))
            conn.execute("INSERT INTO quarantine (source, job_id, file, line, reason, raw) VALUES "
                         "('s', 'job_4', 'a.csv', 5, 'bad', '{\"px\": \"other\"}')")
    finally:
        migrate.upgrade()
    with get_engine().connect() as conn:
        rows = conn.execute(text(
            "SELECT line, raw->>'px', times_seen, job_id, last_seen_job_id, "
            "(SELECT array_agg(job_id ORDER BY job_id) FROM quarantine_sightings s WHERE s.quarantine_id = q.id) "
            "FROM quarantine q ORDER BY line, raw->>'px'")).all()
    assert [tuple(r) for r in rows] == [
        (5, "n/a", 3, "job_1", "job_3", ["job_1", "job_2", "job_3"]),
        (5, "other", 1, "job_4", "job_4", ["job_4"]),
        (9, "x", 3, "job_1", "job_3", ["job_1", "job_2", "job_3"]),
    ]
