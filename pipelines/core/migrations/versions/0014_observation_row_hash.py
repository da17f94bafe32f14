"""observations.row_hash: a hash of each row's key and content, written by the loader

A re-run compares the rows it reads with the hashes already stored and sends only rows whose content
differs through the merge (`pipelines.ingestion.load`). Rows written before this revision have no hash
and are merged as before; the merge gives them one.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03 15:30:00
"""

from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None

# A first load interrupted before its end leaves its table detached from `observations`
# (`pipelines.ingestion.partitions`): it needs the column too, or it could never be attached.
_DETACHED_TOO = """
DO $$
DECLARE t regclass;
BEGIN
    FOR t IN SELECT c.oid FROM pg_class c LEFT JOIN pg_inherits i ON i.inhrelid = c.oid
             WHERE c.relkind = 'r' AND c.relname LIKE 'observations\\_%' AND i.inhparent IS NULL
               AND c.relnamespace = current_schema()::regnamespace
    LOOP
        EXECUTE format('ALTER TABLE %s ADD COLUMN IF NOT EXISTS row_hash bigint', t);
    END LOOP;
END $$
"""


def upgrade() -> None:
    op.execute("ALTER TABLE observations ADD COLUMN row_hash bigint")
    op.execute(_DETACHED_TOO)


def downgrade() -> None:
    op.execute("ALTER TABLE observations DROP COLUMN row_hash")
