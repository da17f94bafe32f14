"""The job state machine: transitions guarded in SQL, leases, heartbeats, the reaper."""

import socket

import pytest
from sqlalchemy import text

from pipelines.core.db import get_engine, session_scope
from pipelines.core.models import Job, JobState
from pipelines.jobs import machine, reaper


def new_job(**params) -> tuple[str, list]:
    sent = []
    with session_scope() as s:
        job = machine.create_job(s, kind="ingestion", queue="ingest", params=params, send=sent.append,
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
        machine.create_job(s, kind="ingestion", queue="ingest", params={}, send=sent.append)
        raise RuntimeError("boom")
    assert sent == []
    with session_scope() as s:
        assert s.query(Job).count() == 0


def test_a_job_runs_once_and_late_duplicates_do_nothing():
    job_id, _ = new_job()
    calls = []
    assert machine.execute(job_id, lambda run: calls.append(run.id) or {"ok": 1}) == "succeeded"
    assert machine.execute(job_id, lambda run: calls.append(run.id) or {}) == "skipped"
    job = state(job_id)
    assert calls == [job_id]
    assert (job.state, job.progress, job.result, job.attempts) == ("succeeded", 100, {"ok": 1}, 1)
    assert job.started_at <= job.finished_at


def test_a_live_attempt_keeps_its_job():
    job_id, _ = new_job()
    run = machine.claim(job_id, "otherhost:1")
    assert run is not None
    assert machine.claim(job_id, "me:2") is None  # taken, heartbeat fresh, owner on another host


def test_an_attempt_whose_process_died_is_taken_over_at_once():
    job_id, _ = new_job()
    first = machine.claim(job_id, f"{socket.gethostname()}:{2**22 + 12345}")  # no such pid
    assert first is not None
    second = machine.claim(job_id, machine.owner_name())
    assert second is not None and second.attempts == 2
    # the first attempt lost its lease: its writes are refused and it cannot finish the job
    with pytest.raises(machine.JobStopped), first.batch(processed=1, failed=0, checkpoint={}, progress=1):
        pass
    assert not machine.finish(first, JobState.SUCCEEDED)
    assert machine.finish(second, JobState.SUCCEEDED)


def test_batches_commit_progress_with_the_work_and_resume_from_the_checkpoint():
    job_id, _ = new_job()
    run = machine.claim(job_id, machine.owner_name())
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
    run = machine.claim(job_id, machine.owner_name())
    assert machine.finish(run, JobState.FAILED, error="bad file")
    assert not machine.finish(run, JobState.SUCCEEDED)
    sql("UPDATE jobs SET heartbeat_at = now() - interval '1 hour' WHERE id = :id", id=job_id)
    assert machine.claim(job_id, machine.owner_name()) is None
    assert (state(job_id).state, state(job_id).error) == ("failed", "bad file")


def test_a_job_whose_worker_keeps_dying_fails_clearly(monkeypatch):
    job_id, _ = new_job()
    dead = f"{socket.gethostname()}:{2**22 + 999}"
    from pipelines.core.settings import get_settings

    limit = get_settings().max_job_attempts
    for _ in range(limit):
        assert machine.claim(job_id, dead) is not None
    assert machine.claim(job_id, machine.owner_name()) is None
    job = state(job_id)
    assert job.state == "failed" and f"gave up after {limit} attempts" in job.error


def test_errors_fail_the_job_with_their_message():
    job_id, _ = new_job()

    def work(run):
        raise machine.JobFailed("source 'x': no file matches 'a/*.csv'")

    assert machine.execute(job_id, work) == "failed"
    assert state(job_id).error == "source 'x': no file matches 'a/*.csv'"


def test_an_unplanned_error_names_its_kind_never_its_text():
    job_id, _ = new_job()

    def work(run):
        raise RuntimeError("(psycopg.errors.Foo) SELECT password FROM users WHERE id = 'secret-value'")

    assert machine.execute(job_id, work) == "failed"
    error = state(job_id).error
    assert error.startswith("internal error (RuntimeError)") and job_id in error
    assert "SELECT" not in error and "secret-value" not in error


def test_reaper_resends_queued_jobs_whose_message_is_gone():
    job_id, first = new_job()
    resent = []
    sql("UPDATE jobs SET sent_at = now() - interval '1 minute' WHERE id = :id", id=job_id)
    report = reaper.reap(resent.append, lambda queue, task: task == first[0].celery_task_id)
    assert report["resent"] == [] and resent == []  # the message is still there
    report = reaper.reap(resent.append, lambda queue, task: False)
    assert report["resent"] == [job_id]
    assert [j.id for j in resent] == [job_id] and resent[0].celery_task_id != first[0].celery_task_id
    assert state(job_id).celery_task_id == resent[0].celery_task_id


def test_reaper_requeues_running_jobs_whose_heartbeat_stopped_and_fails_timeouts():
    stale_id, _ = new_job()
    machine.claim(stale_id, "gone-host:1")
    slow_id, _ = new_job()
    machine.claim(slow_id, machine.owner_name())
    sql("UPDATE jobs SET heartbeat_at = now() - interval '1 hour' WHERE id = :id", id=stale_id)
    sql("UPDATE jobs SET started_at = now() - interval '2 hours', timeout_seconds = 60 WHERE id = :id", id=slow_id)
    resent = []
    report = reaper.reap(resent.append, lambda q, t: True)
    assert report["recovered"] == [stale_id] and report["timed_out"] == [slow_id]
    assert [j.id for j in resent] == [stale_id]
    assert state(stale_id).state == "queued"
    assert (state(slow_id).state, state(slow_id).error) == ("failed", "timed out after 60 seconds")
