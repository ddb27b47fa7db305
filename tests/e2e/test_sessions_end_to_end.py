"""Remote sessions end to end: the real broker, the real agent with its device UI,
and the engineer CLI's session client, over real TLS on loopback.

The person at the instrument is played through the agent's local UI API
(``/api/state``, ``/api/grant``, ``/api/end``), as the instrument's touchscreen
software would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio

from relay._trio.agent import AgentSettings, make_session_runtime, run_agent
from relay._trio.agent_sessions import SessionRuntime
from relay._trio.agent_ui import serve_agent_ui
from relay._trio.engineer_session import (
    SessionOutcome,
    SessionStatus,
    run_session,
    shell_work,
)
from relay._trio.tunnel_mux import TunnelMux
from relay.config import ListenAddress
from tests.e2e.conftest import LOOPBACK, PKI, fast_agent_config, wait_until
from tests.e2e.test_engineer_cli_session import engineer_credentials, forward_to
from tests.e2e.test_sessions_broker import Harness, harness

pytestmark = pytest.mark.slow

DEVICE_ID = "dev-e2e"
TRANSFER_BYTES = 64 * 1024 * 1024


@dataclass
class Instrument:
    """The real agent, its session runtime and its device UI."""

    runtime: SessionRuntime
    ui: httpx.AsyncClient
    service_port: int

    async def wait_for_offer(self) -> dict[str, Any]:
        with trio.fail_after(10):
            while True:
                state = (await self.ui.get("/api/state")).json()
                if state["offer"] is not None:
                    offer: dict[str, Any] = state["offer"]
                    return offer
                await trio.sleep(0.05)

    async def press(self, button: str, session_id: str) -> None:
        response = await self.ui.post(f"/api/{button}", json={"session_id": session_id})
        assert response.status_code == 200, response.text


async def start_service(
    nursery: trio.Nursery, service: Callable[[trio.SocketStream], Awaitable[None]]
) -> int:
    """A local service on the instrument; returns its port."""
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    nursery.start_soon(trio.serve_listeners, service, listeners)
    port: int = listeners[0].socket.getsockname()[1]
    return port


@asynccontextmanager
async def session_setup(
    pki: PKI,
    nursery: trio.Nursery,
    service: Callable[[trio.SocketStream], Awaitable[None]],
) -> AsyncIterator[tuple[Harness, Instrument]]:
    """The broker (its policy allowing the shell and the service's port) and the
    instrument."""
    port = await start_service(nursery, service)
    async with (
        harness(pki, nursery, allowed_channels=("shell", f"tcp:{port}")) as h,
        instrument(h, nursery, port) as device,
    ):
        yield h, device


@asynccontextmanager
async def instrument(
    h: Harness, nursery: trio.Nursery, service_port: int
) -> AsyncIterator[Instrument]:
    """The agent, allowing the service's port and a shell, with its device UI."""
    agent_dir = h.pki.enroll(DEVICE_ID)
    settings = AgentSettings(
        broker_url=h.broker.device_url,
        agent_dir=agent_dir.root,
        ca_file=h.pki.ca_file,
        limits=dataclasses.replace(
            fast_agent_config(),
            allowed_ports=(service_port,),
            shell_command=("/bin/sh",),
            ui_listen=ListenAddress(host=LOOPBACK, port=0),
        ),
    )
    runtime = make_session_runtime(settings)
    await nursery.start(runtime.run)
    ui_port = await nursery.start(serve_agent_ui, runtime, settings.limits.ui_listen)
    nursery.start_soon(
        lambda: run_agent(settings, runtime=runtime, rng=random.Random(7))  # noqa: S311 - repeatable jitter
    )
    await _online(h)
    async with httpx.AsyncClient(base_url=f"http://{LOOPBACK}:{ui_port}") as ui:
        yield Instrument(runtime, ui, service_port)


async def _online(h: Harness) -> None:
    with trio.fail_after(10):
        while True:
            listed = await h.api.get("/api/v1/devices", headers=h.headers())
            if any(d["device_id"] == DEVICE_ID and d["online"] for d in listed.json()):
                return
            await trio.sleep(0.05)


async def _port(ports: list[int]) -> int:
    with trio.fail_after(10):
        while not ports:  # noqa: ASYNC110 - set by the work
            await trio.sleep(0.02)
    return ports[0]


def _pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)  # noqa: S311 - test data


async def test_grant_on_the_device_then_a_64_mib_forward_arrives_intact(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """Request from the CLI client, grant on the device UI, 64 MiB from the
    device's local service through `relay forward`, SHA-256 equal at both ends;
    the on-site End then ends it for both sides with the on-site exit code."""
    payload = _pattern(1, TRANSFER_BYTES)

    async def service(connection: trio.SocketStream) -> None:
        async with connection:
            for offset in range(0, len(payload), 256 * 1024):
                await connection.send_all(payload[offset : offset + 256 * 1024])

    out = io.StringIO()
    async with session_setup(pki, nursery, service) as (h, device):
        ports: list[int] = []
        received: list[bytes] = []

        async def engineer_uses_it() -> None:
            offer = await device.wait_for_offer()
            assert offer["engineer"] == "alice"
            assert offer["reason"] == "ticket 4711: conductivity alarm"
            # The person answers after the CLI has said it waits (a grant
            # before the CLI watches the session skips that line, rightly).
            await wait_until(lambda: "waiting for the person" in out.getvalue())
            await device.press("grant", offer["session_id"])
            conn = await trio.open_tcp_stream(LOOPBACK, await _port(ports))
            digest = hashlib.sha256()
            size = 0
            async with conn:
                with trio.fail_after(120):
                    while data := await conn.receive_some(256 * 1024):
                        digest.update(data)
                        size += len(data)
            received.append(digest.digest())
            assert size == TRANSFER_BYTES
            await device.press("end", offer["session_id"])

        nursery.start_soon(engineer_uses_it)
        with trio.fail_after(180):
            outcome = await run_session(
                engineer_credentials(h),
                device_id=DEVICE_ID,
                reason="ticket 4711: conductivity alarm",
                channels=[f"tcp:{device.service_port}"],
                work=forward_to(device.service_port, ports),
                out=out,
            )
        assert received == [hashlib.sha256(payload).digest()]
        assert (outcome.end_reason, outcome.exit_code) == ("onsite", 10)
        assert (
            "waiting for the person at the instrument to allow access" in out.getvalue()
        )
        assert "ended by the person at the instrument" in out.getvalue()
        await h.assert_clean()
        await wait_until(lambda: device.runtime.state()["session"] is None)


async def test_onsite_kill_in_the_middle_of_a_transfer(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """The person at the instrument ends the session mid-transfer: the device's
    local connection is closed within 1 s, the engineer's forwarded connection
    ends, and the client reports the on-site end."""
    service_closed: list[float] = []
    ended_at: list[float] = []

    async def endless(connection: trio.SocketStream) -> None:
        chunk = _pattern(2, 64 * 1024)
        try:
            async with connection:
                while True:
                    await connection.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            service_closed.append(trio.current_time())

    out = io.StringIO()
    async with session_setup(pki, nursery, endless) as (h, device):
        ports: list[int] = []

        async def engineer_uses_it() -> None:
            offer = await device.wait_for_offer()
            await device.press("grant", offer["session_id"])
            conn = await trio.open_tcp_stream(LOOPBACK, await _port(ports))
            size = 0
            async with conn:
                with trio.fail_after(60):
                    while data := await conn.receive_some(256 * 1024):
                        size += len(data)
                        if size >= 8 * 1024 * 1024 and not ended_at:
                            ended_at.append(trio.current_time())
                            await device.press("end", offer["session_id"])
            assert size >= 8 * 1024 * 1024

        nursery.start_soon(engineer_uses_it)
        with trio.fail_after(60):
            outcome = await run_session(
                engineer_credentials(h),
                device_id=DEVICE_ID,
                reason="ticket 4714",
                channels=[f"tcp:{device.service_port}"],
                work=forward_to(device.service_port, ports),
                out=out,
            )
        assert outcome == SessionOutcome(outcome.session_id, "onsite")
        await wait_until(lambda: bool(service_closed))
        assert service_closed[0] - ended_at[0] <= 1.0
        await h.assert_clean()


async def test_shell_on_the_device_through_a_real_pty(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """`relay shell`'s work against the agent's PTY: a command runs on the
    instrument and its output comes back; `exit` ends the shell, and with it the
    session ("engineer", exit 0)."""
    stdin_read, stdin_write = os.pipe()
    stdout_read, stdout_write = os.pipe()

    async def unused(connection: trio.SocketStream) -> None:
        await connection.aclose()

    out = io.StringIO()
    async with session_setup(pki, nursery, unused) as (h, device):

        async def person_and_keyboard() -> None:
            offer = await device.wait_for_offer()
            await device.press("grant", offer["session_id"])
            await trio.sleep(0.5)
            os.write(stdin_write, b"echo result=$((6*7))\rexit\r")

        async def work(mux: TunnelMux, status: SessionStatus) -> None:
            await shell_work(mux, status, stdin_fd=stdin_read, stdout_fd=stdout_write)

        nursery.start_soon(person_and_keyboard)
        with trio.fail_after(30):
            outcome = await run_session(
                engineer_credentials(h),
                device_id=DEVICE_ID,
                reason="ticket 4715",
                channels=["shell"],
                work=work,
                out=out,
            )
        os.close(stdout_write)
        shown = b""
        while chunk := os.read(stdout_read, 65536):
            shown += chunk
        for fd in (stdin_read, stdin_write, stdout_read):
            os.close(fd)
        assert b"result=42" in shown
        assert (outcome.end_reason, outcome.exit_code) == ("engineer", 0)
        await h.assert_clean()
