"""The OpenAPI 3.1 document of the engineer listener's ``/api/v1`` routes.

Hand-written, next to the routes it describes: a change to a route, its body, its
answers or :data:`relay.api_contract.ROUTE_ROLES` changes this document in the same
review. The tests check that it documents exactly the ``/api/v1`` routes of
``ROUTE_ROLES``, that 403 is listed exactly where a role can be refused, and run
schemathesis against the real listener.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from relay import __version__
from relay.api_contract import (
    ALL_ROLES,
    AUDIT_END_REASONS,
    AUDIT_LIST_DEFAULT,
    AUDIT_LIST_MAX,
    AUDIT_RECORDING_PATH,
    AUDIT_ROLES,
    AUDIT_SESSION_PATH,
    AUDIT_SESSIONS_PATH,
    CSRF_HEADER,
    DEVICE_ALARMS_PATH,
    DEVICE_DAILY_STATS_PATH,
    DEVICE_DATA_REQUEST_PATH,
    DEVICE_DATA_REQUESTS_PATH,
    DEVICE_EXPORT_PATH,
    DEVICE_SESSIONS_PATH,
    DEVICE_SNAPSHOTS_PATH,
    ENROLLMENTS_PATH,
    EXPORT_DATASETS,
    EXPORT_MAX_RECORDS,
    FEED_ALARMS_DEFAULT,
    FEED_ALARMS_MAX,
    FEED_REQUEST_ROLES,
    FEED_SESSIONS_DEFAULT,
    FEED_SESSIONS_MAX,
    FEED_STATS_DEFAULT,
    FEED_STATS_MAX,
    INFO_PATH,
    MAX_DATA_REQUEST_BODY_BYTES,
    MAX_DATA_REQUEST_REASON_CHARS,
    MAX_ENROLLMENT_BODY_BYTES,
    MAX_LOGIN_BODY_BYTES,
    MAX_SESSION_BODY_BYTES,
    OPENAPI_PATH,
    SESSION_COOKIE,
    SESSION_PATH,
    SESSIONS_PATH,
)
from relay.proto.feed import ALARM_STATES, REQUESTED_KINDS, SEVERITIES

__all__ = ["OPENAPI"]


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
    "403": _answer(
        "The session's role is not allowed on this route, or (a POST or DELETE "
        "with the session cookie) a cross-site request: an Origin that is not "
        f"the console's, or the `{CSRF_HEADER}` header missing or wrong.",
        "Error",
    ),
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


_ENROLLMENT_ANSWERS: Final[Mapping[str, dict[str, Any]]] = {
    "201": _answer(
        "Signed and recorded: the device certificate (give it to the device) and "
        "the CA certificate it verifies against. `warnings` lists what the "
        "request asked for that the fixed device profile did not grant.",
        "Enrollment",
    ),
    "400": _answer(
        "The body is not a JSON object with exactly the key `csr` holding a "
        "non-empty string, or the CA code refused the request: too large, "
        "malformed, bad signature (no proof of possession), weak key (only "
        "ECDSA P-256/P-384/P-521 and RSA of at least 2048 bits are accepted) or "
        "an invalid device id. `error` names the reason.",
        "Error",
    ),
    "401": _ERROR_ANSWERS["401"],
    "403": _answer(
        "The session's role may not enroll (auditors), the engineer does not "
        f"hold the enroll permission, or a cross-site request (see `{CSRF_HEADER}`).",
        "Error",
    ),
    "409": _answer(
        "The device id is revoked (revoked ids are never enrolled again), or, "
        "for an engineer, it is already enrolled (only an admin may give an "
        "enrolled instrument a new key).",
        "Error",
    ),
    "413": _answer(
        f"The body is larger than {MAX_ENROLLMENT_BODY_BYTES} bytes.", "Error"
    ),
    "415": _ERROR_ANSWERS["415"],
    "503": _answer(
        "This broker has no CA key (`enrollment is not available on this "
        "broker`), or the store is unavailable (with Retry-After).",
        "Error",
        headers=("Retry-After",),
    ),
}

_SESSION_SECURITY: Final[list[dict[str, list[str]]]] = [
    {"bearer": []},
    {"session_cookie": []},
]

_SESSION_ID_PARAMETER: Final[dict[str, Any]] = {
    "name": "session_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
}


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


_TIME_FILTER: Final = (
    "ISO 8601 with a timezone, e.g. `2026-05-04T13:02:00Z`; a time without one "
    "is refused."
)

_AUDIT_PATHS: Final[Mapping[str, dict[str, Any]]] = {
    AUDIT_SESSIONS_PATH: {
        "get": {
            "operationId": "listAuditSessions",
            "summary": "The remote sessions of the audit trail, newest first.",
            "description": (
                "Every session the broker recorded (requested, granted or not, "
                "live or ended), filtered; all filters are optional and combine. "
                "A filter given twice, or with a value of the wrong form, is "
                "refused with 400 naming the parameter."
            ),
            "x-roles": sorted(AUDIT_ROLES),
            "security": _SESSION_SECURITY,
            "parameters": [
                _query("device_id", "Only this instrument.", {"type": "string"}),
                _query("engineer", "Only this engineer's.", {"type": "string"}),
                _query(
                    "since",
                    f"Requested at or after this time. {_TIME_FILTER}",
                    {"type": "string", "format": "date-time"},
                ),
                _query(
                    "until",
                    f"Requested before this time (later than `since`). {_TIME_FILTER}",
                    {"type": "string", "format": "date-time"},
                ),
                _query(
                    "end_reason",
                    "Only sessions that ended for this reason.",
                    {"$ref": "#/components/schemas/EndReason"},
                ),
                _query(
                    "limit",
                    f"At most this many (default {AUDIT_LIST_DEFAULT}).",
                    {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": AUDIT_LIST_MAX,
                        "default": AUDIT_LIST_DEFAULT,
                    },
                ),
            ],
            "responses": {
                "200": _answer("The sessions.", "AuditSessionList"),
                "400": _answer(
                    "A filter has the wrong form or is given twice; `error` names it.",
                    "Error",
                ),
                "401": _ERROR_ANSWERS["401"],
                "403": _ERROR_ANSWERS["403"],
                "503": _ERROR_ANSWERS["503"],
            },
        }
    },
    AUDIT_SESSION_PATH: {
        "parameters": [_SESSION_ID_PARAMETER],
        "get": {
            "operationId": "getAuditSession",
            "summary": "One session with its audit timeline and receipts.",
            "description": (
                "The session's row, the audit log's records that name it (from "
                "its request on, parsed but not verified: `relay audit verify` "
                "verifies the chain) and the receipts the instrument signed. "
                "Each answer is itself audited (`audit.session_viewed`)."
            ),
            "x-roles": sorted(AUDIT_ROLES),
            "security": _SESSION_SECURITY,
            "responses": {
                "200": _answer("The session.", "AuditSessionDetail"),
                "401": _ERROR_ANSWERS["401"],
                "403": _ERROR_ANSWERS["403"],
                "404": _answer("No such session.", "Error"),
                "500": _answer("The session's audit files cannot be read.", "Error"),
                "503": _ERROR_ANSWERS["503"],
            },
        },
    },
    AUDIT_RECORDING_PATH: {
        "parameters": [
            _SESSION_ID_PARAMETER,
            {
                "name": "name",
                "in": "path",
                "required": True,
                "description": (
                    "A name from the session's `recordings`: `shell-N.cast` or "
                    "`forwards.json`."
                ),
                "schema": {"type": "string"},
            },
        ],
        "get": {
            "operationId": "getAuditRecording",
            "summary": "One recording of a session, as stored.",
            "description": (
                "The file byte for byte: its SHA-256 is the one in the session's "
                "`recordings` and in its `session.recording` audit record. Each "
                "answer is itself audited (`audit.recording_read`)."
            ),
            "x-roles": sorted(AUDIT_ROLES),
            "security": _SESSION_SECURITY,
            "parameters": [
                _query(
                    "download",
                    "`1`: answer with `Content-Disposition: attachment`.",
                    {"enum": ["0", "1"]},
                )
            ],
            "responses": {
                "200": {
                    "description": (
                        "The recording: a shell as asciicast v2, the port "
                        "forwards as a JSON list (metadata and digests, never "
                        "the bytes forwarded)."
                    ),
                    "headers": {
                        "Content-Disposition": {
                            "description": (
                                'With `download=1`: `attachment; filename="NAME"`.'
                            ),
                            "schema": {"type": "string"},
                        }
                    },
                    "content": {
                        "application/x-asciicast": {
                            "schema": {
                                "type": "string",
                                "description": (
                                    "asciicast v2: a header line, then one JSON "
                                    "event per line."
                                ),
                            }
                        },
                        "application/json": {
                            "schema": {
                                "type": "array",
                                "items": {"$ref": "#/components/schemas/Forward"},
                            }
                        },
                    },
                },
                "400": _answer("`download` is not 0 or 1.", "Error"),
                "401": _ERROR_ANSWERS["401"],
                "403": _ERROR_ANSWERS["403"],
                "404": _answer(
                    "No such session, or the name is not one of its recordings.",
                    "Error",
                ),
                "416": {"description": "A Range that the file cannot satisfy."},
                "500": _answer("The recording cannot be read.", "Error"),
                "503": _ERROR_ANSWERS["503"],
            },
        },
    },
}

_NULLABLE_TIME: Final = {"type": ["string", "null"], "format": "date-time"}
_DEVICE_ID_PARAMETER: Final[dict[str, Any]] = {
    "name": "device_id",
    "in": "path",
    "required": True,
    "description": "The instrument's id.",
    "schema": {"type": "string"},
}
_UNKNOWN_DEVICE: Final = (
    "No such instrument, or one this user may not see (the same answer, so "
    "that it tells nothing about other organisations' instruments)."
)


def _feed_range(default: int, maximum: int, what: str) -> list[dict[str, Any]]:
    return [
        _query(
            "since",
            f"Only {what} with the instrument's time at or after this. {_TIME_FILTER}",
            {"type": "string", "format": "date-time"},
        ),
        _query(
            "until",
            f"Only {what} with the instrument's time before this (later than "
            f"`since`). {_TIME_FILTER}",
            {"type": "string", "format": "date-time"},
        ),
        _query(
            "limit",
            f"At most this many, the newest (default {default}).",
            {"type": "integer", "minimum": 1, "maximum": maximum, "default": default},
        ),
    ]


def _feed_get(
    operation_id: str,
    summary: str,
    description: str,
    answer: dict[str, Any],
    *,
    parameters: list[dict[str, Any]] | None = None,
    bad_query: str = "A parameter has the wrong form, is given twice or is "
    "unknown; `error` names it.",
) -> dict[str, Any]:
    return {
        "get": {
            "operationId": operation_id,
            "summary": summary,
            "description": description,
            "x-roles": sorted(ALL_ROLES),
            "security": _SESSION_SECURITY,
            "parameters": parameters or [],
            "responses": {
                "200": answer,
                "400": _answer(bad_query, "Error"),
                "401": _ERROR_ANSWERS["401"],
                "404": _answer(_UNKNOWN_DEVICE, "Error"),
                "503": _ERROR_ANSWERS["503"],
            },
        }
    }


_FEED_VISIBILITY: Final = (
    "Admins and auditors see every instrument, customers those labelled "
    "`customer=<their organisation>`, engineers those the access policy lets "
    'them reach (docs/monitoring.md, "Who sees what").'
)

_FEED_PATHS: Final[Mapping[str, dict[str, Any]]] = {
    DEVICE_ALARMS_PATH: {
        "parameters": [_DEVICE_ID_PARAMETER],
        **_feed_get(
            "listDeviceAlarms",
            "The instrument's alarms, newest first.",
            "Alarms as the instrument raised and cleared them, by its own time. "
            + _FEED_VISIBILITY,
            _answer("The alarms.", "AlarmList"),
            parameters=_feed_range(FEED_ALARMS_DEFAULT, FEED_ALARMS_MAX, "alarms"),
        ),
    },
    DEVICE_DAILY_STATS_PATH: {
        "parameters": [_DEVICE_ID_PARAMETER],
        **_feed_get(
            "listDeviceDailyStats",
            "The instrument's daily statistics, oldest first.",
            "One record per day, each with named values and their units. "
            + _FEED_VISIBILITY,
            _answer("The daily statistics.", "DailyStatsList"),
            parameters=_feed_range(FEED_STATS_DEFAULT, FEED_STATS_MAX, "days"),
        ),
    },
    DEVICE_SNAPSHOTS_PATH: {
        "parameters": [_DEVICE_ID_PARAMETER],
        **_feed_get(
            "getDeviceSnapshots",
            "The last configuration and consumables, and the newest data requests.",
            "Configuration and consumables are sent only when a user asks "
            "(POST data-requests); each is the last record that arrived, or "
            "null. " + _FEED_VISIBILITY,
            _answer("The snapshots.", "Snapshots"),
            bad_query="This route takes no query parameters.",
        ),
    },
    DEVICE_DATA_REQUESTS_PATH: {
        "parameters": [_DEVICE_ID_PARAMETER],
        "post": {
            "operationId": "requestDeviceData",
            "summary": "Ask the instrument for its configuration or consumables now.",
            "description": (
                "The request is recorded and audited (`feed.data_requested`) "
                "and sent to the instrument, whose screen names the user. While "
                "one of the kind is pending for the instrument, the pending one "
                "is answered instead of a new one. Poll it with GET "
                "data-requests/{request_id}. " + _FEED_VISIBILITY
            ),
            "x-roles": sorted(FEED_REQUEST_ROLES),
            "security": _SESSION_SECURITY,
            "requestBody": {
                "required": True,
                "description": f"At most {MAX_DATA_REQUEST_BODY_BYTES} bytes.",
                "content": _json_content(
                    {"$ref": "#/components/schemas/DataRequestBody"}
                ),
            },
            "responses": {
                "202": _answer("Asked; the request, pending.", "DataRequest"),
                "400": _answer(
                    "The body is not an object of `kind` (configuration or "
                    "consumables) and an optional `reason`, or the reason is too "
                    "long or holds control characters.",
                    "Error",
                ),
                "401": _ERROR_ANSWERS["401"],
                "403": _answer(
                    "The session's role may not ask (auditors only read), or a "
                    f"cross-site request (see `{CSRF_HEADER}`).",
                    "Error",
                ),
                "404": _answer(_UNKNOWN_DEVICE, "Error"),
                "409": _answer(
                    "The instrument is not connected, or its agent is too old to "
                    "answer data requests.",
                    "Error",
                ),
                "413": _answer(
                    f"The body is larger than {MAX_DATA_REQUEST_BODY_BYTES} bytes.",
                    "Error",
                ),
                "415": _ERROR_ANSWERS["415"],
                "503": _answer(
                    "The request cannot be sent now (the store, or the "
                    "instrument's broker node, did not answer; or this broker "
                    "takes no data requests); retry after Retry-After seconds.",
                    "Error",
                    headers=("Retry-After",),
                ),
            },
        },
    },
    DEVICE_DATA_REQUEST_PATH: {
        "parameters": [
            _DEVICE_ID_PARAMETER,
            {
                "name": "request_id",
                "in": "path",
                "required": True,
                "schema": {"type": "string"},
            },
        ],
        **_feed_get(
            "getDeviceDataRequest",
            "One data request, for polling until it is answered, refused or lapsed.",
            "With `record`, the record that answered it, while it is the last "
            "of its kind. " + _FEED_VISIBILITY,
            _answer("The request.", "DataRequestWithRecord"),
            bad_query="This route takes no query parameters.",
        ),
    },
    DEVICE_SESSIONS_PATH: {
        "parameters": [_DEVICE_ID_PARAMETER],
        **_feed_get(
            "listDeviceSessions",
            "The instrument's remote sessions, newest first.",
            "Who asked, when, why, what the person at the instrument granted "
            "and how the session ended; customers see this for their own "
            "instruments. Addresses, certificate fingerprints, byte counts and "
            "recordings are in the auditors' routes. " + _FEED_VISIBILITY,
            _answer("The sessions.", "DeviceSessionList"),
            parameters=_feed_range(
                FEED_SESSIONS_DEFAULT, FEED_SESSIONS_MAX, "sessions (by request time)"
            ),
        ),
    },
    DEVICE_EXPORT_PATH: {
        "parameters": [
            _DEVICE_ID_PARAMETER,
            {
                "name": "dataset",
                "in": "path",
                "required": True,
                "description": "What to export.",
                "schema": {"enum": list(EXPORT_DATASETS)},
            },
        ],
        "get": {
            "operationId": "exportDeviceData",
            "summary": "Alarms or daily statistics over a range, as a CSV or JSON file.",
            "description": (
                "For traceability. CSV: a header, then one row per alarm or per "
                "measurement (RFC 4180 quoting, CRLF); a cell of the "
                "instrument's text that starts with `=`, `+`, `-` or `@` gets a "
                "leading `'` so that a spreadsheet does not run it. JSON: the "
                f"records. At most {EXPORT_MAX_RECORDS} records: a range with "
                "more is refused, never cut short. Each export is audited "
                "(`feed.exported`). " + _FEED_VISIBILITY
            ),
            "x-roles": sorted(ALL_ROLES),
            "security": _SESSION_SECURITY,
            "parameters": [
                *_feed_range(EXPORT_MAX_RECORDS, EXPORT_MAX_RECORDS, "records")[:2],
                _query(
                    "format", "`csv` (default) or `json`.", {"enum": ["csv", "json"]}
                ),
            ],
            "responses": {
                "200": {
                    "description": "The file, as an attachment.",
                    "headers": {
                        "Content-Disposition": {
                            "description": (
                                'attachment; filename="DEVICE-DATASET-TIME.FORMAT"'
                            ),
                            "schema": {"type": "string"},
                        }
                    },
                    "content": {
                        "text/csv": {"schema": {"type": "string"}},
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/Export"}
                        },
                    },
                },
                "400": _answer(
                    "A parameter has the wrong form, is given twice or is "
                    "unknown, or the range holds too many records; `error` says "
                    "which.",
                    "Error",
                ),
                "401": _ERROR_ANSWERS["401"],
                "404": _answer(
                    _UNKNOWN_DEVICE + " Or a data set other than alarms and "
                    "daily-stats.",
                    "Error",
                ),
                "503": _ERROR_ANSWERS["503"],
            },
        },
    },
}

_RECORD_META: Final[dict[str, Any]] = {
    "record_id": {"type": "string"},
    "received_at": {"type": "string", "format": "date-time"},
    "request_id": {"type": ["string", "null"]},
}
_DEVICE_TIME: Final = {
    "type": "string",
    "format": "date-time",
    "description": "The instrument's own time (RFC 3339 with its offset).",
}


def _record_schema(properties: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "properties": {**properties, **_RECORD_META},
        "required": sorted({*properties, *_RECORD_META}),
        "additionalProperties": False,
    }


def _list_schema(key: str, ref: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "device_id": {"type": "string"},
            key: {"type": "array", "items": {"$ref": f"#/components/schemas/{ref}"}},
        },
        "required": ["device_id", key],
        "additionalProperties": False,
    }


_DATA_REQUEST_PROPERTIES: Final[dict[str, Any]] = {
    "request_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
    "device_id": {"type": "string"},
    "kind": {"enum": list(REQUESTED_KINDS)},
    "requested_by": {"type": "string"},
    "reason": {"type": "string"},
    "requested_at": {"type": "string", "format": "date-time"},
    "status": {"enum": ["pending", "answered", "refused", "lapsed"]},
    "finished_at": {"type": ["string", "null"], "format": "date-time"},
    "refusal": {"type": ["string", "null"]},
    "record_id": {"type": ["string", "null"]},
}

_FEED_SCHEMAS: Final[Mapping[str, dict[str, Any]]] = {
    "Alarm": _record_schema(
        {
            "code": {"type": "string"},
            "severity": {"enum": list(SEVERITIES)},
            "text": {"type": "string"},
            "device_time": _DEVICE_TIME,
            "state": {"enum": list(ALARM_STATES)},
        },
        "An alarm as the instrument raised or cleared it.",
    ),
    "AlarmList": _list_schema("alarms", "Alarm"),
    "DailyStats": _record_schema(
        {
            "day": {"type": "string", "format": "date"},
            "device_time": _DEVICE_TIME,
            "values": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "value": {"type": "number"},
                        "unit": {"type": "string"},
                    },
                    "required": ["name", "value", "unit"],
                    "additionalProperties": False,
                },
            },
        },
        "The statistics of one day.",
    ),
    "DailyStatsList": _list_schema("daily_stats", "DailyStats"),
    "Configuration": _record_schema(
        {
            "device_time": _DEVICE_TIME,
            "parameters": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "value": {"type": ["string", "number", "boolean"]},
                        "unit": {"type": "string"},
                    },
                    "required": ["name", "value", "unit"],
                    "additionalProperties": False,
                },
            },
        },
        "The instrument's configuration when it was asked.",
    ),
    "Consumables": _record_schema(
        {
            "device_time": _DEVICE_TIME,
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "part": {"type": "string"},
                        "remaining_percent": {"type": "number"},
                        "installed_on": {"type": "string", "format": "date"},
                        "serial": {"type": "string"},
                    },
                    "required": [
                        "name",
                        "part",
                        "remaining_percent",
                        "installed_on",
                        "serial",
                    ],
                    "additionalProperties": False,
                },
            },
        },
        "The consumables' state when the instrument was asked.",
    ),
    "DataRequestBody": {
        "type": "object",
        "properties": {
            "kind": {"enum": list(REQUESTED_KINDS)},
            "reason": {
                "type": "string",
                "maxLength": MAX_DATA_REQUEST_REASON_CHARS,
                "description": "Why; shown on the instrument's screen. Optional.",
            },
        },
        "required": ["kind"],
        "additionalProperties": False,
    },
    "DataRequest": {
        "type": "object",
        "properties": _DATA_REQUEST_PROPERTIES,
        "required": sorted(_DATA_REQUEST_PROPERTIES),
        "additionalProperties": False,
    },
    "DataRequestWithRecord": {
        "type": "object",
        "properties": {
            **_DATA_REQUEST_PROPERTIES,
            "record": {
                "oneOf": [
                    {"type": "null"},
                    {"$ref": "#/components/schemas/Configuration"},
                    {"$ref": "#/components/schemas/Consumables"},
                ]
            },
        },
        "required": sorted({*_DATA_REQUEST_PROPERTIES, "record"}),
        "additionalProperties": False,
    },
    "Snapshots": {
        "type": "object",
        "properties": {
            "device_id": {"type": "string"},
            "configuration": {
                "oneOf": [
                    {"type": "null"},
                    {"$ref": "#/components/schemas/Configuration"},
                ]
            },
            "consumables": {
                "oneOf": [
                    {"type": "null"},
                    {"$ref": "#/components/schemas/Consumables"},
                ]
            },
            "data_requests": {
                "type": "array",
                "items": {"$ref": "#/components/schemas/DataRequest"},
            },
        },
        "required": ["device_id", "configuration", "consumables", "data_requests"],
        "additionalProperties": False,
    },
    "DeviceSession": {
        "type": "object",
        "properties": {
            "session_id": {"type": "string"},
            "engineer": {"type": "string"},
            "reason": {"type": "string"},
            "channels": {"type": "array", "items": {"type": "string"}},
            "granted_channels": {
                "type": ["array", "null"],
                "items": {"type": "string"},
            },
            "requested_at": {"type": "string", "format": "date-time"},
            "granted_at": _NULLABLE_TIME,
            "decided_by": {"type": ["string", "null"]},
            "ended_at": _NULLABLE_TIME,
            "end_reason": {"type": ["string", "null"]},
            "duration_s": {"type": ["number", "null"]},
        },
        "required": [
            "session_id",
            "engineer",
            "reason",
            "channels",
            "granted_channels",
            "requested_at",
            "granted_at",
            "decided_by",
            "ended_at",
            "end_reason",
            "duration_s",
        ],
        "additionalProperties": False,
    },
    "DeviceSessionList": _list_schema("sessions", "DeviceSession"),
    "Export": {
        "type": "object",
        "properties": {
            "device_id": {"type": "string"},
            "data_set": {"enum": list(EXPORT_DATASETS)},
            "since": _NULLABLE_TIME,
            "until": _NULLABLE_TIME,
            "records": {
                "type": "array",
                "items": {
                    "oneOf": [
                        {"$ref": "#/components/schemas/Alarm"},
                        {"$ref": "#/components/schemas/DailyStats"},
                    ]
                },
            },
        },
        "required": ["device_id", "data_set", "since", "until", "records"],
        "additionalProperties": False,
    },
}

_SHA256: Final = {"type": "string", "pattern": "^[0-9a-f]{64}$"}

_AUDIT_SCHEMAS: Final[Mapping[str, dict[str, Any]]] = {
    "EndReason": {
        "enum": sorted(AUDIT_END_REASONS),
        "description": (
            "Why a session ended; `broker_crash`: the broker process stopped "
            "without ending it and the next start closed it, or, for a session "
            "across nodes, the other node stopped answering."
        ),
    },
    "Recording": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "kind": {"enum": ["shell", "forwards"]},
            "size_bytes": {"type": "integer", "minimum": 0},
            "sha256": _SHA256,
        },
        "required": ["name", "kind", "size_bytes", "sha256"],
    },
    "AuditSession": {
        "type": "object",
        "description": "A remote session as the audit trail keeps it.",
        "properties": {
            "session_id": {"type": "string"},
            "device_id": {"type": "string"},
            "engineer": {"type": "string"},
            "reason": {"type": "string"},
            "channels": {"type": "array", "items": {"type": "string"}},
            "source": {
                "type": "string",
                "description": "The engineer's address.",
            },
            "device_fingerprint": {
                "type": "string",
                "description": "SHA-256 of the device certificate, hex.",
            },
            "requested_at": {"type": "string", "format": "date-time"},
            "granted_at": _NULLABLE_TIME,
            "decided_by": {
                "type": ["string", "null"],
                "description": "Who granted it at the instrument.",
            },
            "granted_channels": {
                "type": ["array", "null"],
                "items": {"type": "string"},
            },
            "max_seconds": {"type": ["integer", "null"]},
            "ended_at": _NULLABLE_TIME,
            "end_reason": {
                "anyOf": [{"$ref": "#/components/schemas/EndReason"}, {"type": "null"}]
            },
            "duration_s": {
                "type": ["number", "null"],
                "description": "From the grant to the end.",
            },
            "bytes_to_device": {"type": "integer", "minimum": 0},
            "bytes_from_device": {"type": "integer", "minimum": 0},
            "recordings": {
                "type": "array",
                "items": {"$ref": "#/components/schemas/Recording"},
            },
        },
        "required": [
            "session_id",
            "device_id",
            "engineer",
            "reason",
            "channels",
            "source",
            "device_fingerprint",
            "requested_at",
            "granted_at",
            "decided_by",
            "granted_channels",
            "max_seconds",
            "ended_at",
            "end_reason",
            "duration_s",
            "bytes_to_device",
            "bytes_from_device",
            "recordings",
        ],
    },
    "AuditSessionList": {
        "type": "object",
        "properties": {
            "sessions": {
                "type": "array",
                "items": {"$ref": "#/components/schemas/AuditSession"},
            }
        },
        "required": ["sessions"],
        "additionalProperties": False,
    },
    "AuditRecord": {
        "type": "object",
        "description": (
            "One record of the audit log's chain, as written (its other fields "
            "depend on the event)."
        ),
        "properties": {
            "seq": {"type": "integer", "minimum": 1},
            "ts": {"type": "string"},
            "event": {"type": "string"},
        },
        "required": ["seq", "ts", "event"],
    },
    "Receipt": {
        "type": "object",
        "description": (
            "A receipt the instrument signed: the signed bytes and signature "
            "(base64url), verifiable with the session's device certificate, "
            "and what the receipt says."
        ),
        "properties": {
            "kind": {"enum": ["grant", "end"]},
            "receipt": {"type": "string"},
            "signature": {"type": "string"},
            "fields": {"type": "object"},
        },
        "required": ["kind", "receipt", "signature", "fields"],
    },
    "AuditSessionDetail": {
        "allOf": [{"$ref": "#/components/schemas/AuditSession"}],
        "type": "object",
        "properties": {
            "timeline": {
                "type": "array",
                "items": {"$ref": "#/components/schemas/AuditRecord"},
            },
            "receipts": {
                "type": "object",
                "properties": {
                    "grant": {
                        "anyOf": [
                            {"$ref": "#/components/schemas/Receipt"},
                            {"type": "null"},
                        ]
                    },
                    "end": {
                        "anyOf": [
                            {"$ref": "#/components/schemas/Receipt"},
                            {"type": "null"},
                        ]
                    },
                },
                "required": ["grant", "end"],
                "additionalProperties": False,
            },
        },
        "required": ["timeline", "receipts"],
    },
    "DirectionTotals": {
        "type": "object",
        "properties": {
            "bytes": {"type": "integer", "minimum": 0},
            "sha256": _SHA256,
        },
        "required": ["bytes", "sha256"],
    },
    "Forward": {
        "type": "object",
        "description": "One port-forward stream of `forwards.json`.",
        "properties": {
            "stream_id": {"type": "integer"},
            "channel": {"type": "string"},
            "port": {"type": "integer"},
            "opened_s": {"type": "number"},
            "outcome": {"type": ["string", "null"]},
            "closed_s": {"type": ["number", "null"]},
            "to_device": {"$ref": "#/components/schemas/DirectionTotals"},
            "from_device": {"$ref": "#/components/schemas/DirectionTotals"},
        },
        "required": [
            "stream_id",
            "channel",
            "port",
            "opened_s",
            "outcome",
            "closed_s",
            "to_device",
            "from_device",
        ],
    },
}

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
                    "403": _answer(
                        "The request came with an Origin that is not the "
                        "console's (another site's page may not log the browser "
                        "in).",
                        "Error",
                    ),
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
                    **_errors("401", "403", "503"),
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
                "summary": "The enrolled devices this user may see, with presence.",
                "description": _FEED_VISIBILITY,
                "x-roles": sorted(ALL_ROLES),
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
                    **_errors("401", "503"),
                },
            }
        },
        ENROLLMENTS_PATH: {
            "post": {
                "operationId": "enrollDevice",
                "summary": "Sign a device's certificate request (enrollment).",
                "description": (
                    "Datasheet Annex 1, step 4: the device made its key and a "
                    "CSR with its id (`relay agent enroll`); a service tool sends "
                    "the CSR here and returns the certificate to the device. The "
                    "profile and lifetime are those of `relay ca sign`: only the "
                    "public key and the device id are taken from the request. "
                    "Admins may always enroll; engineers only with the enroll "
                    "permission (`relay user set NAME --can-enroll yes`), checked "
                    "on every request."
                ),
                "x-roles": ["admin", "engineer"],
                "security": _SESSION_SECURITY,
                "requestBody": {
                    "required": True,
                    "description": f"At most {MAX_ENROLLMENT_BODY_BYTES} bytes.",
                    "content": _json_content(
                        {"$ref": "#/components/schemas/EnrollmentRequest"}
                    ),
                },
                "responses": dict(_ENROLLMENT_ANSWERS),
            }
        },
        SESSIONS_PATH: {
            "post": {
                "operationId": "requestSession",
                "summary": "Ask for a remote session on a device.",
                "description": (
                    "Policy checks the channels, then the offer goes to the "
                    "device's control channel; the person at the device grants or "
                    "denies. Attach to the session with the WebSocket "
                    "`/api/v1/sessions/{session_id}/attach`."
                ),
                "x-roles": ["admin", "engineer"],
                "security": _SESSION_SECURITY,
                "requestBody": {
                    "required": True,
                    "description": f"At most {MAX_SESSION_BODY_BYTES} bytes.",
                    "content": _json_content(
                        {"$ref": "#/components/schemas/SessionRequest"}
                    ),
                },
                "responses": {
                    "201": _answer("The offer is on its way.", "SessionCreated"),
                    "400": _answer(
                        "The body is not an object of exactly device_id, reason "
                        "and channels, or one of them has the wrong form.",
                        "Error",
                    ),
                    "401": _ERROR_ANSWERS["401"],
                    "403": _answer(
                        "The role may not request sessions, a channel is not "
                        "allowed by the policy, or a cross-site request (see "
                        f"`{CSRF_HEADER}`).",
                        "Error",
                    ),
                    "404": _answer(
                        "The device is not connected (unknown or offline).", "Error"
                    ),
                    "409": _answer(
                        "`busy`: the device has a pending or active session.",
                        "Error",
                    ),
                    "413": _answer(
                        f"The body is larger than {MAX_SESSION_BODY_BYTES} bytes.",
                        "Error",
                    ),
                    "415": _ERROR_ANSWERS["415"],
                    "503": _ERROR_ANSWERS["503"],
                },
            }
        },
        SESSION_PATH: {
            "parameters": [
                {
                    "name": "session_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"},
                }
            ],
            "get": {
                "operationId": "getSession",
                "summary": "A session's state (own sessions; admins see all).",
                "x-roles": ["admin", "engineer"],
                "security": _SESSION_SECURITY,
                "responses": {
                    "200": _answer("The session.", "Session"),
                    "401": _ERROR_ANSWERS["401"],
                    "403": _ERROR_ANSWERS["403"],
                    "404": _answer("No such session visible to you.", "Error"),
                    "503": _ERROR_ANSWERS["503"],
                },
            },
            "delete": {
                "operationId": "endSession",
                "summary": "End a session (its engineer, or an admin).",
                "description": (
                    "Before the grant the end reason is `cancelled`; after it "
                    "`engineer` (the session's own engineer) or `admin`."
                ),
                "x-roles": ["admin", "engineer"],
                "security": _SESSION_SECURITY,
                "responses": {
                    "200": _answer("Ended; the session as it is now.", "Session"),
                    "202": _answer(
                        "Several nodes: another node held the session and has "
                        "ended it (reason `admin`; admins only).",
                        "SessionEndedOnNode",
                    ),
                    "401": _ERROR_ANSWERS["401"],
                    "403": _ERROR_ANSWERS["403"],
                    "404": _answer("No such session visible to you.", "Error"),
                    "409": _answer("The session has already ended.", "Error"),
                    "503": _ERROR_ANSWERS["503"],
                },
            },
        },
        **_AUDIT_PATHS,
        **_FEED_PATHS,
        INFO_PATH: {
            "get": {
                "operationId": "info",
                "summary": "The service name and version.",
                "description": (
                    "For monitoring and for clients that check which broker "
                    "they reach. The browser console is served at `/`."
                ),
                "x-roles": ["public"],
                "security": [],
                "responses": {"200": _answer("The service.", "Info")},
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
                    "csrf_token": {"$ref": "#/components/schemas/CsrfToken"},
                },
                "required": ["token", "expires_at", "csrf_token"],
                "additionalProperties": False,
            },
            "CsrfToken": {
                "type": "string",
                "pattern": "^[A-Za-z0-9_-]{43}$",
                "description": (
                    f"Send it back in the `{CSRF_HEADER}` header on every POST "
                    "and DELETE authenticated by the session cookie (a browser "
                    "page); without it, or with another value, the request is "
                    "refused with 403. Bearer clients need no header."
                ),
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
                    "csrf_token": {"$ref": "#/components/schemas/CsrfToken"},
                },
                "required": ["username", "role", "csrf_token"],
                "additionalProperties": False,
            },
            "EnrollmentRequest": {
                "type": "object",
                "properties": {
                    "csr": {
                        "type": "string",
                        "minLength": 1,
                        "description": (
                            "The PEM certificate signing request, as `relay agent "
                            "enroll` writes it (`device.csr`)."
                        ),
                    },
                },
                "required": ["csr"],
                "additionalProperties": False,
            },
            "Enrollment": {
                "type": "object",
                "properties": {
                    "device_id": {"type": "string"},
                    "serial": {
                        "type": "string",
                        "description": "Serial number, lowercase hex.",
                    },
                    "fingerprint_sha256": {
                        "type": "string",
                        "pattern": "^[0-9a-f]{64}$",
                    },
                    "not_after": {"type": "string", "format": "date-time"},
                    "certificate": {
                        "type": "string",
                        "description": "The device certificate, PEM.",
                    },
                    "ca_certificate": {
                        "type": "string",
                        "description": "The device CA certificate, PEM.",
                    },
                    "warnings": {"type": "array", "items": {"type": "string"}},
                },
                "required": [
                    "device_id",
                    "serial",
                    "fingerprint_sha256",
                    "not_after",
                    "certificate",
                    "ca_certificate",
                    "warnings",
                ],
                "additionalProperties": False,
            },
            "SessionRequest": {
                "type": "object",
                "properties": {
                    "device_id": {"type": "string"},
                    "reason": {
                        "type": "string",
                        "maxLength": 500,
                        "description": "Why; whether it may be empty, and "
                        "its form, are the access policy's to say.",
                    },
                    "channels": {
                        "type": "array",
                        "items": {
                            "type": "string",
                            "description": "`shell` or `tcp:PORT`.",
                        },
                        "minItems": 1,
                        "maxItems": 8,
                    },
                },
                "required": ["device_id", "reason", "channels"],
                "additionalProperties": False,
            },
            "SessionCreated": {
                "type": "object",
                "properties": {
                    "session_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                    "state": {"type": "string"},
                },
                "required": ["session_id", "state"],
                "additionalProperties": False,
            },
            "SessionEndedOnNode": {
                "type": "object",
                "properties": {
                    "session_id": {"type": "string"},
                    "state": {"const": "ended"},
                    "node": {"type": "string"},
                },
                "required": ["session_id", "state", "node"],
                "additionalProperties": False,
            },
            "Session": {
                "type": "object",
                "properties": {
                    "session_id": {"type": "string"},
                    "device_id": {"type": "string"},
                    "engineer": {"type": "string"},
                    "state": {
                        "enum": [
                            "requested",
                            "offered",
                            "granted",
                            "active",
                            "ended",
                            "denied",
                            "expired",
                        ]
                    },
                    "grant_deadline": {
                        "type": "string",
                        "format": "date-time",
                        "description": (
                            "When an unanswered offer counts as denied "
                            "(`grant_timeout`)."
                        ),
                    },
                    "granted_at": {"type": ["string", "null"], "format": "date-time"},
                    "ends_at": {"type": ["string", "null"], "format": "date-time"},
                    "end_reason": {"type": ["string", "null"]},
                },
                "required": [
                    "session_id",
                    "device_id",
                    "engineer",
                    "state",
                    "grant_deadline",
                    "granted_at",
                    "ends_at",
                    "end_reason",
                ],
                "additionalProperties": False,
            },
            **_AUDIT_SCHEMAS,
            **_FEED_SCHEMAS,
            "Info": {
                "type": "object",
                "properties": {
                    "service": {"const": "remote-care-relay"},
                    "version": {"type": "string"},
                },
                "required": ["service", "version"],
                "additionalProperties": False,
            },
            "Device": {
                "type": "object",
                "properties": {
                    "device_id": {"type": "string"},
                    "online": {"type": "boolean"},
                    "revoked": {"type": "boolean"},
                    "in_session": {
                        "type": "boolean",
                        "description": "It has a pending or active remote session.",
                    },
                    "labels": {
                        "type": "object",
                        "additionalProperties": {"type": "string"},
                        "description": "Its labels (customer, site, model, "
                        "region ...), which access policies match on; set "
                        "with `relay device label`.",
                    },
                },
                "required": ["device_id", "online", "revoked", "in_session", "labels"],
                "additionalProperties": False,
            },
        },
    },
}
