"""What every `ingot` command shares: the consoles, the address and key options, errors, progress."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from cli.client import Client, IngotError

T = TypeVar("T")
err = Console(stderr=True)
# Piped output is read by scripts: never truncate ids to fit an 80-column default.
out = Console() if sys.stdout.isatty() else Console(width=250)

UrlOpt = Annotated[str, typer.Option("--url", envvar="INGOT_URL", help="control plane address")]
KeyOpt = Annotated[str | None, typer.Option("--api-key", envvar="INGOT_API_KEY", help="API key")]
DEFAULT_URL = "http://127.0.0.1:8000"


def client_for(url: str, api_key: str | None) -> Client:
    """A client whose waits before trying again are said on stderr as they begin, not sat through in
    silence (an API not running costs 7 s of retries before the command gives up)."""
    def say(why: str, seconds: float) -> None:
        err.print(f"[yellow]waiting[/yellow] the Ingot API at {url} {why}; trying again in {seconds:g} s",
                  highlight=False)

    return Client(url, api_key, on_retry=say)


def group_client(ctx: typer.Context, url: str, api_key: str | None) -> Client:
    """A client for a subcommand of a group whose callback took the options too: `ingot jobs --url U
    show ID` and `ingot jobs show ID --url U` both work."""
    parent_url, parent_key = ctx.obj
    return client_for(url if url != DEFAULT_URL else parent_url, api_key or parent_key)


def through(url: str, api_key: str | None, action: Callable[[Client], T]) -> T:
    """ACTION's answer, with a client for URL and API_KEY; an error answer ends the command (exit 1)."""
    with client_for(url, api_key) as client:
        try:
            return action(client)
        except IngotError as exc:
            fail(exc)


def fail(exc: IngotError) -> NoReturn:
    err.print(described(exc))
    raise typer.Exit(1)


def described(exc: IngotError) -> str:
    """An error answer in a line: its status, code and message, and each field it names with what is wrong."""
    fields = "; ".join(f"{e.get('field')}: {e.get('message')}" for e in exc.details.get("errors", [])
                       if isinstance(e, dict))
    return f"[red]error[/red] {exc.status} {exc.code}: {exc.message}" + (f" ({fields})" if fields else "")


@contextmanager
def watching(job_id: str) -> Iterator[None]:
    """Ctrl-C within stops the watching of JOB_ID, not the job, and says so (exit 130): from the moment
    the job is known, so a Ctrl-C before the progress bar is up is answered the same."""
    try:
        yield
    except KeyboardInterrupt:
        err.print(f"stopped watching; {job_id} goes on (`ingot jobs show {job_id}` to look, "
                  f"`ingot jobs cancel {job_id}` to stop it)")
        raise typer.Exit(130) from None


def follow(client: Client, job_id: str) -> dict:
    """A live progress bar until JOB_ID ends; returns the final job (Ctrl-C: `watching`)."""
    with watching(job_id), Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[records]} records, {task.fields[failed]} quarantined"),
            TimeElapsedColumn(), console=err) as progress:
        task = progress.add_task(job_id, total=100, records=0, failed=0)

        def update(job: dict) -> None:
            progress.update(task, completed=job["progress"], records=job["records_processed"],
                            failed=job["records_failed"], description=f"{job_id} {job['state']}")

        return client.wait(job_id, on_update=update)
