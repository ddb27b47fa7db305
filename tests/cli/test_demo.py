"""``relay demo`` as a real process: broker plus one simulated device on loopback.

The demo is started with every listener on port 0, its stdout is read line by line
from a background thread (so each wait has a deadline), and it is stopped with
SIGINT as a person would with Ctrl-C.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.cli.lines import LineReader
from tests.cli.listen import ALL_ON_PORT_ZERO

DEMO_DEVICE_ID = "demo-0001"
CONNECT_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
# "disconnected" must not count as "connected", hence the word boundary.
CONNECTED = re.compile(r"\bconnected\b")
METRICS_URL = re.compile(r"metrics\s+(http://127\.0\.0\.1:\d+/metrics)")


def relay_env(data_dir: Path) -> dict[str, str]:
    """The environment for a ``relay`` process using *data_dir*."""
    return {**os.environ, "RELAY_DATA_DIR": str(data_dir)}


def run_relay(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a one-shot ``relay ARGS`` command on *data_dir*."""
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        env=relay_env(data_dir),
        cwd=data_dir.parent,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@dataclass
class Demo:
    """A running ``relay demo`` and the stdout lines it printed so far."""

    process: subprocess.Popen[str]
    stderr_path: Path
    lines: list[str] = field(default_factory=list)
    _reader: LineReader | None = None

    def start_reading(self) -> None:
        """Start copying stdout lines (see LineReader)."""
        assert self.process.stdout is not None
        self._reader = LineReader(self.process.stdout)

    def _lines(self) -> LineReader:
        assert self._reader is not None
        return self._reader

    def wait_for_line(self, pattern: re.Pattern[str], timeout: float) -> str:
        """Return the next stdout line matching *pattern*; fail after *timeout* s."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(
                    f"no line matching {pattern.pattern!r} within {timeout} s; "
                    f"stdout so far: {self.lines!r}; stderr: {self.stderr()[-2000:]}"
                )
            try:
                line = self._lines().get(remaining)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(
                    f"demo exited ({self.process.wait()}) before printing "
                    f"{pattern.pattern!r}; stdout: {self.lines!r}; "
                    f"stderr: {self.stderr()[-2000:]}"
                )
            self.lines.append(line)
            if pattern.search(line):
                return line

    def stop(self) -> int:
        """Send SIGINT, wait up to STOP_TIMEOUT_S for the exit, drain stdout.

        Returns:
            The exit code.
        """
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout=STOP_TIMEOUT_S)
        self._lines().join(timeout=STOP_TIMEOUT_S)
        while (line := self._lines().get(STOP_TIMEOUT_S)) is not None:
            self.lines.append(line)
        return code

    def stderr(self) -> str:
        """Everything the demo wrote to stderr (its JSON log lines)."""
        return self.stderr_path.read_text()

    def kill(self) -> None:
        """Make sure the process is gone and its pipe closed (teardown)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT_S)
        if self._reader is not None:
            self._reader.join(timeout=STOP_TIMEOUT_S)
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """The demo's data dir (not created yet)."""
    return tmp_path / "data"


@pytest.fixture
def start_demo(data_dir: Path) -> Iterator[Callable[[], Demo]]:
    """Start ``relay demo`` on *data_dir*; every started demo is killed at teardown."""
    started: list[Demo] = []

    def start() -> Demo:
        stderr_path = data_dir.parent / f"demo-{len(started)}.stderr"
        with stderr_path.open("w") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "relay", "demo", *ALL_ON_PORT_ZERO],
                env=relay_env(data_dir),
                cwd=data_dir.parent,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        demo = Demo(process=process, stderr_path=stderr_path)
        started.append(demo)
        demo.start_reading()
        return demo

    yield start
    for demo in started:
        demo.kill()


def fetch_metrics(url: str) -> str:
    """GET the metrics page at *url* and return its body."""
    # The URL is the demo's own http://127.0.0.1 metrics listener, parsed from stdout.
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310
        body = response.read().decode()
    assert isinstance(body, str)
    return body


def wait_for_metric(url: str, sample: str, timeout: float) -> str:
    """Fetch *url* until its body has the line *sample*; fail after *timeout* s."""
    deadline = time.monotonic() + timeout
    while True:
        body = fetch_metrics(url)
        if sample in body.splitlines():
            return body
        if time.monotonic() > deadline:
            pytest.fail(f"{sample!r} not in the metrics after {timeout} s:\n{body}")
        # A real process on real sockets: there is no clock to autojump, so poll.
        time.sleep(0.2)


def device_rows(data_dir: Path) -> dict[str, dict[str, Any]]:
    """``relay device list --json`` as a dict keyed by device id."""
    result = run_relay(data_dir, "device", "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    return {row["device_id"]: row for row in rows}


def wait_until_online(data_dir: Path, device_id: str, timeout: float) -> dict[str, Any]:
    """Run ``relay device list --json`` until *device_id* is online; fail after *timeout* s."""
    deadline = time.monotonic() + timeout
    while True:
        # Each run takes about a second (a fresh interpreter), which paces the loop.
        row = device_rows(data_dir).get(device_id)
        if row is not None and row["online"] is True:
            return row
        if time.monotonic() > deadline:
            pytest.fail(f"{device_id} not online after {timeout} s: {row!r}")


def assert_clean_output(demo: Demo) -> None:
    """The demo printed no private key material and no traceback."""
    stdout = "\n".join(demo.lines)
    stderr = demo.stderr()
    assert "PRIVATE KEY" not in stdout
    assert "PRIVATE KEY" not in stderr
    assert "Traceback" not in stderr, stderr


@pytest.mark.slow
def test_demo_connects_its_device_and_stops_on_sigint(
    start_demo: Callable[[], Demo], data_dir: Path
) -> None:
    """`relay demo` connects demo-0001 (metrics, device list), then exits 0 on SIGINT saying "stopped"."""
    demo = start_demo()

    connected = demo.wait_for_line(CONNECTED, CONNECT_TIMEOUT_S)
    assert DEMO_DEVICE_ID in connected
    urls = [m.group(1) for line in demo.lines if (m := METRICS_URL.search(line))]
    assert len(urls) == 1, demo.lines
    body = wait_for_metric(urls[0], "relay_devices_connected 1.0", timeout=10)
    assert "relay_devices_connected 1.0" in body.splitlines()
    row = wait_until_online(data_dir, DEMO_DEVICE_ID, timeout=15)
    assert row["revoked"] is False
    assert row["peer"] is not None

    code = demo.stop()

    assert code == 0, demo.stderr()[-2000:]
    assert "stopped" in demo.lines, demo.lines
    assert_clean_output(demo)


@pytest.mark.slow
def test_demo_twice_reuses_ca_and_device(
    start_demo: Callable[[], Demo], data_dir: Path
) -> None:
    """A second `relay demo` on the same data dir reuses the CA and the device and connects again."""
    first = start_demo()
    first.wait_for_line(CONNECTED, CONNECT_TIMEOUT_S)
    assert first.stop() == 0, first.stderr()[-2000:]
    ca_files = {
        path: path.read_bytes()
        for path in (data_dir / "ca" / "ca.key", data_dir / "ca" / "ca.crt")
    }
    device_files = {
        path: path.read_bytes()
        for path in (data_dir / "demo-device").iterdir()
        if path.name in {"device.key", "device.crt"}
    }
    assert len(device_files) == 2

    second = start_demo()
    connected = second.wait_for_line(CONNECTED, CONNECT_TIMEOUT_S)

    assert DEMO_DEVICE_ID in connected
    assert {path: path.read_bytes() for path in ca_files} == ca_files
    assert {path: path.read_bytes() for path in device_files} == device_files
    row = wait_until_online(data_dir, DEMO_DEVICE_ID, timeout=15)
    assert row["revoked"] is False
    assert list(device_rows(data_dir)) == [DEMO_DEVICE_ID]
    assert second.stop() == 0, second.stderr()[-2000:]
    assert "stopped" in second.lines, second.lines
    assert_clean_output(first)
    assert_clean_output(second)
    # The demo engineer is made once; both runs print the same credentials
    # (tests/browser logs in with them).
    [first_login] = [line for line in first.lines if "demo engineer" in line]
    [second_login] = [line for line in second.lines if "demo engineer" in line]
    assert first_login.startswith("  demo engineer      user demo, password ")
    assert second_login == first_login


@pytest.mark.slow
def test_demo_device_is_offline_after_the_demo_stops(
    start_demo: Callable[[], Demo], data_dir: Path
) -> None:
    """Once `relay demo` has exited, `relay device list --json` shows demo-0001 offline."""
    demo = start_demo()
    demo.wait_for_line(CONNECTED, CONNECT_TIMEOUT_S)
    wait_until_online(data_dir, DEMO_DEVICE_ID, timeout=15)

    code = demo.stop()

    assert code == 0, demo.stderr()[-2000:]
    row = device_rows(data_dir)[DEMO_DEVICE_ID]
    assert row["online"] is False
    assert row["peer"] is None
    assert_clean_output(demo)
