"""SIGTERM in the middle of a session, for the broker and for the agent, as real
processes (BRIEF, Budgets: "SIGTERM: stop accepting, end sessions with
``broker_shutdown``, flush audit, exit <= 10 s"; the agent ends its local streams
first).

Each test runs one side as a real ``relay`` process and the other in this
process, with the engineer's real session client (``relay forward``'s engine)
and a local service on the instrument that sends until its connection closes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import queue
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from relay._trio.agent import AgentSettings, make_session_runtime, run_agent
from relay._trio.engineer_session import run_session
from relay.audit_reader import read_records, verify_directory
from relay.config import ListenAddress
from relay.engineer_client import Credentials
from relay.pki_files import DataDir
from tests.cli.lines import LineReader
from tests.e2e.conftest import (
    LOOPBACK,
    PKI,
    add_engineer,
    api_client,
    fast_agent_config,
    login_token,
    wait_until,
)
from tests.e2e.test_engineer_cli_session import engineer_credentials, forward_to
from tests.e2e.test_sessions_broker import DEVICE, harness

pytestmark = pytest.mark.slow

#: The BRIEF's exit budget after SIGTERM.
EXIT_BUDGET_S = 10.0
#: Before the signal, this much must have come through (the session is in use).
IN_USE_BYTES = 1024 * 1024


class LocalService:
    """The instrument's own service: sends until its connection closes, and
    notes when that happened."""

    def __init__(self) -> None:
        self.closed_at: list[float] = []

    async def serve(self, connection: trio.SocketStream) -> None:
        chunk = random.Random(3).randbytes(64 * 1024)  # noqa: S311 - test data
        try:
            async with connection:
                while True:
                    await connection.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.closed_at.append(trio.current_time())

    async def start(self, nursery: trio.Nursery) -> int:
        listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
        nursery.start_soon(trio.serve_listeners, self.serve, listeners)
        port: int = listeners[0].socket.getsockname()[1]
        return port


async def use_forward(ports: list[int], signal_when_in_use: Callable[[], None]) -> int:
    """Read from the forwarded port; once IN_USE_BYTES came, call
    *signal_when_in_use*; return how much came before the connection ended."""
    with trio.fail_after(20):
        while not ports:  # noqa: ASYNC110 - set by the session's work
            await trio.sleep(0.02)
    size = 0
    conn = await trio.open_tcp_stream(LOOPBACK, ports[0])
    async with conn:
        with trio.fail_after(30):
            while data := await conn.receive_some(256 * 1024):
                size += len(data)
                if size >= IN_USE_BYTES and size - len(data) < IN_USE_BYTES:
                    signal_when_in_use()
    return size


async def grant_on_the_device_ui(ui: httpx.AsyncClient) -> str:
    """Wait for the offer on the device UI's API and press Allow."""
    with trio.fail_after(20):
        while (offer := (await ui.get("/api/state")).json()["offer"]) is None:  # noqa: ASYNC110 - another process's state
            await trio.sleep(0.05)
    session_id: str = offer["session_id"]
    response = await ui.post("/api/grant", json={"session_id": session_id})
    assert response.status_code == 200, response.text
    return session_id


def session_records(pki: PKI, session_id: str) -> list[dict[str, Any]]:
    return [
        record
        for record in read_records(DataDir(pki.data_dir).audit_dir)
        if record.get("session_id") == session_id
    ]


async def wait_for_line(
    reader: LineReader, lines: list[str], text: str, timeout_s: float = 30.0
) -> str:
    """The next stderr line of a process that contains *text*."""
    with trio.fail_after(timeout_s):
        while True:
            try:
                line = await trio.to_thread.run_sync(reader.get, timeout_s)
            except queue.Empty:
                pytest.fail(f"no {text!r} within {timeout_s} s: {lines!r}")
            if line is None:
                pytest.fail(f"the process exited before {text!r}: {lines!r}")
            lines.append(line)
            if text in line:
                return line


async def wait_for_exit(process: subprocess.Popen[str], timeout_s: float) -> int:
    with trio.fail_after(timeout_s):
        while (code := process.poll()) is None:  # noqa: ASYNC110 - a child process
            await trio.sleep(0.02)
    return code


@asynccontextmanager
async def relay_process(
    args: list[str], *, cwd: Path
) -> AsyncIterator[tuple[subprocess.Popen[str], LineReader, list[str]]]:
    """``relay ARGS`` with stderr read line by line; killed at the end."""
    # Popen returns at once; the pipe is read by LineReader's thread.
    process = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-m", "relay", *args],
        env={k: v for k, v in os.environ.items() if not k.startswith("RELAY_")},
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    reader = LineReader(process.stderr)
    lines: list[str] = []
    try:
        yield process, reader, lines
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=EXIT_BUDGET_S)
        while (line := reader.get(EXIT_BUDGET_S)) is not None:
            lines.append(line)
        reader.join(timeout=EXIT_BUDGET_S)
        process.stderr.close()
        assert not any("Traceback" in line for line in lines), lines


async def test_agent_sigterm_ends_its_local_streams_then_the_session(
    pki: PKI, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """`relay agent run` gets SIGTERM while a forward is in use: its local
    connection closes first (within 1 s), the session ends as `device_shutdown`
    for the engineer (exit 22) and the broker (with the device's signed end
    receipt), and the agent exits 0 within 10 s."""
    service = LocalService()
    service_port = await service.start(nursery)
    agent_dir = pki.enroll(DEVICE)
    async with (
        harness(pki, nursery, allowed_channels=(f"tcp:{service_port}",)) as h,
        relay_process(
            [
                "agent",
                "run",
                "--broker",
                h.broker.device_url,
                "--dir",
                str(agent_dir.root),
                "--ca-file",
                str(pki.ca_file),
                "--ui-listen",
                f"{LOOPBACK}:0",
                "--allow-port",
                str(service_port),
                "--shell",
                "",
            ],
            cwd=tmp_path,
        ) as (agent, reader, lines),
    ):
        ui_line = await wait_for_line(reader, lines, "device UI: http://")
        ui_url = ui_line.split("device UI: ", 1)[1].strip()
        await wait_until(
            lambda: h.broker.sample("relay_devices_connected") == 1, timeout_s=20
        )
        ports: list[int] = []
        signalled_at: list[float] = []

        def sigterm_agent() -> None:
            signalled_at.append(trio.current_time())
            agent.send_signal(signal.SIGTERM)

        async def the_engineer_uses_it(ui: httpx.AsyncClient) -> None:
            await grant_on_the_device_ui(ui)
            assert await use_forward(ports, sigterm_agent) >= IN_USE_BYTES

        async with httpx.AsyncClient(base_url=ui_url) as ui:
            nursery.start_soon(the_engineer_uses_it, ui)
            with trio.fail_after(60):
                outcome = await run_session(
                    engineer_credentials(h),
                    device_id=DEVICE,
                    reason="ticket 4720: agent update",
                    channels=[f"tcp:{service_port}"],
                    work=forward_to(service_port, ports),
                    out=io.StringIO(),
                )
        engineer_told_at = trio.current_time()
        assert (outcome.end_reason, outcome.exit_code) == ("device_shutdown", 22)
        # Local streams first: the service's connection closed within 1 s of the
        # signal, before the engineer learned of the end.
        assert service.closed_at
        assert service.closed_at[0] - signalled_at[0] <= 1.0
        assert service.closed_at[0] <= engineer_told_at
        code = await wait_for_exit(
            agent, EXIT_BUDGET_S - (trio.current_time() - signalled_at[0])
        )
        assert code == 0
        await h.assert_clean()
        # The broker took the device's signed end receipt before the agent left.
        session_id = outcome.session_id
        await wait_until(
            lambda: any(
                r["event"] == "session.end_receipt"
                for r in session_records(pki, session_id)
            )
        )
        records = session_records(pki, session_id)
        ends = [r for r in records if r["event"] == "session.end"]
        assert [r["reason"] for r in ends] == ["device_shutdown"]
        receipt = next(r for r in records if r["event"] == "session.end_receipt")
        assert receipt["reason"] == "device_shutdown"
        assert (
            h.broker.sample("relay_session_ends_total", reason="device_shutdown") == 1
        )
        # The control channel was closed on purpose (1001), not dropped.
        await wait_until(
            lambda: any(
                r["event"] == "device.disconnected"
                for r in read_records(DataDir(pki.data_dir).audit_dir)
            )
        )
        disconnected = [
            r
            for r in read_records(DataDir(pki.data_dir).audit_dir)
            if r["event"] == "device.disconnected"
        ]
        assert [r["code"] for r in disconnected] == [1001]
    logged = "\n".join(lines)
    assert "agent.stopping" in logged
    assert "agent.stopped" in logged


async def test_broker_sigterm_ends_the_session_on_both_sides_and_exits_in_time(
    pki: PKI, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """`relay serve` gets SIGTERM while a forward is in use: the engineer is told
    `broker_shutdown` (exit 19), the device gets the broker's end (its local
    connection closes), the log ends with the session's end, the broker's stop
    and a checkpoint that verifies, and the process exits 0 within 10 s."""
    service = LocalService()
    service_port = await service.start(nursery)
    secret = add_engineer(pki, "alice")
    config = tmp_path / "relay.toml"
    config.write_text(
        f'data_dir = "{pki.data_dir}"\n'
        f'device_listen = "{LOOPBACK}:0"\n'
        f'engineer_listen = "{LOOPBACK}:0"\n'
        f'metrics_listen = "{LOOPBACK}:0"\n'
        "[sessions]\n"
        f'allowed_channels = ["tcp:{service_port}"]\n'
        "[audit]\n"
        "stdout = false\n"
    )
    async with relay_process(["serve", "--config", str(config)], cwd=tmp_path) as (
        broker,
        reader,
        lines,
    ):
        started_line = await wait_for_line(reader, lines, '"event": "broker.started"')
        started = json.loads(started_line)
        agent_dir = pki.enroll(DEVICE)
        settings = AgentSettings(
            broker_url=f"wss://{LOOPBACK}:{started['device_port']}",
            agent_dir=agent_dir.root,
            ca_file=pki.ca_file,
            limits=dataclasses.replace(
                fast_agent_config(),
                allowed_ports=(service_port,),
                shell_command=(),
                ui_listen=ListenAddress(host=LOOPBACK, port=0),
            ),
        )
        runtime = make_session_runtime(settings)
        await nursery.start(runtime.run)
        nursery.start_soon(
            lambda: run_agent(settings, runtime=runtime, rng=random.Random(5))  # noqa: S311 - repeatable jitter
        )
        async with api_client(pki, started["engineer_port"]) as api:
            credentials = Credentials(
                broker=f"https://{LOOPBACK}:{started['engineer_port']}",
                username="alice",
                token=await login_token(api, "alice", secret),
                expires_at="",
                ca_file=str(pki.ca_file),
            )
        ports: list[int] = []
        signalled_at: list[float] = []

        def sigterm_broker() -> None:
            signalled_at.append(trio.current_time())
            broker.send_signal(signal.SIGTERM)

        async def the_engineer_uses_it() -> None:
            with trio.fail_after(20):
                while runtime.offer is None:  # noqa: ASYNC110 - the runtime's state
                    await trio.sleep(0.05)
            runtime.grant(runtime.offer.session_id)
            assert await use_forward(ports, sigterm_broker) >= IN_USE_BYTES

        nursery.start_soon(the_engineer_uses_it)
        with trio.fail_after(60):
            outcome = await run_session(
                credentials,
                device_id=DEVICE,
                reason="ticket 4721: relay maintenance",
                channels=[f"tcp:{service_port}"],
                work=forward_to(service_port, ports),
                out=io.StringIO(),
            )
        assert (outcome.end_reason, outcome.exit_code) == ("broker_shutdown", 19)
        # The device was told: its session ended with the broker's reason and
        # its local connection closed.
        await wait_until(lambda: runtime.state()["last_end"] is not None)
        assert runtime.state()["last_end"] == {
            "session_id": outcome.session_id,
            "reason": "broker_shutdown",
        }
        await wait_until(lambda: bool(service.closed_at))
        code = await wait_for_exit(
            broker, EXIT_BUDGET_S - (trio.current_time() - signalled_at[0])
        )
        assert code == 0
    events = [r["event"] for r in read_records(DataDir(pki.data_dir).audit_dir)]
    ends = [
        r
        for r in session_records(pki, outcome.session_id)
        if r["event"] == "session.end"
    ]
    assert [r["reason"] for r in ends] == ["broker_shutdown"]
    # Flushed: the stop is recorded after the session's end and sealed.
    assert events.index("broker.stopping") < events.index("broker.stopped")
    assert events[-1] == "audit.checkpoint"
    found = verify_directory(DataDir(pki.data_dir).audit_dir)
    assert found.report.ok, found.report
    assert found.report.unsealed == 0
    assert found.sink_matched
