"""Validation: raw batches become typed rows, and every row that fails says why.

Casts run vectorised over whole columns; only a column that fails to cast as a whole is walked value
by value, to find which rows are bad and say so. Bad rows are set aside, never dropped silently.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.ingestion.datasets import DATASETS
from pipelines.ingestion.sources.files import RawBatch, Reject
from pipelines.ingestion.sources.registry import DATASET_FIELDS, SourceConfig, SourceContentError

UTC_US = pa.timestamp("us", "UTC")
ARROW_TYPES = {
    "string": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
    "datetime": UTC_US,
    "date": pa.date32(),
    "month": pa.date32(),  # the month's first day
    "bool": pa.bool_(),
}
_ZONED = re.compile(r"(?:[Zz]|[+-]\d\d(?::?\d\d)?)$")
# `formats` for a datetime column of numbers: seconds (or finer) since 1970-01-01 UTC. Microseconds in each.
EPOCHS = {"epoch_s": 1_000_000, "epoch_ms": 1_000, "epoch_us": 1, "epoch_ns": 0.001}
_NUMBER = re.compile(r"^\s*-?\d+(\.\d*)?\s*$")
_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


@dataclass
class ValidBatch:
    """Typed rows ready to load: key, dataset fields, and extra columns kept as metadata."""

    ids: pa.Array
    fields: dict[str, pa.Array]
    metadata: dict[str, pa.Array]
    lines: np.ndarray
    rejects: list[Reject] = field(default_factory=list)
    cursor_max: str | None = None  # the highest cursor value among the rows, as cursor text
    cursor_max_ids: list[str] = field(default_factory=list)  # the ids of the rows holding it
    skipped: int = 0  # rows already loaded by an earlier run, left out

    @property
    def num_rows(self) -> int:
        return len(self.ids)


def check_columns(source: SourceConfig, names: list[str]) -> None:
    """A file without a required or key column cannot be loaded at all: a clear error, not rows."""
    needed = dict.fromkeys([*source.validation.required_columns, *source.primary_key])
    missing = [c for c in needed if c not in names]
    if missing:
        # A name that differs only in case, spaces or underscores is most likely the one meant.
        folded = {_folded(name): name for name in names}
        near = {c: folded[_folded(c)] for c in missing if _folded(c) in folded}
        hint = (f"; did you mean {', '.join(f'{near[c]!r} for {c!r}' for c in near)}? (names must match exactly)"
                if near else "")
        raise SourceContentError(f"source '{source.id}': missing required column(s) {missing}; found {names}{hint}")


def _folded(name: str) -> str:
    return re.sub(r"[\s_-]+", "", name).casefold()


class Unclear(ValueError):
    """A value that parses but cannot be placed: a local time the clocks skipped or went through twice."""


def _in_zone(value: dt.datetime, zone: str) -> dt.datetime:
    """VALUE (naive) as a wall-clock time in ZONE, in UTC; Unclear where a clock change makes it none
    or two."""
    if zone == "UTC":
        return value.replace(tzinfo=dt.UTC)
    tz = ZoneInfo(zone)
    early, late = value.replace(tzinfo=tz, fold=0), value.replace(tzinfo=tz, fold=1)
    if early.utcoffset() != late.utcoffset():
        if early.astimezone(dt.UTC).astimezone(tz).replace(tzinfo=None) != value:
            raise Unclear(f"{value} does not exist in {zone}: the clocks went forward over it")
        raise Unclear(f"{value} happens twice in {zone} (the clocks went back): write it with its offset")
    return early.astimezone(dt.UTC)


def _python_parse(kind: str, text: str, fmt: str | None, zone: str = "UTC"):
    text = text.strip()
    if kind == "int":
        number = int(text)
        if not -(2**63) <= number < 2**63:
            raise OverflowError(f"{text} is past a 64-bit integer")
        return number
    if kind == "float":
        return float(text)
    if kind == "bool":
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(text)
    if kind == "date":
        return dt.datetime.strptime(text, fmt).date() if fmt else dt.date.fromisoformat(text)
    if kind == "month":
        if fmt:
            return dt.datetime.strptime(text, fmt).date().replace(day=1)
        return dt.date.fromisoformat(text + "-01" if len(text) == 7 else text).replace(day=1)
    if kind == "datetime":
        if fmt in EPOCHS:
            micros = int(text) * EPOCHS[fmt] if text.lstrip("-").isdigit() else float(text) * EPOCHS[fmt]
            return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=round(micros))
        value = dt.datetime.strptime(text, fmt) if fmt else dt.datetime.fromisoformat(text)
        return _in_zone(value, zone) if value.tzinfo is None else value.astimezone(dt.UTC)
    return text


def _vector_cast(array: pa.Array, kind: str, fmt: str | None, zone: str = "UTC") -> pa.Array:
    """The whole column cast at once; raises if any value does not parse. Times without a zone are
    ZONE's wall-clock times (one a clock change skips or repeats raises: `_in_zone` names it)."""
    target = ARROW_TYPES[kind]
    if array.type == target:
        return array
    if kind == "datetime" and fmt in EPOCHS and not pa.types.is_timestamp(array.type):
        return _from_epoch(array, EPOCHS[fmt])
    if not pa.types.is_string(array.type) and not pa.types.is_large_string(array.type):
        if kind == "datetime" and pa.types.is_timestamp(array.type):
            if array.type.tz is None:
                return pc.assume_timezone(array, zone).cast(UTC_US)
            return array.cast(UTC_US)
        if kind in ("datetime", "date") and (pa.types.is_integer(array.type) or pa.types.is_floating(array.type)):
            # Arrow would take the numbers as microseconds (or days) whatever they count: each is
            # refused instead, saying to declare the unit (`EPOCHS`).
            raise pa.ArrowInvalid("numbers as times need their unit")
        return array.cast(target)
    if kind == "datetime":
        if fmt:
            parsed = pc.strptime(array, format=fmt, unit="us", error_is_null=True)
            if parsed.null_count != array.null_count:
                raise pa.ArrowInvalid("unparseable datetime")
            return parsed.cast(UTC_US) if parsed.type.tz else pc.assume_timezone(parsed, zone).cast(UTC_US)
        # A failed cast costs far more than a good one: try first the form the first value has.
        first = next((v for v in array.slice(0, 64).to_pylist() if v), "")

        def naive(texts: pa.Array) -> pa.Array:
            return pc.assume_timezone(texts.cast(pa.timestamp("us")), zone).cast(UTC_US)

        attempts = [_cast_zoned, naive] if _ZONED.search(first.strip()) else [naive, _cast_zoned]
        try:
            return attempts[0](array)
        except pa.ArrowInvalid:
            return attempts[1](array)
    if kind == "bool":
        return _bool_vector(pc.utf8_lower(pc.utf8_trim_whitespace(array)))
    if kind in ("date", "month"):
        return _cast_day(array, fmt, month=kind == "month")
    return array.cast(target)


def _from_epoch(array: pa.Array, micros_each: float) -> pa.Array:
    """Numbers (or their text) counted in a unit since 1970-01-01 UTC, as timestamps."""
    if not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type)):
        try:
            array = pc.utf8_trim_whitespace(array).cast(pa.int64())
        except pa.ArrowInvalid:
            array = pc.utf8_trim_whitespace(array).cast(pa.float64())
    if pa.types.is_integer(array.type) and micros_each >= 1:
        micros = pc.multiply_checked(array.cast(pa.int64()), int(micros_each))
    else:
        micros = pc.round(pc.multiply(array.cast(pa.float64()), micros_each)).cast(pa.int64())
    return micros.cast(UTC_US)


def _cast_day(array: pa.Array, fmt: str | None, month: bool) -> pa.Array:
    """Dates from text: ISO (`YYYY-MM` too, for months) or FMT; months as their first day."""
    if fmt:
        parsed = pc.strptime(array, format=fmt, unit="s", error_is_null=True)
        if parsed.null_count != array.null_count:
            raise pa.ArrowInvalid("unparseable date")
        days = parsed.cast(pa.date32())
    else:
        text = pc.utf8_trim_whitespace(array)
        if month:  # YYYY-MM is the month's first day
            text = pc.if_else(pc.equal(pc.utf8_length(text), 7), pc.binary_join_element_wise(text, "-01", ""), text)
        days = text.cast(pa.date32())
    if month:
        days = pc.floor_temporal(days, unit="month")
    return days


def _cast_zoned(array: pa.Array) -> pa.Array:
    return array.cast(UTC_US)


def _bool_vector(lowered: pa.Array) -> pa.Array:
    true = pc.is_in(lowered, pa.array(sorted(_TRUE)))
    false = pc.is_in(lowered, pa.array(sorted(_FALSE)))
    if pc.any(pc.and_(pc.invert(pc.or_(true, false)), pc.is_valid(lowered))).as_py():
        raise pa.ArrowInvalid("unparseable boolean")
    return pc.if_else(pc.is_null(lowered), pa.scalar(None, pa.bool_()), true)


def as_written(source: SourceConfig, array: pa.Array, kind: str) -> pa.Array:
    """ARRAY with the source's way of writing numbers (`decimal`, `thousands`) made plain, when it is
    text to be read as KIND; as it is otherwise."""
    if kind not in ("float", "int") or not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        return array
    if source.thousands:
        array = pc.replace_substring(array, source.thousands, "")
    if source.decimal != "." and kind == "float":
        array = pc.replace_substring(array, source.decimal, ".")
    return array


def parse_column(array: pa.Array, kind: str, fmt: str | None, zone: str = "UTC"
                 ) -> tuple[pa.Array, np.ndarray, dict[int, str]]:
    """ARRAY as KIND, plus a mask of the rows whose non-null value did not parse (those become null),
    and for some of them why (`Unclear`)."""
    bad = np.zeros(len(array), dtype=bool)
    why: dict[int, str] = {}
    try:
        return _vector_cast(array, kind, fmt, zone), bad, why
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    values: list = []
    for index, item in enumerate(array.to_pylist()):
        if item is None:
            values.append(None)
            continue
        try:
            values.append(_python_parse(kind, str(item), fmt, zone))
        except Unclear as exc:
            bad[index], why[index] = True, str(exc)
            values.append(None)
        except (ValueError, OverflowError):
            bad[index] = True
            values.append(None)
    return pa.array(values, ARROW_TYPES[kind]), bad, why


def _unparsed(name: str, kind: str, value) -> str:
    """Why VALUE of column NAME is not a KIND: it cannot be parsed, and what to declare when it is a
    number meant as a time."""
    reason = f"column '{name}': cannot parse {value!r} as {kind}"
    if kind == "datetime" and _NUMBER.match(str(value)):
        reason += f" (a number: declare its unit in formats, {name} = one of {', '.join(EPOCHS)})"
    return reason


def _finite(parsed: pa.Array, name: str, given: pa.Array, reasons: _Reasons, required: bool) -> pa.Array:
    """PARSED (a float column) with NaN taken as a missing value, as pandas and Arrow mean it; an
    infinity, or a number past the largest double ('1e400'), is no price or quantity: its row is
    quarantined. Neither is kept: JSON (the API's answers, metadata) has no such numbers."""
    infinite = pc.fill_null(pc.is_inf(parsed), False).to_numpy(zero_copy_only=False)
    reasons.add(infinite, lambda i: f"column '{name}': {given[i].as_py()!r} is not a finite number")
    nan = pc.fill_null(pc.is_nan(parsed), False).to_numpy(zero_copy_only=False)
    if not nan.any():
        return parsed
    if required:
        reasons.add(nan, lambda i: f"missing required value for '{name}' (NaN)")
    return pc.if_else(pa.array(nan), pa.scalar(None, pa.float64()), parsed)


def _decode(array: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Binary CSV cells as text; cells that are not valid UTF-8 become null and are marked bad."""
    bad = np.zeros(len(array), dtype=bool)
    if not pa.types.is_binary(array.type):
        return array, bad
    try:
        return array.cast(pa.string()), bad
    except pa.ArrowInvalid:
        pass
    values = []
    for index, item in enumerate(array.to_pylist()):
        try:
            values.append(None if item is None else item.decode("utf-8"))
        except UnicodeDecodeError:
            bad[index] = True
            values.append(None)
    return pa.array(values, pa.string()), bad


class _Reasons:
    """The first reason each row failed for."""

    def __init__(self, n: int):
        self.bad = np.zeros(n, dtype=bool)
        self.reason = np.empty(n, dtype=object)

    def add(self, mask: np.ndarray, describe) -> None:
        fresh = mask & ~self.bad
        for index in np.flatnonzero(fresh):
            self.reason[index] = describe(index)
        self.bad |= mask


def _raw_text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def cursor_text(value) -> str | None:
    """A cursor value as kept in source_state: ISO 8601 for times, plain text otherwise."""
    if value is None:
        return None
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value)


def cursor_scalar(text: str, kind: str) -> pa.Scalar:
    return pa.scalar(_python_parse(kind, text, None), ARROW_TYPES[kind])


@dataclass(frozen=True)
class Cursor:
    """The committed incremental state: the highest cursor value, and the ids of the rows that hold
    it (so rows sharing that value that arrive later are still loaded, and the ones already loaded
    are not loaded twice)."""

    value: str
    ids: frozenset[str] = frozenset()


def _past_cursor(source: SourceConfig, raw: RawBatch, since: str) -> tuple[RawBatch, int]:
    """RAW without the rows whose cursor is below SINCE (cheap: before the other columns are checked)."""
    if source.cursor is None or source.cursor not in raw.table.column_names or raw.table.num_rows == 0:
        return raw, 0
    kind = effective_types(source).get(source.cursor, "string")
    array, _ = _decode(raw.table.column(source.cursor).combine_chunks())
    fmt = source.validation.formats.get(source.cursor)
    parsed, bad, _why = parse_column(as_written(source, array, kind), kind, fmt, source.timezone)
    older = pc.fill_null(pc.less(parsed, cursor_scalar(since, kind)), False).to_numpy(zero_copy_only=False)
    older &= ~bad
    if not older.any():
        return raw, 0
    keep = ~older
    table = raw.table.filter(pa.array(keep))
    return RawBatch(table, raw.lines[keep], raw.rejects, raw.fraction, raw.notes), int(older.sum())


def _without(batch: ValidBatch, drop: pa.Array) -> ValidBatch:
    """BATCH less the rows marked in DROP, counted as skipped."""
    keep = pc.invert(drop)
    batch.skipped += pc.sum(drop.cast(pa.int64())).as_py()
    batch.ids = pc.filter(batch.ids, keep)
    batch.fields = {k: pc.filter(v, keep) for k, v in batch.fields.items()}
    batch.metadata = {k: pc.filter(v, keep) for k, v in batch.metadata.items()}
    batch.lines = batch.lines[keep.to_numpy(zero_copy_only=False)]
    return batch


def validate(source: SourceConfig, raw: RawBatch, since: Cursor | None = None) -> ValidBatch:
    if raw.table.num_columns == 0:  # an empty page of records: nothing to check, nothing to load
        return ValidBatch(pa.array([], pa.string()), {}, {}, raw.lines, list(raw.rejects))
    check_columns(source, raw.table.column_names)
    skipped = 0
    if since is not None and source.cursor:
        raw, skipped = _past_cursor(source, raw, since.value)
    table = raw.table
    n = table.num_rows
    reasons = _Reasons(n)
    rules = source.validation
    columns: dict[str, pa.Array] = {}
    for name in table.column_names:
        array = table.column(name).combine_chunks()
        array, bad = _decode(array)
        reasons.add(bad, lambda i, name=name: f"bad encoding in column '{name}' (not valid {source.encoding})")
        columns[name] = array

    required = dict.fromkeys([*rules.required_columns, *source.primary_key])
    for name in required:
        missing = pc.is_null(columns[name]).to_numpy(zero_copy_only=False) & ~reasons.bad
        reasons.add(missing, lambda i, name=name: f"missing required value for '{name}'")

    typed: dict[str, pa.Array] = {}
    for name, kind in effective_types(source).items():
        if name not in columns:
            continue
        source_array = columns[name]
        parsed, bad, why = parse_column(as_written(source, source_array, kind), kind, rules.formats.get(name),
                                        source.timezone)
        reasons.add(bad, lambda i, name=name, kind=kind, a=source_array, why=why:
                    f"column '{name}': {why[i]}" if i in why else _unparsed(name, kind, a[i].as_py()))
        if kind == "float":
            parsed = _finite(parsed, name, source_array, reasons, required=name in required)
        typed[name] = parsed

    rejects = list(raw.rejects)
    if reasons.bad.any():
        for index in np.flatnonzero(reasons.bad):
            row = {name: _raw_text(table.column(name)[index].as_py()) for name in table.column_names}
            rejects.append(Reject(int(raw.lines[index]), str(reasons.reason[index]), row))
        keep = pa.array(~reasons.bad)
        columns = {k: pc.filter(v, keep) for k, v in columns.items()}
        typed = {k: pc.filter(v, keep) for k, v in typed.items()}
        lines = raw.lines[~reasons.bad]
    else:
        lines = raw.lines
    rejects.sort(key=lambda reject: reject.line)  # quarantined in the file's order, whatever found them
    batch = _shape(source, columns, typed, lines, rejects)
    batch.skipped = skipped
    if source.cursor and source.cursor in columns:
        kind = effective_types(source).get(source.cursor, "string")
        cursor = typed.get(source.cursor, columns[source.cursor])
        if since is not None and since.ids and batch.num_rows:
            # rows at exactly the committed value whose id was loaded with it: already in
            at_value = pc.fill_null(pc.equal(cursor, cursor_scalar(since.value, kind)), False)
            loaded = pc.and_(at_value, pc.is_in(batch.ids, pa.array(sorted(since.ids), pa.string())))
            if pc.any(loaded).as_py():
                batch = _without(batch, loaded)
                cursor = pc.filter(cursor, pc.invert(loaded))
        top = pc.max(cursor) if len(cursor) else None
        if top is not None and top.is_valid:
            batch.cursor_max = cursor_text(top.as_py())
            batch.cursor_max_ids = pc.filter(batch.ids, pc.fill_null(pc.equal(cursor, top), False)).to_pylist()
    return batch


def as_text(array: pa.Array) -> pa.Array:
    """Text of ARRAY; UTC timestamps are formatted as naive values plus Z (ten times faster)."""
    if pa.types.is_timestamp(array.type) and array.type.tz:
        naive = array.cast(pa.timestamp(array.type.unit)).cast(pa.string())
        return pc.binary_join_element_wise(naive, pa.scalar("Z"), "")
    return array.cast(pa.string())


def effective_types(source: SourceConfig) -> dict[str, str]:
    """Declared types, plus the dataset's own for columns that feed its fields and were not declared."""
    types = dict(source.validation.data_types)
    for target, kind in ((f.name, f.kind) for f in DATASETS[source.dataset].fields if f.kind != "string"):
        column = source.dataset_column(target)
        if column:
            types.setdefault(column, kind)
    return types


def _shape(source, columns, typed, lines, rejects) -> ValidBatch:
    """Map validated input columns onto the dataset: key, fields, and the rest as metadata."""

    def column(name):
        return typed.get(name, columns[name])

    keys = [as_text(column(name)) for name in source.primary_key]
    ids = keys[0] if len(keys) == 1 else pc.binary_join_element_wise(*keys, "|")
    fields, used = {}, {"id"}
    for target in DATASET_FIELDS[source.dataset]:
        name = source.dataset_column(target)
        if name in columns:
            fields[target] = column(name)
            used.add(name)
    metadata = {name: column(name) for name in columns if name not in used}
    return ValidBatch(ids, fields, metadata, lines, rejects)
