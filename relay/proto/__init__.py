"""The relay's sans-I/O core: wire messages, codecs and state machines.

Nothing in this package imports trio, sockets, TLS, clocks or logging handlers;
the trio shells in ``relay._trio`` drive it.
"""

from relay.proto.close import CloseCode as CloseCode
from relay.proto.errors import (
    LocalProtocolError as LocalProtocolError,
    ProtocolError as ProtocolError,
    RemoteProtocolError as RemoteProtocolError,
)

__all__ = ["CloseCode", "LocalProtocolError", "ProtocolError", "RemoteProtocolError"]
