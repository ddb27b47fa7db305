"""Three broker processes on one PostgreSQL and one Redis, with a real agent (issue 11).

Every actor is real: three ``relay serve`` processes on loopback ports
(``bench.world.BrokerProcess``), sharing the device CA and the TOTP sealing
key as an operator would, each with its own data directory and audit log; the
PostgreSQL and Redis servers the tests start on free ports; ``relay agent
run`` reaching the fleet through a small TCP balancer that, like a load
balancer, sends each new connection to the first node that takes it (node B,
else node C); the engineer is this process with the ``relay forward`` engine,
and the person at the instrument presses Allow on the agent's device UI.

The engineer uses node A, the device's control channel is on node B: every
session here crosses nodes (the device opens its tunnel at A's advertised
address, on the same host as its broker, so no ``tunnel_hosts`` is needed).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import coredis
import httpx
import pytest
import trio

from bench.world import LOOPBACK, BrokerProcess, Engineer, World
from relay._trio.engineer_session import SessionOutcome, run_session
from relay.audit_reader import read_records
from relay.engineer_client import Credentials
from tests.e2e.test_engineer_cli_session import forward_to
from tests.e2e.test_graceful_shutdown import grant_on_the_device_ui
from tests.pg_cluster import PostgresCluster
from tests.redis_server import RedisServer
from tests.reliability.crash_harness import FAST_AGENT_CONFIG, Agent, start_agent

pytestmark = [
    pytest.mark.slow,
    # coredis' unclosed streams after a connection attempt to a stopped Redis
    # (tests/relay/_trio/test_redis_state.py).
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <function MemoryObject"
        ":pytest.PytestUnraisableExceptionWarning"
    ),
]

NODES: Final = ("node-a", "node-b", "node-c")
DEVICE_ID: Final = "crash-00000"  # the id crash_harness.start_agent enrolls
HEARTBEAT_S: Final = 0.5
#: A node's death is seen within its announcement's life (two heartbeats),
#: two more heartbeats of grace and one check; the rest is slack for a loaded
#: CI machine. The keepalive budget of the BRIEF (30 s) is far above it.
NODE_DEATH_BUDGET_S: Final = 10.0
TRANSFER_BYTES: Final = 2 * 1024 * 1024
#: The cap of the sessions of the cap test (short, with room for the on-site
#: End to come first in the test before it).
CAP_S: Final = 6


@dataclass
class Fleet:
    """The three nodes, the agent and the engineer of one test."""

    world: World  # node A's files; its store access and accounts serve all
    nodes: dict[str, BrokerProcess]
    redis: RedisServer
    service_port: int
    agent: Agent | None = None
    engineer: Engineer | None = None
    tokens: dict[str, Credentials] = field(default_factory=dict)

    def audit(self, node_id: str) -> list[dict[str, Any]]:
        return list(read_records(self.nodes[node_id].data_dir / "audit"))

    def credentials(self, node_id: str = "node-a") -> Credentials:
        """The engineer, logged in once on node A: the token is in the shared
        store, so every node takes it (a second login within the TOTP step
        would be a code reused, and refused)."""
        if "node-a" not in self.tokens:
            assert self.engineer is not None
            self.tokens["node-a"] = self.world.login(self.engineer)
        return self.tokens["node-a"]

    def api(self, node_id: str, credentials: Credentials) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.nodes[node_id].engineer_url,
            verify=ssl.create_default_context(cafile=str(self.world.ca_file)),
            headers={"Authorization": f"Bearer {credentials.token}"},
            timeout=15,
        )

    async def device_on(self, node_id: str, within_s: float = 20.0) -> None:
        """Wait until Redis says the device's control channel is on *node_id*."""
        client: coredis.Redis[str] = coredis.Redis.from_url(
            self.redis.url, decode_responses=True
        )
        async with client:
            with trio.fail_after(within_s):
                while await client.get(f"relay:presence:{DEVICE_ID}") != node_id:  # noqa: ASYNC110 - state in Redis
                    await trio.sleep(HEARTBEAT_S / 4)


@contextlib.asynccontextmanager
async def fleet(
    root: Path,
    postgres: PostgresCluster,
    redis: RedisServer,
    nursery: trio.Nursery,
    *,
    cap_s: int = 3600,
) -> AsyncIterator[Fleet]:
    """Three nodes, an echo service behind the agent, the agent on node B
    (through the balancer), an engineer account."""
    service_port = await _echo_service(nursery)
    world = World(root=root)
    nodes = {"node-a": world.broker}
    nodes.update((node_id, world.add_node(node_id)) for node_id in NODES[1:])
    database_url = postgres.new_database()
    for node_id, node in nodes.items():
        node.write_node_config(
            node_id,
            database_url=database_url,
            redis_url=redis.url,
            cluster={
                "heartbeat_s": HEARTBEAT_S,
                "command_deadline_s": 3.0,
                "redis_timeout_s": 0.5,
            },
            sessions={
                "allowed_channels": [f"tcp:{service_port}"],
                "max_session_seconds": cap_s,
            },
        )
    f = Fleet(world=world, nodes=nodes, redis=redis, service_port=service_port)
    try:
        for node in nodes.values():
            await trio.to_thread.run_sync(node.start)
        balancer = await nursery.start(
            _first_alive, [nodes["node-b"].device_port, nodes["node-c"].device_port]
        )
        f.agent = await trio.to_thread.run_sync(
            lambda: start_agent(
                world, service_port, FAST_AGENT_CONFIG, f"wss://{LOOPBACK}:{balancer}"
            )
        )
        f.engineer = await trio.to_thread.run_sync(world.add_engineer)
        await f.device_on("node-b")
        yield f
    finally:
        with trio.CancelScope(shield=True):
            if f.agent is not None:
                await trio.to_thread.run_sync(f.agent.stop)
            for node in nodes.values():
                await trio.to_thread.run_sync(node.stop)


async def _echo_service(nursery: trio.Nursery) -> int:
    """The instrument's service on 127.0.0.1: echoes what it gets."""

    async def echo(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async with stream:
                while data := await stream.receive_some(64 * 1024):
                    await stream.send_all(data)

    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    nursery.start_soon(trio.serve_listeners, echo, listeners)
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def _first_alive(
    backends: list[int], *, task_status: trio.TaskStatus[int]
) -> None:
    """A TCP balancer: each connection goes to the first backend that takes it."""

    async def relay(client: trio.SocketStream) -> None:
        upstream = None
        for port in backends:
            with contextlib.suppress(OSError):
                upstream = await trio.open_tcp_stream(LOOPBACK, port)
                break
        async with client:
            if upstream is None:
                return
            async with upstream, trio.open_nursery() as pair:
                pair.start_soon(_pipe, client, upstream, pair.cancel_scope)
                pair.start_soon(_pipe, upstream, client, pair.cancel_scope)

    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(relay, listeners)


async def _pipe(
    source: trio.SocketStream, sink: trio.SocketStream, both: trio.CancelScope
) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while data := await source.receive_some(64 * 1024):
            await sink.send_all(data)
    both.cancel()  # one side went: the other goes too, as a balancer does


@dataclass
class Crossing:
    """One session the engineer runs from node A: its forward and its end."""

    session_id: str = ""
    outcome: SessionOutcome | None = None
    error: BaseException | None = None
    ports: list[int] = field(default_factory=list)
    ended: trio.Event = field(default_factory=trio.Event)
    ended_at: float = 0.0


async def start_crossing(f: Fleet, nursery: trio.Nursery) -> Crossing:
    """Request a forward on node A; the person allows it on the device UI;
    return once the forward's local port is open."""
    crossing = Crossing()
    credentials = f.credentials("node-a")

    async def engineer() -> None:
        try:
            crossing.outcome = await run_session(
                credentials,
                device_id=DEVICE_ID,
                reason="ticket 11: three nodes",
                channels=[f"tcp:{f.service_port}"],
                work=forward_to(f.service_port, crossing.ports),
                out=io.StringIO(),
            )
        except Exception as exc:
            crossing.error = exc
        finally:
            crossing.ended_at = trio.current_time()
            crossing.ended.set()

    nursery.start_soon(engineer)
    assert f.agent is not None
    async with httpx.AsyncClient(base_url=f.agent.ui_url) as ui:
        crossing.session_id = await grant_on_the_device_ui(ui)
    with trio.fail_after(20):
        while not crossing.ports:  # noqa: ASYNC110 - set by the session's work
            await trio.sleep(0.02)
    return crossing


async def echo_through(crossing: Crossing, size: int) -> tuple[str, str]:
    """Send *size* random bytes through the forward to the instrument's echo
    service; the SHA-256 of what was sent and of what came back."""
    payload = os.urandom(size)
    back = hashlib.sha256()
    conn = await trio.open_tcp_stream(LOOPBACK, crossing.ports[0])
    async with conn, trio.open_nursery() as nursery:
        nursery.start_soon(conn.send_all, payload)
        received = 0
        with trio.fail_after(60):
            while received < size:
                data = await conn.receive_some(256 * 1024)
                assert data, "the forward closed before the echo came back"
                back.update(data)
                received += len(data)
    return hashlib.sha256(payload).hexdigest(), back.hexdigest()


def ends_of(records: list[dict[str, Any]], session_id: str) -> list[str]:
    return [
        r["reason"]
        for r in records
        if r.get("event") == "session.end" and r.get("session_id") == session_id
    ]


def starts_of(records: list[dict[str, Any]], session_id: str) -> int:
    return sum(
        1
        for r in records
        if r.get("event") == "session.requested" and r.get("session_id") == session_id
    )


async def wait_for(predicate: Callable[[], bool], within_s: float) -> None:
    with trio.fail_after(within_s):
        while not predicate():  # noqa: ASYNC110 - another process's state
            await trio.sleep(0.1)


async def test_a_session_across_nodes_carries_a_transfer_and_an_admin_on_node_c_ends_it(
    tmp_path: Path, postgres: PostgresCluster, redis: RedisServer, nursery: trio.Nursery
) -> None:
    """Engineer on A, device on B: 2 MiB through the forward and back, the
    SHA-256 the same both ways; an admin logged in on node C ends it (202,
    carried out by A); the engineer's client ends as ``admin``; A's audit log
    has the session's one request and one end, B's says it lent the channel."""
    async with fleet(tmp_path, postgres, redis, nursery) as f:
        crossing = await start_crossing(f, nursery)
        sent, echoed = await echo_through(crossing, TRANSFER_BYTES)
        assert sent == echoed
        admin = await trio.to_thread.run_sync(_admin_on, f, "node-c")
        async with f.api("node-c", admin) as c:
            ended = await c.delete(f"/api/v1/sessions/{crossing.session_id}")
        assert ended.status_code == 202, ended.text
        assert ended.json()["node"] == "node-a"
        with trio.fail_after(15):
            await crossing.ended.wait()
        assert crossing.error is None, crossing.error
        assert crossing.outcome is not None
        assert crossing.outcome.end_reason == "admin"
        records = f.audit("node-a")
        await wait_for(
            lambda: any(
                r.get("event") == "session.end_receipt"
                and r.get("session_id") == crossing.session_id
                for r in f.audit("node-a")
            ),
            within_s=10,
        )
        records = f.audit("node-a")
        assert starts_of(records, crossing.session_id) == 1
        assert ends_of(records, crossing.session_id) == ["admin"]
        assert any(
            r.get("event") == "session.device_lent"
            and r.get("session_id") == crossing.session_id
            and r.get("node") == "node-a"
            for r in f.audit("node-b")
        )
        assert not ends_of(f.audit("node-b"), crossing.session_id)


def _admin_on(f: Fleet, node_id: str) -> Credentials:
    """An admin account, logged in on *node_id*."""
    admin = f.world.add_engineer(role="admin")
    broker = f.world.broker
    f.world.broker = f.nodes[node_id]
    try:
        return f.world.login(admin)
    finally:
        f.world.broker = broker


async def test_one_session_per_device_across_nodes_the_on_site_end_and_the_cap(
    tmp_path: Path, postgres: PostgresCluster, redis: RedisServer, nursery: trio.Nursery
) -> None:
    """The same engineer asks for the device on all three nodes at once:
    exactly one request wins, the others are busy; the person at the
    instrument ends that session. Then, across nodes (engineer on A): the
    person's End ends the engineer's session (``onsite``) and closes the
    local stream, and the next session ends at its cap (``time_cap``)."""
    async with fleet(tmp_path, postgres, redis, nursery, cap_s=CAP_S) as f:
        results: dict[str, httpx.Response] = {}

        async def ask(node_id: str) -> None:
            async with f.api(node_id, f.credentials(node_id)) as api:
                results[node_id] = await api.post(
                    "/api/v1/sessions",
                    json={
                        "device_id": DEVICE_ID,
                        "reason": "who wins",
                        "channels": [f"tcp:{f.service_port}"],
                    },
                )

        await trio.to_thread.run_sync(f.credentials)  # the race is the request alone
        async with trio.open_nursery() as race:
            for node_id in NODES:
                race.start_soon(ask, node_id)
        statuses = sorted(r.status_code for r in results.values())
        assert statuses == [201, 409, 409], {n: r.text for n, r in results.items()}
        [winner] = [n for n, r in results.items() if r.status_code == 201]
        session_id = results[winner].json()["session_id"]
        assert f.agent is not None
        async with httpx.AsyncClient(base_url=f.agent.ui_url) as ui:
            assert await grant_on_the_device_ui(ui) == session_id
            ended = await ui.post("/api/end", json={"session_id": session_id})
            assert ended.status_code == 200, ended.text
        async with f.api(winner, f.credentials(winner)) as api:

            async def reason() -> str | None:
                view = (await api.get(f"/api/v1/sessions/{session_id}")).json()
                return view.get("end_reason")  # type: ignore[no-any-return]

            with trio.fail_after(10):
                while await reason() != "onsite":  # noqa: ASYNC110 - another process's state
                    await trio.sleep(0.1)
        assert ends_of(f.audit(winner), session_id) == ["onsite"]

        onsite = await start_crossing(f, nursery)
        sent, echoed = await echo_through(onsite, 64 * 1024)
        assert sent == echoed
        async with httpx.AsyncClient(base_url=f.agent.ui_url) as ui:
            ended = await ui.post("/api/end", json={"session_id": onsite.session_id})
            assert ended.status_code == 200, ended.text
        with trio.fail_after(10):
            await onsite.ended.wait()
        assert onsite.outcome is not None, onsite.error
        assert onsite.outcome.end_reason == "onsite"
        assert ends_of(f.audit("node-a"), onsite.session_id) == ["onsite"]

        crossing = await start_crossing(f, nursery)
        started = trio.current_time()
        with trio.fail_after(15):
            await crossing.ended.wait()
        assert crossing.outcome is not None, crossing.error
        assert crossing.outcome.end_reason == "time_cap"
        assert crossing.ended_at - started <= CAP_S + 2  # cap + 2 s (BRIEF)


async def test_node_b_killed_mid_session_and_redis_restarted(
    tmp_path: Path, postgres: PostgresCluster, redis: RedisServer, nursery: trio.Nursery
) -> None:
    """Redis restarts under a live session across nodes: the session goes on
    carrying data. Then node B (the device's) is SIGKILLed: node A ends the
    session as ``broker_crash`` within the budget, the device reconnects
    through the balancer to node C, presence follows, and a new session
    across nodes (A to C) is taken. No session is left without its end."""
    async with fleet(tmp_path, postgres, redis, nursery) as f:
        crossing = await start_crossing(f, nursery)
        sent, echoed = await echo_through(crossing, TRANSFER_BYTES // 4)
        assert sent == echoed
        redis.stop()
        await trio.sleep(HEARTBEAT_S * 3)
        redis.start()
        await trio.sleep(HEARTBEAT_S * 6)  # every node is announced again
        sent, echoed = await echo_through(crossing, TRANSFER_BYTES // 4)
        assert sent == echoed
        assert not crossing.ended.is_set()

        killed_at = trio.current_time()
        await trio.to_thread.run_sync(f.nodes["node-b"].kill)
        with trio.fail_after(NODE_DEATH_BUDGET_S + 5):
            await crossing.ended.wait()
        assert crossing.outcome is not None, crossing.error
        assert crossing.outcome.end_reason == "broker_crash"
        assert crossing.ended_at - killed_at <= NODE_DEATH_BUDGET_S
        records = f.audit("node-a")
        assert ends_of(records, crossing.session_id) == ["broker_crash"]
        assert any(
            r.get("event") == "cluster.node_lost" and r.get("node") == "node-b"
            for r in records
        )

        await f.device_on("node-c")
        second = await start_crossing(f, nursery)
        sent, echoed = await echo_through(second, 64 * 1024)
        assert sent == echoed
        async with f.api("node-a", f.credentials("node-a")) as api:
            done = await api.delete(f"/api/v1/sessions/{second.session_id}")
            assert done.status_code == 200, done.text
        with trio.fail_after(15):
            await second.ended.wait()
        assert second.outcome is not None
        assert second.outcome.end_reason == "engineer"
        assert ends_of(f.audit("node-a"), second.session_id) == ["engineer"]
