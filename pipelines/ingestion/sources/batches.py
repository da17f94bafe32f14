"""What connectors produce: raw batches with line numbers and rejects, and where each one ends."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa


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


def _cell_text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return json.dumps(value)


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
    for index, kind in enumerate(table.schema.types):
        if pa.types.is_nested(kind):
            texts = [_cell_text(v) for v in table.column(index).to_pylist()]
            table = table.set_column(index, table.column_names[index], pa.array(texts, pa.string()))
    return table


def _text_table(records: list[dict]) -> pa.Table:
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record))
    return pa.table({name: pa.array([_cell_text(r.get(name)) for r in records], pa.string()) for name in names})
