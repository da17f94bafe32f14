"""observations: an index for each sort of the data query, by value and by ingestion time

`POST /data/query` sorts by timestamp, value, id, source or ingested_at; only timestamp and the key
had an index, so a value-sorted page sorted every row its filters matched, each time, and a few such
readers took the database's CPU from everyone else. Built on the parent, each is built on every
partition; a detached first load gets its own when it is attached (`pipelines.ingestion.partitions`).

A sort by source reads one source's partition after another, by id: `ingot_sources()` names the
sources that have one, each read from one row of its partition instead of from the whole table.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-03 20:00:00
"""

from alembic import op

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None


_SOURCES = """
CREATE FUNCTION ingot_sources() RETURNS SETOF text LANGUAGE plpgsql STABLE AS $$
DECLARE part regclass; found text;
BEGIN
    FOR part IN SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = 'observations'::regclass LOOP
        EXECUTE format('SELECT source FROM %s LIMIT 1', part) INTO found;
        IF found IS NOT NULL THEN
            RETURN NEXT found;
        END IF;
    END LOOP;
END $$
"""


def upgrade() -> None:
    op.execute("CREATE INDEX ix_observations_value ON observations (value, source, id)")
    op.execute("CREATE INDEX ix_observations_ingested ON observations (ingested_at, source, id)")
    op.execute(_SOURCES)


def downgrade() -> None:
    op.execute("DROP FUNCTION ingot_sources()")
    op.execute("DROP INDEX ix_observations_ingested")
    op.execute("DROP INDEX ix_observations_value")
