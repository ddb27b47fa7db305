"""Telling every live broker node about a change now, from a command-line tool.

Theory of operation
===================
``relay device revoke`` and ``relay user disable`` change the shared store;
every node reads the change from the store's feeds within
``revocation_poll_s`` anyway. With ``[cluster] redis_url`` set, the command
also sends the matching node command (``revoke_device``, ``disable_user``)
to every node announced in Redis, as a short-lived node of its own
(``cli-HOST-PID``), whose subscription receives the confirmations. Each node
reads its feed at once and confirms after it has closed what the change
names, so the operator learns which nodes have acted.

Nothing here can undo or hold up the change: it is in the store before the
first command goes out. Redis away or a node that does not confirm within
the deadline is reported, not an error (that node still reads its feed).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping

import trio

from relay._trio.node_bus import CommandNotConfirmed, NodeBus
from relay._trio.redis_state import RedisState, redis_client
from relay.config import ClusterConfig
from relay.proto.node_command import CommandKind, NodeCommand


def sender_id() -> str:
    """This process's name on the bus: ``cli-`` + host + pid, a valid node id."""
    host = re.sub(r"[^A-Za-z0-9_.:-]", "-", socket.gethostname())[:40]
    return f"cli-{host}-{os.getpid()}"


async def _refuse(command: NodeCommand) -> None:
    # Nobody sends commands to a command-line tool; one that comes is not acked.
    raise ValueError(f"a command-line tool carries out no {command.kind}")


async def notify_fleet(
    config: ClusterConfig, kind: CommandKind, args: Mapping[str, str]
) -> dict[str, bool]:
    """Send *kind* to every live node; node id -> whether it confirmed.

    Raises:
        SharedStateUnavailable: Redis could not be reached.
    """
    if config.redis_url is None:
        return {}
    me = sender_id()
    async with redis_client(
        config.redis_url, timeout_s=config.redis_timeout_s
    ) as client:
        nodes = await RedisState(
            client, node_id=me, prefix=config.key_prefix
        ).live_nodes()
        bus = NodeBus(
            client,
            node_id=me,
            prefix=config.key_prefix,
            handler=_refuse,
            retry_s=min(0.5, config.command_deadline_s / 4),
        )
        confirmed: dict[str, bool] = {}

        async def one(node_id: str) -> None:
            try:
                await bus.send(
                    node_id, kind, args, deadline_s=config.command_deadline_s
                )
                confirmed[node_id] = True
            except CommandNotConfirmed:
                confirmed[node_id] = False

        async with trio.open_nursery() as nursery:
            await nursery.start(bus.run)
            async with trio.open_nursery() as sends:
                for node_id in sorted(nodes):
                    sends.start_soon(one, node_id)
            nursery.cancel_scope.cancel()
    return confirmed


__all__ = ["notify_fleet", "sender_id"]
