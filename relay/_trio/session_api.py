"""The remote-session routes of the engineer API, and the attach socket.

Theory of operation
===================
Thin handlers over :class:`relay._trio.session_broker.SessionBroker`; the roles
of each route are in :data:`relay.api_contract.ROUTE_ROLES` (engineer and admin)
and the routes are registered by :func:`relay._trio.engineer_api.api_routes`.

- ``POST /api/v1/sessions`` ``{"device_id", "reason", "channels"}``: 201
  ``{"session_id", "state"}`` once the offer is on the device's control channel;
  400 a bad body (not an object of exactly these keys, a device id or reason of
  the wrong form, channels that do not parse), 403 the access policy refuses
  (the error says why: a channel it does not allow, a reason it requires ...), 404 the device is not connected, 409 ``{"error": "busy"}`` the device
  has a pending or active session.
  Decision: an enrolled device that is offline answers 404 like an unknown one
  ("device not connected"): the request can only be answered by a connected
  device, and the answer does not tell an engineer which ids are enrolled.
- ``GET /api/v1/sessions/{id}``: the session's view (``grant_deadline``,
  ``granted_at``, ``ends_at``: ISO times or null); engineers see their own
  sessions only (another's is 404, as an unknown id), admins every session.
- ``DELETE /api/v1/sessions/{id}``: its engineer or an admin ends it; before the
  grant the reason is ``cancelled``, after it ``engineer`` (the owner) or
  ``admin``. 200 with the view; 404 unknown (or not the caller's); 409 already
  ended. With several nodes, an admin may end a session that another node
  holds: that node ends it (reason ``admin``) and confirms over the node bus,
  then the answer is 202 ``{"session_id", "state": "ended", "node"}``; 503 if it
  did not confirm within ``[cluster] command_deadline_s``.
- ``WS /api/v1/sessions/{id}/attach``: guarded like every engineer socket (Origin,
  token, role), then admitted only for the session's own engineer (404 otherwise,
  410 ended, 409 already attached), then run by the session broker.

Every answer of the POST route is counted in ``relay_session_requests_total``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocket

from relay._trio.engineer_sockets import SocketHold
from relay._trio.engineer_ws import SocketClose
from relay._trio.login_service import Principal
from relay._trio.request_body import BadBody, read_json_body
from relay._trio.session_broker import RequestRefused, SessionBroker
from relay.api_contract import MAX_SESSION_BODY_BYTES
from relay.metrics import RelayMetrics
from relay.proto.session import DEVICE_ID_FORM, is_session_id

__all__ = ["SessionRoutes"]

#: The longest reason an engineer may give (the offer's limit).
MAX_REASON_CHARS: Final = 500
Handler = Callable[[Request, Principal], Awaitable[Response]]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _is_reason(value: object) -> bool:
    # May be empty here: whether a reason is required, and of which form, is
    # the access policy's to say (docs/policies.md).
    if not isinstance(value, str) or len(value) > MAX_REASON_CHARS:
        return False
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return False  # shown on the touchscreen and in terminals
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape
        return False
    return True


class SessionRoutes:
    """The session handlers, bound to one :class:`SessionBroker`."""

    def __init__(self, sessions: SessionBroker, metrics: RelayMetrics) -> None:
        self.sessions = sessions
        self._metrics = metrics

    async def create(self, request: Request, principal: Principal) -> Response:
        """``POST /api/v1/sessions``."""
        try:
            body: Any = await read_json_body(request, MAX_SESSION_BODY_BYTES)
        except BadBody as bad:
            return self._refused(bad.status, bad.message, "bad_request")
        if not isinstance(body, dict) or set(body) != {
            "device_id",
            "reason",
            "channels",
        }:
            return self._refused(400, "bad request", "bad_request")
        device_id, reason = body["device_id"], body["reason"]
        if not isinstance(device_id, str) or not DEVICE_ID_FORM.fullmatch(device_id):
            return self._refused(400, "bad device_id", "bad_request")
        if not _is_reason(reason):
            return self._refused(
                400,
                f"reason must be at most {MAX_REASON_CHARS} characters of text",
                "bad_request",
            )
        try:
            view = await self.sessions.request(
                device_id=device_id,
                engineer=principal.username,
                engineer_role=principal.role,
                reason=reason,
                channels=body["channels"],
                source=request.client.host if request.client is not None else "unknown",
            )
        except RequestRefused as refused:
            return self._refused(refused.status, refused.error, refused.outcome)
        self._metrics.session_requests.labels("created").inc()
        return JSONResponse(
            {"session_id": view["session_id"], "state": view["state"]},
            status_code=201,
        )

    def device_in_session(self, device_id: str) -> bool:
        """Whether *device_id* has a pending or active session (the device list)."""
        return self.sessions.device_in_session(device_id)

    def _refused(self, status: int, message: str, outcome: str) -> JSONResponse:
        self._metrics.session_requests.labels(outcome).inc()
        response = _error(status, message)
        if status == 503:
            # Something the broker depends on is away (the store, Redis,
            # another node, the audit log): worth trying again shortly, as
            # the listener's own 503 for a store that is down says too.
            response.headers["Retry-After"] = "5"
        return response

    def _visible(self, request: Request, principal: Principal) -> str | None:
        session_id = request.path_params.get("session_id")
        if not is_session_id(session_id):
            return None
        view = self.sessions.view(str(session_id))
        if view is None:
            return None
        if principal.role != "admin" and view["engineer"] != principal.username:
            return None
        return str(session_id)

    async def get(self, request: Request, principal: Principal) -> Response:
        """``GET /api/v1/sessions/{session_id}``."""
        session_id = self._visible(request, principal)
        view = None if session_id is None else self.sessions.view(session_id)
        if view is None:
            return _error(404, "unknown session")
        return JSONResponse(view)

    async def delete(self, request: Request, principal: Principal) -> Response:
        """``DELETE /api/v1/sessions/{session_id}``."""
        session_id = self._visible(request, principal)
        if session_id is None:
            return await self._end_on_its_node(request, principal)
        view = await self.sessions.end(
            session_id,
            by_admin=principal.role == "admin",
            by_owner=self.sessions.session_engineer(session_id) == principal.username,
        )
        if view is None:
            return _error(409, "session has ended")
        return JSONResponse(view)

    async def _end_on_its_node(
        self, request: Request, principal: Principal
    ) -> Response:
        """An admin's end of a session this node does not hold (several nodes)."""
        session_id = request.path_params.get("session_id")
        if principal.role != "admin" or not is_session_id(session_id):
            return _error(404, "unknown session")
        try:
            node = await self.sessions.end_on_its_node(
                str(session_id), admin=principal.username
            )
        except RequestRefused as refused:
            return _error(refused.status, refused.error)
        if node is None:
            return _error(404, "unknown session")
        return JSONResponse(
            {"session_id": session_id, "state": "ended", "node": node},
            status_code=202,
        )

    def admit(
        self, websocket: WebSocket, principal: Principal
    ) -> tuple[int, str] | None:
        """The attach socket's admission: only the session's own engineer."""
        session_id = websocket.path_params.get("session_id")
        if not is_session_id(session_id):
            return 404, "unknown session"
        return self.sessions.admit_attach(str(session_id), principal.username)

    async def attach(
        self, websocket: WebSocket, _principal: Principal, hold: SocketHold
    ) -> SocketClose | None:
        """The attach socket: the engineer's leg of the session."""
        # Tunnel frames from the engineer are use of the login session: an
        # engineer at work in the terminal is not idle.
        hold.mark_used()
        return await self.sessions.serve_attach(
            str(websocket.path_params["session_id"]),
            websocket,
            on_input=hold.mark_used,
            after_close=hold.after_close,
        )
