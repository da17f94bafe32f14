"""A source's first load: into its own unindexed table, then indexed and attached as its partition."""

import datetime as dt

import psycopg
import pytest
from sqlalchemy import text

from pipelines.core import migrate
from pipelines.core.db import get_engine
from pipelines.ingestion import partitions
from pipelines.ingestion.load import Loader
from tests.test_load import T0, batch

HOUR = dt.timedelta(hours=1)


def load(loader: Loader, *batches) -> None:
    """Each batch in its own transaction, as an ingestion run commits them."""
    for b in batches:
        with get_engine().begin() as conn:
            loader.load(conn.connection.driver_connection, loader.prepare(b))


def open_loader(source: str, job: str = "job_1", resuming: bool = False) -> Loader:
    with get_engine().begin() as conn:
        return Loader.open(conn.connection.driver_connection, source, job, resuming)


def rows(source: str) -> list[tuple]:
    with get_engine().connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT id, value, job_id FROM observations WHERE source = :s ORDER BY id"), {"s": source})]


def state(source: str) -> partitions.State:
    with get_engine().connect() as conn:
        return partitions.state(conn.connection.driver_connection, source)


def indexes(source: str) -> set[str]:
    with get_engine().connect() as conn:
        return {r[0] for r in conn.execute(text(
            "SELECT indexdef FROM pg_indexes WHERE tablename = :t"), {"t": partitions.partition_name(source)})}


def test_a_first_load_is_invisible_until_it_is_indexed_and_attached():
    loader = open_loader("first")
    assert loader.bulk and state("first") is partitions.State.DETACHED
    assert indexes("first") == set()  # nothing to keep up while the rows arrive
    load(loader, batch([("a", T0, 1.0), ("b", T0, 2.0)]), batch([("c", T0 + HOUR, 3.0)]))
    assert rows("first") == []

    loader.finish()
    assert state("first") is partitions.State.ATTACHED
    assert rows("first") == [("a", 1.0, "job_1"), ("b", 2.0, "job_1"), ("c", 3.0, "job_1")]
    with get_engine().connect() as conn:  # analysed: the first queries are planned on real statistics
        assert conn.execute(text("SELECT reltuples FROM pg_class WHERE relname = :t"),
                            {"t": partitions.partition_name("first")}).scalar_one() == 3
    definitions = " ".join(indexes("first"))
    assert "UNIQUE INDEX" in definitions and "(id, source)" in definitions
    assert '"timestamp", source, id' in definitions
    # The key holds from now on, and the columns no longer default to this load's source and job.
    with pytest.raises(Exception, match="duplicate key"), get_engine().begin() as conn:
        conn.execute(text(f'INSERT INTO {partitions.partition_name("first")} (source, id, metadata) '
                          "VALUES ('first', 'a', '{}')"))
    with pytest.raises(Exception, match="null value in column"), get_engine().begin() as conn:
        conn.execute(text(f'INSERT INTO {partitions.partition_name("first")} (id, metadata) VALUES (\'z\', \'{{}}\')'))

    # The next run writes straight into the partition; a re-ingest changes nothing.
    again = open_loader("first", "job_2")
    assert not again.bulk
    load(again, batch([("a", T0, 1.0), ("b", T0, 20.0)]))
    assert rows("first") == [("a", 1.0, "job_1"), ("b", 20.0, "job_2"), ("c", 3.0, "job_1")]


def test_a_key_repeated_in_a_later_batch_of_a_first_load_keeps_its_last_value():
    loader = open_loader("dupes")
    load(loader,
         batch([("a", T0, 1.0), ("b", T0, 2.0), ("c", T0, 3.0)]),
         batch([("b", T0, 20.0), ("d", T0, 4.0)]),
         batch([("b", T0, 200.0), ("a", T0, 10.0)]))
    loader.finish()
    assert rows("dupes") == [("a", 10.0, "job_1"), ("b", 200.0, "job_1"), ("c", 3.0, "job_1"),
                             ("d", 4.0, "job_1")]


def test_a_resumed_attempt_carries_on_the_first_load_and_a_new_run_attaches_a_leftover():
    load(open_loader("resume"), batch([("a", T0, 1.0)]))  # then the worker dies: no finish
    resumed = open_loader("resume", resuming=True)
    assert resumed.bulk
    load(resumed, batch([("b", T0, 2.0)]))  # and dies again

    # A later run (the job gave up) finds the table detached: it attaches what was committed first.
    later = open_loader("resume", "job_2")
    assert not later.bulk and state("resume") is partitions.State.ATTACHED
    assert rows("resume") == [("a", 1.0, "job_1"), ("b", 2.0, "job_1")]
    load(later, batch([("c", T0, 3.0)]))
    assert [r[0] for r in rows("resume")] == ["a", "b", "c"]


def test_finish_is_idempotent_and_names_are_safe_for_any_source_id():
    source = "Prices (EU) / day-ahead; DROP TABLE observations"
    loader = open_loader(source)
    load(loader, batch([("x", T0, 1.0)]))
    loader.finish()
    loader.finish()
    assert rows(source) == [("x", 1.0, "job_1")]
    name = partitions.partition_name(source)
    assert len(name.encode() + b"_time") < 64 and name != partitions.partition_name(source.replace("-", "_"))


def test_the_migration_moves_existing_rows_into_one_partition_per_source():
    url = get_engine().url.render_as_string(hide_password=False).replace("+psycopg", "")
    for source in ("m1", "m2"):
        loader = open_loader(source)
        load(loader, batch([(f"{source}-a", T0, 1.0), (f"{source}-b", T0, 2.0)]))
        loader.finish()
    try:
        migrate.downgrade("0005")
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM observations").fetchone()[0] == 4
            assert conn.execute("SELECT relkind FROM pg_class WHERE relname = 'observations'").fetchone()[0] == "r"
    finally:
        migrate.upgrade()
    assert state("m1") is partitions.State.ATTACHED and state("m2") is partitions.State.ATTACHED
    assert rows("m1") == [("m1-a", 1.0, "job_1"), ("m1-b", 2.0, "job_1")]
    assert [r[0] for r in rows("m2")] == ["m2-a", "m2-b"]
