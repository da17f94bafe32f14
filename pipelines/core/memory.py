"""Allocators set so that a worker's memory stays flat: what a batch frees goes back to the system.

An operator's choice (`INGOT_WORKER_FLAT_MEMORY`, off by default), since it trades CPU for memory.
Measured with `bench/ingest.py` (1,000,000 rows, 2026-12-04): a pool process's peak RSS rises 150-197
MB over its resting size with the defaults, though the batches in flight at any moment hold about
30 MB: two allocators keep what they free. Arrow's default pool (mimalloc) keeps freed pages for
reuse; and glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB),
so after the first 4 MiB read block every later one comes from the heap, whose free space is
fragmented and seldom returned. Flat: Arrow allocates through the system allocator, and blocks of
1 MiB or more stay on mmap, handed back whole when freed. The run then adds 92-97 MB, not 150; the
price is fresh pages for every large block (five times the page faults), about 0.4 s more CPU per
million rows on a re-ingest's merge path.

Also the collector's reach (`freeze_startup`, always on): what a process has built by the time it
serves (modules, the app, its routes and schemas, SQLAlchemy's tables: most of its objects) is moved
out of the cyclic collector's sight. Each full collection otherwise walked all of it: in the API
under load, 120-161 ms with the whole process stopped, the event loop included (bench/readers.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD = 1 << 20
threshold_fixed = False  # whether keep_flat fixed malloc's threshold in this process (or before its fork)


def keep_flat() -> bool:
    """Set both allocators for this process and for the processes it forks after this call. False
    where malloc is not glibc's (its own defaults stand; Arrow's pool is set all the same)."""
    global threshold_fixed
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())
    name = ctypes.util.find_library("c")
    try:
        threshold_fixed = bool(name and ctypes.CDLL(name).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        log.debug("malloc's mmap threshold left as it is: not glibc")
    return threshold_fixed


def freeze_startup() -> None:
    """Collect once, then leave every object alive now to the permanent generation: full collections
    later walk only what was made since. Called when a process is ready to serve (the API's startup,
    a worker's main process before it forks its pool, whose processes share those pages untouched)."""
    gc.collect()
    gc.freeze()
