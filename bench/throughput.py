"""Bulk throughput through one session, against a direct TLS connection and socat.

Theory of operation
===================
The measured path is the product as an engineer uses it::

    bench client ─TCP─► relay forward ═TLS/WS═► relay serve ═mTLS/WS═► relay agent run ─TCP─► bench service
                        (own process)           (own process)           (own process)

Every relay part is the real command in its own process: the broker from
:mod:`bench.world`, an agent with a device certificate from the bench CA whose
``--allow-port`` is the bench's local service (the instrument's "web UI"), and
``relay forward DEVICE 0:PORT`` logged in with a real password + TOTP. The
session is granted the way an instrument's touchscreen software would: it polls
the agent's local UI API (``GET /api/state``) until the offer shows, then posts
``/api/grant`` for that session id. One session carries every relay transfer;
each transfer is one TCP connection to the forward's port, so one tunnel stream.

The two baselines use the same client, service and data, so only the path in
between differs:

* **direct**: client ─TLS─► service (Python's ``ssl``, i.e. OpenSSL, both ends);
* **socat**: client ─TLS─► ``socat OPENSSL-LISTEN`` ─TLS─► service, socat
  verifying the service's certificate against the bench CA. socat gets
  ``-b 65536`` so that it moves the same 64 KiB blocks as everyone else (its
  default, 8 KiB, would make it a weaker baseline than it can be).

A transfer speaks a tiny protocol, so that the clock never includes the TCP and
TLS handshakes or the tunnel's stream open: the client sends ``UP n`` or
``DOWN n``; for ``UP`` the service answers ``GO`` and the client starts its clock
and writes *n* bytes in 64 KiB writes; for ``DOWN`` the service starts its clock
and writes. Time ends at the *receiving* end when the last byte is there (client
and service are threads of this one process, so they share
:func:`time.perf_counter`). The receiver compares every byte with what was sent:
the data is a random pattern whose length is not a multiple of the write size
(so a lost, repeated or reordered block cannot line up by accident), and a
comparison of byte slices runs at memory speed, unlike SHA-256, which on a small
machine would slow the fast baselines more than the relay and flatter the ratio.

Runs are interleaved (direct, socat, relay; up, then down) and repeated; the
median per path and direction is reported. The broker's, agent's and forward's
CPU time is read from ``/proc`` around each relay transfer, giving CPU seconds
per GiB relayed for the capacity model. With *profile_dir*, one extra relay
transfer per direction runs under two ``py-spy record`` samplers of the broker
(speedscope and flamegraph at once, hence ``--nonblocking``: two samplers
cannot both stop the process), and the speedscope samples are aggregated into
a "hottest frames" table.

Every child process is started into its own process group and ended on every
way out (an :class:`contextlib.ExitStack`); a failure raises
:class:`ThroughputError` with the tail of each child's stderr and the broker log.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from bench.results import Goal, Mode, ScenarioResult, Table, fmt_rate, machine
from bench.world import (
    LOOPBACK,
    World,
    free_port,
    sample_process,
    server_tls,
    world,
)
from relay.engineer_client import ApiError, Credentials, api_call

__all__ = ["ThroughputError", "run"]

Direction = Literal["up", "down"]

DIRECTIONS: Final[tuple[Direction, ...]] = ("up", "down")
MIB: Final = 2**20
GIB: Final = 2**30
#: Every sender writes this much per call (the BRIEF's "64 KiB frames").
WRITE_BYTES: Final = 64 * 1024
#: Receivers ask for this much per call.
READ_BYTES: Final = 256 * 1024
#: Random data repeated to make the stream; deliberately not a multiple of the
#: write or read size, so the offset of every block into it keeps shifting.
PATTERN_BYTES: Final = MIB + 4099
VOLUME: Final[dict[Mode, int]] = {"quick": 8 * MIB, "full": 512 * MIB}
WARMUP: Final[dict[Mode, int]] = {"quick": 2 * MIB, "full": 64 * MIB}
REPEATS: Final[dict[Mode, int]] = {"quick": 1, "full": 3}
#: A socket operation that makes no progress for this long fails the run.
IO_TIMEOUT_S: Final = 60.0
#: Deadline for a child to come up (agent online, offer shown, port bound).
READY_TIMEOUT_S: Final = 30.0
#: Deadline for a child to exit after its polite signal, before SIGKILL.
STOP_TIMEOUT_S: Final = 10.0
PY_SPY_RATE: Final = 200
PY_SPY_ATTACH_S: Final = 1.0
HOT_FRAMES: Final = 10
SOCAT: Final = "/usr/bin/socat"

GOAL_FIGURE: Final = "bulk throughput, one session, TLS on both legs, 64 KiB frames"
GOAL_TEXT: Final = ">= 0.5x socat TLS relay"
GOAL_RATIO: Final = 0.5


class ThroughputError(RuntimeError):
    """The scenario could not measure (a child failed, a transfer broke)."""


# --- the data ----------------------------------------------------------------------


class _Pattern:
    """The bytes every transfer sends: a random block, repeated, offset-dependent."""

    def __init__(self) -> None:
        block = os.urandom(PATTERN_BYTES)
        # One extra read's worth at the end, so any slice of up to READ_BYTES that
        # starts inside the block is contiguous.
        self._bytes = block + block[: max(READ_BYTES, WRITE_BYTES)]
        self._view = memoryview(self._bytes)

    def chunk(self, offset: int, size: int) -> memoryview:
        start = offset % PATTERN_BYTES
        return self._view[start : start + size]

    def matches(self, offset: int, received: bytes | bytearray) -> bool:
        # Slicing copies (memcpy) and bytes equality is memcmp: both run at
        # memory speed, where comparing memoryviews goes element by element.
        start = offset % PATTERN_BYTES
        return self._bytes[start : start + len(received)] == received


def _send_pattern(sock: socket.socket, pattern: _Pattern, nbytes: int) -> None:
    sent = 0
    while sent < nbytes:
        size = min(WRITE_BYTES, nbytes - sent)
        sock.sendall(pattern.chunk(sent, size))
        sent += size


def _receive_pattern(sock: socket.socket, pattern: _Pattern, nbytes: int) -> float:
    """Receive exactly *nbytes*, compare every byte; the time the last one came."""
    buffer = bytearray(READ_BYTES)
    view = memoryview(buffer)
    received = 0
    while received < nbytes:
        got = sock.recv_into(view, min(READ_BYTES, nbytes - received))
        if got == 0:
            raise ThroughputError(
                f"the stream ended after {received} of {nbytes} bytes"
            )
        if not pattern.matches(received, buffer[:got]):
            raise ThroughputError(
                f"wrong bytes at offset {received}..{received + got} of {nbytes}"
            )
        received += got
    return time.perf_counter()


def _read_line(sock: socket.socket, limit: int = 64) -> str:
    """One ``\\n``-terminated line, read byte by byte so nothing after it is taken."""
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            raise ThroughputError(
                f"the peer closed before a full line (got {bytes(line)!r})"
            )
        line += byte
        if len(line) > limit:
            raise ThroughputError(f"line too long: {bytes(line)!r}")
    return line.decode("ascii").strip()


# --- the service: the instrument's local port, and the baselines' TLS server -------


@dataclass(frozen=True, slots=True)
class _ServiceSide:
    """What the service saw of one transfer."""

    transfer_id: int
    at: float  # UP: the last byte received; DOWN: just before the first write
    error: str | None


class _Service:
    """A TCP (or TLS) server speaking the transfer protocol; one thread per connection.

    Results go to :attr:`outcomes`, in the order transfers finish.
    """

    def __init__(self, pattern: _Pattern, tls: ssl.SSLContext | None = None) -> None:
        self._pattern = pattern
        self._tls = tls
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port: int = self._listener.getsockname()[1]
        self.outcomes: queue.Queue[_ServiceSide] = queue.Queue()
        self._closing = False
        self._thread = threading.Thread(
            target=self._accept, name="service", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._closing = True
        # shutdown() wakes the accept() blocked in the other thread; close() alone
        # does not on Linux.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(5)

    def _accept(self) -> None:
        while not self._closing:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(
                target=self._serve, args=(connection,), name="service-conn", daemon=True
            ).start()

    def _serve(self, raw: socket.socket) -> None:
        transfer_id = -1
        try:
            raw.settimeout(IO_TIMEOUT_S)
            sock = (
                raw
                if self._tls is None
                else self._tls.wrap_socket(raw, server_side=True)
            )
            with sock:
                verb, id_text, size_text = _read_line(sock).split()
                transfer_id, nbytes = int(id_text), int(size_text)
                if verb == "UP":
                    sock.sendall(b"GO\n")
                    at = _receive_pattern(sock, self._pattern, nbytes)
                    self.outcomes.put(_ServiceSide(transfer_id, at, None))
                    sock.sendall(b"OK\n")
                else:
                    at = time.perf_counter()
                    _send_pattern(sock, self._pattern, nbytes)
                    self.outcomes.put(_ServiceSide(transfer_id, at, None))
                # Wait for the client's close: closing first with unread bytes in
                # the receive buffer would send a reset that can cut the tail.
                while sock.recv(4096):
                    pass
        except (OSError, ValueError, ThroughputError) as exc:
            if not self._closing:
                self.outcomes.put(_ServiceSide(transfer_id, 0.0, f"service: {exc!r}"))


# --- child processes -----------------------------------------------------------------


@dataclass
class _Child:
    """A child process in its own process group, with its stderr in a file."""

    name: str
    process: subprocess.Popen[bytes]
    stderr_file: Path
    stop_signal: signal.Signals = signal.SIGTERM
    stopped: bool = False  # by us: its exit is no failure

    def tail(self, lines: int = 15) -> str:
        return _tail(self.stderr_file, lines)

    def check_alive(self) -> None:
        if not self.stopped and self.process.poll() is not None:
            raise ThroughputError(
                f"{self.name} exited with {self.process.returncode}\n"
                f"--- {self.name} stderr (last lines) ---\n{self.tail()}"
            )

    def stop(self) -> int | None:
        """Politely stop the whole group, then kill it; the child's exit status."""
        self.stopped = True
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, self.stop_signal)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        else:
            # The leader is gone, but socat's forked children may not be.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.returncode


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


class _Children:
    """Every child of the run: started here, stopped in reverse order on exit."""

    def __init__(self, stack: contextlib.ExitStack, log_dir: Path, w: World) -> None:
        self._stack = stack
        self._log_dir = log_dir
        self._world = w
        self.started: list[_Child] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> _Child:
        stderr_file = self._log_dir / f"{name}.stderr"
        with stderr_file.open("wb") as stderr:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=env,
                # Its own group: one signal reaches socat's forked children, and a
                # Ctrl-C at the bench's terminal does not hit the children first.
                start_new_session=True,
            )
        child = _Child(name, process, stderr_file, stop_signal)
        self.started.append(child)
        self._stack.callback(child.stop)
        return child

    def fail(self, message: str) -> ThroughputError:
        """An error naming *message* with every child's and the broker's last words."""
        parts = [message]
        for child in self.started:
            status = child.process.poll()
            state = "running" if status is None else f"exited {status}"
            parts.append(
                f"--- {child.name} ({state}) stderr, last lines ---\n{child.tail()}"
            )
        parts.append(
            f"--- broker log, last lines ---\n{_tail(self._world.broker.log_file, 15)}"
        )
        return ThroughputError("\n".join(parts))

    def check_alive(self) -> None:
        for child in self.started:
            child.check_alive()


def _wait_for(
    what: str,
    probe: Callable[[], Any],
    children: _Children,
    timeout_s: float = READY_TIMEOUT_S,
) -> Any:
    """Call *probe* until it returns something truthy; fail with context otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            children.check_alive()
        except ThroughputError as exc:
            raise children.fail(f"while waiting for {what}: {exc}") from None
        result = probe()
        if result:
            return result
        time.sleep(0.05)
    raise children.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


# --- the relay path: agent, session, grant, forward ------------------------------


def _local_http(url: str, body: object | None = None) -> Any:
    """A JSON call to the agent's UI API as touchscreen software makes it."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method="GET" if data is None else "POST"
    )
    if data is not None:
        request.add_header("Content-Type", "application/json")
    # No proxy: an http_proxy in the environment must not take a loopback call.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as response:
        return json.loads(response.read())


def _device_online(credentials: Credentials, device_id: str) -> bool:
    try:
        devices = api_call(credentials, "GET", "/api/v1/devices")
    except ApiError:
        return False
    return any(d.get("device_id") == device_id and d.get("online") for d in devices)


def _offer_id(ui_url: str) -> str | None:
    with contextlib.suppress(OSError, ValueError):
        offer = _local_http(ui_url + "/api/state").get("offer")
        if isinstance(offer, dict):
            return str(offer["session_id"])
    return None


_FORWARDING: Final = re.compile(rb"forwarding 127\.0\.0\.1:(\d+) to port")


def _forward_port(child: _Child) -> int | None:
    match = _FORWARDING.search(child.stderr_file.read_bytes())
    return int(match.group(1)) if match else None


@dataclass
class _Relay:
    """The running relay path: its children and the forward's local port."""

    port: int
    broker_pid: int
    agent: _Child
    forward: _Child
    session_id: str


def _start_relay(
    w: World, children: _Children, service_port: int, credentials: Credentials
) -> _Relay:
    agent_dir = w.enroll_devices("tput", 1)[0]
    device_id = agent_dir.root.name
    ui_port = free_port()
    agent = children.start(
        "agent",
        [
            sys.executable,
            "-m",
            "relay",
            "agent",
            "run",
            "--broker",
            w.broker.device_url,
            "--dir",
            str(agent_dir.root),
            "--ca-file",
            str(w.ca_file),
            "--ui-listen",
            f"{LOOPBACK}:{ui_port}",
            "--allow-port",
            str(service_port),
            "--shell",
            "",  # only the forwarded port is reachable
        ],
    )
    _wait_for(
        f"device {device_id} online at the broker",
        lambda: _device_online(credentials, device_id),
        children,
    )
    forward = children.start(
        "forward",
        [
            sys.executable,
            "-m",
            "relay",
            "forward",
            device_id,
            f"0:{service_port}",
            "--reason",
            "bench: bulk throughput",
        ],
        env=dict(os.environ, XDG_CONFIG_HOME=str(w.credentials_home(credentials))),
        # SIGINT is how an engineer ends a forward: the CLI ends the session.
        stop_signal=signal.SIGINT,
    )
    ui_url = f"http://{LOOPBACK}:{ui_port}"
    session_id: str = _wait_for(
        "the offer on the device UI", lambda: _offer_id(ui_url), children
    )
    try:
        _local_http(ui_url + "/api/grant", {"session_id": session_id})
    except OSError as exc:
        raise children.fail(f"the device UI refused the grant: {exc}") from None
    port: int = _wait_for(
        "the forward's local port", lambda: _forward_port(forward), children
    )
    return _Relay(port, w.broker.pid, agent, forward, session_id)


def _start_socat(
    children: _Children, cert: Path, key: Path, ca_file: Path, server_port: int
) -> int:
    port = free_port()
    socat = children.start(
        "socat",
        [
            SOCAT,
            "-d",
            "-d",
            "-b",
            str(WRITE_BYTES),
            f"OPENSSL-LISTEN:{port},bind={LOOPBACK},reuseaddr,fork,"
            f"cert={cert},key={key},verify=0",
            f"OPENSSL:{LOOPBACK}:{server_port},cafile={ca_file},verify=1,"
            "commonname=localhost",
        ],
    )
    _wait_for(
        "socat to listen",
        lambda: b"listening on" in socat.stderr_file.read_bytes(),
        children,
    )
    return port


# --- the machine's other load ---------------------------------------------------------

_TICK_S: Final = 1 / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class _CpuSnapshot:
    """CPU seconds so far: the whole machine's user+system, and this process tree's."""

    machine_s: float
    steal_s: float
    tree_s: float


def _cpu_snapshot() -> _CpuSnapshot:
    """Read ``/proc/stat`` and the stat of every process descending from this one.

    The benchmark shares a small machine with whatever else runs on it; what the
    rest of the machine used during a transfer (machine minus our tree) says
    whether a figure was starved. Interrupt time is left out on both sides: with
    IRQ time accounting, loopback's softirq work is charged to no process.
    Children that exited and were reaped are in their parent's ``cutime``.
    """
    values = [
        int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ]
    user, nice, system, steal = values[0], values[1], values[2], values[7]
    parents: dict[int, int] = {}
    cpu: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        # utime, stime, cutime, cstime: fields 14-17 of stat(5).
        cpu[pid] = sum(int(f) for f in fields[11:15])
    me = os.getpid()
    tree = 0
    for pid, ticks in cpu.items():
        ancestor = pid
        while ancestor not in (me, 0, 1) and ancestor in parents:
            ancestor = parents[ancestor]
        if ancestor == me:
            tree += ticks
    return _CpuSnapshot(
        machine_s=(user + nice + system) * _TICK_S,
        steal_s=steal * _TICK_S,
        tree_s=tree * _TICK_S,
    )


# --- one transfer ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Transfer:
    path: str
    direction: Direction
    run: str  # "warm-up", "1", "2", ..., "profile"
    nbytes: int
    seconds: float
    cpu_s: dict[str, float] = field(default_factory=dict)
    #: CPU the rest of the machine used meanwhile, in cores (0: we had it alone).
    other_cores: float = 0.0
    steal_cores: float = 0.0

    @property
    def rate(self) -> float:
        return self.nbytes / self.seconds


class _Runner:
    """Runs transfers over any of the three paths and keeps their results."""

    def __init__(self, pattern: _Pattern, children: _Children) -> None:
        self._pattern = pattern
        self._children = children
        self._next_id = 0
        self.transfers: list[_Transfer] = []

    def transfer(
        self,
        path: str,
        direction: Direction,
        nbytes: int,
        *,
        run: str,
        connect: Callable[[], socket.socket],
        service: _Service,
        cpu_of: dict[str, int] | None = None,
    ) -> _Transfer:
        self._next_id += 1
        transfer_id = self._next_id
        before = {
            name: sample_process(pid).cpu_s for name, pid in (cpu_of or {}).items()
        }
        machine_before, window_start = _cpu_snapshot(), time.perf_counter()
        try:
            seconds = self._once(transfer_id, direction, nbytes, connect, service)
        except (OSError, ValueError, ThroughputError) as exc:
            raise self._children.fail(
                f"{path} {direction} transfer of {nbytes} bytes failed: {exc!r}"
            ) from exc
        machine_after, window = _cpu_snapshot(), time.perf_counter() - window_start
        cpu = {
            name: sample_process(pid).cpu_s - before[name]
            for name, pid in (cpu_of or {}).items()
        }
        # Over the whole window (connect to close), slightly longer than the
        # timed part; an average, so a short burst of other load is diluted.
        wall = max(window, 1e-9)
        other = (machine_after.machine_s - machine_before.machine_s) - (
            machine_after.tree_s - machine_before.tree_s
        )
        steal = machine_after.steal_s - machine_before.steal_s
        result = _Transfer(
            path,
            direction,
            run,
            nbytes,
            seconds,
            cpu,
            other_cores=max(0.0, other / wall),
            steal_cores=steal / wall,
        )
        self.transfers.append(result)
        return result

    def _once(
        self,
        transfer_id: int,
        direction: Direction,
        nbytes: int,
        connect: Callable[[], socket.socket],
        service: _Service,
    ) -> float:
        with connect() as sock:
            sock.settimeout(IO_TIMEOUT_S)
            verb = "UP" if direction == "up" else "DOWN"
            sock.sendall(f"{verb} {transfer_id} {nbytes}\n".encode())
            if direction == "up":
                if (answer := _read_line(sock)) != "GO":
                    raise ThroughputError(f"expected GO, got {answer!r}")
                started = time.perf_counter()
                _send_pattern(sock, self._pattern, nbytes)
                if (answer := _read_line(sock)) != "OK":
                    raise ThroughputError(f"expected OK, got {answer!r}")
                side = self._service_side(service, transfer_id)
                return side.at - started
            ended = _receive_pattern(sock, self._pattern, nbytes)
        side = self._service_side(service, transfer_id)
        return ended - side.at

    @staticmethod
    def _service_side(service: _Service, transfer_id: int) -> _ServiceSide:
        try:
            side = service.outcomes.get(timeout=IO_TIMEOUT_S)
        except queue.Empty:
            raise ThroughputError("the service reported nothing") from None
        if side.error is not None:
            raise ThroughputError(side.error)
        if side.transfer_id != transfer_id:
            raise ThroughputError(
                f"the service reported transfer {side.transfer_id}, expected {transfer_id}"
            )
        return side


# --- profiles ----------------------------------------------------------------------------


PY_SPY: Final = Path(sys.executable).with_name("py-spy")
_REPO: Final = str(Path(__file__).resolve().parents[1])


@contextlib.contextmanager
def _profiled(
    children: _Children, pid: int, out_dir: Path, stem: str
) -> Iterator[tuple[Path, Path]]:
    """Two ``py-spy record`` samplers of *pid* for the block: speedscope and SVG."""
    speedscope = out_dir / f"{stem}.speedscope.json"
    svg = out_dir / f"{stem}.svg"
    samplers = [
        children.start(
            f"py-spy-{stem}-{fmt}",
            [
                str(PY_SPY),
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(PY_SPY_RATE),
                "--format",
                fmt,
                "--output",
                str(output),
                "--nonblocking",
            ],
            # py-spy writes its output when interrupted, as after Ctrl-C.
            stop_signal=signal.SIGINT,
        )
        for fmt, output in (("speedscope", speedscope), ("flamegraph", svg))
    ]
    # py-spy says nothing when it has attached unless it writes to a terminal;
    # it attaches in milliseconds, and one that cannot attach exits at once.
    time.sleep(PY_SPY_ATTACH_S)
    try:
        children.check_alive()
    except ThroughputError as exc:
        raise children.fail(f"py-spy could not attach to the broker: {exc}") from None
    yield speedscope, svg
    for sampler in samplers:
        status = sampler.stop()
        if status not in (0, -signal.SIGINT):
            raise children.fail(f"{sampler.name} exited with {status}")
    for output in (speedscope, svg):
        if not output.is_file():
            raise children.fail(f"py-spy wrote no {output}")


@dataclass(frozen=True, slots=True)
class _Frame:
    function: str
    file: str


def _hot_frames(speedscope: Path) -> tuple[int, list[tuple[_Frame, int, int, int]]]:
    """Samples in total, and per function: own samples, inclusive samples, hottest line.

    Own time is the leaf of each sample's stack; inclusive time counts a
    function once per sample wherever it is on the stack (recursion aside).
    """
    document = json.loads(speedscope.read_text())
    frames = document["shared"]["frames"]
    # Counted in samples: py-spy's weights are all 1 / rate seconds.
    own: Counter[_Frame] = Counter()
    inclusive: Counter[_Frame] = Counter()
    own_lines: Counter[tuple[_Frame, int]] = Counter()
    total = 0
    for profile in document["profiles"]:
        for stack in profile["samples"]:
            if not stack:
                continue
            count = 1
            total += count
            # speedscope lists a sample's stack from the root to the leaf.
            leaf = frames[stack[-1]]
            key = _Frame(str(leaf["name"]), _short_file(str(leaf.get("file", ""))))
            own[key] += count
            own_lines[key, int(leaf.get("line") or 0)] += count
            for seen in {
                _Frame(
                    str(frames[i]["name"]), _short_file(str(frames[i].get("file", "")))
                )
                for i in stack
            }:
                inclusive[seen] += count
    rows: list[tuple[_Frame, int, int, int]] = []
    for key, count in own.most_common(HOT_FRAMES):
        line = max(
            ((ln, c) for (f, ln), c in own_lines.items() if f == key),
            key=lambda x: x[1],
        )[0]
        rows.append((key, count, inclusive[key], line))
    return total, rows


def _short_file(path: str) -> str:
    """A frame's file relative to site-packages or the repository, for reading."""
    for marker in (
        "site-packages/",
        f"/lib/python{sys.version_info[0]}.{sys.version_info[1]}/",
        f"{_REPO}/",
    ):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


# --- the scenario ----------------------------------------------------------------------


def _median_rates(transfers: Sequence[_Transfer]) -> dict[tuple[str, str], float]:
    grouped: dict[tuple[str, str], list[float]] = {}
    for t in transfers:
        if t.run.isdigit():
            grouped.setdefault((t.path, t.direction), []).append(t.rate)
    return {key: statistics.median(rates) for key, rates in grouped.items()}


def _cpu_per_gib(transfers: Sequence[_Transfer]) -> dict[tuple[str, str], float]:
    """CPU seconds per GiB of each relay process, per direction, over the timed runs."""
    seconds: dict[tuple[str, str], float] = {}
    volume: Counter[str] = Counter()
    for t in transfers:
        if t.path == "relay" and t.run.isdigit():
            volume[t.direction] += t.nbytes
            for name, cpu in t.cpu_s.items():
                seconds[name, t.direction] = seconds.get((name, t.direction), 0.0) + cpu
    return {
        (name, direction): cpu / volume[direction] * GIB
        for (name, direction), cpu in seconds.items()
    }


def _machine() -> str:
    m = machine()
    return (
        f"{m['cores']} CPUs ({m['cpu']}), Linux {m['kernel']}, "
        f"Python {m['python']}, {m['openssl']}"
    )


def run(mode: Mode, *, profile_dir: Path | None = None) -> ScenarioResult:
    """Bulk throughput through one session (see the module docstring)."""
    volume, warmup, repeats = VOLUME[mode], WARMUP[mode], REPEATS[mode]
    pattern = _Pattern()
    with contextlib.ExitStack() as stack:
        plain_service = _Service(pattern)
        stack.callback(plain_service.close)
        w = stack.enter_context(
            world(
                config={"sessions": {"allowed_channels": [f"tcp:{plain_service.port}"]}}
            )
        )
        log_dir = w.root / "throughput"
        log_dir.mkdir()
        children = _Children(stack, log_dir, w)
        server_ctx, client_ctx, cert, key = server_tls(w.root, w.ca_file, w.data_dir)
        tls_service = _Service(pattern, server_ctx)
        stack.callback(tls_service.close)
        w.broker.start()
        credentials = w.login(w.add_engineer())
        socat_port = _start_socat(children, cert, key, w.ca_file, tls_service.port)
        relay = _start_relay(w, children, plain_service.port, credentials)
        cpu_of = {
            "broker": relay.broker_pid,
            "agent": relay.agent.process.pid,
            "forward": relay.forward.process.pid,
        }

        def tls_to(port: int) -> Callable[[], socket.socket]:
            def connect() -> socket.socket:
                raw = socket.create_connection((LOOPBACK, port), timeout=IO_TIMEOUT_S)
                return client_ctx.wrap_socket(raw, server_hostname="localhost")

            return connect

        def plain_to(port: int) -> Callable[[], socket.socket]:
            return lambda: socket.create_connection(
                (LOOPBACK, port), timeout=IO_TIMEOUT_S
            )

        paths: list[
            tuple[str, Callable[[], socket.socket], _Service, dict[str, int] | None]
        ] = [
            ("direct", tls_to(tls_service.port), tls_service, None),
            ("socat", tls_to(socat_port), tls_service, None),
            ("relay", plain_to(relay.port), plain_service, cpu_of),
        ]
        runner = _Runner(pattern, children)
        # The warm-up opens every path once (TLS session set-up, the tunnel's
        # first stream, Python's code paths) before anything is timed.
        runs = ["warm-up", *(str(i + 1) for i in range(repeats))]
        for run_name in runs:
            nbytes = warmup if run_name == "warm-up" else volume
            for direction in DIRECTIONS:
                for name, connect, service, cpu in paths:
                    runner.transfer(
                        name,
                        direction,
                        nbytes,
                        run=run_name,
                        connect=connect,
                        service=service,
                        cpu_of=cpu,
                    )

        profiles: dict[str, Any] = {}
        if profile_dir is not None:
            profile_dir.mkdir(parents=True, exist_ok=True)
            relay_path = paths[2]
            for direction in DIRECTIONS:
                with _profiled(
                    children, relay.broker_pid, profile_dir, f"broker-{direction}"
                ) as (speedscope, svg):
                    runner.transfer(
                        "relay",
                        direction,
                        volume,
                        run="profile",
                        connect=relay_path[1],
                        service=plain_service,
                        cpu_of=cpu_of,
                    )
                profiles[direction] = (speedscope, svg, *_hot_frames(speedscope))

        # The engineer ends the forward (Ctrl-C); an orderly end is part of a
        # correct run, so its exit status is checked rather than ignored.
        if (status := relay.forward.stop()) != 0:
            raise children.fail(f"relay forward ended with exit status {status}")
        return _result(mode, runner.transfers, profiles, volume, repeats)
    raise AssertionError("unreachable")  # pragma: no cover - ExitStack does not swallow


def _result(
    mode: Mode,
    transfers: list[_Transfer],
    profiles: dict[str, Any],
    volume: int,
    repeats: int,
) -> ScenarioResult:
    median = _median_rates(transfers)
    up, down = median["relay", "up"], median["relay", "down"]
    ratios = {
        (base, d): median["relay", d] / median[base, d]
        for base in ("socat", "direct")
        for d in ("up", "down")
    }
    worst = min(ratios["socat", "up"], ratios["socat", "down"])
    goal = Goal(
        figure=GOAL_FIGURE,
        goal=GOAL_TEXT,
        measured=f"{fmt_rate(up)} up, {fmt_rate(down)} down",
        baseline=(
            f"socat TLS relay {fmt_rate(median['socat', 'up'])} up, "
            f"{fmt_rate(median['socat', 'down'])} down"
        ),
        ratio=round(worst, 3),
        met=worst >= GOAL_RATIO,
    )
    rates = Table(
        title=f"Bulk throughput, one stream, median of {repeats} x {volume // MIB} MiB per direction",
        columns=(
            "path",
            "upload",
            "download",
            "relay / path, up",
            "relay / path, down",
        ),
        rows=tuple(
            (
                {
                    "direct": "direct TLS (no relay)",
                    "socat": "socat TLS -> TLS relay",
                    "relay": "relay: forward -> broker -> agent",
                }[name],
                fmt_rate(median[name, "up"]),
                fmt_rate(median[name, "down"]),
                f"{median['relay', 'up'] / median[name, 'up']:.2f}",
                f"{median['relay', 'down'] / median[name, 'down']:.2f}",
            )
            for name in ("direct", "socat", "relay")
        ),
    )
    runs = Table(
        title="Every transfer",
        columns=("path", "direction", "run", "MiB", "seconds", "rate", "other load"),
        rows=tuple(
            (
                t.path,
                t.direction,
                t.run,
                f"{t.nbytes / MIB:.0f}",
                f"{t.seconds:.3f}",
                fmt_rate(t.rate),
                f"{t.other_cores:.2f} cores",
            )
            for t in transfers
        ),
    )
    cpu = _cpu_per_gib(transfers)
    cpu_table = Table(
        title="CPU seconds per GiB relayed (timed relay runs)",
        columns=("process", "upload", "download"),
        rows=tuple(
            (name, f"{cpu[name, 'up']:.2f} s", f"{cpu[name, 'down']:.2f} s")
            for name in ("broker", "agent", "forward")
        ),
    )
    tables = [rates, cpu_table]
    raw_profiles: dict[str, Any] = {}
    for direction, (speedscope, svg, total, hot) in profiles.items():
        profile_rate = next(
            t.rate for t in transfers if t.run == "profile" and t.direction == direction
        )
        tables.append(
            Table(
                title=(
                    f"Hottest frames in the broker, {direction}load under py-spy "
                    f"({total} samples at {PY_SPY_RATE} Hz, {fmt_rate(profile_rate)} while sampled)"
                ),
                columns=("function", "file:line", "own", "inclusive"),
                rows=tuple(
                    (
                        frame.function,
                        f"{frame.file}:{line}",
                        f"{own / total:.1%}",
                        f"{incl / total:.1%}",
                    )
                    for frame, own, incl, line in hot
                ),
            )
        )
        raw_profiles[direction] = {
            "speedscope": str(speedscope),
            "flamegraph": str(svg),
            "samples": total,
            "hot": [
                {
                    "function": f.function,
                    "file": f.file,
                    "line": line,
                    "own": own,
                    "inclusive": incl,
                }
                for f, own, incl, line in hot
            ],
        }
    tables.append(runs)
    return ScenarioResult(
        name="throughput",
        title="Bulk throughput through one session",
        tables=tables,
        goals=[goal],
        notes=[
            f"Machine: {_machine()}. Every process of a path (client and service in "
            "the bench process; forward, broker and agent, or socat) shares these CPUs.",
            "Other processes on the machine used up to "
            f"{max(t.other_cores for t in transfers):.2f} cores during a transfer "
            f"(mean {statistics.mean(t.other_cores for t in transfers):.2f}); "
            "'other load' per transfer in the last table. Figures taken under "
            "other load understate every path, the Python relay most (it needs "
            "more CPU per byte).",
            "The relay path is the real `relay forward`, `relay serve` and "
            "`relay agent run` processes, TLS on both legs, the session granted "
            "through the agent's UI API; 64 KiB writes everywhere; time and every "
            "byte checked at the receiving end.",
            f"socat {SOCAT} runs with -b {WRITE_BYTES} (its default block is 8 KiB).",
            f"Ratio = the worse direction's relay/socat; relay/direct: "
            f"{ratios['direct', 'up']:.2f} up, {ratios['direct', 'down']:.2f} down.",
        ],
        raw={
            "mode": mode,
            "volume_bytes": volume,
            "repeats": repeats,
            "write_bytes": WRITE_BYTES,
            "median_bytes_per_s": {f"{p}_{d}": r for (p, d), r in median.items()},
            "ratios": {f"relay_over_{b}_{d}": r for (b, d), r in ratios.items()},
            "cpu_s_per_gib": {f"{p}_{d}": v for (p, d), v in cpu.items()},
            "transfers": [
                {
                    "path": t.path,
                    "direction": t.direction,
                    "run": t.run,
                    "bytes": t.nbytes,
                    "seconds": t.seconds,
                    "cpu_s": t.cpu_s,
                    "other_cores": t.other_cores,
                    "steal_cores": t.steal_cores,
                }
                for t in transfers
            ],
            "profiles": raw_profiles,
            "machine": _machine(),
        },
    )


if __name__ == "__main__":  # a direct run, for working on this scenario alone
    import argparse

    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--mode", choices=["quick", "full"], default="quick")
    parser.add_argument("--profile-dir", type=Path)
    args = parser.parse_args()
    started = time.monotonic()
    outcome = run(args.mode, profile_dir=args.profile_dir)
    for table in outcome.tables:
        print(f"\n{table.title}\n  " + " | ".join(table.columns))
        for row in table.rows:
            print("  " + " | ".join(row))
    for g in outcome.goals:
        print(
            f"\ngoal: {g.figure}: {g.measured} vs {g.baseline}; ratio {g.ratio} met={g.met}"
        )
    for note in outcome.notes:
        print(f"note: {note}")
    print(f"({time.monotonic() - started:.1f} s)")
