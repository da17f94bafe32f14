"""source_files.whole: whether a file's last read took every row, or only those past the cursor

A fingerprint recorded by an incremental run let the next full run skip the file as "unchanged since
its last load", though rows before the cursor were never read: a revised row there (a corrected
settlement) never got in. A full run now skips only a file whose last read was whole. Fingerprints
recorded before this column are taken as not whole, so each file is read once more by the next full
run (its unchanged rows are told apart by their hashes and not written again).

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-04 17:20:00
"""

from alembic import op

revision = '0026'
down_revision = '0025'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE source_files ADD COLUMN whole boolean NOT NULL DEFAULT false")
    op.execute("ALTER TABLE source_files ALTER COLUMN whole DROP DEFAULT")


def downgrade() -> None:
    op.execute("ALTER TABLE source_files DROP COLUMN whole")
