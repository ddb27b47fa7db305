"""Interactive latency and session set-up/teardown, through a real broker and real agents.

Theory of operation
===================
Three processes, as in the field: the broker (``relay serve``), the instruments
(:mod:`bench.fleet`: real agents, one per device, granting at once), and the
engineers (this process: the product's engineer client code,
:func:`relay._trio.engineer_session.run_session` and its attach socket).

*Interactive latency.* Each engineer opens the shell channel; the instrument's
shell is ``cat`` on a raw PTY, so every byte typed comes back as a shell's
line editor would echo it. A typist sends one byte, waits for its echo, then
pauses like a person (50-250 ms, about 7 keys/s). The same typists then type
over *direct* TLS connections to an echo server on the instrument: the
baseline. The figure is the added latency: a percentile through the relay
minus the same percentile direct, at the same concurrency.

*Set-up and teardown.* One device, sessions one after another: request (POST)
→ offer reaches the device (stamped by the fleet) → the device grants at once →
the engineer, told the session is active, opens a stream to the instrument's
banner service → first byte; then the person presses End on the device (a
line to the fleet, stamped there) → the engineer's attach socket is closed by
the broker. All stamps are ``time.monotonic()`` (one clock for the machine).
Baseline for the first byte: a direct TLS connect to the instrument and one
echoed byte.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final

import trio

from bench.results import Goal, Mode, ScenarioResult, Table, fmt_ms, ratio
from bench.world import (
    Engineer,
    World,
    free_port,
    percentiles,
    sample_process,
    server_tls,
    world,
)
from relay._trio.engineer_session import SessionStatus, _attach, run_session
from relay._trio.tunnel_mux import MuxStream, TunnelMux
from relay._trio.websocket import ConnectionClosed
from relay.engineer_client import ApiError, Credentials, api_call
from relay.proto.tunnel import Side

PAUSE_S: Final = (0.05, 0.25)  # a person's pause between keys
SETTLE_S: Final = 0.5  # the PTY's `stty raw -echo` runs before the first key
EVENT_TIMEOUT_S: Final = 30.0
KEY_TIMEOUT_S: Final = 10.0
#: Engineers do not all press Enter in the same millisecond: the sessions of
#: a round start this far apart (100 sessions: 5 s), so the instruments'
#: tunnel handshakes, all from 127.0.0.1 here, are not a burst that the
#: broker's per-source admission cap (10 pending) would refuse as a flood.
SESSION_RAMP_S: Final = 0.05

LATENCY_GOAL = (
    "interactive echo added latency (1 B keystroke)",
    "p50 < 1 ms, p99 < 5 ms over direct, with 100 sessions typing",
)
SETUP_GOAL = (
    "request -> offer on device; grant -> first byte",
    "p99 < 50 ms; p99 < 100 ms",
)
KILL_GOAL = ("kill -> engineer socket closed", "p99 < 100 ms")


@dataclass
class Fleet:
    """The :mod:`bench.fleet` process: its ports and the events it reported."""

    process: trio.Process
    banner_port: int
    tls_echo_port: int
    events: dict[tuple[str, str], float] = field(default_factory=dict)
    changed: trio.Event = field(default_factory=trio.Event)

    async def wait_for(self, event: str, session_id: str) -> float:
        """The monotonic stamp of *event* for *session_id*, once reported."""
        with trio.fail_after(EVENT_TIMEOUT_S):
            while (event, session_id) not in self.events:
                await self.changed.wait()
        return self.events.pop((event, session_id))

    async def press_end(self, session_id: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(
            json.dumps({"end": session_id}).encode() + b"\n"
        )


async def _read_events(fleet: Fleet, ready: trio.Event) -> None:
    assert fleet.process.stdout is not None
    buffer = b""
    while chunk := await fleet.process.stdout.receive_some(65536):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            message = json.loads(line)
            if message["event"] == "ready":
                ready.set()
            elif "session_id" in message and "t" in message:
                fleet.events[(message["event"], message["session_id"])] = message["t"]
                fleet.changed.set()
                fleet.changed = trio.Event()


@contextlib.asynccontextmanager
async def run_fleet(
    w: World, agent_dirs: list[Path], banner_port: int, broker_url: str | None = None
) -> AsyncIterator[Fleet]:
    """Start the fleet on *agent_dirs* and wait until every agent is connected
    (to the world's broker, or the node at *broker_url*)."""
    tls_echo_port = free_port()
    _server, _client, cert, key = server_tls(w.root, w.ca_file, w.data_dir)
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "bench.fleet",
            "--broker",
            broker_url or w.broker.device_url,
            "--ca-file",
            str(w.ca_file),
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
            "--banner-port",
            str(banner_port),
            "--tls-echo-port",
            str(tls_echo_port),
            *map(str, agent_dirs),
        ],
        stdin=-1,
        stdout=-1,  # subprocess.PIPE
        stderr=(w.root / "fleet.log").open("ab"),
    )
    fleet = Fleet(process, banner_port, tls_echo_port)
    try:
        async with trio.open_nursery() as nursery:
            ready = trio.Event()
            nursery.start_soon(_read_events, fleet, ready)
            with trio.fail_after(180):
                await ready.wait()
            yield fleet
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            process.terminate()
            with trio.move_on_after(10):
                await process.wait()
            process.kill()


def _broker_for(w: World, devices: int) -> tuple[list[Path], Engineer, int]:
    """Devices, an engineer, a broker allowing the shell and the banner's port."""
    agent_dirs = [d.root for d in w.enroll_devices("bench-dev", devices)]
    engineer = w.add_engineer()
    banner_port = free_port()
    w.write_config(sessions={"allowed_channels": ["shell", f"tcp:{banner_port}"]})
    return agent_dirs, engineer, banner_port


# --- interactive latency -------------------------------------------------------


async def _type(
    send: Callable[[bytes], Awaitable[None]],
    receive: Callable[[], Awaitable[bytes]],
    keys: int,
    pause: tuple[float, float],
    rng: random.Random,
    rtts: list[float],
) -> None:
    """*keys* keystrokes, each waited for, with a person's pause between them."""
    for _ in range(keys):
        started = time.perf_counter()
        await send(b"k")
        got = 0
        with trio.fail_after(
            KEY_TIMEOUT_S
        ):  # a lost keystroke is a failure, not a hang
            while got < 1:
                got += len(await receive())
        rtts.append(time.perf_counter() - started)
        await trio.sleep(rng.uniform(*pause))


def _receiver(
    stream: trio.SSLStream[trio.SocketStream],
) -> Callable[[], Awaitable[bytes]]:
    async def receive() -> bytes:
        return bytes(await stream.receive_some(65536))

    return receive


async def _typist_direct(
    port: int,
    context: ssl.SSLContext,
    keys: int,
    pause: tuple[float, float],
    seed: int,
    rtts: list[float],
) -> None:
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
    async with stream:
        await stream.do_handshake()
        await _type(
            stream.send_all,
            _receiver(stream),
            keys,
            pause,
            random.Random(seed),
            rtts,
        )


@dataclass
class _CpuWindow:
    """CPU seconds per keystroke of each process on the path, over the typing only."""

    pids: dict[str, int]
    before: dict[str, float] = field(default_factory=dict)
    per_key_s: dict[str, float] = field(default_factory=dict)

    def _sample(self) -> dict[str, float]:
        sample = {name: sample_process(pid).cpu_s for name, pid in self.pids.items()}
        sample["engineer (bench process)"] = time.process_time()
        return sample

    def start(self) -> None:
        self.before = self._sample()

    def stop(self, keys: int) -> None:
        after = self._sample()
        self.per_key_s = {k: (after[k] - self.before[k]) / keys for k in after}


def _typing_work(
    keys: int,
    pause: tuple[float, float],
    seed: int,
    rtts: list[float],
    done: Callable[[], None],
    cpu: _CpuWindow | None = None,
) -> Callable[[TunnelMux, SessionStatus], Awaitable[None]]:
    async def work(mux: TunnelMux, status: SessionStatus) -> None:
        stream = await mux.open_stream("shell", cols=80, rows=24)
        await trio.sleep(SETTLE_S)
        with trio.move_on_after(0.05):
            while True:
                await stream.receive_some()  # anything said before raw mode
        if cpu is not None:
            cpu.start()
        await _type(
            stream.send_all, stream.receive_some, keys, pause, random.Random(seed), rtts
        )
        if cpu is not None:
            cpu.stop(keys)
        done()
        await stream.aclose()

    return work


async def _typing_round(
    credentials: Credentials,
    fleet: Fleet,
    device_ids: list[str],
    keys: int,
    pause: tuple[float, float],
    context: ssl.SSLContext,
    cpu: _CpuWindow | None = None,
) -> dict[str, list[float]]:
    relay_rtts: list[float] = []
    direct_rtts: list[float] = []
    async with trio.open_nursery() as nursery:
        for i in range(len(device_ids)):
            if i:
                await trio.sleep(
                    SESSION_RAMP_S
                )  # the same overlap as through the relay
            nursery.start_soon(
                _typist_direct,
                fleet.tls_echo_port,
                context,
                keys,
                pause,
                i,
                direct_rtts,
            )
    finished: list[str] = []
    async with trio.open_nursery() as nursery:
        for i, device_id in enumerate(device_ids):
            if i:
                await trio.sleep(SESSION_RAMP_S)
            nursery.start_soon(
                partial(
                    _session,
                    credentials,
                    device_id=device_id,
                    reason="bench: typing",
                    channels=["shell"],
                    work=_typing_work(
                        keys,
                        pause,
                        i,
                        relay_rtts,
                        partial(finished.append, device_id),
                        cpu if len(device_ids) == 1 else None,
                    ),
                    out=io.StringIO(),
                )
            )
    if len(finished) != len(device_ids):
        raise RuntimeError(
            f"only {len(finished)} of {len(device_ids)} typing sessions finished"
        )
    return {"relay": relay_rtts, "direct": direct_rtts}


def _latency_rows(
    label: str, rtts: dict[str, list[float]]
) -> tuple[tuple[str, ...], dict[str, float]]:
    relay, direct = percentiles(rtts["relay"]), percentiles(rtts["direct"])
    added = {k: relay[k] - direct[k] for k in ("p50", "p99", "max")}
    row = (
        label,
        str(len(rtts["relay"])),
        *(fmt_ms(direct[k]) for k in ("p50", "p99", "max")),
        *(fmt_ms(relay[k]) for k in ("p50", "p99", "max")),
        *(fmt_ms(added[k]) for k in ("p50", "p99", "max")),
    )
    return row, added


def run_latency(mode: Mode, *, sessions: int | None = None) -> ScenarioResult:
    """Interactive echo latency with 1 and with many sessions typing at once."""
    many = sessions or (100 if mode == "full" else 10)
    single_keys, many_keys = (600, 200) if mode == "full" else (40, 10)
    with world() as w:
        agent_dirs, engineer, banner_port = _broker_for(w, many)
        w.broker.start()
        credentials = w.login(engineer)
        _s, client, _c, _k = server_tls(w.root, w.ca_file, w.data_dir)
        cpu = _CpuWindow({})

        async def main() -> dict[str, dict[str, list[float]]]:
            async with run_fleet(w, agent_dirs, banner_port) as fleet:
                ids = [p.name for p in agent_dirs]
                cpu.pids = {
                    "broker": w.broker.pid,
                    "instrument (fleet process)": fleet.process.pid,
                }
                single = await _typing_round(
                    credentials, fleet, ids[:1], single_keys, (0.01, 0.03), client, cpu
                )
                busy = await _typing_round(
                    credentials, fleet, ids, many_keys, PAUSE_S, client
                )
                return {"1": single, str(many): busy}

        results = trio.run(main)
    columns = (
        "sessions",
        "keys",
        "direct p50",
        "direct p99",
        "direct max",
        "relay p50",
        "relay p99",
        "relay max",
        "added p50",
        "added p99",
        "added max",
    )
    row1, _added1 = _latency_rows("1", results["1"])
    row_many, added = _latency_rows(str(many), results[str(many)])
    direct = percentiles(results[str(many)]["direct"])
    met = many >= 100 and added["p50"] < 0.001 and added["p99"] < 0.005
    result = ScenarioResult(
        name="latency",
        title="Interactive latency: 1-byte echo through the shell channel",
        tables=[
            Table(
                "Keystroke round trip, direct TLS vs through the relay",
                columns,
                (row1, row_many),
            ),
            Table(
                "CPU per keystroke round trip, 1 session (typing only)",
                ("process", "CPU per round trip"),
                tuple((name, fmt_ms(v)) for name, v in cpu.per_key_s.items()),
            ),
        ],
        goals=[
            Goal(
                figure=LATENCY_GOAL[0],
                goal=LATENCY_GOAL[1],
                measured=f"{many} sessions: added p50 {fmt_ms(added['p50'])}, p99 {fmt_ms(added['p99'])}",
                baseline=f"direct TLS p50 {fmt_ms(direct['p50'])}, p99 {fmt_ms(direct['p99'])}",
                # Round trip through the relay over the direct one, at the median.
                ratio=ratio(
                    percentiles(results[str(many)]["relay"])["p50"], direct["p50"]
                ),
                met=met,
            )
        ],
        raw={
            **{k: {s: sorted(v) for s, v in r.items()} for k, r in results.items()},
            "cpu_per_key_s": cpu.per_key_s,
        },
    )
    result.notes.append(
        f"1 session types {single_keys} keys 10-30 ms apart; {many} sessions type {many_keys} keys each, "
        f"{PAUSE_S[0] * 1000:.0f}-{PAUSE_S[1] * 1000:.0f} ms apart (about 7 keys/s per person). "
        "The direct baseline uses the same typists and pauses over TLS to an echo server on the instrument."
    )
    return result


async def _session(credentials: Credentials, **kwargs: Any) -> None:
    """:func:`run_session`, asked again while the device is busy: the broker
    settles the previous session's end after the engineer has been told."""
    while True:
        try:
            await run_session(credentials, **kwargs)
            return
        except ApiError as exc:
            if exc.status != 409:
                raise
            await trio.sleep(0.02)


# --- set-up and teardown -------------------------------------------------------


@dataclass
class SetupTimings:
    request_to_offer: list[float] = field(default_factory=list)
    grant_to_first_byte: list[float] = field(default_factory=list)
    kill_to_closed: list[float] = field(default_factory=list)
    direct_first_byte: list[float] = field(default_factory=list)


async def one_session(
    credentials: Credentials, fleet: Fleet, device_id: str, timings: SetupTimings
) -> None:
    started = time.monotonic()
    while True:
        try:
            created = await trio.to_thread.run_sync(
                partial(
                    api_call,
                    credentials,
                    "POST",
                    "/api/v1/sessions",
                    {
                        "device_id": device_id,
                        "reason": "bench: set-up",
                        "channels": [f"tcp:{fleet.banner_port}"],
                    },
                )
            )
            break
        except ApiError as exc:
            if exc.status != 409:  # busy: the last session's end is still settling
                raise
            await trio.sleep(0.01)
            started = time.monotonic()
    session_id = str(created["session_id"])
    status = SessionStatus(io.StringIO())
    closed = trio.Event()
    closed_at = math.nan
    async with _attach(credentials, session_id, None) as ws:
        mux = TunnelMux(ws, side=Side.ENGINEER, on_text=status.on_text)
        async with trio.open_nursery() as nursery:

            async def run_mux() -> None:
                nonlocal closed_at
                with contextlib.suppress(ConnectionClosed):
                    await mux.run()
                closed_at = time.monotonic()  # the broker closed the attach socket
                closed.set()
                status.active.set()

            nursery.start_soon(run_mux)
            offered = await fleet.wait_for("offer", session_id)
            await status.active.wait()
            stream: MuxStream = await mux.open_stream(f"tcp:{fleet.banner_port}")
            first = await stream.receive_some()
            first_at = time.monotonic()
            if first[:1] != b"R":
                raise RuntimeError(f"the banner service said {first!r}")
            await fleet.press_end(session_id)
            pressed = await fleet.wait_for("end_pressed", session_id)
            with trio.fail_after(EVENT_TIMEOUT_S):
                await closed.wait()
    timings.request_to_offer.append(offered - started)
    timings.grant_to_first_byte.append(first_at - offered)
    timings.kill_to_closed.append(closed_at - pressed)


async def _direct_first_byte(
    port: int, context: ssl.SSLContext, timings: SetupTimings
) -> None:
    started = time.monotonic()
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
    async with stream:
        await stream.send_all(b"R")
        await stream.receive_some(1)
    timings.direct_first_byte.append(time.monotonic() - started)


def run_setup(mode: Mode, *, sessions: int | None = None) -> ScenarioResult:
    """Request → offer, grant → first byte, kill → engineer socket closed."""
    count = sessions or (200 if mode == "full" else 10)
    timings = SetupTimings()
    with world() as w:
        agent_dirs, engineer, banner_port = _broker_for(w, 1)
        w.broker.start()
        credentials = w.login(engineer)
        _s, client, _c, _k = server_tls(w.root, w.ca_file, w.data_dir)

        async def main() -> None:
            async with run_fleet(w, agent_dirs, banner_port) as fleet:
                for _ in range(count):
                    await one_session(credentials, fleet, agent_dirs[0].name, timings)
                    await _direct_first_byte(fleet.tls_echo_port, client, timings)

        trio.run(main)
    offer, first, kill, direct = (
        percentiles(x)
        for x in (
            timings.request_to_offer,
            timings.grant_to_first_byte,
            timings.kill_to_closed,
            timings.direct_first_byte,
        )
    )
    columns = ("step", "n", "p50", "p90", "p99", "max")

    def row(name: str, p: dict[str, float], n: int) -> tuple[str, ...]:
        return (name, str(n), *(fmt_ms(p[k]) for k in ("p50", "p90", "p99", "max")))

    full = count >= 100
    return ScenarioResult(
        name="setup",
        title="Session set-up and teardown",
        tables=[
            Table(
                f"{count} sessions one after another on one device",
                columns,
                (
                    row("request → offer on the device", offer, count),
                    row("grant → first byte at the engineer", first, count),
                    row("on-site End → engineer socket closed", kill, count),
                    row("baseline: direct TLS connect → first byte", direct, count),
                ),
            )
        ],
        goals=[
            Goal(
                figure=SETUP_GOAL[0],
                goal=SETUP_GOAL[1],
                measured=f"p99 {fmt_ms(offer['p99'])}; p99 {fmt_ms(first['p99'])}",
                baseline=f"direct TLS connect → first byte p99 {fmt_ms(direct['p99'])}",
                ratio=ratio(first["p99"], direct["p99"]),
                met=full and offer["p99"] < 0.050 and first["p99"] < 0.100,
            ),
            Goal(
                figure=KILL_GOAL[0],
                goal=KILL_GOAL[1],
                measured=f"p99 {fmt_ms(kill['p99'])}",
                baseline="",
                ratio=None,
                met=full and kill["p99"] < 0.100,
            ),
        ],
        raw={
            "request_to_offer_s": timings.request_to_offer,
            "grant_to_first_byte_s": timings.grant_to_first_byte,
            "kill_to_closed_s": timings.kill_to_closed,
            "direct_first_byte_s": timings.direct_first_byte,
        },
    )


def _main(argv: list[str]) -> None:
    mode: Mode = "full" if "--full" in argv else "quick"
    for run in (run_setup, run_latency):
        result = run(mode)
        print(
            json.dumps(
                {
                    "name": result.name,
                    "tables": [t.rows for t in result.tables],
                    "goals": [g.measured for g in result.goals],
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    _main(sys.argv[1:])

__all__: list[Any] = ["run_latency", "run_setup"]
