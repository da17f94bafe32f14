"""API benchmark: the authenticated, rate-limited routes beside bare FastAPI routes, under wrk.

    .venv/bin/python bench/api.py [--clients 1,10,50,200] [--seconds 5] [--rounds 3]
    .venv/bin/python bench/api.py --mixed [bench/readers.py's options]

`--mixed` is the mixed case instead: heavy readers beside pollers over 5,000,000 rows, the pollers'
and `/health`'s p99 beside the same pollers alone (bench/readers.py, which it runs).

Each server is one uvicorn process, as `ingot api` runs it (the bare one has no middleware, no
database, no key). The ratios are to the bare `async def` route, FastAPI's fastest answer (served on
the event loop); the bare `def` route (a trip to a worker thread per request) is shown beside it.
The key is an admin key, with the rate limit raised out of the way, and the API logs its JSON access
line per request as it does in production (to /dev/null here). wrk comes from Debian's package
(`apt-get install wrk`). Requests that got no answer (wrk's timeouts and socket errors) are reported
beside the figures, as are answers other than 200, and the CPU time the server process spent per
request. Each cell is run ROUNDS times, the bare routes and the two routes one after the other in
each round; the medians are shown, with the range of the ratio to the bare route over the rounds
(single runs on a shared 2-core machine spread by a fifth either way). """

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import httpx
from harness import ROOT, Bench, free_port, servers_with_a_job

BARE = """
import uvicorn
from fastapi import FastAPI

app = FastAPI()


@app.get("/bare")
def bare() -> dict:
    return {"data": {"status": "ok"}}


@app.get("/bare-async")
async def bare_async() -> dict:
    return {"data": {"status": "ok"}}


uvicorn.run(app, host="127.0.0.1", port={port}, log_config=None, access_log=False)
"""


def wait_up(url: str, headers: dict | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, headers=headers, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def _seconds(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def wrk(url: str, clients: int, seconds: int, headers: dict[str, str]) -> dict:
    args = ["wrk", f"-t{min(2, clients)}", f"-c{clients}", f"-d{seconds}s", "--timeout", "10s", "--latency"]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    figures = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
               "requests": int(re.search(r"(\d+) requests in", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        found = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", out, re.M)
        figures[f"p{pct}"] = _seconds(found.group(1)) if found else float("nan")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    figures["unanswered"] = sum(map(int, errors.groups())) if errors else 0
    non_ok = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    figures["not_ok"] = int(non_ok.group(1)) if non_ok else 0
    return figures


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the server process PID has used so far: its cost per request."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,10,50,200")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mixed", action="store_true",
                        help="heavy readers beside pollers: bench/readers.py, given every other option")
    if "--mixed" in sys.argv[1:]:
        others = [arg for arg in sys.argv[1:] if arg != "--mixed"]
        raise SystemExit(subprocess.call([sys.executable, str(Path(__file__).with_name("readers.py")), *others]))
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")

    bench = Bench("", INGOT_LOG_LEVEL="INFO")
    api_port, bare_port = free_port(), free_port()
    procs: list[subprocess.Popen] = []
    try:
        key, job_id = servers_with_a_job()
        env = dict(os.environ, INGOT_API_PORT=str(api_port))
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        procs.append(subprocess.Popen([sys.executable, "-m", "cli.main", "api", "--no-migrate"], cwd=ROOT, env=env,
                                      **quiet))
        procs.append(subprocess.Popen([sys.executable, "-c", BARE.replace("{port}", str(bare_port))], **quiet))
        auth = {"X-API-Key": key}
        wait_up(f"http://127.0.0.1:{api_port}/api/v1/jobs/{job_id}", auth)
        wait_up(f"http://127.0.0.1:{bare_port}/bare")
        targets = [("bare async def route", f"http://127.0.0.1:{bare_port}/bare-async", {}),
                   ("bare def route", f"http://127.0.0.1:{bare_port}/bare", {}),
                   ("GET /api/v1/jobs/{id}", f"http://127.0.0.1:{api_port}/api/v1/jobs/{job_id}", auth),
                   ("GET /api/v1/ingestion/status", f"http://127.0.0.1:{api_port}/api/v1/ingestion/status", auth)]
        print(f"wrk, {args.seconds} s per cell, {args.rounds} rounds alternated, medians shown; "
              f"one uvicorn process per server; {os.cpu_count()} cores shared")
        print(f"{'route':30} {'clients':>7} {'req/s':>9} {'of bare':>8} {'rounds':>13} {'p50':>9} {'p99':>9} "
              f"{'not 200':>8} {'no answer':>9} {'CPU/req':>8}")
        servers = (procs[1], procs[1], procs[0], procs[0])
        for clients in map(int, args.clients.split(",")):
            cells: list[list[dict]] = [[] for _ in targets]
            for _round in range(args.rounds):  # the three side by side, again and again: this machine is noisy
                for cell, (_name, url, headers), server in zip(cells, targets, servers, strict=True):
                    before = cpu_seconds(server.pid)
                    figures = wrk(url, clients, args.seconds, headers)
                    figures["cpu"] = (cpu_seconds(server.pid) - before) / max(figures["requests"], 1)
                    cell.append(figures)
            bare = cells[0]  # the strongest fair baseline: FastAPI's fastest answer, on the event loop
            for (name, _url, _headers), cell in zip(targets, cells, strict=True):
                ratios = [c["rps"] / b["rps"] for c, b in zip(cell, bare, strict=True)]
                print(f"{name:30} {clients:7} {median(c['rps'] for c in cell):9,.0f} "
                      f"{median(ratios):8.0%} {min(ratios):6.0%}-{max(ratios):<6.0%} "
                      f"{median(c['p50'] for c in cell) * 1000:7.1f}ms {median(c['p99'] for c in cell) * 1000:7.1f}ms "
                      f"{sum(c['not_ok'] for c in cell):8} {sum(c['unanswered'] for c in cell):9} "
                      f"{median(c['cpu'] for c in cell) * 1000:6.2f}ms", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
        bench.stop()


if __name__ == "__main__":
    main()
