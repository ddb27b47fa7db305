"""``relay serve`` as a real process: start, readiness, SIGTERM, and failed starts.

The broker is started with every listener on port 0; the bound ports come from its
``broker.started`` JSON log line on stderr, which a background thread reads line by
line (so each wait has a deadline). A failed start must be one ``relay: error: ...``
line and exit code 1, never a traceback.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import auth
from relay.pki_files import DataDir, load_ca, write_private, write_public
from tests.cli.lines import LineReader
from tests.cli.listen import ALL_ON_PORT_ZERO

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
# A failed start: interpreter start-up, plus up to 5 s of SQLite busy timeout.
FAILED_START_TIMEOUT_S = 15.0


def relay_env(data_dir: Path) -> dict[str, str]:
    """The environment for a ``relay`` process using *data_dir*."""
    return {**os.environ, "RELAY_DATA_DIR": str(data_dir)}


def run_relay(
    data_dir: Path, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run a one-shot ``relay ARGS`` on *data_dir*; fail on a traceback or key material."""
    result = subprocess.run(
        [sys.executable, "-m", "relay", *args],
        env=relay_env(data_dir),
        cwd=data_dir.parent,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert "PRIVATE KEY" not in result.stdout + result.stderr
    return result


def log_events(lines: list[str]) -> list[dict[str, Any]]:
    """The JSON log objects among *lines*, in order."""
    events: list[dict[str, Any]] = []
    for line in lines:
        if line.startswith("{"):
            value = json.loads(line)
            assert isinstance(value, dict)
            events.append(value)
    return events


@dataclass
class Broker:
    """A running ``relay serve`` and the stderr lines it wrote so far."""

    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    _reader: LineReader | None = None

    def start_reading(self) -> None:
        """Start copying stderr lines (see LineReader)."""
        assert self.process.stderr is not None
        self._reader = LineReader(self.process.stderr)

    def _lines(self) -> LineReader:
        assert self._reader is not None
        return self._reader

    def wait_for_event(self, name: str, timeout: float) -> dict[str, Any]:
        """Return the next JSON log line with ``"event": name``; fail after *timeout* s."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no {name!r} log line within {timeout} s: {self.lines!r}")
            try:
                line = self._lines().get(remaining)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(
                    f"relay serve exited ({self.process.wait()}) before logging "
                    f"{name!r}: {self.lines!r}"
                )
            self.lines.append(line)
            events = log_events([line])
            if events and events[0].get("event") == name:
                return events[0]

    def stop(self, sig: signal.Signals) -> int:
        """Send *sig*, wait up to STOP_TIMEOUT_S for the exit, drain stderr.

        Returns:
            The exit code.
        """
        self.process.send_signal(sig)
        code = self.process.wait(timeout=STOP_TIMEOUT_S)
        while (line := self._lines().get(STOP_TIMEOUT_S)) is not None:
            self.lines.append(line)
        return code

    def kill(self) -> None:
        """Make sure the process is gone and its pipe closed (teardown)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT_S)
        if self._reader is not None:
            self._reader.join(timeout=STOP_TIMEOUT_S)
        if self.process.stderr is not None:
            self.process.stderr.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data dir with a device CA."""
    data_dir = tmp_path / "data"
    result = run_relay(data_dir, "ca", "init")
    assert result.returncode == 0, result.stderr
    return data_dir


@pytest.fixture
def broker(data_dir: Path) -> Iterator[Broker]:
    """``relay serve`` on *data_dir* with every listener on port 0, killed at teardown."""
    # The audit records' copy for a log shipper (audit.stdout).
    with (data_dir.parent / "serve.stdout").open("w") as stdout:
        process = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", *ALL_ON_PORT_ZERO],
            env=relay_env(data_dir),
            cwd=data_dir.parent,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
        )
    running = Broker(process=process)
    running.start_reading()
    yield running
    running.kill()


def http_status(url: str) -> int:
    """GET *url* and return the HTTP status."""
    # The URL is the broker's own http://127.0.0.1 metrics listener.
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310
        status = response.status
    assert isinstance(status, int)
    return status


@pytest.mark.slow
def test_serve_is_ready_and_stops_cleanly_on_sigterm(broker: Broker) -> None:
    """`relay serve` logs its ports, answers /readyz with 200, and on SIGTERM exits 0 within 10 s logging broker.stopped."""
    started = broker.wait_for_event("broker.started", START_TIMEOUT_S)
    ports = [started[name] for name in ("device_port", "engineer_port", "metrics_port")]
    assert all(isinstance(port, int) and port > 0 for port in ports), started

    status = http_status(f"http://127.0.0.1:{started['metrics_port']}/readyz")
    began = time.monotonic()
    code = broker.stop(signal.SIGTERM)

    assert status == 200
    assert code == 0, broker.lines
    assert time.monotonic() - began < STOP_TIMEOUT_S
    assert "broker.stopped" in [
        event.get("event") for event in log_events(broker.lines)
    ]
    assert not any("Traceback" in line for line in broker.lines), broker.lines


@pytest.mark.slow
def test_serve_copies_every_audit_record_to_stdout(
    broker: Broker, data_dir: Path
) -> None:
    """For a SIEM shipper: standard output carries each record the broker
    appended to the audit log, byte for byte, sealed by the last checkpoint."""
    broker.wait_for_event("broker.started", START_TIMEOUT_S)
    assert broker.stop(signal.SIGTERM) == 0
    mirrored = (data_dir.parent / "serve.stdout").read_bytes().splitlines()
    chain = b"".join(
        path.read_bytes() for path in sorted((data_dir / "audit").glob("audit-*.jsonl"))
    ).splitlines()
    assert mirrored, "nothing on stdout"
    assert mirrored == chain[-len(mirrored) :]
    events = [json.loads(line)["event"] for line in mirrored]
    assert events[0] == "broker.config_loaded"
    assert "broker.started" in events
    assert events[-2:] == ["broker.stopped", "audit.checkpoint"]


@pytest.mark.slow
def test_serve_without_a_ca_is_an_error(tmp_path: Path) -> None:
    """`relay serve` on a data dir without a CA exits 1 and tells the operator to run `relay ca init`."""
    result = run_relay(
        tmp_path / "data", "serve", *ALL_ON_PORT_ZERO, timeout=FAILED_START_TIMEOUT_S
    )

    assert result.returncode == 1
    assert "relay: error:" in result.stderr
    assert "relay ca init" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "flag", ["--device-listen", "--engineer-listen", "--metrics-listen"]
)
def test_serve_on_a_port_in_use_is_an_error(data_dir: Path, flag: str) -> None:
    """`relay serve` with a listen port another socket holds exits 1 with "Address already in use" and the address."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = list(ALL_ON_PORT_ZERO)
        args[args.index(flag) + 1] = f"127.0.0.1:{port}"

        result = run_relay(data_dir, "serve", *args, timeout=FAILED_START_TIMEOUT_S)

    assert result.returncode == 1
    assert "relay: error: Address already in use" in result.stderr
    assert f"127.0.0.1:{port}" in result.stderr


@pytest.mark.slow
def test_serve_while_the_database_is_locked_is_an_error(data_dir: Path) -> None:
    """`relay serve` while another process holds the SQLite write lock exits 1 within 15 s naming the database."""
    created = run_relay(data_dir, "device", "list")
    assert created.returncode == 0, created.stderr
    connection = sqlite3.connect(data_dir / "relay.sqlite3", isolation_level=None)
    try:
        connection.execute("BEGIN EXCLUSIVE")
        result = run_relay(
            data_dir, "serve", *ALL_ON_PORT_ZERO, timeout=FAILED_START_TIMEOUT_S
        )
    finally:
        connection.close()

    assert result.returncode == 1
    assert "relay: error: cannot use the store: database is locked" in result.stderr


@pytest.mark.slow
def test_serve_with_a_data_dir_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    """`relay serve` with RELAY_DATA_DIR pointing at a file exits 1 saying it is not a directory."""
    data_file = tmp_path / "data"
    data_file.write_text("not a directory\n")

    result = run_relay(
        data_file, "serve", *ALL_ON_PORT_ZERO, timeout=FAILED_START_TIMEOUT_S
    )

    assert result.returncode == 1
    assert f"relay: error: RELAY_DATA_DIR {data_file} is not a directory" in (
        result.stderr
    )


@pytest.mark.slow
def test_serve_with_a_corrupt_ca_certificate_is_an_error(data_dir: Path) -> None:
    """`relay serve` with a ca/ca.crt that does not parse exits 1 with a message naming the file."""
    ca_cert = data_dir / "ca" / "ca.crt"
    ca_cert.write_text("not a certificate\n")

    result = run_relay(
        data_dir, "serve", *ALL_ON_PORT_ZERO, timeout=FAILED_START_TIMEOUT_S
    )

    assert result.returncode == 1
    assert f"relay: error: {ca_cert} is not a valid PEM certificate" in result.stderr


#: SIGHUP must be quicker than the 30 s poll; this leaves no doubt which did it.
RELOAD_BUDGET_S = 5.0


def served_certificate(port: int) -> x509.Certificate:
    """The certificate a TLS listener on 127.0.0.1:*port* presents now."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only reading what is served
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_sighup_reloads_the_listener_certificate(broker: Broker) -> None:
    started = broker.wait_for_event("broker.started", START_TIMEOUT_S)
    data_dir = DataDir(Path(started["data_dir"]))
    ports = (started["device_port"], started["engineer_port"])
    before = {served_certificate(port).serial_number for port in ports}
    assert len(before) == 1  # one listener certificate serves both

    old = x509.load_pem_x509_certificate(data_dir.listener_cert.read_bytes())
    names = [
        str(name.value)
        for name in old.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    ]
    key, certificate = auth.issue_server_certificate(
        load_ca(data_dir),
        names=names,
        now=datetime.now(UTC),
        lifetime=timedelta(days=90),
    )
    data_dir.listener_key.unlink()
    data_dir.listener_cert.unlink()
    write_private(data_dir.listener_key, auth.private_key_pem(key))
    write_public(
        data_dir.listener_cert, certificate.public_bytes(serialization.Encoding.PEM)
    )

    broker.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + RELOAD_BUDGET_S
    while True:
        served = {served_certificate(port).serial_number for port in ports}
        if served == {certificate.serial_number}:
            break
        assert time.monotonic() < deadline, f"still serving {served} after SIGHUP"
        time.sleep(0.1)
    reloaded = broker.wait_for_event("tls.reloaded", RELOAD_BUDGET_S)
    assert reloaded["audit"] is True
    assert broker.process.poll() is None
    assert broker.stop(signal.SIGTERM) == 0


def _start_serve(data_dir: Path, env: dict[str, str]) -> Broker:
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", *ALL_ON_PORT_ZERO],
        env=env,
        cwd=data_dir.parent,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    running = Broker(process=process)
    running.start_reading()
    return running


@pytest.mark.slow
def test_sighup_reloads_the_access_policy(data_dir: Path) -> None:
    """With the directory poll at 60 s, SIGHUP is what loads a changed policy;
    the load is an audit event with the rule count and digest."""
    policy = data_dir.parent / "policy"
    policy.mkdir()
    rules = policy / "rules.toml"
    rule = '[[rule]]\nname = "{name}"\nengineer_roles = ["engineer"]\nchannels = ["shell"]\n'
    rules.write_text(rule.format(name="first"))
    env = {
        **relay_env(data_dir),
        "RELAY_POLICY__DIR": str(policy),
        "RELAY_POLICY__RELOAD_POLL_S": "60",
    }
    broker = _start_serve(data_dir, env)
    try:
        loaded = broker.wait_for_event("policy.loaded", START_TIMEOUT_S)
        assert (loaded["rules"], loaded["files"]) == (1, ["rules.toml"])
        broker.wait_for_event("broker.started", START_TIMEOUT_S)
        rules.write_text(rule.format(name="first") + rule.format(name="second"))
        broker.process.send_signal(signal.SIGHUP)
        reloaded = broker.wait_for_event("policy.loaded", RELOAD_BUDGET_S)
        assert reloaded["rules"] == 2
        assert reloaded["digest"] != loaded["digest"]
        assert reloaded["audit"] is True
        assert broker.stop(signal.SIGTERM) == 0
    finally:
        broker.kill()


@pytest.mark.slow
def test_serve_with_a_policy_that_does_not_load_is_an_error(data_dir: Path) -> None:
    """A broken policy directory stops the start; the error names file, rule, key."""
    policy = data_dir.parent / "policy"
    policy.mkdir()
    (policy / "rules.toml").write_text('[[rule]]\nname = "x"\nchannels = ["udp:53"]\n')
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve", *ALL_ON_PORT_ZERO],
        env={**relay_env(data_dir), "RELAY_POLICY__DIR": str(policy)},
        cwd=data_dir.parent,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=FAILED_START_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 1
    assert (
        "relay: error: the access policy does not load: rules.toml: rule x: "
        "channels: not a channel pattern"
    ) in result.stderr
    assert "Traceback" not in result.stderr
