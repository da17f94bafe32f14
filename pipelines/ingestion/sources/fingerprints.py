"""What a source's files were when they were last loaded whole: size, modification time, a SHA-256 of
the content and a hash of the source's declaration. A file whose fingerprint is unchanged is skipped
by the next run (unless forced): re-running a schedule over files that did not change costs a stat and
a hash per file, not a load. A new declaration (another key, other rules) reads every file again.

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
    """The fingerprints a source's files had at their last whole load, and the files this run skips."""

    declaration: str
    known: dict[str, Fingerprint]
    force: bool = False  # read every file, and record what each was
    skipped: list[str] = field(default_factory=list)

    def changed(self, label: str, path: Path) -> Fingerprint | None:
        """PATH's fingerprint now, or None (and the file noted as skipped) if it is as last loaded."""
        now = take(path, self.declaration)
        if not self.force and now == self.known.get(label):
            self.skipped.append(label)
            return None
        return now


def declaration_of(source) -> str:
    return hashlib.sha256(source.model_dump_json().encode()).hexdigest()


def take(path: Path, declaration: str) -> Fingerprint:
    """PATH's fingerprint. The content is always hashed (about a twentieth of a second per 55 MB here):
    a copy that keeps size and time (`cp -p`, `rsync -t`) is still told apart."""
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return Fingerprint(stat.st_size, stat.st_mtime_ns, digest.hexdigest(), declaration)


def seen(source, force: bool = False) -> Seen:
    with get_engine().connect() as conn:
        rows = conn.execute(text("SELECT path, size, mtime_ns, sha256, declaration FROM source_files "
                                 "WHERE source = :s"), {"s": source.id}).all()
    return Seen(declaration_of(source), {path: Fingerprint(size, mtime, sha, decl)
                                         for path, size, mtime, sha, decl in rows}, force)


def record(conn: Connection, source_id: str, label: str, print_: Fingerprint, job_id: str) -> None:
    """Note LABEL as loaded whole with PRINT_, in the transaction of its last batch."""
    conn.execute(
        "INSERT INTO source_files (source, path, size, mtime_ns, sha256, declaration, job_id, loaded_at) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, now()) ON CONFLICT (source, path) DO UPDATE SET "
        "size = EXCLUDED.size, mtime_ns = EXCLUDED.mtime_ns, sha256 = EXCLUDED.sha256, "
        "declaration = EXCLUDED.declaration, job_id = EXCLUDED.job_id, loaded_at = EXCLUDED.loaded_at",
        (source_id, label, print_.size, print_.mtime_ns, print_.sha256, print_.declaration, job_id))
