"""Commands between nodes on a real Redis: confirmed, retried, never carried out twice."""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio

from relay._trio.node_bus import CommandNotConfirmed, NodeBus
from relay._trio.redis_state import redis_client
from relay.proto.node_command import CommandKind, NodeCommand
from tests.redis_server import RedisServer

# See test_redis_state.py: coredis' unclosed streams after a failed connect.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <function MemoryObject"
    ":pytest.PytestUnraisableExceptionWarning"
)

END = CommandKind.END_SESSION
END_ARGS = {"session_id": "0" * 32, "reason": "admin"}


@dataclass
class Node:
    bus: NodeBus
    done: list[NodeCommand] = field(default_factory=list)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    listeners: trio.Nursery | None = None

    async def start(self) -> None:
        """Listen on this node's channel (until the cluster ends)."""
        assert self.listeners is not None
        await self.listeners.start(self.bus.run)


@asynccontextmanager
async def cluster(
    redis: RedisServer,
    nursery: trio.Nursery,
    names: tuple[str, ...] = ("node-a", "node-b"),
    *,
    handler: Callable[[Node, NodeCommand], Awaitable[None]] | None = None,
    inbox_size: int = 64,
    start: tuple[str, ...] | None = None,
) -> AsyncIterator[dict[str, Node]]:
    """Nodes with their own clients; those in *start* (default all) listening."""
    async with AsyncExitStack() as stack:
        nodes: dict[str, Node] = {}
        for name in names:
            client = await stack.enter_async_context(
                redis_client(redis.url, timeout_s=1.0)
            )

            async def handle(command: NodeCommand, name: str = name) -> None:
                node = nodes[name]
                if handler is not None:
                    await handler(node, command)
                node.done.append(command)

            outcomes: Counter[tuple[str, str]] = Counter()

            def count(
                kind: str, outcome: str, c: Counter[tuple[str, str]] = outcomes
            ) -> None:
                c.update([(kind, outcome)])

            bus = NodeBus(
                client,
                node_id=name,
                prefix="test",
                handler=handle,
                retry_s=0.1,
                probe_s=0.5,
                inbox_size=inbox_size,
                outcome=count,
            )
            nodes[name] = Node(bus, outcomes=outcomes)
        # The listeners end before the clients close (the exit stack), as in
        # the broker: a pub/sub cancelled after its client closed would fail.
        async with trio.open_nursery() as listeners:
            for node in nodes.values():
                node.listeners = listeners
            for name in start if start is not None else names:
                await nodes[name].start()
            yield nodes
            listeners.cancel_scope.cancel()
    gc.collect()


async def test_a_command_is_carried_out_once_and_confirmed(
    redis: RedisServer, nursery: trio.Nursery
) -> None:
    async with cluster(redis, nursery) as n:
        await n["node-a"].bus.send("node-b", END, END_ARGS, deadline_s=5)
        assert [c.args for c in n["node-b"].done] == [END_ARGS]
        assert n["node-a"].outcomes[("end_session", "confirmed")] == 1
        assert n["node-b"].outcomes[("end_session", "carried_out")] == 1


async def test_a_node_that_listens_late_still_gets_it_once(
    redis: RedisServer, nursery: trio.Nursery
) -> None:
    """Pub/sub drops what nobody hears; the resends reach node-b once it listens."""
    async with cluster(redis, nursery, start=("node-a",)) as n:
        async with trio.open_nursery() as inner:
            inner.start_soon(
                lambda: n["node-a"].bus.send("node-b", END, END_ARGS, deadline_s=5)
            )
            await trio.sleep(0.5)  # several attempts go nowhere
            assert n["node-b"].done == []
            await n["node-b"].start()
        assert len(n["node-b"].done) == 1


async def test_an_absent_node_is_not_confirmed(
    redis: RedisServer, nursery: trio.Nursery
) -> None:
    async with cluster(redis, nursery) as n:
        started = trio.current_time()
        with pytest.raises(CommandNotConfirmed, match="node-x"):
            await n["node-a"].bus.send(
                "node-x", CommandKind.POLICY_RELOAD, deadline_s=0.5
            )
        assert 0.5 <= trio.current_time() - started < 2
        assert n["node-a"].outcomes[("policy_reload", "unconfirmed")] == 1


async def test_a_lost_ack_is_answered_without_doing_it_again(
    redis: RedisServer, nursery: trio.Nursery
) -> None:
    """node-b is slower than the retry: copies pile up, it acts once, acks each."""

    async def slow(node: Node, command: NodeCommand) -> None:
        await trio.sleep(0.35)

    async with cluster(redis, nursery, handler=slow) as n:
        await n["node-a"].bus.send(
            "node-b", CommandKind.REVOKE_DEVICE, {"device_id": "d"}, deadline_s=5
        )
        await trio.sleep(0.5)  # the copies still in flight arrive
        assert len(n["node-b"].done) == 1
        assert n["node-b"].outcomes[("revoke_device", "repeated")] >= 1


async def test_a_failed_handler_is_not_confirmed_until_it_succeeds(
    redis: RedisServer, nursery: trio.Nursery
) -> None:
    failures = [RuntimeError("store away"), RuntimeError("still away")]

    async def flaky(node: Node, command: NodeCommand) -> None:
        if failures:
            raise failures.pop()

    async with cluster(redis, nursery, handler=flaky) as n:
        await n["node-a"].bus.send(
            "node-b", CommandKind.DISABLE_USER, {"username": "bob"}, deadline_s=5
        )
        assert len(n["node-b"].done) == 1
        assert n["node-b"].outcomes[("disable_user", "failed")] == 2


async def revoke(node: Node, device_id: str) -> None:
    await node.bus.send(
        "node-b", CommandKind.REVOKE_DEVICE, {"device_id": device_id}, deadline_s=10
    )


async def test_a_full_inbox_drops_and_the_resend_brings_it(
    redis: RedisServer, nursery: trio.Nursery
) -> None:
    """Twenty commands at once into an inbox of two behind a slow worker: some
    are dropped (counted), every one is still carried out exactly once."""

    async def slow(node: Node, command: NodeCommand) -> None:
        await trio.sleep(0.02)

    async with cluster(redis, nursery, handler=slow, inbox_size=2) as n:
        async with trio.open_nursery() as senders:
            for i in range(20):
                senders.start_soon(revoke, n["node-a"], f"d{i}")
        done = sorted(c.args["device_id"] for c in n["node-b"].done)
        assert done == sorted(f"d{i}" for i in range(20))
        assert n["node-b"].outcomes[("revoke_device", "inbox_full")] > 0


async def test_malformed_messages_are_refused_and_the_bus_goes_on(
    redis: RedisServer, nursery: trio.Nursery
) -> None:
    async with (
        cluster(redis, nursery) as n,
        redis_client(redis.url, timeout_s=1.0) as raw,
    ):
        channel = n["node-b"].bus.channel("node-b")
        hostile = [
            "not json",
            "[]",
            '{"type": "command"}',
            '{"type":"command","id":"'
            + "0" * 32
            + '","from":"x","kind":"rm -rf","args":{}}',
            "x" * 10_000,
        ]
        for text in hostile:
            await raw.publish(channel, text)
        await n["node-a"].bus.send("node-b", END, END_ARGS, deadline_s=5)
        assert len(n["node-b"].done) == 1
        assert n["node-b"].outcomes[("-", "malformed")] == len(hostile)


async def test_a_command_survives_a_redis_restart(
    redis: RedisServer, nursery: trio.Nursery
) -> None:
    """Redis goes away while the sender tries; both nodes reconnect (node-b
    subscribes again) and the command is confirmed within its deadline."""
    async with cluster(redis, nursery) as n:
        redis.stop()
        async with trio.open_nursery() as inner:
            inner.start_soon(
                lambda: n["node-a"].bus.send("node-b", END, END_ARGS, deadline_s=10)
            )
            await trio.sleep(0.5)
            redis.start()
        assert len(n["node-b"].done) == 1


async def test_a_command_to_this_node_runs_here(
    redis: RedisServer, nursery: trio.Nursery
) -> None:
    async with cluster(redis, nursery, ("node-a",)) as n:
        await n["node-a"].bus.send("node-a", CommandKind.POLICY_RELOAD, deadline_s=1)
        assert [c.kind for c in n["node-a"].done] == [CommandKind.POLICY_RELOAD]
