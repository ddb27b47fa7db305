"""The engineer listener's API: login, sessions, roles and security headers.

Theory of operation
===================
:func:`api_routes` turns the :class:`~relay._trio.login_service.LoginService`
into Starlette routes. Every route is listed
in :data:`ROUTE_ROLES` with the roles it allows (:data:`PUBLIC` for the login, the
service banner at :data:`INFO_PATH`, the OpenAPI document and the browser
console's files); a route that is not in the table is refused to everybody, so
the default is deny. :class:`SecurityHeaders` adds HSTS, CSP, nosniff and
no-referrer to every response of the listener, and ``Cache-Control: no-store``
to everything under ``/api/``.

The console (:mod:`relay.console`): ``GET /`` answers its page with
:data:`~relay._trio.engineer_middleware.CONSOLE_CSP`, and ``GET /console/PATH``
its scripts, styles and vendored terminal, only files the package holds (404
for any other path). The page holds no data; it logs in with the API like any
client, and uses the session cookie, never the token.

:data:`relay.openapi.OPENAPI`, written by hand beside the routes, is the OpenAPI 3.1 document of
the ``/api/v1`` routes (bodies, answers, the bearer and cookie schemes); it is
served at :data:`OPENAPI_PATH`. Like the banner, it is a fixed document and not
counted against the per-address rate limit.

Login (``POST /api/v1/login``), in this order:

1. per-address rate limit (unauthenticated endpoints, 20/min, burst 40) -> 429;
2. body: ``application/json``, at most :data:`MAX_LOGIN_BODY_BYTES` -> 415/413,
   an object of three strings -> 400;
3. login throttle for (username, address) -> 429 with ``Retry-After``;
4. password (argon2 in a thread; an unknown user costs the same hash), account
   enabled, TOTP code (t-1..t, newer than the last accepted step), then the
   store's compare-and-set on the step, so that of racing logins with one code
   exactly one wins;
5. a new 256-bit token, stored hashed; 200 ``{"token", "expires_at"}`` and the
   ``__Host-relay_session`` cookie. ``expires_at`` is the absolute end of the
   session; the idle timeout may end it earlier.

Every failure of step 4 answers the same 401 (status, body, headers); the reason
goes only to ``relay_auth_failures_total{factor,reason}`` and the audit event
``auth.login_failed``.

"At most 5 TOTP tries per login transaction": a login is one request with the
password and one code, so a transaction has exactly one try, and every retry
sends the password again. Guessing codes across requests is what the throttle
stops: after ``login_free_failures`` (5) failures in a row for one account from
one address each further try waits (1 s, doubling, up to 15 min), and an account
takes at most 100 failures an hour from all addresses together.

Who sees which instrument (:class:`relay._trio.feed_api.DeviceVisibility`):
``GET /api/v1/devices`` and the live feed on ``/api/v1/events`` list only the
instruments the user may see, and the monitoring routes
(:mod:`relay._trio.feed_api`, mounted when the listener is given the store)
answer 404 for any other. A listener built without the store (tests of the
login alone) lists every instrument to engineers, admins and auditors, and
none to customers.

Authenticated routes take ``Authorization: Bearer TOKEN`` or the session cookie
(the header wins when both are sent); a token in the query string is ignored.
:func:`guarded_route` is that check, shared by every authenticated route;
:func:`audit_routes` guards the auditors' routes (:mod:`relay._trio.audit_api`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

import auth
from relay._trio.audit_api import AuditRoutes
from relay._trio.device_feed import DeviceFeed
from relay._trio.engineer_middleware import CONSOLE_CSP
from relay._trio.engineer_sockets import EngineerSockets, SocketEnd
from relay._trio.engineer_ws import SocketHandler, events_handler, socket_route
from relay._trio.enrollment_api import Enroller
from relay._trio.feed_api import (
    DataRequests,
    DeviceVisibility,
    FeedRoutes,
    FeedStore,
    PolicySource,
)
from relay._trio.login_service import LoginService, LoginThrottled, Principal
from relay._trio.request_body import BadBody, read_json_body
from relay._trio.session_api import SessionRoutes
from relay.api_contract import (
    AUDIT_RECORDING_PATH,
    AUDIT_SESSION_PATH,
    AUDIT_SESSIONS_PATH,
    CONSOLE_ASSETS_PATH,
    CONSOLE_PAGE_PATH,
    CSRF_HEADER,
    DEVICE_ALARMS_PATH,
    DEVICE_DAILY_STATS_PATH,
    DEVICE_DATA_REQUEST_PATH,
    DEVICE_DATA_REQUESTS_PATH,
    DEVICE_EXPORT_PATH,
    DEVICE_SESSIONS_PATH,
    DEVICE_SNAPSHOTS_PATH,
    ENROLLMENTS_PATH,
    EVENTS_PATH,
    INFO_PATH,
    MAX_LOGIN_BODY_BYTES,
    OPENAPI_PATH,
    PUBLIC,
    ROUTE_ROLES,
    SESSION_ATTACH_PATH,
    SESSION_COOKIE,
    SESSION_PATH,
    SESSIONS_PATH,
)
from relay.console import ConsoleFiles
from relay.openapi import OPENAPI

__all__ = [
    "api_routes",
    "audit_routes",
    "device_list",
    "feed_routes",
    "guarded_route",
]

_UNAUTHORIZED_BODY: Final = {"error": "invalid username, password or code"}
_SESSION_UNAUTHORIZED_BODY: Final = {"error": "unauthorized"}

# --- routes -----------------------------------------------------------------


Handler = Callable[[Request, Principal], Awaitable[Response]]


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _too_many(wait_s: float) -> JSONResponse:
    return JSONResponse(
        {"error": "too many requests"},
        status_code=429,
        headers={"Retry-After": str(auth.retry_after_s(wait_s))},
    )


def _source(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def _session_cookie(value: str, max_age_s: int) -> str:
    return (
        f"{SESSION_COOKIE}={value}; Secure; HttpOnly; SameSite=Strict; Path=/; "
        f"Max-Age={max_age_s}"
    )


#: Methods that change state: with the cookie they need the CSRF header.
_STATE_CHANGING: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _origin_allowed(request: Request, origins: auth.OriginAllowList) -> bool:
    """An Origin header, when the client sent one, must be one of ours.

    Browsers send Origin on every POST and DELETE; command-line clients send
    none and authenticate with the bearer header.
    """
    origin = request.headers.get("origin")
    return origin is None or origins.allows(origin)


def _cross_site_refusal(
    request: Request, principal: Principal, origins: auth.OriginAllowList
) -> str | None:
    """Why a cookie-authenticated state-changing request is refused, or None.

    Two checks, either enough on its own today (the cookie is also
    ``SameSite=Strict``): the Origin, when sent, is one of ours, and the
    ``X-Relay-CSRF`` header carries the session's CSRF token, which only a page
    of our own origin can have read (login answer, ``GET /api/v1/me``).
    """
    if not _origin_allowed(request, origins):
        return "bad_origin"
    if not auth.csrf_matches(principal.csrf_token, request.headers.get(CSRF_HEADER)):
        return "csrf"
    return None


class _BadBody(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def _read_login_body(request: Request) -> tuple[str, str, str]:
    try:
        data = await read_json_body(request, MAX_LOGIN_BODY_BYTES)
    except BadBody as bad:
        raise _BadBody(bad.status, bad.message) from None
    if not isinstance(data, dict) or set(data) != {"username", "password", "totp"}:
        raise _BadBody(400, "bad request")
    fields = (data["username"], data["password"], data["totp"])
    if not all(isinstance(value, str) and value for value in fields):
        raise _BadBody(400, "bad request")
    username, password, code = fields
    return str(username), str(password), str(code)


async def device_list(
    service: LoginService,
    *,
    stale_after: timedelta,
    in_session: Callable[[str], bool] | None = None,
) -> list[dict[str, Any]]:
    """Every enrolled device with its presence, as the API answers it.

    *in_session* tells whether a device has a pending or active remote session
    (:meth:`SessionRoutes.device_in_session`; None: a broker without sessions).
    The event feed re-reads this list every ``device_feed_interval_s``, so a
    session that starts or ends reaches the consoles within that interval.
    """
    records = await service.list_devices(stale_after=stale_after)
    return [
        {
            "device_id": record.device_id,
            "online": record.online,
            "revoked": record.revoked_at is not None,
            "in_session": in_session is not None and in_session(record.device_id),
            "labels": dict(record.labels),
        }
        for record in records
    ]


def guarded_route(
    service: LoginService,
    origins: Callable[[], auth.OriginAllowList],
    method: str,
    path: str,
    handler: Handler,
) -> Route:
    """A route that authenticates, refuses cross-site state changes and checks
    :data:`ROUTE_ROLES` (default deny) before it calls *handler*."""
    route = (method, path)

    async def endpoint(request: Request) -> Response:
        allowed = ROUTE_ROLES.get(route, frozenset())
        try:
            principal = await service.authenticate(request)
        except auth.InvalidToken:
            return JSONResponse(_SESSION_UNAUTHORIZED_BODY, status_code=401)
        if method in _STATE_CHANGING and principal.by_cookie:
            refusal = _cross_site_refusal(request, principal, origins())
            if refusal is not None:
                service.csrf_refused(principal, route, refusal)
                return _error(403, "cross-site request refused")
        if principal.role not in allowed:
            service.forbidden(principal, route)
            return _error(403, "forbidden")
        return await handler(request, principal)

    return Route(path, endpoint, methods=[method])


def audit_routes(
    service: LoginService,
    audit: AuditRoutes,
    *,
    origins: Callable[[], auth.OriginAllowList],
) -> list[BaseRoute]:
    """The auditors' routes (:mod:`relay._trio.audit_api`), guarded like the rest."""
    return [
        guarded_route(
            service, origins, "GET", AUDIT_SESSIONS_PATH, audit.list_sessions
        ),
        guarded_route(service, origins, "GET", AUDIT_SESSION_PATH, audit.session),
        guarded_route(service, origins, "GET", AUDIT_RECORDING_PATH, audit.recording),
    ]


def feed_routes(
    service: LoginService,
    feed: FeedRoutes,
    *,
    origins: Callable[[], auth.OriginAllowList],
) -> list[BaseRoute]:
    """The monitoring routes (:mod:`relay._trio.feed_api`), guarded like the rest."""
    return [
        guarded_route(service, origins, "GET", DEVICE_ALARMS_PATH, feed.alarms),
        guarded_route(
            service, origins, "GET", DEVICE_DAILY_STATS_PATH, feed.daily_stats
        ),
        guarded_route(service, origins, "GET", DEVICE_SNAPSHOTS_PATH, feed.snapshots),
        guarded_route(
            service,
            origins,
            "POST",
            DEVICE_DATA_REQUESTS_PATH,
            feed.create_data_request,
        ),
        guarded_route(
            service, origins, "GET", DEVICE_DATA_REQUEST_PATH, feed.data_request
        ),
        guarded_route(service, origins, "GET", DEVICE_SESSIONS_PATH, feed.sessions),
        guarded_route(service, origins, "GET", DEVICE_EXPORT_PATH, feed.export),
    ]


async def _only_for_staff(
    principal: Principal, devices: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The device list without a store to decide visibility: customers see none."""
    return [] if principal.role == "customer" else devices


def api_routes(
    service: LoginService,
    *,
    banner: Callable[[], dict[str, str]],
    presence_stale_after: timedelta,
    sockets: EngineerSockets,
    device_feed: DeviceFeed,
    origins: Callable[[], auth.OriginAllowList],
    websocket_send_timeout_s: float,
    enroller: Enroller,
    sessions: SessionRoutes | None = None,
    store: FeedStore | None = None,
    policy: PolicySource | None = None,
    data_requester: DataRequests | None = None,
) -> list[BaseRoute]:
    """The engineer listener's routes, each guarded by :data:`ROUTE_ROLES` or
    :data:`WEBSOCKET_ROLES`.

    Args:
        store: Users, labels and the monitoring feed; given, the monitoring
            routes are mounted and the device list is filtered by
            :class:`~relay._trio.feed_api.DeviceVisibility`.
        policy: The access policy in force (the broker's ``PolicyGate``), which
            decides what engineers see; without it engineers see no instrument.
        data_requester: Sends data requests to instruments (the broker's
            ``DataRequester``); without it ``POST .../data-requests`` is 503.
    """
    visibility = None if store is None else DeviceVisibility(store=store, policy=policy)
    visible: Callable[[Principal, list[dict[str, Any]]], Awaitable[Any]] = (
        _only_for_staff if visibility is None else visibility.filter
    )

    def guarded(method: str, path: str, handler: Handler) -> Route:
        return guarded_route(service, origins, method, path, handler)

    console = ConsoleFiles()

    async def console_page(_request: Request) -> Response:
        return console.page("index.html", csp=CONSOLE_CSP)

    async def console_asset(request: Request) -> Response:
        return console.asset(request, str(request.path_params["path"]))

    async def info(_request: Request) -> Response:
        return JSONResponse(banner())

    async def openapi(_request: Request) -> Response:
        return JSONResponse(OPENAPI)

    async def login(request: Request) -> Response:
        source = _source(request)
        if not _origin_allowed(request, origins()):
            # Login CSRF: another site's page must not log the browser in.
            service.csrf_refused(None, ("POST", "/api/v1/login"), "bad_origin")
            return _error(403, "cross-site request refused")
        try:
            service.check_rate(source)
        except LoginThrottled as throttled:
            return _too_many(throttled.wait_s)
        try:
            username, password, code = await _read_login_body(request)
        except _BadBody as bad:
            return _error(bad.status, bad.message)
        try:
            result = await service.login(
                username=username, password=password, code=code, source=source
            )
        except LoginThrottled as throttled:
            return _too_many(throttled.wait_s)
        except auth.InvalidCredentials:
            return JSONResponse(_UNAUTHORIZED_BODY, status_code=401)
        return JSONResponse(
            {
                "token": result.token,
                "expires_at": result.expires_at.isoformat(),
                "csrf_token": auth.csrf_token(result.token),
            },
            headers={"Set-Cookie": _session_cookie(result.token, result.max_age_s)},
        )

    async def logout(request: Request, principal: Principal) -> Response:
        # This node's sockets of the session close now, before the store's
        # revocation feed could end them as "revoked"; other nodes' within
        # their revocation poll.
        sockets.end_login_session(principal.token_hash, SocketEnd.LOGOUT)
        await service.logout(principal, source=_source(request))
        return JSONResponse(
            {"ok": True}, headers={"Set-Cookie": _session_cookie("", 0)}
        )

    async def me(_request: Request, principal: Principal) -> Response:
        return JSONResponse(
            {
                "username": principal.username,
                "role": principal.role,
                "csrf_token": principal.csrf_token,
            }
        )

    async def devices(_request: Request, principal: Principal) -> Response:
        listed = await device_list(
            service,
            stale_after=presence_stale_after,
            in_session=None if sessions is None else sessions.device_in_session,
        )
        return JSONResponse(await visible(principal, listed))

    events: SocketHandler
    if visibility is None:
        plain = events_handler(device_feed, send_timeout_s=websocket_send_timeout_s)

        async def events(websocket: Any, principal: Principal, hold: Any) -> Any:
            if principal.role == "customer":
                return (1008, "no instruments to show")
            return await plain(websocket, principal, hold)

    else:
        events = events_handler(
            device_feed,
            send_timeout_s=websocket_send_timeout_s,
            select=visibility.filter,
        )

    public: dict[tuple[str, str], Callable[[Request], Awaitable[Response]]] = {
        ("GET", CONSOLE_PAGE_PATH): console_page,
        ("GET", CONSOLE_ASSETS_PATH): console_asset,
        ("GET", INFO_PATH): info,
        ("POST", "/api/v1/login"): login,
        ("GET", OPENAPI_PATH): openapi,
    }
    routes: list[BaseRoute] = [
        Route(path, endpoint, methods=[method])
        for (method, path), endpoint in public.items()
        if ROUTE_ROLES.get((method, path)) is PUBLIC
    ]
    routes += [
        guarded("POST", "/api/v1/logout", logout),
        guarded("GET", "/api/v1/me", me),
        guarded("GET", "/api/v1/devices", devices),
        guarded("POST", ENROLLMENTS_PATH, enroller.enroll),
        socket_route(
            EVENTS_PATH,
            events,
            service=service,
            sockets=sockets,
            origins=origins,
        ),
    ]
    if sessions is not None:
        routes += [
            guarded("POST", SESSIONS_PATH, sessions.create),
            guarded("GET", SESSION_PATH, sessions.get),
            guarded("DELETE", SESSION_PATH, sessions.delete),
            socket_route(
                SESSION_ATTACH_PATH,
                sessions.attach,
                service=service,
                sockets=sockets,
                origins=origins,
                admit=sessions.admit,
            ),
        ]
    if store is not None and visibility is not None:
        routes += feed_routes(
            service,
            FeedRoutes(
                store=store,
                visibility=visibility,
                data_requester=data_requester,
                log=service.log,
            ),
            origins=origins,
        )
    return routes
