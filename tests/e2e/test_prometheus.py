"""The metrics contract against Prometheus's own tools (issue 7): ``promtool check
metrics`` on the live ``/metrics`` of a broker that has run a session, and a real
Prometheus server scraping a broker on loopback.

Both need the Debian ``prometheus`` package (``.ci/run`` installs it); without it
they skip, which ``RELAY_TEST_REQUIRE_ALL=1`` turns into a failure.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
import trio

from relay.proto import control, tunnel
from tests.e2e.conftest import LOOPBACK, PKI, wait_until
from tests.e2e.test_sessions_broker import (
    attach,
    device_frame,
    engineer_closed,
    fake_device,
    frame_from,
    harness,
    open_tunnel,
    status,
)

#: The metric names the issue's contract lists, all of which must be exposed.
CONTRACT = (
    "relay_devices_connected",
    "relay_tls_handshake_failures_total",
    "relay_auth_failures_total",
    "relay_session_requests_total",
    "relay_grant_wait_seconds",
    "relay_session_duration_seconds",
    "relay_session_ends_total",
    "relay_teardown_seconds",
    "relay_tunnel_bytes_total",
    "relay_audit_write_failures_total",
    "relay_build_info",
)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (Debian package prometheus)")
    return path


async def test_promtool_accepts_the_metrics_of_a_broker_that_ran_a_session(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """A whole session (offer, grant, a stream each way, the engineer's end),
    then `promtool check metrics` on /metrics finds nothing to complain about
    (names, units, suffixes, HELP and TYPE), and every contract name is there
    with the session counted."""
    promtool = tool("promtool")
    async with harness(pki, nursery) as h, fake_device(h) as device:
        response = await h.request()
        offer = await device.next_event()
        assert isinstance(offer, control.Offer)
        sid = offer.session_id
        assert response.status_code == 201
        async with attach(h, sid) as eng:
            await status(eng)
            await device.send(device.grant(offer))
            await status(eng)
            async with open_tunnel(h, device, sid) as tun:
                await status(eng)
                await eng.send_message(
                    tunnel.encode(tunnel.StreamOpen(stream_id=1, channel="tcp:22"))
                )
                await device_frame(tun)
                await tun.send_message(tunnel.encode(tunnel.StreamOpenOk(stream_id=1)))
                await frame_from(eng)
                await eng.send_message(
                    tunnel.encode(tunnel.StreamData(stream_id=1, payload=b"ping"))
                )
                await device_frame(tun)
                await h.api.delete(f"/api/v1/sessions/{sid}", headers=h.headers())
                await device.next_event()
                await device.send(device.ended(offer, "engineer"))
            await engineer_closed(eng)
        await wait_until(lambda: h.broker.sample("relay_teardown_seconds_count") == 1)
        async with httpx.AsyncClient() as client:
            text = (
                await client.get(f"http://{LOOPBACK}:{h.broker.ports.metrics}/metrics")
            ).text
    checked = await trio.run_process(
        [promtool, "check", "metrics"],
        stdin=text.encode(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout + checked.stderr == b""
    for name in CONTRACT:
        assert f"\n# TYPE {name} " in text, name
    assert 'relay_session_ends_total{reason="engineer"} 1.0' in text
    assert "relay_grant_wait_seconds_count 1.0" in text
    assert "relay_session_duration_seconds_count 1.0" in text
    assert 'relay_tunnel_bytes_total{direction="to_device"} 4.0' in text
    assert 'relay_build_info{python="' in text


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
    return port


async def test_a_real_prometheus_scrapes_the_broker(
    pki: PKI, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Prometheus scrapes a broker on loopback every second; its query API
    answers relay_devices_connected = 1 while a device is connected."""
    prometheus = tool("prometheus")
    async with harness(pki, nursery) as h, fake_device(h):
        web_port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: relay\n"
            "    static_configs:\n"
            f"      - targets: ['{LOOPBACK}:{h.broker.ports.metrics}']\n"
        )
        log = (tmp_path / "prometheus.log").open("wb")
        process = await nursery.start(
            lambda task_status: trio.run_process(  # noqa: ASYNC105 - nursery.start awaits it
                [
                    prometheus,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address={LOOPBACK}:{web_port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
                task_status=task_status,
            )
        )
        try:
            value = None
            async with httpx.AsyncClient(
                base_url=f"http://{LOOPBACK}:{web_port}"
            ) as client:
                with trio.fail_after(30):
                    while value != "1":
                        await trio.sleep(0.5)
                        try:
                            answer = await client.get(
                                "/api/v1/query",
                                params={
                                    "query": 'relay_devices_connected{job="relay"}'
                                },
                            )
                        except httpx.TransportError:
                            continue  # not listening yet
                        result = answer.json()["data"]["result"]
                        if result:
                            value = result[0]["value"][1]
                up = await client.get(
                    "/api/v1/query", params={"query": 'up{job="relay"}'}
                )
                assert up.json()["data"]["result"][0]["value"][1] == "1"
        finally:
            process.terminate()
            log.close()
