"""What connectors produce: raw batches with line numbers and rejects, and where each one ends."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

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


def _json_text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return json.dumps(value)


def records_table(records: list[dict]) -> pa.Table:
    """Records (dicts) as a table of text columns; validation gives them their declared types."""
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record))
    return pa.table({name: pa.array([_json_text(r.get(name)) for r in records], pa.string()) for name in names})
