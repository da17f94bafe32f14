"""source_files: what each file of a source was when it was last loaded whole

A run skips a file whose size, modification time, content hash and source declaration are what they
were at its last whole load (`pipelines.ingestion.sources.fingerprints`).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03 14:00:00
"""

from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
CREATE TABLE source_files (
    source text NOT NULL,
    path text NOT NULL,
    size bigint NOT NULL,
    mtime_ns bigint NOT NULL,
    sha256 text NOT NULL,
    declaration text NOT NULL,
    job_id text,
    loaded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, path)
);
""")


def downgrade() -> None:
    op.execute("DROP TABLE source_files")
