"""The engineers' WebSocket routes: the upgrade checks, the socket's life, the event feed.

Theory of operation
===================
:func:`socket_route` wraps a route's handler with the checks every engineer
WebSocket gets, in this order; a refused upgrade is answered with an HTTP status
and a JSON body (ASGI's WebSocket denial response, which Hypercorn supports), so a
browser and the CLI learn why, and the listener's security headers go with it:

1. **Origin.** A browser sends ``Origin`` with every WebSocket upgrade and sends
   the session cookie along whichever page started it; an exact allow-list
   (:class:`auth.OriginAllowList`, by default the listener's own origins) stops
   other sites from riding the cookie: 403. A request without ``Origin`` did not
   come from a browser page, so it is let through only with a bearer token; a
   cookie alone is refused (403), since only a browser would send one.
2. **Session**: the bearer token or the cookie, as for the HTTP routes: 401.
3. **Role**: :data:`relay.api_contract.WEBSOCKET_ROLES`, default deny: 403.
4. **Admission** (optional, per route): e.g. the attach socket of a remote
   session admits only the session's own engineer (404, 409, 410).

*path* may hold Starlette path parameters (``/api/v1/sessions/{session_id}/attach``);
the roles are looked up by the pattern.

Then the socket is accepted and registered in :class:`EngineerSockets` for its
whole life, and the handler runs inside the hold's cancel scope: when the login
session ends (logout, ``relay user disable``, timeout) the handler is cancelled
and the socket is closed with 4004 and the reason. A handler returns the close it
wants (code, reason), or ``None`` when the client went away.

Every refusal is counted (``relay_engineer_refusals_total``,
``relay_auth_token_rejections_total``, ``relay_auth_forbidden_total``, and
``relay_engineer_refusals_total{reason="not_admitted"}`` for a route's own
admission) and the Origin and admission refusals are audit events, since they
are what an attack looks like (an attach to another engineer's session is one).

The event feed (``/api/v1/events``) sends ``{"type": "devices", "devices": [...]}``
when the socket opens and whenever the device list changes (see
:mod:`relay._trio.device_feed`). It takes no input: a message from the client
closes it with 1003.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio
from starlette.responses import JSONResponse
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketState

import auth
from relay._trio.device_feed import DeviceFeed
from relay._trio.engineer_sockets import EngineerSockets, SocketHold
from relay._trio.login_service import LoginService, Principal
from relay.api_contract import WEBSOCKET_ROLES
from relay.proto.close import CloseCode, close_code_label
from relay.store import StoreError

__all__ = [
    "SocketAdmission",
    "SocketClose",
    "SocketHandler",
    "events_handler",
    "socket_route",
]

#: A close the broker sends: (code, reason).
SocketClose = tuple[int, str]
SocketHandler = Callable[
    [WebSocket, Principal, SocketHold], Awaitable[SocketClose | None]
]
#: A route's own check before the upgrade is accepted: None, or (status, message).
SocketAdmission = Callable[[WebSocket, Principal], tuple[int, str] | None]

#: How long the broker waits to send its close frame to a client that does not read.
CLOSE_SEND_TIMEOUT_S: Final = 1.0
_LISTENER: Final = "engineer"


def socket_route(
    path: str,
    handler: SocketHandler,
    *,
    service: LoginService,
    sockets: EngineerSockets,
    origins: Callable[[], auth.OriginAllowList],
    admit: SocketAdmission | None = None,
) -> WebSocketRoute:
    """A WebSocket route at *path*, guarded as the module docstring describes."""
    allowed = WEBSOCKET_ROLES.get(path, frozenset())
    metrics = service.metrics

    async def endpoint(websocket: WebSocket) -> None:
        refusal = _check_origin(websocket, origins())
        if refusal is not None:
            metrics.engineer_refusals.labels(refusal).inc()
            service.log.warning(
                "engineer.websocket_refused",
                reason=refusal,
                origin=websocket.headers.get("origin", "")[:200],
                path=path,
                source=_source(websocket),
                audit=True,
            )
            await _deny(websocket, 403, "origin not allowed")
            return
        try:
            principal = await service.authenticate(websocket)
        except auth.InvalidToken:
            await _deny(websocket, 401, "unauthorized")
            return
        if principal.role not in allowed:
            service.forbidden(principal, ("WEBSOCKET", path))
            await _deny(websocket, 403, "forbidden")
            return
        if admit is not None:
            admission = admit(websocket, principal)
            if admission is not None:
                # E.g. an attach to another engineer's session (404): an
                # authorization failure, counted and audited like the others.
                metrics.engineer_refusals.labels("not_admitted").inc()
                service.log.warning(
                    "engineer.websocket_refused",
                    reason="not_admitted",
                    status=admission[0],
                    username=principal.username,
                    path=websocket.url.path[:200],
                    source=_source(websocket),
                    audit=True,
                )
                await _deny(websocket, *admission)
                return
        await websocket.accept()
        who = {
            "username": principal.username,
            "token_hash": principal.token_hash[:12],
            "path": path,
            "source": _source(websocket),
        }
        service.log.info("engineer.websocket_opened", **who)
        with sockets.hold(principal) as hold:
            with hold.cancel_scope:
                close = await handler(websocket, principal, hold)
            if hold.end_reason is not None:
                close = (hold.end_reason.close_code, hold.end_reason.value)
        if close is None:
            metrics.websocket_closes.labels(_LISTENER, "client").inc()
            service.log.info("engineer.websocket_closed", by="client", **who)
        else:
            code, reason = close
            metrics.websocket_closes.labels(_LISTENER, close_code_label(code)).inc()
            service.log.info(
                "engineer.websocket_closed",
                by="broker",
                code=code,
                reason=reason,
                **who,
            )
            await _close(websocket, code, reason)
        for closed in hold.after_close:
            closed()

    return WebSocketRoute(path, endpoint)


#: Narrows the device list to what one user may see (relay._trio.feed_api).
DeviceSelection = Callable[
    [Principal, list[dict[str, Any]]], Awaitable[list[dict[str, Any]]]
]


def events_handler(
    feed: DeviceFeed, *, send_timeout_s: float, select: DeviceSelection | None = None
) -> SocketHandler:
    """The ``/api/v1/events`` handler: the device list, pushed as it changes.

    With *select*, each socket gets only the instruments its user may see:
    the feed is shared by every socket, so the selection runs per socket and
    per version (at most once per ``device_feed_interval_s``). A list equal
    to the one this socket sent last is not sent again, so a customer's
    console does not learn from the pushes' timing that another
    organisation's instrument came online. A store that cannot say who may
    see what closes the socket with 1013 (try again later); the console
    reconnects.
    """

    async def events(
        websocket: WebSocket, principal: Principal, _hold: SocketHold
    ) -> SocketClose | None:
        outcome: list[SocketClose | None] = []
        with feed.listening():
            async with trio.open_nursery() as nursery:

                async def refuse_input() -> None:
                    outcome.append(await _no_input(websocket))
                    nursery.cancel_scope.cancel()

                nursery.start_soon(refuse_input)
                version = 0
                sent: list[dict[str, Any]] | None = None
                while True:
                    version, devices = await feed.newer_than(version)
                    if select is not None:
                        try:
                            devices = await select(principal, devices)
                        except StoreError:
                            outcome.append(
                                (int(CloseCode.TRY_AGAIN_LATER), "store unavailable")
                            )
                            nursery.cancel_scope.cancel()
                            break
                    if devices == sent:
                        continue
                    text = json.dumps({"type": "devices", "devices": devices})
                    with trio.move_on_after(send_timeout_s) as sending:
                        await websocket.send_text(text)
                    if sending.cancelled_caught:
                        outcome.append(
                            (int(CloseCode.POLICY_VIOLATION), "client too slow")
                        )
                        nursery.cancel_scope.cancel()
                        break
                    sent = devices
        return outcome[0] if outcome else None

    return events


async def _no_input(websocket: WebSocket) -> SocketClose | None:
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        return None
    return (int(CloseCode.UNSUPPORTED_DATA), "this socket takes no messages")


def _check_origin(websocket: WebSocket, allow_list: auth.OriginAllowList) -> str | None:
    """The refusal reason for the upgrade's Origin, or None if it may go on."""
    origin = websocket.headers.get("origin")
    if origin is None:
        has_bearer = websocket.headers.get("authorization") is not None
        return None if has_bearer else "no_origin_without_bearer"
    return None if allow_list.allows(origin) else "bad_origin"


async def _deny(websocket: WebSocket, status: int, message: str) -> None:
    await websocket.send_denial_response(
        JSONResponse({"error": message}, status_code=status)
    )


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    if websocket.application_state == WebSocketState.DISCONNECTED:
        return
    # The client may go away while we close: then there is nothing left to tell.
    gone = (RuntimeError, trio.BrokenResourceError, trio.ClosedResourceError)
    with trio.move_on_after(CLOSE_SEND_TIMEOUT_S), contextlib.suppress(*gone):
        await websocket.close(code, reason)


def _source(websocket: WebSocket) -> str:
    return websocket.client.host if websocket.client is not None else "unknown"
