"""A real HTTP server on loopback, in the test process, that tests script route by route."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

Handler = Callable[[dict, dict], tuple[int, dict, bytes]]


class FakeApi:
    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.calls: list[dict] = []
        api = self

        class Handle(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                parts = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                api.calls.append({"path": parts.path, "query": query, "headers": dict(self.headers),
                                  "at": time.monotonic()})
                handler = api.routes.get(parts.path)
                status, headers, body = handler(query, dict(self.headers)) if handler else (404, {}, b"no route")
                try:
                    self.send_response(status)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handle)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def calls_to(self, path: str) -> list[dict]:
        return [c for c in self.calls if c["path"] == path]


def records(start: int, count: int) -> list[dict]:
    return [{"id": f"h{i:05d}", "period": f"2026-02-01T{i % 24:02d}:00:00Z", "value": i * 1.5, "area": f"A{i % 3}"}
            for i in range(start, start + count)]


def as_json(body) -> tuple[int, dict, bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()


def http_source(name: str, url: str, extra: str = "") -> str:
    return f"""
[sources.{name}]
type = "http"
format = "json"
url = "{url}"
records_path = "response.data"
primary_key = ["id"]
timeout = 2
{extra}
[sources.{name}.validation]
required_columns = ["id", "period", "value"]
data_types = {{ period = "datetime", value = "float" }}
[sources.{name}.mapping]
period = "timestamp"
"""
