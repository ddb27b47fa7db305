"""The benchmark's world: a data dir, a real ``relay serve`` process, devices, an engineer.

Theory of operation
===================
Every scenario measures the product as an operator runs it: the broker is the
``relay serve`` command in its own process, configured by a TOML file like a
deployment, on fixed loopback ports (so a restart, as in the reconnect storm,
comes back where the devices look for it). The benchmark process plays
everybody else: it creates the device CA, signs device certificates through the
same profile as ``relay ca sign`` and records them in the store, creates an
engineer account and logs in over HTTPS with a real TOTP code.

Nothing here is measured; it only builds and tears down. The broker's own cost
is read from ``/proc`` (:meth:`BrokerProcess.sample`) because the load
generators and the benchmark process share the machine with it.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import pyotp
from cryptography.hazmat.primitives import serialization

import auth
from relay import store as store_module
from relay.config_file import toml_value
from relay.engineer_client import Credentials, login
from relay.enrollment import record_certificate
from relay.pki_files import (
    AgentDir,
    DataDir,
    init_ca,
    load_ca,
    load_or_create_sealing_key,
)
from relay.users import create_user

LOOPBACK: Final = "127.0.0.1"
READY_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 15.0
METRICS_TIMEOUT_S: Final = 60.0
#: The allocator the broker is deployed with (Containerfile, the systemd unit):
#: jemalloc, preloaded. Under session churn glibc's malloc keeps the broker's
#: freed memory resident (its live heap stays flat while its RSS grows; see
#: reliability/README), so the benchmarks and the soak measure the broker as
#: it runs in the field. ``RELAY_BENCH_MALLOC=glibc`` measures it without.
BROKER_PRELOAD: Final = "libjemalloc.so.2"
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
    return port


@dataclass(frozen=True, slots=True)
class ProcessSample:
    """One look at a process: resident memory and CPU time used so far."""

    rss_bytes: int
    cpu_s: float
    at: float  # time.monotonic()


def sample_process(pid: int) -> ProcessSample:
    """RSS and user+system CPU of *pid* from ``/proc`` (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # Fields after the command name start at field 3 (state): utime is 14, stime 15.
    cpu_ticks = int(fields[11]) + int(fields[12])
    rss_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return ProcessSample(
        rss_bytes=rss_pages * _PAGE_SIZE,
        cpu_s=cpu_ticks / _CLOCK_TICKS,
        at=time.monotonic(),
    )


def toml_text(config: Mapping[str, Any]) -> str:
    """A broker config file: top-level keys, then one table per nested mapping."""
    lines = [
        f"{k} = {toml_value(v)}" for k, v in config.items() if not isinstance(v, dict)
    ]
    for table, keys in config.items():
        if isinstance(keys, dict):
            lines.append(f"\n[{table}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in keys.items())
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class Engineer:
    """An engineer account the benchmark made, with what it takes to log in."""

    username: str
    password: str
    totp_secret: str


@dataclass
class BrokerProcess:
    """``relay serve --config FILE`` as a child process on fixed ports."""

    config_file: Path
    data_dir: Path
    device_port: int
    engineer_port: int
    metrics_port: int
    log_file: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    #: How Python is started: e.g. ``[python, "-m", "cProfile", "-o", FILE]``
    #: for a deterministic profile written when the broker stops.
    python: tuple[str, ...] = (sys.executable,)
    #: Reads of /metrics that failed (see :meth:`metrics`).
    metrics_failures: list[str] = field(default_factory=list)

    @property
    def device_url(self) -> str:
        return f"wss://{LOOPBACK}:{self.device_port}"

    @property
    def engineer_url(self) -> str:
        return f"https://{LOOPBACK}:{self.engineer_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("the broker is not running")
        return self.process.pid

    @property
    def allocator(self) -> str:
        """The running broker's malloc, from what it has mapped: "jemalloc" or "glibc"."""
        maps = Path(f"/proc/{self.pid}/maps").read_text()
        return "jemalloc" if "libjemalloc" in maps else "glibc"

    def start(self) -> None:
        """Start the broker and wait until ``/readyz`` answers 200."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("the broker is already running")
        self.starts += 1
        env = dict(os.environ, RELAY_DATA_DIR=str(self.data_dir))
        if (
            os.environ.get("RELAY_BENCH_MALLOC") != "glibc"
            and ctypes.util.find_library("jemalloc") is not None
        ):
            env["LD_PRELOAD"] = " ".join(
                filter(None, [BROKER_PRELOAD, env.get("LD_PRELOAD")])
            )
        python = self.python
        if profiles := os.environ.get("RELAY_BENCH_CPROFILE_DIR"):
            # A deterministic profile of every broker the benchmark starts,
            # written when it stops (bench/README.md).
            out = Path(profiles) / f"broker-{os.getpid()}-{id(self)}-{self.starts}.prof"
            python = (*python, "-m", "cProfile", "-o", str(out))
        elif memray := os.environ.get("RELAY_BENCH_MEMRAY_DIR"):
            # A native-stack memory profile (memray), for leaks below Python.
            out = Path(memray) / f"broker-{os.getpid()}-{id(self)}-{self.starts}.bin"
            python = (
                *python,
                "-m",
                "memray",
                "run",
                "--native",
                "--follow-fork",
                "-q",
                "-o",
                str(out),
            )
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    *python,
                    "-m",
                    "relay",
                    "serve",
                    "--config",
                    str(self.config_file),
                ],
                stdout=subprocess.DEVNULL,  # the audit mirror; the log file keeps stderr
                stderr=log,
                env=env,
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"relay serve exited with {self.process.returncode}; see {self.log_file}"
                )
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.metrics_url + "/readyz", timeout=2) as r,
            ):
                if r.status == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"relay serve not ready within {READY_TIMEOUT_S} s")

    def stop(self) -> None:
        """SIGTERM (orderly stop), SIGKILL if it does not go within the budget."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def sample(self) -> ProcessSample:
        return sample_process(self.pid)

    def write_node_config(
        self,
        node_id: str,
        *,
        database_url: str,
        redis_url: str,
        cluster: Mapping[str, Any] | None = None,
        sessions: Mapping[str, Any] | None = None,
    ) -> None:
        """Its config file as one node of a fleet: the shared database and
        Redis, its own id, its device listener as its advertised address."""
        self.config_file.write_text(
            toml_text(
                {
                    "data_dir": str(self.data_dir),
                    "device_listen": f"{LOOPBACK}:{self.device_port}",
                    "engineer_listen": f"{LOOPBACK}:{self.engineer_port}",
                    "metrics_listen": f"{LOOPBACK}:{self.metrics_port}",
                    "database_url": database_url,
                    "cluster": {
                        "redis_url": redis_url,
                        "node_id": node_id,
                        "advertise_device_url": self.device_url,
                        **(cluster or {}),
                    },
                    "sessions": dict(sessions or {}),
                }
            )
        )

    def metrics(self) -> str:
        """The broker's Prometheus text; "" when it does not answer in time.

        A broker saturated by thousands of channels can take long to answer
        (its metrics listener shares the event loop): that is recorded as
        missing counters and said on stderr, not a failed benchmark.
        """
        try:
            with urllib.request.urlopen(
                self.metrics_url + "/metrics", timeout=METRICS_TIMEOUT_S
            ) as r:
                text: str = r.read().decode()
        except OSError as exc:
            self.metrics_failures.append(repr(exc))
            print(f"bench: broker metrics unavailable: {exc!r}", file=sys.stderr)
            return ""
        return text


@dataclass
class World:
    """One benchmark run's files, broker and accounts (see the module docstring)."""

    root: Path
    config: dict[str, Any] = field(default_factory=dict)
    broker: BrokerProcess = field(init=False)
    _engineer_seq: int = 0

    def __post_init__(self) -> None:
        self.data_dir = self.root / "broker"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        now = datetime.now(UTC)
        init_ca(DataDir(self.data_dir), now=now, lifetime=timedelta(days=730))
        self.broker = BrokerProcess(
            config_file=self.root / "relay.toml",
            data_dir=self.data_dir,
            device_port=free_port(),
            engineer_port=free_port(),
            metrics_port=free_port(),
            log_file=self.root / "broker.log",
        )
        self.write_config()

    @property
    def ca_file(self) -> Path:
        return DataDir(self.data_dir).ca_cert

    def write_config(self, **tables: Mapping[str, Any]) -> None:
        """(Re)write the broker's config file; *tables* are merged over the base."""
        config: dict[str, Any] = {
            "data_dir": str(self.data_dir),
            "device_listen": f"{LOOPBACK}:{self.broker.device_port}",
            "engineer_listen": f"{LOOPBACK}:{self.broker.engineer_port}",
            "metrics_listen": f"{LOOPBACK}:{self.broker.metrics_port}",
        }
        for name, keys in self.config.items():
            config[name] = dict(keys)
        for name, keys in tables.items():
            config.setdefault(name, {}).update(keys)
        self.config = {k: v for k, v in config.items() if isinstance(v, dict)}
        self.broker.config_file.write_text(toml_text(config))

    def add_node(self, node_id: str) -> BrokerProcess:
        """Another broker of the same fleet, on ports of its own: its own data
        dir with this world's CA and TOTP sealing key copied into it, as an
        operator shares them (write its config with ``write_node_config``)."""
        load_or_create_sealing_key(DataDir(self.data_dir), None)
        data_dir = self.root / node_id
        for part in ("ca", "secrets"):
            shutil.copytree(self.data_dir / part, data_dir / part)
        return BrokerProcess(
            config_file=self.root / f"{node_id}.toml",
            data_dir=data_dir,
            device_port=free_port(),
            engineer_port=free_port(),
            metrics_port=free_port(),
            log_file=self.root / f"{node_id}.log",
        )

    def _store(self) -> contextlib.closing[store_module.Store]:
        from relay.config_file import load_config

        url = load_config(self.broker.config_file, {}).effective_database_url
        return contextlib.closing(store_module.Store.open(url))

    def enroll_devices(self, prefix: str, count: int) -> list[AgentDir]:
        """Sign and record *count* device certificates, one agent dir each.

        One key serves every device of a batch (each has its own certificate and
        id): key generation is not what the broker's capacity depends on, and
        10,000 keys would only slow the set-up.
        """
        ca = load_ca(DataDir(self.data_dir))
        now = datetime.now(UTC)
        key = auth.generate_private_key()
        key_pem = auth.private_key_pem(key)
        dirs: list[AgentDir] = []
        identities: list[auth.DeviceIdentity] = []
        for index in range(count):
            device_id = f"{prefix}-{index:05d}"
            signed = auth.sign_device_csr(
                ca,
                auth.build_device_csr(key, device_id),
                now=now,
                # Outside the agents' 30-day renewal window: a benchmark device
                # must not spend its first minutes asking for a new certificate.
                lifetime=timedelta(days=365),
                max_csr_bytes=16384,
            )
            agent = AgentDir(self.root / "devices" / device_id)
            agent.root.mkdir(parents=True, exist_ok=True)
            agent.key.write_bytes(key_pem)
            agent.key.chmod(0o600)
            agent.cert.write_bytes(signed.certificate_pem())
            dirs.append(agent)
            identities.append(signed.identity)
        with self._store() as store:
            for identity in identities:
                record_certificate(store, identity, issued_at=now)
        return dirs

    def add_engineer(self, role: str = "engineer") -> Engineer:
        """A new account of *role* (argon2 hash and sealed TOTP secret, as
        `relay user add`)."""
        self._engineer_seq += 1
        username = f"bench{self._engineer_seq}"
        password = secrets.token_urlsafe(18)
        key, _source = load_or_create_sealing_key(DataDir(self.data_dir), None)
        with self._store() as store:
            new = create_user(
                store,
                auth.PasswordHasher(),
                auth.SecretSealer(key),
                username=username,
                role=role,
                password=password,
                now=datetime.now(UTC),
            )
        secret = pyotp.parse_uri(new.otpauth_uri).secret
        return Engineer(username=username, password=password, totp_secret=secret)

    def login(self, engineer: Engineer) -> Credentials:
        """Log in over HTTPS with the password and the current TOTP code."""
        return login(
            self.broker.engineer_url,
            username=engineer.username,
            password=engineer.password,
            totp=pyotp.TOTP(engineer.totp_secret).now(),
            ca_file=self.ca_file,
        )

    def credentials_home(self, credentials: Credentials) -> Path:
        """An XDG config home holding *credentials*, for `relay forward` processes."""
        from relay.engineer_client import save_credentials

        home = self.root / "xdg"
        save_credentials(credentials, home / "relay" / "credentials.json")
        return home


def server_tls(
    root: Path, ca_file: Path, data_dir: Path
) -> tuple[ssl.SSLContext, ssl.SSLContext, Path, Path]:
    """A TLS server certificate from the bench CA, for the baselines.

    Returns the server context, a client context trusting the CA, and the
    certificate and key files (for socat).
    """
    ca = load_ca(DataDir(data_dir))
    now = datetime.now(UTC)
    key, certificate = auth.issue_server_certificate(
        ca, names=["localhost", LOOPBACK], now=now, lifetime=timedelta(days=1)
    )
    cert_file, key_file = root / "baseline.crt", root / "baseline.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(auth.private_key_pem(key))
    key_file.chmod(0o600)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cafile=str(ca_file))
    return server, client, cert_file, key_file


@contextlib.contextmanager
def world(
    config: Mapping[str, Mapping[str, Any]] | None = None, keep: Path | None = None
) -> Iterator[World]:
    """A fresh world in a temporary directory (or *keep*), its broker stopped at the end."""
    with contextlib.ExitStack() as stack:
        root = keep or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="relay-bench-"))
        )
        w = World(root=root)
        if config:
            w.write_config(**config)
        try:
            yield w
        finally:
            w.broker.stop()


def percentiles(
    samples: Sequence[float], points: Sequence[float] = (50, 90, 99)
) -> dict[str, float]:
    """Nearest-rank percentiles and the maximum of *samples* (empty: all NaN)."""
    ordered = sorted(samples)
    out: dict[str, float] = {}
    for p in points:
        if not ordered:
            out[f"p{p:g}"] = float("nan")
            continue
        rank = max(1, -(-len(ordered) * p // 100))  # ceil(n * p / 100)
        out[f"p{p:g}"] = ordered[int(rank) - 1]
    out["max"] = ordered[-1] if ordered else float("nan")
    return out
