"""The soak's instruments: real agents in one process, with a hashing echo service.

Theory of operation
===================
Like :mod:`bench.fleet` (whose grant-at-once person, :class:`bench.fleet.AutoGrant`,
and shell command it reuses), every device runs the real agent,
:func:`relay._trio.agent.run_agent` with its
:class:`~relay._trio.agent_sessions.SessionRuntime`, side by side in one trio
loop, in a process apart from the broker and from the engineers. Two things are
added for the soak (:mod:`reliability.soak`):

* The ``hash-echo`` service on the instrument (loopback). A transfer is an
  8-byte big-endian length *L*, then *L* bytes; the service echoes every chunk
  as it arrives, hashes it, and after the last byte sends the SHA-256 (32
  bytes) of what it received. The engineer thus compares three digests: what
  it sent, what the device got, what came back.
* Devices that go away: each device runs in its own cancel scope. On the line
  ``{"drop": DEVICE_ID}`` the device's agent and session runtime are cancelled
  (its sockets close without a WebSocket close, as when an instrument loses its
  network or power), and after :data:`DROP_DOWNTIME_S` it boots again with a
  fresh runtime and reports ``{"event": "up"}`` once connected.

The first ``--short-cap-count`` devices have their own cap of ``--short-cap``
seconds (``AgentConfig.max_session_seconds``), so that some sessions end by the
cap without shortening everybody's.

Protocol with the parent, JSON lines: ``ready`` once every agent is connected,
``offer`` (from AutoGrant), ``end_pressed``, ``dropped``, ``up``; commands on
stdin: ``{"end": DEVICE_ID}`` (the on-site End, for the device's session) and
``{"drop": DEVICE_ID}``.

    python -m reliability.soak_fleet --broker wss://127.0.0.1:PORT --ca-file CA \\
        --hash-port P [--short-cap S --short-cap-count K] AGENT_DIR...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import resource
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Final

import trio

from bench.fleet import AGENT_START_SPACING_S, SHELL, AutoGrant, emit
from relay._trio.agent import (
    AgentSettings,
    AgentStatus,
    make_session_runtime,
    run_agent,
)
from relay._trio.agent_sessions import SessionRuntime, StaleSession
from relay.config import AgentConfig
from relay.log import configure_logging

READY_TIMEOUT_S: Final = 180.0
#: How long a dropped device stays away before it boots again.
DROP_DOWNTIME_S: Final = 0.5
HEADER_BYTES: Final = 8
DIGEST_BYTES: Final = 32


async def _receive_exactly(stream: trio.SocketStream, size: int) -> bytes | None:
    buffer = bytearray()
    while len(buffer) < size:
        chunk = await stream.receive_some(size - len(buffer))
        if not chunk:
            return None
        buffer += chunk
    return bytes(buffer)


async def hash_echo(connection: trio.SocketStream) -> None:
    """The instrument's service: echo each transfer, then its SHA-256."""
    async with connection:
        while (header := await _receive_exactly(connection, HEADER_BYTES)) is not None:
            left = int.from_bytes(header, "big")
            digest = hashlib.sha256()
            while left:
                chunk = await connection.receive_some(min(left, 65536))
                if not chunk:
                    return
                digest.update(chunk)
                left -= len(chunk)
                await connection.send_all(chunk)
            await connection.send_all(digest.digest())


@dataclass
class Device:
    """One instrument: its settings, and its agent while it is up."""

    settings: AgentSettings
    runtime: SessionRuntime | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    status: AgentStatus = field(default_factory=AgentStatus)

    @property
    def device_id(self) -> str:
        return self.settings.agent_dir.name

    async def run(self, *, report_up: bool) -> None:
        """Boot the agent and keep it up until :meth:`drop` (or the end)."""
        self.scope = trio.CancelScope()
        self.status = AgentStatus()
        runtime = make_session_runtime(
            self.settings, deciders=[AutoGrant(self.device_id)]
        )
        self.runtime = runtime
        with self.scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(runtime.run)
                nursery.start_soon(
                    partial(
                        run_agent, self.settings, status=self.status, runtime=runtime
                    )
                )
                if report_up:
                    while not self.status.connected:
                        await self.status.changed.wait()
                    emit("up", device_id=self.device_id)
        self.runtime = None

    def drop(self) -> None:
        self.scope.cancel()


async def _reboot(device: Device) -> None:
    await trio.sleep(DROP_DOWNTIME_S)
    await device.run(report_up=True)


async def _commands(devices: dict[str, Device], nursery: trio.Nursery) -> None:
    """The on-site End and the drops, one JSON line each, until stdin closes."""
    stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
    buffer = b""
    while chunk := await stdin.receive_some(65536):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            command = json.loads(line)
            if "drop" in command:
                device = devices[command["drop"]]
                device.drop()
                emit("dropped", device_id=device.device_id)
                nursery.start_soon(_reboot, device)
                continue
            device = devices[command["end"]]
            runtime = device.runtime
            session = runtime.state().get("session") if runtime else None
            try:
                if runtime is None or session is None:
                    raise StaleSession("no session")
                runtime.end(session["session_id"])
            except StaleSession:
                emit("end_unknown", device_id=device.device_id)
                continue
            emit("end_pressed", device_id=device.device_id)


async def main(args: argparse.Namespace) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(trio.serve_tcp, hash_echo, args.hash_port, host="127.0.0.1")
        )
        devices: dict[str, Device] = {}
        for index, agent_dir in enumerate(args.agent_dirs):
            cap = args.short_cap if index < args.short_cap_count else 3600
            limits = AgentConfig(
                allowed_ports=(args.hash_port,),
                shell_command=SHELL,
                max_session_seconds=cap,
            )
            device = Device(
                AgentSettings(
                    broker_url=args.broker,
                    agent_dir=agent_dir,
                    ca_file=args.ca_file,
                    limits=limits,
                )
            )
            devices[device.device_id] = device
            nursery.start_soon(partial(device.run, report_up=False))
            # All from 127.0.0.1: a burst would meet the per-source admission cap.
            await trio.sleep(AGENT_START_SPACING_S)
        with trio.fail_after(READY_TIMEOUT_S):
            while not all(d.status.connected for d in devices.values()):  # noqa: ASYNC110 - many agents
                await trio.sleep(0.05)
        emit("ready", devices=len(devices))
        await _commands(devices, nursery)  # until the parent closes stdin
        nursery.cancel_scope.cancel()


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m reliability.soak_fleet")
    parser.add_argument("--broker", required=True)
    parser.add_argument("--ca-file", type=Path, required=True)
    parser.add_argument("--hash-port", type=int, required=True)
    parser.add_argument("--short-cap", type=int, default=3600)
    parser.add_argument("--short-cap-count", type=int, default=0)
    parser.add_argument("agent_dirs", type=Path, nargs="+")
    return parser.parse_args(argv)


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    configure_logging(level=logging.WARNING)
    trio.run(main, _parse(sys.argv[1:]))
