"""Remote sessions on the broker, end to end over real TLS on loopback.

The device is a scripted fake in this file (our WebSocket client with a device
certificate: control channel, grant signed with the device key, tunnel); the
engineer logs in over the API and attaches with trio-websocket. Caps and
timeouts are a few seconds at most, set through the config.
"""

from __future__ import annotations

import dataclasses
import json
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import structlog
import trio
import trio_websocket

import auth
from relay._trio.broker import serve_broker
from relay._trio.session_broker import SessionBroker
from relay._trio.websocket import ConnectionClosed, WebSocketConnection
from relay.audit_reader import read_records
from relay.config import PolicyConfig, SessionConfig
from relay.metrics import SESSION_STATES, RelayMetrics
from relay.pki_files import AgentDir, DataDir
from relay.proto import control, receipts, tunnel
from relay.proto.close import CloseCode
from relay.proto.session import EndReason
from tests.e2e.conftest import (
    LOOPBACK,
    PKI,
    RunningBroker,
    add_engineer,
    api_client,
    login_token,
    wait_until,
)
from tests.e2e.test_device_listener import open_device, say_hello
from tests.fds import open_sockets

pytestmark = pytest.mark.slow

DEVICE = "dev-s1"


@dataclass
class Harness:
    """A broker with session settings of the test's choosing, and its parts."""

    broker: RunningBroker
    sessions: SessionBroker
    api: httpx.AsyncClient
    pki: PKI
    token: str = ""
    tokens: dict[str, str] = field(default_factory=dict)

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    async def request(
        self, channels: list[str] | None = None, token: str | None = None
    ) -> httpx.Response:
        return await self.api.post(
            "/api/v1/sessions",
            json={
                "device_id": DEVICE,
                "reason": "ticket 4711: conductivity alarm",
                "channels": channels or ["shell", "tcp:22"],
            },
            headers=self.headers(token),
        )

    async def assert_clean(self) -> None:
        """Nothing of any session is left: no session, no task, gauges at 0."""
        await wait_until(lambda: len(self.sessions) == 0)
        nursery = self.sessions._nursery
        assert nursery is not None
        assert not nursery.child_tasks
        for state in SESSION_STATES:
            assert self.broker.sample("relay_sessions", state=state) == 0


@asynccontextmanager
async def harness(
    pki: PKI,
    nursery: trio.Nursery,
    *,
    engineer_auth: dict[str, Any] | None = None,
    listener: dict[str, Any] | None = None,
    policy: PolicyConfig | None = None,
    **session_settings: Any,
) -> AsyncIterator[Harness]:
    config = dataclasses.replace(
        pki.config,
        policy=policy if policy is not None else pki.config.policy,
        sessions=SessionConfig(
            **{"max_session_seconds": 30, "grant_timeout_s": 5.0, **session_settings}
        ),
        engineer_auth=dataclasses.replace(
            pki.config.engineer_auth, **(engineer_auth or {})
        ),
        engineer_listener=dataclasses.replace(
            pki.config.engineer_listener, **(listener or {})
        ),
    )
    metrics, shutdown = RelayMetrics(), trio.Event()
    found: list[SessionBroker] = []
    ports = await nursery.start(
        lambda task_status: serve_broker(
            config,
            shutdown,
            metrics=metrics,
            sessions_hook=found.append,
            task_status=task_status,
        )
    )
    secret = add_engineer(pki, "alice")
    try:
        async with api_client(pki, ports.engineer) as api:
            h = Harness(
                RunningBroker(ports, config, metrics, shutdown), found[0], api, pki
            )
            h.token = await login_token(api, "alice", secret)
            yield h
    finally:
        shutdown.set()


# --- the fake device ------------------------------------------------------------


@dataclass
class FakeDevice:
    """The device side, scripted: control channel, grants, tunnel."""

    ws: WebSocketConnection
    channel: control.ControlChannel
    agent_dir: AgentDir
    device_id: str = DEVICE
    # End receipt acks, set aside as an agent takes them (out of the script).
    acks: list[control.EndReceiptAck] = field(default_factory=list)

    @property
    def key(self) -> receipts.DevicePrivateKey:
        return auth.load_private_key(self.agent_dir.key.read_bytes())

    async def next_message(self) -> control.Event:
        """The next message from the broker but heartbeat acks."""
        while True:
            self.channel.receive_message(await self.ws.receive_message())
            event = self.channel.next_event()
            assert not isinstance(event, control._NeedData)
            if not isinstance(event, control.HeartbeatAck):
                return event

    async def next_event(self) -> control.Event:
        """The next message but heartbeat and end receipt acks."""
        with trio.fail_after(5):
            while True:
                event = await self.next_message()
                if not isinstance(event, control.EndReceiptAck):
                    return event
                self.acks.append(event)

    async def next_ack(self) -> control.EndReceiptAck:
        """The next end receipt ack; nothing else may come first."""
        with trio.fail_after(5):
            while not self.acks:
                event = await self.next_message()
                assert isinstance(event, control.EndReceiptAck), event
                self.acks.append(event)
        return self.acks.pop(0)

    async def send(self, event: control.Event) -> None:
        await self.ws.send_message(self.channel.send(event))

    def grant(
        self,
        offer: control.Offer,
        *,
        key: receipts.DevicePrivateKey | None = None,
        nonce: str | None = None,
        channels: tuple[str, ...] | None = None,
        max_seconds: int | None = None,
    ) -> control.Grant:
        receipt = receipts.GrantReceipt(
            session_id=offer.session_id,
            device_id=self.device_id,
            nonce=nonce or offer.nonce,
            engineer=offer.engineer,
            channels=channels or offer.channels,
            max_seconds=max_seconds or offer.max_seconds,
            granted_at_ms=int(time.time() * 1000),
            decided_by="touchscreen",
        )
        wire, signature = receipts.sign_grant(key or self.key, receipt).to_wire()
        return control.Grant(
            session_id=offer.session_id, receipt=wire, signature=signature
        )

    def ended(
        self,
        offer: control.Offer,
        reason: str,
        *,
        key: receipts.DevicePrivateKey | None = None,
    ) -> control.SessionEnded:
        receipt = receipts.EndReceipt(
            session_id=offer.session_id,
            device_id=self.device_id,
            nonce=offer.nonce,
            reason=reason,
            ended_at_ms=int(time.time() * 1000),
            bytes_to_device=0,
            bytes_from_device=0,
            streams_opened=0,
        )
        wire, signature = receipts.sign_end(key or self.key, receipt).to_wire()
        return control.SessionEnded(
            session_id=offer.session_id, receipt=wire, signature=signature
        )


@asynccontextmanager
async def fake_device(
    h: Harness, device_id: str = DEVICE, *, version: int = control.PROTOCOL_VERSION
) -> AsyncIterator[FakeDevice]:
    agent_dir = h.pki.enroll(device_id)
    async with open_device(h.broker, h.pki, agent_dir) as ws:
        channel = await say_hello(ws, device_id, version)
        yield FakeDevice(ws, channel, agent_dir, device_id)


@asynccontextmanager
async def open_tunnel(
    h: Harness, device: FakeDevice, session_id: str
) -> AsyncIterator[WebSocketConnection]:
    async with open_device(
        h.broker, h.pki, device.agent_dir, f"/v1/device/tunnel/{session_id}"
    ) as ws:
        yield ws


@asynccontextmanager
async def attach(
    h: Harness, session_id: str, token: str | None = None
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    # As tests/e2e/test_engineer_websockets.py: the stream is ours to close.
    port = h.broker.ports.engineer
    context = ssl.create_default_context(cafile=str(h.pki.ca_file))
    stream = await trio.open_ssl_over_tcp_stream(
        LOOPBACK, port, ssl_context=context, https_compatible=True
    )
    async with stream, trio.open_nursery() as nursery:
        with trio.fail_after(10):
            ws = await trio_websocket.wrap_client_stream(
                nursery,
                stream,
                f"{LOOPBACK}:{port}",
                f"/api/v1/sessions/{session_id}/attach",
                extra_headers=[
                    (b"authorization", f"Bearer {token or h.token}".encode())
                ],
                max_message_size=1024 * 1024,
            )
        try:
            yield ws
        finally:
            with trio.move_on_after(5):
                await ws.aclose()
            nursery.cancel_scope.cancel()


async def status(ws: trio_websocket.WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(5):
        message = await ws.get_message()
    assert isinstance(message, str), message
    result: dict[str, Any] = json.loads(message)
    return result


async def frame_from(ws: trio_websocket.WebSocketConnection) -> tunnel.Frame:
    with trio.fail_after(5):
        message = await ws.get_message()
    assert isinstance(message, bytes), message
    return tunnel.decode(message)


async def device_frame(ws: WebSocketConnection) -> tunnel.Frame:
    with trio.fail_after(5):
        return tunnel.decode(await ws.receive_message())


async def engineer_closed(
    ws: trio_websocket.WebSocketConnection, within_s: float = 5.0
) -> tuple[list[dict[str, Any]], trio_websocket.CloseReason]:
    """Read until the broker closes; return the status messages and the close."""
    seen: list[dict[str, Any]] = []
    with (
        trio.fail_after(within_s),
        pytest.raises(trio_websocket.ConnectionClosed) as closed,
    ):
        await _collect_text(ws, seen)
    reason = closed.value.reason
    assert reason is not None
    return seen, reason


async def _collect_text(
    ws: trio_websocket.WebSocketConnection, seen: list[dict[str, Any]]
) -> None:
    while True:
        message = await ws.get_message()
        if isinstance(message, str):
            seen.append(json.loads(message))


async def device_closed(
    ws: WebSocketConnection, within_s: float = 5.0
) -> ConnectionClosed:
    with trio.fail_after(within_s):
        try:
            while True:
                await ws.receive_message()
        except ConnectionClosed as closed:
            return closed


async def requested(h: Harness, device: FakeDevice, **kw: Any) -> control.Offer:
    response = await h.request(**kw)
    assert response.status_code == 201, response.text
    offer = await device.next_event()
    assert isinstance(offer, control.Offer)
    assert response.json() == {"session_id": offer.session_id, "state": "offered"}
    return offer


async def granted(h: Harness, device: FakeDevice) -> control.Offer:
    offer = await requested(h, device)
    await device.send(device.grant(offer))
    await wait_until(lambda: h.sessions.view(offer.session_id)["state"] == "granted")  # type: ignore[index]
    return offer


@asynccontextmanager
async def active_session(
    h: Harness, device: FakeDevice
) -> AsyncIterator[
    tuple[control.Offer, WebSocketConnection, trio_websocket.WebSocketConnection]
]:
    offer = await granted(h, device)
    async with (
        open_tunnel(h, device, offer.session_id) as tun,
        attach(h, offer.session_id) as eng,
    ):
        assert (await status(eng))["state"] == "active"
        yield offer, tun, eng


# --- tests ----------------------------------------------------------------------


async def test_happy_path_relays_and_engineer_ends(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """Request, offer, grant, both legs, a stream echoed both ways; the engineer's
    DELETE ends it: both legs closed 4005 "engineer", the device gets SessionEnd."""
    async with harness(pki, nursery) as h, fake_device(h) as device:
        # Baseline with the API client's keep-alive connection already open.
        await h.api.get("/api/v1/me", headers=h.headers())
        sockets_before = open_sockets()
        response = await h.request()
        offer = await device.next_event()
        assert isinstance(offer, control.Offer)
        sid = offer.session_id
        assert response.json() == {"session_id": sid, "state": "offered"}
        assert offer.engineer == "alice"
        assert offer.engineer_role == "engineer"
        assert offer.reason == "ticket 4711: conductivity alarm"
        assert offer.channels == ("shell", "tcp:22")
        assert offer.max_seconds == 30
        assert offer.grant_deadline_ms > time.time() * 1000
        assert len(offer.nonce) == 43
        assert h.broker.sample("relay_sessions", state="offered") == 1
        view = (await h.api.get(f"/api/v1/sessions/{sid}", headers=h.headers())).json()
        assert view["state"] == "offered"
        assert view["engineer"] == "alice"
        assert view["granted_at"] is None
        async with attach(h, sid) as eng:
            assert await status(eng) == {
                "type": "state",
                "state": "offered",
                "ends_at_ms": None,
            }
            await device.send(device.grant(offer))
            granted_status = await status(eng)
            assert granted_status["state"] == "granted"
            assert granted_status["ends_at_ms"] > time.time() * 1000
            async with open_tunnel(h, device, sid) as tun:
                assert (await status(eng))["state"] == "active"
                await eng.send_message(
                    tunnel.encode(tunnel.StreamOpen(stream_id=1, channel="tcp:22"))
                )
                assert await device_frame(tun) == tunnel.StreamOpen(
                    stream_id=1, channel="tcp:22"
                )
                await tun.send_message(tunnel.encode(tunnel.StreamOpenOk(stream_id=1)))
                assert await frame_from(eng) == tunnel.StreamOpenOk(stream_id=1)
                await eng.send_message(
                    tunnel.encode(tunnel.StreamData(stream_id=1, payload=b"ping"))
                )
                data = await device_frame(tun)
                assert data == tunnel.StreamData(stream_id=1, payload=b"ping")
                await tun.send_message(
                    tunnel.encode(tunnel.StreamData(stream_id=1, payload=b"pong!"))
                )
                assert await frame_from(eng) == tunnel.StreamData(
                    stream_id=1, payload=b"pong!"
                )
                view = (
                    await h.api.get(f"/api/v1/sessions/{sid}", headers=h.headers())
                ).json()
                assert view["state"] == "active"
                assert view["granted_at"] is not None
                deleted = await h.api.delete(
                    f"/api/v1/sessions/{sid}", headers=h.headers()
                )
                assert deleted.status_code == 200
                assert deleted.json()["end_reason"] == "engineer"
                end = await device.next_event()
                assert end == control.SessionEnd(session_id=sid, reason="engineer")
                await device.send(device.ended(offer, "engineer"))
                closed = await device_closed(tun)
                assert (closed.code, closed.reason) == (4005, "engineer")
            seen, reason = await engineer_closed(eng)
            assert seen == [{"type": "end", "reason": "engineer"}]
            assert (reason.code, reason.reason) == (4005, "engineer")
        await h.assert_clean()
        # Both legs' sockets are closed on the broker's side too (and ours).
        await wait_until(lambda: open_sockets() <= sockets_before)
        assert h.broker.sample("relay_tunnel_bytes_total", direction="to_device") == 4
        assert h.broker.sample("relay_tunnel_bytes_total", direction="from_device") == 5
        # Open and data each way.
        for direction in ("to_device", "from_device"):
            assert (
                h.broker.sample("relay_tunnel_messages_total", direction=direction) == 2
            )
        assert h.broker.sample("relay_grant_wait_seconds_count") == 1
        # One teardown, timed from the DELETE to both legs closed.
        await wait_until(lambda: h.broker.sample("relay_teardown_seconds_count") == 1)
        assert h.broker.sample("relay_teardown_seconds_sum") < 2.0
        assert h.broker.sample("relay_session_ends_total", reason="engineer") == 1
        view = (await h.api.get(f"/api/v1/sessions/{sid}", headers=h.headers())).json()
        assert view["state"] == "ended"
        assert view["end_reason"] == "engineer"
    # The audit trail of it, in order; the stream still open at the end is
    # closed with the session.
    records = [
        r
        for r in read_records(DataDir(pki.data_dir).audit_dir)
        if r.get("session_id") == sid
    ]
    events = [
        r["event"]
        for r in records
        if r["event"].startswith(("session.", "stream."))
        and r["event"] != "session.end_receipt"
    ]
    assert events[:7] == [
        "session.requested",
        "session.offered",
        "session.granted",
        "session.started",
        "stream.opened",
        "stream.closed",
        "session.end",
    ]
    stream_closed = next(r for r in records if r["event"] == "stream.closed")
    assert (stream_closed["channel"], stream_closed["closed_by"]) == (
        "tcp:22",
        "session_end",
    )


async def test_second_request_is_busy_and_cancel_withdraws(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """A device with a pending session answers 409 busy; DELETE before the grant
    is "cancelled" and withdraws the offer."""
    async with harness(pki, nursery) as h, fake_device(h) as device:
        offer = await requested(h, device)
        second = await h.request()
        assert second.status_code == 409
        assert second.json() == {"error": "busy"}
        deleted = await h.api.delete(
            f"/api/v1/sessions/{offer.session_id}", headers=h.headers()
        )
        assert deleted.json()["end_reason"] == "cancelled"
        assert await device.next_event() == control.OfferWithdrawn(
            session_id=offer.session_id, reason="cancelled"
        )
        again = await h.api.delete(
            f"/api/v1/sessions/{offer.session_id}", headers=h.headers()
        )
        assert again.status_code in (404, 409)
        await h.assert_clean()


async def test_request_refusals(pki: PKI, nursery: trio.Nursery) -> None:
    """Unknown or offline device 404, a channel off the policy 403, bad bodies 400,
    an auditor 403; another engineer cannot see the session (404)."""
    async with harness(pki, nursery) as h:
        assert (await h.request()).status_code == 404  # enrolled nowhere, offline
        async with fake_device(h):
            refused = await h.request(channels=["tcp:80"])
            assert refused.status_code == 403
            bad = await h.api.post(
                "/api/v1/sessions", json={"device_id": DEVICE}, headers=h.headers()
            )
            assert bad.status_code == 400
            bad = await h.request(channels=["tcp:022"])
            assert bad.status_code == 400
            secret = add_engineer(pki, "ivy", role="auditor")
            auditor = await login_token(h.api, "ivy", secret)
            assert (await h.request(token=auditor)).status_code == 403
            created = await h.request()
            sid = created.json()["session_id"]
            secret = add_engineer(pki, "bob")
            bob = await login_token(h.api, "bob", secret)
            seen = await h.api.get(f"/api/v1/sessions/{sid}", headers=h.headers(bob))
            assert seen.status_code == 404
            assert (
                await h.api.delete(f"/api/v1/sessions/{sid}", headers=h.headers(bob))
            ).status_code == 404
        await h.assert_clean()
        assert (
            h.broker.sample("relay_session_ends_total", reason="device_disconnect") == 1
        )


async def test_deny_ends_the_session(pki: PKI, nursery: trio.Nursery) -> None:
    """The person at the device says no: the session ends "denied"."""
    async with harness(pki, nursery) as h, fake_device(h) as device:
        offer = await requested(h, device)
        async with attach(h, offer.session_id) as eng:
            await status(eng)
            await device.send(control.Deny(session_id=offer.session_id, reason="no"))
            seen, reason = await engineer_closed(eng)
            assert seen == [{"type": "end", "reason": "denied"}]
            assert (reason.code, reason.reason) == (4005, "denied")
        await h.assert_clean()
        assert h.sessions.view(offer.session_id)["state"] == "denied"  # type: ignore[index]


async def test_grant_timeout_withdraws_the_offer(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """No answer within the grant timeout: "grant_timeout" and OfferWithdrawn."""
    async with (
        harness(pki, nursery, grant_timeout_s=0.5) as h,
        fake_device(h) as device,
    ):
        offer = await requested(h, device)
        withdrawn = await device.next_event()
        assert withdrawn == control.OfferWithdrawn(
            session_id=offer.session_id, reason="grant_timeout"
        )
        await h.assert_clean()
        assert h.sessions.view(offer.session_id)["end_reason"] == "grant_timeout"  # type: ignore[index]


@pytest.mark.parametrize(
    "forgery", ["wrong_key", "other_nonce", "channels_not_offered"]
)
async def test_bad_grants_are_refused(
    pki: PKI, nursery: trio.Nursery, forgery: str
) -> None:
    """A grant signed by another key, for another offer's nonce, or for channels
    never offered counts as no grant: "denied", no tunnel admitted."""
    async with harness(pki, nursery) as h, fake_device(h) as device:
        offer = await requested(h, device)
        if forgery == "wrong_key":
            grant = device.grant(offer, key=auth.generate_private_key())
        elif forgery == "other_nonce":
            grant = device.grant(offer, nonce="A" * 43)
        else:
            grant = device.grant(offer, channels=("tcp:443",))
        await device.send(grant)
        assert await device.next_event() == control.SessionEnd(
            session_id=offer.session_id, reason="denied"
        )
        with pytest.raises(Exception, match=r"410|404") as refused:
            async with open_tunnel(h, device, offer.session_id):
                pass  # pragma: no cover - refused
        assert getattr(refused.value, "status", None) in (404, 410)
        await h.assert_clean()
        assert h.sessions.view(offer.session_id)["end_reason"] == "denied"  # type: ignore[index]


async def test_repeated_foreign_and_late_grants_are_ignored(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """E3: a grant sent again, a grant for this session from another device, and
    a grant after the end change nothing; each is an audit event."""
    with structlog.testing.capture_logs() as events:
        async with (
            harness(pki, nursery) as h,
            fake_device(h) as device,
            fake_device(h, "dev-other") as other,
        ):
            offer = await granted(h, device)
            grant = device.grant(offer)
            await device.send(grant)  # again
            # Another device's own valid signature, for this session's id.
            await other.send(other.grant(offer))
            await wait_until(
                lambda: (
                    [e["event"] for e in events].count("session.late_grant") == 1
                    and any(
                        e["event"] == "session.unexpected_device_message"
                        and e["device_id"] == "dev-other"
                        for e in events
                    )
                )
            )
            assert _state(h, offer.session_id) == "granted"
            await h.api.delete(
                f"/api/v1/sessions/{offer.session_id}", headers=h.headers()
            )
            assert await device.next_event() == control.SessionEnd(
                session_id=offer.session_id, reason="engineer"
            )
            await device.send(device.ended(offer, "engineer"))
            await wait_until(lambda: len(h.sessions) == 0)  # ended and dropped
            await device.send(grant)  # after the end
            await wait_until(
                lambda: any(
                    e["event"] == "session.unexpected_device_message"
                    and e["device_id"] == DEVICE
                    for e in events
                )
            )
            assert h.sessions.view(offer.session_id)["end_reason"] == "engineer"  # type: ignore[index]
            with pytest.raises(Exception, match=r"410|404"):
                async with open_tunnel(h, device, offer.session_id):
                    pass  # pragma: no cover - refused
            await h.assert_clean()
    audited = [e for e in events if e["event"].startswith("session.")]
    assert all(
        e.get("audit") is True
        for e in audited
        if e["event"] in ("session.late_grant", "session.unexpected_device_message")
    )


async def test_tunnel_from_another_device_or_twice_is_refused(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """Another device's tunnel for this session is 404; a second tunnel 409."""
    async with harness(pki, nursery) as h, fake_device(h) as device:
        offer = await granted(h, device)
        other_dir = pki.enroll("dev-other")
        with pytest.raises(Exception, match="404"):
            async with open_device(
                h.broker, pki, other_dir, f"/v1/device/tunnel/{offer.session_id}"
            ):
                pass  # pragma: no cover - refused
        async with open_tunnel(h, device, offer.session_id):
            with pytest.raises(Exception, match="409"):
                async with open_tunnel(h, device, offer.session_id):
                    pass  # pragma: no cover - refused
            await h.api.delete(
                f"/api/v1/sessions/{offer.session_id}", headers=h.headers()
            )
        await h.assert_clean()


async def test_onsite_end_tells_the_engineer(pki: PKI, nursery: trio.Nursery) -> None:
    """The device ends on site (closes the tunnel 4005 "onsite", sends
    SessionEnded): the engineer gets the end message and 4005 "onsite"."""
    async with harness(pki, nursery) as h, fake_device(h) as device:
        async with active_session(h, device) as (offer, tun, eng):
            await tun.aclose(CloseCode.SESSION_ENDED, "onsite")
            await device.send(device.ended(offer, "onsite"))
            seen, reason = await engineer_closed(eng, within_s=2.0)
            assert seen == [{"type": "end", "reason": "onsite"}]
            assert (reason.code, reason.reason) == (4005, "onsite")
        await h.assert_clean()
        assert h.broker.sample("relay_session_ends_total", reason="onsite") == 1


async def test_a_device_that_cannot_open_its_tunnel_ends_the_granted_session(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """Granted, but the device's tunnel connection fails (a dropped handshake):
    its signed end receipt "device_disconnect" ends the session at once; the
    engineer is not left waiting for a tunnel until the cap."""
    async with harness(pki, nursery) as h, fake_device(h) as device:
        offer = await granted(h, device)
        async with attach(h, offer.session_id) as eng:
            await device.send(device.ended(offer, "device_disconnect"))
            seen, reason = await engineer_closed(eng, within_s=2.0)
            assert {"type": "end", "reason": "device_disconnect"} in seen
            assert (reason.code, reason.reason) == (4005, "device_disconnect")
        await h.assert_clean()
        assert (
            h.broker.sample("relay_session_ends_total", reason="device_disconnect") == 1
        )


async def test_time_cap_ends_the_session(pki: PKI, nursery: trio.Nursery) -> None:
    """The engineer is warned at each configured instant; the end is by cap + 1 s.

    A 4 s cap with warnings at T-2 s and T-1 s stands in for the hour with its
    T-10 min and T-1 min warnings (the instants are config, the code is the same).
    """
    async with (
        harness(pki, nursery, max_session_seconds=4, warning_seconds=(2, 1)) as h,
        fake_device(h) as device,
    ):
        offer = await requested(h, device)
        await device.send(device.grant(offer))
        started = trio.current_time()
        async with open_tunnel(h, device, offer.session_id) as tun:
            async with attach(h, offer.session_id) as eng:
                seen, reason = await engineer_closed(eng, within_s=6.0)
                elapsed = trio.current_time() - started
                assert (reason.code, reason.reason) == (4005, "time_cap")
                warnings = [m for m in seen if m.get("type") == "warning"]
                assert warnings == [
                    {"type": "warning", "seconds_left": 2, "minutes_left": 1},
                    {"type": "warning", "seconds_left": 1, "minutes_left": 1},
                ]
                assert seen[-1] == {"type": "end", "reason": "time_cap"}
                assert seen.index(warnings[-1]) < len(seen) - 1
                assert elapsed <= 5.0
            end = await device.next_event()
            assert end == control.SessionEnd(
                session_id=offer.session_id, reason="time_cap"
            )
            await device.send(device.ended(offer, "time_cap"))
            closed = await device_closed(tun)
            assert (closed.code, closed.reason) == (4005, "time_cap")
        await h.assert_clean()


def _state(h: Harness, session_id: str) -> object:
    view = h.sessions.view(session_id)
    return None if view is None else view["state"]


async def test_a_shorter_cap_granted_by_the_device_ends_the_session(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """The device grants 2 s of the 30 s offered: the broker ends it at 2 s too."""
    async with harness(pki, nursery) as h, fake_device(h) as device:
        offer = await requested(h, device)
        assert offer.max_seconds == 30
        await device.send(device.grant(offer, max_seconds=2))
        await wait_until(lambda: _state(h, offer.session_id) == "granted")
        async with (
            open_tunnel(h, device, offer.session_id),
            attach(h, offer.session_id) as eng,
        ):
            started = trio.current_time()
            seen, reason = await engineer_closed(eng, within_s=5.0)
            assert {"type": "end", "reason": "time_cap"} in seen
            assert reason.code == 4005
            assert trio.current_time() - started <= 3.0
        await h.assert_clean()


async def test_engineer_may_reattach_within_the_grace_never_past_it(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """With reattach_grace_s, a dropped attach socket may come back and the session
    goes on; one that does not come back ends it "engineer_disconnect" once the
    grace is over."""
    async with (
        harness(pki, nursery, reattach_grace_s=1.5) as h,
        fake_device(h) as device,
    ):
        offer = await granted(h, device)
        async with open_tunnel(h, device, offer.session_id) as tun:
            async with attach(h, offer.session_id) as eng:
                assert (await status(eng))["state"] == "active"
            async with attach(h, offer.session_id) as eng:
                assert (await status(eng))["state"] == "active"
                assert _state(h, offer.session_id) == "active"
            dropped = trio.current_time()
            closed = await device_closed(tun, within_s=5.0)
            waited = trio.current_time() - dropped
            assert (closed.code, closed.reason) == (4005, "engineer_disconnect")
            assert 1.0 <= waited <= 3.0, waited
        await h.assert_clean()


async def test_typing_in_the_session_keeps_the_login_alive(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """Frames from the engineer are use of the login: a session outlives the idle
    timeout while the engineer works, and ends "login_ended" once they stop."""
    async with (
        harness(
            pki,
            nursery,
            engineer_auth={"session_idle_s": 1.5},
            listener={"session_touch_s": 0.3},
        ) as h,
        fake_device(h) as device,
    ):
        async with active_session(h, device) as (offer, tun, eng):
            await eng.send_message(
                tunnel.encode(
                    tunnel.StreamOpen(stream_id=1, channel="shell", cols=80, rows=24)
                )
            )
            assert isinstance(await device_frame(tun), tunnel.StreamOpen)
            await tun.send_message(tunnel.encode(tunnel.StreamOpenOk(stream_id=1)))
            assert await frame_from(eng) == tunnel.StreamOpenOk(stream_id=1)
            for _ in range(8):  # 3.2 s of typing: twice the idle timeout
                await eng.send_message(
                    tunnel.encode(tunnel.StreamData(stream_id=1, payload=b"l"))
                )
                assert await device_frame(tun) == tunnel.StreamData(
                    stream_id=1, payload=b"l"
                )
                await trio.sleep(0.4)
            assert _state(h, offer.session_id) == "active"
            seen, reason = await engineer_closed(eng, within_s=5.0)
            assert {"type": "end", "reason": "login_ended"} in seen
            assert reason.code == CloseCode.LOGIN_ENDED
        await h.assert_clean()


async def test_device_disconnect_ends_the_session(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """The control channel drops: "device_disconnect", the engineer is closed."""
    async with harness(pki, nursery) as h:
        async with fake_device(h) as device, active_session(h, device) as (_, tun, eng):
            await device.ws.aclose()
            _, reason = await engineer_closed(eng)
            assert (reason.code, reason.reason) == (4005, "device_disconnect")
            closed = await device_closed(tun)
            assert closed.code == 4005
        await h.assert_clean()


async def test_logout_ends_the_session(pki: PKI, nursery: trio.Nursery) -> None:
    """The engineer's login ends: the session ends "login_ended"; the engineer is
    told and closed 4004 (log in again), the device gets SessionEnd and 4005."""
    async with harness(pki, nursery) as h, fake_device(h) as device:
        async with active_session(h, device) as (offer, tun, eng):
            await h.api.post("/api/v1/logout", headers=h.headers())
            seen, reason = await engineer_closed(eng)
            assert seen == [{"type": "end", "reason": "login_ended"}]
            assert reason.code == CloseCode.LOGIN_ENDED
            assert await device.next_event() == control.SessionEnd(
                session_id=offer.session_id, reason="login_ended"
            )
            await device.send(device.ended(offer, "login_ended"))
            closed = await device_closed(tun)
            assert (closed.code, closed.reason) == (4005, "login_ended")
        await h.assert_clean()


async def test_admin_ends_an_engineers_session(pki: PKI, nursery: trio.Nursery) -> None:
    """An admin's DELETE ends another engineer's session with "admin" on both legs."""
    async with harness(pki, nursery) as h, fake_device(h) as device:
        admin = await login_token(
            h.api, "root", add_engineer(pki, "root", role="admin")
        )
        async with active_session(h, device) as (offer, tun, eng):
            ended = await h.api.delete(
                f"/api/v1/sessions/{offer.session_id}", headers=h.headers(admin)
            )
            assert ended.status_code == 200, ended.text
            seen, reason = await engineer_closed(eng)
            assert {"type": "end", "reason": "admin"} in seen
            assert (reason.code, reason.reason) == (4005, "admin")
            assert await device.next_event() == control.SessionEnd(
                session_id=offer.session_id, reason="admin"
            )
            closed = await device_closed(tun)
            assert (closed.code, closed.reason) == (4005, "admin")
        await h.assert_clean()


async def test_revocation_ends_the_session(pki: PKI, nursery: trio.Nursery) -> None:
    """`relay device revoke` mid-session: "revoked" to the engineer within the
    revocation budget, and the device is gone."""
    async with harness(pki, nursery) as h, fake_device(h) as device:
        async with active_session(h, device) as (_offer, _tun, eng):
            with pki.store() as store:
                store.revoke_device(DEVICE, at=datetime.now(UTC), reason="stolen")
            seen, reason = await engineer_closed(eng, within_s=5.0)
            assert {"type": "end", "reason": "revoked"} in seen
            assert (reason.code, reason.reason) == (4005, "revoked")
        await h.assert_clean()


@pytest.mark.parametrize("side", ["engineer", "device"])
async def test_malformed_frame_ends_the_session(
    pki: PKI, nursery: trio.Nursery, side: str
) -> None:
    """A malformed frame is a protocol error of the leg that sent it: the session
    ends as that leg's disconnect, both legs closed 4005."""
    expected = f"{side}_disconnect"
    async with harness(pki, nursery) as h, fake_device(h) as device:
        async with active_session(h, device) as (_offer, tun, eng):
            garbage = b"\x09\x00\x00\x00\x01"  # unknown frame type 9
            if side == "engineer":
                await eng.send_message(garbage)
            else:
                await tun.send_message(garbage)
            _, reason = await engineer_closed(eng)
            assert (reason.code, reason.reason) == (4005, expected)
            closed = await device_closed(tun)
            assert (closed.code, closed.reason) == (4005, expected)
        await h.assert_clean()
        assert h.broker.sample("relay_session_ends_total", reason=expected) == 1


async def test_frame_off_the_granted_channels_ends_the_session(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """An OPEN of a channel the device did not grant never reaches the device."""
    async with harness(pki, nursery) as h, fake_device(h) as device:
        async with active_session(h, device) as (_offer, tun, eng):
            await eng.send_message(
                tunnel.encode(tunnel.StreamOpen(stream_id=1, channel="tcp:443"))
            )
            _, reason = await engineer_closed(eng)
            assert reason.reason == "engineer_disconnect"
            closed = await device_closed(tun)
            assert closed.code == 4005
        await h.assert_clean()


async def test_broker_shutdown_ends_sessions(pki: PKI, nursery: trio.Nursery) -> None:
    """Shutdown ends live sessions with "broker_shutdown" before channels close."""
    async with harness(pki, nursery) as h, fake_device(h) as device:
        offer = await granted(h, device)
        async with attach(h, offer.session_id) as eng:
            await status(eng)
            h.broker.shutdown.set()
            assert await device.next_event() == control.SessionEnd(
                session_id=offer.session_id, reason="broker_shutdown"
            )
            _, reason = await engineer_closed(eng)
            assert (reason.code, reason.reason) == (4005, "broker_shutdown")
        await wait_until(lambda: len(h.sessions) == 0)


# --- end receipts: acks, and receipts after the linger ------------------------------


def _audited(h: Harness, session_id: str, event: str) -> list[dict[str, Any]]:
    return [
        r
        for r in read_records(DataDir(h.pki.data_dir).audit_dir)
        if r.get("session_id") == session_id and r["event"] == event
    ]


async def _no_message(device: FakeDevice, within_s: float = 1.0) -> None:
    """Nothing but heartbeat acks comes to *device* for *within_s*."""
    assert device.acks == []
    with trio.move_on_after(within_s):
        event = await device.next_message()
        raise AssertionError(f"unexpected {event!r}")


async def _ended_unanswered(h: Harness, device: FakeDevice) -> control.Offer:
    """A granted session the engineer ends; the device does not answer, and the
    broker drops the session after its linger (end receipt missing)."""
    offer = await granted(h, device)
    await h.api.delete(f"/api/v1/sessions/{offer.session_id}", headers=h.headers())
    assert await device.next_event() == control.SessionEnd(
        session_id=offer.session_id, reason="engineer"
    )
    await wait_until(lambda: len(h.sessions) == 0)
    await wait_until(
        lambda: bool(_audited(h, offer.session_id, "session.end_receipt_missing"))
    )
    return offer


async def test_an_on_time_end_receipt_is_acked_and_a_resend_recorded_once(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """The device's receipt is acked; sent again (the ack was lost), during
    the linger or after it, it is acked again and not recorded twice."""
    async with harness(pki, nursery) as h, fake_device(h) as device:
        offer = await granted(h, device)
        await h.api.delete(f"/api/v1/sessions/{offer.session_id}", headers=h.headers())
        assert await device.next_event() == control.SessionEnd(
            session_id=offer.session_id, reason="engineer"
        )
        ack = control.EndReceiptAck(session_id=offer.session_id)
        await device.send(device.ended(offer, "engineer"))
        assert await device.next_ack() == ack
        await device.send(device.ended(offer, "engineer"))
        assert await device.next_ack() == ack
        await wait_until(lambda: len(h.sessions) == 0)
        await device.send(device.ended(offer, "engineer"))
        assert await device.next_ack() == ack
        await h.assert_clean()
    receipts_logged = _audited(h, offer.session_id, "session.end_receipt")
    assert [(r["reason"], r["late"]) for r in receipts_logged] == [("engineer", False)]
    assert len(_audited(h, offer.session_id, "session.end")) == 1


async def test_a_late_end_receipt_is_verified_audited_kept_and_acked(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """A receipt that comes after the broker dropped the session (a partition
    longer than the linger) is verified against what the broker kept of it,
    audited ``session.end_receipt`` with ``late: true``, stored with the
    session and acked; a resend is acked, not recorded again; the session
    still has exactly one ``session.end``."""
    async with harness(pki, nursery) as h, fake_device(h) as device:
        offer = await _ended_unanswered(h, device)
        ack = control.EndReceiptAck(session_id=offer.session_id)
        await device.send(device.ended(offer, "engineer"))
        assert await device.next_ack() == ack
        await device.send(device.ended(offer, "engineer"))
        assert await device.next_ack() == ack
        await h.assert_clean()
    receipts_logged = _audited(h, offer.session_id, "session.end_receipt")
    assert [(r["reason"], r["late"]) for r in receipts_logged] == [("engineer", True)]
    assert receipts_logged[0]["broker_bytes_to_device"] == 0
    assert [r["reason"] for r in _audited(h, offer.session_id, "session.end")] == [
        "engineer"
    ]
    stored = DataDir(pki.data_dir).recordings / offer.session_id / "end-receipt.json"
    document = json.loads(stored.read_text())
    assert (document["kind"], document["fields"]["reason"]) == ("end", "engineer")


async def test_a_late_end_receipt_that_does_not_verify_is_refused_and_acked(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """A late receipt of the device's own session signed with another key is
    ``session.end_receipt_rejected`` (late), not recorded, and acked: it will
    never verify, so the agent may forget it."""
    async with harness(pki, nursery) as h, fake_device(h) as device:
        offer = await _ended_unanswered(h, device)
        forged = device.ended(offer, "engineer", key=auth.generate_private_key())
        await device.send(forged)
        assert await device.next_ack() == control.EndReceiptAck(
            session_id=offer.session_id
        )
        await h.assert_clean()
    rejected = _audited(h, offer.session_id, "session.end_receipt_rejected")
    assert [(r["reason"], r["late"]) for r in rejected] == [("bad_signature", True)]
    assert _audited(h, offer.session_id, "session.end_receipt") == []
    assert not (
        DataDir(pki.data_dir).recordings / offer.session_id / "end-receipt.json"
    ).exists()


async def test_late_end_receipts_of_another_device_or_no_session_are_not_acked(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """Another device's receipt for this device's ended session, and a receipt
    for a session the broker never had, are unexpected messages as before:
    audited, neither recorded nor acked. The right device's receipt still is."""
    with structlog.testing.capture_logs() as events:
        async with (
            harness(pki, nursery) as h,
            fake_device(h) as device,
            fake_device(h, "dev-other") as other,
        ):
            offer = await _ended_unanswered(h, device)
            await other.send(other.ended(offer, "engineer"))
            unknown = dataclasses.replace(offer, session_id="f" * 32)
            await device.send(device.ended(unknown, "engineer"))
            await wait_until(
                lambda: (
                    sorted(
                        str(e.get("device_id"))
                        for e in events
                        if e["event"] == "session.unexpected_device_message"
                    )
                    == sorted(["dev-other", DEVICE])
                )
            )
            await _no_message(other)
            await _no_message(device, 0.2)
            await device.send(device.ended(offer, "engineer"))
            assert await device.next_ack() == control.EndReceiptAck(
                session_id=offer.session_id
            )
            await h.assert_clean()
    receipts_logged = _audited(h, offer.session_id, "session.end_receipt")
    assert [r["device_id"] for r in receipts_logged] == [DEVICE]


async def test_a_version_1_device_gets_no_end_receipt_ack(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """An agent of control protocol version 1 takes an unknown message for a
    protocol error: it gets no ack, its receipt is recorded all the same, and
    its channel stays open."""
    async with harness(pki, nursery) as h, fake_device(h, version=1) as device:
        assert device.channel.version == 1
        offer = await granted(h, device)
        await h.api.delete(f"/api/v1/sessions/{offer.session_id}", headers=h.headers())
        assert await device.next_event() == control.SessionEnd(
            session_id=offer.session_id, reason="engineer"
        )
        await device.send(device.ended(offer, "engineer"))
        await wait_until(
            lambda: bool(_audited(h, offer.session_id, "session.end_receipt"))
        )
        await _no_message(device)
        assert device.channel.state is control.State.OPEN
        await device.send(control.Heartbeat(seq=1))
        assert await device.ws.receive_message()  # the ack: still connected
        await h.assert_clean()


def test_session_cap_above_3600_is_refused() -> None:
    """The config refuses a cap above the 3600 s ceiling (Invariant 2)."""
    with pytest.raises(ValueError, match="3600"):
        SessionConfig(max_session_seconds=3601)
    assert SessionConfig().max_session_seconds == 3600
    assert SessionConfig().warning_seconds == (600, 60)
    with pytest.raises(ValueError, match="warning_seconds"):
        SessionConfig(warning_seconds=(0,))


async def test_an_end_is_kept_when_a_flood_fills_the_session_inbox(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """A device flooding its control channel fills the session's inbox; the
    broker's own end (here: the audit log failing) still ends the session
    (Invariant 7 depends on it)."""
    async with harness(pki, nursery) as h, fake_device(h) as device:
        offer = await requested(h, device)
        junk = control.SessionEnded(
            session_id=offer.session_id, receipt="x", signature="y"
        )
        # No await between them: the driver cannot drain the inbox meanwhile.
        for _ in range(200):
            h.sessions.device_message(DEVICE, junk)
        h.sessions.end_all(EndReason.AUDIT_FAILURE)
        with trio.fail_after(5):
            await h.sessions.wait_idle()
        assert h.sessions.view(offer.session_id)["end_reason"] == "audit_failure"  # type: ignore[index]
        await h.assert_clean()


async def test_a_stopping_broker_takes_no_new_session(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """From the moment shutdown begins, a request is refused with 503 (and
    audited), even while live sessions still get their grace to end."""
    async with harness(pki, nursery) as h, fake_device(h):
        h.sessions.stop()
        response = await h.request()
        assert response.status_code == 503
        assert response.json() == {"error": "not taking sessions"}
        assert (
            h.broker.sample("relay_session_requests_total", outcome="unavailable") == 1
        )
        await h.assert_clean()
    refused = [
        r
        for r in read_records(DataDir(pki.data_dir).audit_dir)
        if r["event"] == "session.refused"
    ]
    assert [r["outcome"] for r in refused] == ["unavailable"]
