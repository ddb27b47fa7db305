"""Commands between broker nodes over Redis pub/sub, each confirmed or sent again.

Theory of operation
===================
Every node subscribes to its own channel, ``{prefix}:bus:{node_id}``.
:meth:`NodeBus.send` publishes a :class:`~relay.proto.node_command.NodeCommand`
on the target node's channel and waits for the :class:`~relay.proto.node_command.NodeAck`
on its own; without one within ``retry_s`` it publishes the same command again
(same id), until the ack arrives or ``deadline_s`` has passed
(:class:`CommandNotConfirmed`). Publishing while Redis is away fails; that is
one more attempt that did not arrive, and the loop goes on until the deadline.

The receiving side reads its channel in :meth:`NodeBus.run`. A message that
does not decode is counted and dropped (a node never acts on what it cannot
read). A command goes into a bounded inbox; when the inbox is full the command
is dropped and counted, and the sender's next attempt brings it again, so a
burst can delay commands but never grow memory without bound. One worker takes
commands from the inbox in order, carries out each through the handler, and
then acks it. A command it has carried out before (a resend whose ack was lost)
is acked again, with the result it had, without being carried out twice
(:class:`~relay.proto.node_command.RecentCommands`). A handler that fails sends
no ack: the sender tries again, and gives up at its deadline. What a handler
returns travels back in the ack and is what :meth:`NodeBus.send` returns.

Acks are confirmations of work done, not of receipt: "delivered" means the
other node has ended the session, closed the channel, reloaded the policy.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

import coredis
import coredis.exceptions
import structlog
import trio

from relay._trio.redis_state import REDIS_FAILURES
from relay.proto.node_command import (
    CommandKind,
    NodeAck,
    NodeCommand,
    RecentCommands,
    decode,
    encode,
)

#: What the bus reports, for metrics: (command kind or "-", outcome).
Outcome = Callable[[str, str], None]
#: Carries out one command; what it returns goes back in the ack.
Handler = Callable[[NodeCommand], Awaitable[Mapping[str, str] | None]]

# Outcomes on the sending side, then on the receiving side.
SENT_CONFIRMED: Final = "confirmed"
SENT_UNCONFIRMED: Final = "unconfirmed"
RECEIVED: Final = "carried_out"
RECEIVED_AGAIN: Final = "repeated"
REFUSED_MALFORMED: Final = "malformed"
DROPPED_INBOX_FULL: Final = "inbox_full"
HANDLER_FAILED: Final = "failed"
RESUBSCRIBED: Final = "resubscribed"


class _Deaf(Exception):
    """This node's subscription does not deliver its own probe."""


class CommandNotConfirmed(Exception):
    """The target node did not confirm the command before the deadline."""


class NodeBus:
    """This node's end of the command bus.

    Args:
        client: A client entered with :func:`relay._trio.redis_state.redis_client`.
        node_id: This node's id (its channel).
        prefix: The first part of every channel name (as for the keys).
        handler: Carries out one command addressed to this node.
        retry_s: Time between two attempts of one command.
        probe_s: Time between two checks that the subscription still hears.
        inbox_size: Commands waiting for the worker before new ones are dropped.
        outcome: Called with (kind, outcome) for every command sent or received.
    """

    def __init__(
        self,
        client: coredis.Redis[str],
        *,
        node_id: str,
        prefix: str,
        handler: Handler,
        retry_s: float = 0.5,
        probe_s: float = 5.0,
        inbox_size: int = 64,
        outcome: Outcome | None = None,
    ) -> None:
        self._client = client
        self.node_id: Final = node_id
        self._prefix = prefix
        self._handler = handler
        self._retry_s = retry_s
        self._probe_s = probe_s
        self._inbox_send, self._inbox = trio.open_memory_channel[NodeCommand](
            inbox_size
        )
        self._recent = RecentCommands()
        self._waiting: dict[str, trio.Event] = {}
        self._results: dict[str, Mapping[str, str]] = {}
        self._outcome = outcome or (lambda kind, outcome: None)
        self._log = structlog.get_logger("relay.node_bus").bind(node_id=node_id)

    def channel(self, node_id: str) -> str:
        return f"{self._prefix}:bus:{node_id}"

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on this node's channel until cancelled; started once subscribed.

        The subscription checks itself: every ``probe_s`` it publishes a probe
        to its own channel and expects to hear it within ``retry_s`` times
        four. A subscription that stays deaf (Redis restarted and the client
        did not recover it; seen with coredis 6.9) is dropped and made again,
        as is one that fails outright.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._work)
            while True:
                try:
                    await self._listen(task_status)
                except* (*REDIS_FAILURES, _Deaf) as failed:
                    self._log.warning(
                        "node_bus.resubscribing", error=repr(_first_leaf(failed))
                    )
                    self._outcome("-", RESUBSCRIBED)
                task_status = trio.TASK_STATUS_IGNORED  # started only once
                await trio.sleep(self._retry_s)

    async def _listen(self, task_status: trio.TaskStatus[None]) -> None:
        pubsub = self._client.pubsub(
            channels=[self.channel(self.node_id)], ignore_subscribe_messages=True
        )
        async with pubsub, trio.open_nursery() as nursery:
            nursery.start_soon(self._probe)
            task_status.started()
            async for message in pubsub:
                data = message["data"]
                if message["type"] == "message" and isinstance(data, str):
                    self._receive(data)

    async def _probe(self) -> None:
        """Raise :class:`_Deaf` when this node stops hearing its own channel."""
        while True:
            await trio.sleep(self._probe_s)
            probe = NodeAck(os.urandom(16).hex(), self.node_id)
            heard = self._waiting[probe.command_id] = trio.Event()
            try:
                with trio.move_on_after(4 * self._retry_s):
                    await self._client.publish(
                        self.channel(self.node_id), encode(probe)
                    )
                    await heard.wait()
            finally:
                del self._waiting[probe.command_id]
            if not heard.is_set():
                raise _Deaf(f"no probe back within {4 * self._retry_s:g} s")

    async def send(
        self,
        node_id: str,
        kind: CommandKind,
        args: Mapping[str, str] | None = None,
        *,
        deadline_s: float,
    ) -> Mapping[str, str]:
        """Have *node_id* carry out a command; return its result once it confirmed.

        Raises:
            CommandNotConfirmed: No confirmation within *deadline_s*.
        """
        command = NodeCommand(
            os.urandom(16).hex(), self.node_id, kind, dict(args or {})
        )
        if node_id == self.node_id:
            result = await self._handler(command)
            self._outcome(kind.value, SENT_CONFIRMED)
            return result or {}
        confirmed = self._waiting[command.command_id] = trio.Event()
        wire = encode(command)
        try:
            with trio.move_on_after(deadline_s):
                while not confirmed.is_set():
                    try:
                        await self._client.publish(self.channel(node_id), wire)
                    except REDIS_FAILURES as exc:
                        self._log.debug("node_bus.publish_failed", error=str(exc))
                    with trio.move_on_after(self._retry_s):
                        await confirmed.wait()
        finally:
            del self._waiting[command.command_id]
            result = self._results.pop(command.command_id, {})
        if not confirmed.is_set():
            self._outcome(kind.value, SENT_UNCONFIRMED)
            raise CommandNotConfirmed(
                f"{kind} to {node_id}: no confirmation within {deadline_s:g} s"
            )
        self._outcome(kind.value, SENT_CONFIRMED)
        return result

    def _receive(self, data: str) -> None:
        try:
            message = decode(data)
        except ValueError as exc:
            self._outcome("-", REFUSED_MALFORMED)
            self._log.warning("node_bus.malformed", error=str(exc))
            return
        if isinstance(message, NodeAck):
            waiter = self._waiting.get(message.command_id)
            if waiter is not None and not waiter.is_set():
                if message.result:
                    self._results[message.command_id] = message.result
                waiter.set()
            return
        try:
            self._inbox_send.send_nowait(message)
        except trio.WouldBlock:
            self._outcome(message.kind.value, DROPPED_INBOX_FULL)

    async def _work(self) -> None:
        async for command in self._inbox:
            if command.command_id in self._recent:
                self._outcome(command.kind.value, RECEIVED_AGAIN)
                result = self._recent.result(command.command_id)
            else:
                try:
                    result = await self._handler(command) or {}
                except Exception as exc:
                    # No ack: the sender tries again and gives up at its deadline.
                    self._outcome(command.kind.value, HANDLER_FAILED)
                    self._log.error(
                        "node_bus.handler_failed",
                        kind=command.kind.value,
                        sender=command.sender,
                        error=repr(exc),
                    )
                    continue
                self._recent.add(command.command_id, result)
                self._outcome(command.kind.value, RECEIVED)
            ack = encode(NodeAck(command.command_id, self.node_id, result))
            try:
                await self._client.publish(self.channel(command.sender), ack)
            except REDIS_FAILURES as exc:
                # The sender's next attempt is acked from the memory of ids.
                self._log.debug("node_bus.ack_failed", error=str(exc))


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception in *group* that is not itself a group."""
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


__all__ = ["CommandNotConfirmed", "NodeBus"]
