"""NumPy and Arrow arrays as PostgreSQL array parameters, in PostgreSQL's binary form, built by whole-array
copies rather than value by value: psycopg dumps a list in Python, about 1.5 µs a value, which made a
scenario run's 12,000 output points cost 90 ms to send. Each kind is a `bytes` subclass psycopg sends
as it is, with the array's type, so a statement takes it without a cast.

The form (PostgreSQL's `array_send`): the number of dimensions (1), whether any element is NULL, the
element type, the length and the lower bound (1); then each element as its byte length and its bytes
(a length of -1 for NULL). Every integer is big-endian."""

from __future__ import annotations

import struct
from typing import ClassVar

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from psycopg.adapt import Dumper
from psycopg.pq import Format

_HEADER = struct.Struct(">iiIii")
_POSTGRES_EPOCH_DAYS = 10_957  # 2000-01-01, where PostgreSQL counts dates from, in days since 1970-01-01


class BinaryArray(bytes):
    """An array parameter in binary form: its type's `oid` says which."""

    oid: ClassVar[int]
    element: ClassVar[int]


class Float8Array(BinaryArray):
    oid, element = 1022, 701


class DateArray(BinaryArray):
    oid, element = 1182, 1082


class TextArray(BinaryArray):
    oid, element = 1009, 25


def _fixed(kind: type[BinaryArray], values: np.ndarray, dtype: str) -> BinaryArray:
    """VALUES (no NULLs) as KIND: each element its 4-byte length, then its big-endian value."""
    size = np.dtype(dtype).itemsize
    out = np.empty(len(values), dtype=[("length", ">i4"), ("value", dtype)])
    out["length"] = size
    out["value"] = values
    return kind(_HEADER.pack(1, 0, kind.element, len(values), 1) + out.tobytes())


def float8(values: np.ndarray) -> Float8Array:
    """Float64 VALUES (NaN stays NaN, as float8 holds it)."""
    return _fixed(Float8Array, np.asarray(values, dtype="float64"), ">f8")  # type: ignore[return-value]


def dates(values: pa.Array | pa.ChunkedArray) -> DateArray:
    """Arrow date32 VALUES, none NULL."""
    days = _combined(values).cast(pa.int32())
    if days.null_count:
        raise ValueError("a date array parameter cannot hold NULL")
    return _fixed(DateArray, days.to_numpy() - _POSTGRES_EPOCH_DAYS, ">i4")  # type: ignore[return-value]


def texts(values: pa.Array | pa.ChunkedArray) -> TextArray:
    """Arrow string VALUES, NULLs kept: each element's UTF-8 bytes moved into place in one scatter."""
    array = _combined(values).cast(pa.large_string())
    n = len(array)
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64)[array.offset:array.offset + n + 1]
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8) if array.buffers()[2] is not None \
        else np.empty(0, dtype=np.uint8)
    lengths = np.diff(offsets)
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    before = offsets[:-1] - offsets[0]  # each element's data bytes before it
    # Where each element's length goes: after the header, the elements before it and their lengths.
    starts = _HEADER.size + 4 * np.arange(n) + before
    out = np.empty(_HEADER.size + 4 * n + int(offsets[-1] - offsets[0]), dtype=np.uint8)
    out[:_HEADER.size] = np.frombuffer(_HEADER.pack(1, int(not valid.all()), TextArray.element, n, 1), np.uint8)
    length_bytes = np.where(valid, lengths, -1).astype(">i4").view(np.uint8).reshape(n, 4)
    out[starts[:, None] + np.arange(4)] = length_bytes
    owner = np.repeat(np.arange(n), lengths)  # each data byte's element
    out[starts[owner] + 4 + (np.arange(len(owner)) - before[owner])] = \
        data[offsets[0]:offsets[-1]]
    return TextArray(out.tobytes())


def text_groups(values: pa.Array | pa.ChunkedArray, offsets: np.ndarray) -> TextArray:
    """Each run of string VALUES between consecutive OFFSETS as one element, a PostgreSQL array literal
    (`{"a",NULL,"b \\"c\\""}`, for `::text[]`), built by Arrow's string kernels. A statement takes a
    group's labels as `(groups)[i]::text[]`: slicing one long `text[]` instead walks it from its start
    for every slice (10 ms for 200 slices of 12,000 labels), as its elements differ in length."""
    escaped = pc.replace_substring(pc.replace_substring(_combined(values).cast(pa.string()), "\\", "\\\\"),
                                   '"', '\\"')
    quoted = pc.fill_null(pc.binary_join_element_wise('"', escaped, '"', ""), "NULL")
    joined = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), quoted), ",")
    return texts(pc.binary_join_element_wise("{", joined, "}", ""))


def _combined(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


class _AsItIs(Dumper):
    format = Format.BINARY

    def dump(self, obj: bytes) -> bytes:
        return obj


def register(adapters: psycopg.adapt.AdaptersMap) -> None:
    """Let connections made with ADAPTERS (psycopg's global map, before any connection) send these."""
    for kind in (Float8Array, DateArray, TextArray):
        adapters.register_dumper(kind, type(f"{kind.__name__}Dumper", (_AsItIs,), {"oid": kind.oid}))
