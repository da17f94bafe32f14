"""Headless Chromium driven over the DevTools protocol, for tests that click through a real page.

Chromium speaks the protocol over a pipe (`--remote-debugging-pipe`: it reads commands on fd 3 and
writes answers on fd 4, each JSON message ended by a NUL byte), so no driver binary and no websocket
library are needed. A test opens a page and evaluates JavaScript in it, usually one async function
that clicks, types and waits as a person would, returning what it saw:

    with Chromium.start() as browser:
        browser.open("http://127.0.0.1:8000/docs")
        status = browser.evaluate("(async () => { ...; return code; })()")

Chromium itself comes from Debian's package; `make test` installs it where it is missing (see the
Makefile), and `chromium()` skips the test, saying so, where it could not be.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any

import pytest


def chromium() -> str:
    """Chromium's path, or the test is skipped with the reason."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("Chromium is not installed (`make test` installs Debian's package when run as root: "
                    "apt-get install chromium)")
    return found


class BrowserError(RuntimeError):
    pass


class Chromium:
    def __init__(self, process: subprocess.Popen, commands: int, answers: int, profile: str) -> None:
        self.process = process
        self._commands = os.fdopen(commands, "wb", buffering=0)
        self._answers = os.fdopen(answers, "rb", buffering=0)
        self._buffer = b""
        self._next_id = 0
        self._profile = profile
        self.session: str | None = None

    @classmethod
    def start(cls) -> Chromium:
        browser = chromium()
        to_browser_read, to_browser_write = os.pipe()
        from_browser_read, from_browser_write = os.pipe()

        def onto_3_and_4() -> None:  # in the child, before exec: the pipe ends where Chromium looks
            os.dup2(to_browser_read, 3)
            os.dup2(from_browser_write, 4)

        profile = tempfile.mkdtemp(prefix="ingot-chromium-")
        process = subprocess.Popen(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=onto_3_and_4, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_read)
        os.close(from_browser_write)
        return cls(process, to_browser_write, from_browser_read, profile)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (BrowserError, OSError):
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._commands.close()
        self._answers.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def call(self, method: str, params: dict | None = None, timeout: float = 30, **where: Any) -> dict:
        """Send one command and wait for its answer (events meanwhile are dropped)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}, **where}
        self._commands.write(json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
        raise BrowserError(f"{method}: no answer within {timeout} s")

    def _read(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._answers], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise BrowserError("Chromium did not answer in time")
            chunk = self._answers.read(65536)
            if not chunk:
                raise BrowserError("Chromium closed the pipe")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def open(self, url: str) -> None:
        """A new tab at URL, attached: later commands act on it."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable", sessionId=self.session)
        self.call("Page.navigate", {"url": url}, sessionId=self.session)

    def evaluate(self, expression: str, timeout: float = 60) -> Any:
        """EXPRESSION's value in the open page (a promise is awaited); a thrown error is raised here."""
        result = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True, "timeout": timeout * 1000},
                           timeout=timeout + 5, sessionId=self.session)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")
