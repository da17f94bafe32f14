"""`ingot up` on embedded servers alone: starts everything, ingests the demo, stops cleanly, restarts
on the same data."""

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from tests.helpers import ROOT, free_port, wait_for

pytestmark = pytest.mark.worker  # starts worker processes of its own


def processes_under(home) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(home) in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def start_up(home, api_port, flower_port):
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGOT_")}
    env.update(INGOT_HOME=str(home), INGOT_API_PORT=str(api_port), INGOT_FLOWER_PORT=str(flower_port),
               INGOT_SOURCES_FILE=str(ROOT / "sources.toml"), INGOT_WORKER_CONCURRENCY="1",
               INGOT_IGNORE_ENV_FILE="1", INGOT_LOG_LEVEL="WARNING")
    log = open(home.parent / f"up-{time.time_ns()}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "up"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def read(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()


def stop(proc, log) -> float:
    began = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(40)
    return time.monotonic() - began


def banner(proc, log) -> str:
    wait_for(lambda: "Ctrl-C stops everything" in read(log) or proc.poll() is not None, timeout=90, interval=0.3,
             message="the whole banner")
    assert proc.poll() is None, read(log)
    return read(log)


def test_up_runs_the_demo_and_ctrl_c_stops_everything(tmp_path):
    home = tmp_path / "home"
    api_port, flower_port = free_port(), free_port()
    proc, log = start_up(home, api_port, flower_port)
    try:
        shown = banner(proc, log)
        key = re.search(r"Admin key\s+(ingot_\S+)", shown).group(1)
        flower_user, flower_pass = re.search(r"user (\S+)\s+password (\S+)", shown).groups()
        assert f"http://127.0.0.1:{api_port}" in shown and f"http://127.0.0.1:{flower_port}" in shown
        api = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", headers={"X-API-Key": key})

        def demo_done():
            jobs = api.get("/api/v1/jobs").json()["data"]["jobs"]
            return jobs and jobs[-1]["state"] in ("succeeded", "failed") and jobs[-1]

        job = wait_for(demo_done, timeout=60, interval=0.3, message="the demo ingestion")
        assert job["state"] == "succeeded" and job["records_processed"] > 0 and job["records_failed"] > 0
        tasks = httpx.get(f"http://127.0.0.1:{flower_port}/api/tasks", auth=(flower_user, flower_pass)).json()
        assert job["celery_task_id"] in tasks
        assert processes_under(home), "expected the embedded servers to run under INGOT_HOME"

        # A second `ingot up` on the same data is refused before it starts anything (a second beat would
        # run every schedule twice), and the first one's key still works.
        again, again_log = start_up(home, free_port(), free_port())
        assert again.wait(60) == 1
        assert f"Ingot is already up on {home} (process {proc.pid})" in " ".join(read(again_log).split())
        assert api.get("/api/v1/jobs").status_code == 200
    finally:
        took = stop(proc, log)
    assert proc.returncode == 0, read(log)
    assert took < 30
    wait_for(lambda: not processes_under(home), timeout=10, message="every child and server to exit")

    # A second start finds the same data; the old key was replaced by a new one.
    proc, log = start_up(home, api_port, flower_port)
    try:
        key2 = re.findall(r"Admin key\s+(ingot_\S+)", banner(proc, log))[-1]
        api = httpx.Client(base_url=f"http://127.0.0.1:{api_port}")
        assert api.get("/api/v1/jobs", headers={"X-API-Key": key}).status_code == 401
        jobs = api.get("/api/v1/jobs", headers={"X-API-Key": key2}).json()["data"]["jobs"]
        assert job["id"] in [j["id"] for j in jobs]
    finally:
        stop(proc, log)
    wait_for(lambda: not processes_under(home), timeout=10, message="every child and server to exit")


def _postmaster(home) -> psutil.Process:
    return psutil.Process(int((home / "pgdata" / "postmaster.pid").read_text().split()[0]))


def _redis_server(home) -> psutil.Process:
    return next(p for p in processes_under(home) if "redis" in " ".join(p.cmdline()))


def test_up_starts_a_dead_embedded_server_again_and_the_work_goes_on(tmp_path):
    """Redis, then PostgreSQL, SIGKILLed under `ingot up`: each is started again on its data, /ready
    comes back by itself, nothing recorded is lost, and new work runs."""
    home = tmp_path / "home"
    api_port, flower_port = free_port(), free_port()
    proc, log = start_up(home, api_port, flower_port)
    try:
        key = re.search(r"Admin key\s+(ingot_\S+)", banner(proc, log)).group(1)
        api = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", headers={"X-API-Key": key}, timeout=10)

        def ended(job_id: str):
            try:
                job = api.get(f"/api/v1/jobs/{job_id}").json()["data"]
            except (httpx.HTTPError, KeyError, ValueError):
                return None
            return job if job["state"] in ("succeeded", "failed", "cancelled") else None

        def ready() -> bool:
            try:
                return api.get("/ready").status_code == 200
            except httpx.HTTPError:
                return False

        first = wait_for(lambda: (api.get("/api/v1/jobs").json()["data"]["jobs"] or [None])[0], timeout=60,
                         message="the demo ingestion")
        assert wait_for(lambda: ended(first["id"]), timeout=90, message="the demo ingestion's end")["state"] == \
            "succeeded"
        for name, victim in (("Redis", _redis_server), ("PostgreSQL", _postmaster)):
            victim(home).kill()
            wait_for(lambda name=name: f"embedded {name} had exited" in read(log), timeout=30,
                     message=f"{name} to be started again")
            wait_for(ready, timeout=60, message=f"/ready after {name} came back")
            started = wait_for(lambda: _start(api, "prices_csv"), timeout=30, message="a new job")
            job = wait_for(lambda started=started: ended(started), timeout=90, message=f"a job after {name} died")
            assert job["state"] == "succeeded", job
            assert first["id"] in [j["id"] for j in api.get("/api/v1/jobs").json()["data"]["jobs"]]
        assert proc.poll() is None
    finally:
        stop(proc, log)
    wait_for(lambda: not processes_under(home), timeout=10, message="every child and server to exit")


def _start(api: httpx.Client, source: str) -> str | None:
    answer = api.post("/api/v1/ingestion/start", json={"sources": [source]})
    return answer.json()["data"]["job_id"] if answer.status_code == 202 else None


def test_up_stops_everything_when_its_terminal_closes(tmp_path):
    """A closed terminal sends SIGHUP: the children, in sessions of their own, must not outlive it."""
    home = tmp_path / "home"
    proc, log = start_up(home, free_port(), free_port())
    try:
        banner(proc, log)
        assert processes_under(home)
        os.kill(proc.pid, signal.SIGHUP)
        proc.wait(40)
    finally:
        if proc.poll() is None:
            stop(proc, log)
    assert proc.returncode == 0, read(log)
    wait_for(lambda: not processes_under(home), timeout=10, message="every child and server to exit")


def test_up_says_which_port_is_taken_before_starting_anything(tmp_path):
    import socket

    home = tmp_path / "home"
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        proc, log = start_up(home, taken, free_port())
        assert proc.wait(60) == 1
    said = " ".join(read(log).split())  # as the terminal wrapped it
    assert f"port {taken} on 127.0.0.1 is not free" in said and "INGOT_API_PORT" in said
    assert not (home / "pgdata").exists()  # refused before any server started


def test_the_embedded_postgresql_stops_with_its_last_user_even_after_one_was_killed(tmp_path):
    """pgserver stops the server when the last process that joined it leaves; one killed with SIGKILL
    never leaves its list, so without pruning the server outlived every later run's exit."""
    home = tmp_path / "home"
    join = ("import sys, time; from pathlib import Path; from pipelines.core import embedded; "
            "embedded.postgres_url(Path(sys.argv[1])); print('joined', flush=True); time.sleep(float(sys.argv[2]))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGOT_")}
    killed = subprocess.Popen([sys.executable, "-c", join, str(home), "600"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert killed.stdout.readline().strip() == "joined"
        postmaster = _postmaster(home)
    finally:
        killed.kill()  # SIGKILL: no exit hook runs, its pid stays on pgserver's list
        killed.wait(10)
    try:
        assert postmaster.is_running()
        later = subprocess.run([sys.executable, "-c", join, str(home), "0"], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=120)
        assert later.returncode == 0, later.stderr
        wait_for(lambda: not postmaster.is_running(), timeout=30, message="the embedded PostgreSQL to stop")
    finally:
        if postmaster.is_running():  # the test failed: leave no server behind
            postmaster.terminate()
