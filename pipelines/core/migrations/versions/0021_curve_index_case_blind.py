"""Indexes for the case-blind curve filters: `asset_class`, `iso` and `location` match whatever the
letter case (`lower(column) = lower(:value)`), which the plain (iso, location) index cannot serve.

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-03 23:45:00
"""

from alembic import op

revision = '0021'
down_revision = '0020'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX ix_curve_index_lower_iso ON curve_index (lower(iso), lower(location))")
    op.execute("CREATE INDEX ix_curve_index_lower_location ON curve_index (lower(location))")
    op.execute("CREATE INDEX ix_curve_index_lower_asset_class ON curve_index (lower(asset_class))")
    op.execute("DROP INDEX ix_curve_index_location")  # every filter is case-blind now: nothing uses it


def downgrade() -> None:
    op.execute("CREATE INDEX ix_curve_index_location ON curve_index (iso, location)")
    op.execute("DROP INDEX ix_curve_index_lower_asset_class, ix_curve_index_lower_location, "
               "ix_curve_index_lower_iso")
