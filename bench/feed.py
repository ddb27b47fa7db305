"""The monitoring feed: how fast records are stored, and what that costs the sessions.

Theory of operation
===================
Three processes beside the broker (``relay serve``), as in the field:

* the *feeder* (this module run as ``python -m bench.feed``): N simulated
  instruments, each on its own mTLS control channel (our transport and control
  messages, as :mod:`bench.loadgen` does, each from its own 127.x.y.z address),
  sending :class:`~relay.proto.control.FeedRecord` messages (alarms and daily
  statistics, checked JSON made with :mod:`relay.proto.feed`) with at most
  :data:`WINDOW` records unacknowledged per device, as the agent does; plus a
  few *probe* devices that send only heartbeats, every
  :data:`PROBE_INTERVAL_S`, whose round trip is the interactive control path
  (feeding devices send one every :data:`FEEDER_HEARTBEAT_S`, which queues
  behind their own records);
* the instrument of the session set-up (:mod:`bench.fleet`, one real agent);
* the engineer (this process: :func:`bench.sessions.one_session`).

Phases, one after another on the same broker, in one run:

* ``quiet``: no records; the set-up sessions and the probes' heartbeats are
  the baseline;
* ``end-of-day``: records at :data:`END_OF_DAY_RATE` a second in all, the
  daily statistics of a node's 2,500 instruments (docs/capacity.md's working
  point) spread over a minute; the same sessions and heartbeats;
* ``flood``: every feeding device sends as fast as its window allows (what a
  fleet draining its queues after an outage does): the ingest capacity, and
  the worst case for the sessions.

Each feeding phase ends with a drain: no new records, every outstanding one
acknowledged. Every record has an id made of its device's index and its
sequence number, so afterwards the store is read back device by device and
must hold exactly the ids sent: nothing lost, nothing twice. Every ack must
say ``stored``. In full mode the end-of-day and flood phases run again on a
broker that stores in PostgreSQL (a throw-away server, :mod:`tests.pg_cluster`),
without the sessions.

Feeder protocol, JSON lines: stdin takes ``{"cmd": "feed", "rate": R}`` (R
records/s in all; 0: as fast as the windows allow), ``{"cmd": "stop"}``
(answered with ``drained`` once every record sent is acknowledged) and
``{"cmd": "report"}`` (the heartbeat samples and the records sent per
device); stdout says ``ready`` once every channel is open. Stamps are
``time.monotonic()``, one clock for every process of the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import socket
import ssl
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Final

import trio
from cryptography import x509

import auth
from bench.results import Goal, Mode, ScenarioResult, Table, fmt_ms, ratio
from bench.sessions import SetupTimings, one_session, run_fleet
from bench.world import (
    LOOPBACK,
    World,
    free_port,
    percentiles,
    sample_process,
    toml_text,
    world,
)
from relay import __version__
from relay._trio.agent import parse_broker_url
from relay._trio.websocket import WebSocketConnection, connect_websocket
from relay.config import AgentConfig, WebSocketLimits
from relay.pki_files import AgentDir
from relay.proto import control, feed
from relay.store import Store
from relay.tls import agent_context

#: Records a device may have sent and not had acknowledged (the agent's window).
WINDOW: Final = 16
#: The working point of docs/capacity.md: a node holds 2,500 instruments, and
#: their daily statistics (23:59 local time) should be stored within a minute.
NODE_INSTRUMENTS: Final = 2500
END_OF_DAY_S: Final = 60.0
END_OF_DAY_RATE: Final = NODE_INSTRUMENTS / END_OF_DAY_S
PROBE_INTERVAL_S: Final = 0.1
FEEDER_HEARTBEAT_S: Final = 1.0
#: One record in this many is an alarm; the rest are daily statistics.
ALARM_EVERY: Final = 4
BOOT_CONCURRENCY: Final = 16
USER_AGENT: Final = f"relay-bench-feed/{__version__}"
_IP_BIND_ADDRESS_NO_PORT: Final = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
FEEDER_TIMEOUT_S: Final = 300.0
REPO: Final = Path(__file__).resolve().parents[1]
#: Ack p99 goal: an alarm is in the store, and on the console, well within a
#: second; at 250 ms a device's window of 16 still drains at 64 records/s.
ACK_P99_GOAL_S: Final = 0.250
#: How long a device pauses its feed when the broker answers "retry, busy"
#: (the agent's default feed_retry_s; it waits a jittered half to all of it).
BUSY_PAUSE_S: Final = AgentConfig().feed_retry_s
#: Session set-up may be this much slower (p99) while the feed runs.
SETUP_TOLERANCE: Final = 0.20

FEED_GOAL = (
    "monitoring feed: end-of-day statistics of a node's 2,500 instruments",
    f"stored within {END_OF_DAY_S:.0f} s ({END_OF_DAY_RATE:.0f} records/s), none lost "
    f"or twice; ack p99 < {ACK_P99_GOAL_S * 1000:.0f} ms at that rate",
)
INTERFERENCE_GOAL = (
    "session set-up while the feed runs at the end-of-day rate",
    f"request -> offer and grant -> first byte p99 within {SETUP_TOLERANCE:.0%} "
    "of the quiet broker's",
)


# --- what an instrument reports -------------------------------------------------

#: The instrument's clock: local time of a lab in central Europe.
_OFFSET: Final = timezone(timedelta(hours=1))
_ALARMS: Final = (
    ("E101", "alarm", "Product water resistivity below limit (< 10.0 MΩ·cm)"),
    ("E102", "warning", "TOC above limit (> 10 ppb)"),
    ("W201", "warning", "Purification cartridge nearing end of life (< 10 % left)"),
    ("E301", "alarm", "UV lamp fault (185/254 nm): no intensity"),
    ("C401", "critical", "Leak detected under the system"),
    ("W501", "warning", "Storage tank level low (< 10 %)"),
    ("I601", "info", "Sanitization due within 7 days"),
)


def daily_stats(day: date, rng: random.Random) -> feed.DailyStats:
    """One day's statistics of a type I water system, as its software reports them."""
    m = feed.Measurement
    return feed.DailyStats(
        day=day,
        device_time=datetime(day.year, day.month, day.day, 23, 59, tzinfo=_OFFSET),
        values=(
            m("product_water_resistivity", round(rng.uniform(17.6, 18.2), 2), "MΩ·cm"),
            m("toc", round(rng.uniform(1.5, 6.0), 1), "ppb"),
            m("volume_dispensed", round(rng.uniform(8, 420), 1), "L"),
            m("dispense_count", float(rng.randrange(5, 250)), ""),
            m("operating_hours", round(rng.uniform(2, 16), 1), "h"),
            m("feed_water_conductivity", round(rng.uniform(4, 18), 1), "µS/cm"),
            m("temperature", round(rng.uniform(21.0, 25.5), 1), "°C"),
        ),
    )


def alarm(at: datetime, rng: random.Random) -> feed.Alarm:
    """An alarm raised (or cleared) at *at*."""
    code, severity, text = rng.choice(_ALARMS)
    return feed.Alarm(
        code=code,
        severity=severity,
        text=text,
        device_time=at.astimezone(_OFFSET).replace(microsecond=0),
        state=rng.choice(("raised", "cleared")),
    )


def record_id(device_index: int, seq: int) -> str:
    """The record's idempotency key: its device and its place in that device's feed."""
    return f"{device_index:08x}{seq:024x}"


def make_record(seq: int, rng: random.Random) -> tuple[str, str]:
    """Record number *seq* of a device: its kind and its JSON text."""
    if seq % ALARM_EVERY == ALARM_EVERY - 1:
        record: feed.Record = alarm(
            datetime(2026, 11, 27, 8, tzinfo=UTC) + timedelta(seconds=seq), rng
        )
    else:
        record = daily_stats(date(2026, 11, 26) - timedelta(days=seq), rng)
    body = json.dumps(feed.to_json(record), ensure_ascii=False)
    return feed.kind_of(record), body


# --- the feeder process ---------------------------------------------------------


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _source_address(index: int) -> str:
    """127.a.b.c per device, never 127.0.0.x (see bench.loadgen.source_address)."""
    c, b, a = index % 254 + 1, (index // 254) % 254 + 1, index // (254 * 254) + 1
    return f"127.{a}.{b}.{c}"


@dataclass
class _Phase:
    """One feeding phase, as the feeder counts it."""

    rate: float
    stopped: trio.Event = field(default_factory=trio.Event)
    running: int = 0
    sent: int = 0
    results: Counter[str] = field(default_factory=Counter)
    first_sent: float = math.nan
    last_ack: float = math.nan
    #: (monotonic stamp of the send, send → ack in seconds)
    acks: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class _Feeder:
    """The feeder's shared state: devices' channels and what they measured."""

    feeding: int
    phase: _Phase | None = None
    phase_started: trio.Event = field(default_factory=trio.Event)
    connected: int = 0
    unexpected: int = 0
    #: Records acknowledged as anything but ``stored``: (record id, result, reason).
    not_stored: list[tuple[str, str, str]] = field(default_factory=list)
    unacked: int = 0
    #: (monotonic stamp of the send, round trip) per heartbeat, by device role.
    heartbeats: dict[str, list[tuple[float, float]]] = field(
        default_factory=lambda: {"probe": [], "feeder": []}
    )
    sent_per_device: dict[str, int] = field(default_factory=dict)


@dataclass
class _Device:
    index: int
    device_id: str
    context: ssl.SSLContext
    feeds: bool
    unacked: dict[str, float] = field(default_factory=dict)
    window: trio.Semaphore = field(default_factory=lambda: trio.Semaphore(WINDOW))
    next_seq: int = 0
    #: Until when the broker said it is busy (trio time): the device sends no
    #: record before, as the agent pauses its feed on "retry, busy".
    paused_until: float = 0.0


async def _connect(
    device: _Device, host: str, port: int
) -> trio.SSLStream[trio.SocketStream]:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        await sock.bind((_source_address(device.index), 0))
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    tls = trio.SSLStream(
        trio.SocketStream(sock),
        device.context,
        server_hostname=host,
        https_compatible=True,
    )
    await tls.do_handshake()
    return tls


async def _next_event(
    ws: WebSocketConnection, channel: control.ControlChannel
) -> control.Event:
    while True:
        event = channel.next_event()
        if isinstance(event, control.Event):
            return event
        channel.receive_message(await ws.receive_message())


async def _heartbeats(
    ws: WebSocketConnection,
    channel: control.ControlChannel,
    sent_at: dict[int, float],
    interval_s: float,
    rng: random.Random,
) -> None:
    await trio.sleep(rng.uniform(0, interval_s))
    for seq in range(1, 2**53):
        sent_at[seq] = time.monotonic()
        await ws.send_message(channel.send(control.Heartbeat(seq=seq)))
        await trio.sleep(interval_s)


async def _feed(
    ws: WebSocketConnection,
    channel: control.ControlChannel,
    device: _Device,
    state: _Feeder,
    rng: random.Random,
) -> None:
    """Send records while a phase runs: paced, and never more than the window."""
    while True:
        await state.phase_started.wait()
        phase = state.phase
        assert phase is not None  # set with the event
        phase.running += 1
        try:
            interval = state.feeding / phase.rate if phase.rate > 0 else 0.0
            next_at = trio.current_time() + rng.uniform(0, interval)
            while not phase.stopped.is_set():
                if interval:
                    with trio.move_on_at(next_at):
                        await phase.stopped.wait()
                    next_at += interval
                    if phase.stopped.is_set():
                        break
                if device.paused_until > trio.current_time():
                    with trio.move_on_at(device.paused_until):
                        await phase.stopped.wait()
                    if phase.stopped.is_set():
                        break
                await device.window.acquire()
                if phase.stopped.is_set():
                    device.window.release()
                    break
                seq = device.next_seq
                device.next_seq += 1
                kind, body = make_record(seq, rng)
                rid = record_id(device.index, seq)
                now = time.monotonic()
                device.unacked[rid] = now
                state.unacked += 1
                phase.sent += 1
                if math.isnan(phase.first_sent):
                    phase.first_sent = now
                await ws.send_message(
                    channel.send(
                        control.FeedRecord(
                            record_id=rid,
                            kind=kind,
                            body=body,
                            request_id="",
                            queue_depth=len(device.unacked),
                        )
                    )
                )
        finally:
            phase.running -= 1
        # Wait for the next phase (a new event is set by the controller).
        while state.phase is phase:  # noqa: ASYNC110 - a handful of phases
            await trio.sleep(0.05)


async def _run_device(
    device: _Device,
    host: str,
    port: int,
    url: str,
    state: _Feeder,
    boot: trio.Semaphore,
) -> None:
    rng = random.Random(device.index)
    channel = control.ControlChannel(control.Role.DEVICE)
    async with boot:
        tls = await _connect(device, host, port)
    async with connect_websocket(
        tls, url, WebSocketLimits(), user_agent=USER_AGENT
    ) as ws:
        await ws.send_message(
            channel.send(
                control.Hello(
                    version=control.PROTOCOL_VERSION,
                    device_id=device.device_id,
                    agent_version=__version__,
                )
            )
        )
        welcome = await _next_event(ws, channel)
        if not isinstance(welcome, control.Welcome):
            raise RuntimeError(f"{device.device_id}: {welcome!r} instead of welcome")
        state.connected += 1
        sent_at: dict[int, float] = {}
        role = "feeder" if device.feeds else "probe"
        samples = state.heartbeats[role]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                _heartbeats,
                ws,
                channel,
                sent_at,
                FEEDER_HEARTBEAT_S if device.feeds else PROBE_INTERVAL_S,
                rng,
            )
            if device.feeds:
                nursery.start_soon(_feed, ws, channel, device, state, rng)
            while True:
                event = await _next_event(ws, channel)
                now = time.monotonic()
                if isinstance(event, control.HeartbeatAck):
                    started = sent_at.pop(event.seq, None)
                    if started is not None:
                        samples.append((started, now - started))
                elif isinstance(event, control.FeedAck):
                    started = device.unacked.pop(event.record_id, None)
                    phase = state.phase
                    if started is None or phase is None:
                        state.unexpected += 1
                        continue
                    state.unacked -= 1
                    device.window.release()
                    phase.results[event.result] += 1
                    if event.reason == "busy":
                        # The agent's pause (relay._trio.agent_feed): a
                        # jittered half to whole feed_retry_s.
                        device.paused_until = trio.current_time() + BUSY_PAUSE_S * (
                            0.5 + 0.5 * rng.random()
                        )
                    if event.result != "stored":
                        state.not_stored.append(
                            (event.record_id, event.result, event.reason)
                        )
                    phase.acks.append((started, now - started))
                    phase.last_ack = now
                else:
                    state.unexpected += 1


async def _commands(state: _Feeder, devices: Sequence[_Device]) -> None:
    stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
    buffer = b""
    while chunk := await stdin.receive_some(65536):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            command = json.loads(line)
            if command["cmd"] == "feed":
                state.phase = _Phase(rate=float(command["rate"]))
                state.phase_started.set()
                _emit("feeding", t=time.monotonic())
            elif command["cmd"] == "stop" and state.phase is not None:
                phase = state.phase
                phase.stopped.set()
                while phase.running or state.unacked:  # noqa: ASYNC110 - a drain
                    await trio.sleep(0.01)
                state.phase_started = trio.Event()
                state.phase = None
                _emit(
                    "drained",
                    t=time.monotonic(),
                    rate=phase.rate,
                    sent=phase.sent,
                    results=dict(phase.results),
                    first_sent=phase.first_sent,
                    last_ack=phase.last_ack,
                    acks=phase.acks,
                )
            elif command["cmd"] == "report":
                _emit(
                    "report",
                    t=time.monotonic(),
                    heartbeats=state.heartbeats,
                    unexpected=state.unexpected,
                    not_stored=state.not_stored,
                    sent_per_device={
                        d.device_id: d.next_seq for d in devices if d.feeds
                    },
                    index={d.device_id: d.index for d in devices if d.feeds},
                )


async def _feeder_main(
    devices: list[_Device], url: str, feeding: int, ready_timeout_s: float
) -> None:
    host, port, path_url = parse_broker_url(url)
    state = _Feeder(feeding=feeding)
    boot = trio.Semaphore(BOOT_CONCURRENCY)
    async with trio.open_nursery() as nursery:
        for device in devices:
            nursery.start_soon(_run_device, device, host, port, path_url, state, boot)
        with trio.fail_after(ready_timeout_s):
            while state.connected < len(devices):  # noqa: ASYNC110 - boot only
                await trio.sleep(0.05)
        _emit("ready", t=time.monotonic(), devices=len(devices))
        await _commands(state, devices)  # until the parent closes stdin
        nursery.cancel_scope.cancel()


def _load(
    paths: Sequence[Path], ca_file: Path, *, feeds: bool, first_index: int
) -> list[_Device]:
    devices = []
    for offset, path in enumerate(paths):
        files = AgentDir(path)
        certificate = x509.load_pem_x509_certificate(files.cert.read_bytes())
        devices.append(
            _Device(
                index=first_index + offset,
                device_id=auth.device_identity(certificate).device_id,
                context=agent_context(
                    ca_file=ca_file, cert_file=files.cert, key_file=files.key
                ),
                feeds=feeds,
            )
        )
    return devices


def _feeder_process_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.feed")
    parser.add_argument("--url", required=True)
    parser.add_argument("--ca-file", type=Path, required=True)
    parser.add_argument("--feed", type=Path, nargs="+", required=True)
    parser.add_argument("--probe", type=Path, nargs="*", default=[])
    args = parser.parse_args(argv)
    feeders = _load(args.feed, args.ca_file, feeds=True, first_index=0)
    probes = _load(args.probe, args.ca_file, feeds=False, first_index=len(feeders))
    trio.run(_feeder_main, feeders + probes, args.url, len(feeders), 180.0)


# --- the parent's handle --------------------------------------------------------


@dataclass
class _FeederHandle:
    process: trio.Process
    messages: list[dict[str, Any]] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    async def _send(self, command: dict[str, Any]) -> None:
        assert self.process.stdin is not None  # asked for
        await self.process.stdin.send_all(json.dumps(command).encode() + b"\n")

    async def wait_for(self, event: str, start: int = 0) -> dict[str, Any]:
        with trio.fail_after(FEEDER_TIMEOUT_S):
            while True:
                for message in self.messages[start:]:
                    if message["event"] == event:
                        return message
                if self.process.returncode is not None:
                    raise RuntimeError(f"the feeder exited ({self.process.returncode})")
                await self.changed.wait()

    async def request(self, command: dict[str, Any], answer: str) -> dict[str, Any]:
        start = len(self.messages)
        await self._send(command)
        return await self.wait_for(answer, start)


async def _read(handle: _FeederHandle) -> None:
    assert handle.process.stdout is not None  # asked for
    buffer = b""
    while chunk := await handle.process.stdout.receive_some(1 << 20):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            handle.messages.append(json.loads(line))
        handle.changed.set()
        handle.changed = trio.Event()
    await handle.process.wait()
    handle.changed.set()


@contextlib.asynccontextmanager
async def open_feeder(
    w: World, url: str, feed_dirs: Sequence[Path], probe_dirs: Sequence[Path]
) -> AsyncIterator[_FeederHandle]:
    """The feeder process, every channel open."""
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "bench.feed",
            "--url",
            url,
            "--ca-file",
            str(w.ca_file),
            "--feed",
            *map(str, feed_dirs),
            "--probe",
            *map(str, probe_dirs),
        ],
        stdin=-1,
        stdout=-1,  # subprocess.PIPE
        stderr=(w.root / "feeder.log").open("ab"),
        cwd=REPO,
    )
    handle = _FeederHandle(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read, handle)
            await handle.wait_for("ready")
            yield handle
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            process.terminate()
            with trio.move_on_after(10):
                await process.wait()
            process.kill()


# --- the scenario ---------------------------------------------------------------


@dataclass
class PhaseResult:
    """What one phase measured."""

    name: str
    rate: float | None  # records/s asked for; 0: the flood; None: no feed
    started: float
    ended: float
    broker_cpu_s: float
    #: The machine's 1-minute load average when the phase began and ended: the
    #: bench shares the machine, so other work there shows up in the figures.
    load_average: tuple[float, float] = (math.nan, math.nan)
    setup: dict[str, list[float]] = field(default_factory=dict)
    drained: dict[str, Any] | None = None
    probe_rtts: list[float] = field(default_factory=list)
    feeder_rtts: list[float] = field(default_factory=list)

    @property
    def stored_per_s(self) -> float:
        if self.drained is None or not self.drained["acks"]:
            return math.nan
        span = float(self.drained["last_ack"]) - float(self.drained["first_sent"])
        return int(self.drained["results"].get("stored", 0)) / span

    @property
    def ack_latencies(self) -> list[float]:
        return [] if self.drained is None else [lat for _, lat in self.drained["acks"]]

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rate": self.rate,
            "duration_s": self.ended - self.started,
            "broker_cpu_share": self.broker_cpu_s / (self.ended - self.started),
            "load_average": self.load_average,
            "setup_s": self.setup,
            "sent": None if self.drained is None else self.drained["sent"],
            "results": None if self.drained is None else self.drained["results"],
            "stored_per_s": None
            if math.isnan(self.stored_per_s)
            else self.stored_per_s,
            "ack_latency_s": sorted(self.ack_latencies),
            "probe_heartbeat_rtt_s": sorted(self.probe_rtts),
            "feeder_heartbeat_rtt_s": sorted(self.feeder_rtts),
        }


@dataclass(frozen=True)
class _Plan:
    devices: int
    probes: int
    sessions: int
    min_phase_s: float
    session_budget_s: float


def _plan(mode: Mode) -> _Plan:
    if mode == "full":
        return _Plan(
            devices=200, probes=4, sessions=200, min_phase_s=30.0, session_budget_s=90.0
        )
    return _Plan(devices=5, probes=2, sessions=5, min_phase_s=1.0, session_budget_s=3.0)


PHASES: Final[tuple[tuple[str, float | None], ...]] = (
    ("quiet", None),
    ("end-of-day", END_OF_DAY_RATE),
    ("flood", 0.0),
)


async def _run_phases(
    w: World,
    feeder: _FeederHandle,
    phases: Sequence[tuple[str, float | None]],
    plan: _Plan,
    session: Callable[[SetupTimings], Awaitable[None]] | None = None,
) -> tuple[list[PhaseResult], dict[str, Any]]:
    """Each phase: the feed (if any), the set-up sessions (if *session*), a drain.

    Returns the phases and the check of the store (records sent, acks, rows).
    """
    results = []
    for name, rate in phases:
        if rate is not None:
            await feeder.request({"cmd": "feed", "rate": rate}, "feeding")
        cpu_before = sample_process(w.broker.pid).cpu_s
        started = time.monotonic()
        timings = SetupTimings()
        load_before = os.getloadavg()[0]
        if session is not None:
            # At most plan.session_budget_s of sessions: under the flood one
            # set-up can take seconds (bench/analysis.md says why).
            for _ in range(plan.sessions):
                await session(timings)
                if time.monotonic() - started > plan.session_budget_s:
                    break
        await trio.sleep_until(
            trio.current_time()
            + max(0.0, plan.min_phase_s - (time.monotonic() - started))
        )
        ended = time.monotonic()
        cpu_s = sample_process(w.broker.pid).cpu_s - cpu_before
        drained = (
            await feeder.request({"cmd": "stop"}, "drained")
            if rate is not None
            else None
        )
        results.append(
            PhaseResult(
                name=name,
                rate=rate,
                started=started,
                ended=ended,
                broker_cpu_s=cpu_s,
                load_average=(load_before, os.getloadavg()[0]),
                setup={
                    "request_to_offer": timings.request_to_offer,
                    "grant_to_first_byte": timings.grant_to_first_byte,
                    "kill_to_closed": timings.kill_to_closed,
                },
                drained=drained,
            )
        )
    report = await feeder.request({"cmd": "report"}, "report")
    for result in results:
        for role, into in (
            ("probe", result.probe_rtts),
            ("feeder", result.feeder_rtts),
        ):
            into.extend(
                rtt
                for at, rtt in report["heartbeats"][role]
                if result.started <= at < result.ended
            )
    return results, _verify(w, report, results)


def _store_url(w: World) -> str:
    from relay.config_file import load_config

    return load_config(w.broker.config_file, {}).effective_database_url


def _verify(
    w: World, report: dict[str, Any], results: list[PhaseResult]
) -> dict[str, Any]:
    """Read the store back: it must hold exactly the records acknowledged ``stored``.

    A record acknowledged ``retry`` is one the agent would send again (the
    feeder does not), so it must not be in the store; one acknowledged
    ``stored`` must be there, once. Returns the counts and ``exact``.
    """
    sent = sum(int(n) for n in report["sent_per_device"].values())
    acked: Counter[str] = Counter()
    for result in results:
        if result.drained is not None:
            acked.update(result.drained["results"])
    not_stored = {rid for rid, _result, _reason in report["not_stored"]}
    held = missing = extra = twice = 0
    with contextlib.closing(Store.open(_store_url(w))) as store:
        for device_id, count in report["sent_per_device"].items():
            index = report["index"][device_id]
            rows = store.list_feed_records(
                device_id, kinds=list(feed.PUSHED_KINDS), limit=count + 1
            )
            found = [row.record_id for row in rows]
            expected = {record_id(index, seq) for seq in range(count)} - not_stored
            held += len(found)
            twice += len(found) - len(set(found))
            missing += len(expected - set(found))
            extra += len(set(found) - expected)
    return {
        "sent": sent,
        "acks": dict(acked),
        "not_stored_reasons": dict(
            Counter(f"{result}/{reason}" for _, result, reason in report["not_stored"])
        ),
        "rows_in_store": held,
        "missing": missing,
        "unexpected_rows": extra,
        "stored_twice": twice,
        "unexpected_messages": report["unexpected"],
        "devices": len(report["sent_per_device"]),
        "exact": sum(acked.values()) == sent
        and acked["stored"] == held
        and missing == extra == twice == report["unexpected"] == 0,
    }


def _pg_world(w: World, database_url: str) -> None:
    """The world's broker on PostgreSQL, one node (no Redis: nothing is shared)."""
    w.broker.config_file.write_text(
        toml_text(
            {
                "data_dir": str(w.data_dir),
                "device_listen": f"{LOOPBACK}:{w.broker.device_port}",
                "engineer_listen": f"{LOOPBACK}:{w.broker.engineer_port}",
                "metrics_listen": f"{LOOPBACK}:{w.broker.metrics_port}",
                "database_url": database_url,
            }
        )
    )


def run_feed(mode: Mode) -> ScenarioResult:
    """Ingest on SQLite with the sessions' set-up beside it; then on PostgreSQL."""
    plan = _plan(mode)
    raw: dict[str, Any] = {
        "devices": plan.devices,
        "probes": plan.probes,
        "window": WINDOW,
    }
    with world() as w:
        banner = free_port()
        w.write_config(sessions={"allowed_channels": [f"tcp:{banner}"]})
        setup_dirs = [d.root for d in w.enroll_devices("bench-dev", 1)]
        feed_dirs = [d.root for d in w.enroll_devices("feed-dev", plan.devices)]
        probe_dirs = [d.root for d in w.enroll_devices("probe-dev", plan.probes)]
        engineer = w.add_engineer()
        w.broker.start()
        credentials = w.login(engineer)

        async def main() -> tuple[list[PhaseResult], dict[str, Any]]:
            async with (
                run_fleet(w, setup_dirs, banner) as fleet,
                open_feeder(w, w.broker.device_url, feed_dirs, probe_dirs) as feeder,
            ):

                async def session(timings: SetupTimings) -> None:
                    await one_session(credentials, fleet, setup_dirs[0].name, timings)

                return await _run_phases(w, feeder, PHASES, plan, session)

        sqlite_phases, raw["sqlite_check"] = trio.run(main)
    raw["sqlite"] = [p.as_json() for p in sqlite_phases]
    pg_phases: list[PhaseResult] = []
    if mode == "full":
        pg_phases, raw["postgresql_check"] = _run_postgres(plan)
        raw["postgresql"] = [p.as_json() for p in pg_phases]
    return _result(mode, plan, sqlite_phases, pg_phases, raw)


def _run_postgres(plan: _Plan) -> tuple[list[PhaseResult], dict[str, Any]]:
    from tests.pg_cluster import postgres_cluster

    base = Path(tempfile.mkdtemp(prefix="relay-bench-pg-"))
    try:
        with postgres_cluster(base) as pg, world() as w:
            _pg_world(w, pg.new_database())
            feed_dirs = [d.root for d in w.enroll_devices("feed-dev", plan.devices)]
            probe_dirs = [d.root for d in w.enroll_devices("probe-dev", plan.probes)]
            w.broker.start()

            async def main() -> tuple[list[PhaseResult], dict[str, Any]]:
                async with open_feeder(
                    w, w.broker.device_url, feed_dirs, probe_dirs
                ) as feeder:
                    return await _run_phases(w, feeder, PHASES[1:], plan)

            return trio.run(main)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _check_text(check: dict[str, Any]) -> str:
    """What reading the store back found, in words."""
    if check["exact"] and check["rows_in_store"] == check["sent"]:
        return f"all {check['sent']:,} stored once"
    if check["exact"]:
        # Answered "retry" (not stored, so not lost: the agent sends them again).
        return (
            f"every record acked stored is there once; "
            f"{check['sent'] - check['rows_in_store']:,} of {check['sent']:,} "
            f"answered retry ({check['not_stored_reasons']})"
        )
    return (
        f"{check['rows_in_store']:,} rows for {check['sent']:,} records sent "
        f"(acks {check['acks']}, {check['missing']} missing, "
        f"{check['stored_twice']} twice, {check['unexpected_rows']} unexpected)"
    )


def _p(samples: Sequence[float]) -> dict[str, float]:
    return percentiles(samples)


def _result(
    mode: Mode,
    plan: _Plan,
    sqlite: list[PhaseResult],
    postgres: list[PhaseResult],
    raw: dict[str, Any],
) -> ScenarioResult:
    by_name = {p.name: p for p in sqlite}
    quiet, paced, flood = by_name["quiet"], by_name["end-of-day"], by_name["flood"]

    ingest_rows = []
    for engine, phases in (("SQLite", sqlite), ("PostgreSQL", postgres)):
        for phase in phases:
            if phase.drained is None:
                continue
            acks = _p(phase.ack_latencies)
            asked = (
                "as fast as the windows allow"
                if phase.rate == 0
                else f"{phase.rate:.1f}/s"
            )
            ingest_rows.append(
                (
                    engine,
                    phase.name,
                    asked,
                    str(phase.drained["sent"]),
                    f"{phase.stored_per_s:.0f}/s",
                    *(fmt_ms(acks[k]) for k in ("p50", "p99", "max")),
                    f"{phase.broker_cpu_s / (phase.ended - phase.started):.0%}",
                )
            )
    interference_rows = []
    for phase in sqlite:
        offer = _p(phase.setup["request_to_offer"])
        first = _p(phase.setup["grant_to_first_byte"])
        probe = _p(phase.probe_rtts)
        feeder_hb = _p(phase.feeder_rtts)
        interference_rows.append(
            (
                phase.name,
                str(len(phase.setup["request_to_offer"])),
                fmt_ms(offer["p50"]),
                fmt_ms(offer["p99"]),
                fmt_ms(first["p50"]),
                fmt_ms(first["p99"]),
                f"{fmt_ms(probe['p50'])} / {fmt_ms(probe['p99'])}",
                "—"
                if not phase.feeder_rtts
                else f"{fmt_ms(feeder_hb['p50'])} / {fmt_ms(feeder_hb['p99'])}",
                f"{phase.broker_cpu_s / (phase.ended - phase.started):.0%}",
                f"{phase.load_average[0]:.1f} → {phase.load_average[1]:.1f}",
            )
        )

    full = mode == "full"
    paced_acks = _p(paced.ack_latencies)
    capacity = flood.stored_per_s
    end_of_day_s = NODE_INSTRUMENTS / capacity if capacity > 0 else math.inf
    feed_met = (
        full
        and capacity >= END_OF_DAY_RATE
        and paced_acks["p99"] < ACK_P99_GOAL_S
        and raw["sqlite_check"]["exact"]
        # Not stored is not lost when the broker said retry: the agent keeps
        # the record and sends it again (busy: the node's record rate).
        and all(
            reason.startswith("retry/")
            for reason in raw["sqlite_check"]["not_stored_reasons"]
        )
    )

    def p99(phase: PhaseResult, step: str) -> float:
        return _p(phase.setup[step])["p99"]

    worst = max(
        ratio(p99(paced, s), p99(quiet, s)) or math.inf
        for s in ("request_to_offer", "grant_to_first_byte")
    )
    interference_met = full and worst <= 1 + SETUP_TOLERANCE
    pg_note = (
        "PostgreSQL: the end-of-day and flood phases again on a broker storing "
        "in a throw-away PostgreSQL server (tests/pg_cluster.py: fsync off), "
        "without the sessions."
        if postgres
        else "PostgreSQL runs in full mode only."
    )
    return ScenarioResult(
        name="feed",
        title="Monitoring feed: records stored, and the sessions beside them",
        tables=[
            Table(
                f"Records stored: {plan.devices} devices, each its own control "
                f"channel, at most {WINDOW} records unacknowledged per device; "
                "1 in 4 an alarm, the rest daily statistics; every record found "
                "in the store exactly once afterwards",
                (
                    "store",
                    "phase",
                    "records asked",
                    "records",
                    "stored",
                    "ack p50",
                    "ack p99",
                    "ack max",
                    "broker CPU",
                ),
                tuple(ingest_rows),
            ),
            Table(
                f"Beside the feed (SQLite): up to {plan.sessions} session set-ups "
                f"per phase (no more after {plan.session_budget_s:.0f} s) on one "
                f"device, one after another; heartbeats of {plan.probes} devices that "
                f"feed nothing, every {PROBE_INTERVAL_S * 1000:.0f} ms, and of the "
                f"feeding devices, every {FEEDER_HEARTBEAT_S:.0f} s",
                (
                    "phase",
                    "sessions",
                    "request → offer p50",
                    "p99",
                    "grant → first byte p50",
                    "p99",
                    "heartbeat RTT, quiet device p50 / p99",
                    "heartbeat RTT, feeding device p50 / p99",
                    "broker CPU",
                    "machine load",
                ),
                tuple(interference_rows),
            ),
        ],
        goals=[
            Goal(
                figure=FEED_GOAL[0],
                goal=FEED_GOAL[1],
                measured=(
                    f"{capacity:.0f} records/s (2,500 in {end_of_day_s:.1f} s), "
                    f"{_check_text(raw['sqlite_check'])}; "
                    f"ack p99 {fmt_ms(paced_acks['p99'])}"
                ),
                baseline=f"{END_OF_DAY_RATE:.0f} records/s needed",
                ratio=ratio(capacity, END_OF_DAY_RATE),
                met=feed_met,
            ),
            Goal(
                figure=INTERFERENCE_GOAL[0],
                goal=INTERFERENCE_GOAL[1],
                measured=(
                    f"p99 {fmt_ms(p99(paced, 'request_to_offer'))}; "
                    f"p99 {fmt_ms(p99(paced, 'grant_to_first_byte'))}"
                ),
                baseline=(
                    f"quiet: p99 {fmt_ms(p99(quiet, 'request_to_offer'))}; "
                    f"p99 {fmt_ms(p99(quiet, 'grant_to_first_byte'))}"
                ),
                ratio=None if math.isinf(worst) else worst,
                met=interference_met,
            ),
        ],
        notes=[
            "Phases one after another on one broker: quiet (no records), "
            f"end-of-day ({END_OF_DAY_RATE:.1f} records/s in all: a node's "
            f"{NODE_INSTRUMENTS:,} instruments' daily statistics over "
            f"{END_OF_DAY_S:.0f} s, docs/capacity.md), flood (every device as fast "
            "as its window allows, as after an outage). 'stored' is the records "
            "acknowledged as stored over the time from the first send to the last "
            "ack; in the flood the ack latency is mostly the wait behind the "
            "device's own window. The interference ratio is the worse of the two "
            "set-up p99s at the end-of-day rate over the quiet broker's.",
            pg_note,
        ],
        raw=raw,
    )


__all__ = ["open_feeder", "run_feed"]


if __name__ == "__main__":
    _feeder_process_main(sys.argv[1:])
