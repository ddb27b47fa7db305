"""Message-level abuse of the broker's WebSockets (reference rows C5-C9), as a matrix.

Each test sends one kind of bad input several times and reconciles, per kind
(reference section 5.3): *sent* = *rejected* (asserted per attempt, with the
close code the sender saw) = the change of the Prometheus counter that names the
reason = the audit events the broker wrote. Then it hands the numbers to
:func:`reliability.scorecard.record_bad_inputs`.

The broker runs in this process (the e2e fixtures, with the shortened limits of
``short_config``); audit records are read from the data dir's audit log, counters
from the broker's registry. Single-case tests of the same behaviours live in
tests/e2e and tests/relay/_trio; these are the counted matrix versions.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from relay._trio.websocket import HandshakeFailed, WebSocketConnection
from relay.proto import control, tunnel
from relay.proto.close import CloseCode
from reliability import scorecard
from tests.e2e.conftest import (
    PKI,
    RunningBroker,
    add_engineer,
    broker,
    login_token,
    pki,
    wait_until,
)
from tests.e2e.test_device_listener import open_device
from tests.e2e.test_sessions_broker import FakeDevice, fake_device, harness
from tests.reliability.message_abuse_harness import (
    CounterDelta,
    FloodOrder,
    LiveSession,
    audit_records,
    drain_until_closed,
    engineer_socket,
    frame_bytes,
    last_seq,
    live_session,
    open_stream,
    raw_device,
    request_session,
    rss_bytes,
)

__all__ = ["broker", "pki"]  # fixtures, imported so that pytest finds them here

pytestmark = pytest.mark.slow

CAP = 64 * 1024  # WebSocketLimits.max_message_bytes: the device frame cap
#: Broker memory growth allowed across all attempts of one kind (reference C6).
RSS_GROWTH_BUDGET = 10 * 1024 * 1024
BINARY, CONT = 0x2, 0x0
REPO = Path(__file__).resolve().parents[2]
HARNESS_MODULE = "tests.reliability.message_abuse_harness"


def _device_close_counters(code: int, label: str) -> list[tuple[str, dict[str, str]]]:
    return [
        ("relay_websocket_closes_total", {"listener": "device", "code": str(code)}),
        ("relay_device_disconnects_total", {"reason": label}),
    ]


def _disconnect_audits(pki: PKI, after_seq: int, code: int, reason: str) -> int:
    return sum(
        1
        for r in audit_records(pki, after_seq=after_seq)
        if r["event"] == "device.disconnected"
        and r.get("code") == code
        and r.get("reason") == reason
    )


def _oversized() -> bytes:
    return frame_bytes(BINARY, b"\x00" * (CAP + 1))


def _fragmented_over_cap() -> bytes:
    # Eight 8 KiB fragments fill the cap; a ninth of 1 byte crosses it. The
    # message ends there on purpose: bytes the broker never reads would make its
    # close a TCP reset, which can overtake the 1009 close frame on the way.
    piece = b"\x00" * (8 * 1024)
    first = frame_bytes(BINARY, piece, fin=False)
    more = frame_bytes(CONT, piece, fin=False)
    return first + more * 7 + frame_bytes(CONT, b"\x00", fin=True)


@pytest.mark.parametrize(
    ("kind", "payload"),
    [("oversized", _oversized()), ("fragmented", _fragmented_over_cap())],
)
async def test_c5_message_over_the_cap_closes_1009_every_time_and_memory_stays_flat(
    broker: RunningBroker, pki: PKI, kind: str, payload: bytes
) -> None:
    """A device message one byte over the 64 KiB cap, or 8 KiB fragments summing
    to one byte over it, closes the control channel with 1009 on every attempt;
    each one is counted (closes by code 1009, disconnects by reason
    protocol_error) and audited (``device.disconnected`` code 1009); the
    broker's memory grows by less than 10 MB over all attempts (nothing of a
    refused message is kept)."""
    attempts = int(scorecard.scaled(10, 50))
    device_id = f"dev-c5-{kind}"
    agent_dir = pki.enroll(device_id)

    async def one_attempt() -> int:
        with trio.fail_after(10):
            async with raw_device(broker, pki, agent_dir, hello_as=device_id) as dev:
                await dev.send_raw(payload)
                return await dev.close_code()

    # Warm-up: first-use allocations (TLS contexts, the audit file) are not growth.
    assert await one_attempt() == CloseCode.MESSAGE_TOO_BIG
    await wait_until(lambda: broker.sample("relay_devices_connected") == 0)
    seq = last_seq(pki)
    counters = CounterDelta(broker, _device_close_counters(1009, "protocol_error"))
    gc.collect()
    rss_before = rss_bytes()
    codes = [await one_attempt() for _ in range(attempts)]
    await wait_until(lambda: broker.sample("relay_devices_connected") == 0)
    gc.collect()
    growth = rss_bytes() - rss_before

    assert codes == [CloseCode.MESSAGE_TOO_BIG] * attempts
    closes, disconnects = counters.deltas()
    assert closes == disconnects == attempts
    await wait_until(
        lambda: _disconnect_audits(pki, seq, 1009, "protocol_error") >= attempts
    )
    audited = _disconnect_audits(pki, seq, 1009, "protocol_error")
    assert audited == attempts
    assert growth < RSS_GROWTH_BUDGET, f"RSS grew {growth} bytes over {attempts}"
    scorecard.record_bad_inputs(
        f"device control channel: {kind} message over the 64 KiB cap",
        row="C5",
        sent=attempts,
        rejected=codes.count(CloseCode.MESSAGE_TOO_BIG),
        counter_delta=closes,
        audit_events=audited,
        answer="close 1009",
    )
    scorecard.record_nothing_lost(
        f"C5 broker memory across {kind} messages over the cap",
        attempts=attempts,
        bytes_sent_per_attempt=len(payload),
        rss_growth_bytes=growth,
        budget_bytes=RSS_GROWTH_BUDGET,
    )


# --- C7 and C8 on the device control channel ------------------------------------

TEXT, PING, CLOSE = 0x1, 0x9, 0x8
_HEARTBEAT = b'{"type":"heartbeat","seq":1}'


async def _reconcile_device_inputs(
    broker: RunningBroker,
    pki: PKI,
    *,
    device_id: str,
    payload: bytes,
    expected_code: int,
    after_hello: bool,
    attempts: int,
) -> tuple[list[int], int, int]:
    """Send *payload* on *attempts* fresh control channels (after ``hello``, or as
    the first message); return the close codes seen, the counter change and the
    audit events.

    The counters: closes by code (``relay_websocket_closes_total{listener=
    "device"}``) and, by reason ``protocol_error``, disconnects of established
    channels or rejections before the hello. The audit event is
    ``device.disconnected`` (established) or ``device.rejected`` (before the
    hello), with that reason; for an established channel also the close code.
    """
    agent_dir = pki.enroll(device_id)
    seq = last_seq(pki)
    by_reason = (
        ("relay_device_disconnects_total", {"reason": "protocol_error"})
        if after_hello
        else ("relay_device_rejections_total", {"reason": "protocol_error"})
    )
    counters = CounterDelta(
        broker,
        [
            (
                "relay_websocket_closes_total",
                {"listener": "device", "code": str(expected_code)},
            ),
            by_reason,
        ],
    )
    codes = []
    for _ in range(attempts):
        with trio.fail_after(10):
            async with raw_device(
                broker, pki, agent_dir, hello_as=device_id if after_hello else None
            ) as dev:
                await dev.send_raw(payload)
                codes.append(await dev.close_code())
    await wait_until(lambda: broker.sample("relay_devices_connected") == 0)
    event = "device.disconnected" if after_hello else "device.rejected"

    def audited() -> int:
        return sum(
            1
            for r in audit_records(pki, after_seq=seq)
            if r["event"] == event
            and r.get("reason") == "protocol_error"
            and r.get("device_id") == device_id
            and (not after_hello or r.get("code") == expected_code)
        )

    await wait_until(lambda: audited() >= attempts)
    by_code, by_label = counters.deltas()
    assert by_code == by_label, (by_code, by_label)
    return codes, by_code, audited()


#: RFC 6455 violations written as raw frames, and the close each must get.
C7_CASES = {
    # §5.1: "The server MUST close the connection upon receiving a frame that
    # is not masked" (1002).
    "unmasked client frame": (frame_bytes(BINARY, _HEARTBEAT, masked=False), 1002),
    # §5.2: a nonzero RSV bit without a negotiated extension fails the connection.
    "RSV1 bit set": (frame_bytes(BINARY, _HEARTBEAT, rsv=4), 1002),
    "unknown opcode 0x3": (frame_bytes(0x3, _HEARTBEAT), 1002),
    # §5.5: control frames carry at most 125 payload bytes and are never fragmented.
    "ping of 126 bytes": (frame_bytes(PING, b"p" * 126), 1002),
    "fragmented ping": (frame_bytes(PING, b"p", fin=False), 1002),
    # §5.4: a new data frame while a fragmented message is open.
    "interleaved fragments": (
        frame_bytes(BINARY, b"{", fin=False) + frame_bytes(BINARY, _HEARTBEAT),
        1002,
    ),
    "continuation without a start": (frame_bytes(CONT, _HEARTBEAT), 1002),
    # §7.4.1 / §8.1: a close reason that is not UTF-8 is 1007.
    "close reason not UTF-8": (
        frame_bytes(CLOSE, (1000).to_bytes(2, "big") + b"\xff\xfe"),
        1007,
    ),
}


@pytest.mark.parametrize("case", sorted(C7_CASES))
async def test_c7_protocol_violation_in_raw_frames_closes_per_rfc_6455(
    broker: RunningBroker, pki: PKI, case: str
) -> None:
    """Every RFC 6455 violation on an established control channel closes it with
    the RFC's code (1002, or 1007 for bad UTF-8), each attempt counted as a
    protocol_error and audited with that code."""
    payload, code = C7_CASES[case]
    attempts = scorecard.repeats(ci=3)
    codes, counted, audited = await _reconcile_device_inputs(
        broker,
        pki,
        device_id="dev-c7-" + "".join(c for c in case if c.isalnum())[:20],
        payload=payload,
        expected_code=code,
        after_hello=True,
        attempts=attempts,
    )
    assert codes == [code] * attempts
    assert counted == audited == attempts
    scorecard.record_bad_inputs(
        f"device control channel: {case}",
        row="C7",
        sent=attempts,
        rejected=codes.count(code),
        counter_delta=counted,
        audit_events=audited,
        answer=f"close {code}",
    )


#: Application-level bad input on the binary control channel. The control codec
#: answers a message it cannot take with 1002 (RemoteProtocolError's default);
#: the transport answers a text frame with 1003.
C8_CASES = {
    "text frame": (frame_bytes(TEXT, _HEARTBEAT), 1003),
    "text frame, invalid UTF-8": (frame_bytes(TEXT, b"\xff\xfe\xfd"), 1003),
    "unknown message type": (frame_bytes(BINARY, b'{"type":"teleport"}'), 1002),
    "schema-invalid field": (
        frame_bytes(BINARY, b'{"type":"heartbeat","seq":"one"}'),
        1002,
    ),
    "extra field": (
        frame_bytes(BINARY, b'{"type":"heartbeat","seq":1,"admin":true}'),
        1002,
    ),
    "not JSON": (frame_bytes(BINARY, b"\xff\xfe not json"), 1002),
}


@pytest.mark.parametrize("after_hello", [True, False], ids=["established", "first"])
@pytest.mark.parametrize("case", sorted(C8_CASES))
async def test_c8_invalid_control_message_closes_and_is_audited(
    broker: RunningBroker, pki: PKI, case: str, after_hello: bool
) -> None:
    """A text frame, an unknown type, a field of the wrong type, an extra field or
    non-JSON on the control channel closes it (1003 for text, 1002 for the
    codec's refusals), as its first message or after the hello; each attempt is
    counted (closes by code, protocol_error by reason) and audited as
    ``device.disconnected``/``device.rejected`` reason ``protocol_error`` (the
    product's input-validation event)."""
    payload, code = C8_CASES[case]
    attempts = scorecard.repeats(ci=3)
    slug = "".join(c for c in case if c.isalnum())[:16]
    codes, counted, audited = await _reconcile_device_inputs(
        broker,
        pki,
        device_id=f"dev-c8-{slug}-{int(after_hello)}",
        payload=payload,
        expected_code=code,
        after_hello=after_hello,
        attempts=attempts,
    )
    assert codes == [code] * attempts
    assert counted == audited == attempts
    phase = "after hello" if after_hello else "first message"
    scorecard.record_bad_inputs(
        f"device control channel ({phase}): {case}",
        row="C8",
        sent=attempts,
        rejected=codes.count(code),
        counter_delta=counted,
        audit_events=audited,
        answer=f"close {code}",
    )


# --- C8 and C9 on a remote session's legs -------------------------------------------


async def _end_on_device(device: FakeDevice, offer: control.Offer) -> None:
    """Take the broker's SessionEnd off the control channel and answer it with
    the end receipt, as an agent does (the broker then forgets the session)."""
    while True:
        event = await device.next_event()
        if isinstance(event, control.SessionEnd):
            assert event.session_id == offer.session_id
            await device.send(device.ended(offer, event.reason))
            return


async def _protocol_error_audits(
    pki: PKI, after_seq: int, sids: set[str], side: str, *, expect: int
) -> int:
    """Audit records ``session.protocol_error`` of *side* in sessions *sids*
    after *after_seq*, once there are at least *expect* (the audit log is
    written by a task of its own)."""

    def count() -> int:
        return sum(
            1
            for r in audit_records(pki, after_seq=after_seq)
            if r["event"] == "session.protocol_error"
            and r.get("session_id") in sids
            and r.get("side") == side
        )

    await wait_until(lambda: count() >= expect)
    return count()


@pytest.mark.parametrize("side", ["engineer", "device"])
async def test_c8_text_frame_on_a_session_leg_ends_the_session_and_is_audited(
    pki: PKI, nursery: trio.Nursery, side: str
) -> None:
    """A text frame on the binary tunnel (the engineer's attach socket or the
    device's tunnel) is a protocol error of that leg: the session ends as that
    leg's disconnect, the sender's socket is closed (engineer: 4005 with the
    reason; device: 1003 from the transport), each attempt is counted in
    relay_session_ends_total and audited as ``session.protocol_error``."""
    attempts = scorecard.repeats(ci=2)
    reason = f"{side}_disconnect"
    expected = (4005, reason) if side == "engineer" else (1003, None)
    async with harness(pki, nursery) as h, fake_device(h) as device:
        seq = last_seq(pki)
        counters = CounterDelta(
            h.broker, [("relay_session_ends_total", {"reason": reason})]
        )
        answers, sids = [], set()
        for _ in range(attempts):
            async with live_session(h, device, h.token) as session:
                sids.add(session.session_id)
                sender = session.engineer if side == "engineer" else session.tunnel
                sender._protocol.send_text(b'{"type":"data"}')
                sender._pump()
                _, code, why = await drain_until_closed(sender)
                answers.append((code, why if side == "engineer" else None))
                if side == "engineer":
                    # A lost tunnel needs no end message: the device saw it go.
                    await _end_on_device(device, session.offer)
            await wait_until(lambda: len(h.sessions) == 0)
        (ended,) = counters.deltas()
        audited = await _protocol_error_audits(pki, seq, sids, side, expect=attempts)
    assert answers == [expected] * attempts
    assert ended == audited == attempts
    scorecard.record_bad_inputs(
        f"{side} leg of a session: text frame on the binary tunnel",
        row="C8",
        sent=attempts,
        rejected=answers.count(expected),
        counter_delta=ended,
        audit_events=audited,
        answer=f"close {expected[0]}, session ended {reason}",
    )


def _stream_id_zero() -> bytes:
    # A DATA frame by hand: encode() refuses stream id 0 (Rule 1).
    return bytes([tunnel.FrameType.DATA]) + (0).to_bytes(4, "big") + b"steal"


async def _make_stale(session: LiveSession) -> None:
    """Open stream 1 and close it both ways: its id is stale from then on."""
    await open_stream(session, 1)
    close = tunnel.StreamClose(stream_id=1, code=tunnel.StreamCloseCode.NORMAL)
    await session.engineer.send_message(tunnel.encode(close))
    with trio.fail_after(5):
        assert tunnel.decode(await session.tunnel.receive_message()) == close
    await session.tunnel.send_message(tunnel.encode(close))
    with trio.fail_after(5):
        assert tunnel.decode(await session.engineer.receive_message()) == close


#: Frames an engineer sends on their own attach socket that name a stream their
#: session does not have; how the stream is prepared first.
C9_FRAMES = {
    "stream id 0": _stream_id_zero(),
    # The victim's session has stream 1 open; the attacker's has none.
    "another session's stream id": tunnel.encode(
        tunnel.StreamData(stream_id=1, payload=b"steal")
    ),
    "stale stream id": tunnel.encode(tunnel.StreamData(stream_id=1, payload=b"stale")),
}


async def test_c9_idor_is_refused_audited_and_never_routed_to_another_session(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """An engineer (bob) with a session of his own tries to reach another
    engineer's (alice's) session: attaching to her session id (404), his device
    opening her session's tunnel (404), and frames naming streams his session
    does not have (stream id 0, her stream's id, a stale id of his own). Every
    attempt is refused: the upgrades with 404, counted and audited as
    authorization failures; the frames end *his* session as a protocol error
    (4005 engineer_disconnect), counted and audited as session.protocol_error.
    Nothing reaches his device's tunnel, and nothing reaches hers: the first
    frame her device gets afterwards is her own probe."""
    attempts = scorecard.repeats(ci=2)
    async with (
        harness(pki, nursery) as h,
        fake_device(h) as victim_device,
        fake_device(h, "dev-c9-bob") as bob_device,
    ):
        bob = await login_token(h.api, "bob", add_engineer(pki, "bob"))
        async with live_session(h, victim_device, h.token) as victim:
            await open_stream(victim, 1)

            # Upgrades that name someone else's session.
            seq = last_seq(pki)
            counters = CounterDelta(
                h.broker,
                [
                    ("relay_engineer_refusals_total", {"reason": "not_admitted"}),
                    ("relay_device_rejections_total", {"reason": "tunnel_refused"}),
                ],
            )
            attach_statuses, tunnel_statuses = [], []
            for _ in range(attempts):
                with pytest.raises(HandshakeFailed) as attach_refused:
                    async with engineer_socket(
                        h, f"/api/v1/sessions/{victim.session_id}/attach", bob
                    ):
                        pass  # pragma: no cover - refused
                attach_statuses.append(attach_refused.value.status)
                with pytest.raises(HandshakeFailed) as tunnel_refused:
                    async with open_device(
                        h.broker,
                        pki,
                        bob_device.agent_dir,
                        f"/v1/device/tunnel/{victim.session_id}",
                    ):
                        pass  # pragma: no cover - refused
                tunnel_statuses.append(tunnel_refused.value.status)
            attach_counted, tunnel_counted = counters.deltas()

            def upgrade_audits(event: str, reason: str) -> int:
                return sum(
                    1
                    for r in audit_records(pki, after_seq=seq)
                    if r["event"] == event and r.get("reason") == reason
                )

            await wait_until(
                lambda: upgrade_audits("device.rejected", "tunnel_refused") >= attempts
            )
            attach_audited = upgrade_audits(
                "engineer.websocket_refused", "not_admitted"
            )
            tunnel_audited = upgrade_audits("device.rejected", "tunnel_refused")
            assert attach_statuses == tunnel_statuses == [404] * attempts
            assert attach_counted == attach_audited == attempts
            assert tunnel_counted == tunnel_audited == attempts

            # Frames naming streams bob's own session does not have.
            frame_results: dict[str, tuple[list[tuple[int, str]], int, int]] = {}
            for kind, frame in C9_FRAMES.items():
                seq = last_seq(pki)
                counters = CounterDelta(
                    h.broker,
                    [("relay_session_ends_total", {"reason": "engineer_disconnect"})],
                )
                closes, sids = [], set()
                for _ in range(attempts):
                    async with live_session(h, bob_device, bob) as attack:
                        sids.add(attack.session_id)
                        if kind == "stale stream id":
                            await _make_stale(attack)
                        await attack.engineer.send_message(frame)
                        _, code, why = await drain_until_closed(attack.engineer)
                        closes.append((code, why))
                        relayed, _, _ = await drain_until_closed(attack.tunnel)
                        assert relayed == [], f"{kind}: relayed {relayed!r}"
                        await _end_on_device(bob_device, attack.offer)
                    await wait_until(
                        lambda: not h.sessions.device_in_session(bob_device.device_id)
                    )
                (ended,) = counters.deltas()
                audited = await _protocol_error_audits(
                    pki, seq, sids, "engineer", expect=attempts
                )
                frame_results[kind] = (closes, ended, audited)

            # Nothing of it reached alice's device: her probe is the next frame.
            probe = tunnel.StreamData(stream_id=1, payload=b"probe")
            await victim.engineer.send_message(tunnel.encode(probe))
            with trio.fail_after(5):
                assert tunnel.decode(await victim.tunnel.receive_message()) == probe
            assert h.sessions.view(victim.session_id)["state"] == "active"  # type: ignore[index]

    for kind, (closes, ended, audited) in frame_results.items():
        assert closes == [(4005, "engineer_disconnect")] * attempts, kind
        assert ended == audited == attempts, kind
        scorecard.record_bad_inputs(
            f"engineer attach socket: DATA on {kind}",
            row="C9",
            sent=attempts,
            rejected=len(closes),
            counter_delta=ended,
            audit_events=audited,
            answer="close 4005 engineer_disconnect (own session ended), not relayed",
        )
    scorecard.record_bad_inputs(
        "engineer attach to another engineer's session",
        row="C9",
        sent=attempts,
        rejected=attach_statuses.count(404),
        counter_delta=attach_counted,
        audit_events=attach_audited,
        answer="HTTP 404",
    )
    scorecard.record_bad_inputs(
        "device tunnel for another device's session",
        row="C9",
        sent=attempts,
        rejected=tunnel_statuses.count(404),
        counter_delta=tunnel_counted,
        audit_events=tunnel_audited,
        answer="HTTP 404",
    )


# --- C6: a message flood from one engineer ------------------------------------------

#: The other session's relay latency during the flood, against its baseline
#: (reference row C6: within 1.5x).
LATENCY_RATIO_BUDGET = 1.5
# What "starved" means for another session during the flood (asserted).
STARVATION_RATIO = 5.0
STARVATION_SLACK_S = 0.05
# A short test value of the attach socket's message rate limit (production
# default 1000/s): low enough that the flood meets it on a slow machine.
FLOOD_RATE_LIMIT = 400.0
FLOOD_BURST = 100


async def _echo_device(session: LiveSession) -> None:
    """The device end of a session that echoes every DATA frame back."""
    while True:
        frame = tunnel.decode(await session.tunnel.receive_message())
        if isinstance(frame, tunnel.StreamData):
            await session.tunnel.send_message(tunnel.encode(frame))


async def _echo_times(session: LiveSession, count: int) -> list[float]:
    """Round trips of *count* 1-byte DATA frames engineer -> device -> engineer."""
    message = tunnel.encode(tunnel.StreamData(stream_id=1, payload=b"k"))
    times = []
    for _ in range(count):
        start = trio.current_time()
        await session.engineer.send_message(message)
        while not isinstance(await session.engineer.receive(), bytes):
            pass  # a status message (none expected within the cap)
        times.append(trio.current_time() - start)
    return times


def _p(times: list[float], quantile: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]


async def test_c6_message_flood_is_relayed_within_memory_and_latency_budgets(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """One engineer (bob) floods his attach socket with 10-byte DATA frames as
    fast as his client can send, from a process of his own (his device's end of
    the tunnel there too). Within the stream's credit window (the tunnel's rate
    budget: 256 KiB a stream until the device grants more) every frame is
    relayed to his device, the broker's memory grows by less than 10 MB, and
    the p99 round trip of another engineer's session (alice, echoing through
    her device) is not starved (the reference's 1.5x of its baseline, taken
    before and after, is recorded for the scorecard).
    The broker reads his messages no faster than ``engineer_messages_per_s``
    (short test value): the flood is slowed down by backpressure, counted as
    throttling, never dropped. Past the window the same
    flood is a protocol error: his session is closed (4005 engineer_disconnect),
    counted and audited, and alice's session goes on."""
    flood_count = int(scorecard.scaled(2_000, 10_000))
    payload_bytes = 10
    baseline_echoes = int(scorecard.scaled(250, 1000))
    # A cap that outlasts the flood, and keepalive that does not take a busy
    # (not dead) flooder for gone, on a loaded machine.
    pki = dataclasses.replace(
        pki,
        config=dataclasses.replace(
            pki.config,
            websocket=dataclasses.replace(pki.config.websocket, ping_interval_s=5.0),
        ),
    )
    async with (
        harness(
            pki,
            nursery,
            max_session_seconds=600,
            engineer_messages_per_s=FLOOD_RATE_LIMIT,
            engineer_message_burst=FLOOD_BURST,
        ) as h,
        fake_device(h) as victim_device,
        fake_device(h, "dev-c6-bob") as bob_device,
    ):
        bob = await login_token(h.api, "bob", add_engineer(pki, "bob"))
        async with (
            live_session(h, victim_device, h.token) as victim,
            trio.open_nursery() as tasks,
        ):
            await open_stream(victim, 1)
            tasks.start_soon(_echo_device, victim)
            await _echo_times(victim, 20)  # warm-up
            baseline = await _echo_times(victim, baseline_echoes)

            offer = await request_session(h, bob_device, bob, ["tcp:22"])
            await bob_device.send(bob_device.grant(offer))
            await wait_until(
                lambda: h.sessions.view(offer.session_id)["state"] == "granted"  # type: ignore[index]
            )
            order = FloodOrder(
                engineer_port=h.broker.ports.engineer,
                device_port=h.broker.ports.device,
                ca_file=str(pki.ca_file),
                device_cert=str(bob_device.agent_dir.cert),
                device_key=str(bob_device.agent_dir.key),
                token=bob,
                session_id=offer.session_id,
                messages=flood_count,
                payload_bytes=payload_bytes,
            )
            seq = last_seq(pki)
            counters = CounterDelta(
                h.broker,
                [
                    ("relay_session_ends_total", {"reason": "engineer_disconnect"}),
                    ("relay_engineer_messages_throttled_total", {}),
                ],
            )
            gc.collect()
            rss_before = rss_bytes()
            during: list[tuple[float, float]] = []  # (wall time, round trip)
            flooding = await trio.lowlevel.open_process(
                [sys.executable, "-m", HARNESS_MODULE, json.dumps(vars(order))],
                stdout=subprocess.PIPE,
                cwd=REPO,
            )
            assert flooding.stdout is not None
            output = b""
            try:
                while flooding.returncode is None:
                    wall = time.time()
                    (rtt,) = await _echo_times(victim, 1)
                    during.append((wall, rtt))
                while chunk := await flooding.stdout.receive_some():
                    output += chunk
            finally:
                if flooding.returncode is None:
                    flooding.kill()
                with trio.CancelScope(shield=True):
                    await flooding.wait()
                    await flooding.stdout.aclose()
            assert flooding.returncode == 0, output
            result = json.loads(output.decode().strip().splitlines()[-1])
            gc.collect()
            growth = rss_bytes() - rss_before
            await _end_on_device(bob_device, offer)
            ended, throttled = counters.deltas()
            audited = await _protocol_error_audits(
                pki, seq, {offer.session_id}, "engineer", expect=1
            )
            assert h.sessions.view(victim.session_id)["state"] == "active"  # type: ignore[index]
            # The baseline is taken before and after the flood, so that the
            # machine's own load drifting (other jobs on shared cores) weighs
            # on both sides of the comparison alike.
            baseline += await _echo_times(victim, baseline_echoes)
            tasks.cancel_scope.cancel()

    window = [
        rtt
        for wall, rtt in during
        if result["start_wall"] <= wall <= result["end_wall"]
    ]
    rate = flood_count / result["seconds"]
    base_p50, base_p99 = _p(baseline, 0.5), _p(baseline, 0.99)
    flood_p50, flood_p99 = _p(window, 0.5), _p(window, 0.99)
    assert result["received"] == flood_count
    # Backpressure: the flood went no faster than the limit allows (one
    # bucket's burst at once, then the rate), and the broker counted the waits.
    assert throttled > 0
    assert result["seconds"] >= (flood_count - FLOOD_BURST) / FLOOD_RATE_LIMIT * 0.9
    assert growth < RSS_GROWTH_BUDGET, f"RSS grew {growth} bytes"
    assert len(window) >= 20, "too few echoes during the flood to compare"
    assert result["close"] == [4005, "engineer_disconnect"]
    assert ended == audited == 1
    scorecard.record_bad_inputs(
        "engineer attach socket: DATA flood past the stream's credit window",
        row="C6",
        sent=1,
        rejected=1,
        counter_delta=ended,
        audit_events=audited,
        answer="close 4005 engineer_disconnect",
    )
    scorecard.record_load(
        "C6: one engineer's message flood beside another session",
        messages=flood_count,
        message_bytes=payload_bytes,
        seconds=round(result["seconds"], 3),
        messages_per_s=round(rate),
        rate_limit_per_s=FLOOD_RATE_LIMIT,
        throttled_waits=throttled,
        broker_rss_growth_bytes=growth,
        other_session_echo_p50_ms=[round(base_p50 * 1e3, 3), round(flood_p50 * 1e3, 3)],
        other_session_echo_p99_ms=[round(base_p99 * 1e3, 3), round(flood_p99 * 1e3, 3)],
        echoes_during_flood=len(window),
        latency_budget_ratio=LATENCY_RATIO_BUDGET,
        latency_budget_met=flood_p99 <= LATENCY_RATIO_BUDGET * base_p99,
        shared_cores="broker and measuring client in one process, flooder in another",
    )
    # Reference row C6 budgets the other sessions' p99 (the p50 is recorded).
    # The 1.5x of reference row C6 is a performance figure: on two cores shared
    # by the broker, the flooder and the measuring client it depends on the
    # machine's other load, so it goes to the scorecard (latency_budget_met)
    # and is not asserted (house rule: no durations asserted in tests). What is
    # asserted is that the flood cannot starve another session.
    assert flood_p99 <= STARVATION_RATIO * base_p99 + STARVATION_SLACK_S, (
        f"other session's echo p99 {flood_p99 * 1e3:.1f} ms during the flood, "
        f"baseline {base_p99 * 1e3:.1f} ms"
    )


@pytest.mark.parametrize(
    ("kind", "payload"),
    [("oversized", _oversized()), ("fragmented", _fragmented_over_cap())],
)
async def test_c5_first_message_over_the_cap_closes_1009_and_is_audited(
    broker: RunningBroker, pki: PKI, kind: str, payload: bytes
) -> None:
    """The same message over the cap as a channel's first message (in place of
    the hello) is refused with 1009 too, counted (closes by code, rejections by
    reason protocol_error) and audited as ``device.rejected``."""
    attempts = scorecard.repeats(ci=3)
    codes, counted, audited = await _reconcile_device_inputs(
        broker,
        pki,
        device_id=f"dev-c5-first-{kind}",
        payload=payload,
        expected_code=CloseCode.MESSAGE_TOO_BIG,
        after_hello=False,
        attempts=attempts,
    )
    assert codes == [CloseCode.MESSAGE_TOO_BIG] * attempts
    assert counted == audited == attempts
    scorecard.record_bad_inputs(
        f"device control channel (first message): {kind} message over the cap",
        row="C5",
        sent=attempts,
        rejected=codes.count(CloseCode.MESSAGE_TOO_BIG),
        counter_delta=counted,
        audit_events=audited,
        answer="close 1009",
    )


async def _send_over_cap(ws: WebSocketConnection, kind: str) -> None:
    """One message of 64 KiB + 1 byte, whole or in 8 KiB fragments."""
    protocol = ws._protocol
    if kind == "oversized":
        protocol.send_binary(b"\x00" * (CAP + 1))
    else:
        piece = b"\x00" * (8 * 1024)
        protocol.send_binary(piece, fin=False)
        for _ in range(7):
            protocol.send_continuation(piece, fin=False)
        protocol.send_continuation(b"\x00", fin=True)
    ws._pump()


@pytest.mark.parametrize("kind", ["oversized", "fragmented"])
async def test_c5_engineer_message_over_the_cap_closes_1009_and_ends_the_session(
    pki: PKI, nursery: trio.Nursery, kind: str
) -> None:
    """A message over the engineer cap (64 KiB) on the attach socket, whole or
    in fragments, is closed with 1009 by the engineer listener; the session
    ends as ``engineer_disconnect`` (counted) and nothing reaches the device."""
    attempts = scorecard.repeats(ci=2)
    async with harness(pki, nursery) as h, fake_device(h) as device:
        counters = CounterDelta(
            h.broker, [("relay_session_ends_total", {"reason": "engineer_disconnect"})]
        )
        codes = []
        for _ in range(attempts):
            async with live_session(h, device, h.token) as session:
                await _send_over_cap(session.engineer, kind)
                _, code, _ = await drain_until_closed(session.engineer)
                codes.append(code)
                relayed, _, _ = await drain_until_closed(session.tunnel)
                assert relayed == []
                await _end_on_device(device, session.offer)
            await wait_until(lambda: len(h.sessions) == 0)
        (ended,) = counters.deltas()
    assert codes == [CloseCode.MESSAGE_TOO_BIG] * attempts
    assert ended == attempts
    scorecard.record_bad_inputs(
        f"engineer attach socket: {kind} message over the 64 KiB cap",
        row="C5",
        sent=attempts,
        rejected=codes.count(CloseCode.MESSAGE_TOO_BIG),
        # None: Hypercorn closes with 1009 itself and hands the application a
        # plain disconnect (code 1006), so the broker cannot tell this from a
        # dropped engineer: no counter or audit event names the reason (only
        # relay_session_ends_total{reason="engineer_disconnect"}, asserted).
        counter_delta=None,
        audit_events=None,
        answer="close 1009, session ended engineer_disconnect",
    )
