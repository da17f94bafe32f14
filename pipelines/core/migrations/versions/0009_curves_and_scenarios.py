"""forward curves, and scenarios with their runs' outputs and metrics

`curves` holds one row per point, keyed on (curve_key, asof_date, contract_month). `curve_index`
keeps one row per curve (its dimensions and the as-of dates it has), written by the same
transaction as the points, so "the latest curve", dimensions and locations are answered from a
table of hundreds of rows instead of a scan of millions. A run's outputs are kept one row per curve,
its contract months as arrays: a run writes hundreds of rows, not tens of thousands, and reads
unnest them.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-26 19:10:00
"""

from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
CREATE TABLE curves (
    curve_key text NOT NULL,
    asof_date date NOT NULL,
    contract_month date NOT NULL,
    tenor_label text,
    value double precision,
    currency text,
    unit text,
    asset_class text,
    iso text,
    location text,
    metadata jsonb NOT NULL DEFAULT '{}',
    source text NOT NULL,
    job_id text,
    ingested_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (curve_key, asof_date, contract_month)
);
CREATE TABLE curve_index (
    curve_key text PRIMARY KEY,
    asset_class text,
    iso text,
    location text,
    currency text,
    unit text,
    first_asof date NOT NULL,
    last_asof date NOT NULL
);
CREATE INDEX ix_curve_index_location ON curve_index (iso, location);
CREATE TABLE scenarios (
    id text PRIMARY KEY,
    name text NOT NULL,
    description text,
    base jsonb NOT NULL,
    shocks jsonb NOT NULL,
    api_key_id text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ix_scenarios_created ON scenarios (created_at, id);
CREATE TABLE scenario_outputs (
    run_id text NOT NULL,
    scenario_id text NOT NULL,
    curve_key text NOT NULL,
    asof_date date NOT NULL,
    unit text,
    contract_months date[] NOT NULL,
    tenor_labels text[] NOT NULL,
    base double precision[] NOT NULL,
    shocked double precision[] NOT NULL,
    change double precision[] NOT NULL,
    PRIMARY KEY (run_id, curve_key)
);
CREATE INDEX ix_scenario_outputs_scenario ON scenario_outputs (scenario_id);
CREATE TABLE scenario_metrics (
    run_id text NOT NULL,
    scenario_id text NOT NULL,
    curve_key text,  -- NULL: over all the run's curves
    mean_change double precision,
    max_abs_change double precision,
    mean_pct_change double precision,
    value_weighted_change double precision,
    CONSTRAINT scenario_metrics_once UNIQUE NULLS NOT DISTINCT (run_id, curve_key)
);
CREATE INDEX ix_scenario_metrics_scenario ON scenario_metrics (scenario_id);
CREATE INDEX ix_jobs_scenario ON jobs ((params->>'scenario_id'), created_at) WHERE kind = 'scenario_run';
""")


def downgrade() -> None:
    op.execute("DROP INDEX ix_jobs_scenario; DROP TABLE scenario_metrics, scenario_outputs, scenarios, curve_index, curves")
