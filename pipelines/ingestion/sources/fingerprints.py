"""What a source's files were when they were last read: size, modification time, a SHA-256 of the
content and a hash of the source's declaration, and whether that run took every row (`whole`) or only
those past the source's cursor. A file whose fingerprint is unchanged is skipped by the next run
(unless forced): re-running a schedule over files that did not change costs a stat and a hash per file,
not a load. A new declaration (another key, other rules) reads every file again.

An incremental run may skip any unchanged file: what it would load (rows past the cursor) was loaded
when the file was last read, whatever that run's mode, since the cursor only moves on. A full run skips
only a file last read whole: after an incremental run, a row before the cursor may have been revised
(a corrected settlement price) and never loaded, and a full run is how it gets in.

The fingerprint is taken before a file is read, and recorded in the transaction of its last batch: a
file that changes while it is read, or a load cut short, is read again next time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from psycopg import Connection
from sqlalchemy import text

from pipelines.core.db import get_engine

CHUNK = 1 << 20


@dataclass(frozen=True)
class Fingerprint:
    size: int
    mtime_ns: int
    sha256: str
    declaration: str


@dataclass
class Seen:
    """The fingerprints a source's files had when last read, and the files this run skips."""

    declaration: str
    known: dict[str, tuple[Fingerprint, bool]]  # each file's fingerprint, and whether it was read whole
    force: bool = False  # read every file, and record what each was
    past_cursor: bool = False  # this run takes only rows past the source's cursor
    skipped: list[str] = field(default_factory=list)

    def changed(self, label: str, path: Path) -> Fingerprint | None:
        """PATH's fingerprint now, or None (and the file noted as skipped) if this run need not read it."""
        now = take(path, self.declaration)
        last, whole = self.known.get(label, (None, False))
        if not self.force and now == last and (whole or self.past_cursor):
            self.skipped.append(label)
            return None
        return now


def declaration_of(source) -> str:
    """A hash of how SOURCE is declared. Settings left at their defaults are out of it, so a release
    that adds a setting (with a default that reads files as before) does not make every file new."""
    return hashlib.sha256(source.model_dump_json(exclude_defaults=True).encode()).hexdigest()


def take(path: Path, declaration: str) -> Fingerprint:
    """PATH's fingerprint. The content is always hashed (about a twentieth of a second per 55 MB here):
    a copy that keeps size and time (`cp -p`, `rsync -t`) is still told apart."""
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return Fingerprint(stat.st_size, stat.st_mtime_ns, digest.hexdigest(), declaration)


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
