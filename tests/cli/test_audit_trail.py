"""The audit trail of a real ``relay demo`` process: fail closed, crash recovery,
hostile strings and planted secrets (reference rows E10, E12, F3, F4, F5).

Each test runs the product as a newcomer does (``relay demo``: broker, one
simulated device, its device page) and talks to it over its real listeners:
the engineer API with httpx, the device page's allow button with a POST, the
metrics listener. The audit log is then read from the data dir and verified
with the audit public key.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.audit_reader import read_records, verify_directory
from tests.demo_process import DemoProcess, start_demo
from tests.small_disk import small_disk

DEVICE_ID = "demo-0001"
#: Invariant 7's budget for ending live sessions once the log fails (BRIEF).
FAIL_CLOSED_BUDGET_S = 2.0

F5_END_FIELDS = {
    "ts",
    "session_id",
    "engineer",
    "device_id",
    "device_fingerprint",
    "source",
    "granted",
    "decided_by",
    "granted_at",
    "reason",
    "duration_ms",
    "bytes_to_device",
    "bytes_from_device",
    "broker_version",
}


# Driving the demo ----------------------------------------------------------------------


_CLIENTS: list[httpx.Client] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


def _engineer(demo: DemoProcess) -> httpx.Client:
    client = httpx.Client(base_url=demo.console_url, verify=False, timeout=10)  # noqa: S501 - the demo's own CA; the TLS is real
    _CLIENTS.append(client)
    answer = client.post(
        "/api/v1/login",
        json={
            "username": demo.username,
            "password": demo.password,
            "totp": demo.totp(),
        },
    )
    assert answer.status_code == 200, answer.text
    client.headers["Authorization"] = f"Bearer {answer.json()['token']}"
    return client


def _wait_online(client: httpx.Client) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        devices = client.get("/api/v1/devices").json()
        if any(d["device_id"] == DEVICE_ID and d["online"] for d in devices):
            return
        time.sleep(0.2)
    pytest.fail(f"{DEVICE_ID} never came online")


def _request(client: httpx.Client, reason: str = "ticket 4711") -> httpx.Response:
    return client.post(
        "/api/v1/sessions",
        json={"device_id": DEVICE_ID, "reason": reason, "channels": ["shell"]},
    )


def _device_page(demo: DemoProcess, action: str, session_id: str) -> None:
    origin = demo.device_page_url.rstrip("/")
    # The device page answers only its own origin (a page elsewhere must not
    # press Allow); this is a person's click, as the page sends it.
    answer = httpx.post(
        f"{origin}/api/{action}",
        json={"session_id": session_id},
        headers={"Origin": origin},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text


def _wait_state(
    client: httpx.Client, session_id: str, *, want: str, timeout: float = 10
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        view = client.get(f"/api/v1/sessions/{session_id}").json()
        if view["state"] == want or view.get("end_reason") == want:
            return dict(view)
        if time.monotonic() > deadline:
            pytest.fail(f"session never reached {want!r}: {view}")
        time.sleep(0.05)


def _granted_session(demo: DemoProcess, client: httpx.Client) -> str:
    _wait_online(client)
    answer = _request(client)
    assert answer.status_code == 201, answer.text
    session_id = str(answer.json()["session_id"])
    _wait_state(client, session_id, want="offered")
    _device_page(demo, "grant", session_id)
    _wait_state(client, session_id, want="granted")
    return session_id


def _metric(demo: DemoProcess, name: str) -> float:
    text = httpx.get(demo.metrics_url, timeout=10).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name} not in the metrics"
    return float(match.group(1))


def _records(data_dir: Path, session_id: str | None = None) -> list[dict[str, Any]]:
    records = list(read_records(data_dir / "audit"))
    if session_id is None:
        return records
    return [r for r in records if r.get("session_id") == session_id]


def _events(records: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [r for r in records if r["event"] == event]


def _assert_chain_verifies(data_dir: Path) -> None:
    checked = verify_directory(data_dir / "audit")
    assert checked.report.problem is None, checked.report.problem
    assert checked.report.records > 0


# A tiny disk for the audit directory ---------------------------------------------------


@pytest.fixture
def small_audit_disk(tmp_path: Path) -> Iterator[Path]:
    """A data dir whose ``audit/`` is a 256 KiB tmpfs (a disk that can fill)."""
    data_dir = tmp_path / "data"
    with small_disk(data_dir / "audit", "256k"):
        yield data_dir


def _fill(directory: Path) -> Path:
    """Fill the disk under *directory* to the last byte; returns the filler."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            try:
                while os.write(fd, b"\0" * size) == size:
                    pass
            except OSError:
                continue
    finally:
        os.close(fd)
    return filler


# E12: the audit log's disk fills up mid-session ------------------------------------------


def test_a_full_audit_disk_ends_live_sessions_refuses_new_ones_and_recovers(
    small_audit_disk: Path, tmp_path: Path
) -> None:
    data_dir = small_audit_disk
    demo = start_demo(data_dir, stderr=tmp_path / "demo.stderr")
    try:
        client = _engineer(demo)
        session_id = _granted_session(demo, client)
        assert _metric(demo, "relay_audit_writable") == 1.0

        filler = _fill(data_dir / "audit")
        # Security events go on being logged: failed logins are some. The log
        # file's last page may still take a few; one of them fails.
        for attempt in range(60):
            failed_at = time.monotonic()
            refused = client.post(
                "/api/v1/login",
                json={"username": f"nobody{attempt}", "password": "x", "totp": "0"},
            )
            assert refused.status_code in (401, 429)
            if _metric(demo, "relay_audit_writable") == 0.0:
                break
        else:
            pytest.fail("the audit log never noticed the full disk")
        view = _wait_state(client, session_id, want="audit_failure", timeout=5)
        took = time.monotonic() - failed_at
        assert view["end_reason"] == "audit_failure"
        assert took <= FAIL_CLOSED_BUDGET_S, f"ended {took:.2f} s after the failure"

        # Fail closed: no session starts while the log cannot be written.
        answer = _request(client)
        assert answer.status_code == 503
        assert answer.json()["error"] == "audit log unavailable"
        assert _metric(demo, "relay_audit_writable") == 0.0
        assert _metric(demo, "relay_audit_write_failures_total") >= 1
        assert _metric(demo, 'relay_session_ends_total{reason="audit_failure"}') == 1.0
        ready = httpx.get(demo.metrics_url.replace("/metrics", "/readyz"), timeout=10)
        assert ready.status_code == 503
        assert ready.json()["checks"]["audit_writable"] is False

        # The disk has room again: writing resumes within the retry interval.
        filler.unlink()
        deadline = time.monotonic() + 5
        while _metric(demo, "relay_audit_writable") != 1.0:
            assert time.monotonic() < deadline, "the audit log did not resume"
            time.sleep(0.1)
        again = _request(client)
        assert again.status_code == 201, again.text
        second = str(again.json()["session_id"])
        _wait_state(client, second, want="offered")
        _device_page(demo, "deny", second)
        _wait_state(client, second, want="denied")
    finally:
        demo.stop()

    records = _records(data_dir)
    mine = [r for r in records if r.get("session_id") == session_id]
    # The end waited in memory and was written when the disk came back.
    assert len(_events(mine, "session.requested")) == 1
    [end] = _events(mine, "session.end")
    assert end["reason"] == "audit_failure"
    [resumed] = _events(records, "audit.resumed")
    assert resumed["records_delayed"] >= 2  # the failed login, then the end
    assert resumed["records_lost"] == 0
    assert resumed["error"] == "ENOSPC"
    failed_logins = _events(records, "auth.login_failed")
    assert failed_logins, "the record that could not be written at first is there"
    assert failed_logins[-1]["seq"] < resumed["seq"] < end["seq"] or (
        end["seq"] < resumed["seq"]
    )
    _assert_chain_verifies(data_dir)


# E10 / F5: SIGKILL mid-session, then a restart closes the session -----------------------


def test_a_session_left_open_by_a_crash_is_closed_at_the_next_start(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    demo = start_demo(data_dir, stderr=tmp_path / "demo.stderr")
    try:
        client = _engineer(demo)
        session_id = _granted_session(demo, client)
    finally:
        demo.kill()
    assert demo.process.returncode == -9

    restarted = start_demo(data_dir, stderr=tmp_path / "demo.stderr")
    assert restarted.stop() == 0

    mine = _records(data_dir, session_id)
    assert [r["event"] for r in mine].count("session.requested") == 1
    [end] = _events(mine, "session.end")
    assert end["reason"] == "broker_crash"
    assert end["granted"] is True
    assert end["engineer"] == "demo"
    assert end["device_id"] == DEVICE_ID
    assert re.fullmatch(r"[0-9a-f]{64}", end["device_fingerprint"])
    [grant] = _events(mine, "session.granted")
    assert grant["decided_by"]
    assert _events(_records(data_dir), "broker.recovered_sessions")[0]["sessions"] == 1
    _assert_chain_verifies(data_dir)


def test_every_session_has_one_start_and_one_end_with_the_required_fields(
    tmp_path: Path,
) -> None:
    """F5: a granted session ended by the person at the instrument, and a denied
    one: each has exactly one start and one end carrying the fields auditors need."""
    data_dir = tmp_path / "data"
    demo = start_demo(data_dir, stderr=tmp_path / "demo.stderr")
    try:
        client = _engineer(demo)
        granted = _granted_session(demo, client)
        _device_page(demo, "end", granted)
        _wait_state(client, granted, want="onsite")
        answer = _request(client, "second look")
        assert answer.status_code == 201
        denied = str(answer.json()["session_id"])
        _wait_state(client, denied, want="offered")
        _device_page(demo, "deny", denied)
        _wait_state(client, denied, want="denied")
    finally:
        assert demo.stop() == 0
    for session_id, reason in ((granted, "onsite"), (denied, "denied")):
        mine = _records(data_dir, session_id)
        [start] = _events(mine, "session.requested")
        [end] = _events(mine, "session.end")
        assert end["reason"] == reason
        assert set(end) >= F5_END_FIELDS, F5_END_FIELDS - set(end)
        assert start["source"] == "127.0.0.1"
        assert start["device_fingerprint"] == end["device_fingerprint"]
        assert end["broker_version"]
    granted_end = _events(_records(data_dir, granted), "session.end")[0]
    assert granted_end["granted"] is True
    assert granted_end["duration_ms"] >= 0
    assert granted_end["decided_by"]
    denied_end = _events(_records(data_dir, denied), "session.end")[0]
    assert denied_end["granted"] is False
    assert denied_end["duration_ms"] is None
    _assert_chain_verifies(data_dir)


# F3 / F4: hostile strings are encoded, planted secrets are in no log ---------------------


INJECTION = (
    "evil\r\n"
    '{"event":"session.end","forged":true}\n'
    "\x1b[31mred\x1b[0m"
    "\u202edesrever"
    '"quotes" and \\backslashes\\' + "A" * 3000
    # Long, but inside the login body's 4 KiB cap (a 10 KB string is cut by
    # the record itself: tests/relay/audit/test_chain.py).
)


def test_hostile_strings_are_encoded_and_planted_secrets_appear_in_no_log(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    stderr = tmp_path / "demo.stderr"
    demo = start_demo(data_dir, stderr=stderr)
    canary_password = "Canary-" + secrets.token_urlsafe(12)
    try:
        client = _engineer(demo)
        token = client.headers["Authorization"].removeprefix("Bearer ")
        code = demo._last_code
        # A login with a hostile user name and a planted password.
        refused = httpx.post(
            f"{demo.console_url}api/v1/login",
            json={"username": INJECTION, "password": canary_password, "totp": code},
            verify=False,  # noqa: S501 - the demo's own CA
            timeout=10,
        )
        assert refused.status_code in (400, 401)
        # The demo engineer's password, wrong code: planted again.
        wrong = httpx.post(
            f"{demo.console_url}api/v1/login",
            json={"username": demo.username, "password": canary_password, "totp": code},
            verify=False,  # noqa: S501
            timeout=10,
        )
        assert wrong.status_code == 401
        session_id = _granted_session(demo, client)
        client.delete(f"/api/v1/sessions/{session_id}")
        metrics = httpx.get(demo.metrics_url, timeout=10).text
    finally:
        demo.stop()

    audit_lines = b"".join(
        path.read_bytes() for path in sorted((data_dir / "audit").glob("*.jsonl"))
    )
    # The demo's banner prints the demo engineer's password, by design (it is
    # for a newcomer), and nothing else: its audit records are not mirrored
    # to stdout as `relay serve`'s are.
    assert not [line for line in demo.output if line.startswith("{")]
    logs = {
        "audit log": audit_lines.decode("ascii"),
        "stderr": stderr.read_text(),
        "metrics": metrics,
    }
    assert canary_password not in "\n".join(demo.output)
    # F4: no password, token or TOTP code anywhere (a code as a whole number).
    for where, text in logs.items():
        assert canary_password not in text, where
        assert demo.password not in text, where
        assert token not in text, where
        assert not re.search(rf"(?<![0-9A-Za-z]){code}(?![0-9A-Za-z])", text), where

    # F3: one record per line, nothing raw: every line is one JSON object of
    # printable ASCII, and a hostile string is capped.
    for line in audit_lines.splitlines():
        assert re.fullmatch(rb"[\x20-\x7e]+", line), line[:200]
        assert isinstance(json.loads(line), dict)
    assert b'"forged"' not in audit_lines.replace(b'\\"forged\\"', b"")
    hostile = [
        r
        for r in _records(data_dir)
        if isinstance(r.get("username"), str) and r["username"].startswith("evil")
    ]
    assert hostile, "the hostile login attempt was audited"
    for record in hostile:
        # Cut to 64 characters by the login service, every character kept
        # as it came (the record's JSON escapes CR, LF, ESC and U+202E).
        assert record["username"] == INJECTION[:64]
    _assert_chain_verifies(data_dir)
    assert os.stat(data_dir / "secrets" / "audit-signing.key").st_mode & 0o077 == 0
