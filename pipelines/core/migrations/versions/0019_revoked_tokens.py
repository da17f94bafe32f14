"""revoked_tokens: bearer tokens logged out before they expired

`POST /auth/logout` records the token's id until it would have expired; every API process reads it
with the user on each request, so the token is refused everywhere at once.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-03 21:10:00
"""

from alembic import op

revision = '0019'
down_revision = '0018'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE revoked_tokens (jti text PRIMARY KEY, expires_at timestamptz NOT NULL)")


def downgrade() -> None:
    op.execute("DROP TABLE revoked_tokens")
