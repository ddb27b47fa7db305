"""Crash and audit-sink faults, every actor in its own process (rows E10, E11, E12).

The broker is ``relay serve``, the device ``relay agent run`` (both real child
processes), the engineer this test process with ``relay forward``'s session
engine; see :mod:`tests.reliability.crash_harness`. Each fault is repeated
``scorecard.repeats(ci=2)`` times (20 in the scorecard run) on a session that is
carrying data, and each repeat is timed against the budget of the reference
(reliability-security.md, section 3): the device's local streams closed within
1 s of a broker crash, an orderly stop within 10 s of SIGTERM, live sessions
ended within 2 s (test value) of an audit log that cannot be written.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from reliability import scorecard
from tests.cli.test_audit_trail import _fill
from tests.e2e.conftest import LOOPBACK, wait_until
from tests.reliability.crash_harness import (
    AGENT_CONFIG,
    DEVICE_ID,
    FAST_AGENT_CONFIG,
    Stage,
    epoch,
    open_session,
    read_only_switch,
    stage,
    stage_files,
    wall_time,
)
from tests.small_disk import small_disk

pytestmark = pytest.mark.slow

#: Reference section 3, on-site kill / E10: device local streams closed <= 1 s.
LOCAL_STREAMS_BUDGET_S = 1.0
#: Reference section 3, SIGTERM: exit <= 10 s.
EXIT_BUDGET_S = 10.0
#: Reference section 3, audit sink failure: live sessions ended <= 2 s (test value).
FAIL_CLOSED_BUDGET_S = 2.0
#: Once the broker is back, the agent's next attempt comes at the latest after
#: its current backoff ceiling, which never exceeds the cap.
RECONNECT_BUDGET_S = AGENT_CONFIG.backoff_cap_s + AGENT_CONFIG.connect_timeout_s


def _verify_with_the_cli(data_dir: Path, sink: Path | None = None) -> None:
    """``relay audit verify`` on the broker's audit directory (against its
    checkpoint *sink* when it is not the default one) exits 0."""
    sink_args = [] if sink is None else ["--sink", str(sink)]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "relay",
            "audit",
            "verify",
            *sink_args,
            str(data_dir / "audit"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _session_accounting(records: list[dict[str, Any]]) -> dict[str, Counter[str]]:
    """Per session id: how many ``session.requested`` and ``session.end`` it has."""
    counts: dict[str, Counter[str]] = {}
    for record in records:
        if record["event"] in ("session.requested", "session.end"):
            counts.setdefault(str(record["session_id"]), Counter())[
                record["event"]
            ] += 1
    return counts


def _assert_one_start_one_end(s: Stage, expected: set[str]) -> int:
    """Every session of the log has exactly one start and one end; returns the
    number of sessions. *expected* (the test's sessions) must all be there."""
    counts = _session_accounting(s.audit_records())
    assert expected <= set(counts), expected - set(counts)
    wrong = {
        sid: dict(c)
        for sid, c in counts.items()
        if c != Counter({"session.requested": 1, "session.end": 1})
    }
    assert not wrong, f"sessions without exactly one start and one end: {wrong}"
    return len(counts)


def _ends(s: Stage, session_id: str) -> list[str]:
    return [
        str(r["reason"])
        for r in s.session_records(session_id)
        if r["event"] == "session.end"
    ]


async def _connected_long_enough_to_reset_the_backoff(s: Stage) -> None:
    """Wait until the agent's connection has lasted its ``stable_after_s`` (with
    a margin), so that a loss now starts the backoff from its first step."""
    connected = s.agent.events("agent.connected")
    assert connected, "the agent is not connected"
    stable_at = wall_time(connected[-1]) + AGENT_CONFIG.stable_after_s + 0.5
    await trio.sleep(max(0.0, stable_at - time.time()))


async def _local_streams_closed(s: Stage, before: int, *, timeout_s: float) -> None:
    """Wait until the device's local service saw one more connection closed."""
    await wait_until(lambda: len(s.service.closed_at) > before, timeout_s=timeout_s)


async def _agent_logged(
    s: Stage, event: str, after: float, *, timeout_s: float
) -> None:
    """Wait until the agent logged *event* after wall time *after*."""
    await wait_until(
        lambda: bool(s.agent.events(event, after=after)),
        timeout_s=timeout_s,
        step_s=0.05,
    )


async def _reconnected_since(s: Stage, wall: float) -> None:
    """Wait until the agent is connected again (after wall time *wall*)."""
    await _agent_logged(s, "agent.connected", wall, timeout_s=RECONNECT_BUDGET_S + 5)


# E10: SIGKILL ---------------------------------------------------------------------------


async def test_broker_sigkill_mid_forward_closes_device_streams_reconnects_and_audits_broker_crash(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """E10: `relay serve` is SIGKILLed while a forward carries data. The device's
    local connection closes within 1 s of the kill; the agent's first retry comes
    within its first backoff ceiling (full jitter, base 1 s) and every later one
    within its own (cap 60 s); after the restart the agent is back and the
    broker has closed the orphaned session as `broker_crash`; at the end every
    session has one start and one end and `relay audit verify` passes."""
    base, cap = AGENT_CONFIG.backoff_base_s, AGENT_CONFIG.backoff_cap_s
    closed_s: list[float] = []
    first_retry_s: list[float] = []
    reconnect_s: list[float] = []
    sessions: set[str] = set()
    with stage_files(tmp_path / "world") as world:
        async with stage(world, nursery) as s:
            for repeat in range(scorecard.repeats(ci=2)):
                await _connected_long_enough_to_reset_the_backoff(s)
                live = await open_session(s, nursery, f"ticket 5{repeat:03d}: crash")
                broker = s.world.broker.process
                assert broker is not None
                closed_before = len(s.service.closed_at)
                killed_wall, killed_at = time.time(), trio.current_time()
                broker.kill()
                await trio.to_thread.run_sync(broker.wait)

                await _local_streams_closed(s, closed_before, timeout_s=30)
                closed_s.append(s.service.closed_at[closed_before] - killed_at)
                with trio.fail_after(30):
                    await live.ended.wait()
                assert live.session_id
                sessions.add(live.session_id)

                # The agent noticed and retries on its backoff while the broker is away.
                await _agent_logged(s, "agent.retry", killed_wall, timeout_s=30)
                await trio.to_thread.run_sync(s.world.broker.start)
                ready_wall = time.time()
                await _reconnected_since(s, killed_wall)
                connected = s.agent.events("agent.connected", after=killed_wall)[0]
                reconnect_s.append(max(0.0, wall_time(connected) - ready_wall))
                retries = s.agent.events("agent.retry", after=killed_wall)
                assert retries[0]["outcome"] == "lost"
                first_retry_s.append(float(retries[0]["retry_in_s"]))
                for step, retry in enumerate(retries):
                    ceiling = min(cap, base * 2**step)
                    assert 0 <= retry["retry_in_s"] <= ceiling, (step, retries)

                # The restarted broker closed the session the crash left open.
                assert _ends(s, live.session_id) == ["broker_crash"]
            await trio.to_thread.run_sync(s.world.broker.stop)
            total = _assert_one_start_one_end(s, sessions)
        _verify_with_the_cli(world.data_dir)

    assert max(closed_s) <= LOCAL_STREAMS_BUDGET_S, closed_s
    assert max(first_retry_s) <= base, first_retry_s
    assert max(reconnect_s) <= RECONNECT_BUDGET_S, reconnect_s
    scorecard.record_fault(
        "broker SIGKILL: device local streams closed",
        row="E10",
        budget_s=LOCAL_STREAMS_BUDGET_S,
        times_s=closed_s,
    )
    scorecard.record_fault(
        "broker SIGKILL: agent's first reconnect attempt (full jitter, base 1 s)",
        row="E10",
        budget_s=base,
        times_s=first_retry_s,
    )
    scorecard.record_fault(
        "broker SIGKILL: device reconnected after the broker restarted",
        row="E10",
        budget_s=RECONNECT_BUDGET_S,
        times_s=reconnect_s,
    )
    scorecard.record_nothing_lost(
        "broker SIGKILL: sessions closed as broker_crash at the restart",
        row="E10",
        crashes=len(sessions),
        sessions=total,
        closed_as_broker_crash=len(sessions),
        sessions_without_end=0,
        chain_verified=True,
    )


# E11: SIGTERM ---------------------------------------------------------------------------


async def test_broker_sigterm_mid_forward_ends_it_as_broker_shutdown_flushes_and_exits_in_time(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """E11: `relay serve` gets SIGTERM while a forward carries data, repeatedly
    (a restart per repeat). Each time it exits 0 within 10 s, the engineer is told
    `broker_shutdown`, the device's local connection is closed, and the log on
    disk already holds the session's end (`broker_shutdown`), the broker's stop
    and a final checkpoint; every session has one start and one end, and `relay
    audit verify` passes."""
    exit_s: list[float] = []
    sessions: set[str] = set()
    repeats = scorecard.repeats(ci=2)
    with stage_files(tmp_path / "world") as world:
        async with stage(world, nursery, FAST_AGENT_CONFIG) as s:
            for repeat in range(repeats):
                live = await open_session(s, nursery, f"ticket 6{repeat:03d}: stop")
                broker = s.world.broker.process
                assert broker is not None
                closed_before = len(s.service.closed_at)
                signalled_wall, signalled_at = time.time(), trio.current_time()
                broker.send_signal(signal.SIGTERM)
                code = await trio.to_thread.run_sync(
                    partial(broker.wait, EXIT_BUDGET_S + 5)
                )
                exit_s.append(trio.current_time() - signalled_at)
                assert code == 0
                with trio.fail_after(10):
                    await live.ended.wait()
                assert live.error is None, repr(live.error)
                assert live.end_reason == "broker_shutdown"
                sessions.add(live.session_id)
                await _local_streams_closed(s, closed_before, timeout_s=10)

                # Flushed before the exit: read with the broker gone.
                assert _ends(s, live.session_id) == ["broker_shutdown"]
                records = s.audit_records()
                events = [r["event"] for r in records]
                [end_at] = [
                    i
                    for i, r in enumerate(records)
                    if r["event"] == "session.end"
                    and r["session_id"] == live.session_id
                ]
                stopped_at = len(events) - 1 - events[::-1].index("broker.stopped")
                assert end_at < stopped_at < len(events) - 1
                assert events[-1] == "audit.checkpoint"
                _assert_one_start_one_end(s, sessions)

                if repeat < repeats - 1:
                    await trio.to_thread.run_sync(s.world.broker.start)
                    await _reconnected_since(s, signalled_wall)
            total = _assert_one_start_one_end(s, sessions)
        _verify_with_the_cli(world.data_dir)

    assert max(exit_s) <= EXIT_BUDGET_S, exit_s
    scorecard.record_fault(
        "broker SIGTERM: sessions ended as broker_shutdown, audit flushed, exit 0",
        row="E11",
        budget_s=EXIT_BUDGET_S,
        times_s=exit_s,
    )
    scorecard.record_nothing_lost(
        "broker SIGTERM: every session ended in the log before the exit",
        row="E11",
        stops=len(sessions),
        sessions=total,
        ended_as_broker_shutdown=len(sessions),
        sessions_without_end=0,
        chain_verified=True,
    )


# E12: the audit log cannot be written ----------------------------------------------------

#: The two ways the audit sink breaks here: the errno the broker reports when
#: it resumes, and the name on the scorecard.
SINK_FAULTS = {
    "disk_full": ("ENOSPC", "audit disk full"),
    "read_only": ("EROFS", "audit checkpoint sink read-only"),
}
#: Room for the log of the scorecard run's 40 failures (about 300 KB), small
#: enough to fill in a moment.
AUDIT_DISK_SIZE = "4m"
ENDS_METRIC = 'relay_session_ends_total{reason="audit_failure"}'


@dataclass
class _SinkFault:
    """One failure of the audit sink, as measured."""

    session_id: str
    ended_s: float
    write_failures: float


@contextmanager
def _breakable_audit_sink(root: Path) -> Iterator[dict[str, Callable[[bool], None]]]:
    """The broker's ``audit/`` on a small disk that can be filled, and its
    checkpoint sink (the log's other half: nothing is sealed without it) in a
    directory whose mount can be made read-only. Yields a switch per fault that
    breaks the sink (True) or mends it (False)."""
    audit_dir = root / "world" / "broker" / "audit"
    with (
        small_disk(audit_dir, AUDIT_DISK_SIZE),
        read_only_switch(root / "sink") as sink,
    ):
        fillers: list[Path] = []

        def disk_full(broken: bool) -> None:
            if broken:
                fillers.append(_fill(audit_dir))
            else:
                fillers.pop().unlink()

        def read_only(broken: bool) -> None:
            sink.set(read_only=broken)

        yield {"disk_full": disk_full, "read_only": read_only}


async def _probe_device_port(s: Stage) -> None:
    """Something the broker must audit, cheaply: a connection to the device port
    that is not TLS (``device.rejected``)."""
    probe = await trio.open_tcp_stream(LOOPBACK, s.world.broker.device_port)
    async with probe:
        await probe.send_all(b"GET / HTTP/1.0\r\n\r\n")


async def _audit_sink_fails_once(
    s: Stage,
    api: httpx.AsyncClient,
    nursery: trio.Nursery,
    break_sink: Callable[[bool], None],
    reason: str,
) -> _SinkFault:
    """A forward in use; the sink breaks; the session must end, a new one be
    refused; the sink is mended and the log must be writable again."""
    wall_offset = time.time() - trio.current_time()  # the local service's times
    live = await open_session(s, nursery, reason)
    closed_before = len(s.service.closed_at)
    assert s.metric("relay_audit_writable") == 1.0
    failures_before = s.metric("relay_audit_write_failures_total")
    ends_before = s.metric(ENDS_METRIC)

    broken_wall = time.time()
    break_sink(True)
    for _attempt in range(400):
        await _probe_device_port(s)
        if s.metric("relay_audit_writable") == 0.0:
            break
        await trio.sleep(0.02)
    else:
        pytest.fail("the broker never noticed the broken audit sink")
    unwritable_seen_wall = time.time()
    with trio.fail_after(10):
        await live.ended.wait()
    assert live.error is None, repr(live.error)
    assert live.end_reason == "audit_failure"
    await _local_streams_closed(s, closed_before, timeout_s=10)
    device_closed_wall = s.service.closed_at[closed_before] + wall_offset

    # Fail closed: no new session while the log cannot be written.
    answer = await api.post(
        "/api/v1/sessions",
        json={
            "device_id": DEVICE_ID,
            "reason": "while the audit log is down",
            "channels": [f"tcp:{s.service_port}"],
        },
    )
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"] == "audit log unavailable"
    write_failures = s.metric("relay_audit_write_failures_total") - failures_before
    assert write_failures >= 1
    assert s.metric(ENDS_METRIC) == ends_before + 1

    break_sink(False)
    await wait_until(
        lambda: s.metric("relay_audit_writable") == 1.0, timeout_s=10, step_s=0.1
    )
    # When the first write failed, by the broker's own (monotonic) account,
    # which must lie between the breakage and the test seeing it reported.
    *_, resumed = [r for r in s.audit_records() if r["event"] == "audit.resumed"]
    failed_wall = epoch(str(resumed["ts"])) - resumed["failed_for_ms"] / 1000
    # The records' timestamps are in milliseconds; the resumed record's is taken
    # after the backlog was written, which makes the estimate a little late.
    assert broken_wall - 0.01 <= failed_wall <= unwritable_seen_wall + 0.5
    return _SinkFault(
        session_id=live.session_id,
        ended_s=max(live.ended_wall, device_closed_wall) - failed_wall,
        write_failures=write_failures,
    )


async def test_an_audit_sink_that_fails_ends_live_sessions_refuses_new_ones_and_recovers(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """E12: while a forward carries data, the audit log stops being writable: its
    disk fills up (ENOSPC), or its checkpoint sink's mount turns read-only
    (EROFS), in turn, repeatedly, in one broker. Each time the live session ends
    as `audit_failure` for the engineer and on the device (local connection
    closed) within 2 s of the first failed write, a new session request is
    refused with 503 "audit log unavailable", the write failure counter goes up
    and the `audit_failure` end counter by exactly one; once the sink is back,
    the log is writable again, with one `audit.resumed` per failure naming its
    errno and nothing lost, the next session is granted, and at the end every
    session has one start and one end and `relay audit verify` passes across
    every gap."""
    repeats = scorecard.repeats(ci=2)
    faults: dict[str, list[_SinkFault]] = {name: [] for name in SINK_FAULTS}
    sink = tmp_path / "sink" / "checkpoints.jsonl"
    with (
        _breakable_audit_sink(tmp_path) as switches,
        stage_files(tmp_path / "world") as world,
    ):
        world.write_config(
            audit={
                "checkpoint_sink": str(sink),
                "checkpoint_every_s": 0.25,
                "stdout": False,
            }
        )
        async with stage(world, nursery, FAST_AGENT_CONFIG) as s, s.api() as api:
            for repeat in range(repeats):
                for name, switch in switches.items():
                    faults[name].append(
                        await _audit_sink_fails_once(
                            s, api, nursery, switch, f"ticket 7{repeat:03d}: {name}"
                        )
                    )
            await trio.to_thread.run_sync(s.world.broker.stop)
            every = [fault.session_id for done in faults.values() for fault in done]
            total = _assert_one_start_one_end(s, set(every))
            for session_id in every:
                assert _ends(s, session_id) == ["audit_failure"]
            resumed = [r for r in s.audit_records() if r["event"] == "audit.resumed"]
        _verify_with_the_cli(world.data_dir, sink)

    errnos = [errno_name for errno_name, _ in SINK_FAULTS.values()]
    assert [r["error"] for r in resumed] == errnos * repeats, resumed
    assert all(r["records_lost"] == 0 for r in resumed), resumed
    for name, done in faults.items():
        ended_s = [fault.ended_s for fault in done]
        assert max(ended_s) <= FAIL_CLOSED_BUDGET_S, (name, ended_s)
    for name, done in faults.items():
        errno_name, what = SINK_FAULTS[name]
        mine = [r for r in resumed if r["error"] == errno_name]
        scorecard.record_fault(
            f"{what}: live session ended as audit_failure, new ones refused",
            row="E12",
            budget_s=FAIL_CLOSED_BUDGET_S,
            times_s=[fault.ended_s for fault in done],
        )
        scorecard.record_nothing_lost(
            f"{what}: writing resumed, chain verifies across the gaps",
            row="E12",
            failure_events=len(done),
            write_failures_counted=[fault.write_failures for fault in done],
            audit_resumed_records=len(mine),
            records_delayed=sum(int(r["records_delayed"]) for r in mine),
            records_lost=sum(int(r["records_lost"]) for r in mine),
            sessions=total,
            sessions_without_end=0,
            chain_verified=True,
        )
