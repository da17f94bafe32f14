"""A RabbitMQ node of a test's own: started from the machine's RabbitMQ installation with its own
name, ports and data folder, so a test may crash it and start it again without touching anyone's
broker (the shared one on 5672 included). Its data survive a restart, as a real node's do."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from testkit.waiting import wait_for
from tests.helpers import free_port

SERVER = next(iter(sorted(Path("/usr/lib/rabbitmq/lib").glob("rabbitmq_server-*/sbin/rabbitmq-server"))), None)


def available() -> str | None:
    """Why no node can be started here, or None when one can."""
    if SERVER is None:
        return "RabbitMQ is not installed (no /usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin/rabbitmq-server)"
    if os.geteuid() != 0 and not os.access(SERVER, os.X_OK):
        return f"{SERVER} cannot be run by this user"
    return None


class RabbitNode:
    """`start()`, `kill()` (SIGKILL: a crash, nothing flushed beyond what RabbitMQ already wrote),
    `stop()` (a clean shutdown) and `start()` again on the same data; `url` for INGOT_BROKER_URL."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ingot-rabbit-"))
        self.port, dist = free_port(), free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        (self.dir / "enabled_plugins").write_text("[].\n")  # no management listener to collide with
        (self.dir / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
                                                "loopback_users = none\n")
        self.env = {**os.environ, "HOME": str(self.dir), "RABBITMQ_NODENAME": f"ingot{self.port}@localhost",
                    "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(dist),
                    "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"), "RABBITMQ_LOG_BASE": str(self.dir / "log"),
                    "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
                    "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
                    "RABBITMQ_PID_FILE": str(self.dir / "pid"), "ERL_EPMD_ADDRESS": "127.0.0.1"}
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> RabbitNode:
        self.process = subprocess.Popen([str(SERVER)], env=self.env, cwd=self.dir, start_new_session=True,
                                        stdout=open(self.dir / "server.log", "a"), stderr=subprocess.STDOUT)

        def listening() -> bool:
            assert self.process.poll() is None, self.output()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                return False

        wait_for(listening, timeout=timeout, interval=0.1, message="the test's RabbitMQ node")
        return self

    def kill(self) -> None:
        """A crash: the whole node at once."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
            self.process = None

    def stop(self, timeout: float = 30) -> None:
        """A clean shutdown, as a restart by its service manager does."""
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
            self.process = None

    def output(self) -> str:
        return (self.dir / "server.log").read_text()[-3000:]

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
