"""`ingot up`: the whole system in the foreground, supervised, stopped cleanly on Ctrl-C.

Order matters: servers first (embedded unless URLs are set), then migrations and a local admin key,
then the api, worker, beat and Flower as child processes. A child that dies is started again, and so
is an embedded server (Redis or PostgreSQL), on the same data. On
SIGINT or SIGTERM the children stop first, then Redis, then PostgreSQL, within 30 seconds.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import httpx
from rich.console import Console

from pipelines.auth import keys
from pipelines.core import embedded, migrate
from pipelines.core.db import session_scope
from pipelines.core.logs import configure
from pipelines.core.settings import get_settings

console = Console(stderr=True)
LOCAL_KEY_NAME = "local-admin (ingot up)"


# What `ingot up` runs over the demo curves the first time: a cold winter, then a general sell-off.
DEMO_SCENARIO = {
    "name": "Demo: winter squeeze, then a 5% sell-off",
    "description": "Created by `ingot up` over the demo curves.",
    "base": {"curve_keys": ["NG_HENRY_HUB", "PWR_PJM_WEST_PEAK", "PWR_PJM_WEST_OFFPEAK", "PWR_ERCOT_NORTH_PEAK",
                            "PWR_ERCOT_NORTH_OFFPEAK"]},
    "shocks": [{"type": "tenor", "from": "2027-12", "to": "2028-02", "value": 1.0},
               {"type": "parallel", "value": 0.5}, {"type": "percent", "value": -5}],
}


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(self.argv, env=env, start_new_session=True)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.process is not None and self.alive():
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass


class Supervisor:
    def __init__(self) -> None:
        self.settings = get_settings()
        self.stopping = False
        self.redis: embedded.EmbeddedRedis | None = None
        self.children: list[Child] = []

    def _on_signal(self, signum, _frame) -> None:
        if not self.stopping:
            console.print(f"\n[yellow]{signal.Signals(signum).name}: stopping Ingot...[/yellow]")
        self.stopping = True

    def run(self) -> int:
        configure(self.settings.log_level, "console")
        refused = self._hold_home() or self._ports_in_use()
        if refused:
            console.print(f"[red]{refused}[/red]")
            return 1
        # SIGHUP too: its terminal closed. The children run in sessions of their own (a Ctrl-C reaches
        # them through this process, in order), so without it they would outlive the terminal.
        for stop_signal in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(stop_signal, self._on_signal)
        try:
            env = self._start_servers()
            migrate.upgrade()
            api_key = self._local_admin_key()
            self._start_children(env)
            if not self._wait_ready():
                console.print("[red]the API did not become ready; see the logs above[/red]")
                return 1
            self._banner(api_key)
            self._ingest_demo(api_key)
            while not self.stopping:
                self._revive_servers()
                self._restart_dead(env)
                time.sleep(0.5)
            return 0
        finally:
            self._shutdown()

    def _hold_home(self) -> str | None:
        """Take INGOT_HOME for this run (a lock the kernel drops with the process, however it ends), or
        say why not: a second `ingot up` on the same data would start a second beat (every schedule
        twice), rotate the first one's admin key and fight it for its ports."""
        home = self.settings.home
        home.mkdir(parents=True, exist_ok=True)
        self._lock = open(home / "up.pid", "a+")  # noqa: SIM115 (held for the life of the process)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self._lock.close()
            return (f"Ingot is already up on {home} (process {holder}), its API at "
                    f"http://{self.settings.api_host}:{self.settings.api_port}: stop it first (Ctrl-C in its "
                    "terminal), or give this one an INGOT_HOME of its own")
        self._lock.truncate(0)
        self._lock.write(str(os.getpid()))
        self._lock.flush()
        return None

    def _ports_in_use(self) -> str | None:
        """Say which of the API's and Flower's ports another program holds, before anything starts."""
        s = self.settings
        for name, port in (("INGOT_API_PORT", s.api_port), ("INGOT_FLOWER_PORT", s.flower_port)):
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((s.api_host, port))
                except OSError as exc:
                    return (f"port {port} on {s.api_host} is not free ({exc.strerror}): stop what holds it, "
                            f"or set {name}")
        return None

    def _start_servers(self) -> dict[str, str]:
        s = self.settings
        s.home.mkdir(parents=True, exist_ok=True)
        if not s.database_url:
            console.print(f"starting embedded PostgreSQL under {s.home / 'pgdata'}")
        database_url = embedded.database_url(s)
        if not s.redis_url:
            console.print(f"starting embedded Redis under {s.home / 'redis'}")
            self.redis = embedded.EmbeddedRedis(s.home)
            s.redis_url = self.redis.start()
        env = dict(os.environ)
        env.setdefault("INGOT_LOG_FORMAT", "console")  # a person is watching this terminal
        env.update(
            INGOT_DATABASE_URL=database_url,
            INGOT_REDIS_URL=s.redis_url,
            INGOT_HOME=str(s.home),
            INGOT_FLOWER_BASIC_AUTH=s.flower_credentials(),
        )
        return env

    def _local_admin_key(self) -> str:
        # Keys are stored hashed, so the previous run's key cannot be shown again: it gets a new secret.
        # Rotated, not replaced, so the webhooks made with it keep receiving.
        with session_scope() as session:
            row = keys.live_named(session, LOCAL_KEY_NAME)
            rotated = keys.rotate(session, row.id, timedelta(0)) if row is not None else None
            if rotated is not None:
                return rotated[1]
            _row, key = keys.create_key(session, LOCAL_KEY_NAME, ["admin"])
        return key

    def _start_children(self, env: dict[str, str]) -> None:
        cli = [sys.executable, "-m", "cli.main"]
        self.children = [
            Child("api", [*cli, "api", "--no-migrate"]),
            Child("worker", [*cli, "worker", "--queues", "ingest,export,scenarios,default"]),
            # Deliveries get processes of their own, so a long ingestion never delays a webhook.
            Child("webhooks", [*cli, "worker", "--queues", "webhooks", "--concurrency", "4"]),
            Child("beat", [*cli, "beat"]),
            Child("flower", [*cli, "flower"]),
        ]
        for child in self.children:
            child.start(env)

    def _wait_ready(self, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        url = f"http://{self.settings.api_host}:{self.settings.api_port}/ready"
        while time.monotonic() < deadline and not self.stopping:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        return False

    def _banner(self, api_key: str) -> None:
        s = self.settings
        api = f"http://{s.api_host}:{s.api_port}"
        user, _, password = s.flower_credentials().partition(":")
        lines = [
            "[bold green]Ingot is up[/bold green]",
            f"  API        {api}",
            f"  API docs   {api}/docs",
            f"  Flower     http://{s.api_host}:{s.flower_port}   user {user}   password {password}",
            f"  Admin key  {api_key}",
            f"  Data       {s.home}",
            f"  Try        curl -H 'X-API-Key: {api_key}' {api}/api/v1/jobs",
            "  Ctrl-C stops everything.",
        ]
        console.print("\n".join(lines), soft_wrap=True)  # in one write: a reader never sees half of it

    def _ingest_demo(self, api_key: str) -> None:
        from cli.client import Client, IngotError

        url = f"http://{self.settings.api_host}:{self.settings.api_port}"
        try:
            with Client(url, api_key) as client:
                started = client.start_ingestion()
            console.print(f"ingesting the demo sources: job {started['job_id']} ({', '.join(started['sources'])})",
                          soft_wrap=True)
        except IngotError as exc:
            console.print(f"[yellow]demo ingestion not started: {exc.message}[/yellow]")
            return
        if "forward_curves" in started["sources"]:
            threading.Thread(target=self._demo_scenario, args=(url, api_key, started["job_id"]), daemon=True,
                             name="demo-scenario").start()

    def _demo_scenario(self, url: str, api_key: str, ingestion_id: str) -> None:
        """Once the demo curves are in, and if no scenario exists yet, run a demo scenario and save its
        chart under INGOT_HOME."""
        from cli.client import Client, IngotError

        try:
            with Client(url, api_key) as client:
                if client.wait(ingestion_id, timeout=600)["state"] != "succeeded":
                    return
                if client.scenarios(limit=1)[0]:  # a scenario exists already: the demo has run
                    return
                scenario = client.create_scenario(DEMO_SCENARIO)
                run = client.wait(client.run_scenario(scenario["scenario_id"])["run_id"], timeout=600)
                if run["state"] != "succeeded":
                    console.print(f"[yellow]demo scenario {run['state']}: {run['error']}[/yellow]")
                    return
                chart = self.settings.home / "demo-scenario.png"
                picture = client.scenario_outputs(scenario["scenario_id"], "png")
                assert isinstance(picture, bytes)
                chart.write_bytes(picture)
            console.print(f"demo scenario {scenario['scenario_id']} ran: its chart is {chart}", soft_wrap=True)
        except (IngotError, TimeoutError, httpx.HTTPError, OSError) as exc:
            console.print(f"[yellow]demo scenario not run: {exc}[/yellow]")

    def _revive_servers(self) -> None:
        """The embedded servers are supervised like the children: one that dies is started again on the
        same data, and the API and workers reconnect by themselves."""
        if self.stopping:
            return
        try:
            if self.redis is not None and self.redis.revive():
                console.print("[yellow]embedded Redis had exited; started it again[/yellow]")
            if embedded.revive_postgres():
                console.print("[yellow]embedded PostgreSQL had exited; started it again[/yellow]")
        except (OSError, RuntimeError) as exc:  # tried again on the next pass
            console.print(f"[red]could not start an embedded server again: {exc}[/red]")

    def _restart_dead(self, env: dict[str, str]) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.alive() or self.stopping:
                continue
            code = child.process.returncode if child.process else None
            # Back off a child that keeps dying: at most 5 restarts a minute.
            child.restarts = [t for t in child.restarts if now - t < 60]
            if len(child.restarts) >= 5:
                continue
            console.print(f"[yellow]{child.name} exited ({code}); starting it again[/yellow]")
            child.restarts.append(now)
            child.start(env)

    def _shutdown(self) -> None:
        self.stopping = True
        deadline = time.monotonic() + 25
        for child in self.children:
            child.signal(signal.SIGTERM)
        escalated = False
        while any(c.alive() for c in self.children) and time.monotonic() < deadline:
            if not escalated and time.monotonic() > deadline - 15:
                # A worker still finishing a task after 10 s: cold shutdown; its job resumes next time.
                for child in self.children:
                    child.signal(signal.SIGQUIT)
                escalated = True
            time.sleep(0.1)
        for child in self.children:
            child.signal(signal.SIGKILL)
            if child.process:
                child.process.wait()
        if self.redis:
            self.redis.stop()
        console.print("Ingot stopped.")
        # The embedded PostgreSQL is stopped by pgserver at exit, after everything else.
