"""A job's end writes its webhook event only when some endpoint subscribes to the event's type

Every end wrote an event row (its payload, three indexes, the statement trigger's NOTIFY), and every
one woke the outbox listener for a relay of three statements, whether or not any endpoint would ever
receive it: about 1.1 ms of a trivial job's 8 ms of CPU (0.8 ms of PostgreSQL's, the fan-out planned
afresh at each call, and 0.35 ms of the webhooks worker's), on an install with no webhooks. Now the row is
written only if an enabled endpoint that is not deleted subscribes to the event's type when the job
ends (which endpoints may see the job is still the relay's to decide, as before). An endpoint receives
the events of jobs that end after it is created; before, it could also get those of jobs that ended
in the few milliseconds before it, until the relay had run.

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-05 00:30:00
"""

from alembic import op

revision = '0027'
down_revision = '0026'
branch_labels = None
depends_on = None

_BEFORE = """
CREATE OR REPLACE FUNCTION ingot_job_ended() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    event_type text;
BEGIN
    IF NEW.state IN ('succeeded', 'failed', 'cancelled') AND OLD.state NOT IN ('succeeded', 'failed', 'cancelled') THEN
        IF NEW.state = 'cancelled' THEN
            event_type := 'job.cancelled';
        ELSE
            event_type := CASE NEW.kind WHEN 'scenario_run' THEN 'scenario.run' ELSE NEW.kind END
                          || CASE NEW.state WHEN 'succeeded' THEN '.completed' ELSE '.failed' END;
        END IF;
        INSERT INTO webhook_events (id, type, job_id, payload, created_at)
        VALUES (
            'msg_' || md5(NEW.id || ':' || event_type), event_type, NEW.id,
            jsonb_build_object(
                'id', NEW.id, 'kind', NEW.kind, 'state', NEW.state, 'progress', NEW.progress,
                'records_processed', NEW.records_processed, 'records_failed', NEW.records_failed,
                'params', NEW.params, 'result', NEW.result, 'error', NEW.error, 'sources', to_jsonb(NEW.sources),
                'created_at', to_char(NEW.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                'started_at', to_char(NEW.started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                'finished_at', to_char(NEW.finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                'request_id', NEW.request_id, 'celery_task_id', NEW.celery_task_id, 'attempts', NEW.attempts
            ),
            clock_timestamp()
        )
        ON CONFLICT (id) DO NOTHING;
    END IF;
    RETURN NEW;
END
$$;
"""
# The same, returning before the INSERT when no enabled, undeleted endpoint subscribes to the event's type.
_NOW = _BEFORE.replace("""        END IF;
        INSERT INTO webhook_events""", """        END IF;
        IF NOT EXISTS (SELECT FROM webhooks WHERE enabled AND deleted_at IS NULL AND event_type = ANY(events)) THEN
            RETURN NEW;  -- no endpoint would receive it
        END IF;
        INSERT INTO webhook_events""")
assert _NOW != _BEFORE


def upgrade() -> None:
    op.execute(_NOW)


def downgrade() -> None:
    op.execute(_BEFORE)
