"""Several broker nodes on one PostgreSQL and one Redis (issue 11).

Two or three brokers run in this process, each with its own data directory
(its own audit log and node id; the CA and the TOTP sealing key copied, as an
operator shares them), all on one PostgreSQL database and one Redis that the
tests start. What is checked here: presence names the node that holds a
device and goes when the node goes; a session holds the device's fleet-wide
lock for exactly its life; an admin on one node ends a session another node
holds; Redis away refuses new sessions with a clear answer while a live
session keeps its guarantees, and a Redis restart is survived.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import coredis
import httpx
import pytest
import trio

from relay._trio.broker import serve_broker
from relay._trio.fleet_notice import notify_fleet
from relay._trio.session_broker import SessionBroker
from relay.audit_reader import read_records
from relay.config import ClusterConfig, ListenAddress
from relay.metrics import RelayMetrics
from relay.pki_files import DataDir
from relay.proto import control
from relay.proto.close import CloseCode
from relay.proto.node_command import CommandKind
from relay.store import RemoteSessionRecord
from tests.e2e.conftest import (
    PKI,
    RunningBroker,
    add_engineer,
    api_client,
    login_token,
    make_pki,
    short_config,
    wait_until,
)
from tests.e2e.test_sessions_broker import (
    DEVICE,
    Harness,
    active_session,
    attach,
    device_closed,
    engineer_closed,
    fake_device,
    harness,
    requested,
)
from tests.pg_cluster import PostgresCluster
from tests.redis_server import RedisServer

# See tests/relay/_trio/test_redis_state.py: coredis' unclosed streams after a
# connection attempt to a stopped Redis.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <function MemoryObject"
    ":pytest.PytestUnraisableExceptionWarning"
)

HEARTBEAT_S = 0.2


@pytest.fixture
def pki(tmp_path: Path, postgres: PostgresCluster, redis: RedisServer) -> PKI:
    """Node A's data dir; the store on PostgreSQL, the cluster on Redis."""
    return make_pki(
        tmp_path / "node-a",
        database_url=postgres.new_database(),
        cluster=ClusterConfig(
            redis_url=redis.url,
            node_id="node-a",
            heartbeat_s=HEARTBEAT_S,
            command_deadline_s=3.0,
            redis_timeout_s=0.5,
        ),
    )


@dataclass
class Node:
    broker: RunningBroker
    api: httpx.AsyncClient
    admin_token: str
    sessions: SessionBroker

    def admin(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.admin_token}"}


@asynccontextmanager
async def another_node(
    h: Harness,
    nursery: trio.Nursery,
    node_id: str,
    *,
    device_listen: ListenAddress | None = None,
    **cluster: Any,
) -> AsyncIterator[Node]:
    """A second broker beside the harness's, with an admin logged in on it;
    *cluster* changes its ``[cluster]`` table beyond its node id."""
    data_dir = h.pki.data_dir.parent / node_id
    for part in ("ca", "secrets"):  # shared by the operator, not made per node
        shutil.copytree(h.pki.data_dir / part, data_dir / part)
    base = h.broker.config
    config = dataclasses.replace(
        base,
        data_dir=data_dir,
        device_listen=device_listen or base.device_listen,
        cluster=dataclasses.replace(base.cluster, node_id=node_id, **cluster),
    )
    metrics, shutdown = RelayMetrics(), trio.Event()
    found: list[SessionBroker] = []
    ports = await nursery.start(
        lambda task_status: serve_broker(
            config,
            shutdown,
            metrics=metrics,
            sessions_hook=found.append,
            task_status=task_status,
        )
    )
    secret = add_engineer(h.pki, f"root-{node_id}", role="admin")
    try:
        async with api_client(h.pki, ports.engineer) as api:
            token = await login_token(api, f"root-{node_id}", secret)
            yield Node(
                RunningBroker(ports, config, metrics, shutdown), api, token, found[0]
            )
    finally:
        shutdown.set()


@asynccontextmanager
async def redis_keys(redis: RedisServer) -> AsyncIterator[coredis.Redis[str]]:
    client: coredis.Redis[str] = coredis.Redis.from_url(
        redis.url, decode_responses=True
    )
    async with client:
        yield client


async def key_becomes(
    keys: coredis.Redis[str], key: str, value: str | None, *, within_s: float
) -> None:
    """Poll *key* until it holds *value* (None: gone); fail after *within_s*."""
    with trio.fail_after(within_s):
        while await keys.get(key) != value:  # noqa: ASYNC110 - state in Redis
            await trio.sleep(HEARTBEAT_S / 4)


async def test_presence_names_the_node_and_goes_with_it(
    pki: PKI, nursery: trio.Nursery, redis: RedisServer
) -> None:
    async with harness(pki, nursery) as h, redis_keys(redis) as keys:
        async with fake_device(h):
            await wait_until(
                lambda: h.broker.sample("relay_redis_up") == 1, timeout_s=5
            )
            key = f"relay:presence:{DEVICE}"
            await key_becomes(keys, key, "node-a", within_s=5)
            assert await keys.get("relay:node:node-a") is not None
        # The device left: its presence is withdrawn at the next heartbeat.
        await key_becomes(keys, key, None, within_s=HEARTBEAT_S * 3)


async def test_a_session_holds_the_device_lock_for_its_life(
    pki: PKI, nursery: trio.Nursery, redis: RedisServer
) -> None:
    async with (
        harness(pki, nursery) as h,
        redis_keys(redis) as keys,
        fake_device(h) as device,
    ):
        offer = await requested(h, device)
        lock = f"relay:device-lock:{DEVICE}"
        assert await keys.get(lock) == offer.session_id
        # Kept past its own lifetime of two heartbeats.
        await trio.sleep(HEARTBEAT_S * 4)
        assert await keys.get(lock) == offer.session_id
        # Another node's lock on the device makes this node's request busy
        # (the session above is cancelled first, so only the lock says no).
        response = await h.api.delete(
            f"/api/v1/sessions/{offer.session_id}", headers=h.headers()
        )
        assert response.status_code == 200, response.text
        await key_becomes(keys, lock, None, within_s=HEARTBEAT_S * 3)
        withdrawn = await device.next_event()
        assert isinstance(withdrawn, control.OfferWithdrawn)
        await keys.set(lock, "f" * 32, px=10_000)
        busy = await h.request()
        assert (busy.status_code, busy.json()) == (409, {"error": "busy"})
        await keys.delete([lock])
        await requested(h, device)


async def test_an_admin_on_another_node_ends_the_session(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """The session lives on node A (device and engineer there); node C's admin
    ends it: node A ends it as an admin end and confirms; C answers 202."""
    async with (
        harness(pki, nursery) as h,
        fake_device(h) as device,
        another_node(h, nursery, "node-c") as c,
    ):
        async with active_session(h, device) as (offer, _tun, eng):
            response = await c.api.delete(
                f"/api/v1/sessions/{offer.session_id}", headers=c.admin()
            )
            assert response.status_code == 202, response.text
            assert response.json() == {
                "session_id": offer.session_id,
                "state": "ended",
                "node": "node-a",
            }
            seen, reason = await engineer_closed(eng)
            assert reason.reason == "admin"
            assert {"type": "end", "reason": "admin"} in seen
            end = await device.next_event()
            assert isinstance(end, control.SessionEnd)
            await device.send(device.ended(offer, "admin"))
        assert (
            c.broker.sample(
                "relay_node_commands_total", kind="end_session", outcome="confirmed"
            )
            == 1
        )
        assert (
            h.broker.sample(
                "relay_node_commands_total",
                kind="end_session",
                outcome="carried_out",
            )
            == 1
        )
        # Its row in the shared store says so: a second end is 409.
        with h.pki.store() as store:

            def row_ended() -> bool:
                row = store.get_remote_session(offer.session_id)
                return row is not None and row.end_reason == "admin"

            await wait_until(row_ended)
        again = await c.api.delete(
            f"/api/v1/sessions/{offer.session_id}", headers=c.admin()
        )
        assert again.status_code == 409, again.text


async def test_a_device_on_another_node_is_named_in_the_refusal(
    pki: PKI, nursery: trio.Nursery
) -> None:
    async with (
        harness(pki, nursery) as h,
        fake_device(h),
        another_node(h, nursery, "node-c") as c,
    ):
        await wait_until(lambda: c.broker.sample("relay_redis_up") == 1)
        await trio.sleep(HEARTBEAT_S * 2)  # node A's presence is written
        response = await c.api.post(
            "/api/v1/sessions",
            headers=c.admin(),
            json={"device_id": DEVICE, "reason": "r", "channels": ["shell"]},
        )
        assert response.status_code == 503
        assert "node-a" in response.json()["error"]


async def test_redis_away_refuses_new_sessions_and_spares_live_ones(
    pki: PKI, nursery: trio.Nursery, redis: RedisServer
) -> None:
    """Redis stops: a new request is refused (503, says why); the live session
    relays on and its engineer ends it; Redis comes back empty: a new session
    is taken, with its lock."""
    async with harness(pki, nursery) as h, fake_device(h) as device:
        async with active_session(h, device) as (offer, _tun, _eng):
            redis.stop()
            await wait_until(lambda: h.broker.sample("relay_redis_up") == 0)
            ended = await h.api.delete(
                f"/api/v1/sessions/{offer.session_id}", headers=h.headers()
            )
            assert ended.status_code == 200, ended.text
        end = await device.next_event()
        assert isinstance(end, control.SessionEnd)
        await device.send(device.ended(offer, "engineer"))
        refused = await h.request()
        assert refused.status_code == 503
        assert "shared state unavailable" in refused.json()["error"]
        redis.start()
        await wait_until(lambda: h.broker.sample("relay_redis_up") == 1, timeout_s=5)
        offer = await requested(h, device)
        async with redis_keys(redis) as keys:
            assert await keys.get(f"relay:device-lock:{DEVICE}") == offer.session_id


async def relay_cli_on(h: Harness, redis: RedisServer, *args: str) -> str:
    """Run `relay ARGS` as an operator does on node A (its data dir, the shared
    database and Redis); its stderr, once it exited 0."""
    with trio.fail_after(30):
        done = await trio.run_process(
            [sys.executable, "-m", "relay", *args],
            env={
                **os.environ,
                "RELAY_DATA_DIR": str(h.pki.data_dir),
                "RELAY_DATABASE_URL": h.broker.config.effective_database_url,
                "RELAY_CLUSTER__REDIS_URL": redis.url,
            },
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    err = done.stderr.decode()
    assert done.returncode == 0, err
    return err


async def test_a_revocation_and_a_disabled_user_reach_every_node_at_once(
    tmp_path: Path, postgres: PostgresCluster, redis: RedisServer, nursery: trio.Nursery
) -> None:
    """What `relay device revoke` and `relay user disable` send after they
    changed the store: every live node reads its feed at once and confirms.
    The feeds here are polled every 30 s, so only the command can close the
    device's channel (4001) and the engineer's socket (4004) within a second."""
    config = short_config(tmp_path / "node-a")
    pki = make_pki(
        tmp_path / "node-a",
        database_url=postgres.new_database(),
        cluster=ClusterConfig(
            redis_url=redis.url, node_id="node-a", heartbeat_s=HEARTBEAT_S
        ),
        device_listener=dataclasses.replace(
            config.device_listener, revocation_poll_s=30.0
        ),
        engineer_listener=dataclasses.replace(
            config.engineer_listener, revocation_poll_s=30.0
        ),
    )
    async with (
        harness(pki, nursery) as h,
        fake_device(h) as device,
        another_node(h, nursery, "node-c"),
    ):
        await wait_until(lambda: h.broker.sample("relay_redis_up") == 1)
        offer = await requested(h, device)
        async with attach(h, offer.session_id) as eng:
            with h.pki.store() as store:
                store.disable_user("alice", at=datetime.now(UTC), reason="test")
            with trio.fail_after(5):
                confirmed = await notify_fleet(
                    h.broker.config.cluster,
                    CommandKind.DISABLE_USER,
                    {"username": "alice"},
                )
            assert confirmed == {"node-a": True, "node-c": True}
            _, reason = await engineer_closed(eng, within_s=1.0)
            assert reason.code == CloseCode.LOGIN_ENDED
        # The command-line tool itself, as an operator runs it on a node.
        err = await relay_cli_on(h, redis, "device", "revoke", DEVICE)
        assert "node node-a: done" in err
        assert "node node-c: done" in err
        closed = await device_closed(device.ws, within_s=1.0)
        assert closed.code == CloseCode.REVOKED


async def test_sessions_a_node_left_open_are_ended_when_it_stays_gone(
    tmp_path: Path, postgres: PostgresCluster, redis: RedisServer, nursery: trio.Nursery
) -> None:
    """A node that died for good left two rows open; after `orphan_after_s`
    a surviving node ends them as broker_crash and logs each end, naming the
    dead node. A row of a node that is alive is not touched."""
    pki = make_pki(
        tmp_path / "node-a",
        database_url=postgres.new_database(),
        cluster=ClusterConfig(
            redis_url=redis.url,
            node_id="node-a",
            heartbeat_s=HEARTBEAT_S,
            orphan_after_s=1.0,
            orphan_check_s=1.0,
        ),
    )
    now = datetime.now(UTC)
    with pki.store() as store:
        for session_id, node in (("a" * 32, "node-x"), ("b" * 32, "node-x")):
            store.record_session_request(_row(session_id, node, now))
    async with harness(pki, nursery) as h, another_node(h, nursery, "node-c"):
        with h.pki.store() as store:
            store.record_session_request(_row("c" * 32, "node-c", now))

            def ended(session_id: str) -> str | None:
                row = store.get_remote_session(session_id)
                return None if row is None else row.end_reason

            await wait_until(
                lambda: ended("a" * 32) == ended("b" * 32) == "broker_crash",
                timeout_s=10,
            )
            await trio.sleep(1.5)  # one more look of each node
            assert ended("c" * 32) is None
    ends = [
        r
        for r in read_records(DataDir(pki.data_dir).audit_dir)
        if r.get("event") == "session.end"
    ]
    ends += [
        r
        for r in read_records(DataDir(tmp_path / "node-c").audit_dir)
        if r.get("event") == "session.end"
    ]
    assert sorted(r["session_id"] for r in ends) == ["a" * 32, "b" * 32]
    assert {(r["reason"], r["node"]) for r in ends} == {("broker_crash", "node-x")}


def _row(session_id: str, node_id: str, at: datetime) -> RemoteSessionRecord:
    return RemoteSessionRecord(
        session_id=session_id,
        node_id=node_id,
        device_id="dev-gone",
        engineer="alice",
        reason="left open",
        channels=("shell",),
        source="127.0.0.1",
        device_fingerprint="ab" * 32,
        requested_at=at,
        start_seq=1,
    )


async def test_relay_policy_reload_reaches_every_node(
    pki: PKI, nursery: trio.Nursery, redis: RedisServer
) -> None:
    """`relay policy reload` has every live node load its policy now and
    prints each confirmation (exit 0); each node's log has the load."""
    async with harness(pki, nursery) as h, another_node(h, nursery, "node-c") as c:
        await wait_until(lambda: c.broker.sample("relay_redis_up") == 1)
        await trio.sleep(HEARTBEAT_S * 2)  # both announced
        err = await relay_cli_on(h, redis, "policy", "reload")
        assert "node node-a: done" in err
        assert "node node-c: done" in err
        for node in (h, c):
            assert (
                node.broker.sample(
                    "relay_node_commands_total",
                    kind="policy_reload",
                    outcome="carried_out",
                )
                == 1
            )
