"""The file connector: CSV, Parquet and JSON Lines read as a stream of Arrow batches.

Every batch carries the 1-based line (or record) number of each row and the rows that could not
be split into columns at all, so validation can quarantine exactly what failed and say where.
Memory is bounded by the chunk size, whatever the size of the file.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipelines.sources.batches import Piece, RawBatch, Reject, records_table
from pipelines.sources.registry import Registry, SourceConfig, SourceError

CHUNK_BYTES = 4 * 1024 * 1024


def read_file(source: SourceConfig, path: Path, batch_rows: int) -> Iterator[RawBatch]:
    readers = {"csv": _read_csv, "parquet": _read_parquet, "jsonl": _read_jsonl}
    try:
        yield from readers[source.format](source, path, batch_rows)
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError, ValueError) as exc:
        raise SourceError(f"source '{source.id}': cannot read {path.name}: {exc}") from exc


def _slices(batch: RawBatch, batch_rows: int) -> Iterator[RawBatch]:
    """Split BATCH into pieces of at most BATCH_ROWS rows; its rejects travel with the first piece."""
    if batch.table.num_rows <= batch_rows:
        yield batch
        return
    for start in range(0, batch.table.num_rows, batch_rows):
        yield RawBatch(
            batch.table.slice(start, batch_rows),
            batch.lines[start : start + batch_rows],
            batch.rejects if start == 0 else [],
            batch.fraction,
        )


def _csv_header(source: SourceConfig, header: bytes) -> list[str]:
    if not header.strip():
        raise SourceError(f"source '{source.id}': the file is empty or has no header line")
    table = pacsv.read_csv(
        io.BytesIO(header),
        read_options=pacsv.ReadOptions(encoding=source.encoding),
        parse_options=pacsv.ParseOptions(delimiter=source.delimiter),
    )
    return table.column_names


def _read_csv(source: SourceConfig, path: Path, batch_rows: int) -> Iterator[RawBatch]:
    with path.open("rb") as fh:
        yield from read_csv_stream(source, fh, path.stat().st_size or 1, batch_rows, path.name)


def read_csv_stream(source: SourceConfig, fh: BinaryIO, size: int, batch_rows: int, name: str) -> Iterator[RawBatch]:
    """CSV from the binary stream FH (a file, or an HTTP body), in chunks of whole lines."""
    names = _csv_header(source, fh.readline())
    first_line = 2
    while True:
        chunk = fh.read(CHUNK_BYTES)
        if not chunk:
            return
        if not chunk.endswith(b"\n"):
            chunk += fh.readline()
        invalid: list[str] = []

        def on_invalid(row, invalid=invalid):
            invalid.append(row.text)
            return "skip"

        table = pacsv.read_csv(
            io.BytesIO(chunk),
            read_options=pacsv.ReadOptions(column_names=names, encoding=source.encoding, block_size=len(chunk) + 1),
            # One physical line is one row, so line numbers stay exact; empty lines are kept
            # (as rows of nulls) so they count, and fail validation like any missing value.
            parse_options=pacsv.ParseOptions(
                delimiter=source.delimiter,
                newlines_in_values=False,
                ignore_empty_lines=False,
                invalid_row_handler=on_invalid,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.binary() for name in names},
                null_values=[""],
                strings_can_be_null=True,
            ),
        )
        n_lines = chunk.count(b"\n")
        lines = np.arange(first_line, first_line + n_lines, dtype=np.int64)
        rejects = []
        if invalid:
            bad = _locate_invalid(chunk, invalid)
            rejects = [
                Reject(
                    int(lines[i]),
                    f"wrong number of columns: expected {len(names)}",
                    {"line": invalid[k]},
                )
                for k, i in enumerate(bad)
            ]
            lines = np.delete(lines, bad)
        if len(lines) != table.num_rows:
            raise SourceError(f"source '{source.id}': {name}: could not align rows with lines near line {first_line}")
        first_line += n_lines
        yield from _slices(RawBatch(table, lines, rejects, fh.tell() / size), batch_rows)


def _locate_invalid(chunk: bytes, texts: list[str]) -> list[int]:
    """Indices of the lines of CHUNK that the CSV parser refused (rare: a slow path is fine)."""
    found, want = [], 0
    for index, raw in enumerate(chunk.split(b"\n")):
        if want == len(texts):
            break
        line = raw.rstrip(b"\r").decode("utf-8", "replace")
        if line == texts[want] or raw.decode("utf-8", "replace") == texts[want]:
            found.append(index)
            want += 1
    if want != len(texts):
        raise SourceError("could not locate the lines the CSV parser rejected")
    return found


def _read_parquet(source: SourceConfig, path: Path, batch_rows: int) -> Iterator[RawBatch]:
    parquet = pq.ParquetFile(path)
    total = parquet.metadata.num_rows or 1
    record = 1
    for batch in parquet.iter_batches(batch_size=batch_rows):
        lines = np.arange(record, record + batch.num_rows, dtype=np.int64)
        record += batch.num_rows
        yield RawBatch(pa.Table.from_batches([batch]), lines, fraction=(record - 1) / total)


def _read_jsonl(source: SourceConfig, path: Path, batch_rows: int) -> Iterator[RawBatch]:
    with path.open("rb") as fh:
        yield from read_jsonl_stream(source, fh, path.stat().st_size or 1, batch_rows)


def read_jsonl_stream(source: SourceConfig, fh: BinaryIO, size: int, batch_rows: int) -> Iterator[RawBatch]:
    """JSON Lines from the binary stream FH, BATCH_ROWS records at a time."""
    line_no = 0
    while True:
        records, lines, rejects = [], [], []
        for raw in fh:
            line_no += 1
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode(source.encoding))
            except UnicodeDecodeError:
                reason = f"bad encoding (not {source.encoding})"
                rejects.append(Reject(line_no, reason, {"line": raw.decode(errors="replace")}))
                continue
            except json.JSONDecodeError as exc:
                reason = f"invalid JSON: {exc.msg}"
                rejects.append(Reject(line_no, reason, {"line": raw.decode(errors="replace")}))
                continue
            if not isinstance(record, dict):
                rejects.append(Reject(line_no, "record is not a JSON object", {"line": raw.decode()}))
                continue
            records.append(record)
            lines.append(line_no)
            if len(records) >= batch_rows:
                break
        if not records and not rejects:
            return
        yield RawBatch(records_table(records), np.array(lines, dtype=np.int64), rejects, fh.tell() / size)


def stream(source: SourceConfig, registry: Registry, batch_rows: int, resume: dict | None) -> Iterator[Piece]:
    """Every batch of every file SOURCE matches, after the position RESUME (a committed checkpoint)."""
    files = registry.files(source)
    sizes = [p.stat().st_size for p in files]
    total = sum(sizes) or 1
    start_file, start_batch = (resume or {}).get("file", 0), (resume or {}).get("batch", 0)
    for f_index, path in enumerate(files):
        if f_index < start_file:
            continue
        label = registry.display_path(path)
        before = sum(sizes[:f_index])
        for b_index, raw in enumerate(read_file(source, path, batch_rows)):
            if f_index == start_file and b_index < start_batch:
                continue
            progress = (before + raw.fraction * sizes[f_index]) / total
            yield Piece(raw, label, {"file": f_index, "batch": b_index + 1}, progress)
