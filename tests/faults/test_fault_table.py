"""The fault suite, short form (`make test`): the real API, two worker processes with beat, the
session's PostgreSQL and Redis, and a webhook receiver, under a mixed load of ingestion, export,
scenario and webhook work; one round of it per fault, counted against the ledger (testkit.faultload).

Faults: worker pool processes and a whole worker SIGKILLed mid-job (a new worker started); three
more kills at random moments (a seed printed, INGOT_FAULT_SEED to replay it); Redis killed and
started again with its data deleted (no persistence) while jobs are queued and running; PostgreSQL
restarted while jobs run, then stopped for a while (5 s; 30 s in `make faults`: /ready and the API
answer 503 meanwhile); the webhook receiver down, then slow, then up. It prints one row per fault
(jobs submitted, succeeded, lost, effects doubled, time to recover) and fails unless every row has
zero lost and zero doubled. (An embedded server killed under `ingot up` is
tests/test_up.py's.)

The same rounds run with RabbitMQ as the broker (INGOT_BROKER_URL=amqp://...) on a node of the test's
own, which is crashed (SIGKILL) and shut down cleanly mid-round and started again: `make test` runs the
two broker rows, `make faults` every row (the worker and PostgreSQL faults too).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from collections.abc import Callable

import pytest
from sqlalchemy import text

from cli.client import Client
from pipelines.core import embedded
from pipelines.core.db import get_engine
from testkit.faultload import Load, Row, table
from testkit.receiver import Receiver
from tests import rabbit
from tests.helpers import api_processes, wait_for

pytestmark = pytest.mark.worker
AWAY_SECONDS = float(os.environ.get("INGOT_FAULT_AWAY_SECONDS", "5"))  # `make faults`: 30
# The session's 3 s claim is for tests that want a lost delivery handed out again at once; here a
# delivery's claim must outlast the database being away, so an answer kept through it is recorded, not
# sent twice (production: 30 s). No longer: a delivery whose worker was killed waits out its claim.
WORKER_ENV = {"INGOT_WEBHOOK_CLAIM_SECONDS": str(int(AWAY_SECONDS) + 5)}
SEED = int(os.environ.get("INGOT_FAULT_SEED", str(random.SystemRandom().randrange(10**6))))
REPEAT = int(os.environ.get("INGOT_FAULT_REPEAT", "1"))  # `make faults`: every fault several times, bigger load


class Faults:
    """One fault table: the load, two workers (supervised as `ingot up` and compose supervise them),
    and each fault as a method that takes the round's job ids while they are queued or running."""

    def __init__(self, client: Client, start_worker, data_dir, write_sources, rounds: int, env: dict):
        self.client, self.start_worker, self.env = client, start_worker, {**WORKER_ENV, **env}
        client.update_config({"webhook_retry_schedule": "0,1,1,2,2,3,5,5,5,5"})  # a receiver may be away ~30 s
        self.load = Load(client, data_dir, write_sources, rounds=rounds)
        self.workers = [self._worker(0), self._worker(1)]
        self.load.prepare()
        self.rows: list[Row] = []
        self.restarted: list[str] = []
        self.away: dict = {}
        self.chance = random.Random(SEED)

    def _worker(self, i: int):
        return self.start_worker(concurrency=2 if i == 0 else 1, beat=i == 0, env=self.env)

    def supervise(self) -> None:
        """A worker that exited is started again. Kombu 5.7 can end a worker that holds a message when
        Redis vanishes (an AttributeError while closing its channel); the table says when that happened."""
        for i, worker in enumerate(self.workers):
            if worker.process.poll() is not None:
                self.restarted.append(f"worker {i} exited ({worker.process.returncode})")
                self.workers[i] = self._worker(i)

    def running(self, jobs: list[str]) -> bool:
        """Is one of JOBS running, or have all of them ended already (the workers supervised
        meanwhile)? A round that ends before a look finds it running takes its fault between jobs."""
        self.supervise()
        return any(_running(j) for j in jobs) or _ended(jobs)

    def until_running(self, jobs: list[str]) -> None:
        try:
            wait_for(lambda: self.running(jobs), timeout=60, interval=0.02, message="a job to run")
        except AssertionError:
            with get_engine().connect() as conn:
                states = conn.execute(text("SELECT kind, state, attempts FROM jobs WHERE id = ANY(:ids)"),
                                      {"ids": jobs}).all()
            alive = [w.process.poll() is None for w in self.workers]
            raise AssertionError(f"no job of the round ran within 60 s: {states}; workers alive: {alive}") from None

    def run(self, faults: list[tuple[str, Callable[[list[str]], None]]]) -> str:
        """Each of FAULTS in a round of its own (REPEAT times over); the table, printed and returned."""
        for round_no, (fault, inject) in enumerate(faults * REPEAT):
            self.supervise()
            jobs = self.load.submit(round_no)
            inject(jobs)
            over = time.monotonic()
            self.load.settle(jobs, tend=self.supervise)
            self.load.wait_for_events(jobs)
            self.rows.append(self.load.ledger(fault, jobs, time.monotonic() - over))  # all done, all told
        self.load.receiver.close()
        for worker in self.workers:
            worker.stop()
        notes = [f"random moments: seed {SEED}"]
        if self.away:
            notes.append(f"PostgreSQL away {AWAY_SECONDS:g} s: /ready answered {sorted(self.away['ready'])} and job "
                         f"starts {sorted(self.away['start'])} over {self.away['probes']} probes, /ready 200 again "
                         f"{self.away['ready_after']:.1f} s after it started")
        if self.restarted:
            notes.append(f"started again as a supervisor would: {', '.join(self.restarted)}")
        return table(self.rows) + f"\n({'; '.join(notes)})"

    def ok(self) -> bool:
        return all(r.lost == 0 and r.doubled == 0 and r.succeeded == r.submitted for r in self.rows)

    # --- the faults ------------------------------------------------------------------------------

    def nothing(self, _jobs: list[str]) -> None:
        pass

    def kill_workers(self, jobs: list[str]) -> None:
        owner = wait_for(lambda: _running(jobs[0]), timeout=60, interval=0.02, message="the ingestion to run")
        os.kill(int(owner["lease_owner"].rpartition(":")[2]), signal.SIGKILL)  # a pool process, mid-job
        wait_for(lambda: self.running(jobs), timeout=60, interval=0.05, message="a job running again")
        self.workers[0].kill()  # then a whole worker, with its beat
        self.workers[0] = self._worker(0)

    def kill_at_random(self, jobs: list[str]) -> None:
        """Three kills, each at a random moment of the round (queued, starting, mid-batch, finishing,
        delivering its webhook), each of a random pool process or a whole worker (started again)."""
        for _ in range(3):
            time.sleep(self.chance.uniform(0.0, 1.5))  # a random moment: the fault's timing is the point
            if self.chance.random() < 0.5:
                pids = [pid for w in self.workers for pid in w.pool_pids()]
                if pids:
                    os.kill(self.chance.choice(pids), signal.SIGKILL)
                    continue
            which = self.chance.randrange(len(self.workers))
            self.workers[which].kill()
            self.workers[which] = self._worker(which)

    def restart_postgres(self, jobs: list[str]) -> None:
        from pgserver import pg_ctl  # type: ignore[attr-defined]

        self.until_running(jobs)
        server = embedded._postgres
        pg_ctl(["-w", "-m", "fast", "restart"], pgdata=server.pgdata, user=server.system_user)

    def postgres_away(self, jobs: list[str]) -> None:
        """PostgreSQL stopped for AWAY_SECONDS while jobs run: /ready says 503 meanwhile and the API
        answers 503 (never a 500, never silence); then it starts again and nobody lifts a finger."""
        from pgserver import pg_ctl  # type: ignore[attr-defined]

        self.until_running(jobs)
        server = embedded._postgres
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
        answers: list[tuple[int, int]] = []  # (/ready, a job start) while it is away
        began = time.monotonic()
        http = self.client.http
        while time.monotonic() - began < AWAY_SECONDS:
            answers.append((http.get("/ready").status_code,
                            http.post("/api/v1/ingestion/start", json={"sources": ["s0_0"]}).status_code))
            time.sleep(0.5)  # a probe's period, as a load balancer would ask
        server.ensure_postgres_running()  # as pgserver starts it: its socket, no TCP
        back = time.monotonic()
        wait_for(lambda: http.get("/ready").status_code == 200, timeout=60, interval=0.1,
                 message="/ready to answer 200 again")
        self.away.update(ready={a for a, _ in answers}, start={b for _, b in answers}, probes=len(answers),
                         ready_after=time.monotonic() - back)

    def postgres_frozen(self, jobs: list[str]) -> None:
        """Every PostgreSQL process stopped (SIGSTOP, as a stalled disk or a frozen host looks from
        outside) for AWAY_SECONDS while jobs run: the workers blocked on it carry on once it thaws, or
        give their job back to the reaper if their heartbeat went stale meanwhile."""
        import psutil

        self.until_running(jobs)
        postmaster = psutil.Process(int((embedded._postgres.pgdata / "postmaster.pid").read_text().split()[0]))
        frozen = [postmaster, *postmaster.children(recursive=True)]
        for process in frozen:
            process.send_signal(signal.SIGSTOP)
        try:
            time.sleep(AWAY_SECONDS)  # the fault's length: nothing to poll while the database is stopped
        finally:
            for process in frozen:
                process.send_signal(signal.SIGCONT)

    def receiver_trouble(self, jobs: list[str]) -> None:
        port = self.load.receiver.port
        self.load.receiver.close()  # down while the jobs end
        wait_for(_delivery_failed_once, timeout=60, interval=0.1, message="a delivery to fail")
        # One ledger of what arrived; the secret and the delay set before it serves its first request.
        slow = Receiver(port, secret=self.load.webhook_secret, received=self.load.receiver.received, delay=1.5)
        self.load.receiver = slow
        time.sleep(3)  # slow for a while (the receiver's behaviour, not a wait for a condition)
        slow.delay = 0.0

    def postgres_rows(self) -> list[tuple[str, Callable[[list[str]], None]]]:
        return [("PostgreSQL restarted", self.restart_postgres), ("PostgreSQL away", self.postgres_away),
                ("PostgreSQL frozen", self.postgres_frozen), ("receiver down, slow, up", self.receiver_trouble)]


def test_no_work_is_lost_or_doubled_whatever_breaks(client, start_worker, write_sources, data_dir,
                                                    embedded_redis, capsys):
    if embedded._postgres is None:
        pytest.skip("INGOT_TEST_DATABASE_URL is set: the tests do not own that PostgreSQL, so cannot restart it")

    def lose_redis(_jobs: list[str]) -> None:
        os.killpg(embedded_redis.process.pid, signal.SIGKILL)
        embedded_redis.process.wait()
        shutil.rmtree(embedded_redis.dir / "appendonlydir", ignore_errors=True)
        for leftover in embedded_redis.dir.glob("*.aof"):
            leftover.unlink()
        embedded_redis.process = None
        embedded_redis.start()  # empty: every queued message and every binding gone

    faults = Faults(client, start_worker, data_dir, write_sources, rounds=8 * REPEAT, env={})
    report = faults.run([("none (baseline)", faults.nothing), ("workers SIGKILLed", faults.kill_workers),
                         ("kills at random moments", faults.kill_at_random), ("Redis lost its data", lose_redis),
                         *faults.postgres_rows()])
    with capsys.disabled():
        print("\n" + report)
    assert faults.away["ready"] == {503} and faults.away["start"] == {503}, report
    assert faults.ok(), report


@pytest.fixture
def rabbit_node():
    why = rabbit.available()
    if why:
        pytest.skip(f"the RabbitMQ rows need a node of their own: {why}")
    node = rabbit.RabbitNode().start()
    yield node
    node.close()


def test_no_work_is_lost_or_doubled_over_rabbitmq(rabbit_node, admin_key, start_worker, write_sources, data_dir,
                                                  capsys):
    """The work on RabbitMQ's quorum queues: the broker crashed (SIGKILL) and shut down cleanly while
    jobs are queued and running, then started again on its data; nothing is lost or done twice."""
    every_row = os.environ.get("INGOT_FAULT_EVERY_ROW") == "1" and embedded._postgres is not None  # `make faults`

    def broker_crashed(jobs: list[str]) -> None:
        faults.until_running(jobs)
        rabbit_node.kill()
        time.sleep(1)  # down a moment: the API's publishes and the workers' consumers meet a dead broker
        rabbit_node.start()

    def broker_restarted(jobs: list[str]) -> None:
        faults.until_running(jobs)
        rabbit_node.stop()
        rabbit_node.start()

    env = {"INGOT_BROKER_URL": rabbit_node.url}
    with api_processes(1, **env) as (url,), Client(url, admin_key) as client:
        faults = Faults(client, start_worker, data_dir, write_sources, rounds=9 * REPEAT, env=env)
        rows = [("RabbitMQ crashed (SIGKILL)", broker_crashed), ("RabbitMQ shut down and started", broker_restarted)]
        if every_row:
            rows = [("none (baseline)", faults.nothing), ("workers SIGKILLed", faults.kill_workers),
                    ("kills at random moments", faults.kill_at_random), *rows, *faults.postgres_rows()]
        report = faults.run(rows)
    with capsys.disabled():
        print("\nover RabbitMQ:\n" + report)
    assert not faults.away or (faults.away["ready"] == {503} and faults.away["start"] == {503}), report
    assert faults.ok(), report


def _running(job_id: str) -> dict | None:
    with get_engine().connect() as conn:
        row = conn.execute(text("SELECT state, lease_owner FROM jobs WHERE id = :id"), {"id": job_id}).mappings().one()
    return dict(row) if row["state"] == "running" and row["lease_owner"] else None


def _ended(job_ids: list[str]) -> bool:
    with get_engine().connect() as conn:
        return not conn.execute(text("SELECT count(*) FROM jobs WHERE id = ANY(:ids) AND state IN "
                                     "('queued', 'running', 'cancelling')"), {"ids": job_ids}).scalar_one()


def _delivery_failed_once() -> bool:
    with get_engine().connect() as conn:
        return bool(conn.execute(text("SELECT count(*) FROM webhook_attempts WHERE status_code IS NULL")).scalar_one())
