"""What the engineer listener's API promises: its routes, the roles each allows,
the session cookie and the size limits.

Plain constants, shared by the routes (:mod:`relay._trio.engineer_api`), the
OpenAPI document (:mod:`relay.openapi`) and the tests that hold the two together.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from relay.proto.session import EndReason

__all__ = [
    "ALL_ROLES",
    "AUDIT_END_REASONS",
    "AUDIT_LIST_DEFAULT",
    "AUDIT_LIST_MAX",
    "AUDIT_RECORDING_PATH",
    "AUDIT_ROLES",
    "AUDIT_SESSIONS_PATH",
    "AUDIT_SESSION_PATH",
    "CONSOLE_ASSETS_PATH",
    "CONSOLE_PAGE_PATH",
    "CSRF_HEADER",
    "ENROLLMENTS_PATH",
    "EVENTS_PATH",
    "INFO_PATH",
    "MAX_ENROLLMENT_BODY_BYTES",
    "MAX_LOGIN_BODY_BYTES",
    "MAX_SESSION_BODY_BYTES",
    "OPENAPI_PATH",
    "PUBLIC",
    "ROUTE_ROLES",
    "SESSIONS_PATH",
    "SESSION_ATTACH_PATH",
    "SESSION_COOKIE",
    "SESSION_PATH",
    "WEBSOCKET_ROLES",
]

SESSION_COOKIE: Final = "__Host-relay_session"
#: The header that carries the session's CSRF token on state-changing requests
#: authenticated by the cookie (a browser page); bearer clients need none.
CSRF_HEADER: Final = "X-Relay-CSRF"
MAX_LOGIN_BODY_BYTES: Final = 4 * 1024
#: Largest body of POST /api/v1/enrollments: a CSR at its 16 KiB cap (PKIConfig),
#: JSON-escaped, plus room for the envelope.
MAX_ENROLLMENT_BODY_BYTES: Final = 20 * 1024

ALL_ROLES: Final = frozenset({"engineer", "auditor", "admin"})
#: Marker in :data:`ROUTE_ROLES` for a route that needs no login.
PUBLIC: Final = frozenset({"*public*"})
#: Where the listener serves :data:`OPENAPI`.
OPENAPI_PATH: Final = "/api/v1/openapi.json"
#: The service name and version (what ``GET /`` answered before the console).
INFO_PATH: Final = "/api/v1/info"
#: The browser console's page, and its scripts, styles and vendored terminal
#: (relay/console/; only the files it holds, see relay.console.ConsoleFiles).
CONSOLE_PAGE_PATH: Final = "/"
CONSOLE_ASSETS_PATH: Final = "/console/{path:path}"
#: Where engineers with the enroll permission, and admins, have CSRs signed.
ENROLLMENTS_PATH: Final = "/api/v1/enrollments"
#: Remote sessions: request one, read or end one, attach to one (WebSocket).
SESSIONS_PATH: Final = "/api/v1/sessions"
SESSION_PATH: Final = "/api/v1/sessions/{session_id}"
SESSION_ATTACH_PATH: Final = "/api/v1/sessions/{session_id}/attach"
#: Largest body of POST /api/v1/sessions (a reason of 500 characters fits well).
MAX_SESSION_BODY_BYTES: Final = 4 * 1024
#: The audit trail of remote sessions: the list, one session with its timeline
#: and receipts, one of its recordings (relay._trio.audit_api).
AUDIT_SESSIONS_PATH: Final = "/api/v1/audit/sessions"
AUDIT_SESSION_PATH: Final = "/api/v1/audit/sessions/{session_id}"
AUDIT_RECORDING_PATH: Final = "/api/v1/audit/sessions/{session_id}/recordings/{name}"
#: The sessions a listing answers without ``limit``, and the most it may ask for
#: (the store's cap, relay.store MAX_LIST).
AUDIT_LIST_DEFAULT: Final = 100
AUDIT_LIST_MAX: Final = 1000
#: The end reasons the audit listing filters by: every EndReason
#: (``broker_crash`` among them: a session the last broker process left open,
#: closed at the next start, or one across nodes whose other node died).
AUDIT_END_REASONS: Final = frozenset(reason.value for reason in EndReason)
#: Who may read the audit trail.
AUDIT_ROLES: Final = frozenset({"auditor", "admin"})

#: Every route of the engineer listener and the roles it allows; default deny.
ROUTE_ROLES: Final[Mapping[tuple[str, str], frozenset[str]]] = {
    # The console's files hold no data: the page logs in with the API.
    ("GET", CONSOLE_PAGE_PATH): PUBLIC,
    ("GET", CONSOLE_ASSETS_PATH): PUBLIC,
    ("POST", "/api/v1/login"): PUBLIC,
    ("GET", INFO_PATH): PUBLIC,
    ("GET", OPENAPI_PATH): PUBLIC,
    ("POST", "/api/v1/logout"): ALL_ROLES,
    ("GET", "/api/v1/me"): ALL_ROLES,
    ("GET", "/api/v1/devices"): frozenset({"engineer", "admin"}),
    # Engineers need the enroll permission too, checked by the route itself.
    ("POST", ENROLLMENTS_PATH): frozenset({"engineer", "admin"}),
    # Engineers see and end their own sessions, admins every session.
    ("POST", SESSIONS_PATH): frozenset({"engineer", "admin"}),
    ("GET", SESSION_PATH): frozenset({"engineer", "admin"}),
    ("DELETE", SESSION_PATH): frozenset({"engineer", "admin"}),
    # Auditors and admins read the audit trail; engineers not even their own.
    ("GET", AUDIT_SESSIONS_PATH): AUDIT_ROLES,
    ("GET", AUDIT_SESSION_PATH): AUDIT_ROLES,
    ("GET", AUDIT_RECORDING_PATH): AUDIT_ROLES,
}

#: The engineers' live event feed (WebSocket): the device list as it changes.
EVENTS_PATH: Final = "/api/v1/events"

#: Every WebSocket route of the engineer listener and the roles it allows; default
#: deny. Kept apart from ROUTE_ROLES: OpenAPI does not describe WebSockets, so
#: these are documented in docs/api.md instead.
WEBSOCKET_ROLES: Final[Mapping[str, frozenset[str]]] = {
    EVENTS_PATH: frozenset({"engineer", "admin"}),
    # Only the session's own engineer, checked by the route's admission.
    SESSION_ATTACH_PATH: frozenset({"engineer", "admin"}),
}
