"""The engineer listener's API: login, sessions, roles and security headers.

Theory of operation
===================
:class:`LoginService` is the thin trio shell around the pure ``auth`` code and the
store: it owns the abuse tables (a :class:`auth.RateLimiter` per client address and
a :class:`auth.LoginThrottle` per account and address), runs argon2 and every store
call in worker threads, counts every refusal and writes audit events. It holds no
rules of its own beyond the order of the checks.

:func:`api_routes` turns the service into Starlette routes. Every route is listed
in :data:`ROUTE_ROLES` with the roles it allows (:data:`PUBLIC` for the login, the
service banner and the OpenAPI document); a route that is not in the table is
refused to everybody, so the default is deny. :class:`SecurityHeaders` adds HSTS,
CSP, nosniff and no-referrer to every response of the listener, and
``Cache-Control: no-store`` to everything under ``/api/``.

:data:`OPENAPI`, written by hand beside the routes, is the OpenAPI 3.1 document of
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
``auth.login_failed``. One login request carries one TOTP code, so a login
transaction has exactly one TOTP try (within the limit of
``totp_tries_per_login``); brute force across requests is what the throttle stops.

Authenticated routes take ``Authorization: Bearer TOKEN`` or the session cookie
(the header wins when both are sent); a token in the query string is ignored.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Final

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import auth
from relay import __version__
from relay.config import EngineerAuthConfig
from relay.metrics import RelayMetrics
from relay.store import DeviceRecord, Store, UnknownUser, UserDisabled, UserRecord
from relay.users import totp_context

__all__ = [
    "ALL_ROLES",
    "MAX_LOGIN_BODY_BYTES",
    "OPENAPI",
    "OPENAPI_PATH",
    "PUBLIC",
    "ROUTE_ROLES",
    "SESSION_COOKIE",
    "LoginService",
    "LoginThrottled",
    "Principal",
    "SecurityHeaders",
    "api_routes",
]

SESSION_COOKIE: Final = "__Host-relay_session"
MAX_LOGIN_BODY_BYTES: Final = 4 * 1024
#: Longest user name written to an audit event, as given by the client.
MAX_LOGGED_USERNAME_CHARS: Final = 64

ALL_ROLES: Final = frozenset({"engineer", "auditor", "admin"})
#: Marker in :data:`ROUTE_ROLES` for a route that needs no login.
PUBLIC: Final = frozenset({"*public*"})
#: Where the listener serves :data:`OPENAPI`.
OPENAPI_PATH: Final = "/api/v1/openapi.json"

#: Every route of the engineer listener and the roles it allows; default deny.
ROUTE_ROLES: Final[Mapping[tuple[str, str], frozenset[str]]] = {
    ("GET", "/"): PUBLIC,
    ("POST", "/api/v1/login"): PUBLIC,
    ("GET", OPENAPI_PATH): PUBLIC,
    ("POST", "/api/v1/logout"): ALL_ROLES,
    ("GET", "/api/v1/me"): ALL_ROLES,
    ("GET", "/api/v1/devices"): frozenset({"engineer", "admin"}),
}

_FACTORS: Final[Mapping[str, str]] = {
    "unknown_user": "user",
    "user_disabled": "user",
    "bad_password": "password",
    "password_hash_unreadable": "password",
    "bad_totp": "totp",
    "totp_reused": "totp",
    "too_many_totp_tries": "totp",
    "totp_secret_unreadable": "totp",
}

_STORE_PROBLEMS: Final = frozenset(
    {"password_hash_unreadable", "totp_secret_unreadable"}
)
_UNAUTHORIZED_BODY: Final = {"error": "invalid username, password or code"}
_SESSION_UNAUTHORIZED_BODY: Final = {"error": "unauthorized"}
_LOGOUT_REASON: Final = "logout"

_SECURITY_HEADERS: Final = (
    (b"strict-transport-security", b"max-age=31536000"),
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; object-src 'none'; "
        b"frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)


class SecurityHeaders:
    """ASGI middleware: security headers on every HTTP response.

    A header the application already set is left alone; ``Cache-Control:
    no-store`` is forced on every path under ``/api/``.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        api = str(scope.get("path", "")).startswith("/api/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if not (api and name.lower() == b"cache-control")
                ]
                present = {name.lower() for name, _ in headers}
                headers.extend(h for h in _SECURITY_HEADERS if h[0] not in present)
                if api:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


@dataclass(frozen=True, slots=True, kw_only=True)
class Principal:
    """An authenticated engineer: who, with which role, on which session."""

    username: str
    role: str
    token_hash: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LoginResult:
    """A successful login: the token (for the client only) and its absolute end."""

    token: str
    expires_at: datetime
    max_age_s: int


class LoginThrottled(Exception):
    """A login attempt must wait *wait_s* seconds (answer 429 + Retry-After)."""

    def __init__(self, wait_s: float) -> None:
        super().__init__("too many requests")
        self.wait_s = wait_s


class LoginService:
    """Engineer login and session checks, with their abuse limits.

    One per broker process; the limit tables live in memory (per node).

    Args:
        store: The relay store (called in worker threads).
        hasher: The shared password hasher.
        sealer: Opens the users' sealed TOTP secrets.
        config: Lifetimes and abuse limits.
        metrics: Where refusals are counted.
        log: Structured logger for audit events.
        wall_clock: The current time, timezone-aware (for TOTP and sessions).
        monotonic: Seconds on a monotonic clock (for the limit tables).
    """

    def __init__(
        self,
        *,
        store: Store,
        hasher: auth.PasswordHasher,
        sealer: auth.SecretSealer,
        config: EngineerAuthConfig,
        metrics: RelayMetrics,
        log: Any,
        wall_clock: Callable[[], datetime],
        monotonic: Callable[[], float] = trio.current_time,
    ) -> None:
        self._store = store
        self._hasher = hasher
        self._sealer = sealer
        self._metrics = metrics
        self._log = log
        # Public for the app's error handlers, which count and log what they answer.
        self.metrics = metrics
        self.log = log
        self._wall_clock = wall_clock
        self._monotonic = monotonic
        # Each argon2 hash takes 64 MiB: a login flood must not take the memory.
        self._hash_limiter = trio.CapacityLimiter(config.max_concurrent_password_hashes)
        self.lifetime: Final = auth.SessionLifetime(
            idle=timedelta(seconds=config.session_idle_s),
            absolute=timedelta(seconds=config.session_absolute_s),
        )
        self.rate_limiter: Final = auth.RateLimiter(
            auth.RateLimit(
                per_minute=config.unauthenticated_per_minute,
                burst=config.unauthenticated_burst,
            )
        )
        self.throttle: Final = auth.LoginThrottle(
            auth.LoginLimits(
                free_failures=config.login_free_failures,
                base_delay_s=config.login_base_delay_s,
                max_delay_s=config.login_max_delay_s,
                streak_ttl_s=max(auth.limits.HOUR_S, config.login_max_delay_s),
                max_failures_per_hour=config.login_failures_per_hour,
            )
        )

    # --- unauthenticated endpoints ---------------------------------------------

    def check_rate(self, source: str) -> None:
        """Take one request of *source*'s unauthenticated allowance.

        Raises:
            LoginThrottled: The address is over its rate.
        """
        wait = self.rate_limiter.check(source, now=self._monotonic())
        if wait > 0.0:
            self._metrics.auth_throttled.labels("rate_limit").inc()
            self._log.warning(
                "auth.rate_limited", source=source, wait_s=round(wait, 3), audit=True
            )
            raise LoginThrottled(wait)

    async def login(
        self, *, username: str, password: str, code: str, source: str
    ) -> LoginResult:
        """Check both factors and open a session.

        Raises:
            LoginThrottled: The (username, source) pair or the account must wait.
            auth.InvalidCredentials: Any failure; ``reason`` is for counters only.
        """
        logged_name = username[:MAX_LOGGED_USERNAME_CHARS]
        decision = self.throttle.decide(username, source, now=self._monotonic())
        if not decision.allowed:
            reason = decision.reason.value if decision.reason else "unknown"
            self._metrics.auth_throttled.labels(reason).inc()
            self._log.warning(
                "auth.login_throttled",
                username=logged_name,
                source=source,
                reason=reason,
                wait_s=round(decision.wait_s, 3),
                audit=True,
            )
            raise LoginThrottled(decision.wait_s)
        succeeded = False
        try:
            result = await self._login(username, password, code, source)
            succeeded = True
        except auth.InvalidCredentials as error:
            if error.reason in _STORE_PROBLEMS:
                # A broken row or the wrong sealing key: the operator must act.
                self._log.error(
                    "auth.credential_unreadable",
                    username=logged_name,
                    reason=error.reason,
                )
            self._metrics.auth_failures.labels(
                _FACTORS.get(error.reason, "user"), error.reason
            ).inc()
            self._log.warning(
                "auth.login_failed",
                username=logged_name,
                source=source,
                reason=error.reason,
                audit=True,
            )
            raise
        finally:
            # Settles the charge decide() made, on every way out (Rule of limits.py).
            if succeeded:
                self.throttle.record_success(username, source, now=self._monotonic())
            else:
                self.throttle.record_failure(username, source, now=self._monotonic())
        self._metrics.auth_logins.inc()
        self._log.info(
            "auth.login",
            username=username,
            source=source,
            token_hash=auth.token_hash(result.token)[:12],
            audit=True,
        )
        return result

    async def _login(
        self, username: str, password: str, code: str, source: str
    ) -> LoginResult:
        found = await trio.to_thread.run_sync(self._store.get_user, username)
        async with self._hash_limiter:
            user = await trio.to_thread.run_sync(self._check_password, found, password)
        if user.disabled_at is not None:
            raise auth.InvalidCredentials("user_disabled")
        try:
            secret = self._sealer.unseal(
                user.totp_secret_sealed, context=totp_context(username)
            )
            step = auth.verify_totp(
                secret,
                code,
                now=self._wall_clock(),
                last_accepted_step=user.totp_last_step,
            )
        except (auth.SealedValueError, ValueError):
            raise auth.InvalidCredentials("totp_secret_unreadable") from None
        if not await trio.to_thread.run_sync(
            self._store.accept_totp_step, username, step
        ):
            # Another login won the race for this step, or the user was disabled.
            raise auth.InvalidCredentials("totp_reused")
        token = auth.new_token()
        now = self._wall_clock()
        try:
            await trio.to_thread.run_sync(
                partial(
                    self._store.create_login_session,
                    token_hash=auth.token_hash(token),
                    username=username,
                    at=now,
                    source=source,
                )
            )
        except UserDisabled:
            raise auth.InvalidCredentials("user_disabled") from None
        except UnknownUser:
            raise auth.InvalidCredentials("unknown_user") from None
        return LoginResult(
            token=token,
            expires_at=now + self.lifetime.absolute,
            max_age_s=int(self.lifetime.absolute.total_seconds()),
        )

    def _check_password(self, user: UserRecord | None, password: str) -> UserRecord:
        # Runs in a worker thread: one argon2 verification whatever the cause.
        if user is None:
            self._hasher.verify_unknown_user(password)
        try:
            self._hasher.verify(user.password_hash, password)
        except ValueError:
            raise auth.InvalidCredentials("password_hash_unreadable") from None
        return user

    # --- sessions ------------------------------------------------------------

    async def authenticate(self, request: Request) -> Principal:
        """Find the live session of *request*'s bearer token or cookie.

        Raises:
            auth.InvalidToken: No token, or a malformed, unknown, revoked or
                expired one, or its user is disabled or gone.
        """
        try:
            return await self._authenticate(request)
        except auth.InvalidToken as error:
            self._metrics.auth_token_rejections.labels(error.reason).inc()
            raise

    async def _authenticate(self, request: Request) -> Principal:
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer":
                raise auth.InvalidToken("malformed")
            token = token.strip()
        else:
            cookie = request.cookies.get(SESSION_COOKIE)
            if cookie is None:
                raise auth.InvalidToken("missing")
            token = cookie
        digest = auth.token_hash(auth.verify_token_format(token))
        session = await trio.to_thread.run_sync(self._store.get_login_session, digest)
        if session is None:
            raise auth.InvalidToken("unknown")
        if session.revoked_at is not None:
            raise auth.InvalidToken("revoked")
        now = self._wall_clock()
        auth.verify_session_times(
            created_at=session.created_at,
            last_used_at=session.last_used_at,
            now=now,
            lifetime=self.lifetime,
        )
        user = await trio.to_thread.run_sync(self._store.get_user, session.username)
        if user is None or user.disabled_at is not None:
            raise auth.InvalidToken("revoked")
        await trio.to_thread.run_sync(
            partial(self._store.touch_login_session, digest, at=now)
        )
        return Principal(username=user.username, role=user.role, token_hash=digest)

    async def logout(self, principal: Principal, *, source: str) -> None:
        """Revoke *principal*'s session at once."""
        await trio.to_thread.run_sync(
            partial(
                self._store.revoke_login_session,
                principal.token_hash,
                at=self._wall_clock(),
                reason=_LOGOUT_REASON,
            )
        )
        self._log.info(
            "auth.logout",
            username=principal.username,
            source=source,
            token_hash=principal.token_hash[:12],
            audit=True,
        )

    def forbidden(self, principal: Principal, route: tuple[str, str]) -> None:
        """Count and audit a refusal by role."""
        self._metrics.auth_forbidden.inc()
        self._log.warning(
            "auth.forbidden",
            username=principal.username,
            role=principal.role,
            route=" ".join(route),
            audit=True,
        )

    async def list_devices(self, *, stale_after: timedelta) -> list[DeviceRecord]:
        """Every enrolled device with its presence."""
        return await trio.to_thread.run_sync(
            partial(
                self._store.list_devices,
                now=self._wall_clock(),
                stale_after=stale_after,
            )
        )


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


class _BadBody(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def _read_login_body(request: Request) -> tuple[str, str, str]:
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise _BadBody(415, "unsupported media type")
    declared = request.headers.get("content-length")
    if declared is not None and (
        not declared.isdigit() or int(declared) > MAX_LOGIN_BODY_BYTES
    ):
        raise _BadBody(413, "request body too large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_LOGIN_BODY_BYTES:
            raise _BadBody(413, "request body too large")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise _BadBody(400, "bad request") from None
    if not isinstance(data, dict) or set(data) != {"username", "password", "totp"}:
        raise _BadBody(400, "bad request")
    fields = (data["username"], data["password"], data["totp"])
    if not all(isinstance(value, str) and value for value in fields):
        raise _BadBody(400, "bad request")
    username, password, code = fields
    return str(username), str(password), str(code)


# --- the OpenAPI document ----------------------------------------------------
#
# Hand-written, next to the routes it describes: a change to a route, its body, its
# answers or ROUTE_ROLES changes this document in the same review. The tests check
# that it documents exactly the /api/v1 routes of ROUTE_ROLES, that 403 is listed
# exactly where a role can be refused, and run schemathesis against it.


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _answer(
    description: str, ref: str, *, headers: tuple[str, ...] = ()
) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": _json_content({"$ref": f"#/components/schemas/{ref}"}),
    }
    if headers:
        answer["headers"] = {
            name: {"$ref": f"#/components/headers/{name}"} for name in headers
        }
    return answer


_ERROR_ANSWERS: Final[Mapping[str, dict[str, Any]]] = {
    "400": _answer(
        "The body is not a JSON object of exactly username, password and totp, "
        "each a non-empty string.",
        "Error",
    ),
    "401": _answer(
        "No valid session: the token or cookie is missing, malformed, unknown, "
        "revoked or expired, or its user is disabled.",
        "Error",
    ),
    "403": _answer("The session's role is not allowed on this route.", "Error"),
    "413": _answer(f"The body is larger than {MAX_LOGIN_BODY_BYTES} bytes.", "Error"),
    "415": _answer("The body is not application/json.", "Error"),
    "429": _answer(
        "Too many requests from this address or for this account; retry after "
        "Retry-After seconds.",
        "Error",
        headers=("Retry-After",),
    ),
    "503": _answer(
        "The store is unavailable; retry after Retry-After seconds.",
        "Error",
        headers=("Retry-After",),
    ),
}


def _errors(*statuses: str) -> dict[str, dict[str, Any]]:
    return {status: _ERROR_ANSWERS[status] for status in statuses}


_SESSION_SECURITY: Final[list[dict[str, list[str]]]] = [
    {"bearer": []},
    {"session_cookie": []},
]

#: The OpenAPI 3.1 document of the engineer API, served at :data:`OPENAPI_PATH`.
OPENAPI: Final[Mapping[str, Any]] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Remote Care relay engineer API",
        "version": __version__,
        "description": (
            "The engineer listener's API. Authenticated routes take "
            "`Authorization: Bearer TOKEN` or the session cookie (the header wins "
            "when both are sent); a token in the query string is ignored. "
            "`x-roles` lists the roles a route allows; every other role gets 403."
        ),
    },
    "paths": {
        "/api/v1/login": {
            "post": {
                "operationId": "login",
                "summary": "Log in with password and TOTP code; open a session.",
                "description": (
                    "Every wrong username, password or code answers the same 401. "
                    "Unauthenticated requests are rate-limited per address, and "
                    "failed logins per account and address (429)."
                ),
                "x-roles": ["public"],
                "security": [],
                "requestBody": {
                    "required": True,
                    "description": f"At most {MAX_LOGIN_BODY_BYTES} bytes.",
                    "content": _json_content(
                        {"$ref": "#/components/schemas/LoginRequest"}
                    ),
                },
                "responses": {
                    "200": _answer(
                        "Logged in: a new token (also set as the session cookie).",
                        "LoginResponse",
                        headers=("Set-Cookie",),
                    ),
                    **_errors("400", "401", "413", "415", "429", "503"),
                },
            }
        },
        "/api/v1/logout": {
            "post": {
                "operationId": "logout",
                "summary": "Revoke this session at once and clear the cookie.",
                "x-roles": sorted(ALL_ROLES),
                "security": _SESSION_SECURITY,
                "responses": {
                    "200": _answer(
                        "Logged out.", "LogoutResponse", headers=("Set-Cookie",)
                    ),
                    **_errors("401", "503"),
                },
            }
        },
        "/api/v1/me": {
            "get": {
                "operationId": "me",
                "summary": "Who this session belongs to.",
                "x-roles": sorted(ALL_ROLES),
                "security": _SESSION_SECURITY,
                "responses": {
                    "200": _answer("The session's user.", "Me"),
                    **_errors("401", "503"),
                },
            }
        },
        "/api/v1/devices": {
            "get": {
                "operationId": "listDevices",
                "summary": "Every enrolled device with its presence.",
                "x-roles": ["admin", "engineer"],
                "security": _SESSION_SECURITY,
                "responses": {
                    "200": {
                        "description": "The devices.",
                        "content": _json_content(
                            {
                                "type": "array",
                                "items": {"$ref": "#/components/schemas/Device"},
                            }
                        ),
                    },
                    **_errors("401", "403", "503"),
                },
            }
        },
        OPENAPI_PATH: {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "x-roles": ["public"],
                "security": [],
                "responses": {
                    "200": {
                        "description": "The OpenAPI document.",
                        "content": _json_content({"type": "object"}),
                    }
                },
            }
        },
    },
    "components": {
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "The token answered by POST /api/v1/login.",
            },
            "session_cookie": {
                "type": "apiKey",
                "in": "cookie",
                "name": SESSION_COOKIE,
                "description": (
                    "Set by POST /api/v1/login: Secure; HttpOnly; "
                    "SameSite=Strict; Path=/."
                ),
            },
        },
        "headers": {
            "Retry-After": {
                "description": "Seconds to wait before retrying.",
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            },
            "Set-Cookie": {
                "description": (
                    f"{SESSION_COOKIE}=TOKEN; Secure; HttpOnly; SameSite=Strict; "
                    "Path=/; Max-Age=SECONDS (empty value and Max-Age=0 on logout)."
                ),
                "schema": {"type": "string"},
            },
        },
        "schemas": {
            "Error": {
                "type": "object",
                "properties": {"error": {"type": "string"}},
                "required": ["error"],
                "additionalProperties": False,
            },
            "LoginRequest": {
                "type": "object",
                "properties": {
                    "username": {"type": "string", "minLength": 1},
                    "password": {"type": "string", "minLength": 1},
                    "totp": {
                        "type": "string",
                        "minLength": 1,
                        "description": "The current code of the authenticator.",
                    },
                },
                "required": ["username", "password", "totp"],
                "additionalProperties": False,
            },
            "LoginResponse": {
                "type": "object",
                "properties": {
                    "token": {"type": "string"},
                    "expires_at": {
                        "type": "string",
                        "format": "date-time",
                        "description": (
                            "Absolute end of the session; the idle timeout may "
                            "end it earlier."
                        ),
                    },
                },
                "required": ["token", "expires_at"],
                "additionalProperties": False,
            },
            "LogoutResponse": {
                "type": "object",
                "properties": {"ok": {"const": True}},
                "required": ["ok"],
                "additionalProperties": False,
            },
            "Me": {
                "type": "object",
                "properties": {
                    "username": {"type": "string"},
                    "role": {"enum": sorted(ALL_ROLES)},
                },
                "required": ["username", "role"],
                "additionalProperties": False,
            },
            "Device": {
                "type": "object",
                "properties": {
                    "device_id": {"type": "string"},
                    "online": {"type": "boolean"},
                    "revoked": {"type": "boolean"},
                    "in_session": {"type": "boolean"},
                },
                "required": ["device_id", "online", "revoked", "in_session"],
                "additionalProperties": False,
            },
        },
    },
}


def api_routes(
    service: LoginService,
    *,
    banner: Callable[[], dict[str, str]],
    presence_stale_after: timedelta,
) -> list[Route]:
    """The engineer listener's routes, each guarded by :data:`ROUTE_ROLES`."""

    def guarded(method: str, path: str, handler: Handler) -> Route:
        route = (method, path)

        async def endpoint(request: Request) -> Response:
            allowed = ROUTE_ROLES.get(route, frozenset())
            try:
                principal = await service.authenticate(request)
            except auth.InvalidToken:
                return JSONResponse(_SESSION_UNAUTHORIZED_BODY, status_code=401)
            if principal.role not in allowed:
                service.forbidden(principal, route)
                return _error(403, "forbidden")
            return await handler(request, principal)

        return Route(path, endpoint, methods=[method])

    async def index(_request: Request) -> Response:
        return JSONResponse(banner())

    async def openapi(_request: Request) -> Response:
        return JSONResponse(OPENAPI)

    async def login(request: Request) -> Response:
        source = _source(request)
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
            },
            headers={"Set-Cookie": _session_cookie(result.token, result.max_age_s)},
        )

    async def logout(request: Request, principal: Principal) -> Response:
        await service.logout(principal, source=_source(request))
        return JSONResponse(
            {"ok": True}, headers={"Set-Cookie": _session_cookie("", 0)}
        )

    async def me(_request: Request, principal: Principal) -> Response:
        return JSONResponse({"username": principal.username, "role": principal.role})

    async def devices(_request: Request, _principal: Principal) -> Response:
        records = await service.list_devices(stale_after=presence_stale_after)
        return JSONResponse(
            [
                {
                    "device_id": record.device_id,
                    "online": record.online,
                    "revoked": record.revoked_at is not None,
                    # Remote sessions arrive with the session issue.
                    "in_session": False,
                }
                for record in records
            ]
        )

    public: dict[tuple[str, str], Callable[[Request], Awaitable[Response]]] = {
        ("GET", "/"): index,
        ("POST", "/api/v1/login"): login,
        ("GET", OPENAPI_PATH): openapi,
    }
    routes = [
        Route(path, endpoint, methods=[method])
        for (method, path), endpoint in public.items()
        if ROUTE_ROLES.get((method, path)) is PUBLIC
    ]
    routes += [
        guarded("POST", "/api/v1/logout", logout),
        guarded("GET", "/api/v1/me", me),
        guarded("GET", "/api/v1/devices", devices),
    ]
    return routes
