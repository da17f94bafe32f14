"""A webhook receiver on loopback that verifies every delivery with standardwebhooks' own verifier."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook


class Receiver:
    def __init__(self, port: int = 0, host: str = "127.0.0.1", *, secret: str | None = None,
                 received: list[dict] | None = None, delay: float = 0.0):
        # Set before it serves: a receiver taking over a port mid-stream (the fault suite's) must record
        # its first request in the ledger it was given, verified with the endpoint's secret.
        self.secret = secret
        self.statuses: list[int] = []  # answers to give, in order; then 200
        self.received: list[dict] = [] if received is None else received  # every request, verified or not
        self.delay = delay  # seconds to wait before answering: a slow receiver
        receiver = self

        class Handle(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                entry = {"path": self.path, "body": body, "headers": headers, "at": time.time(), "verified": None}
                try:
                    entry["payload"] = Webhook(receiver.secret).verify(body, headers)
                    entry["verified"] = True
                except Exception as exc:  # noqa: BLE001 - recorded for the test to assert on
                    entry["verified"] = False
                    entry["error"] = str(exc)
                if receiver.delay:
                    time.sleep(receiver.delay)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                entry["status"] = status
                receiver.received.append(entry)
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handle)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def verified(self, event_type: str | None = None) -> list[dict]:
        return [r for r in self.received
                if r["verified"] and (event_type is None or r["payload"]["type"] == event_type)]


class BadReceiver:
    """A receiver that never answers in time: TRICKLE sends its status line and then a header byte
    every 0.2 s for ever (each read is quick, the whole never ends); HANG reads the request and says
    nothing; REFUSE is a port bound and never listening, so every connection is refused (and no one
    else can be given the port meanwhile)."""

    def __init__(self, mode: str):
        import socket

        self.mode, self.stop = mode, threading.Event()
        self.sock = socket.socket() if mode == "refuse" else socket.create_server(("127.0.0.1", 0))
        if mode == "refuse":
            self.sock.bind(("127.0.0.1", 0))
        else:
            threading.Thread(target=self._accept, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        with conn:
            try:
                conn.recv(65536)
                if self.mode == "trickle":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                    while not self.stop.wait(0.2):
                        conn.sendall(b"a")
                else:
                    self.stop.wait(600)
            except OSError:
                pass  # Ingot hung up, as it should

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
