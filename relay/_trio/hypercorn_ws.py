"""The engineer listener's WebSockets, held to the relay's transport rules.

Theory of operation
===================
The engineer listener is Hypercorn, and so are its WebSockets (the attach
socket of a session, the device feed). Two of the rules our own transport
keeps (``relay._trio.websocket``) are not Hypercorn's:

* **Keepalive.** Hypercorn sends no pings unless told to, and never notices a
  pong that does not come: an engineer whose network went silent (a laptop
  lid shut, a VPN dropped without a FIN) would keep a session open until the
  console's idle timeout. Here every WebSocket pings each ``ping_interval_s``
  and is declared dead when nothing at all has arrived from the client for
  ``ping_interval_s * ping_missed_max`` (BRIEF: dead after 3 missed, <= 30 s);
  the application sees a disconnect (1006) and the TCP connection is closed.
  Only WebSockets: a plain HTTP response (a recording download) is never cut
  because its client is quiet.
* **Version.** An upgrade for a WebSocket version other than 13 gets 426
  with ``Sec-WebSocket-Version: 13`` (RFC 6455 4.4), as on the device
  listener; Hypercorn answers a bare 400.
* **No compression.** Hypercorn accepts ``permessage-deflate`` whenever a
  client offers it; compression of attacker-influenced data next to secrets
  is what CRIME-style attacks need, and the OWASP WebSocket cheat sheet says
  to leave it off (reference row C10). The offer is dropped before the
  handshake is answered.

Hypercorn builds its WebSocket stream class by name inside its HTTP/1.1
protocol module, so :func:`install` points that name at
:class:`RelayWSStream`, a subclass that changes only the behaviours above.
The listener speaks HTTP/1.1 only (ALPN), so Hypercorn's HTTP/2 WebSockets
never run. The tests in ``tests/reliability`` (silent engineer, C10) fail if a
Hypercorn release moves what this relies on.
"""

from __future__ import annotations

from typing import Any

from hypercorn.protocol import h11 as hypercorn_h11
from hypercorn.protocol.events import Data, EndBody, Request, Response, StreamClosed
from hypercorn.protocol.ws_stream import WSStream
from wsproto.events import Ping
from wsproto.handshake import WEBSOCKET_VERSION


class RelayWSStream(WSStream):
    """Hypercorn's WebSocket stream with a keepalive that enforces, and no
    compression (see the module docstring).

    The keepalive settings come from the config: ``websocket_ping_interval``
    (Hypercorn's own key) and ``relay_ping_missed_max`` (ours).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._heard_at = self.context.time()

    async def handle(self, event: Any) -> None:
        if isinstance(event, Data):
            self._heard_at = self.context.time()
        if isinstance(event, Request) and _version(event) != WEBSOCKET_VERSION:
            await self._refuse_version()
            return
        await super().handle(event)
        if isinstance(event, Request) and not self.closed:
            # Read by Handshake.accept, which answers the upgrade: no offer,
            # no extension negotiated.
            self.handshake.extensions = None

    async def _send_pings(self) -> None:
        interval = self.config.websocket_ping_interval
        if interval is None:  # not started without an interval; for mypy
            return
        dead_after = interval * getattr(self.config, "relay_ping_missed_max", 3)
        while not self.closed:
            if self.context.time() - self._heard_at >= dead_after:
                await self._declare_dead()
                return
            await self._send_wsproto_event(Ping())
            await self.context.sleep(interval)

    async def _refuse_version(self) -> None:
        # RFC 6455 4.4: a version the server does not speak is answered with
        # 426 and the versions it does speak (Hypercorn answers a bare 400).
        self.closed = True
        await self.send(
            Response(
                stream_id=self.stream_id,
                status_code=426,
                headers=[
                    (b"sec-websocket-version", WEBSOCKET_VERSION),
                    (b"content-length", b"0"),
                    (b"connection", b"close"),
                ],
            )
        )
        await self.send(EndBody(stream_id=self.stream_id))

    async def _declare_dead(self) -> None:
        # Hypercorn's HTTP/1.1 protocol ends the stream (the application sees
        # a disconnect, 1006) and, the connection not being reusable after an
        # upgrade, closes it.
        await self.send(StreamClosed(stream_id=self.stream_id))


def _version(request: Request) -> bytes | None:
    versions = [v for n, v in request.headers if n.lower() == b"sec-websocket-version"]
    return versions[0] if len(versions) == 1 else None


def install() -> None:
    """Make Hypercorn's HTTP/1.1 protocol build :class:`RelayWSStream`."""
    hypercorn_h11.WSStream = RelayWSStream  # type: ignore[attr-defined]
