"""`ingot`: run the parts of the system, manage keys, and drive jobs over the HTTP API."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import httpx
import typer
from rich.table import Table

from cli.client import IngotError
from cli.common import (
    DEFAULT_URL,
    KeyOpt,
    UrlOpt,
    client_for,
    described,
    err,
    fail,
    follow,
    group_client,
    out,
    through,
    watching,
)
from cli.markets import curves_app, scenarios_app
from pipelines.core.errors import DomainError

app = typer.Typer(help="Ingot: ingestion and job workers for market data.", no_args_is_help=True)
db_app = typer.Typer(help="Database maintenance.")
keys_app = typer.Typer(help="API keys: through the API with an admin key, else on the database directly.")
jobs_app = typer.Typer(help="List, show and follow jobs.", invoke_without_command=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(jobs_app, name="jobs")
app.add_typer(curves_app, name="curves")
app.add_typer(scenarios_app, name="scenarios")
# --- processes -----------------------------------------------------------------------------------


@app.command()
def up() -> None:
    """Start everything (embedded servers unless URLs are set) and supervise it until Ctrl-C."""
    from cli.supervisor import Supervisor

    raise typer.Exit(Supervisor().run())


@app.command()
def api(migrate: bool = typer.Option(True, help="wait for the database and migrate first")) -> None:
    """Run the HTTP API."""
    import uvicorn

    from api.main import SERVER_OPTIONS
    from pipelines.core.settings import get_settings

    settings = get_settings()
    if settings.auth_disabled and not _loopback(settings.api_host):
        raise typer.BadParameter(f"INGOT_AUTH_DISABLED makes every caller an admin: it is refused on "
                                 f"{settings.api_host}, which is not a loopback address", param_hint="INGOT_API_HOST")
    if migrate:
        _wait_and_migrate()
    # The API writes its own access line (api.access): uvicorn's would only be formatted to be dropped.
    uvicorn.run("api.main:create_app", factory=True, host=settings.api_host, port=settings.api_port,
                log_config=None, access_log=False, **SERVER_OPTIONS)


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="comma-separated queues")] = "ingest,export,scenarios,webhooks,default",
    concurrency: Annotated[int | None, typer.Option(help="pool processes")] = None,
    beat: Annotated[bool, typer.Option(help="also run the beat scheduler in this process")] = False,
    pool: Annotated[str, typer.Option(help="prefork (CPU-bound work) or threads (I/O: webhooks)")] = "prefork",
) -> None:
    """Run a Celery worker consuming QUEUES."""
    from pipelines.core.settings import get_settings
    from worker.app import app as celery_app

    settings = get_settings()
    # No mingle and no gossip: a worker needs nothing from the others (a job's row says whether it may
    # run, revoked or not), and it starts a second sooner without waiting for their replies. Task events
    # (-E) feed Flower; off, a worker sends them once a monitor asks (Flower does every 5 s).
    events = ["-E"] if settings.worker_task_events else []
    argv = ["worker", "-Q", queues, *events, "--loglevel", settings.log_level,
            "--concurrency", str(concurrency or settings.worker_concurrency), "-n", f"ingot-{os.getpid()}@%h",
            "--pool", pool, "--without-mingle", "--without-gossip"]
    if beat:
        argv += ["-B", "-s", str(settings.home / "celerybeat-schedule")]
    celery_app.worker_main(argv)


@app.command()
def beat() -> None:
    """Run Celery beat: the reaper and source schedules."""
    from pipelines.core.settings import get_settings
    from worker.app import app as celery_app

    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    celery_app.start(["beat", "-s", str(settings.home / "celerybeat-schedule"), "--loglevel", settings.log_level])


@app.command()
def flower() -> None:
    """Run Flower (basic auth on) to watch workers and tasks."""
    from pipelines.core.settings import get_settings
    from worker.app import app as celery_app

    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    # Tornado waits an hour for a request's headers and for ever for a trickling body, and Flower sets
    # neither: the API's request deadline holds here too, so idle or trickling connections are closed.
    from tornado.httpserver import HTTPServer

    HTTPServer.configure(None, idle_connection_timeout=settings.api_request_timeout_seconds,
                         body_timeout=settings.api_request_timeout_seconds)
    celery_app.start([
        "flower", f"--port={settings.flower_port}", f"--address={settings.api_host}",
        f"--basic-auth={settings.flower_credentials()}", "--persistent=True",
        f"--db={settings.home / 'flower.db'}", "--purge_offline_workers=60",
    ])


def _wait_and_migrate(timeout: float = 60) -> None:
    import time

    from pipelines.core import migrate
    from pipelines.jobs import status

    deadline = time.monotonic() + timeout
    while not status.database_ok():
        if time.monotonic() > deadline:
            err.print("[red]the database did not become reachable[/red]")
            raise typer.Exit(1)
        time.sleep(1)
    migrate.upgrade()


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply migrations (Alembic) up to the newest."""
    from pipelines.core import migrate

    migrate.upgrade()
    err.print("database is up to date")


# --- keys ----------------------------------------------------------------------------------------
# With an admin's key (--api-key or INGOT_API_KEY) these go through the API like every other command;
# without one, on the database directly: that is how the first admin key is made.


def _scopes(scopes: str) -> list[str]:
    return [s.strip() for s in scopes.split(",") if s.strip()]


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="who or what the key is for")],
    scopes: Annotated[str, typer.Option(help="comma-separated: read,write,admin")] = "read",
    expires: Annotated[str | None, typer.Option(help="ISO 8601 time the key stops working")] = None,
    tier: Annotated[str, typer.Option(help="rate-limit tier: basic, premium, unlimited, or as configured")
                    ] = "basic",
    rate_limit: Annotated[int | None, typer.Option(help="this key's own requests per minute")] = None,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Create a key and print it, alone, on standard output (it is shown only this once)."""
    if api_key:
        made = through(url, api_key, lambda client: client.create_key(name, _scopes(scopes), expires_at=expires,
                                                                       rate_limit_per_minute=rate_limit, tier=tier))
        key_id, shown_scopes, key = made["id"], made["scopes"], made["key"]
    else:
        from datetime import datetime

        from pipelines.auth import keys
        from pipelines.core import migrate
        from pipelines.core.db import session_scope

        migrate.upgrade()
        try:
            expiry = datetime.fromisoformat(expires) if expires else None
            with session_scope() as session:
                row, key = keys.create_key(session, name, _scopes(scopes), expiry, rate_limit, tier)
                key_id, shown_scopes = row.id, row.scopes
        except ValueError as exc:
            err.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from None
    err.print(f"created {key_id} ({name}, scopes {','.join(shown_scopes)}); store it now, it is not shown again")
    print(key)


@keys_app.command("list")
def keys_list(url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None) -> None:
    """List keys (never their secrets)."""
    if api_key:
        rows = through(url, api_key, lambda client: client.keys())
    else:
        from pipelines.auth import keys
        from pipelines.core.db import session_scope

        with session_scope() as session:
            rows = [{"id": k.id, "name": k.name, "prefix": k.prefix, "scopes": k.scopes, "tier": k.tier,
                     "created_at": k.created_at, "last_used_at": k.last_used_at, "expires_at": k.expires_at,
                     "revoked_at": k.revoked_at}
                    for k in keys.list_keys(session)]
    table = Table("id", "name", "prefix", "scopes", "tier", "created", "last used", "expires", "revoked")
    for k in rows:
        table.add_row(k["id"], k["name"], k["prefix"] + "…", ",".join(k["scopes"]), k["tier"],
                      *(str(k[f] or "")[:19] for f in ("created_at", "last_used_at", "expires_at", "revoked_at")))
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None) -> None:
    """Revoke a key by id: its next request is refused."""
    if api_key:
        through(url, api_key, lambda client: client.revoke_key(key_id))
    else:
        from pipelines.auth import keys
        from pipelines.core.db import session_scope

        with session_scope() as session:
            if not keys.revoke(session, key_id):
                err.print(f"no active key {key_id}")
                raise typer.Exit(1)
    err.print(f"revoked {key_id}")


@keys_app.command("rotate")
def keys_rotate(
    key_id: str,
    grace_hours: Annotated[float, typer.Option(help="how long the old secret keeps working")] = 24,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Give a key a new secret (printed alone on standard output); the old one works for the grace period."""
    if api_key:
        key = through(url, api_key, lambda client: client.rotate_key(key_id, grace_hours=grace_hours)["key"])
    else:
        from datetime import timedelta

        from pipelines.auth import keys
        from pipelines.core.db import session_scope

        with session_scope() as session:
            rotated = keys.rotate(session, key_id, timedelta(hours=grace_hours))
            if rotated is None:
                err.print(f"no active key {key_id}")
                raise typer.Exit(1)
            key = rotated[1]
    err.print(f"rotated {key_id}; the old secret works for {grace_hours:g} more hours")
    print(key)


users_app = typer.Typer(help="Users who log in for bearer tokens (acts on the database directly).")
app.add_typer(users_app, name="users")


@users_app.command("create")
def users_create(
    name: str,
    scopes: Annotated[str, typer.Option(help="comma-separated: read,write,admin")] = "read,write",
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="read the password from stdin")] = False,
) -> None:
    """Create a user; the password is asked for (or read from stdin), never taken as an argument."""
    from pipelines.auth import users
    from pipelines.core import migrate
    from pipelines.core.db import session_scope

    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    migrate.upgrade()
    try:
        with session_scope() as session:
            user = users.create_user(session, name, password, [s.strip() for s in scopes.split(",") if s.strip()])
    except DomainError as exc:  # a short password, unknown scopes, a name taken
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    err.print(f"created user {user.username} ({user.id}), scopes {','.join(user.scopes)}")


# --- jobs over the API ---------------------------------------------------------------------------


@app.command()
def ingest(
    sources: Annotated[list[str] | None, typer.Argument(help="source ids; all enabled when none")] = None,
    full: Annotated[bool, typer.Option("--full", help="every row, not only those past the cursor")] = False,
    force: Annotated[bool, typer.Option("--force", help="read again files unchanged since their last load")
                     ] = False,
    wait: Annotated[bool, typer.Option("--wait", help="follow the job to its end")] = False,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Start an ingestion job."""
    with client_for(url, api_key) as client:
        try:
            started = client.start_ingestion(sources or None, mode="full" if full else None, force=force)
            with watching(started["job_id"]):  # a Ctrl-C from here on leaves the job be, and says so
                err.print(f"queued {started['job_id']} for {', '.join(started['sources'])}")
                if not wait:
                    print(started["job_id"])
                    return
                job = follow(client, started["job_id"])
        except IngotError as exc:
            fail(exc)
    colour = "green" if job["state"] == "succeeded" else "red"
    err.print(f"[{colour}]{job['id']} {job['state']}[/{colour}]: {job['records_processed']} records, "
              f"{job['records_failed']} quarantined" + (f"; {job['error']}" if job.get("error") else ""))
    for source, outcome in ((job.get("result") or {}).get("sources") or {}).items():
        # What the counts alone do not say: files skipped as unchanged, a grown file read from its end.
        for note in (outcome or {}).get("notes") or ():
            err.print(f"  {source}: {note}", highlight=False, markup=False)
    raise typer.Exit(0 if job["state"] == "succeeded" else 1)


@app.command()
def export(
    fmt: Annotated[str, typer.Option("--format", help="parquet, csv or jsonl")],
    output: Annotated[str, typer.Option("-o", "--output", help="where to write the file")],
    source: Annotated[str | None, typer.Option(help="only this source")] = None,
    start: Annotated[str | None, typer.Option(help="from this time (ISO 8601)")] = None,
    end: Annotated[str | None, typer.Option(help="until this time (ISO 8601)")] = None,
    columns: Annotated[str | None, typer.Option(help="comma-separated columns")] = None,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Export rows to a file: start the export, follow it, download it and verify its checksum."""
    filters: dict = {"source": source} if source else {}
    if start or end:
        filters["date_range"] = {k: v for k, v in {"start": start, "end": end}.items() if v}
    with client_for(url, api_key) as client:
        try:
            started = client.start_export(fmt, filters=filters,
                                          columns=[c.strip() for c in columns.split(",")] if columns else None)
            job = follow(client, started["export_id"])
            if job["state"] != "succeeded":
                err.print(f"[red]export {job['state']}[/red]: {job.get('error') or ''}")
                raise typer.Exit(1)
            digest = client.download(job["id"], output)
        except IngotError as exc:
            fail(exc)
    err.print(f"[green]wrote {output}[/green]: {job['result']['row_count']} rows, "
              f"{job['result']['file_size']} bytes, sha256 {digest} verified")


@jobs_app.callback()
def jobs_list(
    ctx: typer.Context,
    kind: Annotated[str | None, typer.Option(help="ingestion, export or scenario_run")] = None,
    state: Annotated[str | None, typer.Option(help="queued, running, succeeded, ...")] = None,
    limit: int = 20,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """List recent jobs."""
    ctx.obj = (url, api_key)
    if ctx.invoked_subcommand:
        return
    with client_for(url, api_key) as client:
        try:
            jobs, _ = client.jobs(kind=kind, state=state, limit=limit)
        except IngotError as exc:
            fail(exc)
    table = Table("id", "kind", "state", "progress", "records", "failed", "created")
    for j in jobs:
        table.add_row(j["id"], j["kind"], j["state"], f"{j['progress']}%", str(j["records_processed"]),
                      str(j["records_failed"]), j["created_at"])
    out.print(table)


@jobs_app.command("show")
def jobs_show(ctx: typer.Context, job_id: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None) -> None:
    """Show one job in full."""
    with group_client(ctx, url, api_key) as client:
        try:
            out.print_json(data=client.job(job_id))
        except IngotError as exc:
            fail(exc)


@jobs_app.command("cancel")
def jobs_cancel(ctx: typer.Context, job_id: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None) -> None:
    """Cancel a job (a running one stops at its next batch; committed work stays)."""
    with group_client(ctx, url, api_key) as client:
        try:
            job = client.cancel(job_id)
        except IngotError as exc:
            fail(exc)
    err.print(f"{job['id']} is {job['state']}")


@app.command("sources")
def sources_list(
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """The declared sources: status, last sync, and for a schedule when it fires next (beat's own rule),
    when it last fired and how many ticks were skipped because a run was still active."""
    with client_for(url, api_key) as client:
        try:
            details = [client.source(s["id"]) for s in client.sources()]
        except IngotError as exc:
            fail(exc)
    table = Table("source", "type", "status", "last sync", "schedule", "next run", "last fired", "skipped")
    for d in details:
        table.add_row(d["id"], d["type"] or "", d["status"], d["last_sync"] or "", d["schedule"] or "",
                      d.get("next_run_at") or "", d.get("last_scheduled_at") or "",
                      str(d["sync_stats"].get("skipped", 0)) if d["schedule"] else "")
    out.print(table)


@app.command("quarantine")
def quarantine_list(
    source: Annotated[str | None, typer.Argument(help="only this source")] = None,
    state: Annotated[str, typer.Option(help="unresolved, resolved or all")] = "unresolved",
    job_id: Annotated[str | None, typer.Option("--job", help="only what this run met")] = None,
    limit: int = 50,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Rows that failed validation, each held once, with where they are and why."""
    with client_for(url, api_key) as client:
        try:
            rows, more = client.quarantine(source=source, job_id=job_id, state=state, limit=limit)
        except IngotError as exc:
            fail(exc)
    table = Table("source", "file", "line", "reason", "seen", "last run", "resolved")
    for r in rows:
        table.add_row(r["source"], r["file"] or "", str(r["line"] or ""), r["reason"], str(r["times_seen"]),
                      r["last_seen_job_id"] or "", r["resolved_at"] or "")
    out.print(table)
    err.print(f"{len(rows)} {state} row(s)" + (f"; more with --limit {limit * 2}" if more else ""))


def main() -> None:
    """`ingot`: the commands, with an API that cannot be reached (or an error answer no command
    caught) said in a line, not a traceback."""
    try:
        app()
    except httpx.TransportError as exc:
        where = exc.request.url.copy_with(path="/", query=None) if _has_request(exc) else "the API"
        err.print(f"[red]error[/red] cannot reach the Ingot API at {where} ({type(exc).__name__}: {exc}); "
                  "is it running (`ingot up`), and are --url / INGOT_URL right?")
        raise SystemExit(1) from None
    except IngotError as exc:
        err.print(described(exc))
        raise SystemExit(1) from None


def _has_request(exc: httpx.TransportError) -> bool:
    try:
        exc.request  # noqa: B018 (raises RuntimeError when the error was raised without one)
    except RuntimeError:
        return False
    return True


if __name__ == "__main__":
    main()
