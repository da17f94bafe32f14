"""Loading: COPY a validated batch into a staging table, then merge it into the dataset on its key.

The merge skips rows whose values did not change, so re-ingesting the same input rewrites nothing,
and duplicates within a batch are removed first (the last line wins).
"""

from __future__ import annotations

import io

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from psycopg import sql
from psycopg.types.json import Jsonb

from pipelines.sources.files import Reject
from pipelines.validate import ValidBatch

_PG_TYPES = [
    (pa.types.is_boolean, "boolean"),
    (pa.types.is_integer, "bigint"),
    (pa.types.is_floating, "double precision"),
    (pa.types.is_timestamp, "timestamptz"),
    (pa.types.is_date, "date"),
]
# PostgreSQL functions take at most 100 arguments: 50 key/value pairs per jsonb_build_object.
_PAIRS_PER_CALL = 50


def _pg_type(arrow_type: pa.DataType) -> str:
    for test, name in _PG_TYPES:
        if test(arrow_type):
            return name
    return "text"


def _metadata_expr(names: list[str]) -> sql.Composable:
    if not names:
        return sql.SQL("'{}'::jsonb")
    calls = []
    for start in range(0, len(names), _PAIRS_PER_CALL):
        pairs = [
            sql.SQL("{}, s.{}").format(sql.Literal(name), sql.Identifier(f"m{start + i}"))
            for i, name in enumerate(names[start : start + _PAIRS_PER_CALL])
        ]
        calls.append(sql.SQL("jsonb_build_object({})").format(sql.SQL(", ").join(pairs)))
    return sql.SQL(" || ").join(calls)


def _staging_table(batch: ValidBatch) -> pa.Table:
    columns = {"ord": pa.array(batch.lines), "id": batch.ids}
    for name in ("timestamp", "value"):
        columns[name] = batch.fields.get(name, pa.nulls(batch.num_rows, pa.null()))
    for index, array in enumerate(batch.metadata.values()):
        columns[f"m{index}"] = array
    return pa.table(columns)


def merge_observations(conn: psycopg.Connection, source: str, job_id: str, batch: ValidBatch) -> None:
    """Upsert BATCH into observations in the caller's transaction."""
    if batch.num_rows == 0:
        return
    staged = _staging_table(batch)
    metadata_names = list(batch.metadata)
    fixed = {"ord": "bigint", "id": "text", "timestamp": "timestamptz", "value": "double precision"}
    column_defs = [
        sql.SQL("{} {}").format(
            sql.Identifier(name), sql.SQL(fixed.get(name) or _pg_type(staged.schema.field(name).type))
        )
        for name in staged.column_names
    ]
    conn.execute(sql.SQL("CREATE TEMP TABLE ingot_stage ({}) ON COMMIT DROP").format(sql.SQL(", ").join(column_defs)))
    buffer = io.BytesIO()
    pacsv.write_csv(staged, buffer, pacsv.WriteOptions(include_header=False))
    with conn.cursor().copy("COPY ingot_stage FROM STDIN (FORMAT csv)") as copy:
        copy.write(buffer.getbuffer())
    unique = pc.count_distinct(batch.ids).as_py() == batch.num_rows
    select = sql.SQL(
        "SELECT {distinct} %(source)s, s.id, s.timestamp, s.value, {metadata}, %(job)s, now() "
        "FROM ingot_stage s {order}"
    ).format(
        distinct=sql.SQL("" if unique else "DISTINCT ON (s.id)"),
        metadata=_metadata_expr(metadata_names),
        order=sql.SQL("" if unique else "ORDER BY s.id, s.ord DESC"),
    )
    conn.execute(
        sql.SQL(
            "INSERT INTO observations AS o (source, id, timestamp, value, metadata, job_id, ingested_at) {select} "
            "ON CONFLICT (source, id) DO UPDATE SET timestamp = EXCLUDED.timestamp, value = EXCLUDED.value, "
            "metadata = EXCLUDED.metadata, job_id = EXCLUDED.job_id, ingested_at = EXCLUDED.ingested_at "
            "WHERE (o.timestamp, o.value, o.metadata) IS DISTINCT FROM "
            "(EXCLUDED.timestamp, EXCLUDED.value, EXCLUDED.metadata)"
        ).format(select=select),
        {"source": source, "job": job_id},
    )
    conn.execute("DROP TABLE ingot_stage")


def quarantine(conn: psycopg.Connection, source: str, job_id: str, file: str | None, rejects: list[Reject]) -> None:
    """Record rows that failed, with where they came from and why, in the caller's transaction."""
    if not rejects:
        return
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO quarantine (source, job_id, file, line, reason, raw, created_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, now()) ON CONFLICT DO NOTHING",
            [(source, job_id, file, r.line, r.reason, Jsonb(r.raw)) for r in rejects],
        )
