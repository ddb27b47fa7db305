"""A TCP proxy for fault tests, switchable at run time: pass, blackhole, reset.

Theory of operation
===================
The proxy listens on a loopback port and forwards each accepted connection to
one upstream address, byte for byte (TLS and WebSocket pass through untouched,
so the client's certificate checks still see the real broker). A test points a
client at :attr:`FaultProxy.port` instead of the server and switches the mode
while traffic flows:

* ``pass``: bytes flow both ways.
* ``blackhole``: nothing is forwarded either way and every socket stays open,
  like a link where every packet is dropped: the ends see silence, no FIN, no
  RST. Bytes read just before the switch wait inside the proxy and are sent
  when the link comes back (as TCP would retransmit them); bytes not yet read
  wait in the kernel. A connection accepted while the link is down waits,
  unconnected, for the link to come back.
* ``reset``: every open connection is closed with an RST on both sides at once
  (``SO_LINGER`` 0), and new connections get the same.

A connection that one end closes is closed towards the other end as well (FIN
for an orderly close, RST for a reset), in pass mode; during a blackhole the
close waits for the link, as everything else does.

``tc netem`` is unavailable on the test machines (reference section 6), which
is why a proxy in the test process plays the network.
"""

from __future__ import annotations

import contextlib
import enum
import socket
import struct
from dataclasses import dataclass, field
from typing import Final

import trio

LOOPBACK: Final = "127.0.0.1"
_READ_BYTES: Final = 65536
_LINGER_RESET: Final = struct.pack("ii", 1, 0)


class Mode(enum.Enum):
    """What the proxy does with traffic."""

    PASS = "pass"  # noqa: S105 - a mode name, not a password
    BLACKHOLE = "blackhole"
    RESET = "reset"


@dataclass(eq=False)
class _Link:
    """One proxied connection: both sockets and the scope of its two pumps."""

    client: trio.SocketStream
    upstream: trio.SocketStream | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


def _reset(stream: trio.SocketStream | None) -> None:
    """Close *stream* with an RST (no FIN, unread data discarded)."""
    if stream is None:
        return
    with contextlib.suppress(OSError):  # already closed
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    stream.socket.close()


@dataclass(eq=False)
class FaultProxy:
    """Forwards connections to *upstream_port* on loopback; see the module docstring.

    Start it with ``await nursery.start(proxy.serve)``; it runs until the
    nursery is cancelled.
    """

    upstream_port: int
    upstream_host: str = LOOPBACK
    mode: Mode = Mode.PASS
    port: int = 0
    #: Connections accepted so far (a reconnecting client makes new ones).
    accepted: int = 0
    _links: set[_Link] = field(default_factory=set)
    _flowing: trio.Event = field(default_factory=trio.Event)

    def __post_init__(self) -> None:
        self._flowing.set()

    @property
    def open_links(self) -> int:
        """Connections currently held open by the proxy."""
        return len(self._links)

    def set_mode(self, mode: Mode) -> None:
        """Switch to *mode* at once, for open and new connections alike."""
        self.mode = mode
        if mode is Mode.BLACKHOLE:
            if self._flowing.is_set():
                self._flowing = trio.Event()
            return
        if mode is Mode.RESET:
            for link in list(self._links):
                _reset(link.client)
                _reset(link.upstream)
                link.scope.cancel()
        self._flowing.set()

    async def serve(self, *, task_status: trio.TaskStatus[int]) -> None:
        """Listen on a free loopback port (reported) and proxy until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self.port)

    async def _wait_for_link(self) -> None:
        """Return once the mode is not blackhole (re-checked after each switch)."""
        while not self._flowing.is_set():
            await self._flowing.wait()

    async def _handle(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        link = _Link(client)
        self._links.add(link)
        try:
            with link.scope:
                await self._wait_for_link()
                if self.mode is Mode.RESET:
                    _reset(client)
                    return
                try:
                    link.upstream = await trio.open_tcp_stream(
                        self.upstream_host, self.upstream_port
                    )
                except OSError:
                    _reset(client)
                    return
                async with trio.open_nursery() as pumps:
                    pumps.start_soon(self._pump, client, link.upstream)
                    pumps.start_soon(self._pump, link.upstream, client)
        finally:
            self._links.discard(link)
            for stream in (client, link.upstream):
                if stream is not None:
                    stream.socket.close()

    async def _pump(self, source: trio.SocketStream, target: trio.SocketStream) -> None:
        """Copy *source* to *target* while the link is up; pass a FIN or RST on."""
        while True:
            await self._wait_for_link()
            try:
                data = await source.receive_some(_READ_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self._wait_for_link()
                _reset(target)
                return
            await self._wait_for_link()
            if not data:
                with contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError
                ):
                    await target.send_eof()
                return
            try:
                await target.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                _reset(source)
                return
