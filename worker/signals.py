"""Per-process set-up: logging, a fresh database engine in every forked pool process, and the
outbox listener in workers that consume the webhooks queue."""

import logging

from celery.signals import setup_logging, worker_init, worker_process_init, worker_ready, worker_shutdown

from pipelines.core import memory
from pipelines.core.db import dispose_engine
from pipelines.core.logs import configure
from pipelines.core.settings import get_settings
from worker.queues import Queues
from worker.schedule import HOUSEKEEPING

_listener = None


class QuietHousekeeping(logging.Filter):
    """Celery's own lines about housekeeping tasks (received, succeeded, sent by beat) are debug:
    at INFO a person sees jobs start and end, not a reaper tick."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not record.name.startswith("celery"):
            return True
        message = record.getMessage()
        if not any(name in message for name in HOUSEKEEPING):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


@setup_logging.connect
def _logging(**_kwargs) -> None:
    settings = get_settings()
    configure(settings.log_level, settings.log_format)
    for handler in logging.getLogger().handlers:
        handler.addFilter(QuietHousekeeping())


@worker_init.connect
def _preload(**_kwargs) -> None:
    # pyarrow converts to NumPy through pandas, imported on first use: import it once here, before
    # the pool forks, rather than inside every new pool process's first job.
    import pandas  # noqa: F401

    if get_settings().worker_flat_memory:  # before the fork, so every pool process inherits it
        memory.keep_flat()
    memory.freeze_startup()  # the pool's processes inherit the frozen heap; their collections skip it


@worker_process_init.connect
def _fresh_engine(**_kwargs) -> None:
    # Connections inherited through fork must never be used by the child.
    dispose_engine()


@worker_process_init.connect
def _note_memory(**_kwargs) -> None:
    if get_settings().worker_flat_memory:  # the allocators as this pool process inherited them
        import pyarrow as pa

        logging.getLogger(__name__).info("pool process memory kept flat: Arrow's pool %s, malloc's mmap threshold %s",
                                         pa.default_memory_pool().backend_name,
                                         "fixed" if memory.threshold_fixed else "as glibc sets it")


@worker_ready.connect
def _listen_to_outbox(sender=None, **_kwargs) -> None:
    global _listener
    consumed = set(sender.app.amqp.queues.consume_from or sender.app.amqp.queues)
    if Queues.WEBHOOKS.value not in consumed:
        return
    from worker.dispatch import send_deliveries
    from worker.outbox import OutboxListener

    _listener = OutboxListener(send_deliveries)
    _listener.start()


@worker_shutdown.connect
def _stop_listening(**_kwargs) -> None:
    if _listener is not None:
        _listener.stop()
