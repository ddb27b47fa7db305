"""This broker's part in a fleet of nodes that share Redis.

Theory of operation
===================
Without ``[cluster] redis_url`` the broker is a single node and nothing here
runs. With it, :class:`ClusterNode` keeps one Redis client for the node's life
and does four things through :mod:`relay._trio.redis_state` and
:mod:`relay._trio.node_bus`:

*Heartbeat.* Every ``heartbeat_s`` it announces the node (its id and
advertised device and engineer addresses), writes the presence of the devices
that arrived since the last beat (a new control channel), refreshes the
presence of those written ``presence_refresh_s`` ago, withdraws the presence
of devices that left, and extends the device locks of its sessions. The
announcement and the locks live two heartbeats, presence two refresh periods;
a presence counts only while its node is announced, so what a node that died
held is gone for everyone within two heartbeats without anybody cleaning up.
When the announcement finds its previous one gone (the first beat, or Redis
lost its data in a restart), every presence is written again.

*Device locks.* :meth:`ClusterNode.acquire_device` is the fleet-wide half of
"one pending or active session per device" (the session broker keeps the local
half): the session broker asks before it offers a session and releases at the
session's end (:meth:`ClusterNode.release_device`, done by the heartbeat task
so that an ending session never waits on Redis). A lock whose holder is gone
expires.

*Commands.* The node's :class:`~relay._trio.node_bus.NodeBus` carries commands
to and from other nodes; :meth:`ClusterNode.send` is the way out, the handler
given to :meth:`ClusterNode.run` the way in.

*Redis away.* A failed heartbeat marks Redis down (``relay_redis_up`` 0,
``cluster.redis_unavailable`` in the log, once); the heartbeat goes on trying.
What needs Redis fails with :class:`SharedStateUnavailable` meanwhile (a new
session is refused with 503), and what does not goes on: a live session's cap,
its kill from the instrument, its end by its engineer are all local. When Redis
answers again (``cluster.redis_available``), the next beat writes presence and
takes the locks of live sessions back.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Final

import trio

from relay._trio.node_bus import Handler, NodeBus
from relay._trio.redis_state import RedisState, SharedStateUnavailable, redis_client
from relay.config import ClusterConfig
from relay.metrics import RelayMetrics
from relay.proto.node_command import CommandKind

#: Presence, locks and announcements live this many heartbeats.
LIFETIME_BEATS: Final = 2


class ClusterNode:
    """One node of a fleet on a shared Redis.

    Args:
        config: The ``[cluster]`` table (``redis_url`` set).
        node_id: This node's id.
        local_devices: Device id -> connection id of the control channels this
            node holds now.
        metrics: ``relay_redis_up``, ``relay_node_commands_total``.
        log: The broker's structured logger.
    """

    def __init__(
        self,
        config: ClusterConfig,
        *,
        node_id: str,
        local_devices: Callable[[], Mapping[str, int]],
        metrics: RelayMetrics,
        log: Any,
    ) -> None:
        if config.redis_url is None:
            raise ValueError("a cluster node needs [cluster] redis_url")
        self._redis_url: Final = config.redis_url
        self.config = config
        self.node_id: Final = node_id
        self._local_devices = local_devices
        self._metrics = metrics
        self._log = log
        self._state: RedisState | None = None
        self._bus: NodeBus | None = None
        self._locks: dict[str, str] = {}  # device id -> session id, held here
        self._releases: dict[str, str] = {}  # to delete at the next beat
        # Device id -> (connection id, trio time) of each presence written,
        # the oldest write first.
        self._written: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._info: dict[str, Any] = {}
        self._beat = trio.Event()
        self.redis_up = False
        metrics.redis_up.set(0)

    @property
    def lock_ttl_ms(self) -> int:
        return round(self.config.heartbeat_s * LIFETIME_BEATS * 1000)

    @property
    def presence_ttl_ms(self) -> int:
        return round(self.config.presence_refresh_s * LIFETIME_BEATS * 1000)

    async def run(
        self,
        handler: Handler,
        *,
        info: Mapping[str, Any],
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep the node in the fleet until cancelled.

        Started after the first heartbeat was tried (Redis may be away: the
        broker starts anyway and refuses new sessions until it is back).
        """
        self._info = {"node_id": self.node_id, **info}
        async with redis_client(
            self._redis_url, timeout_s=self.config.redis_timeout_s
        ) as client:
            self._state = RedisState(
                client, node_id=self.node_id, prefix=self.config.key_prefix
            )
            self._bus = NodeBus(
                client,
                node_id=self.node_id,
                prefix=self.config.key_prefix,
                handler=handler,
                retry_s=min(0.5, self.config.command_deadline_s / 4),
                probe_s=max(1.0, self.config.heartbeat_s),
                outcome=self._count_command,
            )
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._bus.run)
                    await self._heartbeat()
                    task_status.started()
                    while True:
                        with trio.move_on_after(self.config.heartbeat_s):
                            await self._beat.wait()
                        self._beat = trio.Event()
                        await self._heartbeat()
            finally:
                self._state = None
                self._bus = None

    # Device locks ----------------------------------------------------------------

    async def acquire_device(self, device_id: str, session_id: str) -> str | None:
        """Take *device_id*'s fleet-wide lock for *session_id*.

        Returns:
            None if taken; else the id of the session that holds it.

        Raises:
            SharedStateUnavailable: Redis is away (or the node not running).
        """
        state = self._require_state()
        holder = await state.acquire_device(device_id, session_id, self.lock_ttl_ms)
        if holder is None:
            self._locks[device_id] = session_id
            self._releases.pop(device_id, None)
        return holder

    def release_device(self, device_id: str, session_id: str) -> None:
        """Give the lock back (at once, in the heartbeat task); never waits."""
        if self._locks.get(device_id) == session_id:
            del self._locks[device_id]
            self._releases[device_id] = session_id
            self._beat.set()

    def held_locks(self) -> dict[str, str]:
        """Device id -> session id of the locks this node holds."""
        return dict(self._locks)

    # Presence and nodes ----------------------------------------------------------

    async def device_node(self, device_id: str) -> str | None:
        """The node that holds *device_id*'s control channel, if any."""
        return await self._require_state().device_node(device_id)

    async def live_nodes(self) -> dict[str, dict[str, Any]]:
        return await self._require_state().live_nodes()

    async def end_session_on(self, node_id: str, session_id: str) -> None:
        """Have *node_id* end *session_id* as an admin would (confirmed)."""
        await self.send(
            node_id,
            CommandKind.END_SESSION,
            {"session_id": session_id, "reason": "admin"},
        )

    async def send(
        self, node_id: str, kind: CommandKind, args: Mapping[str, str] | None = None
    ) -> Mapping[str, str]:
        """Have *node_id* carry out a command; its result (see :meth:`NodeBus.send`)."""
        if self._bus is None:
            raise SharedStateUnavailable("the cluster node is not running")
        return await self._bus.send(
            node_id, kind, args, deadline_s=self.config.command_deadline_s
        )

    # ---------------------------------------------------------------------------

    def _require_state(self) -> RedisState:
        if self._state is None:
            raise SharedStateUnavailable("the cluster node is not running")
        return self._state

    async def _heartbeat(self) -> None:
        state = self._require_state()
        ttl = self.lock_ttl_ms
        try:
            for device_id, session_id in list(self._releases.items()):
                await state.release_device(device_id, session_id)
                del self._releases[device_id]
            if not await state.announce_node(self._info, ttl):
                self._written.clear()  # nothing of ours is there: all again
            await self._presence(state)
            # A snapshot: a session may end (and release) during the awaits.
            lost = await state.keep_devices(dict(self._locks), ttl)
        except SharedStateUnavailable as exc:
            if self.redis_up:
                self._log.error("cluster.redis_unavailable", error=str(exc), audit=True)
            self.redis_up = False
            self._metrics.redis_up.set(0)
            return
        if not self.redis_up:
            self._log.info("cluster.redis_available", node_id=self.node_id, audit=True)
        self.redis_up = True
        self._metrics.redis_up.set(1)
        for device_id in lost:
            # Another session holds it: only after Redis lost the key and
            # another node took it. This node's session goes on (its device
            # is here); the other one's request will meet this device busy.
            self._log.warning(
                "cluster.device_lock_lost",
                device_id=device_id,
                session_id=self._locks.get(device_id),
                audit=True,
            )

    async def _presence(self, state: RedisState) -> None:
        """Write the presence of new channels and of those due for a refresh;
        withdraw the presence of channels that closed."""
        devices = dict(self._local_devices())
        for device_id in [d for d in self._written if d not in devices]:
            await state.withdraw_presence(device_id)
            del self._written[device_id]
        now = trio.current_time()
        due = [
            device_id
            for device_id, connection_id in devices.items()
            if self._written.get(device_id, (None, 0.0))[0] != connection_id
        ]
        refresh_before = now - self.config.presence_refresh_s
        # Refreshes are spread over the beats: twice the even share per beat,
        # so the devices of a reconnection storm, written in one beat, are not
        # all rewritten in one beat again (their keys live two periods).
        share = 2 * len(devices) * self.config.heartbeat_s
        budget = max(1, math.ceil(share / self.config.presence_refresh_s))
        for device_id, (_, written_at) in self._written.items():  # oldest first
            if written_at > refresh_before or budget == 0:
                break
            if devices.get(device_id) == self._written[device_id][0]:
                due.append(device_id)
                budget -= 1
        await state.publish_presence(due, self.presence_ttl_ms)
        for device_id in due:
            self._written[device_id] = (devices[device_id], now)
            self._written.move_to_end(device_id)

    def _count_command(self, kind: str, outcome: str) -> None:
        self._metrics.node_commands.labels(kind, outcome).inc()


__all__ = ["LIFETIME_BEATS", "ClusterNode"]
