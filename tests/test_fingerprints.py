"""Fingerprints of source files: when a grown file may be read from where its last load ended."""

import codecs
import gzip

import numpy as np
import pytest

from pipelines.ingestion.sources import fingerprints
from pipelines.ingestion.sources.fingerprints import Seen, Start, scan
from pipelines.ingestion.sources.lines import split_lines

DECLARATION = "d" * 64


def seen_after(path, content: bytes, *, whole: bool = True, past_cursor: bool = False, force: bool = False,
               declaration: str = DECLARATION) -> Seen:
    """What a run knows once PATH held CONTENT when last read, under DECLARATION."""
    path.write_bytes(content)
    last, _ = scan(path, declaration)
    return Seen(DECLARATION, {"f": (last, whole)}, force=force, past_cursor=past_cursor)


def lines_before(data: bytes, offset: int) -> int:
    """How many lines the line splitter the readers use counts before OFFSET (a line's start)."""
    starts, _ = split_lines(data)
    return int(np.searchsorted(starts, offset))


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 8, 64, 1 << 20])
def test_a_grown_file_is_read_from_the_line_after_its_last_load_whatever_its_line_breaks(tmp_path, monkeypatch,
                                                                                         chunk):
    monkeypatch.setattr(fingerprints, "CHUNK", chunk)  # "\r\n" split between two reads, at every place
    old = b"id,px\r\na,1\rb,2\n\nc,\"x\r\ny\"\r\n"
    path = tmp_path / "f.csv"
    seen = seen_after(path, old)
    path.write_bytes(old + b"d,4\r\ne,5\n")
    reading = seen.changed("f", path, "csv")
    assert reading is not None and reading.start == Start(len(old), lines_before(old + b"d,4", len(old)) + 1)
    assert reading.start.line == 7  # "c" spans lines 5 and 6
    assert reading.fingerprint == scan(path, DECLARATION)[0]


def test_an_unchanged_file_is_skipped_and_one_rewritten_or_cut_short_is_read_whole(tmp_path):
    path = tmp_path / "f.csv"
    seen = seen_after(path, b"id,px\na,1\n")
    assert seen.changed("f", path, "csv") is None and seen.skipped == ["f"]
    for content in (b"id,px\na,2\nb,3\n",  # an earlier line changed
                    b"id,px\n",  # shorter
                    b"id,px\na,1"):  # the same length or less: no new line
        path.write_bytes(content)
        reading = seen.changed("f", path, "csv")
        assert reading is not None and reading.start is None, content


@pytest.mark.parametrize("old, new, line_format", [
    (b"id,px\na,1", b"id,px\na,1\nb,2\n", "csv"),  # the last load ended inside a line: it goes on now
    (b"id,px\na,1\r", b"id,px\na,1\r\nb,2\n", "csv"),  # a "\r" that a "\n" now follows: one break, not two
    (b"id,note\na,\"5\n", b"id,note\na,\"5\nb\"\n", "csv"),  # inside a quoted field: the new line is part of it
    (b"id,px\na,1\n", b"id,px\na,1\nb,2\n", None),  # a format read whole (Parquet, a JSON document)
])
def test_a_file_is_read_whole_unless_its_last_load_ended_a_record(tmp_path, old, new, line_format):
    path = tmp_path / "f.csv"
    seen = seen_after(path, old)
    path.write_bytes(new)
    reading = seen.changed("f", path, line_format)
    assert reading is not None and reading.start is None


def test_json_lines_may_hold_an_odd_number_of_quotes_before_the_new_lines(tmp_path):
    old = b'{"id": "a", "note": "5\\" pipe"}\n'
    path = tmp_path / "f.jsonl"
    seen = seen_after(path, old)
    path.write_bytes(old + b'{"id": "b"}\n')
    assert seen.changed("f", path, "jsonl").start == Start(len(old), 2)
    assert seen.changed("f", path, "csv").start is None  # in CSV, that quote opens a field


def test_compressed_and_utf16_files_are_read_whole(tmp_path):
    path = tmp_path / "f.csv"
    old = gzip.compress(b"id,px\na,1\n", mtime=0)
    seen = seen_after(path, old)
    path.write_bytes(old + gzip.compress(b"b,2\n", mtime=0))  # a gzip member appended: still one stream
    assert seen.changed("f", path, "csv").start is None
    for bom, codec in ((codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")):
        old = bom + "id,px\na,1\n".encode(codec)
        seen = seen_after(path, old)
        path.write_bytes(old + "b,2\n".encode(codec))
        assert seen.changed("f", path, "csv").start is None


def test_only_a_run_that_could_skip_the_file_reads_just_its_new_lines(tmp_path):
    """The rule of a skip: any incremental run, or a full one after a whole read, under the same declaration."""
    path = tmp_path / "f.csv"
    old, new = b"id,px\na,1\n", b"id,px\na,1\nb,2\n"
    cases = [
        (dict(whole=False, past_cursor=True), True),  # incremental after incremental
        (dict(whole=True, past_cursor=False), True),  # full after full
        (dict(whole=False, past_cursor=False), False),  # full after incremental: earlier rows may be revised
        (dict(whole=True, force=True), False),
        (dict(whole=True, declaration="e" * 64), False),  # declared otherwise since
    ]
    for options, from_the_end in cases:
        seen = seen_after(path, old, **options)
        path.write_bytes(new)
        reading = seen.changed("f", path, "csv")
        assert reading is not None and (reading.start == Start(len(old), 3)) is from_the_end, options
