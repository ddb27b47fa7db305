"""Silent faults: a peer that vanishes without a FIN, a partition at the session
cap, and jumps of the device's wall clock (reference rows E8 and E5).

Theory of operation
===================
The broker is the real one, in the test process (``tests.e2e`` fixtures: real
TLS on loopback, real SQLite store, real audit chain), with a short keepalive.
The device is the real agent. For the E8 and E5 tests it is
:func:`relay._trio.agent.run_agent` with its
:class:`~relay._trio.agent_sessions.SessionRuntime` (the code ``relay agent run``
runs; ``bench/fleet.py`` runs it the same way) in the test process, because
the tests need the instant the agent granted and its state after the end. The
person at the instrument is a :class:`Granter` that grants at once and notes
when. The clock tests run the ``relay agent run`` command itself under
libfaketime (Debian package ``faketime``; ``FAKETIME_DONT_FAKE_MONOTONIC=1``,
an offset file rewritten mid-run), so that every wall-clock read of the
process moves, not only the ones the product routes through an injectable
clock; its touchscreen is the agent's local UI API. The engineer attaches over
HTTPS/WebSocket like the CLI does. Every local end is seen by a real TCP
service on the instrument (:class:`LocalService`), which notes when its
connection closed.

The network between them is :class:`tests.reliability.fault_proxy.FaultProxy`:
the agent reaches the broker's device listener through one proxy, the
engineer reaches the engineer listener through another, and a test switches a
proxy to ``blackhole`` (nothing forwarded, every socket open: the silent
half-open peer of row E8) and back.

Why a proxy and not a network namespace with ``iptables -j DROP``: the netns
way needs the agent (or the broker) as a process of its own inside the
namespace (``ip netns exec``), a veth pair, root, and the ``iptables``
package, which is not installed here; and a process would hide the instants
the E8/E5 tests measure. Both give the application the same thing, silence: no
FIN, no RST, no byte; the BRIEF's dead-peer detection is the WebSocket
keepalive (ping every ``ping_interval_s``, dead after ``ping_missed_max``
missed), which sees that silence either way. What the proxy does not
reproduce is the kernel's side of a DROP (unacknowledged segments,
retransmissions, ``TCP_USER_TIMEOUT``): the proxy's own sockets acknowledge
what the peers send, so a product that relied on TCP timers would pass a real
DROP and fail here, never the reverse. The product relies on no TCP timer.
The proxy switches within microseconds, in both directions, runs without
root in the default suite and in CI, and keeps the bytes it has not
forwarded, delivering them when the link comes back, as TCP retransmission
would after a short partition.

Budgets (BRIEF, "Budgets"; reference rows E5, E7, E8):

* keepalive: the peer is dead after ``ping_missed_max`` missed pings; the
  engineer is told within 2 s of that (E7). Budget: ``ping_interval_s *
  ping_missed_max + 2 s``, with the test's shortened interval.
* the device ends a session on its own by ``cap + 2 s`` (monotonic), even
  when the broker is unreachable, whatever its wall clock says.
"""

from __future__ import annotations

import dataclasses
import email.utils
import json
import os
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
import trio
import trio_websocket
import wsproto.utilities

from bench.world import free_port
from relay._trio.agent import (
    AgentSettings,
    AgentStatus,
    make_session_runtime,
    run_agent,
)
from relay._trio.agent_sessions import OfferView, SessionRuntime
from relay.audit_reader import read_records
from relay.config import WebSocketLimits
from relay.pki_files import DataDir
from relay.proto import tunnel
from reliability import scorecard
from tests.e2e.conftest import LOOPBACK, PKI, fast_agent_config, pki, wait_until
from tests.e2e.test_sessions_broker import DEVICE, Harness, harness
from tests.reliability.fault_proxy import FaultProxy, Mode

pytestmark = pytest.mark.slow
__all__ = ["pki"]  # a fixture, imported so that pytest finds it here

#: Missed pings before a peer is dead (the BRIEF's 3, the config default).
MISSED: Final = 3
#: The engineer is told within this long of the detection (row E7).
TELL_S: Final = 2.0
#: The device's own end comes by cap + this (BRIEF, session cap).
DEVICE_CAP_SLACK_S: Final = 2.0
#: The wall-clock jumps of the clock test (reference row E5).
JUMPS: Final = (timedelta(hours=2), timedelta(hours=-2))


@dataclass(eq=False)
class Granter:
    """The person at the instrument: grants every offer at once, notes when."""

    label: str = "fault-test"
    granted_at: dict[str, float] = field(default_factory=dict)

    async def decide(self, offer: OfferView) -> bool:
        self.granted_at[offer.session_id] = trio.current_time()
        return True


@dataclass(eq=False)
class LocalService:
    """An echo service on the instrument; notes when each connection ended."""

    port: int = 0
    ended_at: list[float] = field(default_factory=list)

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.ended_at.append(trio.current_time())


@dataclass(eq=False)
class Network:
    """Broker, local service on the instrument, and the two proxies of one test."""

    h: Harness
    pki: PKI
    device_link: FaultProxy
    engineer_link: FaultProxy
    service: LocalService
    limits: WebSocketLimits

    @property
    def dead_after_s(self) -> float:
        return self.limits.ping_interval_s * self.limits.ping_missed_max


@dataclass(eq=False)
class World(Network):
    """A :class:`Network` with the agent running in the test process."""

    runtime: SessionRuntime
    status: AgentStatus
    granter: Granter

    async def agent_ready(self) -> None:
        """Wait until the agent is connected, with no session on either side."""
        await wait_until(
            lambda: (
                self.status.connected
                and len(self.h.sessions) == 0
                and self.runtime.state()["session"] is None
            ),
            timeout_s=30.0,
        )


@asynccontextmanager
async def network(
    pki: PKI,
    nursery: trio.Nursery,
    *,
    ping_s: float,
    **session_settings: Any,
) -> AsyncIterator[Network]:
    """The broker (keepalive every *ping_s*), its proxies, the local service."""
    limits = WebSocketLimits(
        ping_interval_s=ping_s, ping_missed_max=MISSED, close_timeout_s=1.0
    )
    pki.config = dataclasses.replace(pki.config, websocket=limits)
    service = LocalService()
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    service.port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, service.handle, listeners)
    async with harness(
        pki, nursery, allowed_channels=(f"tcp:{service.port}",), **session_settings
    ) as h:
        device_link = FaultProxy(h.broker.ports.device)
        engineer_link = FaultProxy(h.broker.ports.engineer)
        await nursery.start(device_link.serve)
        await nursery.start(engineer_link.serve)
        yield Network(h, pki, device_link, engineer_link, service, limits)


def enroll_device(pki: PKI) -> Path:
    """The device's key and certificate; returns the agent dir.

    Valid from two days ago: a device clock set back 2 h is still inside it.
    """
    return pki.enroll(DEVICE, now=datetime.now(UTC) - timedelta(days=2)).root


@asynccontextmanager
async def world(
    pki: PKI,
    nursery: trio.Nursery,
    *,
    ping_s: float,
    **session_settings: Any,
) -> AsyncIterator[World]:
    """The broker and the in-process agent behind its proxy, online."""
    async with network(pki, nursery, ping_s=ping_s, **session_settings) as net:
        settings = AgentSettings(
            broker_url=f"wss://{LOOPBACK}:{net.device_link.port}",
            agent_dir=enroll_device(pki),
            ca_file=pki.ca_file,
            limits=dataclasses.replace(
                fast_agent_config(),
                allowed_ports=(net.service.port,),
                shell_command=(),
            ),
            websocket=net.limits,
        )
        granter, status = Granter(), AgentStatus()
        runtime = make_session_runtime(settings, deciders=[granter])
        await nursery.start(runtime.run)
        nursery.start_soon(partial(run_agent, settings, status=status, runtime=runtime))
        w = World(
            **{f.name: getattr(net, f.name) for f in dataclasses.fields(Network)},
            runtime=runtime,
            status=status,
            granter=granter,
        )
        await w.agent_ready()
        yield w


@asynccontextmanager
async def attach(
    w: Network, session_id: str, port: int
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """The engineer's attach socket to *session_id*, through *port*."""
    context = ssl.create_default_context(cafile=str(w.pki.ca_file))
    stream = await trio.open_ssl_over_tcp_stream(
        LOOPBACK, port, ssl_context=context, https_compatible=True
    )
    try:
        async with stream, trio.open_nursery() as nursery:
            with trio.fail_after(10):
                ws = await trio_websocket.wrap_client_stream(
                    nursery,
                    stream,
                    f"{LOOPBACK}:{w.h.broker.ports.engineer}",
                    f"/api/v1/sessions/{session_id}/attach",
                    extra_headers=[(b"authorization", f"Bearer {w.h.token}".encode())],
                    max_message_size=1024 * 1024,
                )
            try:
                yield ws
            finally:
                with trio.move_on_after(2):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except* wsproto.utilities.LocalProtocolError:
        # trio-websocket answers a ping that arrives while it is closing and
        # fails on its own state (the broker's keepalive pings held by the
        # blackhole arrive just then): a fault of this test client only.
        pass


async def start_session(
    w: Network, stack: AsyncExitStack, *, engineer_port: int | None = None
) -> tuple[str, trio_websocket.WebSocketConnection]:
    """Request, grant (by the agent), attach, one TCP stream echoing: active."""
    response = await w.h.request(channels=[f"tcp:{w.service.port}"])
    assert response.status_code == 201, response.text
    sid: str = response.json()["session_id"]
    eng = await stack.enter_async_context(
        attach(w, sid, engineer_port or w.h.broker.ports.engineer)
    )
    with trio.fail_after(10):
        while True:
            message = await eng.get_message()
            assert isinstance(message, str), message
            if json.loads(message).get("state") == "active":
                break
        await eng.send_message(
            tunnel.encode(
                tunnel.StreamOpen(stream_id=1, channel=f"tcp:{w.service.port}")
            )
        )
        assert await _frame(eng) == tunnel.StreamOpenOk(stream_id=1)
        await eng.send_message(
            tunnel.encode(tunnel.StreamData(stream_id=1, payload=b"ping"))
        )
        echoed = await _frame(eng)
        assert echoed == tunnel.StreamData(stream_id=1, payload=b"ping"), echoed
    return sid, eng


async def _frame(eng: trio_websocket.WebSocketConnection) -> tunnel.Frame:
    """The next tunnel frame from the broker, skipping status messages."""
    while True:
        message = await eng.get_message()
        if isinstance(message, bytes):
            return tunnel.decode(message)


async def engineer_told(
    eng: trio_websocket.WebSocketConnection, within_s: float
) -> tuple[list[dict[str, Any]], trio_websocket.CloseReason]:
    """Read until the broker closes the engineer; the status messages and the close."""
    seen: list[dict[str, Any]] = []
    with (
        trio.fail_after(within_s),
        pytest.raises(trio_websocket.ConnectionClosed) as closed,
    ):
        await _statuses(eng, seen)
    assert closed.value.reason is not None
    return seen, closed.value.reason


async def _statuses(
    eng: trio_websocket.WebSocketConnection, seen: list[dict[str, Any]]
) -> None:
    while True:
        message = await eng.get_message()
        if isinstance(message, str):
            seen.append(json.loads(message))


def session_view(w: Network, sid: str) -> dict[str, Any]:
    view = w.h.sessions.view(sid)
    assert view is not None, sid
    return view


def _ended(w: Network, sid: str) -> bool:
    return bool(session_view(w, sid)["state"] == "ended")


def _streams_ended_beyond(w: Network, count: int) -> bool:
    return len(w.service.ended_at) > count


def audit_of(w: Network, sid: str) -> list[dict[str, Any]]:
    """The audit records that name session *sid*, in order."""
    return [
        r
        for r in read_records(DataDir(w.pki.data_dir).audit_dir)
        if r.get("session_id") == sid
    ]


async def until(predicate: Callable[[], bool], *, timeout_s: float) -> float:
    """Wait for *predicate*; return the instant it first held (trio clock)."""
    await wait_until(predicate, timeout_s=timeout_s, step_s=0.01)
    return trio.current_time()


# --- E8: a peer that vanishes without a word ----------------------------------------


async def test_silent_device_is_found_by_keepalive_and_the_engineer_told(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """Row E8: the link to the device goes silent mid-session (no FIN, no RST).
    The broker finds the device dead by its keepalive, ends the session
    ``device_disconnect`` and tells the engineer, within 3 missed pings + 2 s;
    the session never resumes by itself, and the agent comes back once the
    link does."""
    times: list[float] = []
    async with world(pki, nursery, ping_s=1.0) as w:
        budget = w.dead_after_s + TELL_S
        for _ in range(scorecard.repeats(ci=2)):
            async with AsyncExitStack() as stack:
                sid, eng = await start_session(w, stack)
                vanished = trio.current_time()
                w.device_link.set_mode(Mode.BLACKHOLE)
                seen, close = await engineer_told(eng, within_s=budget + 10)
                told = trio.current_time() - vanished
                assert (close.code, close.reason) == (4005, "device_disconnect")
                assert {"type": "end", "reason": "device_disconnect"} in seen
                assert told <= budget, f"engineer told after {told:.2f} s"
                view = session_view(w, sid)
                assert (view["state"], view["end_reason"]) == (
                    "ended",
                    "device_disconnect",
                )
                times.append(told)
            w.device_link.set_mode(Mode.PASS)
            await w.agent_ready()
            ends = [r for r in audit_of(w, sid) if r["event"] == "session.end"]
            assert [r["reason"] for r in ends] == ["device_disconnect"]
            # Not resumed: the session stays ended with the device back online.
            assert session_view(w, sid)["state"] == "ended"
    scorecard.record_fault(
        "device vanishes silently (blackhole): engineer told",
        row="E8",
        budget_s=budget,
        times_s=times,
    )


async def test_silent_engineer_is_found_by_keepalive_and_the_session_ends(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """Row E8, engineer side: the engineer's link goes silent mid-session. With
    no reattach grace, the broker must find the engineer dead by its keepalive
    and end the session ``engineer_disconnect`` within 3 missed pings + 2 s;
    the device is told (its local stream closes)."""
    times: list[float] = []
    async with world(pki, nursery, ping_s=1.0) as w:
        budget = w.dead_after_s + TELL_S
        for _ in range(scorecard.repeats(ci=2)):
            async with AsyncExitStack() as stack:
                sid, _eng = await start_session(
                    w, stack, engineer_port=w.engineer_link.port
                )
                streams_before = len(w.service.ended_at)
                vanished = trio.current_time()
                w.engineer_link.set_mode(Mode.BLACKHOLE)
                ended = await until(
                    partial(_ended, w, sid),
                    timeout_s=budget + 3,
                )
                took = ended - vanished
                assert session_view(w, sid)["end_reason"] == "engineer_disconnect"
                assert took <= budget, f"session ended after {took:.2f} s"
                await wait_until(
                    partial(_streams_ended_beyond, w, streams_before), timeout_s=5
                )
                times.append(took)
                w.engineer_link.set_mode(Mode.PASS)
            await w.agent_ready()
    scorecard.record_fault(
        "engineer vanishes silently (blackhole): session ended",
        row="E8",
        budget_s=budget,
        times_s=times,
    )


# --- E5: the cap with the broker unreachable --------------------------------------------


CAP_S: Final = 4
#: The partition starts this long before the cap.
PARTITION_BEFORE_CAP_S: Final = 0.5
#: Keepalive of the E5 tests: long enough that neither side declares the other
#: dead before the device's own end (cap + cap_grace_s), so only the cap timer
#: can end the session on the device.
CAP_PING_S: Final = 2.0


async def _cap_partitioned(w: World) -> tuple[str, float]:
    """One session to its cap with the device link blackholed from shortly
    before the cap, until the device has ended it. Returns the session id and the
    device's local end, in seconds after its grant; the link stays down."""
    async with AsyncExitStack() as stack:
        sid, _eng = await start_session(w, stack)
        granted = w.granter.granted_at[sid]
        streams_before = len(w.service.ended_at)
        await trio.sleep_until(granted + CAP_S - PARTITION_BEFORE_CAP_S)
        w.device_link.set_mode(Mode.BLACKHOLE)
        await wait_until(
            lambda: len(w.service.ended_at) > streams_before,
            timeout_s=CAP_S + 10,
            step_s=0.01,
        )
        local_end = w.service.ended_at[-1] - granted
        # Then the tunnel's close (bounded: the broker does not answer) and the
        # receipt, queued for the control channel.
        await wait_until(
            lambda: (w.runtime.state()["last_end"] or {}).get("session_id") == sid
        )
        assert w.runtime.state()["last_end"]["reason"] == "time_cap"
        # The broker ended it too, on its own timer, while partitioned.
        await wait_until(lambda: session_view(w, sid)["state"] == "ended")
        assert session_view(w, sid)["end_reason"] == "time_cap"
    return sid, local_end


def _one_end(w: Network, sid: str, reason: str) -> None:
    """The audit log closes session *sid* exactly once, for *reason*."""
    ends = [r for r in audit_of(w, sid) if r["event"] == "session.end"]
    assert [r["reason"] for r in ends] == [reason], ends


async def test_device_ends_at_the_cap_on_its_own_while_partitioned(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """Row E5: the device link is blackholed shortly before the cap. The agent
    closes its local stream by cap + 2 s on its own monotonic timer, the broker
    ends the session ``time_cap`` on its side, and once the link is back the
    audit log holds exactly one ``session.end`` for the session."""
    times: list[float] = []
    async with world(pki, nursery, ping_s=CAP_PING_S, max_session_seconds=CAP_S) as w:
        for _ in range(scorecard.repeats(ci=2)):
            sid, local_end = await _cap_partitioned(w)
            assert CAP_S - 0.1 <= local_end <= CAP_S + DEVICE_CAP_SLACK_S, local_end
            times.append(local_end)
            w.device_link.set_mode(Mode.PASS)
            await w.agent_ready()
            _one_end(w, sid, "time_cap")
    scorecard.record_fault(
        f"session cap ({CAP_S} s), broker partitioned: device local end",
        row="E5",
        budget_s=CAP_S + DEVICE_CAP_SLACK_S,
        times_s=times,
    )


async def test_device_end_receipt_reaches_the_audit_after_a_long_partition(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """Row E5, reconciliation: the partition outlasts both keepalives (each
    side finds the other dead), then the link comes back and the agent
    reconnects. The device's signed end receipt of the session it ended on its
    own must reach the audit log (``session.end_receipt``, marked late: the
    agent keeps it until the broker acks it and sends it again on the new
    channel), and the log still holds exactly one ``session.end``."""
    async with world(pki, nursery, ping_s=CAP_PING_S, max_session_seconds=CAP_S) as w:
        sid, _local_end = await _cap_partitioned(w)
        reconnects = w.device_link.accepted
        await trio.sleep(w.dead_after_s + CAP_PING_S)
        w.device_link.set_mode(Mode.PASS)
        await w.agent_ready()
        assert w.device_link.accepted > reconnects, "the agent did not reconnect"
        await wait_until(
            lambda: any(r["event"] == "session.end_receipt" for r in audit_of(w, sid)),
            timeout_s=5,
        )
        receipts = [r for r in audit_of(w, sid) if r["event"] == "session.end_receipt"]
        assert [r["reason"] for r in receipts] == ["time_cap"], receipts
        # After the broker's linger: verified against what it kept of the session.
        assert receipts[0]["late"] is True, receipts
        _one_end(w, sid, "time_cap")


# --- the proxy itself -------------------------------------------------------------------


async def test_fault_proxy_passes_holds_and_resets(nursery: trio.Nursery) -> None:
    """The proxy the tests above rely on: ``pass`` forwards both ways;
    ``blackhole`` forwards nothing and closes nothing (and holds what it read
    until the link is back, in order); ``reset`` closes with an RST."""
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    upstream_port = listeners[0].socket.getsockname()[1]
    service = LocalService()
    nursery.start_soon(trio.serve_listeners, service.handle, listeners)
    proxy = FaultProxy(upstream_port)
    await nursery.start(proxy.serve)

    async def echo(stream: trio.SocketStream, data: bytes) -> bytes:
        await stream.send_all(data)
        got = b""
        while len(got) < len(data):
            chunk = await stream.receive_some(65536)
            assert chunk, "closed"
            got += chunk
        return got

    client = await trio.open_tcp_stream(LOOPBACK, proxy.port)
    async with client:
        with trio.fail_after(5):
            assert await echo(client, b"one") == b"one"
        proxy.set_mode(Mode.BLACKHOLE)
        await client.send_all(b"two")
        with trio.move_on_after(0.5) as silent:
            await client.receive_some(65536)
        assert silent.cancelled_caught, "data crossed a blackhole"
        assert proxy.open_links == 1
        assert service.ended_at == []
        proxy.set_mode(Mode.PASS)
        with trio.fail_after(5):
            assert await client.receive_some(65536) == b"two"
        proxy.set_mode(Mode.RESET)
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError) as reset:
            await _drain(client)
        assert isinstance(reset.value.__cause__, ConnectionResetError)
        await wait_until(lambda: len(service.ended_at) == 1)
    late = await trio.open_tcp_stream(LOOPBACK, proxy.port)
    async with late:
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            await _drain(late)
    assert proxy.accepted == 2


async def _drain(stream: trio.SocketStream) -> None:
    """Read *stream* to its end."""
    while await stream.receive_some(65536):
        pass


# --- the same with a real `relay agent run` under libfaketime ----------------------------

#: Where Debian's ``faketime`` package puts the library (multi-threaded flavour:
#: the agent reads files in worker threads).
LIBFAKETIME: Final = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")


async def _device_online(net: Network) -> bool:
    listed = await net.h.api.get("/api/v1/devices", headers=net.h.headers())
    return any(d["device_id"] == DEVICE and d["online"] for d in listed.json())


async def _touchscreen(ui: httpx.AsyncClient) -> None:
    """The person at the instrument of the agent process: grants each offer."""
    answered: set[str] = set()
    while True:
        offer = (await ui.get("/api/state")).json()["offer"]
        if offer is not None and offer["session_id"] not in answered:
            answered.add(offer["session_id"])
            response = await ui.post(
                "/api/grant", json={"session_id": offer["session_id"]}
            )
            assert response.status_code == 200, response.text
        await trio.sleep(0.02)


def _broker_granted(net: Network, sid: str) -> float:
    """When the broker took the grant, on the trio clock.

    The agent's cap starts when it sends the grant, at most this (plus a
    loopback hop) earlier: the reference for the other process's timer.
    """
    granted_at = session_view(net, sid)["granted_at"]
    wall_s = datetime.fromisoformat(granted_at).timestamp()
    return wall_s - (time.time() - trio.current_time())


async def test_agent_process_under_libfaketime_keeps_its_cap(
    pki: PKI, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Row E5, clock, with the real ``relay agent run`` process: libfaketime
    (``FAKETIME_DONT_FAKE_MONOTONIC=1``) moves every wall-clock read of the
    process by +2 h, then (next sessions) by -2 h, just before the cap, with
    the broker unreachable. The agent still ends the session at the cap (not
    before, by cap + 2 s, counted from the instant the broker took the grant);
    the ``Date`` header of its UI shows that the jump did reach the process.
    The clock is set right before the link comes back (the broker's dev
    certificate is only minutes old: a device 2 h behind would take it for
    not yet valid, which is correct, and not what this test is about)."""
    if not LIBFAKETIME.exists():
        pytest.skip(f"{LIBFAKETIME} missing: apt-get install faketime")
    offset_file = tmp_path / "faketime"
    offset_file.write_text("+0\n")
    times: dict[timedelta, list[float]] = {jump: [] for jump in JUMPS}
    async with network(
        pki, nursery, ping_s=CAP_PING_S, max_session_seconds=CAP_S
    ) as net:
        ui_port = free_port()
        command = [
            sys.executable,
            "-m",
            "relay",
            "agent",
            "run",
            "--broker",
            f"wss://{LOOPBACK}:{net.device_link.port}",
            "--dir",
            str(enroll_device(pki)),
            "--ca-file",
            str(pki.ca_file),
            "--ui-listen",
            f"{LOOPBACK}:{ui_port}",
            "--allow-port",
            str(net.service.port),
            "--shell",
            "",
        ]
        env = dict(
            os.environ,
            LD_PRELOAD=str(LIBFAKETIME),
            FAKETIME_TIMESTAMP_FILE=str(offset_file),
            FAKETIME_DONT_FAKE_MONOTONIC="1",
            FAKETIME_NO_CACHE="1",  # the file is read at every clock read
        )
        with (tmp_path / "agent.log").open("wb") as log:
            await nursery.start(
                partial(
                    trio.run_process,
                    command,
                    env=env,
                    stdout=log,
                    stderr=log,
                    check=False,
                )
            )
        async with (
            httpx.AsyncClient(base_url=f"http://{LOOPBACK}:{ui_port}") as ui,
            trio.open_nursery() as person,
        ):
            with trio.fail_after(30):
                while not await _device_online(net):  # noqa: ASYNC110 - another process
                    await trio.sleep(0.05)
            person.start_soon(_touchscreen, ui)
            for jump in JUMPS:
                for _ in range(scorecard.repeats(ci=1)):
                    times[jump].append(
                        await _jump_at_the_cap(net, ui, offset_file, jump)
                    )
            person.cancel_scope.cancel()
    for jump, measured in times.items():
        scorecard.record_fault(
            f"agent process, libfaketime {_hours(jump)}: device local end at the cap",
            row="E5",
            budget_s=CAP_S + DEVICE_CAP_SLACK_S,
            times_s=measured,
        )


def _hours(jump: timedelta) -> str:
    return f"{jump.total_seconds() / 3600:+.0f}h"


async def _jump_at_the_cap(
    net: Network, ui: httpx.AsyncClient, offset_file: Path, jump: timedelta
) -> float:
    """One session of the agent process to its cap, partitioned and with its
    clock moved by *jump* shortly before; the clock and link set right
    afterwards. Returns the local end, seconds after the broker's grant."""
    async with AsyncExitStack() as stack:
        sid, _eng = await start_session(net, stack)
        granted = _broker_granted(net, sid)
        streams_before = len(net.service.ended_at)
        await trio.sleep_until(granted + CAP_S - PARTITION_BEFORE_CAP_S)
        net.device_link.set_mode(Mode.BLACKHOLE)
        await trio.Path(offset_file).write_text(_hours(jump) + "\n")
        await wait_until(
            partial(_streams_ended_beyond, net, streams_before),
            timeout_s=CAP_S + 10,
            step_s=0.01,
        )
        local_end = net.service.ended_at[-1] - granted
        assert CAP_S - 0.1 <= local_end <= CAP_S + DEVICE_CAP_SLACK_S, local_end
        # The jump did reach the process: its UI's Date header is 2 h off.
        answer = await ui.get("/api/state")
        device_now = email.utils.parsedate_to_datetime(answer.headers["date"])
        skew = device_now - datetime.now(UTC)
        assert abs(skew - jump) < timedelta(minutes=1), skew
        await wait_until(partial(_ended, net, sid))
    await trio.Path(offset_file).write_text("+0\n")
    net.device_link.set_mode(Mode.PASS)
    await wait_until(lambda: len(net.h.sessions) == 0, timeout_s=10)
    with trio.fail_after(30):
        while (await ui.get("/api/state")).json()["session"]:  # noqa: ASYNC110 - another process
            await trio.sleep(0.05)
        while not await _device_online(net):  # noqa: ASYNC110 - another process
            await trio.sleep(0.05)
    _one_end(net, sid, "time_cap")
    return local_end
