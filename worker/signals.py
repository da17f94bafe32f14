"""Per-process set-up: logging, and a fresh database engine in every forked pool process."""

from celery.signals import setup_logging, worker_init, worker_process_init

from pipelines.db import dispose_engine
from pipelines.logs import configure
from pipelines.settings import get_settings


@setup_logging.connect
def _logging(**_kwargs) -> None:
    settings = get_settings()
    configure(settings.log_level, settings.log_format)


@worker_init.connect
def _preload(**_kwargs) -> None:
    # pyarrow converts to NumPy through pandas, imported on first use: import it once here, before
    # the pool forks, rather than inside every new pool process's first job.
    import pandas  # noqa: F401


@worker_process_init.connect
def _fresh_engine(**_kwargs) -> None:
    # Connections inherited through fork must never be used by the child.
    dispose_engine()
