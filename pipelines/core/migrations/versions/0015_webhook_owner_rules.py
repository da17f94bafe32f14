"""who an endpoint may receive from: two SQL functions the relay and each attempt share

- `ingot_owner_gone(owner)`: the endpoint's owner can no longer act (a key revoked or expired, a
  user disabled). An endpoint with no owner (made by the operator), or whose owner has no row (made
  with authentication disabled), has none to lose.
- `ingot_sees_job(endpoint_owner, job_kind, job_owner)`: an export's events name its filters and
  its file, so they go to its owner's endpoints and to admins' (and the operator's) only; every other
  job's events go to every endpoint subscribed.

Plain SQL functions, so the planner inlines them into the statements that call them.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-03 17:30:00
"""

from alembic import op

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
CREATE FUNCTION ingot_owner_gone(owner text) RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM api_keys k WHERE k.id = owner
                   AND (k.revoked_at IS NOT NULL OR k.expires_at <= now()))
        OR EXISTS (SELECT 1 FROM users u WHERE u.id = owner AND u.disabled_at IS NOT NULL)
$$;
CREATE FUNCTION ingot_sees_job(endpoint_owner text, job_kind text, job_owner text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT job_kind <> 'export' OR endpoint_owner IS NULL OR endpoint_owner = job_owner
        OR EXISTS (SELECT 1 FROM api_keys k WHERE k.id = endpoint_owner AND 'admin' = ANY(k.scopes))
        OR EXISTS (SELECT 1 FROM users u WHERE u.id = endpoint_owner AND 'admin' = ANY(u.scopes))
$$;
""")


def downgrade() -> None:
    op.execute("DROP FUNCTION ingot_sees_job(text, text, text); DROP FUNCTION ingot_owner_gone(text)")
