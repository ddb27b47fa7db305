"""Presence, device locks and live nodes on a real Redis, as three nodes see them."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio

from relay._trio.redis_state import RedisState, SharedStateUnavailable, redis_client
from tests.redis_server import RedisServer

TTL_MS = 400

# coredis 6.9 leaves an anyio memory stream pair unclosed for each connection
# attempt that fails (Redis down): anyio warns when they are collected. Nothing
# is held (they are garbage), so the warning is let through here only; the
# fixtures collect garbage before the test ends so it is seen here.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <function MemoryObject"
    ":pytest.PytestUnraisableExceptionWarning"
)
NODES = ("node-a", "node-b", "node-c")


@asynccontextmanager
async def nodes(redis: RedisServer) -> AsyncIterator[dict[str, RedisState]]:
    """One client (its own connections) per node, as separate processes would have."""
    async with AsyncExitStack() as stack:
        states = {}
        for node in NODES:
            client = await stack.enter_async_context(
                redis_client(redis.url, timeout_s=1.0)
            )
            states[node] = RedisState(client, node_id=node, prefix="test")
        yield states
    gc.collect()


async def test_presence_names_the_node_and_expires_without_refresh(
    redis: RedisServer,
) -> None:
    async with nodes(redis) as n:
        await n["node-b"].announce_node({}, 10_000)
        await n["node-b"].publish_presence(["dev-1", "dev-2"], TTL_MS)
        assert await n["node-a"].device_node("dev-1") == "node-b"
        # Refreshed: still there after the first expiry would have passed.
        await trio.sleep(TTL_MS / 1000 * 0.6)
        await n["node-b"].publish_presence(["dev-1"], TTL_MS)
        await trio.sleep(TTL_MS / 1000 * 0.6)
        assert await n["node-c"].device_node("dev-1") == "node-b"
        assert await n["node-c"].device_node("dev-2") is None  # not refreshed


async def test_presence_on_a_node_no_longer_announced_is_nowhere(
    redis: RedisServer,
) -> None:
    """A node that died stops announcing itself: its devices' keys, written
    for minutes, count for nothing once its announcement lapsed; a device's
    reconnection to another node counts at once."""
    async with nodes(redis) as n:
        await n["node-b"].announce_node({}, TTL_MS)
        await n["node-b"].publish_presence(["dev-1", "dev-2"], 60_000)
        assert await n["node-a"].device_node("dev-1") == "node-b"
        await trio.sleep(TTL_MS / 1000 * 1.5)  # node-b is gone
        assert await n["node-a"].device_node("dev-1") is None
        await n["node-c"].announce_node({}, 10_000)
        await n["node-c"].publish_presence(["dev-2"], 60_000)
        assert await n["node-a"].device_node("dev-2") == "node-c"


async def test_an_announcement_says_whether_the_last_one_was_still_there(
    redis: RedisServer,
) -> None:
    """False at the first one, True while kept, False again after Redis lost
    its data (then the node writes its presence again)."""
    async with nodes(redis) as n:
        assert await n["node-a"].announce_node({}, 10_000) is False
        assert await n["node-a"].announce_node({}, 10_000) is True
        redis.restart()
        with trio.fail_after(10):
            while True:
                try:
                    announced = await n["node-a"].announce_node({}, 10_000)
                    break
                except SharedStateUnavailable:
                    await trio.sleep(0.1)
        assert announced is False


async def test_withdrawing_presence_leaves_a_device_that_moved_on(
    redis: RedisServer,
) -> None:
    """The old node's late 'disconnected' must not erase the new node's entry."""
    async with nodes(redis) as n:
        for node in NODES:
            await n[node].announce_node({}, 10_000)
        await n["node-a"].publish_presence(["dev-1"], 10_000)
        await n["node-b"].publish_presence(["dev-1"], 10_000)  # reconnected to b
        assert await n["node-a"].withdraw_presence("dev-1") is False
        assert await n["node-c"].device_node("dev-1") == "node-b"
        assert await n["node-b"].withdraw_presence("dev-1") is True
        assert await n["node-c"].device_node("dev-1") is None


async def test_one_session_per_device_when_all_nodes_ask_at_once(
    redis: RedisServer,
) -> None:
    """Thirty requests for one device, ten on each node, at the same moment:
    exactly one takes the lock, every other is told who holds it."""
    async with nodes(redis) as n:
        answers: dict[str, str | None] = {}

        async def ask(node: str, session_id: str) -> None:
            answers[session_id] = await n[node].acquire_device(
                "dev-1", session_id, 10_000
            )

        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(ask, NODES[i % 3], f"s{i:02d}")
        winners = [s for s, holder in answers.items() if holder is None]
        assert len(winners) == 1
        assert {holder for holder in answers.values() if holder} == set(winners)
        assert await n["node-a"].device_holder("dev-1") == winners[0]


async def test_a_lock_is_released_and_kept_only_by_its_session(
    redis: RedisServer,
) -> None:
    async with nodes(redis) as n:
        a, b = n["node-a"], n["node-b"]
        assert await a.acquire_device("dev-1", "s1", TTL_MS) is None
        assert await b.release_device("dev-1", "s2") is False
        assert await b.keep_devices({"dev-1": "s2"}, TTL_MS) == ["dev-1"]
        for _ in range(3):  # kept alive past several expiries
            await trio.sleep(TTL_MS / 1000 / 2)
            assert await a.keep_devices({"dev-1": "s1"}, TTL_MS) == []
        assert await b.acquire_device("dev-1", "s2", TTL_MS) == "s1"
        assert await a.release_device("dev-1", "s1") is True
        assert await b.acquire_device("dev-1", "s2", TTL_MS) is None


async def test_a_dead_holders_lock_expires(redis: RedisServer) -> None:
    async with nodes(redis) as n:
        assert await n["node-b"].acquire_device("dev-1", "s1", TTL_MS) is None
        await trio.sleep(TTL_MS / 1000 * 1.5)  # node-b stopped keeping it
        assert await n["node-a"].acquire_device("dev-1", "s2", TTL_MS) is None


async def test_live_nodes_are_the_announced_ones(redis: RedisServer) -> None:
    async with nodes(redis) as n:
        await n["node-a"].announce_node({"device_url": "wss://a:8443"}, 10_000)
        await n["node-b"].announce_node({"device_url": "wss://b:8443"}, TTL_MS)
        assert set(await n["node-c"].live_nodes()) == {"node-a", "node-b"}
        await trio.sleep(TTL_MS / 1000 * 1.5)
        assert await n["node-c"].live_nodes() == {
            "node-a": {"device_url": "wss://a:8443"}
        }


async def test_redis_away_is_one_exception_and_a_restart_is_survived(
    redis: RedisServer,
) -> None:
    """While Redis is down every call raises SharedStateUnavailable (quickly);
    after it restarts empty, the same clients work again and the holder of a
    lock takes it back on its next keep."""
    async with nodes(redis) as n:
        a = n["node-a"]
        assert await a.acquire_device("dev-1", "s1", 10_000) is None
        redis.stop()
        calls: list[Callable[[], object]] = [
            lambda: a.publish_presence(["dev-1"], TTL_MS),
            lambda: a.withdraw_presence("dev-1"),
            lambda: a.device_node("dev-1"),
            lambda: a.acquire_device("dev-2", "s2", TTL_MS),
            lambda: a.keep_devices({"dev-1": "s1"}, TTL_MS),
            lambda: a.release_device("dev-1", "s1"),
            lambda: a.announce_node({}, TTL_MS),
            lambda: a.live_nodes(),
            lambda: a.ping(),
        ]
        for call in calls:
            with trio.fail_after(5), pytest.raises(SharedStateUnavailable):
                await call()  # type: ignore[misc]
        redis.start()
        assert await n["node-b"].device_holder("dev-1") is None  # lost in the restart
        assert await a.keep_devices({"dev-1": "s1"}, 10_000) == []
        assert await n["node-b"].acquire_device("dev-1", "s9", 10_000) == "s1"
