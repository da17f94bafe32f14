"""Loading the `curves` dataset: the same payloads and paths as observations (binary COPY, straight in
while the keys are new, staged and merged once one repeats, unchanged rows left alone), into one
table keyed on (curve_key, asof_date, contract_month). Each batch also brings `curve_index` up to
date in its own transaction, so the latest as-of date of a curve is known the moment it commits.
"""

from __future__ import annotations

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from pgpq import ArrowToPostgresBinaryEncoder
from pgpq import schema as pg_types
from pgpq.encoders import StringEncoderBuilder
from psycopg import sql

from pipelines.ingestion.datasets import CURVES
from pipelines.ingestion.load import Payload, copy_payload, deduplicated, metadata_json
from pipelines.ingestion.validate import ValidBatch, as_text

_ARROW = {"string": pa.string(), "float": pa.float64(), "date": pa.date32(), "month": pa.date32()}
_COLUMNS = pa.schema([(f.name, _ARROW[f.kind]) for f in CURVES.fields]
                     + [("metadata", pa.string()), ("source", pa.string()), ("job_id", pa.string())])
_ENCODERS = {
    column.name: StringEncoderBuilder.new_with_output(column, pg_types.Jsonb())
    if column.name == "metadata" else ArrowToPostgresBinaryEncoder.infer_encoder(column)
    for column in _COLUMNS
}
_KEY = sql.SQL(", ").join(map(sql.Identifier, CURVES.key))
_VALUES = [f.name for f in CURVES.fields if f.name not in CURVES.key] + ["metadata"]
_DIMENSIONS = ("asset_class", "iso", "location", "currency", "unit")


def _typed(array: pa.Array, kind: str) -> pa.Array:
    target = _ARROW[kind]
    if target == pa.string():  # an empty cell is no value (a gas hub has no ISO)
        text = as_text(array)
        return pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
    return array if array.type == target else array.cast(target)


def prepare(source: str, job_id: str, batch: ValidBatch) -> Payload:
    ids, fields, metadata = deduplicated(batch)
    n = len(ids)
    arrays = {f.name: _typed(fields[f.name], f.kind) if f.name in fields else pa.nulls(n, _ARROW[f.kind])
              for f in CURVES.fields}
    arrays.update(metadata=metadata_json(metadata, n), source=pa.repeat(pa.scalar(source), n),
                  job_id=pa.repeat(pa.scalar(job_id), n))
    rows = pa.RecordBatch.from_arrays([arrays[name] for name in _COLUMNS.names], schema=_COLUMNS)
    encoder = ArrowToPostgresBinaryEncoder.new_with_encoders(_COLUMNS, _ENCODERS)
    summary = _summary(rows) if n else []
    return Payload((encoder.write_header(), encoder.write_batch(rows), encoder.finish()), n,
                   tuple(_COLUMNS.names), summary)


def _summary(rows: pa.RecordBatch) -> list[tuple]:
    """One row per curve in the batch: its dimensions and the as-of dates it brought."""
    table = pa.Table.from_batches([rows]).select(["curve_key", "asof_date", *_DIMENSIONS])
    grouped = table.group_by("curve_key", use_threads=False).aggregate(
        [("asof_date", "min"), ("asof_date", "max"), *((d, "last") for d in _DIMENSIONS)])
    columns = ["curve_key", "asof_date_min", "asof_date_max", *(f"{d}_last" for d in _DIMENSIONS)]
    return list(zip(*(grouped.column(c).to_pylist() for c in columns), strict=True))


class CurveLoader:
    """Loads one run's curve batches (see the module's docstring)."""

    table = sql.Identifier("curves")
    unchanged_rows = 0  # curves are compared by the merge itself, row by row

    def __init__(self, source: str, job_id: str) -> None:
        self.source = source
        self.job_id = job_id
        self.direct = True

    def prepare(self, batch: ValidBatch) -> Payload:
        return prepare(self.source, self.job_id, batch)

    def load(self, conn: psycopg.Connection, payload: Payload) -> None:
        """Write PAYLOAD and its curves' index rows in the caller's transaction."""
        if not payload.rows:
            return
        if self.direct:
            try:
                with conn.transaction():  # a savepoint
                    copy_payload(conn, self.table, payload)
            except psycopg.errors.UniqueViolation:
                self.direct = False
        if not self.direct:
            self._merge(conn, payload)
        _index(conn, payload.summary)

    def finish(self) -> None:
        pass

    def _merge(self, conn: psycopg.Connection, payload: Payload) -> None:
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS ingot_stage_curves (LIKE curves INCLUDING DEFAULTS) "
                     "ON COMMIT DELETE ROWS")
        copy_payload(conn, sql.Identifier("ingot_stage_curves"), payload)
        names = sql.SQL(", ").join(map(sql.Identifier, payload.columns))
        values = [sql.Identifier(v) for v in _VALUES]
        conn.execute(sql.SQL(
            "INSERT INTO curves AS c ({names}) SELECT {names} FROM ingot_stage_curves ON CONFLICT ({key}) "
            "DO UPDATE SET {sets}, source = EXCLUDED.source, job_id = EXCLUDED.job_id, ingested_at = now() "
            "WHERE ({old}) IS DISTINCT FROM ({new})"
        ).format(
            names=names, key=_KEY,
            sets=sql.SQL(", ").join(sql.SQL("{v} = EXCLUDED.{v}").format(v=v) for v in values),
            old=sql.SQL(", ").join(sql.SQL("c.{}").format(v) for v in values),
            new=sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(v) for v in values),
        ))


def _index(conn: psycopg.Connection, summary: list[tuple]) -> None:
    if not summary:
        return
    with conn.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO curve_index AS i (curve_key, first_asof, last_asof, asset_class, iso, location, currency, "
            "unit) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (curve_key) DO UPDATE SET "
            "first_asof = LEAST(i.first_asof, EXCLUDED.first_asof), "
            "last_asof = GREATEST(i.last_asof, EXCLUDED.last_asof), "
            "asset_class = COALESCE(EXCLUDED.asset_class, i.asset_class), iso = COALESCE(EXCLUDED.iso, i.iso), "
            "location = COALESCE(EXCLUDED.location, i.location), "
            "currency = COALESCE(EXCLUDED.currency, i.currency), unit = COALESCE(EXCLUDED.unit, i.unit)",
            summary)

