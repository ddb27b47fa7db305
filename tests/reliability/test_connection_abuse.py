"""Transport abuse at the connection level, as a matrix (reference rows D1-D5, C4, C10).

Each test sends many bad inputs of one kind at a real in-process broker (real TLS
on loopback, shortened listener limits) and reconciles, as reference section 5.3
asks: every attempt is asserted refused, and the number sent equals the change of
the Prometheus counter labelled by reason and the number of audit records read
back from the data dir. Where a row has no counter or no audit record, the test
asserts that and records ``None`` with the reason beside it.

Sizes come from ``reliability.scorecard``: the default suite runs the CI size;
``RELAY_RELIABILITY_SCALE=full`` runs the reference sizes (500 stallers, 1,000
connects).
"""

from __future__ import annotations

import math
import re
import shutil
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import trio

from relay._trio.websocket import ConnectionClosed, HandshakeFailed, connect_websocket
from relay.api_contract import EVENTS_PATH, SESSION_COOKIE
from relay.pki_files import AgentDir
from relay.proto import control
from reliability import scorecard
from tests.e2e.conftest import (
    LOOPBACK,
    PKI,
    RunningBroker,
    add_engineer,
    api_client,
    login_token,
    wait_until,
)
from tests.reliability.abuse_harness import (
    CLIENT_LIMITS,
    Attempt,
    Counters,
    abuse_broker,
    audit_count,
    audit_events,
    client_hello,
    downgraded_context,
    last_seq,
    make_pki,
    open_device,
    open_tcp,
    open_tls,
    raw_upgrade,
    source_address,
    upgrade_request,
    wait_closed,
)

pytestmark = pytest.mark.slow

#: How late after its deadline a staller may be closed (Teleport: limit + 1 s).
#: In the full run 500 stallers are closed in one burst, and the broker and
#: every client share one trio loop on 2 cores: the last of them notices its
#: close later than one connection would (the deadline itself is the same).
CLOSE_SLACK_S = scorecard.scaled(1.0, 3.0)
#: A real device gets in within the handshake deadline plus this (OpenSSH
#: regress/login-timeout.sh pattern; reference row D1).
REAL_DEVICE_SLACK_S = 5.0
#: Errors a refused client sees, whichever way the broker refused it.
REFUSED = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    ssl.SSLError,
    HandshakeFailed,
    ConnectionClosed,
    OSError,
)


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return make_pki(tmp_path)


def _tls_timeouts(listener: str = "device") -> tuple[str, dict[str, str]]:
    return (
        "relay_tls_handshake_failures_total",
        {"listener": listener, "reason": "timeout"},
    )


def _dropped(reason: str) -> tuple[str, dict[str, str]]:
    return ("relay_connections_dropped_total", {"listener": "device", "reason": reason})


def _series_total(broker: RunningBroker, name: str) -> float:
    """The sum of every sample of counter *name* (all label values)."""
    total = 0.0
    for family in broker.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


async def _stall(
    port: int,
    source: str | None,
    results: list[Attempt],
    connected: list[float] | None = None,
) -> None:
    """Connect and send nothing; note when the broker closes the connection."""
    start = trio.current_time()
    tcp = await open_tcp(port, source)
    connect_s = trio.current_time() - start
    if connected is not None:
        connected.append(connect_s)
    async with tcp:
        await wait_closed(tcp)
    results.append(_attempt(start, connect_s))


async def _trickle(
    port: int, hello: bytes, interval_s: float, results: list[Attempt]
) -> None:
    """Send a ClientHello one byte per *interval_s* until the broker hangs up."""
    start = trio.current_time()
    tcp = await open_tcp(port, source_address(999))
    connect_s = trio.current_time() - start
    sent = 0
    async with tcp, trio.open_nursery() as nursery:

        async def drip() -> None:
            nonlocal sent
            for byte in hello:
                try:
                    await tcp.send_all(bytes([byte]))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                sent += 1
                await trio.sleep(interval_s)

        nursery.start_soon(drip)
        await wait_closed(tcp)
        nursery.cancel_scope.cancel()
    # A ClientHello that got through would have been answered, not closed.
    assert 0 < sent < len(hello)
    results.append(_attempt(start, connect_s))


def _at_least(items: list[float], count: int) -> Callable[[], bool]:
    return lambda: len(items) >= count


def _attempt(start: float, connect_s: float) -> Attempt:
    """A refused attempt that began at *start* and is over now."""
    return Attempt(
        refused=True, elapsed_s=trio.current_time() - start, connect_s=connect_s
    )


def _assert_closed_at_deadline(attempts: list[Attempt], deadline_s: float) -> float:
    """Every attempt was closed at the deadline; returns the longest hold."""
    for attempt in attempts:
        assert attempt.refused
        # The broker's clock starts at its accept, after the client began to
        # connect: never early. It ends by the deadline after the connect
        # completed (plus the slack of noticing the close).
        assert attempt.elapsed_s >= deadline_s - 0.05, attempt
        assert attempt.held_s <= deadline_s + CLOSE_SLACK_S, attempt
    return max(a.held_s for a in attempts)


# D1: slowloris on TLS ----------------------------------------------------------------


async def test_d1_tls_stallers_fill_the_device_slots_and_a_real_device_still_gets_in(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """Silent stallers and a 1-byte ClientHello trickler hold every pending slot of
    the device listener; each is closed at the handshake deadline, and a real
    device that is refused while the slots are full gets in within deadline + 5 s."""
    stallers = int(scorecard.scaled(20, 500))
    slots = stallers + 1  # the trickler takes the last one
    deadline = scorecard.scaled(1.5, 5.0)
    device = pki.enroll("dev-d1")
    async with abuse_broker(
        pki,
        nursery,
        device={
            "handshake_timeout_s": deadline,
            # Early drop off (= the hard cap), so that "full" is deterministic.
            "max_pending_handshakes": slots,
            "early_drop_pending_handshakes": slots,
        },
    ) as broker:
        port = broker.ports.device
        counters = Counters(broker, _tls_timeouts(), _dropped("pending_full"))
        seq = last_seq(pki)
        hello = client_hello(pki.client_context(device))
        results: list[Attempt] = []
        real_refused = 0
        with trio.fail_after(deadline * 3 + REAL_DEVICE_SLACK_S + 30):
            async with trio.open_nursery() as attackers:
                for index in range(stallers):
                    # Ten per address: the per-source cap must not be what stops them.
                    attackers.start_soon(
                        _stall, port, source_address(index // 10), results
                    )
                attackers.start_soon(_trickle, port, hello, deadline / 20, results)
                await wait_until(
                    lambda: (
                        broker.sample("relay_pending_handshakes", listener="device")
                        == slots
                    ),
                    timeout_s=deadline,
                )
                full_at = trio.current_time()
                while True:
                    try:
                        async with open_device(port, pki, device, "dev-d1"):
                            got_in = trio.current_time() - full_at
                        break
                    except REFUSED:
                        real_refused += 1
                        await trio.sleep(0.1)
    sent = stallers + 1
    assert len(results) == sent
    worst = _assert_closed_at_deadline(results, deadline)
    assert real_refused >= 1, "the slots were full: the first try must be refused"
    assert got_in <= deadline + REAL_DEVICE_SLACK_S
    timeouts, full_drops = counters.delta()
    records = audit_events(pki)
    audited = audit_count(records, "device.tls_failed", after_seq=seq, reason="timeout")
    audited_drops = audit_count(
        records, "device.dropped", after_seq=seq, reason="pending_full"
    )
    assert timeouts == audited == sent
    assert full_drops == audited_drops == real_refused
    scorecard.record_bad_inputs(
        "TLS slowloris on the device listener (silent + 1-byte ClientHello)",
        row="D1",
        sent=sent,
        rejected=len(results),
        counter_delta=timeouts,
        audit_events=audited,
        answer=f"closed at the {deadline:g} s deadline (longest hold seen "
        f"{worst:.2f} s); real device in after "
        f"{got_in:.2f} s ({real_refused} tries dropped while full)",
    )


async def test_d1_tls_stallers_on_the_engineer_listener_are_closed_at_the_deadline(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """Silent stallers and a ClientHello trickler on the engineer listener are closed
    at its handshake deadline, and the API answers while they stall."""
    stallers = int(scorecard.scaled(20, 500))
    deadline = scorecard.scaled(1.5, 5.0)
    async with abuse_broker(
        pki, nursery, engineer={"handshake_timeout_s": deadline}
    ) as broker:
        port = broker.ports.engineer
        context = ssl.create_default_context(cafile=str(pki.ca_file))
        hello = client_hello(context)
        results: list[Attempt] = []
        connected: list[float] = []
        with trio.fail_after(deadline * 3 + 60):
            async with trio.open_nursery() as attackers:
                for index in range(stallers):
                    attackers.start_soon(
                        _stall, port, source_address(index // 10), results, connected
                    )
                    if index % 50 == 49:
                        # Hypercorn listens with a backlog of 100: a burst
                        # beyond it leaves connections the kernel never hands
                        # to the broker (client-side open, server-side absent).
                        await wait_until(_at_least(connected, index + 1))
                        await trio.sleep(0.05)
                attackers.start_soon(_trickle, port, hello, deadline / 20, results)
                await wait_until(lambda: len(connected) == stallers, timeout_s=30)
                async with httpx.AsyncClient(
                    base_url=f"https://{LOOPBACK}:{port}", verify=context
                ) as api:
                    answer = await api.get("/api/v1/info")
                    assert answer.status_code == 200
                    served_while_stalled = len(results) == 0
    assert served_while_stalled
    sent = stallers + 1
    assert len(results) == sent
    worst = _assert_closed_at_deadline(results, deadline)
    # No counter and no audit record: Hypercorn runs the engineer listener's TLS
    # handshake in its own connection task and drops a failed or late one
    # without telling the application (a known gap, not a choice:
    # reliability/README.md).
    assert _series_total(broker, "relay_tls_handshake_failures_total") == 0
    scorecard.record_bad_inputs(
        "TLS slowloris on the engineer listener (silent + 1-byte ClientHello)",
        row="D1",
        sent=sent,
        rejected=len(results),
        counter_delta=None,
        audit_events=None,
        answer=f"closed at the {deadline:g} s deadline (longest hold seen "
        f"{worst:.2f} s); API served meanwhile",
    )


# D2: slow HTTP upgrade after TLS ---------------------------------------------------------


async def _slow_upgrade(
    port: int,
    context: ssl.SSLContext,
    source: str,
    interval_s: float,
    results: list[Attempt],
    ready: list[float],
) -> None:
    """TLS, then an upgrade request whose header lines never end."""
    start = trio.current_time()
    tcp = await open_tcp(port, source)
    connect_s = trio.current_time() - start
    tls = trio.SSLStream(
        tcp, context, server_hostname="localhost", https_compatible=True
    )
    answer = b""
    try:
        await tls.do_handshake()
        await tls.send_all(b"GET /v1/device/control HTTP/1.1\r\n")
        ready.append(trio.current_time() - start)
        async with trio.open_nursery() as nursery:

            async def drip() -> None:
                for line in range(10**6):
                    await trio.sleep(interval_s)
                    try:
                        await tls.send_all(b"X-Slow-%d: still coming\r\n" % line)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return

            nursery.start_soon(drip)
            try:
                while chunk := await tls.receive_some(4096):
                    answer += chunk
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(tls)
    # Dropped without an HTTP answer (no 101, nor any other status).
    assert answer == b""
    results.append(_attempt(start, connect_s))


async def test_d2_slow_upgrade_headers_are_closed_at_the_deadline(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """Devices that finish TLS and then send one header line every quarter deadline
    are all closed at the handshake deadline (it is not reset by each line);
    ``upgrade_timeout`` rejections and audit records equal the stallers, and a
    real device connects meanwhile."""
    stallers = int(scorecard.scaled(10, 500))
    deadline = scorecard.scaled(1.5, 10.0)
    device = pki.enroll("dev-d2")
    async with abuse_broker(
        pki,
        nursery,
        device={
            "handshake_timeout_s": deadline,
            "max_pending_handshakes": stallers + 16,
            "early_drop_pending_handshakes": stallers + 16,
        },
    ) as broker:
        port = broker.ports.device
        counters = Counters(
            broker,
            ("relay_device_rejections_total", {"reason": "upgrade_timeout"}),
            _tls_timeouts(),
        )
        seq = last_seq(pki)
        context = pki.client_context(device)
        results: list[Attempt] = []
        ready: list[float] = []
        with trio.fail_after(deadline * 3 + 60):
            async with trio.open_nursery() as attackers:
                for index in range(stallers):
                    attackers.start_soon(
                        _slow_upgrade,
                        port,
                        context,
                        source_address(index // 10),
                        deadline / 4,
                        results,
                        ready,
                    )
                    # slowhttptest's way: a steady connection rate (here
                    # 200/s), so all are held at once but expire over time.
                    await trio.sleep(0.005)
                # Every staller is past TLS and holding its upgrade open.
                await wait_until(_at_least(ready, stallers), timeout_s=deadline)
                tried_at = trio.current_time()
                async with open_device(port, pki, device, "dev-d2"):
                    got_in = trio.current_time() - tried_at
                    still_held = stallers - len(results)
    # "Service available": a real device got in while stallers held their
    # upgrades (in the full run the first ones may expire before the last
    # have finished TLS on this shared 2-core box).
    assert still_held > 0
    assert got_in <= deadline + REAL_DEVICE_SLACK_S
    assert len(results) == stallers
    worst = _assert_closed_at_deadline(results, deadline)
    timeouts, tls_timeouts = counters.delta()
    audited = audit_count(
        audit_events(pki), "device.rejected", after_seq=seq, reason="upgrade_timeout"
    )
    assert timeouts == audited == stallers
    assert tls_timeouts == 0, "every staller finished TLS: the upgrade timed out"
    scorecard.record_bad_inputs(
        "slow HTTP upgrade after TLS on the device listener",
        row="D2",
        sent=stallers,
        rejected=len(results),
        counter_delta=timeouts,
        audit_events=audited,
        answer=f"closed at the {deadline:g} s deadline (longest hold seen "
        f"{worst:.2f} s), no HTTP answer; a real device got in after "
        f"{got_in:.2f} s with {still_held} held",
    )


async def test_d2_slow_request_head_on_the_engineer_listener_is_closed_at_the_deadline(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """Clients that finish TLS on the engineer listener and then send one header
    line every quarter deadline are closed at the deadline, without an answer."""
    stallers = int(scorecard.scaled(10, 100))
    deadline = 1.5  # below Hypercorn's 5 s keep-alive timer, which bounds the head
    async with abuse_broker(
        pki, nursery, engineer={"handshake_timeout_s": deadline}
    ) as broker:
        port = broker.ports.engineer
        context = ssl.create_default_context(cafile=str(pki.ca_file))
        results: list[Attempt] = []
        ready: list[float] = []
        with trio.fail_after(deadline * 3 + 60):
            async with trio.open_nursery() as attackers:
                for index in range(stallers):
                    attackers.start_soon(
                        _slow_upgrade,
                        port,
                        context,
                        source_address(index // 10),
                        deadline / 4,
                        results,
                        ready,
                    )
                    await trio.sleep(0.005)
    assert len(results) == len(ready) == stallers
    worst = _assert_closed_at_deadline(results, deadline)
    # No counter and no audit record: Hypercorn's keep-alive timer closes the
    # connection before any request reaches the application (a known
    # gap, as for the engineer listener's TLS failures: reliability/README.md).
    assert _series_total(broker, "relay_engineer_refusals_total") == 0
    scorecard.record_bad_inputs(
        "slow request head after TLS on the engineer listener",
        row="D2",
        sent=stallers,
        rejected=len(results),
        counter_delta=None,
        audit_events=None,
        answer=f"closed at the {deadline:g} s deadline (longest hold seen "
        f"{worst:.2f} s), no HTTP answer",
    )


# D3: connection flood from one source ----------------------------------------------------


async def _hold_device(
    port: int,
    pki: PKI,
    device_id: str,
    stop: trio.Event,
    up: list[str],
    dropped: list[str],
) -> None:
    """Hold a device's control channel, heartbeating until *stop*; note a drop."""
    agent_dir = pki.enroll(device_id)
    try:
        async with open_device(port, pki, agent_dir, device_id) as link:
            ws, channel = link.ws, link.channel
            up.append(device_id)
            seq = 0
            while not stop.is_set():
                seq += 1
                await ws.send_message(channel.send(control.Heartbeat(seq=seq)))
                channel.receive_message(await ws.receive_message())
                ack = channel.next_event()
                assert isinstance(ack, control.HeartbeatAck)
                assert ack.seq == seq
                await trio.sleep(0.1)
    except ConnectionClosed:
        dropped.append(device_id)


async def _flood_one(port: int, source: str, results: list[Attempt]) -> None:
    start = trio.current_time()
    try:
        tcp = await open_tcp(port, source)
    except OSError as exc:
        results.append(Attempt(refused=True, elapsed_s=0.0, detail=f"connect: {exc}"))
        return
    connect_s = trio.current_time() - start
    async with tcp:
        await wait_closed(tcp)
    results.append(_attempt(start, connect_s))


async def test_d3_connection_flood_from_one_source_is_refused_early(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """A flood of connects from one address gets at most the per-source cap of
    pending handshakes (per deadline); the excess is dropped at accept, counted
    and audited, and established devices see no disconnect."""
    flood = int(scorecard.scaled(300, 1000))
    deadline = 2.0
    established = 3
    async with abuse_broker(
        pki, nursery, device={"handshake_timeout_s": deadline}
    ) as broker:
        port = broker.ports.device
        cap = broker.config.device_listener.max_pending_per_source
        stop = trio.Event()
        up: list[str] = []
        dropped: list[str] = []
        results: list[Attempt] = []
        with trio.fail_after(60):
            async with trio.open_nursery() as devices:
                for index in range(established):
                    devices.start_soon(
                        _hold_device, port, pki, f"dev-d3-{index}", stop, up, dropped
                    )
                await wait_until(lambda: len(up) == established)
                counters = Counters(broker, _dropped("per_source_cap"), _tls_timeouts())
                disconnects_before = _series_total(
                    broker, "relay_device_disconnects_total"
                )
                seq = last_seq(pki)
                flood_start = trio.current_time()
                async with trio.open_nursery() as attacker:
                    for _ in range(flood):
                        attacker.start_soon(_flood_one, port, "127.0.0.77", results)
                        await trio.lowlevel.checkpoint()
                    flood_s = trio.current_time() - flood_start
                # The devices kept heartbeating through the whole flood.
                await trio.sleep(0.3)
                disconnects_after = _series_total(
                    broker, "relay_device_disconnects_total"
                )
                stop.set()
    assert len(results) == flood
    assert all(a.refused and not a.detail for a in results), [
        a for a in results if a.detail
    ]
    # Dropped at accept: closed before any deadline could pass. Admitted: closed
    # at the deadline (its clock starts at accept, after the client's).
    early = [a for a in results if a.elapsed_s < deadline - 0.05]
    late = [a for a in results if a.elapsed_s >= deadline - 0.05]
    assert all(a.held_s <= deadline + CLOSE_SLACK_S for a in late)
    assert len(late) <= cap * (1 + math.floor(flood_s / deadline))
    drops, timeouts = counters.delta()
    records = audit_events(pki)
    audited_drops = audit_count(
        records, "device.dropped", after_seq=seq, reason="per_source_cap"
    )
    audited_timeouts = audit_count(
        records, "device.tls_failed", after_seq=seq, reason="timeout"
    )
    assert drops == audited_drops == len(early)
    assert timeouts == audited_timeouts == len(late)
    assert dropped == []
    assert sorted(up) == [f"dev-d3-{i}" for i in range(established)]
    assert disconnects_after == disconnects_before
    scorecard.record_bad_inputs(
        "connection flood from one source on the device listener",
        row="D3",
        sent=flood,
        rejected=len(early) + len(late),
        counter_delta=drops + timeouts,
        audit_events=audited_drops + audited_timeouts,
        answer=f"{len(early)} dropped at accept (per_source_cap {cap}), "
        f"{len(late)} closed at the {deadline:g} s deadline; "
        f"{established} established devices: 0 disconnects",
    )


# D4: downgrade attempts ----------------------------------------------------------------

#: (name, only TLS version offered, cipher list offered, expected failure reason).
DOWNGRADES = [
    ("TLS 1.0 only", ssl.TLSVersion.TLSv1, None, "protocol_version"),
    ("TLS 1.1 only", ssl.TLSVersion.TLSv1_1, None, "protocol_version"),
    (
        "TLS 1.2, CBC suites only",
        ssl.TLSVersion.TLSv1_2,
        "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:ECDHE-ECDSA-AES128-SHA256:"
        "ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES128-SHA256",
        "no_shared_cipher",
    ),
    (
        "TLS 1.2, no ECDHE (RSA and DHE key exchange)",
        ssl.TLSVersion.TLSv1_2,
        "AES128-GCM-SHA256:AES256-GCM-SHA384:DHE-RSA-AES128-GCM-SHA256:"
        "DHE-RSA-AES256-GCM-SHA384",
        "no_shared_cipher",
    ),
]


async def _expect_handshake_refused(port: int, context: ssl.SSLContext) -> None:
    """The TLS handshake with *context* fails (what the sender sees)."""
    try:
        tls = await open_tls(port, context)
    except REFUSED:
        return
    await trio.aclose_forcefully(tls)
    pytest.fail("the downgraded handshake succeeded")


#: The device listener speaks TLS 1.3 only (Mozilla "modern"): every offer of an
#: older version, weak suites or not, fails on the protocol version; and a sound
#: TLS 1.2 offer too.
DEVICE_DOWNGRADES = [
    (name, version, ciphers, "protocol_version")
    for name, version, ciphers, _reason in DOWNGRADES
] + [("TLS 1.2, ECDHE and AEAD", ssl.TLSVersion.TLSv1_2, None, "protocol_version")]


@pytest.mark.parametrize(("name", "version", "ciphers", "reason"), DEVICE_DOWNGRADES)
async def test_d4_downgrades_fail_the_device_handshake(
    pki: PKI,
    nursery: trio.Nursery,
    name: str,
    version: ssl.TLSVersion,
    ciphers: str | None,
    reason: str,
) -> None:
    """A device offering anything below TLS 1.3 (old protocols, weak suites, or
    even a sound TLS 1.2) is refused in the TLS handshake, with a valid
    certificate; counted and audited by reason."""
    tries = scorecard.repeats(ci=3)
    device = pki.enroll("dev-d4")
    async with abuse_broker(pki, nursery) as broker:
        port = broker.ports.device
        counters = Counters(
            broker,
            (
                "relay_tls_handshake_failures_total",
                {"listener": "device", "reason": reason},
            ),
        )
        seq = last_seq(pki)
        context = downgraded_context(pki, device, version=version, ciphers=ciphers)
        with trio.fail_after(30):
            for _ in range(tries):
                await _expect_handshake_refused(port, context)
            await wait_until(lambda: counters.delta() == [tries])
            # The same device with a sound offer still gets in.
            async with open_device(port, pki, device, "dev-d4"):
                pass
    (failures,) = counters.delta()
    audited = audit_count(
        audit_events(pki), "device.tls_failed", after_seq=seq, reason=reason
    )
    assert failures == audited == tries
    scorecard.record_bad_inputs(
        f"downgrade on the device listener: {name}",
        row="D4",
        sent=tries,
        rejected=tries,
        counter_delta=failures,
        audit_events=audited,
        answer=f"TLS handshake failed ({reason})",
    )


async def test_d4_device_listener_speaks_tls13_to_a_default_client(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """A default client (as the agent) gets TLS 1.3 with an AEAD suite, P-256."""
    device = pki.enroll("dev-d4-ok")
    async with abuse_broker(pki, nursery) as broker:
        with trio.fail_after(10):
            tls13 = await open_tls(broker.ports.device, pki.client_context(device))
            version, cipher = tls13.version(), tls13.cipher()
            await trio.aclose_forcefully(tls13)
    assert version == "TLSv1.3"
    assert cipher is not None
    assert cipher[0] in {
        "TLS_AES_128_GCM_SHA256",
        "TLS_AES_256_GCM_SHA384",
        "TLS_CHACHA20_POLY1305_SHA256",
    }


@pytest.mark.parametrize(("name", "version", "ciphers", "reason"), DOWNGRADES)
async def test_d4_downgrades_fail_the_engineer_handshake(
    pki: PKI,
    nursery: trio.Nursery,
    name: str,
    version: ssl.TLSVersion,
    ciphers: str | None,
    reason: str,
) -> None:
    """A browser or CLI offering only an old protocol or weak suites is refused in
    the engineer listener's TLS handshake; the API still answers afterwards."""
    tries = scorecard.repeats(ci=3)
    async with abuse_broker(pki, nursery) as broker:
        port = broker.ports.engineer
        context = downgraded_context(pki, None, version=version, ciphers=ciphers)
        with trio.fail_after(30):
            for _ in range(tries):
                await _expect_handshake_refused(port, context)
            sound = ssl.create_default_context(cafile=str(pki.ca_file))
            async with httpx.AsyncClient(
                base_url=f"https://{LOOPBACK}:{port}", verify=sound
            ) as api:
                assert (await api.get("/api/v1/info")).status_code == 200
    # No counter and no audit record: Hypercorn runs the engineer listener's TLS
    # handshake and drops a failed one without telling the application (a
    # known gap, reliability/README.md; the device listener counts and audits
    # these).
    assert _series_total(broker, "relay_tls_handshake_failures_total") == 0
    scorecard.record_bad_inputs(
        f"downgrade on the engineer listener: {name}",
        row="D4",
        sent=tries,
        rejected=tries,
        counter_delta=None,
        audit_events=None,
        answer=f"TLS handshake failed ({reason})",
    )


# D5: renegotiation, compression, 0-RTT ---------------------------------------------------


def _openssl() -> str:
    binary = shutil.which("openssl")
    if binary is None:
        pytest.skip("needs the openssl command-line tool (apt package openssl)")
    return binary


async def _s_client(args: list[str], stdin: bytes) -> str:
    """Run ``openssl s_client`` with *args*; its stdout and stderr together."""
    done = await trio.run_process(
        [_openssl(), "s_client", *args],
        stdin=stdin,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return (done.stdout + done.stderr).decode(errors="replace")


def _s_client_target(pki: PKI, port: int, agent_dir: AgentDir | None) -> list[str]:
    args = ["-connect", f"{LOOPBACK}:{port}", "-CAfile", str(pki.ca_file)]
    if agent_dir is not None:
        args += ["-cert", str(agent_dir.cert), "-key", str(agent_dir.key)]
    return args


async def test_d5_client_renegotiation_is_refused_on_the_engineer_listener(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """A TLS 1.2 client that asks to renegotiate (s_client's ``R``) gets OpenSSL's
    no_renegotiation alert. (The device listener speaks TLS 1.3 only, which has
    no renegotiation: a TLS 1.2 offer fails the handshake, see D4.)"""
    tries = scorecard.repeats(ci=2)
    async with abuse_broker(pki, nursery) as broker:
        target = _s_client_target(pki, broker.ports.engineer, None)
        outputs = []
        with trio.fail_after(60):
            for _ in range(tries):
                outputs.append(await _s_client([*target, "-tls1_2"], b"R\n"))
    for output in outputs:
        assert "RENEGOTIATING" in output, output
        assert "no renegotiation" in output, output
    scorecard.record_bad_inputs(
        "client-initiated TLS renegotiation on the engineer listener",
        row="D5",
        sent=tries,
        rejected=len(outputs),
        # The engineer listener's TLS is Hypercorn's: OpenSSL refuses the
        # renegotiation and Hypercorn drops the connection without telling the
        # application, so there is neither a counter nor an audit record.
        counter_delta=None,
        audit_events=None,
        answer="TLS alert no_renegotiation; connection closed",
    )


@pytest.mark.parametrize("listener", ["device", "engineer"])
async def test_d5_early_data_cannot_be_sent(
    pki: PKI, nursery: trio.Nursery, listener: str
) -> None:
    """0-RTT: the broker issues no TLS 1.3 tickets (and any ticket would allow
    no early data, "Max Early Data: 0"), so a client has nothing to send early
    data with."""
    device = pki.enroll("dev-d5-0rtt")
    async with abuse_broker(pki, nursery) as broker:
        port = getattr(broker.ports, listener)
        target = _s_client_target(pki, port, device if listener == "device" else None)
        session = pki.data_dir.parent / f"{listener}.session"
        early = pki.data_dir.parent / "early.txt"
        early.write_bytes(b"GET /api/v1/info HTTP/1.1\r\nHost: localhost\r\n\r\n")
        second = ""
        with trio.fail_after(60):
            first = await _s_client(
                [*target, "-tls1_3", "-ign_eof", "-sess_out", str(session)],
                b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            )
            if session.exists():
                resume = ["-sess_in", str(session), "-early_data", str(early)]
                second = await _s_client(
                    [*target, "-tls1_3", *resume],
                    b"",
                )
    assert "New, TLSv1.3" in first, first
    allowances = re.findall(r"Max Early Data: (\d+)", first)
    assert all(value == "0" for value in allowances), allowances
    if allowances:
        # A ticket came: resuming with it must not carry the early request.
        assert "Early data was not sent" in second, second
        answer = "tickets allow no early data (Max Early Data: 0); none sent"
    else:
        # No ticket at all: there is nothing to resume, hence no 0-RTT.
        answer = "no TLS 1.3 ticket issued; nothing to resume"
    assert "Early data was accepted" not in second
    scorecard.record_bad_inputs(
        f"TLS 1.3 early data (0-RTT) on the {listener} listener",
        row="D5",
        sent=1,
        rejected=1,
        # Nothing to count or audit: the client never gets to send early data.
        counter_delta=None,
        audit_events=None,
        answer=answer,
    )


@pytest.mark.parametrize("listener", ["device", "engineer"])
async def test_d5_tls_compression_is_never_negotiated(
    pki: PKI, nursery: trio.Nursery, listener: str
) -> None:
    """A client that allows TLS compression (CRIME) still gets none, on every
    version the listener speaks (the device listener: TLS 1.3 only)."""
    device = pki.enroll("dev-d5-zip")
    versions = [ssl.TLSVersion.TLSv1_3]
    if listener == "engineer":
        versions.insert(0, ssl.TLSVersion.TLSv1_2)
    async with abuse_broker(pki, nursery) as broker:
        port = getattr(broker.ports, listener)
        compressions = []
        with trio.fail_after(30):
            for version in versions:
                context = pki.client_context(device if listener == "device" else None)
                context.options &= ~ssl.OP_NO_COMPRESSION
                context.maximum_version = version
                tls = await open_tls(port, context)
                compressions.append(tls.compression())
                await trio.aclose_forcefully(tls)
    assert compressions == [None] * len(versions)
    scorecard.record_bad_inputs(
        f"TLS compression offered on the {listener} listener",
        row="D5",
        sent=len(versions),
        rejected=len(versions),
        # Not a refusal but an ignored offer: nothing to count or audit.
        counter_delta=None,
        audit_events=None,
        answer="ignored: no compression negotiated",
    )


async def test_d5_resumed_tls_session_of_a_revoked_device_is_refused(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """A device cannot resume a TLS session (which would skip OpenSSL's
    certificate verification): the device listener speaks TLS 1.3 and issues
    no tickets, so a client that offers its old session runs a full handshake;
    and the broker's own checks after every handshake refuse a revoked device
    (403) whatever the handshake was."""
    device = pki.enroll("dev-d5-resume")
    async with abuse_broker(pki, nursery) as broker:
        port = broker.ports.device
        context = pki.client_context(device)
        with trio.fail_after(30):
            async with open_device(port, pki, device, "dev-d5-resume", context) as link:
                # A TLS 1.3 ticket would have come with the server's first
                # records, long read by the end of the upgrade and hello.
                session = link.tls.session
            assert session is not None
            assert not session.has_ticket
            with pki.store() as store:
                store.revoke_device("dev-d5-resume", at=datetime.now(UTC), reason="t")
            counters = Counters(
                broker, ("relay_device_rejections_total", {"reason": "revoked"})
            )
            seq = last_seq(pki)
            tcp = await open_tcp(port)
            tls = trio.SSLStream(
                tcp, context, server_hostname="localhost", https_compatible=True
            )
            tls.session = session
            await tls.do_handshake()
            resumed = tls.session_reused
            with pytest.raises(HandshakeFailed) as refused:
                async with connect_websocket(
                    tls, f"wss://localhost:{port}/v1/device/control", CLIENT_LIMITS
                ):
                    pass  # pragma: no cover - refused
            await trio.aclose_forcefully(tls)
    assert not resumed
    assert refused.value.status == 403
    (refusals,) = counters.delta()
    audited = audit_count(
        audit_events(pki), "device.rejected", after_seq=seq, reason="revoked"
    )
    assert refusals == audited == 1
    scorecard.record_bad_inputs(
        "revoked device offering its old TLS session on the device listener",
        row="D5",
        sent=1,
        rejected=1,
        counter_delta=refusals,
        audit_events=audited,
        answer="HTTP 403 certificate revoked",
    )


# C4: malformed upgrades; C10: permessage-deflate ------------------------------------------

#: (name, extra header lines, Sec-WebSocket-Version, expected status).
DEVICE_BAD_UPGRADES = [
    ("upgrade request over 8 KiB", ("X-Padding: " + "p" * 8192,), "13", 431),
    (
        "duplicate Sec-WebSocket-Key",
        ("Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==",),
        "13",
        400,
    ),
    ("wrong Sec-WebSocket-Version", (), "8", 426),
]


@pytest.mark.parametrize(("name", "extra", "version", "status"), DEVICE_BAD_UPGRADES)
async def test_c4_malformed_device_upgrades_get_no_101(
    pki: PKI,
    nursery: trio.Nursery,
    name: str,
    extra: tuple[str, ...],
    version: str,
    status: int,
) -> None:
    """A device with a valid certificate but a malformed upgrade gets its 4xx (426
    names the version spoken), never a 101; counted and audited as bad_upgrade."""
    tries = scorecard.repeats(ci=2)
    device = pki.enroll("dev-c4")
    async with abuse_broker(pki, nursery) as broker:
        port = broker.ports.device
        counters = Counters(
            broker, ("relay_device_rejections_total", {"reason": "bad_upgrade"})
        )
        seq = last_seq(pki)
        request = upgrade_request(
            f"localhost:{port}", "/v1/device/control", *extra, version=version
        )
        with trio.fail_after(30):
            answers = [
                await raw_upgrade(port, pki.client_context(device), request)
                for _ in range(tries)
            ]
            await wait_until(lambda: counters.delta() == [tries])
    for answer in answers:
        assert answer.status == status
        if status == 426:
            assert answer.header("Sec-WebSocket-Version") == ["13"]
    (refusals,) = counters.delta()
    audited = audit_count(
        audit_events(pki), "device.rejected", after_seq=seq, reason="bad_upgrade"
    )
    assert refusals == audited == tries
    scorecard.record_bad_inputs(
        f"device upgrade: {name}",
        row="C4",
        sent=tries,
        rejected=len(answers),
        counter_delta=refusals,
        audit_events=audited,
        answer=f"HTTP {status}",
    )


@pytest.mark.parametrize(
    ("name", "reason", "status"),
    [
        ("upgrade request over 8 KiB", "head_too_large", 431),
        ("duplicate Sec-WebSocket-Key", "duplicate_websocket_key", 400),
        ("two session cookies", "duplicate_session_cookie", 400),
        ("a real and a forged session cookie", "duplicate_session_cookie", 400),
    ],
)
async def test_c4_malformed_engineer_upgrades_get_no_101(
    pki: PKI, nursery: trio.Nursery, name: str, reason: str, status: int
) -> None:
    """An engineer upgrade that is too large or ambiguous (two keys, two session
    cookies) is refused before any route runs, never a 101; counted by reason."""
    tries = scorecard.repeats(ci=2)
    secret = add_engineer(pki, "alice")
    async with abuse_broker(pki, nursery) as broker:
        port = broker.ports.engineer
        async with api_client(pki, port) as api:
            token = await login_token(api, "alice", secret)
        origin = f"Origin: https://{LOOPBACK}:{port}"
        cookie = f"{SESSION_COOKIE}={token}"
        extra = {
            "head_too_large": (
                f"Authorization: Bearer {token}",
                "X-Pad: " + "p" * 8192,
            ),
            "duplicate_websocket_key": (
                f"Authorization: Bearer {token}",
                "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==",
            ),
            "duplicate_session_cookie": (
                origin,
                f"Cookie: {cookie}; {cookie}"
                if name.startswith("two")
                else f"Cookie: {cookie}; {SESSION_COOKIE}=x{token[1:]}",
            ),
        }[reason]
        request = upgrade_request(f"{LOOPBACK}:{port}", EVENTS_PATH, *extra)
        control_request = upgrade_request(
            f"{LOOPBACK}:{port}", EVENTS_PATH, origin, f"Cookie: {cookie}"
        )
        counters = Counters(
            broker, ("relay_engineer_refusals_total", {"reason": reason})
        )
        seq = last_seq(pki)
        context = ssl.create_default_context(cafile=str(pki.ca_file))
        with trio.fail_after(30):
            answers = [await raw_upgrade(port, context, request) for _ in range(tries)]
            # The same socket with one cookie and one key is accepted.
            accepted = await raw_upgrade(port, context, control_request)
    assert accepted.status == 101
    assert [a.status for a in answers] == [status] * tries
    (refusals,) = counters.delta()
    assert refusals == tries
    # No audit record by design: refusals before any route runs are counted
    # only; the engineer listener audits Origin and admission refusals
    # (relay/_trio/engineer_ws.py).
    assert (
        audit_count(audit_events(pki), "engineer.websocket_refused", after_seq=seq) == 0
    )
    scorecard.record_bad_inputs(
        f"engineer upgrade: {name}",
        row="C4",
        sent=tries,
        rejected=len(answers),
        counter_delta=refusals,
        audit_events=None,
        answer=f"HTTP {status}",
    )


@pytest.mark.parametrize(
    "offer",
    [
        "permessage-deflate",
        "permessage-deflate; client_max_window_bits",
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        "x-webkit-deflate-frame",
    ],
)
async def test_c10_device_listener_never_negotiates_compression(
    pki: PKI, nursery: trio.Nursery, offer: str
) -> None:
    """A device offering a compression extension gets its upgrade (101) without
    any extension: the offer is ignored, so no frame is ever compressed."""
    device = pki.enroll("dev-c10")
    async with abuse_broker(pki, nursery) as broker:
        port = broker.ports.device
        request = upgrade_request(
            f"localhost:{port}",
            "/v1/device/control",
            f"Sec-WebSocket-Extensions: {offer}",
        )
        with trio.fail_after(30):
            answer = await raw_upgrade(port, pki.client_context(device), request)
    assert answer.status == 101
    assert answer.header("Sec-WebSocket-Extensions") == []
    scorecard.record_bad_inputs(
        f"device upgrade offering {offer}",
        row="C10",
        sent=1,
        rejected=1,
        # An ignored offer, not a refusal: nothing to count or audit.
        counter_delta=None,
        audit_events=None,
        answer="101 without Sec-WebSocket-Extensions",
    )


async def test_c4_engineer_upgrade_for_another_websocket_version_gets_426(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """An engineer upgrade for a WebSocket version other than 13 gets 426 with
    ``Sec-WebSocket-Version: 13`` (RFC 6455 4.4), as on the device listener;
    Hypercorn answers it before any route runs, so it is neither counted nor
    audited (relay/_trio/hypercorn_ws.py)."""
    tries = scorecard.repeats(ci=2)
    secret = add_engineer(pki, "alice")
    async with abuse_broker(pki, nursery) as broker:
        port = broker.ports.engineer
        async with api_client(pki, port) as api:
            token = await login_token(api, "alice", secret)
        request = upgrade_request(
            f"{LOOPBACK}:{port}",
            EVENTS_PATH,
            f"Authorization: Bearer {token}",
            version="8",
        )
        context = ssl.create_default_context(cafile=str(pki.ca_file))
        with trio.fail_after(30):
            answers = [await raw_upgrade(port, context, request) for _ in range(tries)]
    assert [a.status for a in answers] == [426] * tries
    assert all(a.header("Sec-WebSocket-Version") == ["13"] for a in answers)
    scorecard.record_bad_inputs(
        "engineer upgrade: wrong Sec-WebSocket-Version",
        row="C4",
        sent=tries,
        rejected=len(answers),
        # Answered by the HTTP server before the application sees a request.
        counter_delta=None,
        audit_events=None,
        answer="HTTP 426",
    )


@pytest.mark.parametrize(
    "offer",
    ["permessage-deflate", "permessage-deflate; client_max_window_bits"],
)
async def test_c10_engineer_listener_never_negotiates_compression(
    pki: PKI, nursery: trio.Nursery, offer: str
) -> None:
    """An engineer's WebSocket offering compression is upgraded (101) without
    any extension (Hypercorn would accept permessage-deflate;
    relay/_trio/hypercorn_ws.py drops the offer)."""
    secret = add_engineer(pki, "alice")
    async with abuse_broker(pki, nursery) as broker:
        port = broker.ports.engineer
        async with api_client(pki, port) as api:
            token = await login_token(api, "alice", secret)
        request = upgrade_request(
            f"{LOOPBACK}:{port}",
            EVENTS_PATH,
            f"Authorization: Bearer {token}",
            f"Sec-WebSocket-Extensions: {offer}",
        )
        context = ssl.create_default_context(cafile=str(pki.ca_file))
        with trio.fail_after(30):
            answer = await raw_upgrade(port, context, request)
    assert answer.status == 101
    assert answer.header("Sec-WebSocket-Extensions") == []
    scorecard.record_bad_inputs(
        f"engineer upgrade offering {offer}",
        row="C10",
        sent=1,
        rejected=1,
        # An ignored offer, not a refusal: nothing to count or audit.
        counter_delta=None,
        audit_events=None,
        answer="101 without Sec-WebSocket-Extensions",
    )
