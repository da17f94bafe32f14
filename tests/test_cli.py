"""The `ingot` CLI as a user runs it: keys on the database, jobs through the HTTP API."""

import json
import os
import subprocess
import sys

import pytest

from testkit.datagen import sources_toml, write_csv
from tests.helpers import ROOT


@pytest.fixture
def worker(shared_worker):
    """This module's tests share one worker (tests/conftest.py)."""
    return shared_worker


def ingot(*args: str, input_text: str | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120, input=input_text)


def test_keys_create_prints_only_the_key_then_list_and_revoke(api_url):
    created = ingot("keys", "create", "--name", "ci-bot", "--scopes", "read,write")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("ingot_") and "\n" not in key
    assert "shown" in created.stderr or "not shown again" in created.stderr
    listed = ingot("keys", "list")
    assert "ci-bot" in listed.stdout and key not in listed.stdout
    key_id = next(w for w in listed.stdout.split() if w.startswith("key_"))
    jobs = ingot("jobs", "--url", api_url, "--api-key", key)
    assert jobs.returncode == 0, jobs.stderr
    assert ingot("keys", "revoke", key_id).returncode == 0
    denied = ingot("jobs", "--url", api_url, "--api-key", key)
    assert denied.returncode == 1 and "AUTHENTICATION_ERROR" in denied.stderr
    bad = ingot("keys", "create", "--name", "x", "--scopes", "root")
    assert bad.returncode == 2 and bad.stdout == ""


def test_an_api_that_cannot_be_reached_is_said_at_each_wait_then_in_one_error_not_a_traceback():
    from tests.helpers import free_port

    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    answer = ingot("jobs", "--url", address, "--api-key", "ingot_x")
    assert answer.returncode == 1
    said = " ".join(answer.stderr.split())  # as the terminal wrapped it
    # Each wait before trying again is said as it begins (1, 2 and 4 s), then the one error.
    assert [f"trying again in {s} s" in said for s in (1, 2, 4)] == [True] * 3
    assert said.count("could not connect") == 3
    assert f"cannot reach the Ingot API at {address}/" in said and "ingot up" in said
    assert "Traceback" not in answer.stderr


def test_a_refused_request_names_the_field_and_what_is_wrong(api_url, admin_key, tmp_path):
    answer = ingot("export", "--format", "xlsx", "-o", str(tmp_path / "x.xlsx"), "--url", api_url,
                   "--api-key", admin_key)
    assert answer.returncode == 1
    said = " ".join(answer.stderr.split())  # as the terminal wrapped it
    assert "422 VALIDATION_ERROR" in said and "format: Input should be 'csv', 'parquet' or 'jsonl'" in said


def test_ingest_wait_follows_the_job_and_reports_by_exit_code(api_url, admin_key, worker, write_sources, data_dir):
    write_csv(data_dir / "a.csv", 30, bad_every=10)
    (data_dir / "broken.csv").write_text("id\n1\n")
    write_sources(sources_toml("prices", "a.csv") + sources_toml("broken", "broken.csv"))
    env = {"INGOT_URL": api_url, "INGOT_API_KEY": admin_key}
    done = ingot("ingest", "prices", "--wait", **env)
    assert done.returncode == 0, done.stderr
    assert "succeeded" in done.stderr and "27 records, 3 quarantined" in done.stderr
    again = ingot("ingest", "prices", "--wait", **env)  # the file unchanged: the counts alone would say 0
    said = " ".join(again.stderr.split())
    assert again.returncode == 0 and "0 records, 0 quarantined" in said
    assert "prices: 1 file(s) unchanged since their last load, skipped (force to read them again)" in said
    failed = ingot("ingest", "broken", "--wait", **env)
    assert failed.returncode == 1 and "failed" in failed.stderr and "missing required column" in failed.stderr
    listing = ingot("jobs", "--state", "succeeded", **env)
    assert listing.returncode == 0 and "succeeded" in listing.stdout
    job_id = done.stderr.split("queued ")[1].split()[0]
    shown = ingot("jobs", "show", job_id, **env)
    assert shown.returncode == 0 and json.loads(shown.stdout)["records_processed"] == 27
    missing = ingot("ingest", "nope", **env)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr

    held = ingot("quarantine", "prices", COLUMNS="200", **env)
    assert held.returncode == 0, held.stderr
    rows = [line for line in held.stdout.splitlines() if "data/a.csv" in line]
    assert [line.split("│")[3].strip() for line in rows] == ["11", "21", "31"]
    assert all("cannot parse 'n/a' as float" in line for line in rows)
    assert "3 unresolved row(s)" in held.stderr
    assert "0 resolved row(s)" in ingot("quarantine", "--state", "resolved", **env).stderr


def test_ctrl_c_stops_the_watching_not_the_job_and_says_so(api_url, admin_key, no_worker, write_sources, data_dir):
    import signal

    from tests.helpers import wait_for

    write_csv(data_dir / "a.csv", 5)
    write_sources(sources_toml("prices", "a.csv"))
    env = {**os.environ, "INGOT_URL": api_url, "INGOT_API_KEY": admin_key}
    # As at a terminal: Ctrl-C's signal acted on. A shell that starts a command in the background (as a
    # CI runner may start this suite) has it ignored, and a child inherits that.
    watching = subprocess.Popen([sys.executable, "-m", "cli.main", "ingest", "prices", "--wait"], cwd=ROOT,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        from cli.client import Client

        with Client(api_url, admin_key) as client:  # queued, with no worker: the watching goes on
            queued = watching.stderr.readline()  # "queued job_... for prices", then the progress bar
            [job] = wait_for(lambda: client.jobs(kind="ingestion")[0], timeout=30, message="the job queued")
            assert job["id"] in queued
            watching.send_signal(signal.SIGINT)
            _out, said = watching.communicate(timeout=30)
            assert watching.returncode == 130, said
            assert f"stopped watching; {job['id']} goes on" in said and "Traceback" not in said
            assert client.job(job["id"])["state"] == "queued"  # the job itself is left alone
    finally:
        watching.kill()


def test_sources_shows_each_schedule_and_when_it_fires_next(api_url, admin_key, write_sources, data_dir):
    write_csv(data_dir / "a.csv", 5)
    write_sources(sources_toml("prices", "a.csv") + sources_toml("nightly", "a.csv").replace(
        'primary_key', 'schedule = "0 2 * * *"\nprimary_key'))
    listed = ingot("sources", COLUMNS="250", INGOT_URL=api_url, INGOT_API_KEY=admin_key)
    assert listed.returncode == 0, listed.stderr
    nightly = next(line for line in listed.stdout.splitlines() if "nightly" in line)
    prices = next(line for line in listed.stdout.splitlines() if "prices" in line)
    next_run = nightly.split("│")[6].strip()
    assert "0 2 * * *" in nightly and next_run.endswith("02:00:00Z"), nightly
    assert "never_run" in prices and "Z" not in prices.split("│")[6]  # unscheduled: no next run


def test_db_upgrade_is_idempotent():
    first, second = ingot("db", "upgrade"), ingot("db", "upgrade")
    assert first.returncode == 0 and second.returncode == 0 and "up to date" in second.stderr


def test_export_downloads_and_verifies_the_file(api_url, admin_key, worker, write_sources, data_dir, tmp_path):
    import pyarrow.parquet as pq

    write_csv(data_dir / "a.csv", 25)
    write_sources(sources_toml("prices", "a.csv"))
    env = {"INGOT_URL": api_url, "INGOT_API_KEY": admin_key}
    assert ingot("ingest", "prices", "--wait", **env).returncode == 0
    out = tmp_path / "prices.parquet"
    done = ingot("export", "--format", "parquet", "--source", "prices", "-o", str(out), **env)
    assert done.returncode == 0, done.stderr
    assert "verified" in done.stderr and pq.read_table(out).num_rows == 25
    none = ingot("export", "--format", "csv", "--source", "nope", "-o", str(tmp_path / "x.csv"), **env)
    assert none.returncode == 0 and (tmp_path / "x.csv").read_text().startswith("id,source")


def test_curves_and_scenarios_from_the_command_line(api_url, admin_key, worker, write_sources, data_dir, tmp_path):
    from testkit.curves import CURVES_SOURCE, write_curves

    def row(asof, month, value):
        return ("K", asof, month, month, value, "USD", "USD/MWh", "power", "PJM", "West Hub")

    write_curves(data_dir / "k.csv", [row("2026-11-02", "2027-01", 10), row("2026-11-02", "2027-02", 20),
                                      row("2026-11-03", "2027-01", 12), row("2026-11-03", "2027-02", 15)])
    write_sources(CURVES_SOURCE.format(glob="*.csv"))
    env = {"INGOT_URL": api_url, "INGOT_API_KEY": admin_key}
    assert ingot("ingest", "curves", "--wait", **env).returncode == 0
    listed = ingot("curves", "--curve-key", "K", **env)
    assert listed.returncode == 0 and "2026-11-03" in listed.stdout and "2026-11-02" not in listed.stdout
    diff = ingot("curves", "diff", "K", "2026-11-02", "2026-11-03", **env)
    assert diff.returncode == 0, diff.stderr
    assert "+2.0000" in diff.stdout and "-5.0000" in diff.stdout and "-25.0000%" in diff.stdout

    definition = tmp_path / "scenario.json"
    definition.write_text(json.dumps({"name": "cli", "base": {"curve_keys": ["K"], "asof_date": "2026-11-03"},
                                      "shocks": [{"type": "percent", "value": 10}]}))
    created = ingot("scenarios", "create", str(definition), **env)
    assert created.returncode == 0, created.stderr
    scenario_id = created.stdout.strip()
    ran = ingot("scenarios", "run", scenario_id, "--wait", **env)
    assert ran.returncode == 0 and "succeeded" in ran.stderr, ran.stderr
    target = tmp_path / "out.csv"
    assert ingot("scenarios", "outputs", scenario_id, "--format", "csv", "-o", str(target), **env).returncode == 0
    lines = target.read_text().splitlines()
    assert lines[0] == "curve_key,contract_month,tenor_label,base,shocked,change"
    assert [tuple(line.split(",")[:2]) + (round(float(line.split(",")[4]), 6),) for line in lines[1:]] == [
        ("K", "2027-01-01", 13.2), ("K", "2027-02-01", 16.5)]
    shown = ingot("scenarios", "outputs", scenario_id, **env)
    assert [round(o["shocked"], 6) for o in json.loads(shown.stdout)["outputs"]] == [13.2, 16.5]
    missing = ingot("scenarios", "outputs", "scn_missing", **env)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
