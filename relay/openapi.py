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
    CSRF_HEADER,
    ENROLLMENTS_PATH,
    INFO_PATH,
    MAX_ENROLLMENT_BODY_BYTES,
    MAX_LOGIN_BODY_BYTES,
    MAX_SESSION_BODY_BYTES,
    OPENAPI_PATH,
    SESSION_COOKIE,
    SESSION_PATH,
    SESSIONS_PATH,
)

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
                    "401": _ERROR_ANSWERS["401"],
                    "403": _ERROR_ANSWERS["403"],
                    "404": _answer("No such session visible to you.", "Error"),
                    "409": _answer("The session has already ended.", "Error"),
                    "503": _ERROR_ANSWERS["503"],
                },
            },
        },
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
                    "reason": {"type": "string", "minLength": 1, "maxLength": 500},
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
                },
                "required": ["device_id", "online", "revoked", "in_session"],
                "additionalProperties": False,
            },
        },
    },
}
