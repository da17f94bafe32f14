"""Quarantine: each bad row held once, with every run that met it, until a run finds it fixed.

An entry is identified by its source, file, line and a hash of its raw content (PostgreSQL's
canonical jsonb text, hashed in SQL so every writer agrees). A run that meets an entry again counts
the sighting (`times_seen`, `last_seen_job_id`) instead of adding a copy; a run that reads that line
and finds it good, or finds different content there, marks the entry resolved. Which runs met which
entry is kept in `quarantine_sightings`, so one run's rejects can still be listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from pipelines.core.db import get_engine
from pipelines.core.models import QuarantineRow, QuarantineSighting
from pipelines.core.pagination import Keyset
from pipelines.ingestion.sources.batches import Reject

State = Literal["unresolved", "resolved", "all"]

_RECORD = (
    "WITH incoming AS (SELECT * FROM unnest(%(lines)s::bigint[], %(reasons)s::text[], %(raws)s::jsonb[]) "
    "                  AS t(line, reason, raw)), "
    "upserted AS (INSERT INTO quarantine (source, job_id, file, line, reason, raw, raw_hash, last_seen_job_id, "
    "                                     times_seen, created_at) "
    "  SELECT %(source)s, %(job)s, %(file)s, line, reason, raw, "
    "         encode(sha256(convert_to(raw::text, 'UTF8')), 'hex'), %(job)s, 1, now() FROM incoming "
    "  ON CONFLICT (source, file, line, raw_hash) DO UPDATE SET "
    "    times_seen = quarantine.times_seen "
    "                 + (quarantine.last_seen_job_id IS DISTINCT FROM EXCLUDED.last_seen_job_id)::int, "
    "    last_seen_job_id = EXCLUDED.last_seen_job_id, reason = EXCLUDED.reason, "
    "    resolved_at = NULL, resolved_by_job_id = NULL "
    "  RETURNING id) "
    "INSERT INTO quarantine_sightings (job_id, quarantine_id) SELECT %(job)s, id FROM upserted "
    "ON CONFLICT DO NOTHING"
)
_RESOLVE = (
    "UPDATE quarantine SET resolved_at = now(), resolved_by_job_id = %(job)s "
    "WHERE source = %(source)s AND file IS NOT DISTINCT FROM %(file)s AND line = ANY(%(lines)s) "
    "AND resolved_at IS NULL AND last_seen_job_id IS DISTINCT FROM %(job)s"
)


@dataclass
class Book:
    """One run's quarantine for one source: what it meets is recorded, what it finds fixed resolved.

    Open entries' lines are read once when the run starts, so a batch asks the database to resolve
    only lines that have an open entry (most runs meet none)."""

    source: str
    job_id: str
    open_lines: dict[str | None, np.ndarray] = field(default_factory=dict)

    @classmethod
    def open(cls, source: str, job_id: str) -> Book:
        with get_engine().connect() as conn:
            rows = conn.execute(text(
                "SELECT file, array_agg(line) FROM quarantine WHERE source = :s AND resolved_at IS NULL "
                "AND line IS NOT NULL GROUP BY file"), {"s": source}).all()
        return cls(source, job_id, {file: np.unique(np.array(lines, dtype=np.int64)) for file, lines in rows})

    def record(self, conn: psycopg.Connection, file: str | None, rejects: list[Reject], seen: np.ndarray) -> None:
        """In the caller's transaction: hold REJECTS (met in FILE) and resolve open entries for the
        lines SEEN (every line this batch read, good or bad) that this run did not meet again."""
        if rejects:
            unique = list({r.line: r for r in rejects}.values())
            conn.execute(_RECORD, {
                "source": self.source, "job": self.job_id, "file": file,
                "lines": [r.line for r in unique], "reasons": [r.reason for r in unique],
                "raws": [Jsonb(r.raw) for r in unique],
            })
        known = self.open_lines.get(file)
        if known is None or not len(known):
            return
        lines = np.intersect1d(np.concatenate([seen, [r.line for r in rejects]]).astype(np.int64), known)
        if len(lines):
            conn.execute(_RESOLVE, {"source": self.source, "file": file, "job": self.job_id, "lines": lines.tolist()})


OLDEST_FIRST = Keyset((QuarantineRow.id,))


def listing(session: Session, *, source: str | None, job_id: str | None, state: State, limit: int,
            cursor: str | None) -> tuple[list[QuarantineRow], str | None]:
    """Entries oldest first, filtered; the page and the cursor to the next. BadCursor if CURSOR is not ours."""
    query = select(QuarantineRow)
    if source:
        query = query.where(QuarantineRow.source == source)
    if job_id:
        met = select(QuarantineSighting.quarantine_id).where(QuarantineSighting.job_id == job_id)
        query = query.where(QuarantineRow.id.in_(met))
    if state == "unresolved":
        query = query.where(QuarantineRow.resolved_at.is_(None))
    elif state == "resolved":
        query = query.where(QuarantineRow.resolved_at.is_not(None))
    return OLDEST_FIRST.page(session, query, cursor, limit)
