"""What connectors produce: raw batches with line numbers and rejects, and where each one ends."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.ingestion.sources.registry import SourceContentError


@dataclass
class Reject:
    line: int
    reason: str
    raw: dict


@dataclass
class RawBatch:
    table: pa.Table
    lines: np.ndarray
    rejects: list[Reject] = field(default_factory=list)
    fraction: float = 1.0  # how far through the file this batch ends, for progress
    notes: list[str] = field(default_factory=list)  # what a person should know, e.g. "the file is empty"

    @property
    def rows_seen(self) -> int:
        return self.table.num_rows + len(self.rejects)


@dataclass
class Piece:
    """One batch of a source, with the label its quarantined rows carry (a file, a URL), the position
    to resume after it once committed, and how far through the source it ends (0..1, or None)."""

    raw: RawBatch
    label: str
    position: dict
    progress: float | None
    # On a file's last batch: the fingerprint the file had when its reading began, to record with it.
    file_done: Any = None


def _plain(value) -> str:
    """What JSON has no word for: bytes as their UTF-8 text (PostgreSQL's `\\x` hex when they are not
    UTF-8), dates and times in ISO 8601, anything else (decimals, durations) as its text."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return "\\x" + value.hex()
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    return str(value)


def cell_text(value) -> str | None:
    """A value as text: strings as they are, bytes and times as `_plain` says, anything else (numbers,
    lists, records, maps) as JSON."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes | dt.date | dt.time):
        return _plain(value)
    return json.dumps(value, default=_plain, separators=(",", ":"))  # compact, as JSON Lines keeps them


def nested_as_text(table: pa.Table) -> pa.Table:
    """TABLE with each nested column (lists, records, maps) as JSON text: the same whatever the format."""
    for index, kind in enumerate(table.schema.types):
        if pa.types.is_nested(kind):
            texts = [cell_text(v) for v in table.column(index).to_pylist()]
            table = table.set_column(index, table.column_names[index], pa.array(texts, pa.string()))
    return table


def records_table(records: list[dict]) -> pa.Table:
    """Records (dicts) as a table, every key of every record a column (none dropped).

    Arrow infers the column types in one pass (fast); nested values become JSON text. A column whose
    values disagree in type (a number here, a string there) sends the batch down the slow path, where
    every value is text and validation gives it the declared type.
    """
    if not records:
        return pa.table({})
    try:
        table = pa.Table.from_struct_array(pa.array(records))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
        return _text_table(records)
    return nested_as_text(table)


def _text_table(records: list[dict]) -> pa.Table:
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record))
    return pa.table({name: pa.array([cell_text(r.get(name)) for r in records], pa.string()) for name in names})


def dig(document: Any, path: str | None) -> Any:
    """What DOCUMENT holds at the dotted PATH (keys, and list indexes by number), or None."""
    for part in (path or "").split("."):
        if not part:
            continue
        if isinstance(document, dict):
            document = document.get(part)
        elif isinstance(document, list) and part.isdigit() and int(part) < len(document):
            document = document[int(part)]
        else:
            return None
    return document


def document_text(source, body: bytes, where: str, encoding: str | None = None) -> str:
    """BODY, one JSON document named WHERE, as text: decoded from ENCODING (the source's, unless its bytes
    were recoded on the way), a byte order mark dropped."""
    try:
        return body.decode(encoding or source.encoding).removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise SourceContentError(f"source '{source.id}': {where} is not valid JSON: {exc}") from None


def json_records(source, body: bytes, first_record: int, where: str, encoding: str | None = None) -> RawBatch:
    """The records of one JSON document (an HTTP page, a `.json` file) in ENCODING (`document_text`): the
    list at the source's `records_path`, or the document itself. Records are numbered on from
    FIRST_RECORD; one that is not an object is set aside. WHERE names the document in errors."""
    text = document_text(source, body, where, encoding)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceContentError(f"source '{source.id}': {where} is not valid JSON: {exc}") from None
    del text
    records = dig(document, source.records_path)
    if records is None:
        records = []
    if not isinstance(records, list):
        at = f"at '{source.records_path}'" if source.records_path else "at the top level"
        raise SourceContentError(f"source '{source.id}': {where} has no list of records {at}"
                                 + ("" if source.records_path else " (name where it is with records_path)"))
    return records_batch(enumerate(records, start=first_record))


def records_batch(numbered: Iterable[tuple[int, Any]], fraction: float = 1.0) -> RawBatch:
    """Decoded JSON values with their record numbers as a raw batch: the objects as rows, anything else
    set aside as not a record."""
    good, lines, rejects = [], [], []
    for number, record in numbered:
        if isinstance(record, dict):
            good.append(record)
            lines.append(number)
        else:
            rejects.append(Reject(number, "record is not a JSON object", {"record": json.dumps(record)[:1000]}))
    return RawBatch(records_table(good), np.array(lines, dtype=np.int64), rejects, fraction)

