"""observations partitioned by source

One partition per source lets a source's first load go into a table with no index and build its
indexes once at the end (pipelines/ingestion/partitions.py). Inside a partition the source is constant, so the
key is indexed as (id, source), which sorts and searches far faster than an index led by a constant;
the query indexes become one btree on (timestamp, source, id), which serves both the per-source and
the cross-source time order, and the BRIN index it replaces is no longer needed.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 07:40:00
"""

from alembic import op
from psycopg import sql

from pipelines.ingestion.partitions import partition_name

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

COLUMNS = (
    'source text COLLATE "C" NOT NULL, id text COLLATE "C" NOT NULL, timestamp timestamptz, '
    "value double precision, metadata jsonb NOT NULL, job_id text, ingested_at timestamptz NOT NULL DEFAULT now()"
)


def _driver():
    return op.get_bind().connection.driver_connection


def upgrade() -> None:
    op.execute("ALTER TABLE observations RENAME TO observations_unpartitioned")
    op.execute("ALTER TABLE observations_unpartitioned RENAME CONSTRAINT observations_pkey TO observations_unpartitioned_pkey")
    op.execute("DROP INDEX ix_observations_source_time")
    op.execute("DROP INDEX ix_observations_time")
    op.execute(f"CREATE TABLE observations ({COLUMNS}, CONSTRAINT observations_pkey PRIMARY KEY (id, source)) "
               "PARTITION BY LIST (source)")
    op.execute("CREATE INDEX ix_observations_time ON observations (timestamp, source, id)")
    conn = _driver()
    for (source,) in conn.execute("SELECT DISTINCT source FROM observations_unpartitioned").fetchall():
        table = sql.Identifier(partition_name(source))
        conn.execute(sql.SQL("CREATE TABLE {t} PARTITION OF observations FOR VALUES IN ({s})").format(
            t=table, s=sql.Literal(source)))
        conn.execute(sql.SQL("INSERT INTO {t} SELECT source, id, timestamp, value, metadata, job_id, ingested_at "
                             "FROM observations_unpartitioned WHERE source = {s}").format(t=table, s=sql.Literal(source)))
    op.execute("DROP TABLE observations_unpartitioned")


def downgrade() -> None:
    op.execute("ALTER TABLE observations RENAME TO observations_partitioned")
    op.execute("ALTER TABLE observations_partitioned RENAME CONSTRAINT observations_pkey TO observations_partitioned_pkey")
    op.execute("ALTER INDEX ix_observations_time RENAME TO ix_observations_partitioned_time")
    op.execute(f"CREATE TABLE observations ({COLUMNS}, CONSTRAINT observations_pkey PRIMARY KEY (source, id))")
    op.execute("INSERT INTO observations SELECT source, id, timestamp, value, metadata, job_id, ingested_at "
               "FROM observations_partitioned")
    op.execute("CREATE INDEX ix_observations_source_time ON observations (source, timestamp, id)")
    op.execute("CREATE INDEX ix_observations_time ON observations USING brin (timestamp)")
    # Partitions left detached by an interrupted first load go with the rest.
    conn = _driver()
    for (name,) in conn.execute("SELECT relname FROM pg_class c WHERE relname LIKE 'observations\\_%' "
                                "AND relkind = 'r' AND NOT EXISTS (SELECT FROM pg_inherits WHERE inhrelid = c.oid)"
                                ).fetchall():
        conn.execute(sql.SQL("INSERT INTO observations SELECT source, id, timestamp, value, metadata, job_id, "
                             "ingested_at FROM {t} ON CONFLICT DO NOTHING").format(t=sql.Identifier(name)))
        conn.execute(sql.SQL("DROP TABLE {t}").format(t=sql.Identifier(name)))
    op.execute("DROP TABLE observations_partitioned")
