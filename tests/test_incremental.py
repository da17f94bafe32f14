"""Incremental loads: only rows past the committed cursor, each row loaded once, even across kills."""

import os
import signal

import pytest
from sqlalchemy import text

from pipelines.core.db import get_engine
from testkit.datagen import incremental_toml, sources_toml, write_csv, write_series
from tests.helpers import wait_for


@pytest.fixture
def worker(shared_worker):
    """This module's tests share one worker (tests/conftest.py)."""
    return shared_worker


def writers() -> dict[str, int]:
    """How many stored rows each job last wrote."""
    with get_engine().connect() as conn:
        return dict(conn.execute(text("SELECT job_id, count(*) FROM observations GROUP BY job_id")).all())


def count() -> tuple[int, int]:
    with get_engine().connect() as conn:
        return tuple(conn.execute(text("SELECT count(*), count(DISTINCT id) FROM observations")).one())


def cursor_state() -> str:
    with get_engine().connect() as conn:
        return conn.execute(text("SELECT cursor_value FROM source_state WHERE source = 'prices'")).scalar_one()


def run(client, **options) -> dict:
    job = client.wait(client.start_ingestion(["prices"], **options)["job_id"], timeout=120)
    assert job["state"] == "succeeded", (job["error"], job["result"])
    return job


def notes(job: dict) -> list[str]:
    """What JOB's run noted of the source's files, without the files' names."""
    return [n.partition(": ")[2] for n in job["result"]["sources"]["prices"].get("notes", [])]


def grown_note(job: dict) -> str:
    """What JOB's run said of a file it read from where the file's last load ended."""
    return next(n for n in notes(job) if n.startswith("grew"))


def test_three_runs_over_a_growing_file_load_each_row_once(client, worker, write_sources, data_dir):
    path = data_dir / "series.csv"
    write_sources(incremental_toml("prices", "series.csv"))
    write_series(path, 0, 100)
    first = run(client)
    assert first["records_processed"] == 100 and cursor_state() == "2026-01-01T01:39:00+00:00"
    loaded = path.stat().st_size
    write_series(path, 100, 50, append=True)
    second = run(client, batch_size=20)
    # only the new rows, read from where the file ended: the 100 before them are not read again
    assert second["records_processed"] == 50 and second["result"]["sources"]["prices"]["skipped"] == 0
    assert grown_note(second) == (f"grew since its last load: read from line 102 on (byte {loaded:,}), "
                                  "what comes before it unchanged")
    write_series(path, 150, 30, append=True)
    third = run(client)
    assert third["records_processed"] == 30
    assert count() == (180, 180)
    assert writers() == {first["id"]: 100, second["id"]: 50, third["id"]: 30}
    again = run(client)  # unchanged since the last (incremental) run: not read at all
    assert again["records_processed"] == 0 and again["result"]["sources"]["prices"]["unchanged"]
    # A full run reads it, since the incremental runs never read its earlier rows again; nothing changed,
    # so nothing is rewritten. Then it has been read whole, and the next full run skips it.
    full = run(client, mode="full")
    assert full["records_processed"] == 180 and full["result"]["sources"]["prices"]["unchanged_rows"] == 180
    assert count() == (180, 180)
    assert writers() == {first["id"]: 100, second["id"]: 50, third["id"]: 30}  # nothing rewritten
    unchanged = run(client, mode="full")
    assert unchanged["records_processed"] == 0 and unchanged["result"]["sources"]["prices"]["unchanged"]
    forced = run(client, mode="full", force=True)
    assert forced["records_processed"] == 180 and count() == (180, 180)


def test_a_full_run_after_incremental_ones_loads_a_revised_earlier_row(client, worker, write_sources, data_dir):
    """An incremental run takes only rows past the cursor, so a row revised before it (a corrected
    settlement) waits for a full run: which must read the file, though the incremental run saw it last."""
    path = data_dir / "series.csv"
    write_sources(incremental_toml("prices", "series.csv"))
    write_series(path, 0, 100)
    run(client)
    rewrite(path, {"r00000010": "-10"}, extra="r00000100,2026-01-02T00:00:00Z,1,hub-0\n")
    incremental = run(client)
    assert incremental["records_processed"] == 1 and stored(["r00000010"])["r00000010"][0] == 5.0

    full = run(client, mode="full")
    assert full["records_processed"] == 101 and full["result"]["sources"]["prices"]["unchanged_rows"] == 100
    assert stored(["r00000010"])["r00000010"][0] == -10 and count() == (101, 101)
    assert run(client, mode="full")["result"]["sources"]["prices"]["unchanged"] == ["data/series.csv"]


def test_a_killed_incremental_run_resumes_without_losing_or_doubling(client, worker, write_sources, data_dir):
    path = data_dir / "series.csv"
    write_sources(incremental_toml("prices", "series.csv"))
    write_series(path, 0, 20_000)
    first = run(client)
    write_series(path, 20_000, 120_000, append=True)
    job_id = client.start_ingestion(["prices"], batch_size=2000)["job_id"]

    def mid_way():
        job = client.job(job_id)
        return job["state"] == "running" and job["records_processed"] >= 10_000 and job

    job = wait_for(mid_way, timeout=60, interval=0.02, message="the run to commit some batches")
    assert job["records_processed"] < 100_000
    with get_engine().connect() as conn:
        owner = conn.execute(text("SELECT lease_owner FROM jobs WHERE id = :id"), {"id": job_id}).scalar_one()
    os.kill(int(owner.rpartition(":")[2]), signal.SIGKILL)
    done = client.wait(job_id, timeout=120)
    assert done["state"] == "succeeded" and done["attempts"] == 2
    assert done["records_processed"] == 120_000
    assert count() == (140_000, 140_000)
    assert writers() == {first["id"]: 20_000, job_id: 120_000}
    assert cursor_state() == "2026-04-08T05:19:00+00:00"  # minute 139,999
    assert run(client)["result"]["sources"]["prices"]["unchanged"] == ["data/series.csv"]  # not read at all
    again = run(client, force=True)  # read: every row is behind the cursor
    assert again["records_processed"] == 0 and again["result"]["sources"]["prices"]["skipped"] == 140_000


def test_rows_sharing_the_last_cursor_value_still_load_once(client, worker, write_sources, data_dir):
    path = data_dir / "daily.csv"
    write_sources(incremental_toml("prices", "daily.csv"))
    path.write_text("id,timestamp,px,hub\na,2026-03-01T00:00:00Z,1,x\nb,2026-03-02T00:00:00Z,2,x\n"
                    "c,2026-03-02T00:00:00Z,3,x\n")
    assert run(client)["records_processed"] == 3
    with path.open("a") as fh:  # a late row for the same day, and one for the next
        fh.write("d,2026-03-02T00:00:00Z,4,x\ne,2026-03-03T00:00:00Z,5,x\n")
    second = run(client)
    assert second["records_processed"] == 2 and "read from line 5 on" in grown_note(second)
    assert count() == (5, 5)
    assert run(client)["records_processed"] == 0


def test_a_rerun_reads_only_files_that_changed_since_their_last_load(client, worker, write_sources, data_dir):
    write_sources(sources_toml("prices", "*.csv"))
    good_a, _ = write_csv(data_dir / "a.csv", 200)
    good_b, _ = write_csv(data_dir / "b.csv", 100, start=200)
    first = run(client)
    assert first["records_processed"] == good_a + good_b

    # Nothing changed: nothing read, and the job says which files it skipped.
    same = run(client)
    assert same["records_processed"] == 0
    assert same["result"]["sources"]["prices"]["unchanged"] == ["data/a.csv", "data/b.csv"]

    # b.csv rewritten with other values but the same size and time (as `cp -p` or `rsync -t` leave it):
    # its content hash tells it apart. A new file beside them is read too; a.csv is not.
    stat = (data_dir / "b.csv").stat()
    text_b = (data_dir / "b.csv").read_text()
    (data_dir / "b.csv").write_text(text_b.replace("hub-", "hub_"))
    os.utime(data_dir / "b.csv", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (data_dir / "b.csv").stat().st_size == stat.st_size
    good_c, _ = write_csv(data_dir / "c.csv", 50, start=300)
    changed = run(client)
    assert changed["records_processed"] == good_b + good_c
    assert changed["result"]["sources"]["prices"]["unchanged"] == ["data/a.csv"]
    assert count() == (good_a + good_b + good_c,) * 2

    # Settings left at their defaults are no part of the declaration: spelt out, nothing is read again.
    write_sources(sources_toml("prices", "*.csv").replace('name = "Test prices"',
                                                         'name = "Test prices"\ntimezone = "UTC"\ndecimal = "."'))
    assert run(client)["records_processed"] == 0

    # Another declaration of the source (a different rule) reads every file again.
    write_sources(sources_toml("prices", "*.csv").replace('name = "Test prices"', 'name = "Prices, renamed"'))
    redeclared = run(client)
    assert redeclared["records_processed"] == good_a + good_b + good_c


def test_a_forced_run_reads_every_file_and_records_what_it_read(client, worker, write_sources, data_dir):
    write_sources(sources_toml("prices", "a.csv"))
    good, _ = write_csv(data_dir / "a.csv", 120)
    assert run(client, force=True)["records_processed"] == good
    assert run(client)["records_processed"] == 0  # the forced run's fingerprint counts as a whole load


def stored(ids: list[str]) -> dict[str, tuple]:
    """Value, writing job and row hash of IDS."""
    with get_engine().connect() as conn:
        rows = conn.execute(text("SELECT id, value, job_id, row_hash FROM observations WHERE id = ANY(:ids)"),
                            {"ids": ids}).all()
    return {row.id: (row.value, row.job_id, row.row_hash) for row in rows}


def rewrite(path, changes: dict[str, str], extra: str = "") -> None:
    """PATH with the px of the rows in CHANGES replaced, and EXTRA lines appended."""
    lines = path.read_text().splitlines(keepends=True)
    for n, line in enumerate(lines):
        key = line.split(",", 1)[0]
        if key in changes:
            fields = line.rstrip("\n").split(",")
            fields[2] = changes[key]
            lines[n] = ",".join(fields) + "\n"
    path.write_text("".join(lines) + extra)


def test_a_rerun_of_a_changed_file_merges_only_the_rows_that_changed(client, worker, write_sources, data_dir):
    path = data_dir / "series.csv"
    write_sources(sources_toml("prices", "series.csv"))
    write_series(path, 0, 100)
    first = run(client)
    rewrite(path, {"r00000003": "-3", "r00000050": "-50", "r00000097": "-97"},
            extra="r00000100,2026-01-02T00:00:00Z,1,hub-0\nr00000101,2026-01-02T00:01:00Z,2,hub-1\n")
    second = run(client, batch_size=20)  # the first batch meets stored keys: the rest of the run merges

    assert second["records_processed"] == 102
    assert second["result"]["sources"]["prices"]["unchanged_rows"] == 97
    assert writers() == {first["id"]: 97, second["id"]: 5}  # unchanged rows keep their first writer
    after = stored(["r00000003", "r00000050", "r00000097", "r00000100", "r00000004"])
    assert [after[k][0] for k in ("r00000003", "r00000050", "r00000097", "r00000100", "r00000004")] == \
        [-3, -50, -97, 1, 2.0]
    assert all(row_hash is not None for _value, _job, row_hash in after.values())


def test_a_key_that_comes_back_later_in_the_run_wins_even_with_its_stored_content(
        client, worker, write_sources, data_dir):
    """The stored hashes are read once; a key this run merged is never taken for unchanged again."""
    path = data_dir / "series.csv"
    write_sources(sources_toml("prices", "series.csv"))
    write_series(path, 0, 60)
    run(client)
    # r00000010 changes early in the file and comes back, as it was, in the last line (a later batch).
    rewrite(path, {"r00000010": "-1", "r00000020": "-2"}, extra="r00000010,2026-01-01T00:10:00Z,5.0,hub-0\n")
    again = run(client, batch_size=10)
    assert again["records_processed"] == 61  # every line read counts, the repeated key's too
    assert stored(["r00000010"])["r00000010"][0] == 5.0
    assert stored(["r00000020"])["r00000020"][0] == -2


def test_a_forced_run_merges_every_row_and_rows_without_a_hash_get_one(client, worker, write_sources, data_dir):
    path = data_dir / "series.csv"
    write_sources(sources_toml("prices", "series.csv"))
    write_series(path, 0, 40)
    first = run(client)
    with get_engine().begin() as conn:
        # Edited behind Ingot's back (its hash now lies), and rows as written before hashes existed.
        conn.execute(text("UPDATE observations SET value = -1 WHERE id = 'r00000005'"))
        conn.execute(text("UPDATE observations SET row_hash = NULL WHERE id IN ('r00000006', 'r00000007')"))
    forced = run(client, force=True)
    assert "unchanged_rows" not in forced["result"]["sources"]["prices"]
    after = stored(["r00000005", "r00000006", "r00000007"])
    assert after["r00000005"][:2] == (2.5, forced["id"])  # the merge compared values: put right
    # Same values, now with a hash: their writer is still the first run.
    assert {k: (v[1], v[2] is not None) for k, v in after.items() if k != "r00000005"} == \
        {"r00000006": (first["id"], True), "r00000007": (first["id"], True)}
    rewrite(path, {"r00000001": "-1"})
    plain = run(client)
    assert plain["result"]["sources"]["prices"]["unchanged_rows"] == 39


GROWN = """
[sources.prices]
type = "file"
format = "{format}"
path = "data/{file}"
primary_key = ["id"]
cursor = "timestamp"
{extra}
[sources.prices.validation]
required_columns = ["id", "timestamp", "px"]
data_types = {{ timestamp = "datetime", px = "float" }}
[sources.prices.mapping]
px = "value"
"""


def quarantined() -> dict[int, tuple[str, int, set[str]]]:
    """Each held line: its reason, how many runs met it, and which."""
    with get_engine().connect() as conn:
        rows = conn.execute(text(
            "SELECT q.line, q.reason, q.times_seen, array_remove(array_agg(s.job_id), NULL) FROM quarantine q "
            "LEFT JOIN quarantine_sightings s ON s.quarantine_id = q.id WHERE q.source = 'prices' "
            "AND q.resolved_at IS NULL GROUP BY q.id")).all()
    return {line: (reason, seen, set(jobs)) for line, reason, seen, jobs in rows}


def all_stored() -> dict[str, tuple]:
    with get_engine().connect() as conn:
        return {r[0]: tuple(r[1:]) for r in conn.execute(text(
            "SELECT id, timestamp, value, metadata, job_id FROM observations WHERE source = 'prices'")).all()}


def test_a_grown_csv_is_read_from_where_it_ended_with_its_lines_numbered_as_a_whole_read_numbers_them(
        client, worker, write_sources, data_dir):
    """Lines before the header, line breaks inside quoted fields, "\\r\\n" breaks, and bad rows before and
    after the point the read starts from: a run reads only the new lines, finds their bad rows at the
    lines a whole read finds them, and stores what a whole read stores."""
    path = data_dir / "grown.csv"
    write_sources(GROWN.format(format="csv", file="grown.csv", extra="skip_lines = 2"))
    path.write_bytes(b"Prices export\r\nfrom the desk\r\nid,timestamp,px,note\r\n"
                     b'a,2026-03-01T00:00:00Z,1,"two\r\nlines"\r\n'
                     b"b,2026-03-01T01:00:00Z,n/a,plain\r\n"  # line 6: quarantined
                     b'c,2026-03-01T02:00:00Z,3,"say ""hi"""\r\n')
    first = run(client)
    assert first["records_processed"] == 2 and set(quarantined()) == {6}
    with path.open("ab") as fh:
        fh.write(b'd,2026-03-01T03:00:00Z,4,"three\r\nline\r\nnote"\r\n'  # lines 8-10
                 b"e,2026-03-01T04:00:00Z,oops,x\r\n"  # line 11: quarantined
                 b"f,2026-03-01T05:00:00Z,6\r\n"  # line 12: a column short
                 b"a,2026-03-01T06:00:00Z,7,corrected\r\n")  # line 13: a key seen before, past the cursor
    grown = run(client)
    assert "read from line 8 on" in grown_note(grown)
    assert grown["records_processed"] == 2 and grown["records_failed"] == 2
    held = quarantined()
    assert {line: jobs for line, (_, _, jobs) in held.items()} == {6: {first["id"]}, 11: {grown["id"]},
                                                                   12: {grown["id"]}}
    assert "wrong number of columns" in held[12][0]
    rows = all_stored()
    assert rows["a"][1] == 7.0 and rows["d"][2] == {"note": "three\r\nline\r\nnote"}

    # A forced run reads the whole file: it meets the same bad lines and finds every row as stored.
    forced = run(client, mode="full", force=True)
    assert not any(note.startswith("grew") for note in notes(forced))
    again = quarantined()
    assert set(again) == {6, 11, 12} and all(forced["id"] in jobs for _, _, jobs in again.values())
    assert [again[line][:2] for line in (11, 12)] == [(held[line][0], 2) for line in (11, 12)]
    assert all_stored() == rows


def test_a_grown_json_lines_file_is_read_from_where_it_ended_by_a_full_run_after_a_full_one(
        client, worker, write_sources, data_dir):
    """A full run may read only a grown file's new lines when the last run read it whole; a JSON string's
    escaped quote is no quoted field. A corrected row among the new lines replaces the stored one."""
    path = data_dir / "grown.jsonl"
    write_sources(GROWN.format(format="jsonl", file="grown.jsonl", extra=""))
    path.write_text('{"id": "a", "timestamp": "2026-03-01T00:00:00Z", "px": 1, "note": "5\\" pipe"}\n'
                    '{"id": "b", "timestamp": "2026-03-01T01:00:00Z", "px": 2}\n')
    first = run(client, mode="full")
    with path.open("a") as fh:
        fh.write('{"id": "b", "timestamp": "2026-03-01T01:00:00Z", "px": 20}\n{"id": "c", "px": 3}\n'
                 '{"id": "d", "timestamp": "2026-03-01T02:00:00Z", "px": 4}\n')
    grown = run(client, mode="full")
    assert "read from line 3 on" in grown_note(grown)
    assert grown["records_processed"] == 2 and set(quarantined()) == {4}
    rows = all_stored()
    assert {k: v[1] for k, v in rows.items()} == {"a": 1.0, "b": 20.0, "d": 4.0}
    assert rows["a"][3] == first["id"] and rows["b"][3] == rows["d"][3] == grown["id"]
