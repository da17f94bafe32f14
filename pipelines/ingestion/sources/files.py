"""The file connector: CSV, Parquet and JSON Lines read as a stream of Arrow batches.

Every batch carries the 1-based line (or record) number of each row and the rows that could not be
split into columns at all, so validation can quarantine exactly what failed and say where. Reading
goes through `lines.LineStream` (gzip, encodings, byte order marks, line breaks of every kind, lines
over the limit), so memory is bounded by the chunk size whatever the size or dialect of the file.

CSV follows RFC 4180: a quoted field may hold the delimiter, doubled quotes and line breaks, and its
row is numbered by the line it starts on. Blocks without a quote character (most of them) are cut
into rows by line breaks and parsed by Arrow; blocks with one go through Python's `csv` module, which
says where each record starts and ends. JSON Lines blocks are parsed by Arrow's JSON reader with
inferred types kept exact (timestamps stay text until validation parses them as declared, integers
too large for 64 bits send the block to the exact path); a block with a bad line takes the exact
path, line by line, so only that line is quarantined.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, BinaryIO, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipelines.core.settings import get_settings
from pipelines.ingestion.sources.batches import (
    Piece,
    RawBatch,
    Reject,
    document_text,
    json_records,
    nested_as_text,
    records_batch,
    records_table,
)
from pipelines.ingestion.sources.fingerprints import Seen, Start
from pipelines.ingestion.sources.lines import Block, LineStream, open_stream, stream_encoding
from pipelines.ingestion.sources.registry import Registry, SourceConfig, SourceContentError, SourceError

csv.field_size_limit(sys.maxsize)  # lines over the limit are caught before the csv module sees them
_PHYSICAL_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")
# Arrow reads an integer too large for 64 bits as a float; no float column holding an integral value
# this large is trusted to be exact.
_EXACT_FLOAT_LIMIT = 2.0**53


# Formats whose files may be read from any line's start on (`fingerprints.Start`).
LINE_FORMATS = frozenset({"csv", "jsonl"})


def read_file(source: SourceConfig, path: Path, batch_rows: int, start: Start | None = None) -> Iterator[RawBatch]:
    """PATH's rows as raw batches; from START on (for LINE_FORMATS: its header is read first) if given."""
    if start is not None and source.format not in LINE_FORMATS:
        raise ValueError(f"a {source.format} file is read whole")
    try:
        if source.format == "parquet":
            yield from _read_parquet(source, path, batch_rows)
        elif source.format == "csv":
            yield from _read_lines(source, path, batch_rows, start)
        else:
            yield from _read_json(source, path, batch_rows, start)
    except (pa.ArrowInvalid, OSError, EOFError, UnicodeDecodeError, ValueError) as exc:
        raise SourceContentError(f"source '{source.id}': cannot read {path.name}: {exc}") from exc


def line_limit(source: SourceConfig) -> int:
    return source.max_line_bytes or get_settings().max_line_bytes


def _regrouped(batches: Iterator[RawBatch], batch_rows: int) -> Iterator[RawBatch]:
    """BATCHES (one a block read) as batches of BATCH_ROWS rows, the last one fewer: a file is read in
    small blocks, which keeps a worker's memory down, and loaded in full batches, which keeps its
    transactions few. Rejects travel with the first batch made from their block. A block whose
    columns differ from the rows held (JSON Lines, read with the types each block shows) sends those
    rows on first, as a batch of their own."""
    parts: list[RawBatch] = []
    rows, sent = 0, False
    for batch in batches:
        if parts and not parts[0].table.schema.equals(batch.table.schema):
            yield _joined(parts)
            parts, rows, sent = [], 0, True
        parts.append(batch)
        rows += batch.table.num_rows
        while rows >= batch_rows:
            whole = _joined(parts)
            yield RawBatch(whole.table.slice(0, batch_rows), whole.lines[:batch_rows], whole.rejects, whole.fraction,
                           whole.notes)
            sent, rows = True, rows - batch_rows
            rest = RawBatch(whole.table.slice(batch_rows), whole.lines[batch_rows:], [], whole.fraction)
            parts = [rest] if rows else []
    if parts and (rows or any(p.rejects for p in parts) or not sent):
        yield _joined(parts)


def _joined(parts: list[RawBatch]) -> RawBatch:
    if len(parts) == 1:
        return parts[0]
    return RawBatch(pa.concat_tables([p.table for p in parts]),
                    np.concatenate([p.lines for p in parts]), [r for p in parts for r in p.rejects],
                    parts[-1].fraction, [n for p in parts for n in p.notes])


class _Parser(Protocol):
    def prime(self, stream: LineStream) -> None: ...

    def parse(self, block: Block, stream: LineStream) -> tuple[pa.Table, np.ndarray, list[Reject]]: ...


def _stream_batches(fh: BinaryIO, source: SourceConfig, size: int, batch_rows: int, parser: _Parser,
                    start: Start | None = None) -> Iterator[RawBatch]:
    """Blocks of FH's lines (from START on, if given) through PARSER, as raw batches of BATCH_ROWS rows
    with progress by FH's own bytes."""
    yield from _regrouped(_blocks_parsed(fh, source, size, parser, start), batch_rows)


# How much of a grown file's start is read for its header (more, if the header is longer).
_PRIMING_BYTES = 1 << 16


def _blocks_parsed(fh: BinaryIO, source: SourceConfig, size: int, parser: _Parser,
                   start: Start | None) -> Iterator[RawBatch]:
    opened = open_stream(fh)  # FH itself when there is a START: `fingerprints` gives one only for a plain file
    encoding, limit = stream_encoding(opened, source.encoding), line_limit(source)
    if start is not None:
        parser.prime(LineStream(opened, encoding, limit, _PRIMING_BYTES))
        opened.seek(start.offset)
    stream = LineStream(opened, encoding, limit, get_settings().read_chunk_bytes,
                        first_line=start.line if start else 1)
    seen_any, yielded = start is not None, False
    for block in stream.blocks():
        seen_any = seen_any or len(block.data) > 0
        table, lines, rejects = parser.parse(block, stream)
        rejects = stream.rejects + rejects
        stream.rejects = []
        # An input with no row at all still gives one (empty) batch: its columns are checked, and an
        # empty file is noted.
        if not (table.num_rows or rejects or (block.final and not yielded)):
            continue
        notes = [] if seen_any else ["the file is empty"]
        if start is not None and not yielded:
            notes.append(f"grew since its last load: read from line {start.line:,} on (byte {start.offset:,}), "
                         "what comes before it unchanged")
        yielded = True
        yield RawBatch(table, lines, sorted(rejects, key=lambda r: r.line), min(fh.tell() / size, 1.0), notes)


# --- CSV ------------------------------------------------------------------------------------------


def _read_lines(source: SourceConfig, path: Path, batch_rows: int, start: Start | None) -> Iterator[RawBatch]:
    with path.open("rb") as fh:
        _not_another_format(source, path.name, fh)
        yield from read_stream(source, fh, path.stat().st_size or 1, batch_rows, start)


# --- JSON -----------------------------------------------------------------------------------------


def _read_json(source: SourceConfig, path: Path, batch_rows: int, start: Start | None) -> Iterator[RawBatch]:
    """JSON Lines, read in blocks; or one JSON document, which is read whole: its records are the list
    at `records_path`, or the document itself, as for an HTTP page. A document is a file that opens
    with `[`, or that a source names a `records_path` for, or (declared `json`) one whose first line is
    not a whole JSON object (a document written over many lines). Its text is held in memory (an array's
    records are decoded a batch at a time), so one past the source's `max_response_bytes` (64 MiB by
    default) is refused, saying to write it as JSON Lines."""
    with path.open("rb") as fh:
        _not_another_format(source, path.name, fh)
        if not _one_document(source, open_stream(fh)):
            fh.seek(0)
            yield from read_stream(source, fh, path.stat().st_size or 1, batch_rows, start)
            return
        # One document is read whole, START or not (a JSON Lines source's file that holds an array).
        fh.seek(0)
        limit = source.max_response_bytes or get_settings().http_max_response_bytes
        opened = open_stream(fh)
        encoding = stream_encoding(opened, source.encoding)
        body = opened.read(limit + 1)
    if len(body) > limit:
        raise SourceContentError(
            f"source '{source.id}': {path.name} is one JSON document of more than {limit / 2**20:g} MiB, which is "
            f"read whole to find its records: write it as JSON Lines (one record a line, read in blocks whatever "
            f"its size), or raise the source's max_response_bytes")
    if source.records_path:
        raw = json_records(source, body, 1, path.name, encoding)
        del body
        yield from _regrouped(iter([raw]), batch_rows)
        return
    text = document_text(source, body, path.name, encoding)
    del body
    yield from _array_records(source, text, batch_rows, path.name)


_SPACE = re.compile(r"[ \t\r\n]*")


def _past_space(text: str, at: int) -> int:
    """Where TEXT's JSON whitespace from AT ends."""
    return _SPACE.match(text, at).end()  # type: ignore[union-attr]  # it matches anywhere, if only ""


def _array_records(source: SourceConfig, text: str, batch_rows: int, name: str) -> Iterator[RawBatch]:
    """The records of TEXT, one JSON array, BATCH_ROWS at a time: each element is decoded in its turn,
    so only a batch of them is ever held as Python objects (decoding the whole array first took four
    times the file's size). Numbered from 1; an element that is not an object is set aside."""
    decoder = json.JSONDecoder()

    def bad(why: str, at: int) -> SourceContentError:
        return SourceContentError(f"source '{source.id}': {name} is not valid JSON: {why} (character {at})")

    at = _past_space(text, 0)
    if not text.startswith("[", at):
        raise SourceContentError(f"source '{source.id}': {name} has no list of records at the top level "
                                 "(name where it is with records_path)")
    at = _past_space(text, at + 1)
    batch: list[tuple[int, object]] = []
    number, sent = 0, False
    while not text.startswith("]", at):
        try:
            record, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError as exc:
            raise bad(exc.msg, exc.pos) from None
        number += 1
        batch.append((number, record))
        at = _past_space(text, at)
        if text.startswith(",", at):
            at = _past_space(text, at + 1)
            if text.startswith("]", at):
                raise bad("a ',' with no record after it", at)
        elif not text.startswith("]", at):
            raise bad("expected ',' or ']' after a record", at)
        if len(batch) >= batch_rows:
            yield records_batch(batch, at / len(text))
            batch, sent = [], True
    if text[_past_space(text, at + 1):]:
        raise bad("more after the list of records", at + 1)
    if batch or not sent:
        yield records_batch(batch)


def _one_document(source: SourceConfig, stream: IO[bytes]) -> bool:
    """Whether STREAM (a JSON file) is one JSON document rather than JSON Lines (see `_read_json`)."""
    head = stream.read(1 << 20).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"[") or source.records_path:
        return True
    if source.format != "json":
        return False
    first = head.split(b"\n", 1)[0]
    try:
        return not isinstance(json.loads(first), dict)
    except ValueError:  # not JSON on its own: the start of a document over many lines
        return True


# Files that are plainly something else by their first bytes, said so rather than read as a header of noise.
_MAGIC = {
    b"PAR1": 'a Parquet file (declare format = "parquet")',
    b"PK\x03\x04": "a ZIP archive (an Excel .xlsx workbook, say: save the sheet as CSV)",
    b"\xd0\xcf\x11\xe0": "an Excel .xls workbook (save the sheet as CSV)",
}


def _not_another_format(source: SourceConfig, name: str, fh: BinaryIO) -> None:
    head = fh.read(4)
    fh.seek(0)
    for magic, what in _MAGIC.items():
        if head.startswith(magic):
            kind = {"csv": "CSV", "jsonl": "JSON Lines"}.get(source.format, "JSON")
            raise SourceContentError(f"source '{source.id}': {name} is not {kind}: it is {what}")


def read_stream(source: SourceConfig, fh: BinaryIO, size: int, batch_rows: int,
                start: Start | None = None) -> Iterator[RawBatch]:
    """CSV or JSON Lines, as the source declares, from the binary stream FH (a file, or an HTTP body);
    from START on, if given (FH a plain file)."""
    parser = _CsvParser(source) if source.format == "csv" else _JsonLinesParser(source)
    yield from _stream_batches(fh, source, size, batch_rows, parser, start)


class _CsvParser:
    """Blocks of lines into tables of binary cells; the first record of the input is the header."""

    def __init__(self, source: SourceConfig):
        self.source = source
        self.names: list[str] | None = None
        self.to_skip = source.skip_lines  # lines before the header (a title, notes), as they come

    def _empty(self) -> pa.Table:
        return pa.table({name: pa.array([], pa.binary()) for name in self.names or []})

    def prime(self, stream: LineStream) -> None:
        """Read the header from STREAM, the input from its start: the rows parsed with it are dropped
        (a grown file's reader starts after them)."""
        for block in stream.blocks():
            self.parse(block, stream)
            if self.names is not None:
                return
        raise SourceError(f"source '{self.source.id}': the file has no header")

    def _no_rows(self, rejects: list[Reject] | None = None) -> tuple[pa.Table, np.ndarray, list[Reject]]:
        return self._empty(), np.empty(0, np.int64), rejects or []

    def parse(self, block: Block, stream: LineStream) -> tuple[pa.Table, np.ndarray, list[Reject]]:
        if self.names is None and self.to_skip:
            skipped = min(self.to_skip, len(block))
            self.to_skip -= skipped
            block = block.tail(skipped)
            if self.to_skip or not len(block):
                return self._no_rows()
        if self.names is None:
            found = self._header(block, stream)
            if found is None:
                return self._no_rows()
            block = block.tail(found)
        if not (block.ends > block.starts).any():
            return self._no_rows()
        if block.data.find(b'"') < 0:
            return self._plain(block)
        return self._quoted(block, stream) or self._exact(block, stream)

    def _header(self, block: Block, stream: LineStream) -> int | None:
        """Read the header from BLOCK; the index of the line after it, or None if it is not complete."""
        text = block.data.decode("utf-8", "replace")
        lines = _PHYSICAL_LINE.findall(text)
        reader = csv.reader(lines, delimiter=self.source.delimiter, strict=False)
        for fields in reader:
            if fields:
                if reader.line_num == len(lines) and not block.final:
                    break  # a header whose quoted name may go on in the next block
                # Spreadsheets often end every line with a delimiter: unnamed columns get a name.
                self.names = [f.strip() or f"column_{i}" for i, f in enumerate(fields, start=1)]
                if len(set(self.names)) != len(self.names):
                    raise SourceError(f"source '{self.source.id}': the header repeats a column name: {self.names}")
                return reader.line_num
        if not block.final:
            stream.push_back(block, 0)
        return None

    def _plain(self, block: Block) -> tuple[pa.Table, np.ndarray, list[Reject]]:
        """A block without quotes: one line is one row; Arrow parses it."""
        array = np.frombuffer(block.data, dtype=np.uint8)
        delimiters = np.flatnonzero(array == ord(self.source.delimiter))
        lines = np.arange(len(block))
        result = self._arrow(block, lines, lines, delimiters, quoted=False)
        assert result is not None
        return result

    def _quoted(self, block: Block, stream: LineStream) -> tuple[pa.Table, np.ndarray, list[Reject]] | None:
        """A block with quotes, parsed by Arrow when every quote is where RFC 4180 puts one (opening a
        field, closing it, or doubled inside it): then a line break or delimiter is inside a quoted
        field exactly when an odd number of quotes precede it, which finds every record and the line
        it starts on at once. None (take the exact path) for anything else."""
        array = np.frombuffer(block.data, dtype=np.uint8)
        is_quote = array == ord('"')
        quotes = np.flatnonzero(is_quote)
        edge = np.zeros(256, dtype=bool)
        edge[[ord(self.source.delimiter), 10, 13, ord('"')]] = True
        openers, closers = quotes[0::2], quotes[1::2]
        if not (edge[array[np.maximum(openers - 1, 0)]] | (openers == 0)).all():
            return None
        if not (edge[array[np.minimum(closers + 1, len(array) - 1)]] | (closers == len(array) - 1)).all():
            return None
        def inside(positions: np.ndarray) -> np.ndarray:  # an odd number of quotes precede them
            return (np.searchsorted(quotes, positions) & 1).astype(bool)

        closes = ~inside(block.ends)  # line i ends a record
        if not closes[-1]:
            if block.final:
                return None  # a quote left open at the end: the exact path says which row
            done = int(np.flatnonzero(closes)[-1]) + 1 if closes.any() else 0
            stream.push_back(block, done)  # the last record goes on in the next block
            block = block.head(done)
            closes = closes[:done]
            if not done:
                return self._no_rows()
        last_lines = np.flatnonzero(closes)
        first_lines = np.concatenate([[0], last_lines[:-1] + 1])
        delimiters = np.flatnonzero(array[:len(block.data)] == ord(self.source.delimiter))
        outside = delimiters[~inside(delimiters)]
        return self._arrow(block, first_lines, last_lines, outside, quoted=True)

    def _arrow(self, block: Block, first_lines: np.ndarray, last_lines: np.ndarray,
               delimiters: np.ndarray, quoted: bool) -> tuple[pa.Table, np.ndarray, list[Reject]] | None:
        """Arrow parses BLOCK, whose records span lines FIRST_LINES[i]..LAST_LINES[i] and whose field
        separators are DELIMITERS; records with the wrong number of fields become rejects."""
        assert self.names is not None
        data = block.data
        n = len(self.names)
        begin, end = block.starts[first_lines], block.ends[last_lines]
        columns = np.searchsorted(delimiters, end) - np.searchsorted(delimiters, begin) + 1
        blank = (end == begin)
        wrong = ~blank & (columns != n)
        rejects = [Reject(int(block.numbers[first_lines[i]]),
                          f"wrong number of columns: expected {n}, found {int(columns[i])}",
                          {"line": data[begin[i]:end[i]].decode("utf-8", "replace")}) for i in np.flatnonzero(wrong)]
        if (blank | wrong).all():
            return self._no_rows(rejects)
        if rejects:  # Arrow is given only the records with the right number of fields
            stops = np.append(block.starts[first_lines[1:]], len(data))
            data = b"".join(data[begin[i]:stops[i]] for i in np.flatnonzero(~wrong))
        refused = [0]

        def on_invalid(_row) -> str:
            refused[0] += 1
            return "skip"

        table = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(column_names=self.names, block_size=len(data) + 1),
            parse_options=pacsv.ParseOptions(delimiter=self.source.delimiter, quote_char='"' if quoted else False,
                                             double_quote=True, newlines_in_values=quoted, ignore_empty_lines=True,
                                             invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(column_types={name: pa.binary() for name in self.names},
                                                 null_values=[""], strings_can_be_null=True),
        )
        lines = block.numbers[first_lines[~blank & ~wrong]]
        if table.num_rows != len(lines) or refused[0]:
            if quoted:
                return None
            raise SourceError(f"source '{self.source.id}': could not align rows with lines near line "
                              f"{int(block.numbers[0])}")
        return table, lines, rejects

    def _exact(self, block: Block, stream: LineStream) -> tuple[pa.Table, np.ndarray, list[Reject]]:
        """Quotes anywhere, as Python's csv module reads them: it finds each record and its first line."""
        assert self.names is not None
        n = len(self.names)
        try:
            text, binary = block.data.decode("utf-8"), False
        except UnicodeDecodeError:  # keep every byte; validation says which cells are not valid text
            text, binary = block.data.decode("latin-1"), True
        lines = _PHYSICAL_LINE.findall(text)
        reader = csv.reader(lines, delimiter=self.source.delimiter, strict=False)
        records: list[tuple[int, int, list[str] | None, str]] = []
        start = 0
        while True:
            try:
                fields: list[str] | None = next(reader)
                problem = ""
            except StopIteration:
                break
            except csv.Error as exc:
                fields, problem = None, f"unparseable CSV: {exc}"
            records.append((start, reader.line_num, fields, problem))
            start = reader.line_num
        if records and not block.final:
            stream.push_back(block, records.pop()[0])  # the last record may go on in the next block
        rows, numbers, rejects = [], [], []
        for first, end, fields, problem in records:
            if fields == []:
                continue
            if fields is not None and len(fields) == n:
                rows.append(fields)
                numbers.append(block.numbers[first])
                continue
            raw = "".join(lines[first:end]).rstrip("\r\n")
            if binary:
                raw = raw.encode("latin-1").decode("utf-8", "replace")
            reason = problem or f"wrong number of columns: expected {n}, found {len(fields or [])}"
            rejects.append(Reject(int(block.numbers[first]), reason, {"line": raw}))
        return self._table(rows, binary), np.array(numbers, dtype=np.int64), rejects

    def _table(self, rows: list[list[str]], binary: bool) -> pa.Table:
        assert self.names is not None
        if not rows:
            return self._empty()
        columns = list(zip(*rows, strict=True))
        arrays = []
        for cells in columns:
            if binary:
                arrays.append(pa.array([c.encode("latin-1") if c else None for c in cells], pa.binary()))
            else:
                arrays.append(pa.array([c or None for c in cells], pa.string()))
        return pa.table(dict(zip(self.names, arrays, strict=True)))


# --- Parquet --------------------------------------------------------------------------------------


def _read_parquet(source: SourceConfig, path: Path, batch_rows: int) -> Iterator[RawBatch]:
    parquet = pq.ParquetFile(path)
    total = parquet.metadata.num_rows or 1
    record = 1
    for batch in parquet.iter_batches(batch_size=batch_rows):
        lines = np.arange(record, record + batch.num_rows, dtype=np.int64)
        record += batch.num_rows
        yield RawBatch(nested_as_text(pa.Table.from_batches([batch])), lines, fraction=(record - 1) / total)


# --- JSON Lines -----------------------------------------------------------------------------------


class _JsonLinesParser:
    """Blocks of JSON Lines into tables: Arrow's reader where it is exact, line by line where not."""

    def __init__(self, source: SourceConfig):
        self.source = source
        self.as_text: dict[str, pa.DataType] = {}  # columns Arrow would read as times: kept as text
        self.limit = line_limit(source)

    def prime(self, stream: LineStream) -> None:
        """JSON Lines have no header: a grown file's reader starts at its first new line."""

    def parse(self, block: Block, _stream: LineStream) -> tuple[pa.Table, np.ndarray, list[Reject]]:
        filled = block.ends > block.starts
        table = self._fast(block, int(filled.sum()))
        if table is not None:
            return table, block.numbers[filled], []
        return self._exact(block)

    def _read(self, data: bytes) -> pa.Table:
        schema = pa.schema(list(self.as_text.items())) if self.as_text else None
        return pajson.read_json(
            io.BytesIO(data),
            # Blocks of Arrow's own, parsed in parallel, each larger than the longest line can be.
            read_options=pajson.ReadOptions(block_size=max(self.limit + 2, 1 << 20)),
            parse_options=pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="infer"),
        )

    def _fast(self, block: Block, rows: int) -> pa.Table | None:
        if rows == 0:
            return None
        try:
            table = self._read(block.data)
            times = [f.name for f in table.schema if pa.types.is_temporal(f.type)]
            if times:
                self.as_text.update(dict.fromkeys(times, pa.string()))
                table = self._read(block.data)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return None
        types = table.schema.types
        if table.num_rows != rows or any(pa.types.is_nested(t) or pa.types.is_temporal(t) for t in types):
            return None
        if any(pa.types.is_floating(t) and _maybe_inexact(c) for t, c in zip(types, table.columns, strict=True)):
            return None  # maybe an integer too large for 64 bits, read as a float: take the exact path
        return table

    def _exact(self, block: Block) -> tuple[pa.Table, np.ndarray, list[Reject]]:
        records, lines, rejects = [], [], []
        for index in range(len(block)):
            raw = block.line(index)
            if not raw.strip():
                continue
            number = int(block.numbers[index])
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                rejects.append(Reject(number, f"bad encoding (not {self.source.encoding})",
                                      {"line": raw.decode("utf-8", "replace")}))
                continue
            except json.JSONDecodeError as exc:
                rejects.append(Reject(number, f"invalid JSON: {exc.msg}", {"line": raw.decode("utf-8", "replace")}))
                continue
            if not isinstance(record, dict):
                rejects.append(Reject(number, "record is not a JSON object", {"line": raw.decode("utf-8", "replace")}))
                continue
            records.append(record)
            lines.append(number)
        return records_table(records), np.array(lines, dtype=np.int64), rejects


def _maybe_inexact(column: pa.ChunkedArray) -> bool:
    large = pc.greater_equal(pc.abs(column), _EXACT_FLOAT_LIMIT)
    return bool(pc.any(pc.and_(large, pc.equal(pc.floor(column), column))).as_py())


# --- a source's files -----------------------------------------------------------------------------


def stream(source: SourceConfig, registry: Registry, batch_rows: int, resume: dict | None,
           seen: Seen | None = None) -> Iterator[Piece]:
    """Every batch of every file SOURCE matches, after the position RESUME (a committed checkpoint);
    with SEEN, files this run need not read (unchanged: `fingerprints`) are skipped."""
    files = registry.files(source)
    sizes = [p.stat().st_size for p in files]
    total = sum(sizes) or 1
    start_file, start_batch = (resume or {}).get("file", 0), (resume or {}).get("batch", 0)
    # The last line committed, when the checkpoint has it: exact however the file is batched this time
    # (batch_size changed meanwhile, another release). Older checkpoints name their batch alone.
    start_line = (resume or {}).get("line")
    for f_index, path in enumerate(files):
        if f_index < start_file:
            continue
        label = registry.display_path(path)
        print_, begin = None, None
        if seen is not None:
            reading = seen.changed(label, path, source.format if source.format in LINE_FORMATS else None)
            if reading is None:
                continue  # unchanged since it was last read (whole, or past the same cursor)
            print_, begin = reading.fingerprint, reading.start
        before = sum(sizes[:f_index])
        after_line = start_line if f_index == start_file else None
        last, line = None, after_line or 0
        for b_index, raw in enumerate(read_file(source, path, batch_rows, begin)):
            if after_line is not None:
                if (after := _after_line(raw, after_line)) is None:
                    continue
                raw = after
            elif f_index == start_file and b_index < start_batch:
                continue
            line = max([line, *raw.lines[-1:].tolist(), *(r.line for r in raw.rejects)])
            if last is not None:
                yield last
            last = Piece(raw, label, {"file": f_index, "batch": b_index + 1, "line": line},
                         (before + raw.fraction * sizes[f_index]) / total)
        if last is not None:
            last.file_done = print_
            yield last


def _after_line(raw: RawBatch, line: int) -> RawBatch | None:
    """What of RAW comes after LINE (the last one committed), or None if nothing does."""
    keep = raw.lines > line
    rejects = [r for r in raw.rejects if r.line > line]
    if not keep.any() and not rejects:  # all committed (or an empty file's one batch, committed with it)
        return None
    if keep.all():
        return raw if rejects == raw.rejects else RawBatch(raw.table, raw.lines, rejects, raw.fraction, raw.notes)
    return RawBatch(raw.table.filter(pa.array(keep)), raw.lines[keep], rejects, raw.fraction, raw.notes)
