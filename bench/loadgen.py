"""A device load generator: N simulated instruments holding control channels.

Theory of operation
===================
Run as its own process (``python -m bench.loadgen ...``) so that its CPU and
memory never count as the broker's, and so that one trio loop can hold
thousands of connections without the benchmark process in the way. Each
simulated device has its own certificate (an :class:`~relay.pki_files.AgentDir`
made by :meth:`bench.world.World.enroll_devices`) and does what
``relay agent run`` does on the wire, through the same code: TCP, mTLS with
:func:`relay.tls.agent_context`, the WebSocket upgrade with
:func:`relay._trio.websocket.connect_websocket` on ``/v1/device/control``,
``hello`` and ``welcome`` through :class:`relay.proto.control.ControlChannel`,
then a ``heartbeat`` every ``welcome.heartbeat_interval_s`` whose round trip to
the ``heartbeat_ack`` is the latency we report. The transport's own keepalive
pings run as in the agent (same :class:`~relay.config.WebSocketLimits`).

When a channel ends, or an attempt fails, the device waits what
:func:`relay.proto.backoff.plan_retry` says for :class:`~relay.config.AgentConfig`
defaults with a fresh random draw, including the agent's rule that three EOFs
right after TLS mean a refused certificate (a 15 minute wait), and tries again,
forever: a reconnect storm is exactly this policy multiplied by N.

``--mode tls`` is the baseline's client: the same devices, the same TCP and TLS
(one client context per device), but no WebSocket: the connection is held
until the server closes it. It is what "just holding mTLS in trio" costs.

Source addresses: every device binds its socket to its own address in
127.0.0.0/8 (``--per-source`` devices share one), so the broker's
per-source-address admission cap (``max_pending_per_source``) sees devices at
many sites, as in the field, instead of 10,000 devices behind one address that
the cap would throttle to 10 handshakes at a time.

First connections (the fleet coming up before a measurement) pass through a
semaphore of ``--boot-concurrency`` slots, below the broker's early-drop
threshold, so that setting the scene does not itself cause backoff; once a
device has been connected, its reconnects are never gated (the storm is real).

Control and results are JSON lines. Stdin takes ``mark`` (start a measurement
window: RTT samples, disconnects and failure totals restart, and each device
counts as "back" only after its next successful handshake) and ``stop``.
Stdout carries ``{"event": "progress", ...}`` every second, ``all_connected``
once the whole fleet first stood, ``marked``, and a final ``summary`` on
``stop``, SIGTERM or SIGINT, after which the process exits at once without
closing its sockets one by one (the kernel does, and nothing is measured then).
Timestamps are ``time.monotonic()``, which is the same clock in every process
on Linux, so the parent can set them against its own events.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import json
import math
import os
import random
import resource
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import trio
from cryptography import x509

import auth
from bench.world import percentiles, sample_process
from relay import __version__
from relay._trio.agent import parse_broker_url
from relay._trio.websocket import ConnectionClosed, HandshakeFailed, connect_websocket
from relay.config import AgentConfig, WebSocketLimits
from relay.pki_files import AgentDir
from relay.proto import control
from relay.proto.backoff import Backoff, Outcome, plan_retry
from relay.proto.close import CloseCode
from relay.proto.errors import RemoteProtocolError
from relay.tls import agent_context

USER_AGENT: Final = f"relay-loadgen/{__version__}"
#: Linux's IP_BIND_ADDRESS_NO_PORT (not in every Python's socket module): the
#: port is chosen at connect() for the 4-tuple, not at bind() for the address.
_IP_BIND_ADDRESS_NO_PORT: Final = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
#: RTT samples kept per window; beyond this a window is summarised from the
#: first ones (10,000 devices at a 30 s heartbeat fill it in about 100 minutes).
MAX_RTT_SAMPLES: Final = 1_000_000
THRESHOLDS: Final = (50, 90, 100)


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the new soft limit.

    Every connection is a file descriptor, and child processes inherit the soft
    limit, so the benchmark calls this before it starts the broker too.
    """
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def source_address(index: int, per_source: int = 1) -> str:
    """The loopback address of device *index*: 127.a.b.c, a, b, c in 1..254.

    127.0.0.0/24 (the broker's own 127.0.0.1) is never used as a source.
    """
    site = index // per_source
    c = site % 254 + 1
    b = (site // 254) % 254 + 1
    a = site // (254 * 254) + 1
    if a > 254:
        raise ValueError("more sites than 127.0.0.0/8 holds")
    return f"127.{a}.{b}.{c}"


# The generator process --------------------------------------------------------------


@dataclass(slots=True)
class Device:
    """One simulated instrument; kept small, there are 10,000 of them."""

    device_id: str
    context: ssl.SSLContext
    source: str
    connected: bool = False
    booted: bool = False  # has had a channel open once (no more boot gate)
    back: bool = False  # handshake completed since the last mark


@dataclass(slots=True)
class Stats:
    """Counters of the whole fleet; ``tick_*`` restart every second, ``window_*`` at a mark."""

    total: int
    connected: int = 0
    in_flight: int = 0
    auth_waits: int = 0  # devices told by plan_retry to wait as if refused
    handshakes_total: int = 0
    tick_handshakes: int = 0
    tick_failures: Counter[str] = field(default_factory=Counter)
    tick_disconnects: int = 0
    window_failures: Counter[str] = field(default_factory=Counter)
    window_disconnects: Counter[str] = field(default_factory=Counter)
    window_handshakes: int = 0
    back: int = 0
    back_times: list[float] = field(default_factory=list)
    crossed: dict[str, float] = field(default_factory=dict)
    rtts: array[float] = field(default_factory=lambda: array("d"))
    all_connected_at: float | None = None
    mark_at: float | None = None

    def failure(self, kind: str) -> None:
        self.tick_failures[kind] += 1
        self.window_failures[kind] += 1

    def handshake(self, device: Device) -> None:
        self.connected += 1
        self.handshakes_total += 1
        self.tick_handshakes += 1
        self.window_handshakes += 1
        device.connected = True
        if not device.back:
            device.back = True
            self.back += 1
            now = time.monotonic()
            self.back_times.append(now)
            for p in THRESHOLDS:
                if f"p{p}" not in self.crossed and self.back >= math.ceil(
                    self.total * p / 100
                ):
                    self.crossed[f"p{p}"] = now
        if self.all_connected_at is None and self.connected == self.total:
            self.all_connected_at = time.monotonic()
            _emit(
                event="all_connected", t=self.all_connected_at, connected=self.connected
            )

    def disconnect(self, device: Device, code: int | None) -> None:
        if device.connected:
            device.connected = False
            self.connected -= 1
            self.tick_disconnects += 1
            self.window_disconnects[str(code)] += 1


class _Failed(Exception):
    """An attempt that never got its channel open: how, for plan_retry and the counts."""

    def __init__(self, outcome: Outcome, kind: str) -> None:
        super().__init__(kind)
        self.outcome = outcome
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    url: str
    mode: str  # "relay" or "tls"
    limits: AgentConfig
    websocket: WebSocketLimits


def _emit(**fields: Any) -> None:
    # One line per message, flushed: the parent reads them as they come.
    sys.stdout.write(json.dumps(fields, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def _open_tcp(host: str, port: int, source: str) -> trio.SocketStream:
    """TCP from *source* (a 127.x.y.z) to the broker, with the errno kept.

    ``trio.open_tcp_stream`` would wrap a refusal in a generic OSError; the
    kind of failure is what we count, so the socket is made here.
    """
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        await sock.bind((source, 0))
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def _tls_failure_kind(exc: trio.BrokenResourceError) -> tuple[Outcome, str]:
    """Classify a failed TLS handshake as the agent does (see agent._open_tls)."""
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return Outcome.NETWORK, "tls_error"
    if isinstance(cause, ssl.SSLError) and "ALERT" in (cause.reason or ""):
        return Outcome.REFUSED, "tls_alert"
    if cause is None or isinstance(
        cause, ssl.SSLEOFError | ConnectionError | ssl.SSLZeroReturnError
    ):
        # Closed before TLS completed: what an admission drop (or a broker
        # that is shutting down) looks like from the device.
        return Outcome.NETWORK, "dropped_before_tls"
    return Outcome.NETWORK, "tls_error"


async def _connect_tls(
    device: Device, target: Target
) -> trio.SSLStream[trio.SocketStream]:
    try:
        tcp = await _open_tcp(target.host, target.port, device.source)
    except OSError as exc:
        kind = {
            errno.ECONNREFUSED: "refused",
            errno.ECONNRESET: "dropped_before_tls",
            errno.EADDRNOTAVAIL: "no_local_port",
            errno.EMFILE: "out_of_fds",
        }.get(exc.errno or 0, "connect_error")
        raise _Failed(Outcome.NETWORK, kind) from None
    tls = trio.SSLStream(
        tcp, device.context, server_hostname=target.host, https_compatible=True
    )
    try:
        await tls.do_handshake()
    except BaseException as exc:
        # Includes cancellation (the connect deadline): the socket is ours.
        await trio.aclose_forcefully(tls)
        if isinstance(exc, trio.BrokenResourceError):
            raise _Failed(*_tls_failure_kind(exc)) from None
        raise
    return tls


async def _hold_tls(
    device: Device, target: Target, stats: Stats, slot: _BootSlot
) -> None:
    """Baseline mode: TLS only, held until the server closes it."""
    tls: trio.SSLStream[trio.SocketStream] | None = None
    with trio.move_on_after(target.limits.connect_timeout_s):
        tls = await _connect_tls(device, target)
    if tls is None:
        raise _Failed(Outcome.NETWORK, "timeout_connect")
    slot.release()
    stats.handshake(device)
    try:
        while True:
            try:
                data = await tls.receive_some(4096)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                break
    finally:
        stats.disconnect(device, None)
        await trio.aclose_forcefully(tls)
    raise _Failed(Outcome.LOST, "lost")


async def _run_channel(
    device: Device, target: Target, stats: Stats, slot: _BootSlot
) -> None:
    """One attempt of the relay protocol; always ends by raising :class:`_Failed`."""
    channel = control.ControlChannel(control.Role.DEVICE)
    stage = "connect"
    opened = False
    with trio.move_on_after(target.limits.connect_timeout_s) as connect_scope:
        tls = await _connect_tls(device, target)
        stage = "upgrade"
        try:
            async with connect_websocket(
                tls, target.url, target.websocket, user_agent=USER_AGENT
            ) as ws:
                stage = "welcome"
                await ws.send_message(
                    channel.send(
                        control.Hello(
                            version=control.PROTOCOL_VERSION,
                            device_id=device.device_id,
                            agent_version=__version__,
                        )
                    )
                )
                welcome = channel.next_event()
                while welcome is control.NEED_DATA:
                    channel.receive_message(await ws.receive_message())
                    welcome = channel.next_event()
                if not isinstance(
                    welcome, control.Welcome
                ):  # pragma: no cover - the channel admits only Welcome
                    raise _Failed(Outcome.LOST, "no_welcome")
                connect_scope.deadline = math.inf
                opened = True
                slot.release()
                stats.handshake(device)
                code: int | None = None
                try:
                    await _heartbeats(ws, channel, welcome, stats)
                except ConnectionClosed as exc:
                    code = exc.code
                except RemoteProtocolError:
                    code = CloseCode.PROTOCOL_ERROR
                finally:
                    stats.disconnect(device, code)
                raise _Failed(Outcome.LOST, "lost")
        except HandshakeFailed as exc:
            if exc.status is None:
                raise _Failed(Outcome.EOF_AFTER_TLS, "eof_after_tls") from None
            outcome = Outcome.REFUSED if exc.status == 403 else Outcome.NETWORK
            raise _Failed(outcome, f"http_{exc.status}") from None
        except (ConnectionClosed, RemoteProtocolError):
            if opened:  # pragma: no cover - handled above
                raise
            raise _Failed(Outcome.LOST, "closed_before_welcome") from None
    raise _Failed(Outcome.NETWORK, f"timeout_{stage}")


async def _heartbeats(
    ws: Any, channel: control.ControlChannel, welcome: control.Welcome, stats: Stats
) -> None:
    """Heartbeat at the welcome's interval and time each ack, until the channel ends."""
    sent_at: dict[int, float] = {}

    async def send_loop() -> None:
        with contextlib.suppress(ConnectionClosed):
            for seq in range(1, 2**53):
                sent_at[seq] = trio.current_time()
                await ws.send_message(channel.send(control.Heartbeat(seq=seq)))
                await trio.sleep(welcome.heartbeat_interval_s)

    ended: ConnectionClosed | RemoteProtocolError | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_loop)
        try:
            while True:
                channel.receive_message(await ws.receive_message())
                event = channel.next_event()
                if isinstance(event, control.HeartbeatAck) and event.seq in sent_at:
                    rtt = trio.current_time() - sent_at.pop(event.seq)
                    sent_at.clear()
                    if len(stats.rtts) < MAX_RTT_SAMPLES:
                        stats.rtts.append(rtt)
        except (ConnectionClosed, RemoteProtocolError) as exc:
            # Raised after the nursery, so the caller sees it alone, not in a group.
            ended = exc
        nursery.cancel_scope.cancel()
    if ended is not None:
        raise ended


class _BootSlot:
    """A boot-semaphore slot held from the first attempt's start to its handshake."""

    def __init__(self, semaphore: trio.Semaphore | None) -> None:
        self._semaphore = semaphore

    async def __aenter__(self) -> _BootSlot:
        if self._semaphore is not None:
            await self._semaphore.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self._semaphore is not None:
            self._semaphore.release()
            self._semaphore = None


async def _device_loop(
    device: Device,
    target: Target,
    stats: Stats,
    boot: trio.Semaphore,
    rng: random.Random,
) -> None:
    """The agent's retry loop (agent.run_agent), without ever giving up."""
    limits = target.limits
    backoff = Backoff(
        base_s=limits.backoff_base_s,
        cap_s=limits.backoff_cap_s,
        auth_failure_s=limits.auth_failure_retry_s,
    )
    eof_streak = 0
    attempt = _hold_tls if target.mode == "tls" else _run_channel
    while True:
        started = trio.current_time()
        stats.in_flight += 1
        try:
            async with _BootSlot(None if device.booted else boot) as slot:
                await attempt(device, target, stats, slot)
            outcome = Outcome.LOST  # pragma: no cover - attempts always raise
        except _Failed as failed:
            outcome = failed.outcome
            if failed.kind == "lost":
                device.booted = True
            else:
                stats.failure(failed.kind)
        finally:
            stats.in_flight -= 1
        eof_streak = eof_streak + 1 if outcome is Outcome.EOF_AFTER_TLS else 0
        delay, auth_wait = plan_retry(
            backoff,
            outcome,
            eof_streak=eof_streak,
            eof_threshold=limits.eof_after_tls_as_auth_failure,
            connected_for_s=trio.current_time() - started,
            stable_after_s=limits.stable_after_s,
            draw=rng.random(),
        )
        if auth_wait:
            stats.auth_waits += 1
        await trio.sleep(delay)
        if auth_wait:
            stats.auth_waits -= 1


def _rss_bytes() -> int:
    return sample_process(os.getpid()).rss_bytes


def _summary(stats: Stats, started: float) -> dict[str, Any]:
    rtt = {
        k: v if math.isfinite(v) else None for k, v in percentiles(stats.rtts).items()
    }

    return {
        "event": "summary",
        "t": time.monotonic(),
        "devices": stats.total,
        "connected": stats.connected,
        "back": stats.back,
        "mark_at": stats.mark_at,
        "crossed": stats.crossed,
        "back_times": stats.back_times,
        "all_connected_at": stats.all_connected_at,
        "boot_s": None
        if stats.all_connected_at is None
        else stats.all_connected_at - started,
        "window_handshakes": stats.window_handshakes,
        "window_failures": dict(stats.window_failures),
        "window_disconnects": dict(stats.window_disconnects),
        "auth_waits": stats.auth_waits,
        "rtt": {"count": len(stats.rtts), **rtt},
        "rss_bytes": _rss_bytes(),
        "cpu_s": time.process_time(),
    }


async def _report(stats: Stats) -> None:
    """A progress line every second (one second of counts each)."""
    next_tick = trio.current_time() + 1
    while True:
        await trio.sleep_until(next_tick)
        next_tick += 1
        _emit(
            event="progress",
            t=time.monotonic(),
            connected=stats.connected,
            connecting=stats.in_flight - stats.connected,
            handshakes=stats.tick_handshakes,
            failures=dict(stats.tick_failures),
            disconnects=stats.tick_disconnects,
            back=stats.back,
            auth_waits=stats.auth_waits,
            cpu_s=round(time.process_time(), 3),
            rss_bytes=_rss_bytes(),
        )
        stats.tick_handshakes = 0
        stats.tick_disconnects = 0
        stats.tick_failures.clear()


def _mark(stats: Stats, devices: Sequence[Device]) -> None:
    stats.mark_at = time.monotonic()
    # The next progress line counts from the mark, so that a second holding
    # both the fleet's boot and the start of a storm cannot mix the two.
    stats.tick_handshakes = 0
    stats.tick_disconnects = 0
    stats.tick_failures.clear()
    stats.window_failures.clear()
    stats.window_disconnects.clear()
    stats.window_handshakes = 0
    stats.rtts = array("d")
    stats.back = 0
    stats.back_times = []
    stats.crossed = {}
    for device in devices:
        device.back = False
    _emit(event="marked", t=stats.mark_at)


async def _control(stats: Stats, devices: Sequence[Device], stop: trio.Event) -> None:
    """Commands from the parent on stdin; EOF counts as ``stop``."""
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = b""
    async with stream:
        while not stop.is_set():
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                word = line.decode().strip()
                if word == "mark":
                    _mark(stats, devices)
                elif word == "stop":
                    stop.set()
                elif word:
                    _emit(event="error", detail=f"unknown command {word!r}")
    stop.set()


async def _signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            stop.set()
            return


async def _main(
    devices: list[Device], target: Target, boot_concurrency: int, seed: int | None
) -> None:
    stats = Stats(total=len(devices))
    started = time.monotonic()
    boot = trio.Semaphore(boot_concurrency)
    rng = random.Random(seed)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_report, stats)
        nursery.start_soon(_control, stats, devices, stop)
        nursery.start_soon(_signals, stop)
        for device in devices:
            nursery.start_soon(_device_loop, device, target, stats, boot, rng)
        await stop.wait()
        _emit(**_summary(stats, started))
        # Nothing is measured any more: leave without closing 10,000 channels
        # politely (the kernel closes the sockets).
        os._exit(0)


def _load_devices(paths: Sequence[str], ca_file: Path, per_source: int) -> list[Device]:
    devices: list[Device] = []
    for index, path in enumerate(paths):
        files = AgentDir(Path(path))
        certificate = x509.load_pem_x509_certificate(files.cert.read_bytes())
        device_id = auth.device_identity(certificate).device_id
        # One context per device: an SSL context carries one client certificate.
        context = agent_context(
            ca_file=ca_file, cert_file=files.cert, key_file=files.key
        )
        devices.append(Device(device_id, context, source_address(index, per_source)))
    return devices


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loadgen", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--url", required=True, help="wss://HOST:PORT of the device listener"
    )
    parser.add_argument("--ca-file", type=Path, required=True)
    parser.add_argument(
        "--devices-file", type=Path, required=True, help="one agent dir per line"
    )
    parser.add_argument("--mode", choices=("relay", "tls"), default="relay")
    parser.add_argument("--boot-concurrency", type=int, default=16)
    parser.add_argument(
        "--per-source", type=int, default=1, help="devices per source address"
    )
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    raise_nofile_limit()
    paths = [
        line for line in args.devices_file.read_text().splitlines() if line.strip()
    ]
    devices = _load_devices(paths, args.ca_file, args.per_source)
    host, port, url = parse_broker_url(args.url)
    target = Target(host, port, url, args.mode, AgentConfig(), WebSocketLimits())
    # The generator is the measuring instrument: everything built so far lives
    # until the end, so the cyclic GC need not walk it on every collection
    # (a full walk over 10,000 devices would show up as heartbeat RTT).
    gc.collect()
    gc.freeze()
    _emit(
        event="loaded", t=time.monotonic(), devices=len(devices), rss_bytes=_rss_bytes()
    )
    trio.run(_main, devices, target, args.boot_concurrency, args.seed)


# The parent's handle ----------------------------------------------------------------


class LoadGenerator:
    """A running ``python -m bench.loadgen`` and the JSON lines it sent.

    Resource handling:
        Use as a context manager; the process is killed on exit if still there.
    """

    def __init__(
        self,
        *,
        url: str,
        ca_file: Path,
        agent_dirs: Sequence[Path],
        work_dir: Path,
        mode: str = "relay",
        boot_concurrency: int = 16,
        per_source: int = 1,
        name: str = "loadgen",
    ) -> None:
        devices_file = work_dir / f"{name}.devices"
        devices_file.write_text("".join(f"{d}\n" for d in agent_dirs))
        repo = Path(__file__).resolve().parents[1]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(repo), env.get("PYTHONPATH")])
        )
        self.messages: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        with (work_dir / f"{name}.log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.loadgen",
                    "--url",
                    url,
                    "--ca-file",
                    str(ca_file),
                    "--devices-file",
                    str(devices_file),
                    "--mode",
                    mode,
                    "--boot-concurrency",
                    str(boot_concurrency),
                    "--per-source",
                    str(per_source),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                cwd=repo,
            )
        assert self.process.stdout is not None  # asked for above
        self._reader = threading.Thread(
            target=self._read, args=(self.process.stdout,), daemon=True
        )
        self._reader.start()

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self, stdout: IO[bytes]) -> None:
        for line in stdout:
            with contextlib.suppress(ValueError):
                message = json.loads(line)
                with self._cond:
                    self.messages.append(message)
                    self._cond.notify_all()
        with self._cond:
            self.messages.append({"event": "exited"})
            self._cond.notify_all()

    def wait_for(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float,
        *,
        start: int = 0,
    ) -> dict[str, Any] | None:
        """The first message from index *start* on that satisfies *predicate*, or None."""
        deadline = time.monotonic() + timeout
        index = start
        with self._cond:
            while True:
                while index < len(self.messages):
                    message = self.messages[index]
                    index += 1
                    if predicate(message):
                        return message
                    if message.get("event") == "exited":
                        return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def latest(self, event: str = "progress") -> dict[str, Any] | None:
        with self._cond:
            found = [m for m in self.messages if m.get("event") == event]
        return found[-1] if found else None

    def events(
        self, event: str = "progress", since: float = -math.inf
    ) -> list[dict[str, Any]]:
        with self._cond:
            return [
                m
                for m in self.messages
                if m.get("event") == event and m.get("t", 0) >= since
            ]

    def _command(self, word: str) -> int:
        assert self.process.stdin is not None  # asked for in __init__
        with self._cond:
            start = len(self.messages)
        self.process.stdin.write(word.encode() + b"\n")
        self.process.stdin.flush()
        return start

    def wait_all_connected(self, timeout: float) -> dict[str, Any] | None:
        return self.wait_for(
            lambda m: m.get("event") in ("all_connected", "exited"), timeout
        )

    def mark(self) -> float:
        """Start a measurement window; returns its monotonic start."""
        start = self._command("mark")
        marked = self.wait_for(lambda m: m.get("event") == "marked", 30, start=start)
        if marked is None:
            raise RuntimeError("the load generator did not answer mark")
        return float(marked["t"])

    def stop(self, timeout: float = 60) -> dict[str, Any]:
        """End the generator; its final summary."""
        start = self._command("stop")
        summary = self.wait_for(
            lambda m: m.get("event") == "summary", timeout, start=start
        )
        self.process.wait(timeout)
        if summary is None:
            raise RuntimeError("the load generator ended without a summary")
        return summary


if __name__ == "__main__":
    main()
