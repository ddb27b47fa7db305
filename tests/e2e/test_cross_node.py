"""Sessions whose engineer and device are on different broker nodes (issue 11).

Node A (the harness's broker) has the engineer and advertises its device
address; node B (another broker on the same PostgreSQL and Redis) has the
device's control channel. The device is the scripted one of
tests/e2e/test_sessions_broker.py: it speaks on B's control channel and opens
the session's tunnel at the address the offer names, on A. Three broker
processes with a real agent and a transfer are in tests/e2e/test_three_nodes.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio_websocket

from relay._trio.websocket import WebSocketConnection
from relay.config import ClusterConfig, ListenAddress
from relay.proto import control, tunnel
from tests.e2e.conftest import LOOPBACK, PKI, wait_until
from tests.e2e.test_cluster import (
    HEARTBEAT_S,
    Node,
    another_node,
    key_becomes,
    redis_keys,
)
from tests.e2e.test_device_listener import open_device, say_hello
from tests.e2e.test_sessions_broker import (
    DEVICE,
    FakeDevice,
    Harness,
    attach,
    device_closed,
    device_frame,
    engineer_closed,
    frame_from,
    harness,
    status,
)
from tests.pg_cluster import PostgresCluster, free_port
from tests.redis_server import RedisServer

pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <function MemoryObject"
    ":pytest.PytestUnraisableExceptionWarning"
)


@pytest.fixture
def pki(tmp_path: Path, postgres: PostgresCluster, redis: RedisServer) -> PKI:
    """Node A: the store on PostgreSQL, the cluster on Redis, and a device
    address of its own for the tunnels of sessions across nodes."""
    from tests.e2e.conftest import make_pki

    port = free_port()
    return make_pki(
        tmp_path / "node-a",
        database_url=postgres.new_database(),
        device_listen=ListenAddress(host=LOOPBACK, port=port),
        cluster=ClusterConfig(
            redis_url=redis.url,
            node_id="node-a",
            heartbeat_s=HEARTBEAT_S,
            command_deadline_s=3.0,
            redis_timeout_s=0.5,
            advertise_device_url=f"wss://{LOOPBACK}:{port}",
        ),
    )


@asynccontextmanager
async def node_b(h: Harness, nursery: trio.Nursery) -> AsyncIterator[Node]:
    """Node B: its own device port (any), no advertised address."""
    async with another_node(
        h,
        nursery,
        "node-b",
        device_listen=ListenAddress(host=LOOPBACK, port=0),
        advertise_device_url=None,
    ) as node:
        yield node


@asynccontextmanager
async def device_on(
    node: Node,
    h: Harness,
    redis: RedisServer,
    *,
    version: int = control.PROTOCOL_VERSION,
) -> AsyncIterator[FakeDevice]:
    """The scripted device with its control channel on *node*, once the fleet
    sees it there (its presence in Redis)."""
    agent_dir = h.pki.enroll(DEVICE)
    async with open_device(node.broker, h.pki, agent_dir) as ws:
        channel = await say_hello(ws, DEVICE, version)
        await key_is(redis, f"relay:presence:{DEVICE}", "node-b")
        yield FakeDevice(ws, channel, agent_dir, DEVICE)


async def key_is(redis: RedisServer, key: str, value: str | None) -> None:
    async with redis_keys(redis) as keys:
        await key_becomes(keys, key, value, within_s=HEARTBEAT_S * 10)


async def offered(h: Harness, device: FakeDevice) -> control.OfferWithTunnel:
    response = await h.request()
    assert response.status_code == 201, response.text
    offer = await device.next_event()
    assert isinstance(offer, control.OfferWithTunnel), offer
    return offer


@asynccontextmanager
async def active_crossing(
    h: Harness, device: FakeDevice
) -> AsyncIterator[
    tuple[
        control.OfferWithTunnel,
        WebSocketConnection,
        trio_websocket.WebSocketConnection,
    ]
]:
    """A session across nodes, active: offered through node B with node A's
    tunnel address, granted, the device's tunnel on A, the engineer attached."""
    offer = await offered(h, device)
    assert offer.tunnel_url == f"wss://{LOOPBACK}:{h.broker.ports.device}"
    await device.send(device.grant(offer))
    await wait_until(
        lambda: h.sessions.view(offer.session_id)["state"] == "granted"  # type: ignore[index]
    )
    path = f"/v1/device/tunnel/{offer.session_id}"
    async with (
        open_device(h.broker, h.pki, device.agent_dir, path) as tun,
        attach(h, offer.session_id) as eng,
    ):
        assert (await status(eng))["state"] == "active"
        yield offer, tun, eng


async def test_a_session_across_nodes_relays_and_the_engineer_ends_it(
    pki: PKI, nursery: trio.Nursery, redis: RedisServer
) -> None:
    """Engineer on A, device on B: the offer reaches the device through B and
    names A's device address; the grant comes back through B; the device's
    tunnel goes to A; bytes flow both ways on A; the engineer's end reaches
    the device through B, its end receipt comes back and is acked through B;
    B lends nothing afterwards and the device's lock is released."""
    async with harness(pki, nursery) as h, node_b(h, nursery) as b:
        async with device_on(b, h, redis) as device:
            async with active_crossing(h, device) as (offer, tun, eng):
                await eng.send_message(
                    tunnel.encode(tunnel.StreamOpen(stream_id=1, channel="tcp:22"))
                )
                assert isinstance(await device_frame(tun), tunnel.StreamOpen)
                await tun.send_message(tunnel.encode(tunnel.StreamOpenOk(stream_id=1)))
                assert await frame_from(eng) == tunnel.StreamOpenOk(stream_id=1)
                await eng.send_message(
                    tunnel.encode(tunnel.StreamData(stream_id=1, payload=b"ping"))
                )
                assert await device_frame(tun) == tunnel.StreamData(
                    stream_id=1, payload=b"ping"
                )
                deleted = await h.api.delete(
                    f"/api/v1/sessions/{offer.session_id}", headers=h.headers()
                )
                assert deleted.status_code == 200, deleted.text
                end = await device.next_event()
                assert end == control.SessionEnd(
                    session_id=offer.session_id, reason="engineer"
                )
                await device.send(device.ended(offer, "engineer"))
                assert (await device.next_ack()).session_id == offer.session_id
                closed = await device_closed(tun)
                assert (closed.code, closed.reason) == (4005, "engineer")
            _, reason = await engineer_closed(eng)
            assert reason.reason == "engineer"
            await h.assert_clean()
            crossing_b = b.sessions._crossing
            assert crossing_b is not None
            await wait_until(lambda: not crossing_b.holds())  # type: ignore[attr-defined]
            await key_is(redis, f"relay:device-lock:{DEVICE}", None)
        # A sent the claim, the offer, the end and the ack, and the release;
        # B sent the grant and the end receipt.
        sent = {
            kind: h.broker.sample(
                "relay_node_commands_total", kind=kind, outcome="confirmed"
            )
            for kind in ("claim_device", "device_send", "release_device")
        }
        assert sent == {"claim_device": 1, "device_send": 3, "release_device": 1}
        assert (
            b.broker.sample(
                "relay_node_commands_total", kind="device_event", outcome="confirmed"
            )
            == 2
        )
        with h.pki.store() as store:
            row = store.get_remote_session(offer.session_id)
            assert row is not None
            assert (row.node_id, row.end_reason) == ("node-a", "engineer")


async def test_the_on_site_end_across_nodes(
    pki: PKI, nursery: trio.Nursery, redis: RedisServer
) -> None:
    """The person at the instrument ends it: the device closes its tunnel on A
    (4005 onsite) and says so on B; A ends the session as ``onsite``."""
    async with (
        harness(pki, nursery) as h,
        node_b(h, nursery) as b,
        device_on(b, h, redis) as device,
    ):
        async with active_crossing(h, device) as (offer, tun, eng):
            await tun.aclose(4005, "onsite")
            await device.send(device.ended(offer, "onsite"))
            seen, reason = await engineer_closed(eng)
            assert reason.reason == "onsite"
            assert {"type": "end", "reason": "onsite"} in seen
        assert (await device.next_ack()).session_id == offer.session_id
        await h.assert_clean()
        assert h.sessions.view(offer.session_id)["end_reason"] == "onsite"  # type: ignore[index]


async def test_an_agent_too_old_for_crossing_is_refused_before_any_offer(
    pki: PKI, nursery: trio.Nursery, redis: RedisServer
) -> None:
    """A version 2 agent would refuse an offer with a tunnel address: the
    request is refused (503, saying why) and the device hears nothing."""
    async with (
        harness(pki, nursery) as h,
        node_b(h, nursery) as b,
        device_on(b, h, redis, version=2) as device,
    ):
        response = await h.request()
        assert response.status_code == 503, response.text
        assert "control protocol 2" in response.json()["error"]
        with trio.move_on_after(0.5):
            event = await device.next_message()
            raise AssertionError(f"the device was sent {event}")
        await h.assert_clean()
        # The lock went back with the refusal: the device is free again.
        await key_is(redis, f"relay:device-lock:{DEVICE}", None)


async def test_a_node_without_an_advertised_address_names_the_device_node(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """Node B has no device address of its own: an engineer there cannot
    reach a device on A (its tunnel could not come to B); 503 names node A."""
    async with harness(pki, nursery) as h, node_b(h, nursery) as b:
        agent_dir = h.pki.enroll(DEVICE)
        async with open_device(h.broker, h.pki, agent_dir) as ws:
            await say_hello(ws, DEVICE)
            await trio.sleep(HEARTBEAT_S * 3)  # A's presence is written
            response = await b.api.post(
                "/api/v1/sessions",
                headers=b.admin(),
                json={"device_id": DEVICE, "reason": "r", "channels": ["shell"]},
            )
            assert response.status_code == 503, response.text
            assert "node-a" in response.json()["error"]
            assert "advertise_device_url" in response.json()["error"]


async def test_the_device_node_stopping_ends_the_session_on_the_engineer_node(
    pki: PKI, nursery: trio.Nursery, redis: RedisServer
) -> None:
    """Node B stops: its control channel to the device closes, B tells A, and
    A ends the session (``device_disconnect``) and closes both legs."""
    async with harness(pki, nursery) as h:
        async with (
            node_b(h, nursery) as b,
            device_on(b, h, redis) as device,
            active_crossing(h, device) as (_offer, tun, eng),
        ):
            b.broker.shutdown.set()
            _, reason = await engineer_closed(eng, within_s=10)
            assert reason.reason in ("device_disconnect", "broker_crash")
            await device_closed(tun)
        await h.assert_clean()


async def test_the_device_node_dying_ends_the_session_as_broker_crash(
    pki: PKI, nursery: trio.Nursery, redis: RedisServer
) -> None:
    """Node B dies without a word (its tasks are cancelled: nothing reaches A,
    as after a SIGKILL): its announcement expires, A finds it gone within a
    few heartbeats and ends the session as ``broker_crash``; both legs are
    closed with that reason and the session's row says so."""
    async with harness(pki, nursery) as h:
        async with trio.open_nursery() as outer:
            await _session_across_a_dying_node(h, outer, redis)
        await h.assert_clean()
        assert h.broker.sample("relay_session_ends_total", reason="broker_crash") == 1


async def _session_across_a_dying_node(
    h: Harness, outer: trio.Nursery, redis: RedisServer
) -> None:
    b_nursery: trio.Nursery = await outer.start(_nursery_of_its_own)
    async with (
        node_b(h, b_nursery) as b,
        device_on(b, h, redis) as device,
        active_crossing(h, device) as (offer, tun, eng),
    ):
        b_nursery.cancel_scope.cancel()
        seen, reason = await engineer_closed(eng, within_s=HEARTBEAT_S * 15)
        assert (reason.code, reason.reason) == (4005, "broker_crash")
        assert {"type": "end", "reason": "broker_crash"} in seen
        closed = await device_closed(tun)
        assert (closed.code, closed.reason) == (4005, "broker_crash")
    outer.cancel_scope.cancel()
    with h.pki.store() as store:
        await wait_until(
            lambda: (
                getattr(store.get_remote_session(offer.session_id), "end_reason", None)
                == "broker_crash"
            )
        )


async def _nursery_of_its_own(
    task_status: trio.TaskStatus[trio.Nursery] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A nursery that can be cancelled alone (a node's death)."""
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        await trio.sleep_forever()
