"""Loading: a validated batch becomes one binary COPY payload, written into its source's partition.

A source's first load goes into a new table with no index, indexed and attached at the end (see
`pipelines.ingestion.partitions`). After that, while a run's batches bring only new keys, each batch is COPYed
straight into the partition under a savepoint: the primary key guards it, and the first conflict
rolls the savepoint back and sends that batch, and the rest of the run, down the merge path: COPY
into a staging table, then `INSERT ... ON CONFLICT DO UPDATE`, skipping rows whose values did not
change, so re-ingesting the same input rewrites nothing. Duplicate keys within a batch are removed
first (the last line wins).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from pgpq import ArrowToPostgresBinaryEncoder
from pgpq import schema as pg_types
from pgpq.encoders import StringEncoderBuilder
from psycopg import sql

from pipelines.core.db import driver, get_engine
from pipelines.ingestion import partitions
from pipelines.ingestion.validate import ValidBatch, as_text

log = logging.getLogger(__name__)

_CONTROL = "[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f]"
_NEEDS_ESCAPE = '["\\\\\\n\\r\\t]'


def _json_string(text: pa.Array) -> pa.Array:
    if pc.any(pc.match_substring_regex(text, _CONTROL)).as_py():
        return pa.array([None if v is None else json.dumps(v) for v in text.to_pylist()], pa.string())
    if pc.any(pc.match_substring_regex(text, _NEEDS_ESCAPE)).as_py():
        for old, new in (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t")):
            text = pc.replace_substring(text, old, new)
    return pc.binary_join_element_wise(pa.scalar('"'), text, pa.scalar('"'), "")


def _json_text(array: pa.Array) -> pa.Array:
    kind = array.type
    if pa.types.is_boolean(kind) or pa.types.is_integer(kind):
        return array.cast(pa.string())
    if pa.types.is_floating(kind):
        finite = pc.is_finite(array)
        return pc.if_else(finite, array.cast(pa.string()), _json_string(array.cast(pa.string())))
    return _json_string(as_text(array))


def _json_values(array: pa.Array) -> pa.Array:
    """Each value of ARRAY as JSON text (null as `null`).

    Most metadata has few distinct values (units, regions, flags): those are encoded once each."""
    if pa.types.is_dictionary(array.type):
        encoded = array
    elif len(array) >= 1024 and not pa.types.is_floating(array.type):
        encoded = pc.dictionary_encode(array)
    else:
        encoded = None
    if encoded is not None and len(encoded.dictionary) * 8 <= len(array):
        text = _json_text(encoded.dictionary).take(encoded.indices)
    else:
        text = _json_text(array)
    return pc.fill_null(text, "null")


def metadata_json(columns: dict[str, pa.Array], n: int) -> pa.Array:
    """One JSON object per row from the metadata columns, built column-wise in Arrow."""
    if not columns:
        return pa.repeat(pa.scalar("{}"), n)
    pieces: list[pa.Array] = []
    for name, array in columns.items():
        pieces += [pa.scalar(("," if pieces else "{") + json.dumps(name) + ":"), _json_values(array)]
    return pc.binary_join_element_wise(*pieces, pa.scalar("}"), "")


def _last_per_key(ids: pa.Array) -> np.ndarray | None:
    """Row indices that keep the last occurrence of each id, or None if ids are already unique."""
    if pc.count_distinct(ids).as_py() == len(ids):
        return None
    positions = pa.table({"id": ids, "i": pa.array(np.arange(len(ids)))})
    keep = positions.group_by("id").aggregate([("i", "max")]).column("i_max").to_numpy()
    return np.sort(keep)


# The wire layout of every payload: PostgreSQL's binary COPY format, encoded from Arrow by pgpq.
_COLUMNS = pa.schema([
    ("source", pa.string()),
    ("id", pa.string()),
    ("timestamp", pa.timestamp("us", "UTC")),
    ("value", pa.float64()),
    ("metadata", pa.string()),
    ("job_id", pa.string()),
])
_ENCODERS = {
    column.name: StringEncoderBuilder.new_with_output(column, pg_types.Jsonb())
    if column.name == "metadata" else ArrowToPostgresBinaryEncoder.infer_encoder(column)
    for column in _COLUMNS
}
# A first load's table supplies source and job_id itself (see `partitions.begin_bulk`).
_BULK_COLUMNS = pa.schema([_COLUMNS.field(name) for name in ("id", "timestamp", "value", "metadata")])


@dataclass
class Payload:
    """A batch as one binary COPY stream (header, rows, trailer) of COLUMNS."""

    parts: tuple[bytes, bytes, bytes]
    rows: int
    columns: tuple[str, ...]
    summary: list[tuple] = field(default_factory=list)  # what else the batch updates (curves: their index)


def _microseconds(timestamp: pa.Array) -> pa.Array:
    """PostgreSQL keeps microseconds: finer times are rounded to the nearest one."""
    if timestamp.type.unit == "ns":
        timestamp = pc.round_temporal(timestamp, unit="microsecond")
    return timestamp.cast(_COLUMNS.field("timestamp").type)


def deduplicated(batch: ValidBatch) -> tuple[pa.Array, dict[str, pa.Array], dict[str, pa.Array]]:
    """BATCH's ids, fields and metadata with one row per key: the last line wins."""
    ids, fields, metadata = batch.ids, batch.fields, batch.metadata
    keep = _last_per_key(ids) if batch.num_rows else None
    if keep is not None:
        ids = ids.take(keep)
        fields = {k: v.take(keep) for k, v in fields.items()}
        metadata = {k: v.take(keep) for k, v in metadata.items()}
    return ids, fields, metadata


def copy_payload(conn: psycopg.Connection, table: sql.Identifier, payload: Payload) -> None:
    """COPY PAYLOAD into TABLE, in the caller's transaction."""
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(
        table, sql.SQL(", ").join(map(sql.Identifier, payload.columns)))
    with conn.cursor().copy(statement) as copy:
        for part in payload.parts:
            copy.write(part)


def prepare(source: str, job_id: str, batch: ValidBatch, bulk: bool = False) -> Payload:
    """BATCH as a COPY payload; BULK leaves out the columns a first load's table supplies."""
    ids, fields, metadata = deduplicated(batch)
    n = len(ids)
    timestamp = fields.get("timestamp")
    arrays = {
        "id": ids.cast(pa.string()),
        "timestamp": pa.nulls(n, _COLUMNS.field("timestamp").type) if timestamp is None else _microseconds(timestamp),
        "value": fields.get("value", pa.nulls(n, pa.float64())).cast(pa.float64()),
        "metadata": metadata_json(metadata, n),
    }
    if not bulk:
        arrays.update(source=pa.repeat(pa.scalar(source), n), job_id=pa.repeat(pa.scalar(job_id), n))
    schema = _BULK_COLUMNS if bulk else _COLUMNS
    rows = pa.RecordBatch.from_arrays([arrays[name] for name in schema.names], schema=schema)
    encoder = ArrowToPostgresBinaryEncoder.new_with_encoders(schema, {name: _ENCODERS[name] for name in schema.names})
    return Payload((encoder.write_header(), encoder.write_batch(rows), encoder.finish()), n, tuple(schema.names))


class Loader:
    """Loads one run's batches for one source into its partition (see `pipelines.ingestion.partitions`).

    Bulk: a first load, COPYed into the source's new unindexed table, indexed and attached by
    `finish`. Direct: COPY under a savepoint while the keys are new. Merge: staging and upsert.
    """

    def __init__(self, source: str, job_id: str, *, bulk: bool = False, direct: bool = True) -> None:
        self.source = source
        self.job_id = job_id
        self.table = sql.Identifier(partitions.partition_name(source))
        self.bulk = bulk
        self.direct = direct

    @classmethod
    def open(cls, conn: psycopg.Connection, source: str, job_id: str, resuming: bool) -> Loader:
        """Settle SOURCE's partition and choose how JOB_ID's run loads it, in the caller's transaction.

        RESUMING: this attempt carries on a run that an earlier attempt of the same job began."""
        if resuming and partitions.state(conn, source) is partitions.State.DETACHED:
            return cls(source, job_id, bulk=True)
        if partitions.begin_bulk(conn, source, job_id):
            return cls(source, job_id, bulk=True)
        partitions.ensure(conn, source)
        return cls(source, job_id)

    def prepare(self, batch: ValidBatch) -> Payload:
        return prepare(self.source, self.job_id, batch, bulk=self.bulk)

    def load(self, conn: psycopg.Connection, payload: Payload) -> None:
        """Write PAYLOAD into observations in the caller's transaction."""
        if not payload.rows:
            return
        if self.bulk:
            copy_payload(conn, self.table, payload)
            return
        if self.direct:
            try:
                with conn.transaction():  # a savepoint
                    copy_payload(conn, self.table, payload)
                return
            except psycopg.errors.UniqueViolation:
                self.direct = False
        self._merge(conn, payload)

    def finish(self) -> None:
        """After the run's last batch: a bulk load's table gets its indexes and becomes visible."""
        if self.bulk:
            partitions.finish_bulk(self.source)

    def _merge(self, conn: psycopg.Connection, payload: Payload) -> None:
        conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS ingot_stage (source text, id text, timestamp timestamptz, "
            "value double precision, metadata jsonb, job_id text) ON COMMIT DELETE ROWS"
        )
        copy_payload(conn, sql.Identifier("ingot_stage"), payload)
        conn.execute(sql.SQL(
            "INSERT INTO {} AS o (source, id, timestamp, value, metadata, job_id) "
            "SELECT source, id, timestamp, value, metadata, job_id FROM ingot_stage "
            "ON CONFLICT (source, id) DO UPDATE SET timestamp = EXCLUDED.timestamp, value = EXCLUDED.value, "
            "metadata = EXCLUDED.metadata, job_id = EXCLUDED.job_id, ingested_at = now() "
            "WHERE (o.timestamp, o.value, o.metadata) IS DISTINCT FROM "
            "(EXCLUDED.timestamp, EXCLUDED.value, EXCLUDED.metadata)"
        ).format(self.table))


@contextmanager
def loading(source: str, job_id: str, resuming: bool) -> Iterator[Loader]:
    """A Loader for one source's run. However the block ends, short of the process dying, a first
    load is then indexed and attached: what the run committed stays, and becomes visible."""
    with get_engine().begin() as connection:
        loader = Loader.open(driver(connection), source, job_id, resuming)
    try:
        yield loader
    except BaseException:
        try:
            loader.finish()
        except Exception:  # the error that ended the run matters more; the source's next run attaches
            log.warning("could not attach the first load of %s", source, exc_info=True)
        raise
    loader.finish()
