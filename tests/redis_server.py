"""A throw-away Redis server for the tests, on a loopback port of its own.

The machine's own ``redis-server`` (Debian's package; ``.ci/run`` installs it),
started by the tests with no persistence, on a free port (never 6379). A test
may stop and start it again on the same port (:meth:`RedisServer.restart`), as
an operator's Redis restart would look to the nodes: connections cut, every key
gone.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.pg_cluster import free_port

START_TIMEOUT_S = 10.0


@dataclass
class RedisServer:
    """A running (or stopped) server; :attr:`url` stays the same across restarts."""

    binary: str
    directory: Path
    port: int
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.5
                ) as probe,
            ):
                probe.sendall(b"PING\r\n")
                if probe.recv(16).startswith(b"+PONG"):
                    return
            if time.monotonic() > deadline or self._process.poll() is not None:
                raise RuntimeError(f"redis-server did not start on {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=START_TIMEOUT_S)
            self._process = None

    def restart(self) -> None:
        """Stop (SIGKILL: every key is lost) and start again on the same port."""
        self.stop()
        self.start()


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[RedisServer]:
    """Run a server for the block; skipped (a failure under
    RELAY_TEST_REQUIRE_ALL=1) without ``redis-server``."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not installed")
    directory.mkdir(parents=True, exist_ok=True)
    server = RedisServer(binary, directory, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
