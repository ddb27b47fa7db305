"""What several broker nodes share on Redis: presence, device locks, live nodes.

Theory of operation
===================
One Redis serves every node of a fleet (coredis, which runs on trio). It holds
three kinds of short-lived keys, each with an expiry, so that what a dead node
held disappears by itself:

``{prefix}:presence:{device_id}`` = node id
    Where a device's control channel is. A node writes a device's key when
    the device arrives (:meth:`RedisState.publish_presence`) and refreshes it
    long before its expiry (minutes, not heartbeats: at 100,000 devices a
    write per device per heartbeat would be 50,000 writes a second), and
    removes it when the channel closes, only if the key still names this node
    (a device that moved on to another node keeps its new key). A key counts
    only while the node it names is announced (:meth:`device_node` checks
    both in one step): a node that dies stops announcing itself, so within
    two heartbeats its devices are nowhere, until their reconnections to
    other nodes write new keys. So presence converges within two heartbeats.

``{prefix}:device-lock:{device_id}`` = session id
    The one pending or active session of a device, across all nodes. Taken
    with ``SET NX PX`` when a session is requested (:meth:`acquire_device`):
    of several requests on several nodes exactly one wins. The node holding
    the session refreshes it while the session lives and deletes it at the
    end, both only if the key still holds that session's id (a script does
    the compare and the write in one step). If the holder dies, the lock
    expires.

``{prefix}:node:{node_id}`` = the node's advertised addresses (JSON)
    Which nodes are alive (:meth:`announce_node`, :meth:`live_nodes`).

Redis is never on the data path: a byte of a tunnel never waits for it. Every
failure to reach Redis (refused, timed out, restarting) surfaces as
:class:`SharedStateUnavailable`, one exception type for the callers, which
refuse what needs Redis (a new session) and keep what does not (a live
session's cap and kill are local).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final

import anyio
import coredis
import coredis.exceptions

#: The node in KEYS[1] (a presence key) if that node's announcement, KEYS[2]
#: with the node's id appended, still exists; else nil.
_PRESENT_ON: Final = """
local node = redis.call('GET', KEYS[1])
if node and redis.call('EXISTS', KEYS[2] .. node) == 1 then
    return node
end
return false
"""

#: Delete a key only if it holds ARGV[1] (compare-and-delete).
_DELETE_IF: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

#: Extend a key's expiry to ARGV[2] ms only if it holds ARGV[1]; if the key is
#: gone (Redis restarted, or it expired while Redis was out of reach), take it
#: again, unless somebody else took it meanwhile. Returns 1 held, 0 lost.
_KEEP_IF: Final = """
local value = redis.call('GET', KEYS[1])
if value == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
end
if value == false then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
end
return 0
"""


class SharedStateUnavailable(Exception):
    """Redis could not be reached or answered with an error."""


#: What a Redis call raises when Redis is away: coredis' own errors, and what
#: it lets through: the built-in TimeoutError (a command or subscription not
#: answered in time), OSError (a socket failure), and anyio's errors for a
#: connection stream that closed under it (seen when a pub/sub is cancelled
#: together with its connection, coredis 6.9).
REDIS_FAILURES: Final = (
    coredis.exceptions.RedisError,
    TimeoutError,
    OSError,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
)


@asynccontextmanager
async def redis_client(
    url: str, *, timeout_s: float
) -> AsyncIterator[coredis.Redis[str]]:
    """A connected client for *url* (``redis://`` or ``rediss://``) for the block.

    Each command waits at most *timeout_s* for a connection and for its answer.
    """
    client: coredis.Redis[str] = coredis.Redis.from_url(
        url,
        decode_responses=True,
        connect_timeout=timeout_s,
        stream_timeout=timeout_s,
    )
    async with client:
        yield client


class RedisState:
    """Presence, device locks and live nodes of one node, on a shared Redis.

    Args:
        client: A client entered with :func:`redis_client`.
        node_id: This node's id (what its presence and node keys name).
        prefix: The first part of every key, so that fleets may share a Redis.
    """

    def __init__(
        self, client: coredis.Redis[str], *, node_id: str, prefix: str
    ) -> None:
        self._client = client
        self.node_id: Final = node_id
        self._prefix = prefix
        self._delete_if = client.register_script(_DELETE_IF)
        self._keep_if = client.register_script(_KEEP_IF)
        self._present_on = client.register_script(_PRESENT_ON)

    def _key(self, kind: str, name: str) -> str:
        return f"{self._prefix}:{kind}:{name}"

    # Presence ------------------------------------------------------------------

    async def publish_presence(self, device_ids: Collection[str], ttl_ms: int) -> None:
        """Say that *device_ids* are on this node, for *ttl_ms* from now."""
        if not device_ids:
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for device_id in device_ids:
                    pipe.set(self._key("presence", device_id), self.node_id, px=ttl_ms)
        except REDIS_FAILURES as exc:
            raise SharedStateUnavailable(str(exc)) from exc

    async def withdraw_presence(self, device_id: str) -> bool:
        """Remove *device_id*'s presence if it still names this node."""
        return await self._if_holds(
            self._delete_if, self._key("presence", device_id), self.node_id
        )

    async def device_node(self, device_id: str) -> str | None:
        """The node *device_id* is connected to, if any (and still announced)."""
        try:
            node: object = await self._present_on(
                keys=[self._key("presence", device_id), self._key("node", "")]
            )
        except REDIS_FAILURES as exc:
            raise SharedStateUnavailable(str(exc)) from exc
        return node if isinstance(node, str) else None

    # Device locks --------------------------------------------------------------

    async def acquire_device(
        self, device_id: str, session_id: str, ttl_ms: int
    ) -> str | None:
        """Take *device_id*'s lock for *session_id*.

        Returns:
            None if this call took it; otherwise the id of the session that holds it.
        """
        key = self._key("device-lock", device_id)
        try:
            taken = await self._client.set(
                key, session_id, condition=coredis.PureToken.NX, px=ttl_ms
            )
            if taken:
                return None
            holder = await self._client.get(key)
        except REDIS_FAILURES as exc:
            raise SharedStateUnavailable(str(exc)) from exc
        # Released between the two commands: still not ours; the caller may
        # retry, but a busy answer is the truth of a moment ago.
        return holder if holder is not None else "(released)"

    async def keep_devices(self, held: Mapping[str, str], ttl_ms: int) -> list[str]:
        """Extend the locks this node holds (device id -> session id).

        A lock that vanished (Redis restarted empty, or it expired while Redis
        was out of reach) is taken again if nobody else took it.

        Returns:
            The device ids whose lock another session holds now.
        """
        lost: list[str] = []
        for device_id, session_id in held.items():
            kept = await self._if_holds(
                self._keep_if,
                self._key("device-lock", device_id),
                session_id,
                str(ttl_ms),
            )
            if not kept:
                lost.append(device_id)
        return lost

    async def release_device(self, device_id: str, session_id: str) -> bool:
        """Release *device_id*'s lock if *session_id* holds it."""
        return await self._if_holds(
            self._delete_if, self._key("device-lock", device_id), session_id
        )

    async def device_holder(self, device_id: str) -> str | None:
        """The session holding *device_id*'s lock, if any."""
        return await self._get(self._key("device-lock", device_id))

    # Nodes ---------------------------------------------------------------------

    async def announce_node(self, info: Mapping[str, Any], ttl_ms: int) -> bool:
        """Say that this node is alive, with *info* (its advertised addresses).

        Returns:
            Whether the previous announcement was still there. False after
            this node's first one, after it lapsed, and after Redis lost its
            data (a restart): then what this node wrote before is gone too.
        """
        try:
            previous = await self._client.set(
                self._key("node", self.node_id),
                json.dumps(dict(info), sort_keys=True),
                px=ttl_ms,
                get=True,
            )
        except REDIS_FAILURES as exc:
            raise SharedStateUnavailable(str(exc)) from exc
        return previous is not None

    async def live_nodes(self) -> dict[str, dict[str, Any]]:
        """Every node whose announcement has not expired, with its info."""
        pattern = self._key("node", "*")
        start = len(pattern) - 1
        nodes: dict[str, dict[str, Any]] = {}
        try:
            async for key in self._client.scan_iter(match=pattern, count=500):
                value = await self._client.get(key)
                if value is not None:
                    nodes[key[start:]] = json.loads(value)
        except REDIS_FAILURES as exc:
            raise SharedStateUnavailable(str(exc)) from exc
        return nodes

    async def ping(self) -> None:
        """Check that Redis answers (readiness)."""
        try:
            await self._client.ping()
        except REDIS_FAILURES as exc:
            raise SharedStateUnavailable(str(exc)) from exc

    # ---------------------------------------------------------------------------

    async def _get(self, key: str) -> str | None:
        try:
            return await self._client.get(key)
        except REDIS_FAILURES as exc:
            raise SharedStateUnavailable(str(exc)) from exc

    async def _if_holds(
        self, script: coredis.commands.Script[str], key: str, *args: str
    ) -> bool:
        try:
            result: object = await script(keys=[key], args=list(args))
        except REDIS_FAILURES as exc:
            raise SharedStateUnavailable(str(exc)) from exc
        return bool(result)


__all__ = ["REDIS_FAILURES", "RedisState", "SharedStateUnavailable", "redis_client"]
