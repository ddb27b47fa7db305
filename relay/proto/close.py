"""WebSocket close codes used by the relay, standard and application-defined.

RFC 6455 §7.4.2 reserves 4000-4999 for private use; the relay's own reasons live
there so that an agent (or an operator reading a packet capture) can tell "replaced
by a newer connection" from "revoked" without parsing reason text.
"""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    """Close codes the relay sends, and how the agent reacts to each."""

    NORMAL = 1000
    GOING_AWAY = 1001  # broker shutdown: reconnect with backoff
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003  # a text frame on a binary-only channel
    ABNORMAL = 1006  # never sent on the wire: the connection dropped
    INVALID_DATA = 1007  # a text message that is not UTF-8
    POLICY_VIOLATION = 1008  # e.g. a message claiming another device id
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011  # also used for "keepalive timeout"
    TRY_AGAIN_LATER = 1013
    REPLACED = 4000  # a newer connection of the same device took over
    REVOKED = 4001  # the device certificate was revoked: slow retry
    HELLO_TIMEOUT = 4002  # no hello within the deadline
    CERTIFICATE_EXPIRED = 4003  # the device certificate expired while connected
    LOGIN_ENDED = 4004  # engineer socket: the login session ended; log in again
    SESSION_ENDED = 4005  # a remote session's leg: the session is over (reason: why)


def close_code_label(code: int) -> str:
    """A bounded metric label for *code*: known codes by number, others bucketed."""
    try:
        return str(int(CloseCode(code)))
    except ValueError:
        return "other"
