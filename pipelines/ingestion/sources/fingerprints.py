"""What a source's files were when they were last read: size, modification time, a SHA-256 of the
content and a hash of the source's declaration, and whether that run took every row (`whole`) or only
those past the source's cursor. A file whose fingerprint is unchanged is skipped by the next run
(unless forced): re-running a schedule over files that did not change costs a stat and a hash per file,
not a load. A new declaration (another key, other rules) reads every file again.

An incremental run may skip any unchanged file: what it would load (rows past the cursor) was loaded
when the file was last read, whatever that run's mode, since the cursor only moves on. A full run skips
only a file last read whole: after an incremental run, a row before the cursor may have been revised
(a corrected settlement price) and never loaded, and a full run is how it gets in.

A file that only grew (a daily feed appended to: its first bytes hash as the whole file did when last
read) is read from where it ended, for a line format (CSV, JSON Lines) that is neither compressed nor
UTF-16, when that read ended a line outside any quoted field (an even number of quotes before it).
What came before was read, under the same declaration, as it is now, so only the new lines can add or
change a row: a run on a file grown by 1% reads 1% of it (`Start`). The same rule as a skip decides
whether it may: any incremental run, or a full one after a whole read.

The fingerprint is taken before a file is read, and recorded in the transaction of its last batch: a
file that changes while it is read, or a load cut short, is read again next time.
"""

from __future__ import annotations

import codecs
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from psycopg import Connection
from sqlalchemy import text

from pipelines.core.db import get_engine

CHUNK = 1 << 20
# First bytes of a file that is not read line by line from any offset: gzip, UTF-16 by its byte order mark.
_NOT_FROM_AN_OFFSET = (b"\x1f\x8b", codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


@dataclass(frozen=True)
class Fingerprint:
    size: int
    mtime_ns: int
    sha256: str
    declaration: str


@dataclass(frozen=True)
class Start:
    """Where a grown file's new content begins: byte OFFSET, the first byte of line LINE (1-based)."""

    offset: int
    line: int


@dataclass(frozen=True)
class Reading:
    """A file this run reads: its FINGERPRINT now, and START when only what follows it need be read."""

    fingerprint: Fingerprint
    start: Start | None = None


@dataclass
class Seen:
    """The fingerprints a source's files had when last read, and the files this run skips."""

    declaration: str
    known: dict[str, tuple[Fingerprint, bool]]  # each file's fingerprint, and whether it was read whole
    force: bool = False  # read every file, and record what each was
    past_cursor: bool = False  # this run takes only rows past the source's cursor
    skipped: list[str] = field(default_factory=list)

    def changed(self, label: str, path: Path, line_format: str | None = None) -> Reading | None:
        """How this run reads PATH, or None (and the file noted as skipped) if it need not. LINE_FORMAT
        ("csv" or "jsonl"): the source's files may be read from a line's start, so one that only grew
        is read from where it ended (see the module's text)."""
        last, whole = self.known.get(label, (None, False))
        if last is None or self.force or not (whole or self.past_cursor):
            return Reading(scan(path, self.declaration)[0])
        grown = line_format is not None and last.declaration == self.declaration
        now, prefix = scan(path, self.declaration, last.size if grown else None, quotes=line_format == "csv")
        if now == last:
            self.skipped.append(label)
            return None
        if (prefix is not None and prefix.sha256 == last.sha256 and prefix.ends_a_line
                # A CSV quoted field may hold line breaks; a JSON string never does.
                and (prefix.quotes is None or prefix.quotes % 2 == 0)):
            return Reading(now, Start(last.size, prefix.lines + 1))
        return Reading(now)


@dataclass(frozen=True)
class Prefix:
    """A file's first bytes: their hash, how many lines they end, whether their last byte ends a line
    ("\n": a "\r" might pair with a "\n" after it), and how many double quotes they hold (None: not
    counted, for a format whose quotes never hold a line break)."""

    sha256: str
    lines: int
    ends_a_line: bool
    quotes: int | None


def declaration_of(source) -> str:
    """A hash of how SOURCE is declared. Settings left at their defaults are out of it, so a release
    that adds a setting (with a default that reads files as before) does not make every file new."""
    return hashlib.sha256(source.model_dump_json(exclude_defaults=True).encode()).hexdigest()


def scan(path: Path, declaration: str, prefix: int | None = None, quotes: bool = False
         ) -> tuple[Fingerprint, Prefix | None]:
    """PATH's fingerprint, and with PREFIX (a byte count below its size) what its first PREFIX bytes
    hold, in the same pass; their quotes counted if QUOTES (for CSV: counting them costs about what the
    hash does). The content is always hashed (about a twentieth of a second per 55 MB
    here): a copy that keeps size and time (`cp -p`, `rsync -t`) is still told apart."""
    stat = path.stat()
    digest = hashlib.sha256()
    if prefix is None or not 0 < prefix < stat.st_size:
        prefix = None
    at, lines, quoted, before, head_digest = 0, 0, 0 if quotes else None, b"", None
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            if at == 0 and chunk.startswith(_NOT_FROM_AN_OFFSET):
                prefix = None
            if prefix is not None and at < prefix:
                part = chunk[:prefix - at]
                lines += _lines_ended(part, before)
                if quoted is not None:
                    quoted += _count(part, b'"')
                before = part[-1:]
                digest.update(part)
                if at + len(chunk) >= prefix:
                    head_digest = digest.copy().hexdigest()
                    digest.update(chunk[len(part):])
            else:
                digest.update(chunk)
            at += len(chunk)
    print_ = Fingerprint(stat.st_size, stat.st_mtime_ns, digest.hexdigest(), declaration)
    if prefix is None or head_digest is None:
        return print_, None
    return print_, Prefix(head_digest, lines, before == b"\n", quoted)


def _count(data: bytes, byte: bytes) -> int:
    """How many times BYTE is in DATA: NumPy counts a byte four times as fast as `bytes.count`, and
    `in` (memchr) finds that there is none faster still."""
    return int(np.count_nonzero(np.frombuffer(data, np.uint8) == byte[0])) if byte in data else 0


def _lines_ended(data: bytes, before: bytes) -> int:
    """How many lines DATA ends, a line ending at "\n", "\r\n" or a bare "\r", and BEFORE the byte
    read before it (a "\r\n" split between two reads is one break)."""
    breaks = _count(data, b"\n")
    if b"\r" in data or before == b"\r":
        breaks += _count(data, b"\r") - data.count(b"\r\n") - (before == b"\r" and data.startswith(b"\n"))
    return breaks


def seen(source, force: bool = False, past_cursor: bool = False) -> Seen:
    with get_engine().connect() as conn:
        rows = conn.execute(text("SELECT path, size, mtime_ns, sha256, declaration, whole FROM source_files "
                                 "WHERE source = :s"), {"s": source.id}).all()
    return Seen(declaration_of(source), {path: (Fingerprint(size, mtime, sha, decl), whole)
                                         for path, size, mtime, sha, decl, whole in rows}, force, past_cursor)


def record(conn: Connection, source_id: str, label: str, print_: Fingerprint, whole: bool, job_id: str) -> None:
    """Note LABEL as read with PRINT_ (every row of it if WHOLE), in the transaction of its last batch."""
    conn.execute(
        "INSERT INTO source_files (source, path, size, mtime_ns, sha256, declaration, whole, job_id, loaded_at) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, now()) ON CONFLICT (source, path) DO UPDATE SET "
        "size = EXCLUDED.size, mtime_ns = EXCLUDED.mtime_ns, sha256 = EXCLUDED.sha256, "
        "declaration = EXCLUDED.declaration, whole = EXCLUDED.whole, job_id = EXCLUDED.job_id, "
        "loaded_at = EXCLUDED.loaded_at",
        (source_id, label, print_.size, print_.mtime_ns, print_.sha256, print_.declaration, whole, job_id))
