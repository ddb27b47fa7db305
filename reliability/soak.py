"""Soak: many remote sessions opening and closing under load, then nothing left over.

Theory of operation
===================
Three processes, as in the field (the same layout as :mod:`bench.sessions`):
the broker is a real ``relay serve`` (:class:`bench.world.BrokerProcess`), the
instruments are real agents in one process (:mod:`reliability.soak_fleet`,
granting every offer at once), and the engineers are this process, running the
product's engineer client (:func:`relay._trio.engineer_session.run_session`).

*Load.* Several engineers, each logged in over HTTPS with a TOTP code, run a few
session workers at once. A worker takes an idle device, requests a session on
it with two channels and, once active:

* transfers a random number of random bytes (random chunk sizes) to the
  instrument's ``hash-echo`` service; the device echoes them and sends the
  SHA-256 of what it got, so the digest is compared at both ends (sent =
  received by the device = echoed back);
* types a few keystrokes into the shell channel (``cat`` on a raw PTY), each
  one waited for, with a person's pause between them;
* ends the session one of four ways: the engineer ends it (``DELETE``), the
  person at the instrument presses End, the cap ends it (a tenth of the devices
  have their own cap of a few seconds), or the device drops off the network
  (its agent is cut without a WebSocket close; it boots again half a second
  later).

*Measure.* The broker's open file descriptors (``/proc/PID/fd``), its resident
memory (``/proc/PID/statm``) and its live trio tasks (the ``relay_trio_tasks``
gauge of ``/metrics``) are read at the *baseline*, once every device is
connected and before any session, and again once the load has stopped and the
broker has settled: every device connected again, no session held, the
broker's memory upkeep run once since the load (and, for up to
:data:`SETTLE_TIMEOUT_S`) fds and tasks back within tolerance. Resident
memory is also read after a *warm-up*: a few sessions of each kind, then the
full load for a quarter of the load time (20 s to 5 min): the first sessions
load code, and the first minutes fill what is bounded (the allocator's free
lists, the summaries of the last ended sessions the broker keeps), once; that
is not growth over time, which is what the limit is about. Each
reading waits for the broker's next memory upkeep (``memory_upkeep_s``: the
garbage of closed connections collected, the heap trimmed), so that the three
are taken at the same point of its cycle.
The broker runs on jemalloc, as deployed (:data:`bench.world.BROKER_PRELOAD`);
the result says which malloc it ran on.

*Account.* After the broker stops, its audit log is read: every session
requested has exactly one ``session.end``, its reason is the one the worker
planned, and ``relay audit verify`` accepts the chain.

Modes
=====
* ``python -m reliability.soak --minutes 60``: the documented hour (500
  devices, 8 engineers with 3 workers each); prints a summary, ``--json FILE``
  writes every figure, the exit status is 1 if a check failed.
  ``--minutes``, ``--devices``, ``--engineers``, ``--workers`` and ``--seed``
  size other runs; ``--keep DIR`` keeps the data dir and logs.
* ``tests/reliability/test_soak.py``: the same harness, 50 devices for
  ``scorecard.scaled(60, 300)`` seconds of load (the default suite, then the
  5-minute scorecard run with ``RELAY_RELIABILITY_SCALE=full`` and 500 devices).

Limits: resident memory must grow by less than :data:`RSS_GROWTH_LIMIT_PCT`
over the run (the reference's target); fds and tasks must come back to the
baseline within :data:`DRIFT_TOLERANCE`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import random
import re
import subprocess
import sys
import time
import traceback
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Final, Literal

import trio

from bench.world import World, free_port, sample_process, world
from relay._trio.engineer_session import SessionStatus, run_session
from relay._trio.tunnel_mux import MuxStream, TunnelMux
from relay.audit_reader import read_records
from relay.engineer_client import ApiError, Credentials
from reliability.soak_fleet import DIGEST_BYTES, HEADER_BYTES

Ending = Literal["engineer", "onsite", "time_cap", "device_disconnect"]

#: How each session is ended, and how often (weights).
ENDINGS: Final[dict[Ending, int]] = {
    "engineer": 35,
    "onsite": 25,
    "time_cap": 20,
    "device_disconnect": 20,
}
#: Resources must come back to the baseline within this (fds, tasks).
DRIFT_TOLERANCE: Final = 2
#: Target of the reference (section 5.6 iii): RSS growth over the soak.
RSS_GROWTH_LIMIT_PCT: Final = 5.0
#: The short mode's limit: a minute of load is too short for the allocator's
#: free lists to settle, and 5 % of a broker at rest is ~4 MiB.
CI_RSS_GROWTH_LIMIT_PCT: Final = 10.0
#: The warm-up under full load: a quarter of the load, within these bounds.
WARM_UP_MIN_S: Final = 20.0
WARM_UP_MAX_S: Final = 300.0
#: After the load: at least this long, then until the resources are back.
SETTLE_MIN_S: Final = 3.0
#: The broker's memory upkeep runs every ``memory_upkeep_s`` (30 s by default);
#: each resource reading waits for one (see :func:`_at_rest_resources`).
UPKEEP_WAIT_S: Final = 45.0
SETTLE_TIMEOUT_S: Final = UPKEEP_WAIT_S
#: A session not ended this long after its work is done is a failure.
END_WAIT_S: Final = 30.0
#: The shell's ``stty raw -echo`` runs before the first key.
SHELL_SETTLE_S: Final = 0.3
KEY_TIMEOUT_S: Final = 10.0
#: How often the broker's RSS is read during the load (for the timeline).
SAMPLE_EVERY_S: Final = 10.0
PAUSE_S: Final = (0.02, 0.12)
#: Largest transfer of a session ended by a short cap (it must finish first).
CAP_TRANSFER_MAX: Final = 64 * 1024
MIN_TRANSFER: Final = 1024
MAX_CHUNK_LOG2: Final = 16  # chunks of 1 B .. 64 KiB, log-uniform


@dataclass(frozen=True, slots=True)
class SoakConfig:
    """How big a soak is."""

    load_s: float
    devices: int = 50
    engineers: int = 4
    workers_per_engineer: int = 2
    max_transfer: int = 1024 * 1024
    keys_per_session: int = 5
    short_cap_s: int = 10
    seed: int = 1

    @property
    def short_cap_devices(self) -> int:
        return max(2, self.devices // 10)

    @property
    def warm_up_s(self) -> float:
        """The full load's first part, before the warmed reading (see the module docstring)."""
        return min(max(self.load_s / 4, WARM_UP_MIN_S), WARM_UP_MAX_S)


@dataclass(frozen=True, slots=True)
class Resources:
    """The broker at one moment."""

    fds: int
    sockets: int
    #: Descriptors of the store's pooled SQLite connections (database, WAL,
    #: shared memory): not counted as drift. The pools (SQLAlchemy's QueuePool
    #: keeps up to 5 connections per engine) grow when worker threads ask at
    #: once, which is not a leak; the count is reported.
    store_fds: int
    #: Pooled connections (descriptors on the database file itself).
    store_connections: int
    tasks: int
    rss_bytes: int

    @property
    def counted_fds(self) -> int:
        """The descriptors whose drift counts: all but the store pool's."""
        return self.fds - self.store_fds


@dataclass
class SessionRun:
    """One session as the engineer saw it."""

    device_id: str
    planned: Ending
    session_id: str | None = None
    end_reason: str | None = None
    transfer_bytes: int = 0
    digests_match: bool | None = None
    keys_echoed: int = 0
    error: str | None = None


@dataclass
class AuditAccount:
    """What the audit log says about the sessions."""

    sessions_started: int = 0
    sessions_with_one_end: int = 0
    ends_by_reason: dict[str, int] = field(default_factory=dict)
    reason_mismatches: list[str] = field(default_factory=list)
    unknown_sessions: list[str] = field(default_factory=list)
    chain: str = "not checked"


@dataclass
class SoakResult:
    """Every figure of one soak (see :meth:`problems` for the verdict)."""

    config: SoakConfig
    seconds_of_load: float = 0.0
    baseline: Resources | None = None
    warmed: Resources | None = None
    after: Resources | None = None
    settled_in_s: float = math.nan
    sessions_open_after: int = -1
    devices_connected_after: int = -1
    runs: list[SessionRun] = field(default_factory=list)
    audit: AuditAccount = field(default_factory=AuditAccount)
    fleet_problems: list[str] = field(default_factory=list)
    #: (seconds into the load, RSS bytes), every :data:`SAMPLE_EVERY_S`.
    rss_timeline: list[tuple[float, int]] = field(default_factory=list)
    #: The broker's malloc ("jemalloc" as deployed, or "glibc"; bench.world).
    allocator: str = "not measured"

    @property
    def transfers(self) -> int:
        return sum(1 for r in self.runs if r.digests_match is not None)

    @property
    def bytes_transferred(self) -> int:
        return sum(r.transfer_bytes for r in self.runs)

    @property
    def sha_mismatches(self) -> int:
        return sum(1 for r in self.runs if r.digests_match is False)

    @property
    def keys_echoed(self) -> int:
        return sum(r.keys_echoed for r in self.runs)

    @property
    def errors(self) -> list[str]:
        return [f"{r.device_id} ({r.planned}): {r.error}" for r in self.runs if r.error]

    def drift(self, name: Literal["counted_fds", "sockets", "tasks"]) -> int:
        """*name* at the end minus at the baseline."""
        if self.baseline is None or self.after is None:
            raise RuntimeError("the broker was not measured")
        return int(getattr(self.after, name) - getattr(self.baseline, name))

    def rss_growth_pct(self, since: Literal["baseline", "warmed"] = "warmed") -> float:
        """Resident memory growth from *since* to the end, in per cent."""
        start = self.warmed if since == "warmed" else self.baseline
        if start is None or self.after is None:
            raise RuntimeError("the broker was not measured")
        return 100.0 * (self.after.rss_bytes - start.rss_bytes) / start.rss_bytes

    def problems(self, rss_limit_pct: float = RSS_GROWTH_LIMIT_PCT) -> list[str]:
        """Every check that failed, in words; empty when the soak passed."""
        out = list(self.errors) + list(self.fleet_problems)
        if self.baseline is None or self.after is None:
            return [*out, "the broker was not measured"]
        for name in ("counted_fds", "tasks"):
            drift = self.drift(name)
            if abs(drift) > DRIFT_TOLERANCE:
                out.append(f"{name}: {drift:+d} over the baseline")
        if self.rss_growth_pct() >= rss_limit_pct:
            out.append(
                f"RSS grew {self.rss_growth_pct():.1f} % (limit {rss_limit_pct} %)"
            )
        if self.sha_mismatches:
            out.append(f"{self.sha_mismatches} transfers with a SHA-256 mismatch")
        if self.sessions_open_after != 0:
            out.append(f"{self.sessions_open_after} sessions still held")
        if self.devices_connected_after != self.config.devices:
            out.append(
                f"{self.devices_connected_after} of {self.config.devices} devices back"
            )
        a = self.audit
        if a.sessions_started != len(self.runs):
            out.append(
                f"{a.sessions_started} sessions in the audit log, {len(self.runs)} run"
            )
        if a.sessions_with_one_end != a.sessions_started:
            out.append(
                f"{a.sessions_started - a.sessions_with_one_end} sessions without "
                "exactly one start and one end"
            )
        out.extend(a.reason_mismatches)
        out.extend(f"not run by the soak: {s}" for s in a.unknown_sessions)
        if a.chain != "verified":
            out.append(f"audit chain: {a.chain}")
        return out

    def summary(self) -> str:
        b, w, a = self.baseline, self.warmed, self.after
        lines = [
            f"soak: {self.config.devices} devices, {self.config.engineers} engineers x "
            f"{self.config.workers_per_engineer} workers, "
            f"{self.seconds_of_load / 60:.1f} min of load",
            f"sessions {len(self.runs)} (audit ends: {self.audit.ends_by_reason}), "
            f"transfers {self.transfers} ({self.bytes_transferred / 2**20:.1f} MiB), "
            f"SHA-256 mismatches {self.sha_mismatches}, keys echoed {self.keys_echoed}",
        ]
        if b and w and a:
            lines += [
                f"fds {b.fds} -> {a.fds} (sockets {b.sockets} -> {a.sockets}, "
                f"store pool {b.store_connections} -> {a.store_connections} "
                "connections), "
                f"tasks {b.tasks} -> {a.tasks}, settled in {self.settled_in_s:.1f} s",
                f"RSS {b.rss_bytes / 2**20:.1f} MiB at baseline, "
                f"{w.rss_bytes / 2**20:.1f} after warm-up, "
                f"{a.rss_bytes / 2**20:.1f} at the end "
                f"({self.rss_growth_pct():+.2f} % since warm-up, "
                f"{self.rss_growth_pct('baseline'):+.2f} % since baseline; "
                f"malloc: {self.allocator})",
            ]
        lines.append(f"audit chain: {self.audit.chain}")
        problems = self.problems()
        lines.append(
            "PASSED" if not problems else "FAILED:\n  " + "\n  ".join(problems)
        )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "seconds_of_load": round(self.seconds_of_load, 1),
            "baseline": asdict(self.baseline) if self.baseline else None,
            "warmed": asdict(self.warmed) if self.warmed else None,
            "after": asdict(self.after) if self.after else None,
            "settled_in_s": round(self.settled_in_s, 2),
            "sessions": len(self.runs),
            "transfers": self.transfers,
            "bytes": self.bytes_transferred,
            "sha_mismatches": self.sha_mismatches,
            "keys_echoed": self.keys_echoed,
            "audit": asdict(self.audit),
            "problems": self.problems(),
            "allocator": self.allocator,
            "rss_timeline": self.rss_timeline,
            "runs": [asdict(r) for r in self.runs],
        }


# --- the broker, from outside ---------------------------------------------------------


def _metrics(w: World) -> str:
    url = w.broker.metrics_url + "/metrics"  # http://127.0.0.1:PORT, ours
    with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 - see above
        text: str = r.read().decode()
    return text


def _metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(
        rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE
    )
    if match is None:
        raise RuntimeError(f"{name}{labels} is not in the broker's metrics")
    return float(match.group(1))


def _sessions_held(text: str) -> int:
    return sum(
        int(_metric(text, "relay_sessions", f'{{state="{state}"}}'))
        for state in ("requested", "offered", "granted", "active")
    )


def _upkeeps(text: str) -> int:
    """How many memory upkeeps the broker has run (``memory_upkeep_s``)."""
    return int(_metric(text, "relay_memory_upkeep_seconds_count"))


async def _at_rest_resources(w: World) -> Resources:
    """The broker's resources once its next memory upkeep has run.

    Resident memory is read at rest: right after the broker has collected the
    garbage of closed connections and trimmed its heap, as it does every
    ``memory_upkeep_s`` whatever the soak does. A reading taken just before an
    upkeep would count up to one interval of garbage, in either direction.
    """
    text = await trio.to_thread.run_sync(_metrics, w)
    before = _upkeeps(text)
    with trio.fail_after(UPKEEP_WAIT_S):
        while _upkeeps(text) == before:
            await trio.sleep(0.5)
            text = await trio.to_thread.run_sync(_metrics, w)
    return await trio.to_thread.run_sync(_resources, w, text)


def _resources(w: World, text: str | None = None) -> Resources:
    pid = w.broker.pid
    database = str((w.data_dir / "relay.sqlite3").resolve())
    fds = sockets = store_fds = store_connections = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:  # closed between listing and reading
            continue
        fds += 1
        sockets += target.startswith("socket:")
        store_fds += target.startswith(database)
        store_connections += target == database
    text = text if text is not None else _metrics(w)
    return Resources(
        fds=fds,
        sockets=sockets,
        store_fds=store_fds,
        store_connections=store_connections,
        tasks=int(_metric(text, "relay_trio_tasks")),
        rss_bytes=sample_process(pid).rss_bytes,
    )


# --- the instruments --------------------------------------------------------------------


@dataclass
class Fleet:
    """The :mod:`reliability.soak_fleet` process and what it reported."""

    process: trio.Process
    up: dict[str, trio.Event] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    #: Workers send commands at the same time; one line at a time goes out.
    sending: trio.Lock = field(default_factory=trio.Lock)

    async def send(self, **command: str) -> None:
        if self.process.stdin is None:
            raise RuntimeError("the fleet's stdin is not a pipe")
        async with self.sending:
            await self.process.stdin.send_all(json.dumps(command).encode() + b"\n")


async def _read_fleet(fleet: Fleet, ready: trio.Event) -> None:
    if fleet.process.stdout is None:
        raise RuntimeError("the fleet's stdout is not a pipe")
    buffer = b""
    while chunk := await fleet.process.stdout.receive_some(65536):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            message = json.loads(line)
            event = message["event"]
            if event == "ready":
                ready.set()
            elif event == "up":
                fleet.up.setdefault(message["device_id"], trio.Event()).set()
            elif event == "end_unknown":
                fleet.problems.append(f"End pressed with no session: {message}")


# --- one session ------------------------------------------------------------------------


@dataclass
class _Pool:
    """The idle devices: the short-cap ones apart from the others."""

    capped: set[str]
    others: set[str]
    changed: trio.Event = field(default_factory=trio.Event)

    async def take(self, capped: bool, rng: random.Random) -> str:
        pool = self.capped if capped else self.others
        while not pool:
            await self.changed.wait()
        device_id = rng.choice(sorted(pool))
        pool.remove(device_id)
        return device_id

    def give_back(self, device_id: str, capped: bool) -> None:
        (self.capped if capped else self.others).add(device_id)
        self.changed.set()
        self.changed = trio.Event()


async def _transfer(
    stream: MuxStream, size: int, rng: random.Random, run: SessionRun
) -> None:
    """*size* random bytes in random chunks; the digest compared at both ends."""
    data = rng.randbytes(size)
    chunks: list[int] = []
    left = size
    while left:
        chunks.append(min(left, int(2 ** rng.uniform(0, MAX_CHUNK_LOG2))))
        left -= chunks[-1]
    received = bytearray()

    async def send() -> None:
        await stream.send_all(size.to_bytes(HEADER_BYTES, "big"))
        offset = 0
        for length in chunks:
            await stream.send_all(data[offset : offset + length])
            offset += length

    async def receive() -> None:
        while len(received) < size + DIGEST_BYTES:
            chunk = await stream.receive_some()
            if not chunk:
                raise RuntimeError(
                    f"stream closed after {len(received)} of {size} bytes"
                )
            received.extend(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        nursery.start_soon(receive)
    sent = hashlib.sha256(data).digest()
    echoed = hashlib.sha256(received[:size]).digest()
    device = bytes(received[size:])
    run.transfer_bytes = size
    run.digests_match = sent == echoed == device and len(received) == size + 32


async def _type(
    stream: MuxStream, keys: int, rng: random.Random, run: SessionRun
) -> None:
    """Keystrokes into the shell, each one's echo waited for."""
    await trio.sleep(SHELL_SETTLE_S)
    with trio.move_on_after(0.05):
        while True:
            await stream.receive_some()  # anything said before raw mode
    for _ in range(keys):
        await stream.send_all(b"k")
        with trio.fail_after(KEY_TIMEOUT_S):  # a lost keystroke fails, not hangs
            if not await stream.receive_some():
                raise RuntimeError("the shell closed while typing")
        run.keys_echoed += 1
        await trio.sleep(rng.uniform(*PAUSE_S))


def _work(
    run: SessionRun,
    fleet: Fleet,
    hash_port: int,
    size: int,
    keys: int,
    rng: random.Random,
) -> Callable[[TunnelMux, SessionStatus], Any]:
    async def work(mux: TunnelMux, status: SessionStatus) -> None:
        stream = await mux.open_stream(f"tcp:{hash_port}")
        await _transfer(stream, size, rng, run)
        await stream.aclose()
        if keys:
            shell = await mux.open_stream("shell", cols=80, rows=24)
            await _type(shell, keys, rng, run)
            await shell.aclose()
        if run.planned == "engineer":
            return  # run_session ends it (DELETE)
        if run.planned == "onsite":
            await fleet.send(end=run.device_id)
        elif run.planned == "device_disconnect":
            fleet.up[run.device_id] = trio.Event()
            await fleet.send(drop=run.device_id)
        with trio.fail_after(END_WAIT_S):
            await trio.sleep_forever()  # cancelled by run_session at the end

    return work


async def _one_session(
    credentials: Credentials,
    fleet: Fleet,
    device_id: str,
    planned: Ending,
    hash_port: int,
    config: SoakConfig,
    rng: random.Random,
) -> SessionRun:
    run = SessionRun(device_id=device_id, planned=planned)
    top = CAP_TRANSFER_MAX if planned == "time_cap" else config.max_transfer
    size = int(2 ** rng.uniform(math.log2(MIN_TRANSFER), math.log2(top)))
    keys = 0 if planned == "time_cap" else config.keys_per_session
    out = io.StringIO()
    try:
        while True:
            try:
                outcome = await run_session(
                    credentials,
                    device_id=device_id,
                    reason="soak",
                    channels=["shell", f"tcp:{hash_port}"],
                    work=_work(run, fleet, hash_port, size, keys, rng),
                    out=out,
                )
                break
            except ApiError as exc:
                # Busy: the broker settles the last session's end after the
                # engineer has been told.
                if exc.status != 409:
                    raise
                await trio.sleep(0.02)
        run.session_id = outcome.session_id
        run.end_reason = outcome.end_reason
        if outcome.end_reason != planned:
            run.error = f"ended by {outcome.end_reason!r}"
        elif run.digests_match is None:
            run.error = "ended before its transfer was done"
    except Exception as exc:  # counted and reported; the soak goes on
        run.error = _describe(exc)
    if planned == "device_disconnect" and device_id in fleet.up:
        with trio.move_on_after(END_WAIT_S):
            await fleet.up[device_id].wait()
    if run.session_id is None:
        match = re.search(r"session (\S+) requested", out.getvalue())
        run.session_id = match.group(1) if match else None
    return run


async def _worker(
    credentials: Credentials,
    fleet: Fleet,
    pool: _Pool,
    hash_port: int,
    config: SoakConfig,
    rng: random.Random,
    until: float,
    runs: list[SessionRun],
    plan: list[Ending] | None = None,
) -> None:
    """Sessions one after another until *until* (or through *plan*)."""
    endings: list[Ending] = list(ENDINGS)
    weights = list(ENDINGS.values())
    todo = list(plan) if plan is not None else None
    while trio.current_time() < until if todo is None else todo:
        planned = todo.pop(0) if todo is not None else rng.choices(endings, weights)[0]
        capped = planned == "time_cap"
        device_id = await pool.take(capped, rng)
        try:
            runs.append(
                await _one_session(
                    credentials, fleet, device_id, planned, hash_port, config, rng
                )
            )
        finally:
            pool.give_back(device_id, capped)


# --- the run ----------------------------------------------------------------------------


async def _sample_rss(
    w: World, started: float, until: float, timeline: list[tuple[float, int]]
) -> None:
    while (now := trio.current_time()) < until:
        timeline.append(
            (round(now - started, 1), sample_process(w.broker.pid).rss_bytes)
        )
        await trio.sleep(min(SAMPLE_EVERY_S, max(0.0, until - now)))


def _describe(exc: BaseException) -> str:
    """The leaf exceptions of *exc* (trio wraps them in groups), with where."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    at = f" at {Path(where[0].filename).name}:{where[0].lineno}" if where else ""
    return f"{type(exc).__name__}: {exc}{at}"


def _rng(seed: int) -> random.Random:
    """A worker's choices, reproducible from the seed (load shape, not secrets)."""
    return random.Random(seed)  # noqa: S311 - see above


async def _all_connected(w: World, devices: int) -> None:
    """Until the broker counts *devices* connected (its view, not the fleet's)."""
    while True:
        text = await trio.to_thread.run_sync(_metrics, w)
        if int(_metric(text, "relay_devices_connected")) == devices:
            return
        await trio.sleep(0.2)


async def _wait_settled(
    w: World, config: SoakConfig, baseline: Resources
) -> tuple[Resources, int, int, float]:
    """Wait until the broker is at rest (see the module docstring)."""
    started = time.monotonic()
    upkeeps = _upkeeps(await trio.to_thread.run_sync(_metrics, w))
    await trio.sleep(SETTLE_MIN_S)
    while True:
        text = await trio.to_thread.run_sync(_metrics, w)
        now = await trio.to_thread.run_sync(_resources, w, text)
        held = _sessions_held(text)
        connected = int(_metric(text, "relay_devices_connected"))
        at_rest = (
            _upkeeps(text) > upkeeps
            and held == 0
            and connected == config.devices
            and abs(now.counted_fds - baseline.counted_fds) <= DRIFT_TOLERANCE
            and abs(now.tasks - baseline.tasks) <= DRIFT_TOLERANCE
        )
        waited = time.monotonic() - started
        if at_rest or waited > SETTLE_TIMEOUT_S:
            return now, held, connected, waited
        await trio.sleep(0.5)


async def _soak(
    w: World,
    config: SoakConfig,
    agent_dirs: list[Path],
    credentials: list[Credentials],
    hash_port: int,
    result: SoakResult,
) -> None:
    with (w.root / "fleet.log").open("ab") as fleet_log:
        await _soak_with_fleet(
            w, config, agent_dirs, credentials, hash_port, result, fleet_log
        )


async def _soak_with_fleet(
    w: World,
    config: SoakConfig,
    agent_dirs: list[Path],
    credentials: list[Credentials],
    hash_port: int,
    result: SoakResult,
    fleet_log: BinaryIO,
) -> None:
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "reliability.soak_fleet",
            "--broker",
            w.broker.device_url,
            "--ca-file",
            str(w.ca_file),
            "--hash-port",
            str(hash_port),
            "--short-cap",
            str(config.short_cap_s),
            "--short-cap-count",
            str(config.short_cap_devices),
            *map(str, agent_dirs),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=fleet_log,
    )
    fleet = Fleet(process)
    ids = [p.name for p in agent_dirs]
    pool = _Pool(
        capped=set(ids[: config.short_cap_devices]),
        others=set(ids[config.short_cap_devices :]),
    )
    try:
        async with trio.open_nursery() as nursery:
            ready = trio.Event()
            nursery.start_soon(_read_fleet, fleet, ready)
            with trio.fail_after(240):
                await ready.wait()
                await _all_connected(w, config.devices)
            await trio.sleep(SETTLE_MIN_S)
            result.baseline = await _at_rest_resources(w)
            result.allocator = w.broker.allocator

            # Warm-up: one session of each ending, one after another.
            warm_up: list[SessionRun] = []
            await _worker(
                credentials[0],
                fleet,
                pool,
                hash_port,
                config,
                _rng(config.seed),
                math.inf,
                warm_up,
                plan=list(ENDINGS),
            )
            result.runs.extend(warm_up)
            # ...then the full load for a while: what fills once (caches, the
            # allocator's free lists, the kept summaries of ended sessions up
            # to their bounds) is not growth over time.
            load = partial(_load, w, config, credentials, fleet, pool, hash_port)
            await load(config.warm_up_s, result.runs, [], seed_offset=500)
            result.warmed = await _at_rest_resources(w)

            started = trio.current_time()
            await load(config.load_s, result.runs, result.rss_timeline)
            result.seconds_of_load = trio.current_time() - started
            (
                result.after,
                result.sessions_open_after,
                result.devices_connected_after,
                result.settled_in_s,
            ) = await _wait_settled(w, config, result.baseline)
            result.fleet_problems = list(fleet.problems)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if process.stdin is not None:
                await process.stdin.aclose()
            with trio.move_on_after(10):
                await process.wait()
            process.kill()


async def _load(
    w: World,
    config: SoakConfig,
    credentials: list[Credentials],
    fleet: Fleet,
    pool: _Pool,
    hash_port: int,
    seconds: float,
    runs: list[SessionRun],
    rss_timeline: list[tuple[float, int]],
    *,
    seed_offset: int = 0,
) -> None:
    """Every engineer's workers, for *seconds*; the broker's RSS sampled meanwhile."""
    started = trio.current_time()
    until = started + seconds
    async with trio.open_nursery() as load:
        load.start_soon(_sample_rss, w, started, until, rss_timeline)
        for e, engineer in enumerate(credentials):
            for k in range(config.workers_per_engineer):
                load.start_soon(
                    _worker,
                    engineer,
                    fleet,
                    pool,
                    hash_port,
                    config,
                    _rng(config.seed * 1000 + seed_offset + e * 100 + k + 1),
                    until,
                    runs,
                )
                # Engineers do not all press Enter in the same millisecond.
                await trio.sleep(0.05)


def _account(data_dir: Path, runs: list[SessionRun]) -> AuditAccount:
    """Read the audit log: one start and one end per session, the planned reason."""
    events: dict[str, Counter[str]] = {}
    reasons: dict[str, str] = {}
    for record in read_records(data_dir / "audit"):
        session_id = record.get("session_id")
        if not isinstance(session_id, str):
            continue
        events.setdefault(session_id, Counter())[str(record.get("event"))] += 1
        if record.get("event") == "session.end":
            reasons[session_id] = str(record.get("reason"))
    started = [s for s, c in events.items() if c["session.requested"]]
    account = AuditAccount(
        sessions_started=len(started),
        sessions_with_one_end=sum(
            1
            for s in started
            if events[s]["session.requested"] == 1
            and events[s]["session.end"] == 1
            and events[s]["session.started"] <= 1
        ),
        ends_by_reason=dict(Counter(reasons.values())),
    )
    planned = {r.session_id: r.planned for r in runs if r.session_id}
    for session_id in started:
        if session_id not in planned:
            account.unknown_sessions.append(session_id)
        elif reasons.get(session_id) != planned[session_id]:
            account.reason_mismatches.append(
                f"{session_id}: planned {planned[session_id]}, audit says "
                f"{reasons.get(session_id)}"
            )
    return account


def _verify_chain(w: World) -> str:
    """``relay audit verify`` on the data dir's log: "verified" or its complaint."""
    done = subprocess.run(
        [sys.executable, "-m", "relay", "audit", "verify", str(w.data_dir / "audit")],
        capture_output=True,
        text=True,
        env=dict(os.environ, RELAY_DATA_DIR=str(w.data_dir)),
        timeout=300,
        check=False,
    )
    if done.returncode == 0:
        return "verified"
    return f"exit {done.returncode}: {(done.stdout + done.stderr).strip()[:500]}"


def run_soak(config: SoakConfig, *, keep: Path | None = None) -> SoakResult:
    """One soak, start to finish (see the module docstring)."""
    result = SoakResult(config)
    with world(keep=keep) as w:
        agent_dirs = [d.root for d in w.enroll_devices("soak", config.devices)]
        engineers = [w.add_engineer() for _ in range(config.engineers)]
        hash_port = free_port()
        w.write_config(sessions={"allowed_channels": ["shell", f"tcp:{hash_port}"]})
        w.broker.start()
        credentials = [w.login(e) for e in engineers]
        trio.run(partial(_soak, w, config, agent_dirs, credentials, hash_port, result))
        w.broker.stop()
        result.audit = _account(w.data_dir, result.runs)
        result.audit.chain = _verify_chain(w)
    return result


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reliability.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--engineers", type=int, default=8)
    parser.add_argument("--workers", type=int, default=3, help="per engineer")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--keep", type=Path, help="keep the data dir and logs here")
    args = parser.parse_args(argv)
    config = SoakConfig(
        load_s=args.minutes * 60,
        devices=args.devices,
        engineers=args.engineers,
        workers_per_engineer=args.workers,
        max_transfer=4 * 1024 * 1024,
        seed=args.seed,
    )
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    result = run_soak(config, keep=args.keep)
    print(result.summary())
    if args.json:
        args.json.write_text(json.dumps(result.to_json(), indent=1) + "\n")
    return 1 if result.problems() else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
