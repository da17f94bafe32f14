"""Run Alembic migrations from code (`ingot db upgrade`, `ingot up`, the tests)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from pipelines.core.db import get_engine

MIGRATIONS = Path(__file__).parent / "migrations"
# Any fixed number will do: it serialises concurrent upgrades (an api and a worker starting together).
_MIGRATION_LOCK = 7_160_001


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def upgrade(revision: str = "head") -> None:
    config = alembic_config()
    with get_engine().begin() as connection:
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def downgrade(revision: str) -> None:
    config = alembic_config()
    with get_engine().begin() as connection:
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.downgrade(config, revision)
