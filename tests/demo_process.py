"""``relay demo`` as a child process, with what it printed parsed.

Shared by the tests that need the whole product as a newcomer starts it: one
process with the broker, a simulated device and its device page. The demo
prints its addresses and the demo engineer's credentials; they are read from
there, so the printed text is tested too.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyotp

from tests.cli.lines import LineReader
from tests.cli.listen import ALL_ON_PORT_ZERO

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0

# What `relay demo` prints (see relay/cli.py cmd_demo).
_CONSOLE = re.compile(r"^  engineer listener  (https://127\.0\.0\.1:\d+/)")
_DEVICE_PAGE = re.compile(r"^  device page        (http://127\.0\.0\.1:\d+/)")
_METRICS = re.compile(r"^  metrics            (http://127\.0\.0\.1:\d+/metrics)")
_PASSWORD = re.compile(r"^  demo engineer      user (\S+), password (\S+)")
_SECRET = re.compile(r"TOTP secret ([A-Z2-7]+)")
_READY = "Press Ctrl-C to stop."


@dataclass
class DemoProcess:
    """A running ``relay demo`` and what it printed."""

    process: subprocess.Popen[str]
    data_dir: Path
    reader: LineReader
    console_url: str = ""
    device_page_url: str = ""
    metrics_url: str = ""
    username: str = ""
    password: str = ""
    totp_secret: str = ""
    output: list[str] = field(default_factory=list)
    _last_code: str = ""

    def totp(self) -> str:
        """A code for the demo engineer that no login of this demo used yet
        (a code is accepted once per 30 s step)."""
        totp = pyotp.TOTP(self.totp_secret)
        code = totp.now()
        if self._last_code == code:
            time.sleep(30 - time.time() % 30 + 0.5)
            code = totp.now()
        self._last_code = code
        return code

    def stop(self) -> int | None:
        """SIGINT (Ctrl-C), then the exit code; killed if it does not stop."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.drain()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: no shutdown at all, as a crash."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT_S)
        self.drain()

    def drain(self) -> None:
        """Read what is left of stdout into :attr:`output` and close the pipe."""
        self.reader.join(STOP_TIMEOUT_S)
        while True:
            try:
                line = self.reader.get(timeout=0.1)
            except queue.Empty:
                break
            if line is None:
                break
            self.output.append(line)
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_demo(
    data_dir: Path,
    flags: dict[str, object] | None = None,
    *,
    stderr: Path | None = None,
) -> DemoProcess:
    """Start ``relay demo`` on *data_dir* on free ports and wait until its device is
    connected; *stderr* keeps its log lines (default: discarded)."""
    argv = [sys.executable, "-m", "relay", "demo", *ALL_ON_PORT_ZERO]
    for name, value in (flags or {}).items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    env = {**os.environ, "RELAY_DATA_DIR": str(data_dir)}
    env.pop("RELAY_TOTP_SEALING_KEY", None)
    with stderr.open("a") if stderr is not None else open(os.devnull, "w") as err:
        process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=data_dir.parent,
            start_new_session=True,
        )
    assert process.stdout is not None
    # The reader drains the pipe to its end, so the demo never blocks on it.
    demo = DemoProcess(process, data_dir, LineReader(process.stdout))
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (demo.output and demo.output[-1].startswith(_READY)):
        try:
            line = demo.reader.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:  # exited, or nothing in time
            demo.stop()
            raise AssertionError("relay demo did not start:\n" + "\n".join(demo.output))
        demo.output.append(line)
        _parse(demo, line)
    printed = (demo.console_url, demo.device_page_url, demo.username, demo.password)
    assert all(printed), demo.output
    return demo


def _parse(demo: DemoProcess, line: str) -> None:
    if match := _CONSOLE.match(line):
        demo.console_url = match.group(1)
    elif match := _DEVICE_PAGE.match(line):
        demo.device_page_url = match.group(1)
    elif match := _METRICS.match(line):
        demo.metrics_url = match.group(1)
    elif match := _PASSWORD.match(line):
        demo.username, demo.password = match.group(1), match.group(2)
    elif match := _SECRET.search(line):
        demo.totp_secret = demo.totp_secret or match.group(1)
