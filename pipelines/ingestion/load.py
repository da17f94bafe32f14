"""Loading: a validated batch becomes one binary COPY payload, written into its source's partition.

A source's first load goes into a new table with no index, indexed and attached at the end (see
`pipelines.ingestion.partitions`). After that, while a run's batches bring only new keys, each batch is COPYed
straight into the partition under a savepoint: the primary key guards it, and the first conflict
rolls the savepoint back and sends that batch, and the rest of the run, down the merge path: COPY
into a staging table, then `INSERT ... ON CONFLICT DO UPDATE`, skipping rows whose values did not
change, so re-ingesting the same input rewrites nothing. Duplicate keys within a batch are removed
first (the last line wins).

Every row carries a hash of its key and content (`row_hash`). When a run first meets a key the
partition has, it reads the partition's stored hashes once (8 bytes a row, in page-range slices); from
then on a row whose hash is stored, and whose key this run has not written, is the row already there
and is left out before the merge: a file with 1% of its rows changed merges 1% of them. A forced run
compares nothing (`force`: the merge itself decides, row by row, on the values).
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
from pandas.util import hash_array
from pgpq import ArrowToPostgresBinaryEncoder
from pgpq import schema as pg_types
from pgpq.encoders import StringEncoderBuilder
from psycopg import sql

from pipelines.core.db import driver, get_engine
from pipelines.ingestion import partitions
from pipelines.ingestion.sources.batches import cell_text
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
    if pa.types.is_dictionary(kind):
        return _json_text(array.dictionary_decode())
    if pa.types.is_boolean(kind) or pa.types.is_integer(kind):
        return array.cast(pa.string())
    if pa.types.is_floating(kind):
        finite = pc.is_finite(array)
        return pc.if_else(finite, array.cast(pa.string()), _json_string(array.cast(pa.string())))
    try:
        text = as_text(array)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # no cast to text (intervals, bytes not UTF-8)
        text = pa.array([cell_text(v) for v in array.to_pylist()], pa.string())
    return _json_string(text)


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


def _last_per_key(ids: pa.Array, hashes: np.ndarray | None = None) -> np.ndarray | None:
    """Row indices that keep the last occurrence of each id, or None if ids are already unique.
    HASHES, the ids' 64-bit hashes if known, tell faster: ids whose hashes all differ differ."""
    if hashes is not None:
        ordered = np.sort(hashes)
        if not (ordered[1:] == ordered[:-1]).any():
            return None
    elif pc.count_distinct(ids).as_py() == len(ids):
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
    ("row_hash", pa.int64()),
])
_ENCODERS = {
    column.name: StringEncoderBuilder.new_with_output(column, pg_types.Jsonb())
    if column.name == "metadata" else ArrowToPostgresBinaryEncoder.infer_encoder(column)
    for column in _COLUMNS
}
# A first load's table supplies source and job_id itself (see `partitions.begin_bulk`).
_BULK_COLUMNS = pa.schema([_COLUMNS.field(name) for name in ("id", "timestamp", "value", "metadata", "row_hash")])


@dataclass
class Payload:
    """A batch as one binary COPY stream (header, rows, trailer) of COLUMNS."""

    parts: tuple[bytes, bytes, bytes] | None  # None: encoded from ROWS_BATCH when first needed
    rows: int
    columns: tuple[str, ...]
    summary: list[tuple] = field(default_factory=list)  # what else the batch updates (curves: their index)
    # Observations outside a first load: the rows themselves, their key hashes and row hashes (uint64).
    rows_batch: pa.RecordBatch | None = None
    keys: np.ndarray | None = None
    hashes: np.ndarray | None = None
    stored: np.ndarray | None = None  # which rows' hashes were stored, when known as the batch was prepared

    def encoded(self) -> tuple[bytes, bytes, bytes]:
        if self.parts is None:
            assert self.rows_batch is not None
            self.parts = _encode(self.rows_batch)
        return self.parts

    def only(self, keep: np.ndarray) -> Payload:
        """The rows of KEEP (a mask)."""
        assert self.rows_batch is not None and self.keys is not None and self.hashes is not None
        return Payload(None, int(keep.sum()), self.columns, rows_batch=self.rows_batch.filter(pa.array(keep)),
                       keys=self.keys[keep], hashes=self.hashes[keep],
                       stored=None if self.stored is None else self.stored[keep])


def _microseconds(timestamp: pa.Array) -> pa.Array:
    """PostgreSQL keeps microseconds: finer times are rounded to the nearest one."""
    if timestamp.type.unit == "ns":
        timestamp = pc.round_temporal(timestamp, unit="microsecond")
    return timestamp.cast(_COLUMNS.field("timestamp").type)


def deduplicated(batch: ValidBatch) -> tuple[pa.Array, dict[str, pa.Array], dict[str, pa.Array]]:
    """BATCH's ids, fields and metadata with one row per key: the last line wins."""
    ids, fields, metadata, _keys = _one_row_a_key(batch, batch.ids)
    return ids, fields, metadata


def _one_row_a_key(batch: ValidBatch, ids: pa.Array, keys: np.ndarray | None = None
                   ) -> tuple[pa.Array, dict[str, pa.Array], dict[str, pa.Array], np.ndarray | None]:
    """`deduplicated`, with the batch's IDS as given, and KEYS (their hashes, if known) kept alike."""
    fields, metadata = batch.fields, batch.metadata
    keep = _last_per_key(ids, keys) if batch.num_rows else None
    if keep is not None:
        ids = ids.take(keep)
        fields = {k: v.take(keep) for k, v in fields.items()}
        metadata = {k: v.take(keep) for k, v in metadata.items()}
        keys = None if keys is None else keys[keep]
    return ids, fields, metadata, keys


_MIX = np.uint64(0x100000001B3)
_NULL = np.uint64(0x9E3779B97F4A7C15)


def _column_hash(array: pa.Array) -> np.ndarray:
    """A 64-bit hash of each value of a column (nulls apart from every value)."""
    if pa.types.is_string(array.type):  # few distinct values (metadata): each hashed once
        encoded = pc.dictionary_encode(array)
        each = hash_array(encoded.dictionary.to_numpy(zero_copy_only=False), categorize=False)
        return each[pc.fill_null(encoded.indices, 0).to_numpy()] ^ (_nulls(encoded.indices) * _NULL)
    if pa.types.is_timestamp(array.type):
        array = array.cast(pa.int64())
    return hash_array(pc.fill_null(array, 0).to_numpy(zero_copy_only=False)) ^ (_nulls(array) * _NULL)


def _nulls(array: pa.Array) -> np.ndarray:
    return pc.is_null(array).to_numpy(zero_copy_only=False).astype(np.uint64)


def key_hashes(ids: pa.Array) -> np.ndarray:
    """A 64-bit hash (uint64) of each id (text)."""
    return hash_array(ids.to_numpy(zero_copy_only=False), categorize=False)


def row_hashes(arrays: dict[str, pa.Array], keys: np.ndarray) -> np.ndarray:
    """Per row, a hash (uint64) of its key (KEYS: `key_hashes` of its id) and content (timestamp, value,
    metadata as written)."""
    rows = keys.copy()
    for name in ("timestamp", "value", "metadata"):
        rows ^= _column_hash(arrays[name])
        rows *= _MIX
    return rows


def copy_payload(conn: psycopg.Connection, table: sql.Identifier, payload: Payload) -> None:
    """COPY PAYLOAD into TABLE, in the caller's transaction."""
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(
        table, sql.SQL(", ").join(map(sql.Identifier, payload.columns)))
    with conn.cursor().copy(statement) as copy:
        for part in payload.encoded():
            copy.write(part)


def prepare(source: str, job_id: str, batch: ValidBatch, bulk: bool = False, encode: bool = True) -> Payload:
    """BATCH as a COPY payload; BULK leaves out the columns a first load's table supplies. Not ENCODE:
    the rows are encoded when a COPY needs them (a merge that leaves most of them out)."""
    ids = batch.ids.cast(pa.string())
    ids, fields, metadata, keys = _one_row_a_key(batch, ids, key_hashes(ids))
    assert keys is not None  # given, so kept
    n = len(ids)
    timestamp = fields.get("timestamp")
    arrays = {
        "id": ids,
        "timestamp": pa.nulls(n, _COLUMNS.field("timestamp").type) if timestamp is None else _microseconds(timestamp),
        "value": fields.get("value", pa.nulls(n, pa.float64())).cast(pa.float64()),
        "metadata": metadata_json(metadata, n),
    }
    hashes = row_hashes(arrays, keys)
    arrays["row_hash"] = pa.array(hashes.view(np.int64))
    if not bulk:
        arrays.update(source=pa.repeat(pa.scalar(source), n), job_id=pa.repeat(pa.scalar(job_id), n))
    schema = _BULK_COLUMNS if bulk else _COLUMNS
    rows = pa.RecordBatch.from_arrays([arrays[name] for name in schema.names], schema=schema)
    if bulk:
        return Payload(_encode(rows), n, tuple(schema.names))
    # A merge may leave some rows out: it needs them and their hashes.
    return Payload(_encode(rows) if encode else None, n, tuple(schema.names), rows_batch=rows, keys=keys,
                   hashes=hashes)


def _encode(rows: pa.RecordBatch) -> tuple[bytes, bytes, bytes]:
    schema = rows.schema
    encoder = ArrowToPostgresBinaryEncoder.new_with_encoders(schema, {name: _ENCODERS[name] for name in schema.names})
    return encoder.write_header(), encoder.write_batch(rows), encoder.finish()


# Above this many stored rows a run does not read their hashes (8 bytes each): it merges every row.
MOST_STORED_HASHES = 8_000_000
# Stored hashes are read in slices of about this many rows (by page ranges), each one bytea value.
_HASH_SLICE_ROWS = 1_000_000


def _member(stored: np.ndarray, needles: np.ndarray) -> np.ndarray:
    """Which NEEDLES are in the sorted array STORED (looked up in order: far fewer cache misses)."""
    found = np.zeros(len(needles), bool)
    if len(stored) and len(needles):
        order = np.argsort(needles)
        ordered = needles[order]
        at = np.searchsorted(stored, ordered).clip(max=len(stored) - 1)
        found[order] = stored[at] == ordered
    return found


class StoredRows:
    """The row hashes a partition held when a run first met one of its keys, and the keys the run has
    merged since: a row is unchanged if its hash is stored and its key was not merged by this run
    (a later line of the same key may bring back the stored content after an earlier one changed it)."""

    def __init__(self, hashes: np.ndarray) -> None:
        hashes.sort()
        self.hashes = hashes
        self.merged = np.empty(0, np.uint64)  # sorted
        self.unchanged_rows = 0

    @classmethod
    def read(cls, conn: psycopg.Connection, name: str) -> StoredRows | None:
        """Table NAME's stored hashes, or None when it holds more than MOST_STORED_HASHES rows.

        Each slice of pages comes as one `bytea` of 8 bytes a row (`int8send`), so neither side
        handles a row at a time."""
        pages, estimate = conn.execute("SELECT relpages, reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
                                       (name,)).fetchone() or (0, 0)
        if estimate > MOST_STORED_HASHES:
            return None
        step = max(1, pages * _HASH_SLICE_ROWS // estimate) if estimate > 0 else pages + 1
        starts = list(range(0, pages, step)) or [0]
        statement = sql.SQL("SELECT string_agg(int8send(row_hash), ''::bytea) FROM {} "
                            "WHERE ctid >= %s::tid AND (%s::tid IS NULL OR ctid < %s::tid) AND row_hash IS NOT NULL"
                            ).format(sql.Identifier(name))
        hashes = np.empty(max(estimate, 0) + 1024, np.int64)
        n = 0
        with conn.cursor(binary=True) as cursor:
            for i, start in enumerate(starts):
                # A slice is a range of pages (a TID range scan); the last is open: the table may have grown.
                end = f"({starts[i + 1]},0)" if i + 1 < len(starts) else None
                (data,) = cursor.execute(statement, (f"({start},0)", end, end)).fetchone() or (None,)
                if not data:
                    continue
                part = np.frombuffer(data, ">i8")
                if n + len(part) > MOST_STORED_HASHES:
                    return None
                if n + len(part) > len(hashes):
                    hashes = np.resize(hashes, max(2 * len(hashes), n + len(part)))
                hashes[n:n + len(part)] = part
                n += len(part)
                del data, part
        return cls(hashes[:n].copy() if n < len(hashes) // 2 else hashes[:n])

    def holds(self, hashes: np.ndarray) -> np.ndarray:
        """Which HASHES were stored (the snapshot never changes: any thread may ask)."""
        return _member(self.hashes, hashes.view(np.int64))

    def changed(self, payload: Payload) -> np.ndarray:
        """A mask of PAYLOAD's rows that are not in the table as they are, or whose key this run merged."""
        assert payload.keys is not None and payload.hashes is not None
        keys = payload.keys
        stored = payload.stored if payload.stored is not None else self.holds(payload.hashes)
        if len(self.merged):
            stored &= ~_member(self.merged, keys)
        self.unchanged_rows += int(stored.sum())
        return ~stored

    def merging(self, keys: np.ndarray) -> None:
        if len(keys):
            # Two sorted runs, which a stable sort (Timsort) merges in one pass, however many keys came before.
            self.merged = np.sort(np.concatenate([self.merged, np.sort(keys)]), kind="stable")


class Loader:
    """Loads one run's batches for one source into its partition (see `pipelines.ingestion.partitions`).

    Bulk: a first load, COPYed into the source's new unindexed table, indexed and attached by
    `finish`. Direct: COPY under a savepoint while the keys are new. Merge: staging and upsert.
    """

    def __init__(self, source: str, job_id: str, *, bulk: bool = False, direct: bool = True,
                 compare: bool = True) -> None:
        self.source = source
        self.job_id = job_id
        self.table = sql.Identifier(partitions.partition_name(source))
        self.bulk = bulk
        self.direct = direct
        self.compare = compare  # leave out rows whose hash is stored (see the module's docstring)
        self.stored: StoredRows | None = None

    @classmethod
    def open(cls, conn: psycopg.Connection, source: str, job_id: str, resuming: bool, force: bool = False) -> Loader:
        """Settle SOURCE's partition and choose how JOB_ID's run loads it, in the caller's transaction.

        RESUMING: this attempt carries on a run that an earlier attempt of the same job began. FORCE:
        every row goes through the merge, whatever its stored hash."""
        if resuming and partitions.state(conn, source) is partitions.State.DETACHED:
            return cls(source, job_id, bulk=True)
        if partitions.begin_bulk(conn, source, job_id):
            return cls(source, job_id, bulk=True)
        partitions.ensure(conn, source)
        return cls(source, job_id, compare=not force)

    @property
    def unchanged_rows(self) -> int:
        """Rows left out of the merge so far because the table holds them as they are."""
        return self.stored.unchanged_rows if self.stored is not None else 0

    def prepare(self, batch: ValidBatch) -> Payload:
        """BATCH as a payload. Once stored hashes are compared, most rows of a re-run are left out:
        they are looked up here, a batch ahead of the load, and only what is sent is encoded."""
        stored = self.stored
        payload = prepare(self.source, self.job_id, batch, bulk=self.bulk, encode=stored is None)
        if stored is not None and payload.hashes is not None:
            payload.stored = stored.holds(payload.hashes)
        return payload

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
        if self.compare and payload.keys is not None and payload.hashes is not None:
            if self.stored is None:
                self.stored = StoredRows.read(conn, partitions.partition_name(self.source))
                if self.stored is None:  # too many rows to hold their hashes: the merge decides
                    self.compare = False
            if self.stored is not None:
                changed = self.stored.changed(payload)
                self.stored.merging(payload.keys[changed])
                if not changed.any():
                    return
                if not changed.all():
                    payload = payload.only(changed)
        conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS ingot_stage (source text, id text, timestamp timestamptz, "
            "value double precision, metadata jsonb, job_id text, row_hash bigint) ON COMMIT DELETE ROWS"
        )
        copy_payload(conn, sql.Identifier("ingot_stage"), payload)
        # A row whose values are the same keeps its job and time; one only lacking its hash (written
        # before hashes were) gets it.
        conn.execute(sql.SQL(
            "INSERT INTO {} AS o (source, id, timestamp, value, metadata, job_id, row_hash) "
            "SELECT source, id, timestamp, value, metadata, job_id, row_hash FROM ingot_stage "
            "ON CONFLICT (source, id) DO UPDATE SET timestamp = EXCLUDED.timestamp, value = EXCLUDED.value, "
            "metadata = EXCLUDED.metadata, row_hash = EXCLUDED.row_hash, "
            "job_id = CASE WHEN {same} THEN o.job_id ELSE EXCLUDED.job_id END, "
            "ingested_at = CASE WHEN {same} THEN o.ingested_at ELSE now() END "
            "WHERE (o.timestamp, o.value, o.metadata, o.row_hash) IS DISTINCT FROM "
            "(EXCLUDED.timestamp, EXCLUDED.value, EXCLUDED.metadata, EXCLUDED.row_hash)"
        ).format(self.table, same=_SAME))


_SAME = sql.SQL("(o.timestamp, o.value, o.metadata) IS NOT DISTINCT FROM "
                "(EXCLUDED.timestamp, EXCLUDED.value, EXCLUDED.metadata)")


@contextmanager
def loading(source: str, job_id: str, resuming: bool, force: bool = False) -> Iterator[Loader]:
    """A Loader for one source's run. However the block ends, short of the process dying, a first
    load is then indexed and attached: what the run committed stays, and becomes visible."""
    with get_engine().begin() as connection:
        loader = Loader.open(driver(connection), source, job_id, resuming, force)
    try:
        yield loader
    except BaseException:
        try:
            loader.finish()
        except Exception:  # the error that ended the run matters more; the source's next run attaches
            log.warning("could not attach the first load of %s", source, exc_info=True)
        raise
    loader.finish()
