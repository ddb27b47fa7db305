"""The cluster node's heartbeat on a real Redis: what it writes, and how often."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import coredis
import pytest
import structlog
import trio

from relay._trio.cluster_node import ClusterNode
from relay.config import ClusterConfig
from relay.metrics import RelayMetrics
from tests.redis_server import RedisServer

pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <function MemoryObject"
    ":pytest.PytestUnraisableExceptionWarning"
)

HEARTBEAT_S = 0.1
REFRESH_S = 1.0


async def _no_command(command: object) -> None:
    raise AssertionError(f"no command expected: {command}")


@asynccontextmanager
async def running(
    redis: RedisServer, devices: dict[str, int], nursery: trio.Nursery
) -> AsyncIterator[ClusterNode]:
    node = ClusterNode(
        ClusterConfig(
            redis_url=redis.url,
            node_id="node-a",
            heartbeat_s=HEARTBEAT_S,
            presence_refresh_s=REFRESH_S,
            redis_timeout_s=0.5,
        ),
        node_id="node-a",
        local_devices=lambda: devices,
        metrics=RelayMetrics(),
        log=structlog.get_logger("test"),
    )
    scope, done = trio.CancelScope(), trio.Event()

    async def run(task_status: trio.TaskStatus[None]) -> None:
        try:
            with scope:
                await node.run(_no_command, info={}, task_status=task_status)
        finally:
            done.set()

    await nursery.start(run)
    try:
        yield node
    finally:
        scope.cancel()
        await done.wait()
        # coredis' unclosed anyio streams are collected here, in this
        # module (whose filter lets their warning pass), not in a later one.
        gc.collect()


@asynccontextmanager
async def keys(redis: RedisServer) -> AsyncIterator[coredis.Redis[str]]:
    client: coredis.Redis[str] = coredis.Redis.from_url(
        redis.url, decode_responses=True
    )
    async with client:
        yield client
    gc.collect()


async def test_presence_is_written_on_arrival_and_refreshed_rarely(
    redis: RedisServer, nursery: trio.Nursery
) -> None:
    """Not every heartbeat: a device's key is written when its channel
    arrives, then once per refresh period; a new channel (a reconnection)
    writes it at once; a channel gone withdraws it at the next beat."""
    devices = {"dev-1": 1}
    async with running(redis, devices, nursery) as node, keys(redis) as k:
        key = "relay:presence:dev-1"
        assert await k.get(key) == "node-a"
        assert await node.device_node("dev-1") == "node-a"
        first = await k.pttl(key)
        await trio.sleep(HEARTBEAT_S * 4)  # beats, but no write
        before = await k.pttl(key)
        assert before <= first - HEARTBEAT_S * 3 * 1000
        devices["dev-1"] = 2  # the device reconnected
        await trio.sleep(HEARTBEAT_S * 2)
        assert await k.pttl(key) > before + HEARTBEAT_S * 1000
        await trio.sleep(REFRESH_S * 1.2)  # refreshed within its period
        assert await k.pttl(key) > (2 * REFRESH_S - 0.5) * 1000
        del devices["dev-1"]
        await trio.sleep(HEARTBEAT_S * 2)
        assert await k.get(key) is None


async def test_presence_comes_back_after_redis_lost_it(
    redis: RedisServer, nursery: trio.Nursery
) -> None:
    """Redis restarted empty: the next announcement finds its predecessor
    gone, and every presence is written again at once."""
    devices = {"dev-1": 1, "dev-2": 7}
    async with running(redis, devices, nursery), keys(redis) as k:
        redis.restart()
        with trio.fail_after(5):
            while await _get(k, "relay:presence:dev-2") != "node-a":  # noqa: ASYNC110 - state in Redis
                await trio.sleep(HEARTBEAT_S / 2)
        assert await k.get("relay:presence:dev-1") == "node-a"


async def _get(k: coredis.Redis[str], key: str) -> str | None:
    try:
        return await k.get(key)
    except (coredis.exceptions.RedisError, OSError):
        return None


async def test_refreshes_of_devices_that_came_together_are_spread(
    redis: RedisServer, nursery: trio.Nursery
) -> None:
    """Fifty devices arrive in one beat (a reconnection storm); their refresh
    is spread over several beats (twice the even share per beat), and every
    key is refreshed before it expires."""
    devices = {f"dev-{n}": n for n in range(50)}
    async with running(redis, devices, nursery), keys(redis) as k:
        await trio.sleep(REFRESH_S + HEARTBEAT_S * 1.5)  # the first beats of refresh
        ttls = [await k.pttl(f"relay:presence:dev-{n}") for n in range(50)]
        refreshed = sum(1 for ttl in ttls if ttl > (2 * REFRESH_S - 0.3) * 1000)
        assert 0 < refreshed < 50, ttls
        await trio.sleep(REFRESH_S)
        ttls = [await k.pttl(f"relay:presence:dev-{n}") for n in range(50)]
        assert all(ttl > 0 for ttl in ttls), ttls
