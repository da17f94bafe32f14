"""The job state machine: transitions guarded in SQL, leases, heartbeats, the reaper."""

import select
import socket
import time

import psycopg
import pytest
from sqlalchemy import text

from pipelines.core.db import driver, get_engine, session_scope
from pipelines.core.models import Job, JobState
from pipelines.jobs import attempt, machine, reaper
from pipelines.jobs.machine import ALLOWED


def new_job(**params) -> tuple[str, list]:
    sent = []
    with session_scope() as s:
        job = machine.create_job(s, kind="ingestion", params=params, send=sent.append,
                              sources=["x"])
        assert sent == []  # nothing is sent before the transaction commits
        job_id = job.id
    assert [j.id for j in sent] == [job_id]
    return job_id, sent


def state(job_id: str) -> Job:
    with session_scope() as s:
        return s.get(Job, job_id)


def sql(statement: str, **params) -> None:
    with get_engine().begin() as conn:
        conn.execute(text(statement), params)


def test_message_is_dropped_when_the_transaction_rolls_back():
    sent = []
    with pytest.raises(RuntimeError), session_scope() as s:
        machine.create_job(s, kind="ingestion", params={}, send=sent.append)
        raise RuntimeError("boom")
    assert sent == []
    with session_scope() as s:
        assert s.query(Job).count() == 0


def test_a_job_runs_once_and_late_duplicates_do_nothing():
    job_id, _ = new_job()
    calls = []
    assert attempt.execute(job_id, lambda run: calls.append(run.id) or {"ok": 1}) == "succeeded"
    assert attempt.execute(job_id, lambda run: calls.append(run.id) or {}) == "skipped"
    job = state(job_id)
    assert calls == [job_id]
    assert (job.state, job.progress, job.result, job.attempts) == ("succeeded", 100, {"ok": 1}, 1)
    assert job.started_at <= job.finished_at


def test_a_live_attempt_keeps_its_job():
    job_id, _ = new_job()
    run = attempt.claim(job_id, "otherhost:1")
    assert run is not None
    assert attempt.claim(job_id, "me:2") is None  # taken, heartbeat fresh, owner on another host


def test_an_attempt_whose_process_died_is_taken_over_at_once():
    job_id, _ = new_job()
    first = attempt.claim(job_id, f"{socket.gethostname()}:{2**22 + 12345}")  # no such pid
    assert first is not None
    second = attempt.claim(job_id, machine.owner_name())
    assert second is not None and second.attempts == 2
    # the first attempt lost its lease: its writes are refused and it cannot finish the job
    with pytest.raises(attempt.JobStopped), first.batch(processed=1, failed=0, checkpoint={}, progress=1):
        pass
    assert not attempt.finish(first, JobState.SUCCEEDED)
    assert attempt.finish(second, JobState.SUCCEEDED)


def test_batches_commit_progress_with_the_work_and_resume_from_the_checkpoint():
    job_id, _ = new_job()
    run = attempt.claim(job_id, machine.owner_name())
    with run.batch(processed=10, failed=2, checkpoint={"batch": 1}, progress=40) as conn:
        conn.execute("INSERT INTO source_state (source, status, successful, failed) VALUES ('x', 'ok', 0, 0)")
    with pytest.raises(ZeroDivisionError), run.batch(processed=5, failed=0, checkpoint={"batch": 2}, progress=60) as c:
        c.execute("UPDATE source_state SET status = 'half-done'")
        raise ZeroDivisionError("the batch failed half-way")
    job = state(job_id)
    assert (job.records_processed, job.records_failed, job.checkpoint, job.progress) == (10, 2, {"batch": 1}, 40)
    with session_scope() as s:
        assert s.execute(text("SELECT status FROM source_state")).scalar_one() == "ok"


def test_finished_jobs_never_move_backwards():
    job_id, _ = new_job()
    run = attempt.claim(job_id, machine.owner_name())
    assert attempt.finish(run, JobState.FAILED, error="bad file")
    assert not attempt.finish(run, JobState.SUCCEEDED)
    sql("UPDATE jobs SET heartbeat_at = now() - interval '1 hour' WHERE id = :id", id=job_id)
    assert attempt.claim(job_id, machine.owner_name()) is None
    assert (state(job_id).state, state(job_id).error) == ("failed", "bad file")


def test_a_job_whose_worker_keeps_dying_fails_clearly(monkeypatch):
    job_id, _ = new_job()
    dead = f"{socket.gethostname()}:{2**22 + 999}"
    from pipelines.core.settings import get_settings

    limit = get_settings().max_job_attempts
    for _ in range(limit):
        assert attempt.claim(job_id, dead) is not None
    assert attempt.claim(job_id, machine.owner_name()) is None
    job = state(job_id)
    assert job.state == "failed" and f"gave up after {limit} attempts" in job.error


def test_errors_fail_the_job_with_their_message():
    job_id, _ = new_job()

    def work(run):
        raise attempt.JobFailed("source 'x': no file matches 'a/*.csv'")

    assert attempt.execute(job_id, work) == "failed"
    assert state(job_id).error == "source 'x': no file matches 'a/*.csv'"


def test_a_result_postgresql_cannot_store_fails_the_job_instead_of_leaving_it_running():
    """JSON has no Infinity: a success whose result holds one cannot be recorded, and neither can a failure
    that keeps that result. The job ends failed all the same, without it, and is not left `running` for
    the reaper to send again (where it would fail the same way, attempt after attempt)."""
    job_id, _ = new_job()
    assert attempt.execute(job_id, lambda run: {"figure": float("inf")}) == "failed"
    job = state(job_id)
    assert (job.state, job.result, job.attempts) == ("failed", {}, 1)
    assert job.error.startswith("internal error (InvalidTextRepresentation)")  # PostgreSQL refused its JSON


def test_a_prepared_statement_answers_as_the_same_statement_through_sqlalchemy():
    """The claim and the end skip SQLAlchemy's work per execution (`db.Prepared`): the same statement,
    given the same parameters, answers the same row either way, its enum and JSON parameters included;
    a statement whose SQL would be rewritten at every execution (an expanding list), or with a value
    computed at each (a callable parameter), is refused."""
    from sqlalchemy import bindparam, literal, select, update
    from sqlalchemy.dialects.postgresql import JSONB

    from pipelines.core.db import Prepared, autocommit

    statement = select(literal(JobState.RUNNING).label("state"), bindparam("doc", type_=JSONB).label("doc"),
                       (bindparam("n") + 1).label("next"))
    given = {"doc": {"a": [1, "b", None], "c": {"d": 1.5}}, "n": 41}
    with autocommit() as connection:
        prepared = Prepared(statement).execute(connection, given).fetchone()
        through = connection.execute(statement, given).one()
    assert (prepared.state, prepared.doc, prepared.next) == tuple(through) == ("running", given["doc"], 42)
    with pytest.raises(ValueError, match="rewritten"):
        Prepared(update(Job).where(Job.state.in_(["queued", "running"])).values(error="x"))
    with pytest.raises(ValueError, match="computed"):  # it would be computed once, when prepared
        Prepared(select(bindparam("now", callable_=lambda: "a value of each execution")))


def test_an_unplanned_error_names_its_kind_never_its_text():
    job_id, _ = new_job()

    def work(run):
        raise RuntimeError("(psycopg.errors.Foo) SELECT password FROM users WHERE id = 'secret-value'")

    assert attempt.execute(job_id, work) == "failed"
    error = state(job_id).error
    assert error.startswith("internal error (RuntimeError)") and job_id in error
    assert "SELECT" not in error and "secret-value" not in error


def test_an_attempt_ends_on_its_own_connection_and_on_a_fresh_one_if_that_died():
    """The end's transaction reuses the connection the attempt was claimed on (one checkout a job);
    if the database dropped it meanwhile, the end is recorded on a fresh one all the same."""
    quiet, _ = new_job()
    pids = set()

    def note(run):
        pids.add(driver(run.connection).info.backend_pid)
        return {"ok": 1}

    assert attempt.execute(quiet, note) == "succeeded"
    assert state(quiet).result == {"ok": 1} and len(pids) == 1

    dropped, _ = new_job()

    def lose_connection(run):
        own = driver(run.connection).info.backend_pid
        sql("SELECT pg_terminate_backend(:pid)", pid=own)  # as a database restart would
        return {"ok": 2}

    assert attempt.execute(dropped, lose_connection) == "succeeded"
    job = state(dropped)
    assert (job.state, job.result, job.attempts) == ("succeeded", {"ok": 2}, 1)


def test_the_pool_hands_out_a_live_connection_without_a_round_trip_and_replaces_one_the_server_closed(tmp_path):
    """No ping before a checkout: a live connection is handed out with no message to the server, and
    one whose server process ended while it sat in the pool is replaced before anyone uses it."""
    engine = get_engine()
    engine.dispose()  # one connection in the pool, so that the next checkout is that one
    with engine.connect() as connection:
        live = driver(connection)
        pid = live.info.backend_pid
    trace = tmp_path / "trace"
    with open(trace, "w") as out:
        live.pgconn.trace(out.fileno())
        try:
            with engine.connect() as connection:
                assert driver(connection) is live  # the same connection, handed out again
        finally:
            live.pgconn.untrace()
    assert trace.read_text() == ""  # not a byte sent or received

    url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as other:  # not from the pool: that would be LIVE itself
        other.execute("SELECT pg_terminate_backend(%s)", [pid])  # as a restart or a crash would
    closed = select.poll()
    closed.register(live.fileno(), select.POLLIN)
    deadline = time.monotonic() + 10
    while not closed.poll(50):
        assert time.monotonic() < deadline, "the server never closed the connection"
    with engine.connect() as connection:
        assert connection.execute(text("SELECT pg_backend_pid()")).scalar() != pid
        assert driver(connection) is not live


def tick(waiting: dict[str, int]) -> tuple[dict, list]:
    """One reaper tick, the broker saying WAITING messages wait per kind; (report, messages sent)."""
    resent: list = []
    return reaper.reap(resent.append, lambda kind: waiting.get(kind, 0)), resent


def age_marks(seconds: int = 60) -> None:
    sql("UPDATE job_queue_marks SET marked_at = marked_at - make_interval(secs => :s)", s=seconds)


def test_reaper_resends_a_queued_job_only_once_its_message_was_handed_out_a_tick_ago():
    first, _ = new_job()
    second, _ = new_job()
    # Both messages wait in the broker: nothing to do, tick after tick.
    for _ in range(2):
        report, resent = tick({"ingestion": 2})
        assert report["resent"] == [] and resent == []
        age_marks()
    # The broker handed out the first (a worker took it) and then the job did not start: at the tick
    # that sees that, nothing yet (a worker may be about to claim it) ...
    report, resent = tick({"ingestion": 1})
    assert report["resent"] == [] and resent == []
    age_marks()
    # ... and at the next, still queued: sent again, under a new message id and number.
    before = state(first)
    report, resent = tick({"ingestion": 1})
    assert report["resent"] == [first] and [m.id for m in resent] == [first]
    after = state(first)
    assert resent[0].task_id == after.celery_task_id != before.celery_task_id
    assert after.send_seq > state(second).send_seq > before.send_seq
    assert state(second).celery_task_id  # the second still waits in the broker: untouched
    # The re-sent message now waits too; nothing more is re-sent.
    age_marks()
    report, resent = tick({"ingestion": 2})
    assert report["resent"] == [] and resent == []


def test_reaper_marks_no_sooner_than_the_grace_period():
    job_id, _ = new_job()
    tick({"ingestion": 0})  # the message is gone (the broker lost it): marked, not yet re-sent
    report, _ = tick({"ingestion": 0})  # marked a moment ago: a worker may still be claiming it
    assert report["resent"] == []
    age_marks()
    report, _ = tick({"ingestion": 0})
    assert report["resent"] == [job_id]


def test_reaper_does_nothing_with_messages_when_the_broker_cannot_say():
    job_id, _ = new_job()
    resent: list = []
    for _ in range(3):
        assert reaper.reap(resent.append, lambda kind: None)["resent"] == []
        age_marks()
    assert resent == []
    with session_scope() as s:
        assert s.execute(text("SELECT count(*) FROM job_queue_marks")).scalar_one() == 0


def test_a_job_that_started_is_never_resent():
    job_id, _ = new_job()
    tick({"ingestion": 0})
    attempt.claim(job_id, machine.owner_name())
    age_marks()
    report, resent = tick({"ingestion": 0})
    assert report["resent"] == [] and resent == []


STATES = list(JobState)


@pytest.mark.parametrize("source", STATES)
def test_every_transition_the_table_allows_happens_and_every_other_is_refused(source):
    for target in STATES:
        job_id, _ = new_job()
        sql("UPDATE jobs SET state = :s WHERE id = :id", s=source.value, id=job_id)
        with session_scope() as s:
            moved = machine.transition(s, job_id, target)
        assert moved == (target in ALLOWED[source]), (source, target)
        assert state(job_id).state == (target if moved else source), (source, target)


def test_a_transition_outside_the_table_cannot_even_be_built():
    with pytest.raises(machine.InvalidTransition):
        machine._moving({JobState.SUCCEEDED: JobState.QUEUED})
    with pytest.raises(machine.InvalidTransition):
        machine._moving({JobState.QUEUED: JobState.RUNNING, JobState.CANCELLING: JobState.RUNNING})


def test_nothing_outside_the_machine_writes_a_jobs_state():
    """One owner: no module but pipelines/jobs/machine.py sets `state` in an UPDATE of jobs."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    writes = re.compile(r"UPDATE\s+jobs\b[^;]*?\bSET\b[^;]*?\bstate\s*=|update\(Job\)[^\n]*state", re.I | re.S)
    offenders = [str(path.relative_to(root)) for folder in ("pipelines", "api", "worker", "cli")
                 for path in (root / folder).rglob("*.py")
                 if "migrations" not in path.parts and path.name != "machine.py" and writes.search(path.read_text())]
    assert offenders == []


def test_reaper_requeues_running_jobs_whose_heartbeat_stopped_and_fails_timeouts():
    stale_id, _ = new_job()
    attempt.claim(stale_id, "gone-host:1")
    slow_id, _ = new_job()
    attempt.claim(slow_id, machine.owner_name())
    sql("UPDATE jobs SET heartbeat_at = now() - interval '1 hour' WHERE id = :id", id=stale_id)
    sql("UPDATE jobs SET started_at = now() - interval '2 hours', timeout_seconds = 60 WHERE id = :id", id=slow_id)
    resent = []
    report = reaper.reap(resent.append, lambda kind: 0)
    assert report["recovered"] == [stale_id] and report["timed_out"] == [slow_id]
    assert [j.id for j in resent] == [stale_id]
    assert state(stale_id).state == "queued"
    assert (state(slow_id).state, state(slow_id).error) == ("failed", "timed out after 60 seconds")
