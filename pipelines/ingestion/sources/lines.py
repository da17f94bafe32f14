"""A byte stream as blocks of whole lines, whatever dialect the file came in.

Files from the world end their lines with `\\n`, `\\r\\n` or a bare `\\r`, may start with a UTF-8 byte
order mark, may be UTF-16 with one (Excel's "Unicode Text"), may be gzip-compressed, may be in a
single-byte encoding such as latin-1 or cp1252, may lack a line break on their last line, and may hold
a line far longer than any sane record. This module takes all of that off the parsers' hands: it reads
the stream in fixed-size chunks, unpacks gzip as it goes (detected by content, not by name), recodes
to UTF-8, and hands out blocks that hold only whole lines, each with its 1-based line number. A line
longer than the limit is never held whole: it becomes a reject carrying an excerpt, and reading skips
to its end.

Recoding keeps undecodable bytes as they are (`surrogateescape`), so a cell that holds one is not
valid UTF-8 afterwards, and validation quarantines that row saying which encoding it is not in.
"""

from __future__ import annotations

import codecs
import gzip
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, cast

import numpy as np

from pipelines.ingestion.sources.batches import Reject

EXCERPT_BYTES = 1024
GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = codecs.BOM_UTF8
_UTF8 = {"utf-8", "utf-8-sig"}
_NEWLINE = re.compile(rb"\r\n|\r|\n")


def check_encoding(encoding: str) -> str:
    """ENCODING if Ingot can read files in it: UTF-8, or a single-byte encoding that extends ASCII
    (so delimiters, quotes and line breaks are the same bytes in it); ValueError otherwise."""
    try:
        info = codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"unknown encoding {encoding!r}") from None
    if info.name in _UTF8:
        return encoding
    every_byte = bytes(range(256)).decode(info.name, "replace")
    if len(every_byte) != 256 or every_byte[:128] != bytes(range(128)).decode("ascii"):
        raise ValueError(f"encoding {encoding!r} is not supported: use UTF-8 or a single-byte encoding "
                         "such as latin-1 or cp1252")
    return encoding


def open_stream(fh: IO[bytes]) -> IO[bytes]:
    """FH, or a streaming decompressor over it when its content is gzip, and a recoder to UTF-8 when the
    content is UTF-16 by its byte order mark (Excel's "Unicode Text" and many Windows tools). FH must
    be seekable."""
    head = fh.read(2)
    fh.seek(0)
    stream = cast(IO[bytes], gzip.GzipFile(fileobj=fh, mode="rb")) if head == GZIP_MAGIC else fh
    bom = stream.read(2)
    stream.seek(0)
    return cast(IO[bytes], _FromUtf16(stream)) if bom in _UTF16_BOMS else stream


def stream_encoding(stream: IO[bytes], declared: str) -> str:
    """The encoding STREAM (from `open_stream`) gives its bytes in: UTF-8 when it was recoded from UTF-16
    (a byte order mark outranks a source's declared encoding), else DECLARED."""
    return "utf-8" if isinstance(stream, _FromUtf16) else declared


_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


class _FromUtf16:
    """A UTF-16 byte stream read as UTF-8, a chunk at a time (the byte order mark tells the order, and
    is dropped). Bytes that are not UTF-16 fail the read, as UnicodeDecodeError."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.decoder = codecs.getincrementaldecoder("utf-16")()
        self.pending = b""
        self.done = False

    def read(self, size: int = -1) -> bytes:
        while not self.done and (size < 0 or len(self.pending) < size):
            chunk = self.raw.read(max(size, 1 << 16) if size >= 0 else 1 << 20)
            self.done = not chunk
            self.pending += self.decoder.decode(chunk, final=self.done).encode("utf-8")
        if size < 0:
            size = len(self.pending)
        taken, self.pending = self.pending[:size], self.pending[size:]
        return taken


@dataclass
class Block:
    """Whole lines of UTF-8: line i is data[starts[i]:ends[i]] (its break left out) and is line
    numbers[i] of the input. FINAL: nothing follows this block."""

    data: bytes
    starts: np.ndarray
    ends: np.ndarray
    numbers: np.ndarray
    final: bool

    def __len__(self) -> int:
        return len(self.starts)

    def line(self, index: int) -> bytes:
        return self.data[self.starts[index]:self.ends[index]]

    def head(self, index: int) -> Block:
        """The lines before INDEX, as a block of their own (not final: more follows)."""
        end = int(self.starts[index]) if index < len(self) else len(self.data)
        return Block(self.data[:end], self.starts[:index], self.ends[:index], self.numbers[:index], False)

    def tail(self, index: int) -> Block:
        """The lines from INDEX on, as a block of their own."""
        offset = int(self.starts[index]) if index < len(self) else len(self.data)
        return Block(self.data[offset:], self.starts[index:] - offset, self.ends[index:] - offset,
                     self.numbers[index:], self.final)


def split_lines(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Where each line of DATA starts and where its content ends, for `\\n`, `\\r\\n` and bare `\\r`
    breaks alike; a last line without a break counts."""
    if not data:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    array = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(array == 10)
    if data.find(b"\r") < 0:
        breaks, content_ends = newlines + 1, newlines
    else:
        returns = np.flatnonzero(array == 13)
        follows = np.minimum(returns + 1, len(array) - 1)
        crlf = (returns + 1 < len(array)) & (array[follows] == 10)
        ends_at_newline = newlines - np.isin(newlines, returns[crlf] + 1)
        bare = returns[~crlf]
        breaks = np.concatenate([newlines + 1, bare + 1])
        content_ends = np.concatenate([ends_at_newline, bare])
        order = np.argsort(breaks, kind="stable")
        breaks, content_ends = breaks[order], content_ends[order]
    starts = np.concatenate([[0], breaks]).astype(np.int64)
    ends = content_ends.astype(np.int64)
    if starts[-1] < len(data):  # the last line has no break
        ends = np.concatenate([ends, [len(data)]])
    else:
        starts = starts[:-1]
    return starts, ends


def _last_break(buf: bytes, final: bool) -> int:
    """The end of the last complete line in BUF (0 if none). A `\\r` at the very end may be the first
    half of a `\\r\\n` still to come, so it does not end a line until the stream does."""
    newline = buf.rfind(b"\n")
    ret = buf.rfind(b"\r")
    if ret == len(buf) - 1 and not final:
        ret = buf.rfind(b"\r", 0, ret)
    return max(newline, ret) + 1


class LineStream:
    """Blocks of whole lines from a binary stream; see the module's text.

    A parser whose last record continues past a block hands its lines back with `push_back`; they
    come first in the next block. Lines longer than LIMIT bytes land in `rejects` instead. FIRST_LINE:
    the number of the stream's first line, when it starts inside a file (at a line's start).
    """

    def __init__(self, fh: IO[bytes], encoding: str, limit: int, chunk_bytes: int, first_line: int = 1):
        self.fh = fh
        self.first_line = first_line
        self.encoding = codecs.lookup(encoding).name
        self.limit = limit
        self.chunk_bytes = max(chunk_bytes, 1)
        self.rejects: list[Reject] = []
        self._carried: Block | None = None

    def push_back(self, block: Block, index: int) -> None:
        """Lines INDEX.. of BLOCK are an unfinished record: read them again with what follows."""
        self._carried = block.tail(index)

    def _read(self) -> bytes:
        chunk = self.fh.read(self.chunk_bytes)
        if chunk and self.encoding not in _UTF8:
            chunk = chunk.decode(self.encoding, "surrogateescape").encode("utf-8", "surrogateescape")
        return chunk

    def _too_long(self, line: int, head: bytes, length: int) -> None:
        excerpt = head[:min(EXCERPT_BYTES, self.limit)].decode("utf-8", "ignore")  # never the whole line
        self.rejects.append(Reject(line, f"line longer than {self.limit} bytes ({length} bytes): not loaded",
                                   {"excerpt": excerpt, "bytes": length}))

    def _skip_line(self, buf: bytes, line: int) -> bytes:
        """BUF starts a line longer than the limit: note it, read on to its end, and return what follows."""
        head, length = buf[:EXCERPT_BYTES], 0
        while True:
            found = _NEWLINE.search(buf)
            if found is not None and (found.group() != b"\r" or found.end() < len(buf)):
                length += found.start()
                self._too_long(line, head, length)
                return buf[found.end():]
            chunk = self._read()
            if not chunk:
                length += len(buf.rstrip(b"\r"))
                self._too_long(line, head, length)
                return b""
            keep = buf[-1:] if buf.endswith(b"\r") else b""  # a "\r" that may pair with a "\n"
            length += len(buf) - len(keep)
            buf = keep + chunk

    def blocks(self) -> Iterator[Block]:
        partial, line, first = b"", self.first_line, self.first_line == 1
        while True:
            chunk = self._read()
            if first and chunk.startswith(UTF8_BOM) and self.encoding in _UTF8:
                chunk = chunk[len(UTF8_BOM):]
            first = False
            final = not chunk
            buf = partial + chunk
            cut = len(buf) if final else _last_break(buf, final)
            if cut == 0 and not final:
                if len(buf) > self.limit:
                    buf = self._skip_line(buf, line)
                    line += 1
                partial = buf
                continue
            data, partial = buf[:cut], buf[cut:]
            starts, ends = split_lines(data)
            numbers = np.arange(line, line + len(starts), dtype=np.int64)
            line += len(starts)
            block = self._without_long_lines(Block(data, starts, ends, numbers, final))
            block = self._after_carried(block)
            if len(block) or final:
                yield block
            if final:
                return

    def _without_long_lines(self, block: Block) -> Block:
        long = (block.ends - block.starts) > self.limit
        if not long.any():
            return block
        for index in np.flatnonzero(long):
            start, end = int(block.starts[index]), int(block.ends[index])
            self._too_long(int(block.numbers[index]), block.data[start:min(end, start + EXCERPT_BYTES)], end - start)
        keep = np.flatnonzero(~long)
        breaks = np.concatenate([block.starts[1:], [len(block.data)]])
        pieces = [block.data[block.starts[i]:breaks[i]] for i in keep]
        lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        ends = starts + (block.ends[keep] - block.starts[keep])
        return Block(b"".join(pieces), starts, ends, block.numbers[keep], block.final)

    def _after_carried(self, block: Block) -> Block:
        """BLOCK behind the lines a parser handed back; a record that grew past the limit is dropped."""
        carried, self._carried = self._carried, None
        if carried is None:
            return block
        if len(carried.data) > self.limit:
            self._too_long(int(carried.numbers[0]), carried.data[:EXCERPT_BYTES], len(carried.data))
            return block
        shift = len(carried.data)
        return Block(carried.data + block.data, np.concatenate([carried.starts, block.starts + shift]),
                     np.concatenate([carried.ends, block.ends + shift]),
                     np.concatenate([carried.numbers, block.numbers]), block.final)
