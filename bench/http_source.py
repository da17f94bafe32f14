"""HTTP source benchmark: a local server pages out N JSON records; Ingot ingests them through the API
and a worker, beside the same records from a JSON Lines file.

    .venv/bin/python bench/http_source.py [--rows 1000000] [--page-size 10000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from harness import Bench, free_port


def record(i: int) -> dict:
    return {"id": f"id-{i:09d}", "period": "2020-01-01T00:00:00Z", "value": round(i * 0.01, 2),
            "region": ("north", "south", "east", "west")[i % 4], "quality": i % 3}


def pages(rows: int, size: int) -> list[bytes]:
    return [json.dumps({"data": [record(i) for i in range(start, min(start + size, rows))]}).encode()
            for start in range(0, rows, size)]


def serve(port: int, rows: int, size: int, ready) -> None:
    bodies = pages(rows, size)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802
            page = int(parse_qs(urlsplit(self.path).query).get("page", ["1"])[0])
            body = bodies[page - 1] if 1 <= page <= len(bodies) else b'{"data": []}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    ready.set()
    server.serve_forever()



VALIDATION = ('required_columns = ["id", "period", "value"]\n'
              'data_types = { period = "datetime", value = "float", quality = "int" }\n')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--page-size", type=int, default=10_000)
    args = parser.parse_args()

    port = free_port()
    sources = (
        f'[sources.api]\ntype = "http"\nformat = "json"\nurl = "http://127.0.0.1:{port}/records"\n'
        f'records_path = "data"\nprimary_key = ["id"]\ntimeout = 60\n'
        f'pagination = {{ type = "page", param = "page", size_param = "size", size = {args.page_size} }}\n'
        f'[sources.api.validation]\n{VALIDATION}[sources.api.mapping]\nperiod = "timestamp"\n'
        '[sources.file]\ntype = "file"\nformat = "jsonl"\npath = "data/records.jsonl"\nprimary_key = ["id"]\n'
        f'[sources.file.validation]\n{VALIDATION}[sources.file.mapping]\nperiod = "timestamp"\n'
    )
    bench = Bench(sources)
    path: Path = bench.data / "records.jsonl"
    with path.open("w") as fh:
        for i in range(args.rows):
            fh.write(json.dumps(record(i)) + "\n")
    ready = multiprocessing.Event()
    server = multiprocessing.Process(target=serve, args=(port, args.rows, args.page_size, ready), daemon=True)
    server.start()
    ready.wait(120)
    try:
        bench.start()
        bench.quiesce()
        api_job, api_seconds, api_peak = bench.ingest(["api"])
        bench.quiesce()  # the first load's aftermath (autovacuum, dirty pages) is not timed in the next
        file_job, file_seconds, file_peak = bench.ingest(["file"])
    finally:
        bench.stop()
        server.terminate()
    assert api_job["records_processed"] == file_job["records_processed"] == args.rows
    print(f"input: {args.rows:,} JSON records; HTTP in pages of {args.page_size:,}")
    print(f"HTTP source       {api_seconds:7.2f} s  {args.rows / api_seconds:10,.0f} rows/s  "
          f"peak RSS {api_peak / 2**20:.0f} MB")
    print(f"JSON Lines file   {file_seconds:7.2f} s  {args.rows / file_seconds:10,.0f} rows/s  "
          f"peak RSS {file_peak / 2**20:.0f} MB")
    print(f"HTTP / file rows/s: {file_seconds / api_seconds:.0%}")


if __name__ == "__main__":
    main()
