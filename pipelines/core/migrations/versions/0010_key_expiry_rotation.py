"""API keys that expire, and rotation with a grace period

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-26 20:25:00
"""

from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
ALTER TABLE api_keys ADD COLUMN expires_at timestamptz,
                     ADD COLUMN previous_hash text,
                     ADD COLUMN previous_valid_until timestamptz;
CREATE UNIQUE INDEX ix_api_keys_previous_hash ON api_keys (previous_hash) WHERE previous_hash IS NOT NULL;
""")


def downgrade() -> None:
    op.execute("DROP INDEX ix_api_keys_previous_hash; "
               "ALTER TABLE api_keys DROP COLUMN expires_at, DROP COLUMN previous_hash, DROP COLUMN previous_valid_until")
