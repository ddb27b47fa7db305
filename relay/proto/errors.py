"""Protocol errors, h11 style: who broke the protocol decides the class."""

from __future__ import annotations


class ProtocolError(Exception):
    """A message or event broke the relay protocol.

    Attributes:
        close_code: The WebSocket close code the shell should send.
    """

    def __init__(self, message: str, *, close_code: int = 1002) -> None:
        super().__init__(message)
        self.close_code = close_code


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids; close the transport."""
