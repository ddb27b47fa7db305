"""Commands between broker nodes: their wire form and the receiver's memory of them.

Theory of operation
===================
When several broker nodes share a fleet, one node sometimes has to act on
something another node holds: an admin on node C ends a session whose engineer
is on node A, a revocation must close a device's channel wherever it is. The
nodes send each other :class:`NodeCommand` messages over Redis pub/sub (the
shell: ``relay._trio.node_bus``). Pub/sub delivers at most once and only to a
subscriber listening at that instant, so delivery is made sure end to end: the
receiver answers each command it has carried out with a :class:`NodeAck`, and
the sender publishes the same command again (same ``command_id``) until the
ack arrives or its deadline passes.

A command may therefore arrive more than once. The receiver keeps the ids of
the commands it carried out with what they returned (:class:`RecentCommands`,
bounded) and acks a repeat with the same result without carrying it out again;
the commands are also idempotent by meaning (ending an ended session does
nothing), so a repeat older than that memory is harmless.

An ack may carry a *result*: a few named strings the command produced (the
device node's answer to a claim: which control channel, which certificate).

Sessions across nodes use five kinds. The engineer's node (A) claims the
device on the node that holds its control channel (B) and sends the session's
control messages through it; B sends back what the device says about that
session and tells A when the control channel is gone; A releases the claim
when the session is over (:mod:`relay._trio.cross_node`).

The codec is strict, as the device control channel's is: one JSON object, a
known ``type``, exactly the known fields, bounded strings. A node that sends
anything else is refused at the receiver (counted, never carried out). This
module does no I/O and keeps no time.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

#: The largest message a node accepts (the bus refuses larger ones unread): a
#: forwarded control message with its largest receipt fits.
MAX_NODE_MESSAGE_BYTES: Final = 16 * 1024
#: How many carried-out command ids a receiver remembers.
RECENT_COMMANDS_KEPT: Final = 4096

_NODE_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_COMMAND_ID: Final = re.compile(r"[0-9a-f]{32}")
_ARG_NAME: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")
_MAX_ARG_CHARS: Final = 512
#: The arguments that carry a whole control message or a PEM certificate.
_LONG_ARGS: Final = frozenset({"message", "certificate"})
_MAX_LONG_ARG_CHARS: Final = 12 * 1024
_MAX_ARGS: Final = 8


class CommandKind(StrEnum):
    """What a node may ask another node to do."""

    END_SESSION = "end_session"
    """End a session this node holds (args: ``session_id``, ``reason``)."""
    REVOKE_DEVICE = "revoke_device"
    """Close a revoked device's channel at once (args: ``device_id``)."""
    DISABLE_USER = "disable_user"
    """Close a disabled user's sockets and end their sessions (args: ``username``)."""
    POLICY_RELOAD = "policy_reload"
    """Load the access policy again now (no args)."""
    CLAIM_DEVICE = "claim_device"
    """Hold *device_id*'s control channel for the sender's session (args:
    ``session_id``, ``device_id``; result: ``connection_id``, ``certificate``,
    ``version``, or ``refused`` with the reason)."""
    DEVICE_SEND = "device_send"
    """Send a control message on the claimed channel (args: ``session_id``,
    ``device_id``, ``connection_id``, ``message``; result: ``sent``)."""
    RELEASE_DEVICE = "release_device"
    """The sender's session is over: forget the claim (args: ``session_id``,
    ``device_id``)."""
    DEVICE_EVENT = "device_event"
    """The device said this about the receiver's session (args:
    ``session_id``, ``device_id``, ``connection_id``, ``message``)."""
    CONTROL_LOST = "control_lost"
    """The claimed control channel is gone (args: ``session_id``,
    ``device_id``, ``connection_id``)."""
    DATA_REQUEST = "data_request"
    """Send a user's data request on *device_id*'s channel here (args:
    ``device_id``, ``message``: the encoded control message; result:
    ``outcome``, ``sent``, ``offline`` or ``agent_too_old``)."""


# The arguments each kind carries, exactly.
_ARGS: Final[Mapping[CommandKind, frozenset[str]]] = {
    CommandKind.END_SESSION: frozenset({"session_id", "reason"}),
    CommandKind.REVOKE_DEVICE: frozenset({"device_id"}),
    CommandKind.DISABLE_USER: frozenset({"username"}),
    CommandKind.POLICY_RELOAD: frozenset(),
    CommandKind.CLAIM_DEVICE: frozenset({"session_id", "device_id"}),
    CommandKind.DEVICE_SEND: frozenset(
        {"session_id", "device_id", "connection_id", "message"}
    ),
    CommandKind.RELEASE_DEVICE: frozenset({"session_id", "device_id"}),
    CommandKind.DEVICE_EVENT: frozenset(
        {"session_id", "device_id", "connection_id", "message"}
    ),
    CommandKind.CONTROL_LOST: frozenset({"session_id", "device_id", "connection_id"}),
    CommandKind.DATA_REQUEST: frozenset({"device_id", "message"}),
}


@dataclass(frozen=True, slots=True)
class NodeCommand:
    """One command from node ``sender``; ``command_id`` is the same on every resend."""

    command_id: str
    sender: str
    kind: CommandKind
    args: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_id(self.command_id)
        _check_node(self.sender)
        if set(self.args) != _ARGS[self.kind]:
            raise ValueError(
                f"{self.kind} takes exactly {sorted(_ARGS[self.kind])}, "
                f"not {sorted(self.args)}"
            )
        _check_strings("argument", self.args)


@dataclass(frozen=True, slots=True)
class NodeAck:
    """Node ``sender`` carried out command ``command_id`` (or had already);
    ``result`` is what the command produced, if anything."""

    command_id: str
    sender: str
    result: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_id(self.command_id)
        _check_node(self.sender)
        _check_strings("result", self.result)


def check_node_id(node_id: str) -> str:
    """*node_id* if it may name a node (1..64 of ``A-Z a-z 0-9 _ . : -``)."""
    _check_node(node_id)
    return node_id


def encode(message: NodeCommand | NodeAck) -> str:
    """The wire form of *message* (compact JSON)."""
    if isinstance(message, NodeAck):
        body: dict[str, Any] = {
            "type": "ack",
            "id": message.command_id,
            "from": message.sender,
        }
        if message.result:
            body["result"] = dict(message.result)
    else:
        body = {
            "type": "command",
            "id": message.command_id,
            "from": message.sender,
            "kind": message.kind.value,
            "args": dict(message.args),
        }
    return json.dumps(body, separators=(",", ":"), sort_keys=True)


def decode(data: str | bytes) -> NodeCommand | NodeAck:
    """Parse one message; ValueError says what is wrong with it."""
    size = (
        len(data.encode("utf-8", "surrogatepass"))
        if isinstance(data, str)
        else len(data)
    )
    if size > MAX_NODE_MESSAGE_BYTES:
        raise ValueError(f"message over {MAX_NODE_MESSAGE_BYTES} bytes")
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError("not a JSON object")
    kind = body.get("type")
    if kind == "ack":
        if "result" in body:
            _exact_keys(body, {"type", "id", "from", "result"})
            result = _named_strings(body["result"], "result")
        else:
            _exact_keys(body, {"type", "id", "from"})
            result = {}
        return NodeAck(_string(body, "id"), _string(body, "from"), result)
    if kind == "command":
        _exact_keys(body, {"type", "id", "from", "kind", "args"})
        try:
            command_kind = CommandKind(_string(body, "kind"))
        except ValueError:
            raise ValueError(f"unknown command kind {body['kind']!r:.40}") from None
        return NodeCommand(
            _string(body, "id"),
            _string(body, "from"),
            command_kind,
            _named_strings(body["args"], "args"),
        )
    raise ValueError(f"unknown message type {kind!r:.40}")


class RecentCommands:
    """The ids of the last :data:`RECENT_COMMANDS_KEPT` commands carried out,
    each with its result (a repeat is acked with the same one)."""

    def __init__(self, kept: int = RECENT_COMMANDS_KEPT) -> None:
        if kept < 1:
            raise ValueError("kept must be at least 1")
        self._kept = kept
        self._ids: OrderedDict[str, Mapping[str, str]] = OrderedDict()

    def __contains__(self, command_id: object) -> bool:
        return command_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def result(self, command_id: str) -> Mapping[str, str]:
        """What the command *command_id* returned (KeyError if not kept)."""
        return self._ids[command_id]

    def add(self, command_id: str, result: Mapping[str, str] | None = None) -> None:
        """Remember *command_id*; the oldest id goes when the memory is full."""
        self._ids[command_id] = dict(result or {})
        self._ids.move_to_end(command_id)
        while len(self._ids) > self._kept:
            self._ids.popitem(last=False)


def _check_id(command_id: object) -> None:
    if not isinstance(command_id, str) or not _COMMAND_ID.fullmatch(command_id):
        raise ValueError("command id: 32 lowercase hex characters")


def _check_node(node_id: object) -> None:
    if not isinstance(node_id, str) or not _NODE_ID.fullmatch(node_id):
        raise ValueError(
            "node id: 1..64 of A-Z a-z 0-9 _ . : - (a letter or digit first)"
        )


def _check_strings(what: str, values: Mapping[str, str]) -> None:
    if len(values) > _MAX_ARGS:
        raise ValueError(f"{what}: at most {_MAX_ARGS} values")
    for name, value in values.items():
        # A decoded message may carry any JSON value here.
        if not isinstance(name, str) or not _ARG_NAME.fullmatch(name):  # type: ignore[redundant-expr,unused-ignore]
            raise ValueError(f"{what}: bad name {name!r:.40}")
        limit = _MAX_LONG_ARG_CHARS if name in _LONG_ARGS else _MAX_ARG_CHARS
        if not isinstance(value, str) or not 0 < len(value) <= limit:  # type: ignore[redundant-expr,unused-ignore]
            raise ValueError(f"{what} {name!r}: 1..{limit} characters")


def _named_strings(value: object, what: str) -> dict[str, str]:
    """A decoded object of named strings (checked in full by _check_strings)."""
    if not isinstance(value, dict) or len(value) > _MAX_ARGS:
        raise ValueError(f"{what}: an object of at most {_MAX_ARGS} strings")
    for name in value:
        if not _ARG_NAME.fullmatch(name):
            noun = "argument" if what == "args" else what
            raise ValueError(f"bad {noun} name {name!r:.40}")
    return dict(value)


def _exact_keys(body: Mapping[str, Any], keys: set[str]) -> None:
    if set(body) != keys:
        raise ValueError(f"fields must be exactly {sorted(keys)}")


def _string(body: Mapping[str, Any], key: str) -> str:
    value = body[key]
    if not isinstance(value, str):
        raise ValueError(f"{key}: not a string")
    return value


__all__ = [
    "MAX_NODE_MESSAGE_BYTES",
    "RECENT_COMMANDS_KEPT",
    "CommandKind",
    "NodeAck",
    "NodeCommand",
    "RecentCommands",
    "check_node_id",
    "decode",
    "encode",
]
