"""Loading: a validated batch becomes one COPY payload, merged into the dataset on its key.

The usual path COPYs the batch into a staging table and merges it with `INSERT ... ON CONFLICT DO
UPDATE`, skipping rows whose values did not change, so re-ingesting the same input rewrites nothing.
While a run's batches bring only new keys (a first load), the batch is COPYed straight into the
table under a savepoint: the primary key still guards it, and the first conflict rolls the savepoint
back and sends that batch, and the rest of the run, down the merge path. Same result, half the work.
Duplicate keys within a batch are removed first (the last line wins).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from psycopg import sql
from psycopg.types.json import Jsonb

from pipelines.sources.files import Reject
from pipelines.validate import ValidBatch, as_text

_CONTROL = "[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f]"
_NEEDS_ESCAPE = '["\\\\\\n\\r\\t]'


def _json_string(text: pa.Array) -> pa.Array:
    if pc.any(pc.match_substring_regex(text, _CONTROL)).as_py():
        return pa.array([None if v is None else json.dumps(v) for v in text.to_pylist()], pa.string())
    if pc.any(pc.match_substring_regex(text, _NEEDS_ESCAPE)).as_py():
        for old, new in (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t")):
            text = pc.replace_substring(text, old, new)
    return pc.binary_join_element_wise(pa.scalar('"'), text, pa.scalar('"'), "")


def _json_values(array: pa.Array) -> pa.Array:
    """Each value of ARRAY as JSON text (null as `null`)."""
    kind = array.type
    if pa.types.is_boolean(kind) or pa.types.is_integer(kind):
        text = array.cast(pa.string())
    elif pa.types.is_floating(kind):
        finite = pc.is_finite(array)
        text = pc.if_else(finite, array.cast(pa.string()), _json_string(array.cast(pa.string())))
    else:
        text = _json_string(as_text(array))
    return pc.fill_null(text, "null")


def metadata_json(columns: dict[str, pa.Array], n: int) -> pa.Array:
    """One JSON object per row from the metadata columns, built column-wise in Arrow."""
    if not columns:
        return pa.repeat(pa.scalar("{}"), n)
    parts = []
    for name, array in columns.items():
        key = json.dumps(name) + ":"
        parts.append(pc.binary_join_element_wise(pa.scalar(key), _json_values(array), ""))
    body = pc.binary_join_element_wise(*parts, ",") if len(parts) > 1 else parts[0]
    return pc.binary_join_element_wise(pa.scalar("{"), body, pa.scalar("}"), "")


def _last_per_key(ids: pa.Array) -> np.ndarray | None:
    """Row indices that keep the last occurrence of each id, or None if ids are already unique."""
    if pc.count_distinct(ids).as_py() == len(ids):
        return None
    positions = pa.table({"id": ids, "i": pa.array(np.arange(len(ids)))})
    keep = positions.group_by("id").aggregate([("i", "max")]).column("i_max").to_numpy()
    return np.sort(keep)


@dataclass
class Payload:
    """A batch as COPY text: source, id, timestamp, value, metadata, job_id."""

    data: memoryview
    rows: int


def prepare(source: str, job_id: str, batch: ValidBatch) -> Payload:
    n = batch.num_rows
    ids, fields, metadata = batch.ids, batch.fields, batch.metadata
    keep = _last_per_key(ids) if n else None
    if keep is not None:
        ids = ids.take(keep)
        fields = {k: v.take(keep) for k, v in fields.items()}
        metadata = {k: v.take(keep) for k, v in metadata.items()}
        n = len(keep)
    timestamp = fields.get("timestamp", pa.nulls(n, pa.timestamp("us", "UTC")))
    table = pa.table({
        "source": pa.repeat(pa.scalar(source), n),
        "id": ids,
        # Written as naive UTC text: the loading session runs in UTC.
        "timestamp": timestamp.cast(pa.timestamp(timestamp.type.unit)),
        "value": fields.get("value", pa.nulls(n, pa.float64())),
        "metadata": metadata_json(metadata, n),
        "job_id": pa.repeat(pa.scalar(job_id), n),
    })
    buffer = io.BytesIO()
    pacsv.write_csv(table, buffer, pacsv.WriteOptions(include_header=False))
    return Payload(buffer.getbuffer(), n)


class Loader:
    """Loads one run's batches for one source, remembering whether the fast path still applies."""

    def __init__(self, direct: bool = True) -> None:
        self.direct = direct

    def load(self, conn: psycopg.Connection, payload: Payload) -> None:
        """Write PAYLOAD into observations in the caller's transaction."""
        if not payload.rows:
            return
        conn.execute("SET LOCAL timezone = 'UTC'")
        if self.direct:
            try:
                with conn.transaction():  # a savepoint
                    self._copy(conn, "observations", payload)
                return
            except psycopg.errors.UniqueViolation:
                self.direct = False
        self._merge(conn, payload)

    @staticmethod
    def _copy(conn: psycopg.Connection, table: str, payload: Payload) -> None:
        statement = sql.SQL("COPY {} (source, id, timestamp, value, metadata, job_id) FROM STDIN (FORMAT csv)")
        with conn.cursor().copy(statement.format(sql.Identifier(table))) as copy:
            copy.write(payload.data)

    def _merge(self, conn: psycopg.Connection, payload: Payload) -> None:
        conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS ingot_stage (source text, id text, timestamp timestamptz, "
            "value double precision, metadata jsonb, job_id text) ON COMMIT DELETE ROWS"
        )
        self._copy(conn, "ingot_stage", payload)
        conn.execute(
            "INSERT INTO observations AS o (source, id, timestamp, value, metadata, job_id) "
            "SELECT source, id, timestamp, value, metadata, job_id FROM ingot_stage "
            "ON CONFLICT (source, id) DO UPDATE SET timestamp = EXCLUDED.timestamp, value = EXCLUDED.value, "
            "metadata = EXCLUDED.metadata, job_id = EXCLUDED.job_id, ingested_at = now() "
            "WHERE (o.timestamp, o.value, o.metadata) IS DISTINCT FROM "
            "(EXCLUDED.timestamp, EXCLUDED.value, EXCLUDED.metadata)"
        )


def merge_observations(conn: psycopg.Connection, source: str, job_id: str, batch: ValidBatch) -> None:
    """Upsert BATCH through the merge path (no fast path): for callers with a single batch."""
    Loader(direct=False).load(conn, prepare(source, job_id, batch))


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
