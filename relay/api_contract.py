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
    "DEVICE_ALARMS_PATH",
    "DEVICE_DAILY_STATS_PATH",
    "DEVICE_DATA_REQUESTS_PATH",
    "DEVICE_DATA_REQUEST_PATH",
    "DEVICE_EXPORT_PATH",
    "DEVICE_SESSIONS_PATH",
    "DEVICE_SNAPSHOTS_PATH",
    "ENROLLMENTS_PATH",
    "EVENTS_PATH",
    "EXPORT_DATASETS",
    "EXPORT_FORMATS",
    "EXPORT_MAX_RECORDS",
    "FEED_ALARMS_DEFAULT",
    "FEED_ALARMS_MAX",
    "FEED_REQUEST_ROLES",
    "FEED_SESSIONS_DEFAULT",
    "FEED_SESSIONS_MAX",
    "FEED_STATS_DEFAULT",
    "FEED_STATS_MAX",
    "INFO_PATH",
    "MAX_DATA_REQUEST_BODY_BYTES",
    "MAX_DATA_REQUEST_REASON_CHARS",
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

ALL_ROLES: Final = frozenset({"engineer", "auditor", "admin", "customer"})
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

#: An instrument's monitoring data (relay._trio.feed_api, docs/monitoring.md).
#: Every role may ask; which instruments each user sees is decided per request
#: (DeviceVisibility), and an instrument the user may not see answers 404, like
#: an unknown one.
DEVICE_ALARMS_PATH: Final = "/api/v1/devices/{device_id}/alarms"
DEVICE_DAILY_STATS_PATH: Final = "/api/v1/devices/{device_id}/daily-stats"
DEVICE_SNAPSHOTS_PATH: Final = "/api/v1/devices/{device_id}/snapshots"
DEVICE_DATA_REQUESTS_PATH: Final = "/api/v1/devices/{device_id}/data-requests"
DEVICE_DATA_REQUEST_PATH: Final = (
    "/api/v1/devices/{device_id}/data-requests/{request_id}"
)
DEVICE_SESSIONS_PATH: Final = "/api/v1/devices/{device_id}/sessions"
DEVICE_EXPORT_PATH: Final = "/api/v1/devices/{device_id}/exports/{dataset}"
#: What an export holds, and in which forms.
EXPORT_DATASETS: Final = ("alarms", "daily-stats")
EXPORT_FORMATS: Final = ("csv", "json")
#: The most records one export holds; a range with more is refused (400), so an
#: export is never silently cut short.
EXPORT_MAX_RECORDS: Final = 5000
#: Listing sizes: the default when ``limit`` is not given, and the most.
FEED_ALARMS_DEFAULT: Final = 100
FEED_ALARMS_MAX: Final = 1000
FEED_STATS_DEFAULT: Final = 366
FEED_STATS_MAX: Final = 1000
FEED_SESSIONS_DEFAULT: Final = 20
FEED_SESSIONS_MAX: Final = 200
#: Largest body of POST .../data-requests, and the longest reason (the store
#: keeps 200 characters).
MAX_DATA_REQUEST_BODY_BYTES: Final = 2 * 1024
MAX_DATA_REQUEST_REASON_CHARS: Final = 200
#: Who may ask an instrument for its configuration or consumables: auditors
#: only read.
FEED_REQUEST_ROLES: Final = frozenset({"engineer", "admin", "customer"})

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
    # Every role; each user sees only the instruments it may (feed_api).
    ("GET", "/api/v1/devices"): ALL_ROLES,
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
    # An instrument's monitoring data; customers never reach the session routes
    # above (403), but see who held sessions on their own instruments here.
    ("GET", DEVICE_ALARMS_PATH): ALL_ROLES,
    ("GET", DEVICE_DAILY_STATS_PATH): ALL_ROLES,
    ("GET", DEVICE_SNAPSHOTS_PATH): ALL_ROLES,
    ("POST", DEVICE_DATA_REQUESTS_PATH): FEED_REQUEST_ROLES,
    ("GET", DEVICE_DATA_REQUEST_PATH): ALL_ROLES,
    ("GET", DEVICE_SESSIONS_PATH): ALL_ROLES,
    ("GET", DEVICE_EXPORT_PATH): ALL_ROLES,
}

#: The engineers' live event feed (WebSocket): the device list as it changes.
EVENTS_PATH: Final = "/api/v1/events"

#: Every WebSocket route of the engineer listener and the roles it allows; default
#: deny. Kept apart from ROUTE_ROLES: OpenAPI does not describe WebSockets, so
#: these are documented in docs/api.md instead.
WEBSOCKET_ROLES: Final[Mapping[str, frozenset[str]]] = {
    # Every role; each socket gets only the instruments its user may see.
    EVENTS_PATH: ALL_ROLES,
    # Only the session's own engineer, checked by the route's admission.
    SESSION_ATTACH_PATH: frozenset({"engineer", "admin"}),
}
