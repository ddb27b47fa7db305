"""The auditors' API end to end: real sessions recorded, then read back.

A real broker, the real agent with its PTY and its device UI, and the engineer
CLI's session client run a shell session and a port-forward session (as in
``test_sessions_end_to_end``); an auditor then lists them, opens them and
downloads their recordings over the API. The routes that need no recorded
session (roles, refusals of bad parameters) run against the plain ``broker``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio

from relay._trio.engineer_session import SessionStatus, run_session, shell_work
from relay._trio.session_archive import BROKER_CRASH
from relay._trio.tunnel_mux import TunnelMux
from relay.api_contract import AUDIT_END_REASONS, AUDIT_ROLES, ROUTE_ROLES
from relay.audit_reader import read_records
from relay.pki_files import DataDir
from relay.proto.session import EndReason
from relay.store import Store, StoreError
from tests.e2e.conftest import LOOPBACK, PKI, add_engineer, login_token
from tests.e2e.test_engineer_cli_session import engineer_credentials, forward_to
from tests.e2e.test_sessions_broker import Harness
from tests.e2e.test_sessions_end_to_end import DEVICE_ID, Instrument, session_setup
from tests.small_disk import small_disk

pytestmark = pytest.mark.slow

SESSIONS = "/api/v1/audit/sessions"
#: What the engineer types, and what only the shell's arithmetic can answer.
COMMAND = b"echo audit-$((6*7))\rexit\r"
OUTPUT = "audit-42"
#: What the engineer sends through the forward, and what the device's service answers.
TO_DEVICE = random.Random(3).randbytes(100_000)  # noqa: S311 - test data
FROM_DEVICE = random.Random(4).randbytes(300_000)  # noqa: S311 - test data
UNKNOWN_ID = "0" * 32


def _session(session_id: str) -> str:
    return f"{SESSIONS}/{session_id}"


def _recording(session_id: str, name: str) -> str:
    return f"{SESSIONS}/{session_id}/recordings/{name}"


async def _service(connection: trio.SocketStream) -> None:
    """The instrument's local service: reads what the engineer sends, answers
    :data:`FROM_DEVICE` and closes."""
    async with connection:
        got = 0
        while got < len(TO_DEVICE):
            data = await connection.receive_some(65536)
            if not data:
                return
            got += len(data)
        await connection.send_all(FROM_DEVICE)


@dataclass
class Auditing:
    """A harness with its instrument, and tokens of every role."""

    h: Harness
    device: Instrument
    auditor: str
    admin: str

    def as_auditor(self) -> dict[str, str]:
        return self.h.headers(self.auditor)

    async def get(self, url: str, **params: Any) -> httpx.Response:
        return await self.h.api.get(url, params=params, headers=self.as_auditor())

    async def ended_row(self, session_id: str) -> dict[str, Any]:
        """The session's detail once the broker wrote its end (it writes the
        recordings' hashes just after the end receipt)."""
        with trio.fail_after(15):
            while True:
                answer = await self.get(_session(session_id))
                assert answer.status_code == 200, answer.text
                detail: dict[str, Any] = answer.json()
                if detail["ended_at"] is not None:
                    return detail
                await trio.sleep(0.05)


@asynccontextmanager
async def auditing(pki: PKI, nursery: trio.Nursery) -> AsyncIterator[Auditing]:
    async with session_setup(pki, nursery, _service) as (h, device):
        auditor = await login_token(
            h.api, "audrey", add_engineer(pki, "audrey", role="auditor")
        )
        admin = await login_token(
            h.api, "adam", add_engineer(pki, "adam", role="admin")
        )
        yield Auditing(h, device, auditor, admin)


async def run_shell_session(
    a: Auditing, command: bytes = COMMAND, *, end_reason: str = "engineer"
) -> str:
    """The engineer types *command* in a granted shell (by default
    :data:`COMMAND`, whose `exit` ends it); the session must end with
    *end_reason*. What the shell prints goes to /dev/null here: the tests read
    it back from the recording."""
    stdin_read, stdin_write = os.pipe()
    sink = os.open(os.devnull, os.O_WRONLY)

    async def person_and_keyboard() -> None:
        offer = await a.device.wait_for_offer()
        await a.device.press("grant", offer["session_id"])
        await trio.sleep(0.5)
        os.write(stdin_write, command)

    async def work(mux: TunnelMux, status: SessionStatus) -> None:
        await shell_work(mux, status, stdin_fd=stdin_read, stdout_fd=sink)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(person_and_keyboard)
            with trio.fail_after(30):
                outcome = await run_session(
                    engineer_credentials(a.h),
                    device_id=DEVICE_ID,
                    reason="ticket 4720: audit me",
                    channels=["shell"],
                    work=work,
                    out=io.StringIO(),
                )
    finally:
        for fd in (stdin_read, stdin_write, sink):
            os.close(fd)
    assert outcome.end_reason == end_reason
    return outcome.session_id


async def run_forward_session(a: Auditing) -> str:
    """The engineer sends :data:`TO_DEVICE` through a forward and reads the
    answer; the person at the instrument ends the session."""
    ports: list[int] = []

    async def engineer_uses_it() -> None:
        offer = await a.device.wait_for_offer()
        await a.device.press("grant", offer["session_id"])
        with trio.fail_after(10):
            while not ports:  # noqa: ASYNC110 - set by the forward's work
                await trio.sleep(0.02)
        received = b""
        async with await trio.open_tcp_stream(LOOPBACK, ports[0]) as conn:
            await conn.send_all(TO_DEVICE)
            with trio.fail_after(20):
                while data := await conn.receive_some(65536):
                    received += data
        assert received == FROM_DEVICE
        await a.device.press("end", offer["session_id"])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(engineer_uses_it)
        with trio.fail_after(30):
            outcome = await run_session(
                engineer_credentials(a.h),
                device_id=DEVICE_ID,
                reason="ticket 4721: forward",
                channels=[f"tcp:{a.device.service_port}"],
                work=forward_to(a.device.service_port, ports),
                out=io.StringIO(),
            )
    assert outcome.end_reason == "onsite"
    return outcome.session_id


def _ids(answer: httpx.Response) -> list[str]:
    assert answer.status_code == 200, answer.text
    return [s["session_id"] for s in answer.json()["sessions"]]


async def test_auditor_lists_recorded_sessions_newest_first_with_filters(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """Two recorded sessions are listed newest first for auditors and admins,
    and each filter (device, engineer, since/until, end reason, limit) narrows
    the list as documented."""
    async with auditing(pki, nursery) as a:
        shell_id = await run_shell_session(a)
        forward_id = await run_forward_session(a)
        shell = await a.ended_row(shell_id)
        forward = await a.ended_row(forward_id)

        assert _ids(await a.get(SESSIONS)) == [forward_id, shell_id]
        as_admin = await a.h.api.get(SESSIONS, headers=a.h.headers(a.admin))
        assert _ids(as_admin) == [forward_id, shell_id]
        listed = (await a.get(SESSIONS)).json()["sessions"][1]
        # The listing's entries are the rows, as the detail shows them.
        assert listed == {
            k: v for k, v in shell.items() if k not in ("timeline", "receipts")
        }
        assert listed["engineer"] == "alice"
        assert listed["device_id"] == DEVICE_ID
        assert listed["channels"] == ["shell"]
        assert listed["end_reason"] == "engineer"
        assert listed["granted_at"] is not None
        assert listed["duration_s"] > 0

        assert _ids(await a.get(SESSIONS, device_id=DEVICE_ID)) == [
            forward_id,
            shell_id,
        ]
        assert _ids(await a.get(SESSIONS, device_id="dev-other")) == []
        assert _ids(await a.get(SESSIONS, engineer="alice")) == [forward_id, shell_id]
        assert _ids(await a.get(SESSIONS, engineer="bob")) == []
        assert _ids(await a.get(SESSIONS, end_reason="engineer")) == [shell_id]
        assert _ids(await a.get(SESSIONS, end_reason="onsite")) == [forward_id]
        assert _ids(await a.get(SESSIONS, end_reason="time_cap")) == []
        assert _ids(await a.get(SESSIONS, limit="1")) == [forward_id]
        # since is inclusive, until exclusive; both with an offset or Z.
        assert _ids(await a.get(SESSIONS, since=forward["requested_at"])) == [
            forward_id
        ]
        assert _ids(await a.get(SESSIONS, until=forward["requested_at"])) == [shell_id]
        since_z = shell["requested_at"].replace("+00:00", "Z")
        assert _ids(
            await a.get(SESSIONS, since=since_z, until=forward["requested_at"])
        ) == [shell_id]
        assert _ids(await a.get(SESSIONS, until="2000-01-01T00:00:00+02:00")) == []
        assert _ids(
            await a.get(SESSIONS, device_id=DEVICE_ID, end_reason="onsite", limit=5)
        ) == [forward_id]


async def test_shell_session_detail_timeline_receipts_and_cast(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """A shell session's detail holds its timeline from request to recording
    and both receipts; its cast downloads as asciicast v2 with the shell's
    output, and its SHA-256 is the one in the row and in the audit chain. The
    view and the download are audited."""
    async with auditing(pki, nursery) as a:
        session_id = await run_shell_session(a)
        detail = await a.ended_row(session_id)

        events = [record["event"] for record in detail["timeline"]]
        for event in (
            "session.requested",
            "session.granted",
            "stream.opened",
            "stream.closed",
            "session.end",
            "session.end_receipt",
            "session.recording",
        ):
            assert event in events, events
        assert events.index("session.requested") < events.index("session.end")
        assert all(r["session_id"] == session_id for r in detail["timeline"])
        seqs = [record["seq"] for record in detail["timeline"]]
        assert seqs == sorted(seqs)
        grant, end = detail["receipts"]["grant"], detail["receipts"]["end"]
        assert grant["kind"] == "grant"
        assert grant["fields"]["session_id"] == session_id
        assert end["kind"] == "end"
        assert grant["signature"]
        assert end["signature"]

        [recording] = detail["recordings"]
        assert recording["kind"] == "shell"
        name = recording["name"]
        assert name.startswith("shell-")
        assert name.endswith(".cast")
        [chained] = [r for r in detail["timeline"] if r["event"] == "session.recording"]
        assert chained["name"] == name

        answer = await a.get(_recording(session_id, name))
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/x-asciicast"
        assert "content-disposition" not in answer.headers
        assert answer.headers["cache-control"] == "no-store"
        digest = hashlib.sha256(answer.content).hexdigest()
        assert digest == recording["sha256"] == chained["sha256"]
        assert len(answer.content) == recording["size_bytes"]
        header, *lines = answer.text.splitlines()
        assert json.loads(header)["version"] == 2
        cast = [json.loads(line) for line in lines if line.strip()]
        assert OUTPUT in "".join(data for _t, code, data in cast if code == "o")
        # What the engineer typed is not recorded by default (docs/audit.md).
        assert not [event for event in cast if event[1] == "i"]

        download = await a.get(_recording(session_id, name), download="1")
        assert download.status_code == 200
        assert download.headers["content-disposition"] == (
            f'attachment; filename="{name}"'
        )
        assert download.content == answer.content
        assert (
            await a.get(_recording(session_id, name), download="yes")
        ).status_code == 400

        audit_dir = DataDir(pki.data_dir).audit_dir
        records = await trio.to_thread.run_sync(lambda: list(read_records(audit_dir)))
        reads = [
            r
            for r in records
            if r["event"] == "audit.recording_read" and r["session_id"] == session_id
        ]
        assert len(reads) == 2
        assert all(
            (r["username"], r["role"], r["name"]) == ("audrey", "auditor", name)
            for r in reads
        )
        views = [
            r
            for r in records
            if r["event"] == "audit.session_viewed" and r["session_id"] == session_id
        ]
        assert views
        assert (views[-1]["username"], views[-1]["role"]) == ("audrey", "auditor")


async def test_typed_input_is_recorded_only_when_switched_on(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """With ``audit.record_input`` the cast holds the keystrokes too ("i"
    events), beside the output."""
    pki.config = dataclasses.replace(
        pki.config, audit=dataclasses.replace(pki.config.audit, record_input=True)
    )
    async with auditing(pki, nursery) as a:
        session_id = await run_shell_session(a)
        detail = await a.ended_row(session_id)
        [recording] = detail["recordings"]
        answer = await a.get(_recording(session_id, recording["name"]))
        cast = [json.loads(line) for line in answer.text.splitlines()[1:]]
        typed = "".join(data for _t, code, data in cast if code == "i")
        assert typed == COMMAND.decode()
        assert OUTPUT in "".join(data for _t, code, data in cast if code == "o")


async def test_a_session_whose_recording_cannot_be_written_ends_with_audit_failure(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """Fail closed for recordings: the recordings' disk fills while the shell
    prints; the session ends with ``audit_failure`` and the log says why."""
    with small_disk(DataDir(pki.data_dir).recordings, "64k"):
        async with auditing(pki, nursery) as a:
            # About 1 MB of output: far more than the 64 KiB disk holds.
            session_id = await run_shell_session(
                a,
                b"head -c 700000 /dev/zero | base64\r",
                end_reason="audit_failure",
            )
            records = await trio.to_thread.run_sync(
                lambda: list(read_records(DataDir(pki.data_dir).audit_dir))
            )
            mine = [r for r in records if r.get("session_id") == session_id]
            events = [r["event"] for r in mine]
            assert "session.recording_failed" in events
            [end] = [r for r in mine if r["event"] == "session.end"]
            assert end["reason"] == "audit_failure"


async def test_a_grant_whose_receipt_cannot_be_kept_ends_the_session(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """The device's grant receipt cannot be stored (``recordings`` is a file):
    the session ends with ``audit_failure`` before a byte flows."""
    DataDir(pki.data_dir).recordings.write_text("not a directory")
    async with auditing(pki, nursery) as a:
        session_id = await run_shell_session(a, end_reason="audit_failure")
        records = await trio.to_thread.run_sync(
            lambda: list(read_records(DataDir(pki.data_dir).audit_dir))
        )
        mine = [r for r in records if r.get("session_id") == session_id]
        failed = [r["step"] for r in mine if r["event"] == "session.archive_failed"]
        assert failed[0] == "grant"
        [end] = [r for r in mine if r["event"] == "session.end"]
        assert (end["reason"], end["bytes_to_device"]) == ("audit_failure", 0)


async def test_forwards_json_holds_the_digests_of_the_bytes_forwarded(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """A forward session's forwards.json counts and hashes exactly what went
    each way (and holds no payload); it downloads as application/json."""
    async with auditing(pki, nursery) as a:
        session_id = await run_forward_session(a)
        detail = await a.ended_row(session_id)
        [recording] = detail["recordings"]
        assert (recording["name"], recording["kind"]) == ("forwards.json", "forwards")

        answer = await a.get(_recording(session_id, "forwards.json"))
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/json"
        assert hashlib.sha256(answer.content).hexdigest() == recording["sha256"]
        [stream] = answer.json()
        assert stream["port"] == a.device.service_port
        assert stream["to_device"] == {
            "bytes": len(TO_DEVICE),
            "sha256": hashlib.sha256(TO_DEVICE).hexdigest(),
        }
        assert stream["from_device"] == {
            "bytes": len(FROM_DEVICE),
            "sha256": hashlib.sha256(FROM_DEVICE).hexdigest(),
        }
        assert detail["bytes_to_device"] >= len(TO_DEVICE)
        assert detail["bytes_from_device"] >= len(FROM_DEVICE)


async def test_only_listed_recordings_of_the_session_are_served(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """Names that climb out of the session's directory, name its other files,
    or have a recording's form but are not in its row answer 404; so do
    unknown sessions and ids of another form."""
    async with auditing(pki, nursery) as a:
        session_id = await run_shell_session(a)
        detail = await a.ended_row(session_id)
        [recording] = detail["recordings"]
        session_dir = DataDir(pki.data_dir).recordings / session_id
        assert (session_dir / "grant-receipt.json").is_file()

        for name in (
            "%2E%2E",
            "..%2F..%2Faudit%2Faudit-key.pem",
            "%2E%2E%2Fgrant-receipt.json",
            "grant-receipt.json",
            "end-receipt.json",
            "device.crt",
            "forwards.json",  # the form of a recording, but not this session's
            "shell-99.cast",
            recording["name"] + "%00",
            recording["name"].upper(),
        ):
            answer = await a.get(_recording(session_id, name))
            assert answer.status_code == 404, (name, answer.text)
        for other in (UNKNOWN_ID, session_id.upper(), "%2E%2E"):
            assert (await a.get(_session(other))).status_code == 404, other
            answer = await a.get(_recording(other, recording["name"]))
            assert answer.status_code == 404, other
        # httpx removes dot segments from a URL; a hostile client need not.
        for raw in (
            _recording(session_id, "../grant-receipt.json"),
            _recording(session_id, "../../../secrets/audit-signing.key"),
            _recording(session_id, ".."),
        ):
            assert await _raw_status(a, raw) == 404, raw


async def _raw_status(a: Auditing, target: str) -> int:
    """The status of a GET of *target* sent as is, dot segments and all."""
    context = ssl.create_default_context(cafile=str(a.h.pki.ca_file))
    stream = await trio.open_ssl_over_tcp_stream(
        LOOPBACK, a.h.broker.ports.engineer, ssl_context=context
    )
    async with stream:
        request = (
            f"GET {target} HTTP/1.1\r\nHost: {LOOPBACK}\r\n"
            f"Authorization: Bearer {a.auditor}\r\nConnection: close\r\n\r\n"
        )
        await stream.send_all(request.encode("ascii"))
        answer = b""
        with trio.fail_after(10):
            while b"\r\n" not in answer:
                data = await stream.receive_some(4096)
                assert data, answer
                answer += data
    status_line = answer.split(b"\r\n", 1)[0].decode("ascii")
    return int(status_line.split(" ")[1])


async def test_engineers_get_403_on_every_audit_route(
    pki: PKI, client: httpx.AsyncClient
) -> None:
    """Engineers may not read the audit trail, not even their own sessions;
    without a login it is 401. ROUTE_ROLES allows auditors and admins only."""
    token = await login_token(client, "alice", add_engineer(pki, "alice"))
    for path in (
        SESSIONS,
        _session(UNKNOWN_ID),
        _recording(UNKNOWN_ID, "shell-1.cast"),
    ):
        answer = await client.get(path, headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 403, path
        assert answer.json() == {"error": "forbidden"}
        assert (await client.get(path)).status_code == 401
    audit_routes = {r: roles for r, roles in ROUTE_ROLES.items() if "/audit/" in r[1]}
    assert len(audit_routes) == 3
    assert all(
        roles == AUDIT_ROLES == {"auditor", "admin"} for roles in audit_routes.values()
    )


async def test_unknown_session_is_404(pki: PKI, client: httpx.AsyncClient) -> None:
    """An id of the right form without a row, and one of another form, are 404."""
    token = await login_token(
        client, "audrey", add_engineer(pki, "audrey", role="auditor")
    )
    headers = {"Authorization": f"Bearer {token}"}
    for session_id in (UNKNOWN_ID, "not-a-session"):
        answer = await client.get(_session(session_id), headers=headers)
        assert answer.status_code == 404
        assert answer.json() == {"error": "unknown session"}
        answer = await client.get(
            _recording(session_id, "forwards.json"), headers=headers
        )
        assert answer.status_code == 404
    answer = await client.get(SESSIONS, headers=headers)
    assert answer.json() == {"sessions": []}


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"since": "2026-05-04T13:02:00"}, "since"),  # no timezone
        ({"since": "yesterday"}, "since"),
        ({"since": "2026-05-04"}, "since"),
        ({"since": "0001-01-01T00:00:00+01:00"}, "since"),  # before UTC year 1
        ({"until": "2026-13-01T00:00:00Z"}, "until"),
        (
            {"since": "2026-05-04T13:02:00Z", "until": "2026-05-04T13:02:00Z"},
            "until",
        ),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "1e2"}, "limit"),
        ({"limit": "\u0665"}, "limit"),  # an Arabic-Indic five: int() takes it
        ({"limit": ["5", "6"]}, "limit"),
        ({"end_reason": "bogus"}, "end_reason"),
        ({"end_reason": ""}, "end_reason"),
        ({"device_id": "../etc"}, "device_id"),
        ({"engineer": "Alice\x00"}, "engineer"),
    ],
)
async def test_bad_filters_are_400_naming_the_parameter(
    pki: PKI, client: httpx.AsyncClient, params: dict[str, Any], named: str
) -> None:
    """A filter of the wrong form, or given twice, is refused with 400 whose
    error names the parameter, never a 500."""
    token = await login_token(
        client, "audrey", add_engineer(pki, "audrey", role="auditor")
    )
    answer = await client.get(
        SESSIONS, params=params, headers={"Authorization": f"Bearer {token}"}
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"].startswith(f"bad {named}:")


async def test_every_end_reason_is_a_filter(
    pki: PKI, client: httpx.AsyncClient
) -> None:
    """Each EndReason, and broker_crash, is accepted as end_reason."""
    assert {r.value for r in EndReason} | {BROKER_CRASH} == AUDIT_END_REASONS
    token = await login_token(
        client, "audrey", add_engineer(pki, "audrey", role="auditor")
    )
    for reason in sorted(AUDIT_END_REASONS):
        answer = await client.get(
            SESSIONS,
            params={"end_reason": reason},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert answer.json() == {"sessions": []}, reason


async def test_store_failure_is_503(
    pki: PKI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the store fails, the listing answers 503 with Retry-After, as the
    other routes do."""
    token = await login_token(
        client, "audrey", add_engineer(pki, "audrey", role="auditor")
    )

    def failing(self: Store, **_filters: Any) -> None:
        raise StoreError("database is locked")

    monkeypatch.setattr(Store, "list_remote_sessions", failing)
    answer = await client.get(SESSIONS, headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "5"
