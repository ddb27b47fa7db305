"""Sessions whose engineer and device are on different broker nodes.

Theory of operation
===================
The engineer asks node A for a device whose control channel is on node B.
The session lives on A, whole: its state machine, timers, audit records, row
and recording, and both legs of its tunnel, because the device opens the
session's tunnel to A directly, at the address A advertises
(``[cluster] advertise_device_url``). B only lends A the device's control
channel. No tunnel byte crosses between nodes (docs/architecture.md,
"Sessions across nodes"); only the session's control messages do, over the
node bus (:mod:`relay._trio.node_bus`), each confirmed by the node that acted
on it.

On A (the engineer's node), for the session broker:

- :meth:`CrossNode.claim`: B checks that the device's control channel is
  there, speaks protocol version 3 and is not in a session of B's own, and
  holds it for A's session; the answer names the channel (its connection id
  on B) and the certificate it authenticated, which A verifies the grant and
  end receipts against (Invariant 6: never a certificate named in a message).
  The fleet-wide device lock is taken before the claim, as for any session.
- :meth:`CrossNode.send_control`: one control message for the device, sent
  by B on the claimed channel (the offer goes as an ``OfferWithTunnel``).
- :meth:`CrossNode.release`: the session is over; B forgets the hold.

On B (the device's node), for the device listener: a session message from a
held device (grant, deny, end receipt) is forwarded to A
(:meth:`CrossNode.forward_device_message`), and so is the end of the claimed
control channel (:meth:`CrossNode.forward_control_lost`). Forwards to one node
go out in order, one at a time, from one task per node and a bounded queue;
a full queue drops the forward (counted and logged; an end receipt comes
again on the device's next channel, a lost control channel is also seen by
the node watch below).

Node failure: every heartbeat, this node compares the nodes its crossings
involve with the live announcements in Redis (each lives two heartbeats). A
node is taken for dead once its announcement has been missing for two
heartbeats in a row (a Redis that restarted empty has every node's
announcement back within one). On
A, the sessions whose device node is gone end with ``broker_crash`` (the
session broker's :meth:`~relay._trio.session_broker.SessionBroker.node_lost`);
on B, the holds of a node that is gone are dropped and each device is told
``session_end`` (``broker_crash``), which ends its offer or session at once
(its tunnel to the dead node is gone anyway). While Redis itself is away
nothing is declared dead: what cannot be checked is not guessed.

Rule 1: this module never touches a tunnel byte.
Rule 2: a command from another node is acted on only for the hold or session
it names, on the node and connection it names; anything else is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from relay._trio.cluster_node import LIFETIME_BEATS, ClusterNode
from relay._trio.node_bus import CommandNotConfirmed
from relay._trio.redis_state import SharedStateUnavailable
from relay.proto import control
from relay.proto.errors import RemoteProtocolError
from relay.proto.node_command import CommandKind, NodeCommand
from relay.proto.session import EndReason

#: The first control protocol version with sessions across nodes.
CROSSING_VERSION: Final = control.OfferWithTunnel.SINCE_VERSION
#: Forwards waiting for one node before new ones are dropped.
FORWARD_QUEUE_SIZE: Final = 256

# What A may have B send on a claimed channel (broker to device only).
_SENDABLE: Final = (
    control.OfferWithTunnel,
    control.OfferWithdrawn,
    control.SessionEnd,
    control.EndReceiptAck,
)
# What B forwards from the device (device to broker, about a session).
_FORWARDED: Final = (control.Grant, control.Deny, control.SessionEnded)


class ClaimRefused(Exception):
    """The device's node would not lend its control channel; the message says why."""


@dataclass(frozen=True, slots=True)
class Claim:
    """A control channel another node holds for one of this node's sessions."""

    node_id: str
    connection_id: int
    certificate: x509.Certificate


@dataclass(frozen=True, slots=True)
class _Hold:
    """On the device's node: its control channel lent to a session elsewhere."""

    node_id: str
    session_id: str
    connection_id: int


class DeviceChannels(Protocol):
    """What this module needs of the device listener."""

    def control_certificate(
        self, device_id: str
    ) -> tuple[int, x509.Certificate] | None: ...

    def control_version(self, device_id: str) -> int | None: ...

    async def send_control(
        self, device_id: str, connection_id: int, event: control.Event
    ) -> bool: ...


class CrossingSessions(Protocol):
    """What this module needs of the session broker."""

    def device_in_session(self, device_id: str) -> bool: ...

    def remote_device_message(
        self, node_id: str, device_id: str, event: control.Event
    ) -> None: ...

    def remote_control_lost(
        self, node_id: str, device_id: str, session_id: str
    ) -> None: ...

    def crossing_nodes(self) -> set[str]: ...

    def node_lost(self, node_id: str) -> None: ...


class CrossNode:
    """This node's part in sessions across nodes; see the module docstring.

    Args:
        cluster: The running cluster node (bus and announcements).
        channels: The device listener.
        tunnel_url: This node's advertised device address, or None: then
            this node cannot be the engineer's node of a crossing session.
        log: The session log (audit events).
        on_drop: Called with the command kind of every forward dropped.
    """

    def __init__(
        self,
        cluster: ClusterNode,
        *,
        channels: DeviceChannels,
        tunnel_url: str | None,
        log: Any,
        on_drop: Callable[[str], None] = lambda kind: None,
    ) -> None:
        self._cluster = cluster
        self._channels = channels
        self.tunnel_url: Final = tunnel_url
        self._log = log
        self._on_drop = on_drop
        self.sessions: CrossingSessions | None = None
        self._holds: dict[str, _Hold] = {}  # device id -> hold
        # Nodes found gone, until they are announced again: nothing is
        # forwarded to them (a release for a dead node has nobody to hear it).
        self._lost: set[str] = set()
        # When each involved node was first found unannounced (trio time).
        self._missing_since: dict[str, float] = {}
        self._queues: dict[
            str, trio.MemorySendChannel[tuple[CommandKind, dict[str, str]]]
        ] = {}
        self._nursery: trio.Nursery | None = None

    @property
    def node_id(self) -> str:
        return self._cluster.node_id

    def holds(self) -> dict[str, tuple[str, str]]:
        """Device id -> (node, session) of the channels this node lends."""
        return {device: (h.node_id, h.session_id) for device, h in self._holds.items()}

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Send forwards and watch the nodes of crossings until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    await trio.sleep(self._cluster.config.heartbeat_s)
                    await self._watch_nodes()
            finally:
                self._nursery = None

    # The engineer's node ------------------------------------------------------

    async def claim(self, node_id: str, device_id: str, session_id: str) -> Claim:
        """Have *node_id* hold *device_id*'s control channel for *session_id*.

        Raises:
            ClaimRefused: The device is not there, in a session there, or its
                agent is too old for sessions across nodes.
            SharedStateUnavailable, CommandNotConfirmed: No answer.
        """
        result = await self._cluster.send(
            node_id,
            CommandKind.CLAIM_DEVICE,
            {"session_id": session_id, "device_id": device_id},
        )
        if "refused" in result:
            raise ClaimRefused(result["refused"])
        try:
            return Claim(
                node_id=node_id,
                connection_id=int(result["connection_id"]),
                certificate=x509.load_pem_x509_certificate(
                    result["certificate"].encode("ascii")
                ),
            )
        except (KeyError, ValueError, UnicodeEncodeError) as exc:
            raise ClaimRefused(f"malformed claim answer: {exc}") from None

    async def send_control(
        self,
        node_id: str,
        device_id: str,
        session_id: str,
        connection_id: int,
        event: control.Event,
    ) -> bool:
        """Have *node_id* send *event* on the claimed channel; False if it did
        not (the channel is gone, or the node did not answer)."""
        try:
            result = await self._cluster.send(
                node_id,
                CommandKind.DEVICE_SEND,
                {
                    "session_id": session_id,
                    "device_id": device_id,
                    "connection_id": str(connection_id),
                    "message": control.encode(event).decode("ascii"),
                },
            )
        except (SharedStateUnavailable, CommandNotConfirmed) as exc:
            self._log.warning(
                "session.control_forward_failed",
                session_id=session_id,
                node=node_id,
                type=event.TYPE,
                error=str(exc)[:200],
            )
            return False
        return result.get("sent") == "true"

    def release(self, node_id: str, device_id: str, session_id: str) -> None:
        """The session is over: *node_id* forgets its hold (never waits)."""
        self._forward(
            node_id,
            CommandKind.RELEASE_DEVICE,
            {"session_id": session_id, "device_id": device_id},
        )

    # The device's node --------------------------------------------------------

    def forward_device_message(self, device_id: str, event: control.Event) -> bool:
        """Forward *event* if it is about a session this node's channel is
        lent to; True if it was (then it is not this node's business)."""
        hold = self._holds.get(device_id)
        session_id = getattr(event, "session_id", None)
        if hold is None or session_id != hold.session_id:
            return False
        found = self._channels.control_certificate(device_id)
        self._forward(
            hold.node_id,
            CommandKind.DEVICE_EVENT,
            {
                "session_id": hold.session_id,
                "device_id": device_id,
                "connection_id": str(found[0] if found else hold.connection_id),
                "message": control.encode(event).decode("ascii"),
            },
        )
        return True

    def forward_control_lost(self, device_id: str, connection_id: int) -> None:
        """The control channel *connection_id* of *device_id* ended."""
        hold = self._holds.get(device_id)
        if hold is None or hold.connection_id != connection_id:
            return
        self._forward(
            hold.node_id,
            CommandKind.CONTROL_LOST,
            {
                "session_id": hold.session_id,
                "device_id": device_id,
                "connection_id": str(connection_id),
            },
        )

    # Commands from other nodes ------------------------------------------------

    async def carry_out(self, command: NodeCommand) -> Mapping[str, str] | None:
        """Act on a command of a crossing (see :mod:`relay.proto.node_command`).

        Raises:
            ValueError: A command of another kind, or malformed arguments
                (not acked: the sender learns it failed).
        """
        args = command.args
        match command.kind:
            case CommandKind.CLAIM_DEVICE:
                return self._lend(command.sender, args["device_id"], args["session_id"])
            case CommandKind.DEVICE_SEND:
                return await self._send_for(command.sender, args)
            case CommandKind.RELEASE_DEVICE:
                hold = self._holds.get(args["device_id"])
                if hold is not None and (hold.node_id, hold.session_id) == (
                    command.sender,
                    args["session_id"],
                ):
                    del self._holds[args["device_id"]]
                return None
            case CommandKind.DEVICE_EVENT:
                event = _decode(args["message"], _FORWARDED)
                if getattr(event, "session_id", None) != args["session_id"]:
                    raise ValueError("the message is about another session")
                self._require_sessions().remote_device_message(
                    command.sender, args["device_id"], event
                )
                return None
            case CommandKind.CONTROL_LOST:
                self._require_sessions().remote_control_lost(
                    command.sender, args["device_id"], args["session_id"]
                )
                return None
            case _:
                raise ValueError(f"not a crossing command: {command.kind}")

    def _lend(self, node_id: str, device_id: str, session_id: str) -> dict[str, str]:
        held = self._holds.get(device_id)
        if held is not None and (held.node_id, held.session_id) == (
            node_id,
            session_id,
        ):
            # A resend whose answer was lost, past the bus's memory: the same.
            return self._claim_answer(held, device_id) or {"refused": "device gone"}
        found = self._channels.control_certificate(device_id)
        if found is None:
            return {"refused": "device not connected here"}
        if held is not None or self._require_sessions().device_in_session(device_id):
            return {"refused": "busy"}
        version = self._channels.control_version(device_id) or 1
        if version < CROSSING_VERSION:
            return {
                "refused": f"the device's agent speaks control protocol {version}; "
                f"sessions across nodes need {CROSSING_VERSION}"
            }
        hold = _Hold(node_id=node_id, session_id=session_id, connection_id=found[0])
        self._holds[device_id] = hold
        self._log.info(
            "session.device_lent",
            session_id=session_id,
            device_id=device_id,
            node=node_id,
            connection_id=found[0],
            audit=True,
        )
        return self._claim_answer(hold, device_id) or {"refused": "device gone"}

    def _claim_answer(self, hold: _Hold, device_id: str) -> dict[str, str] | None:
        found = self._channels.control_certificate(device_id)
        if found is None or found[0] != hold.connection_id:
            return None
        return {
            "connection_id": str(hold.connection_id),
            "certificate": found[1].public_bytes(Encoding.PEM).decode("ascii"),
        }

    async def _send_for(self, node_id: str, args: Mapping[str, str]) -> dict[str, str]:
        device_id = args["device_id"]
        hold = self._holds.get(device_id)
        if hold is None or (hold.node_id, hold.session_id) != (
            node_id,
            args["session_id"],
        ):
            return {"sent": "false"}
        event = _decode(args["message"], _SENDABLE)
        if getattr(event, "session_id", None) != hold.session_id:
            raise ValueError("the message is about another session")
        found = self._channels.control_certificate(device_id)
        if found is None:
            return {"sent": "false"}
        if found[0] != int(args["connection_id"]) and not isinstance(
            event, control.EndReceiptAck | control.SessionEnd
        ):
            # The channel the offer went out on is gone: the session's own
            # messages stop there; an end and an ack go to the device's
            # channel of now (it keeps the session's end receipt until acked).
            return {"sent": "false"}
        with trio.move_on_after(self._cluster.config.command_deadline_s / 2):
            sent = await self._channels.send_control(device_id, found[0], event)
            return {"sent": "true" if sent else "false"}
        return {"sent": "false"}

    # Forwards and the node watch ------------------------------------------------

    def _forward(self, node_id: str, kind: CommandKind, args: dict[str, str]) -> None:
        if node_id in self._lost:
            return
        queue = self._queues.get(node_id)
        if queue is None:
            if self._nursery is None:
                self._on_drop(kind.value)
                return
            queue, out = trio.open_memory_channel[tuple[CommandKind, dict[str, str]]](
                FORWARD_QUEUE_SIZE
            )
            self._queues[node_id] = queue
            self._nursery.start_soon(self._send_forwards, node_id, out)
        try:
            queue.send_nowait((kind, args))
        except trio.WouldBlock:
            self._on_drop(kind.value)
            self._log.warning("session.forward_dropped", node=node_id, kind=kind.value)

    async def _send_forwards(
        self,
        node_id: str,
        out: trio.MemoryReceiveChannel[tuple[CommandKind, dict[str, str]]],
    ) -> None:
        """One node's forwards, in order; the task ends with the queue."""
        async for kind, args in out:
            try:
                await self._cluster.send(node_id, kind, args)
            except (SharedStateUnavailable, CommandNotConfirmed) as exc:
                self._log.warning(
                    "session.forward_failed",
                    node=node_id,
                    kind=kind.value,
                    session_id=args.get("session_id"),
                    error=str(exc)[:200],
                )

    async def _watch_nodes(self) -> None:
        """End what crossed a node that is no longer announced."""
        involved = self._require_sessions().crossing_nodes() | {
            hold.node_id for hold in self._holds.values()
        }
        if not (involved or self._lost) or not self._cluster.redis_up:
            self._missing_since.clear()
            return
        try:
            live = await self._cluster.live_nodes()
        except SharedStateUnavailable:
            self._missing_since.clear()
            return  # not known now: nothing is declared dead
        self._lost -= set(live)  # announced again: back in the fleet
        now = trio.current_time()
        missing = involved - set(live)
        self._missing_since = {
            node: self._missing_since.get(node, now) for node in missing
        }
        grace = LIFETIME_BEATS * self._cluster.config.heartbeat_s
        for node_id in sorted(missing):
            if now - self._missing_since[node_id] < grace:
                continue
            if node_id not in self._lost:
                self._log.warning("cluster.node_lost", node=node_id, audit=True)
            self._lost.add(node_id)
            self._require_sessions().node_lost(node_id)
            for device_id, hold in list(self._holds.items()):
                if hold.node_id == node_id:
                    del self._holds[device_id]
                    await self._end_on_device(device_id, hold)
            queue = self._queues.pop(node_id, None)
            if queue is not None:
                queue.close()

    async def _end_on_device(self, device_id: str, hold: _Hold) -> None:
        found = self._channels.control_certificate(device_id)
        if found is None:
            return
        with trio.move_on_after(self._cluster.config.command_deadline_s / 2):
            await self._channels.send_control(
                device_id,
                found[0],
                control.SessionEnd(
                    session_id=hold.session_id, reason=EndReason.BROKER_CRASH.value
                ),
            )

    def _require_sessions(self) -> CrossingSessions:
        if self.sessions is None:
            raise RuntimeError("CrossNode.sessions is not set")
        return self.sessions


def _decode(message: str, allowed: tuple[type[control.Event], ...]) -> control.Event:
    """A forwarded control message, checked as the channel would check it."""
    try:
        event = control.decode(message.encode("utf-8"))
    except (RemoteProtocolError, UnicodeEncodeError) as exc:
        raise ValueError(f"forwarded control message: {exc}") from None
    if not isinstance(event, allowed):
        raise ValueError(f"forwarded control message of type {event.TYPE}")
    return event


__all__ = ["CROSSING_VERSION", "Claim", "ClaimRefused", "CrossNode"]
