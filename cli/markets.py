"""`ingot curves` and `ingot scenarios`: forward curves and what-if runs over the HTTP API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.client import IngotError
from cli.common import DEFAULT_URL, KeyOpt, UrlOpt, client_for, err, fail, follow, group_client, out

curves_app = typer.Typer(help="Forward curves: list points, compare two as-of dates.", invoke_without_command=True)
scenarios_app = typer.Typer(help="Scenarios: declare, run, read their outputs.")


@curves_app.callback()
def curves_list(
    ctx: typer.Context,
    curve_key: Annotated[str | None, typer.Option("--curve-key", help="one curve")] = None,
    asof: Annotated[str | None, typer.Option("--asof", help="as-of date (default: each curve's latest)")] = None,
    limit: int = 500,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """List curve points."""
    ctx.obj = (url, api_key)
    if ctx.invoked_subcommand:
        return
    with client_for(url, api_key) as client:
        try:
            points, _ = client.curves(curve_key=curve_key, asof_date=asof, limit=limit)
        except IngotError as exc:
            fail(exc)
    table = Table("curve_key", "asof", "month", "tenor", "value", "unit", "iso", "location")
    for p in points:
        table.add_row(p["curve_key"], p["asof_date"], p["contract_month"][:7], p["tenor_label"] or "",
                      f"{p['value']:.4f}" if p["value"] is not None else "", p["unit"] or "", p["iso"] or "",
                      p["location"] or "")
    out.print(table)


def _signed(value: float | None, suffix: str = "") -> str:
    if value is None:
        return ""
    colour = "green" if value > 0 else "red" if value < 0 else "white"
    return f"[{colour}]{value:+.4f}{suffix}[/{colour}]"


@curves_app.command("diff")
def curves_diff(ctx: typer.Context, curve_key: str, asof_a: str, asof_b: str, url: UrlOpt = DEFAULT_URL,
                api_key: KeyOpt = None) -> None:
    """Compare CURVE_KEY's curve on ASOF_B with ASOF_A, contract month by contract month."""
    with group_client(ctx, url, api_key) as client:
        try:
            rows = client.curve_diff(curve_key, asof_a, asof_b)
        except IngotError as exc:
            fail(exc)
    table = Table("month", "tenor", asof_a, asof_b, "change", "change %", title=curve_key)
    for r in rows:
        table.add_row(r["contract_month"][:7], r["tenor_label"] or "",
                      "" if r["value_a"] is None else f"{r['value_a']:.4f}",
                      "" if r["value_b"] is None else f"{r['value_b']:.4f}",
                      _signed(r["diff_abs"]), _signed(r["diff_pct"], "%"))
    out.print(table)


@scenarios_app.command("create")
def scenarios_create(file: Path, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None) -> None:
    """Declare a scenario from FILE (JSON: name, base, shocks); prints its id."""
    try:
        definition = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        err.print(f"[red]error[/red] cannot read {file}: {exc}")
        raise typer.Exit(1) from None
    with client_for(url, api_key) as client:
        try:
            scenario = client.create_scenario(definition)
        except IngotError as exc:
            fail(exc)
    out.print(scenario["scenario_id"])


@scenarios_app.command("run")
def scenarios_run(
    scenario_id: str,
    wait: Annotated[bool, typer.Option("--wait", help="follow the run to its end")] = False,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Run a scenario; prints the run id (a job id)."""
    with client_for(url, api_key) as client:
        try:
            run_id = client.run_scenario(scenario_id)["run_id"]
            if not wait:
                out.print(run_id)
                return
            job = follow(client, run_id)
        except IngotError as exc:
            fail(exc)
    out.print(run_id)
    if job["state"] != "succeeded":
        err.print(f"[red]run {job['state']}[/red]: {job.get('error') or ''}")
        raise typer.Exit(1)
    total = job["result"].get("metrics", {})
    err.print(f"[green]succeeded[/green]: {job['result'].get('points')} points over {job['result'].get('curves')} "
              f"curves; mean change {total.get('mean_change')}")


@scenarios_app.command("outputs")
def scenarios_outputs(
    scenario_id: str,
    fmt: Annotated[str, typer.Option("--format", help="json, csv or png")] = "json",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="write to this file")] = None,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """The latest succeeded run's outputs (a PNG needs -o)."""
    if fmt not in ("json", "csv", "png"):
        err.print("[red]error[/red] --format must be json, csv or png")
        raise typer.Exit(2)
    if fmt == "png" and output is None:
        err.print("[red]error[/red] a PNG needs -o FILE")
        raise typer.Exit(2)
    with client_for(url, api_key) as client:
        try:
            body = client.scenario_outputs(scenario_id, fmt)
        except IngotError as exc:
            fail(exc)
    data = json.dumps(body, indent=2).encode() if isinstance(body, dict) else body
    if output is None:
        out.print(data.decode(), end="", markup=False, highlight=False)
    else:
        output.write_bytes(data)
        err.print(f"[green]wrote {output}[/green] ({len(data)} bytes)")
