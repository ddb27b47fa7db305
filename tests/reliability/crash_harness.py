"""Broker, device and engineer as separate actors, for the crash and audit-sink faults.

Theory of operation
===================
The broker is ``relay serve`` in its own process on fixed loopback ports
(:class:`bench.world.BrokerProcess`, so a restarted broker comes back where the
device looks for it). The device is ``relay agent run`` in its own process, its
JSON log in a file the tests read. The engineer is the test process: it logs in
over HTTPS with a real TOTP code (once: the token is in the broker's store and
outlives a broker restart), asks for a ``tcp:PORT`` session with ``relay
forward``'s engine, and the person at the device presses Allow on the agent's
device UI. Behind the agent, a local service on the instrument sends until its
connection is closed and notes when that happened: the device's local stream.

A :class:`LiveSession` is in use once a mebibyte has come through the forward;
the tests then break something (kill the broker, fill its disk) and read the
times off the actors.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
import trio

from bench.world import LOOPBACK, World, toml_text
from relay._trio.engineer_session import SessionOutcome, run_session
from relay.audit_reader import read_records
from relay.config import AgentConfig
from relay.engineer_client import Credentials
from tests.e2e.test_engineer_cli_session import forward_to
from tests.e2e.test_graceful_shutdown import (
    LocalService,
    grant_on_the_device_ui,
    use_forward,
)

DEVICE_ID: Final = "crash-00000"
#: The agent's reconnect settings where the backoff is measured (E10): the
#: documented defaults (base 1 s, cap 60 s, full jitter), except that a
#: connection counts as stable after 1 s instead of 60 s, so that each repeat
#: starts from the first step of the backoff.
AGENT_CONFIG: Final = AgentConfig(stable_after_s=1.0)
#: Where it is not measured (E11, E12): quick retries, so that a restarted
#: broker has its device back at once.
FAST_AGENT_CONFIG: Final = AgentConfig(
    backoff_base_s=0.05, backoff_cap_s=0.5, stable_after_s=0.5
)
AGENT_START_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 15.0
#: How long a session may take to be requested, granted and carry its first MiB.
SESSION_START_TIMEOUT_S: Final = 30.0


@dataclass
class Agent:
    """A ``relay agent run`` process and its JSON log."""

    process: subprocess.Popen[bytes]
    log_file: Path
    ui_url: str = ""

    def lines(self) -> list[dict[str, Any]]:
        """Every JSON line the agent logged so far (plain lines are skipped)."""
        out: list[dict[str, Any]] = []
        for line in self.log_file.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def events(self, name: str, *, after: float = 0.0) -> list[dict[str, Any]]:
        """The agent's log events called *name*, logged after wall time *after*."""
        return [
            line
            for line in self.lines()
            if line.get("event") == name and wall_time(line) > after
        ]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not go in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def epoch(stamp: str) -> float:
    """An ISO 8601 UTC time of a log line or audit record as epoch seconds."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def wall_time(line: dict[str, Any]) -> float:
    """The wall-clock time (epoch seconds) of a structured log line."""
    stamp = str(line.get("timestamp", ""))
    return epoch(stamp) if stamp else 0.0


def start_agent(
    world: World,
    service_port: int,
    config: AgentConfig,
    broker_url: str | None = None,
) -> Agent:
    """Enroll the device and start its agent against the world's broker (or
    *broker_url*), with the reconnect settings of *config*."""
    [agent_dir] = world.enroll_devices(DEVICE_ID.rsplit("-", 1)[0], 1)
    config_file = world.root / "agent.toml"
    config_file.write_text(
        toml_text(
            {
                "backoff_base_s": config.backoff_base_s,
                "backoff_cap_s": config.backoff_cap_s,
                "stable_after_s": config.stable_after_s,
            }
        )
    )
    log_file = world.root / "agent.log"
    with log_file.open("ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "relay",
                "agent",
                "run",
                "--broker",
                broker_url or world.broker.device_url,
                "--config",
                str(config_file),
                "--dir",
                str(agent_dir.root),
                "--ca-file",
                str(world.ca_file),
                "--ui-listen",
                f"{LOOPBACK}:0",
                "--allow-port",
                str(service_port),
                "--shell",
                "",
            ],
            env={k: v for k, v in os.environ.items() if not k.startswith("RELAY_")},
            cwd=world.root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    agent = Agent(process=process, log_file=log_file)
    deadline = time.monotonic() + AGENT_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the agent exited with {process.returncode}")
        found = re.search(r"device UI: (http://\S+)", log_file.read_text())
        if found and agent.events("agent.connected"):
            agent.ui_url = found.group(1)
            return agent
        time.sleep(0.05)
    agent.stop()
    raise RuntimeError(f"the agent did not connect within {AGENT_START_TIMEOUT_S} s")


@dataclass
class Stage:
    """The actors of one fault test."""

    world: World
    agent: Agent
    service: LocalService
    service_port: int
    credentials: Credentials

    def metric(self, name: str) -> float:
        """One sample of the broker's metrics (0 when absent)."""
        text = self.world.broker.metrics()
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def audit_records(self) -> list[dict[str, Any]]:
        return list(read_records(self.world.data_dir / "audit"))

    def session_records(self, session_id: str) -> list[dict[str, Any]]:
        return [r for r in self.audit_records() if r.get("session_id") == session_id]

    def api(self) -> httpx.AsyncClient:
        """The engineer's HTTPS client, logged in."""
        return httpx.AsyncClient(
            base_url=self.world.broker.engineer_url,
            verify=ssl.create_default_context(cafile=str(self.world.ca_file)),
            headers={"Authorization": f"Bearer {self.credentials.token}"},
            timeout=10,
        )


@contextlib.contextmanager
def stage_files(root: Path) -> Iterator[World]:
    """A world (data dir, CA, config) in *root*; its broker stopped at the end."""
    world = World(root=root)
    try:
        yield world
    finally:
        world.broker.stop()


@contextlib.asynccontextmanager
async def stage(
    world: World, nursery: trio.Nursery, agent_config: AgentConfig = AGENT_CONFIG
) -> AsyncIterator[Stage]:
    """Start the local service, the broker and the agent; log the engineer in."""
    service = LocalService()
    service_port = await service.start(nursery)
    world.write_config(sessions={"allowed_channels": [f"tcp:{service_port}"]})
    await trio.to_thread.run_sync(world.broker.start)
    agent = await trio.to_thread.run_sync(
        start_agent, world, service_port, agent_config
    )
    try:
        engineer = await trio.to_thread.run_sync(world.add_engineer)
        credentials = await trio.to_thread.run_sync(world.login, engineer)
        yield Stage(world, agent, service, service_port, credentials)
    finally:
        with trio.CancelScope(shield=True):  # a failed test must not leave it running
            await trio.to_thread.run_sync(agent.stop)


@dataclass
class LiveSession:
    """A forward in use, and how it ended for the engineer."""

    session_id: str = ""
    outcome: SessionOutcome | None = None
    error: BaseException | None = None
    in_use: trio.Event = field(default_factory=trio.Event)
    ended: trio.Event = field(default_factory=trio.Event)
    ended_at: float = 0.0  # trio.current_time() when the engineer's client returned
    ended_wall: float = 0.0  # the same moment on the wall clock
    received: int = 0

    @property
    def end_reason(self) -> str | None:
        return None if self.outcome is None else self.outcome.end_reason


async def open_session(s: Stage, nursery: trio.Nursery, reason: str) -> LiveSession:
    """Request a forward, press Allow on the device UI and wait until it carries
    data (the local service's stream flows to the engineer)."""
    live = LiveSession()
    ports: list[int] = []

    async def engineer() -> None:
        try:
            live.outcome = await run_session(
                s.credentials,
                device_id=DEVICE_ID,
                reason=reason,
                channels=[f"tcp:{s.service_port}"],
                work=forward_to(s.service_port, ports),
                out=io.StringIO(),
            )
            live.session_id = live.outcome.session_id
        except Exception as exc:
            live.error = exc
        finally:
            live.ended_at, live.ended_wall = trio.current_time(), time.time()
            live.ended.set()

    async def person_and_user() -> None:
        async with httpx.AsyncClient(base_url=s.agent.ui_url) as ui:
            live.session_id = await grant_on_the_device_ui(ui)
        # A crash may reset the forward's connection instead of closing it.
        with contextlib.suppress(trio.BrokenResourceError):
            live.received = await use_forward(ports, live.in_use.set)

    nursery.start_soon(engineer)
    nursery.start_soon(person_and_user)
    with trio.fail_after(SESSION_START_TIMEOUT_S):
        await live.in_use.wait()
    return live


@dataclass
class ReadOnlySwitch:
    """A directory bind-mounted on itself, whose mount can be made read-only
    (``EROFS`` for every write, root's too) and writable again."""

    path: Path

    def set(self, *, read_only: bool) -> None:
        mode = "ro" if read_only else "rw"
        subprocess.run(
            ["mount", "-o", f"remount,bind,{mode}", str(self.path)],
            check=True,
            capture_output=True,
        )


@contextlib.contextmanager
def read_only_switch(path: Path) -> Iterator[ReadOnlySwitch]:
    """Bind-mount *path* (made if missing) on itself for the block; skipped (a
    failure under RELAY_TEST_REQUIRE_ALL=1) where mounting is not permitted."""
    if shutil.which("mount") is None:
        pytest.skip("no mount(8): cannot make a read-only directory")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "--bind", str(path), str(path)], capture_output=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"mount --bind not permitted: {done.stderr.decode().strip()}")
    try:
        yield ReadOnlySwitch(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)
