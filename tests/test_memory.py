"""`INGOT_WORKER_FLAT_MEMORY`'s allocators (pipelines.core.memory): a large block freed goes back to
the system, so the next one is fresh pages (counted as page faults), where by default glibc keeps it.
And the collector's reach: the API and a worker leave what they built at startup out of it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.datagen import sources_toml, write_csv
from tests.helpers import ROOT, wait_for

CYCLES = 20
BLOCK = 2 << 20  # above the flat threshold (1 MiB), below glibc's dynamic ceiling (32 MiB)

PROBE = f"""
import json, resource, sys
from pipelines.core import memory
flat = sys.argv[1] == "flat"
applied = memory.keep_flat() if flat else None
import pyarrow as pa
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({CYCLES}):
    block = bytearray({BLOCK})  # zeroed, so every page is touched
    del block
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({{"applied": applied, "faults": faults, "arrow": pa.default_memory_pool().backend_name}}))
"""


def probe(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is what is set")
def test_flat_memory_hands_every_large_block_back_and_arrow_uses_the_system_allocator():
    default, flat = probe("default"), probe("flat")
    pages = BLOCK // 4096
    assert flat["applied"] is True and flat["arrow"] == "system"
    assert default["arrow"] != "system"
    # Flat: each block is mapped afresh and unmapped when freed. Default: after the first block is
    # freed, the threshold rises above it and the heap keeps and reuses the pages.
    assert flat["faults"] >= CYCLES * pages * 0.9, flat
    assert default["faults"] < 3 * pages, default


@pytest.mark.worker
def test_a_worker_told_to_keep_memory_flat_sets_its_allocators_before_the_fork_and_ingests(
        client, start_worker, write_sources, data_dir):
    write_csv(data_dir / "prices.csv", 5_000)
    write_sources(sources_toml("prices", "prices.csv"))
    worker = start_worker(env={"INGOT_WORKER_FLAT_MEMORY": "true", "INGOT_LOG_LEVEL": "INFO"})
    log = Path(worker.log.name)
    # Each pool process says what it inherited from the worker that forked it.
    wait_for(lambda: "pool process memory kept flat" in log.read_text(), timeout=30, message="the pool's note")
    assert "Arrow's pool system, malloc's mmap threshold fixed" in log.read_text()
    job = client.wait(client.start_ingestion(["prices"])["job_id"], timeout=60)
    assert job["state"] == "succeeded" and job["records_processed"] == 5_000, job


HEAP = "print(gc.get_freeze_count(), len(gc.get_objects(generation=2)))"  # frozen, and walked by a full collection


def assert_startup_left_out_of_the_collector(code: str) -> None:
    """Run CODE (which prints HEAP) in a process of its own: what it built at startup is frozen (over
    100,000 objects), and a full collection walks under a twentieth of that."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    frozen, walked = map(int, done.stdout.strip().splitlines()[-1].split())
    assert frozen > 100_000 and walked < frozen / 20, (frozen, walked)


def test_the_apis_full_collections_walk_only_what_it_made_since_it_started():
    """A full collection once walked every object the API holds (imports, routes, schemas): 120-161 ms
    with the whole process stopped, the event loop included, every few seconds under load
    (bench/readers.py: `/health`'s p99 74-109 ms beside heavy readers, 11 ms since). Here the API starts
    as `ingot api` runs it (its lifespan, over the tests' database)."""
    assert_startup_left_out_of_the_collector(f"""
import gc
from fastapi.testclient import TestClient
from api.main import create_app
with TestClient(create_app()) as client:
    assert client.get("/health").status_code == 200
    {HEAP}
""")


def test_a_workers_pool_inherits_a_frozen_heap():
    """The worker's main process leaves its imports out of the collector before it forks the pool (its
    `worker_init`), so the pool's collections neither walk nor write to those shared pages."""
    assert_startup_left_out_of_the_collector(f"import gc, worker.signals as s; s._preload(); {HEAP}")
