"""A fleet of real agents in one process, with the local services the sessions reach.

Theory of operation
===================
The session scenarios need many instruments at once (100 typing sessions), each
running the real agent: :func:`relay._trio.agent.run_agent` and its
:class:`~relay._trio.agent_sessions.SessionRuntime`, the code ``relay agent run``
runs, with its own certificate. One OS process per device would spend the
machine's two cores on 100 interpreters, so the fleet runs them side by side in
one trio loop, in a process apart from the broker and from the engineers (the
benchmark process).

The person at each instrument is :class:`AutoGrant`, a ``Decider`` (the same
interface the touchscreen API and the terminal prompt use) that grants at once
and reports when the offer reached the device. The on-site End button is a
line on stdin (``{"end": SESSION_ID}``), answered with
:meth:`~relay._trio.agent_sessions.SessionRuntime.end`, the call the device
page's End makes.

Local services on the instrument (loopback):

The parent picks the services' ports (the broker's channel allow-list names
them before the fleet starts).

* ``banner``: sends one byte on accept, like an SSH server's banner (the first
  byte the engineer sees after a grant), then echoes what it gets.
* ``tls-echo``: a TLS echo server, the *direct* baseline of the latency
  scenario (an engineer reaching the instrument with no relay).

The shell channel runs ``stty raw -echo; exec cat`` on the agent's PTY: every
keystroke comes back at once, written by a process as a shell's line editor
does.

Protocol with the parent, JSON lines: on stdout ``{"event": "ready", ...}``
once every agent is connected, then ``offer`` / ``end_pressed`` events with
``time.monotonic()`` stamps (CLOCK_MONOTONIC, the same clock in every process
of the machine).

    python -m bench.fleet --broker wss://127.0.0.1:PORT --ca-file CA \\
        --tls-cert CRT --tls-key KEY --banner-port P --tls-echo-port P AGENT_DIR...
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import ssl
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final

import trio

from relay._trio.agent import (
    AgentSettings,
    AgentStatus,
    make_session_runtime,
    run_agent,
)
from relay._trio.agent_sessions import OfferView, SessionRuntime
from relay.config import AgentConfig
from relay.log import configure_logging

SHELL: Final = ("/bin/sh", "-c", "stty raw -echo && exec cat")
READY_TIMEOUT_S: Final = 120.0
AGENT_START_SPACING_S: Final = 0.02


def emit(event: str, **fields: Any) -> None:
    """One JSON line to the parent."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


@dataclass(eq=False)
class AutoGrant:
    """The person at the instrument, granting every offer at once (a Decider)."""

    device_id: str
    label: str = "bench"

    async def decide(self, offer: OfferView) -> bool:
        emit(
            "offer",
            device_id=self.device_id,
            session_id=offer.session_id,
            t=time.monotonic(),
        )
        return True


async def _banner(connection: trio.SocketStream) -> None:
    await connection.send_all(b"R")
    await _echo(connection)


async def _echo(connection: trio.abc.Stream) -> None:
    async with connection:
        while data := await connection.receive_some(65536):
            await connection.send_all(data)


async def _tls_echo(context: ssl.SSLContext, connection: trio.SocketStream) -> None:
    await _echo(trio.SSLStream(connection, context, server_side=True))


async def _agent(
    settings: AgentSettings,
    runtime: SessionRuntime,
    status: AgentStatus,
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(runtime.run)
        await run_agent(settings, status=status, runtime=runtime)


async def _commands(runtimes: dict[str, SessionRuntime]) -> None:
    """``{"end": SESSION_ID}`` lines: the on-site End, on whichever device has it."""
    stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
    buffer = b""
    while chunk := await stdin.receive_some(65536):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            command = json.loads(line)
            session_id = command["end"]
            for runtime in runtimes.values():
                session = runtime.state().get("session")
                if session and session.get("session_id") == session_id:
                    emit("end_pressed", session_id=session_id, t=time.monotonic())
                    runtime.end(session_id)
                    break
            else:
                emit("end_unknown", session_id=session_id)


async def main(args: argparse.Namespace) -> None:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(args.tls_cert, args.tls_key)
    async with trio.open_nursery() as nursery:
        banner_port, tls_echo_port = args.banner_port, args.tls_echo_port
        await nursery.start(
            partial(trio.serve_tcp, _banner, banner_port, host="127.0.0.1")
        )
        await nursery.start(
            partial(
                trio.serve_tcp,
                partial(_tls_echo, server),
                tls_echo_port,
                host="127.0.0.1",
            )
        )
        limits = AgentConfig(allowed_ports=(banner_port,), shell_command=SHELL)
        runtimes: dict[str, SessionRuntime] = {}
        statuses: list[AgentStatus] = []
        for agent_dir in args.agent_dirs:
            settings = AgentSettings(
                broker_url=args.broker,
                agent_dir=agent_dir,
                ca_file=args.ca_file,
                limits=limits,
            )
            device_id = agent_dir.name
            runtime = make_session_runtime(settings, deciders=[AutoGrant(device_id)])
            status = AgentStatus()
            runtimes[device_id] = runtime
            statuses.append(status)
            nursery.start_soon(_agent, settings, runtime, status)
            # Instruments do not all boot in the same millisecond; all from
            # 127.0.0.1, a burst would meet the per-source admission cap.
            await trio.sleep(AGENT_START_SPACING_S)
        with trio.fail_after(READY_TIMEOUT_S):
            while not all(s.connected for s in statuses):  # noqa: ASYNC110 - many agents
                await trio.sleep(0.05)
        emit("ready", banner_port=banner_port, tls_echo_port=tls_echo_port)
        await _commands(runtimes)  # until the parent closes stdin
        nursery.cancel_scope.cancel()


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet")
    parser.add_argument("--broker", required=True)
    parser.add_argument("--ca-file", type=Path, required=True)
    parser.add_argument("--tls-cert", type=Path, required=True)
    parser.add_argument("--tls-key", type=Path, required=True)
    parser.add_argument("--banner-port", type=int, required=True)
    parser.add_argument("--tls-echo-port", type=int, required=True)
    parser.add_argument("agent_dirs", type=Path, nargs="+")
    return parser.parse_args(argv)


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    configure_logging(level=logging.WARNING)
    trio.run(main, _parse(sys.argv[1:]))
