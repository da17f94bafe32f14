"""NumPy arrays and lists of strings as PostgreSQL array parameters, in PostgreSQL's binary form: numbers and dates
by whole-array copies, texts a value at a time in a few bytes operations. psycopg dumps a list in
Python, about 1.5 µs a value, which made a scenario run's 12,000 output points cost 90 ms to send.
Each kind is a `bytes` subclass psycopg sends as it is, with the array's type, so a statement takes it
without a cast.

The form (PostgreSQL's `array_send`): the number of dimensions (1), whether any element is NULL, the
element type, the length and the lower bound (1); then each element as its byte length and its bytes
(a length of -1 for NULL). Every integer is big-endian."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import numpy as np
import psycopg
from psycopg.adapt import Dumper
from psycopg.pq import Format

_HEADER = struct.Struct(">iiIii")
_LENGTH = struct.Struct(">i")
_NULL = _LENGTH.pack(-1)
_DOUBLE = struct.Struct(">d")
_POSTGRES_EPOCH_DAYS = 10_957  # 2000-01-01, where PostgreSQL counts dates from, in days since 1970-01-01


class BinaryArray(bytes):
    """An array parameter in binary form: its type's `oid` says which."""

    oid: ClassVar[int]
    element: ClassVar[int]


class Float8Array(BinaryArray):
    oid, element = 1022, 701


class Int4Array(BinaryArray):
    oid, element = 1007, 23


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


def floats(values: Iterable[float | None]) -> Float8Array:
    """Floats, None as NULL (NaN stays NaN): a value at a time, for short lists (a run's metrics)."""
    return _each(Float8Array, values, _DOUBLE.pack)  # type: ignore[return-value]


def int4(values: np.ndarray) -> Int4Array:
    """Integer VALUES, each within 32 bits (ValueError otherwise)."""
    wide = np.asarray(values, dtype=np.int64)
    if len(wide) and (wide.min() < -2**31 or wide.max() >= 2**31):
        raise ValueError("an int4 array parameter holds values within 32 bits")
    return _fixed(Int4Array, wide, ">i4")  # type: ignore[return-value]


def dates(values: np.ndarray) -> DateArray:
    """NumPy datetime64[D] VALUES, none NaT."""
    days = np.asarray(values, dtype="datetime64[D]")
    if np.isnat(days).any():
        raise ValueError("a date array parameter cannot hold NULL")
    return _fixed(DateArray, days.astype(np.int64) - _POSTGRES_EPOCH_DAYS, ">i4")  # type: ignore[return-value]


def texts(values: Iterable[str | None]) -> TextArray:
    """Strings (None: NULL), each its UTF-8 bytes after its length: about 0.25 µs a value in Python, a
    sixth of psycopg's dumping of a list; Arrow's kernels and a NumPy scatter cost 0.2 ms before the
    first value, more than a small scenario run's whole computation (measured)."""
    return _each(TextArray, values, str.encode)  # type: ignore[return-value]


def _each(kind: type[BinaryArray], values: Iterable[Any], encode: Callable[[Any], bytes]) -> BinaryArray:
    """VALUES (None: NULL) as KIND, a value at a time: each element its length, then ENCODE's bytes."""
    parts, nulls = [], 0
    for value in values:
        if value is None:
            parts.append(_NULL)
            nulls = 1
        else:
            data = encode(value)
            parts.append(_LENGTH.pack(len(data)) + data)
    return kind(_HEADER.pack(1, nulls, kind.element, len(parts), 1) + b"".join(parts))


def text_groups(values: Sequence[str | None], offsets: Sequence[int]) -> TextArray:
    """Each run of string VALUES between consecutive OFFSETS as one element, a PostgreSQL array literal
    (`{"a",NULL,"b \\"c\\""}`, for `::text[]`). A statement takes a group's labels as `(groups)[i]::text[]`:
    slicing one long `text[]` instead walks it from its start for every slice (10 ms for 200 slices of
    12,000 labels), as its elements differ in length."""
    words = ["NULL" if word is None else '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
             for word in values]
    return texts("{" + ",".join(words[start:end]) + "}" for start, end in zip(offsets[:-1], offsets[1:], strict=True))


class _AsItIs(Dumper):
    format = Format.BINARY

    def dump(self, obj: bytes) -> bytes:
        return obj


def register(adapters: psycopg.adapt.AdaptersMap) -> None:
    """Let connections made with ADAPTERS (psycopg's global map, before any connection) send these."""
    for kind in (Float8Array, Int4Array, DateArray, TextArray):
        adapters.register_dumper(kind, type(f"{kind.__name__}Dumper", (_AsItIs,), {"oid": kind.oid}))
