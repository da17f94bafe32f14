"""Testing a source: connect, read the first few rows through validation, count when cheap. Writes
nothing."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from pipelines.ingestion.ingest import pieces
from pipelines.ingestion.sources.lines import GZIP_MAGIC
from pipelines.ingestion.sources.registry import Registry, SourceConfig, SourceContentError, SourceError
from pipelines.ingestion.validate import validate

SAMPLE_ROWS = 5
COUNT_LIMIT_BYTES = 256 * 1024 * 1024  # counting lines past this is not "cheap"


def _sample(source: SourceConfig, registry: Registry) -> tuple[list[dict], list[dict]]:
    stream = pieces(source, registry, SAMPLE_ROWS, None, None)
    try:
        piece = next(iter(stream), None)
    finally:
        close = getattr(stream, "close", None)
        if close:
            close()
    if piece is None:
        return [], []
    valid = validate(source, piece.raw)
    rows = []
    for i in range(min(SAMPLE_ROWS, valid.num_rows)):
        fields = {k: v[i].as_py() for k, v in valid.fields.items()}
        rows.append({"id": valid.ids[i].as_py(), "timestamp": fields.get("timestamp"), "value": fields.get("value"),
                     "metadata": {k: v[i].as_py() for k, v in valid.metadata.items()}})
    rejects = [{"line": r.line, "reason": r.reason, "raw": r.raw} for r in valid.rejects[:SAMPLE_ROWS]]
    return rows, rejects


def _count_lines(path: Path) -> int:
    lines, last = 0, b"\n"
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


def _is_gzip(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(2) == GZIP_MAGIC


def _total(source: SourceConfig, registry: Registry) -> int | None:
    if source.type != "file":
        return None
    files = registry.files(source)
    if source.format == "parquet":
        return sum(pq.ParquetFile(p).metadata.num_rows for p in files)
    if sum(p.stat().st_size for p in files) > COUNT_LIMIT_BYTES or any(_is_gzip(p) for p in files):
        return None  # not cheap to know
    if source.format == "json":
        return None  # a document's records are known only once it is parsed
    before = 1 + source.skip_lines if source.format == "csv" else 0  # the header, and what is above it
    return sum(max(_count_lines(p) - before, 0) for p in files)


def probe(registry: Registry, source_id: str) -> dict:
    """What `POST /sources/{id}/test` answers. KeyError for an unknown source."""
    result = {"connected": False, "sample_data": [], "sample_rejects": [], "total_records": None, "error": None}
    try:
        source = registry.get(source_id)
        # One quick try: a probe reports an unreachable source instead of waiting out its retries.
        source = source.model_copy(update={"retries": 0})
        rows, rejects = _sample(source, registry)
        result.update(connected=True, sample_data=rows, sample_rejects=rejects, total_records=_total(source, registry))
    except SourceError as exc:
        result["error"] = str(exc)
        result["connected"] = isinstance(exc, SourceContentError)  # reached, but its content is bad
    return result
