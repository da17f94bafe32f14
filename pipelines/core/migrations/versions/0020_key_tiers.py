"""api_keys.tier: the rate-limit tier a key is in (basic, premium, unlimited, or as configured)

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-03 21:20:00
"""

from alembic import op

revision = '0020'
down_revision = '0019'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE api_keys ADD COLUMN tier text NOT NULL DEFAULT 'basic'")


def downgrade() -> None:
    op.execute("ALTER TABLE api_keys DROP COLUMN tier")
