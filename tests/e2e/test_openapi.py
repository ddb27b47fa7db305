"""The engineer API's OpenAPI document: served, complete, and fuzzed by schemathesis."""

from __future__ import annotations

import dataclasses
import ssl
import sys
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import pyotp
import pytest
import trio

from relay.api_contract import (
    ALL_ROLES,
    CONSOLE_ASSETS_PATH,
    CONSOLE_PAGE_PATH,
    OPENAPI_PATH,
    PUBLIC,
    ROUTE_ROLES,
)
from relay.openapi import OPENAPI
from tests.e2e.conftest import LOOPBACK, PKI, RunningBroker, add_engineer

PASSWORD = "correct horse battery"  # noqa: S105 - test account
API_PATHS = {
    "/api/v1/login",
    "/api/v1/logout",
    "/api/v1/me",
    "/api/v1/devices",
    "/api/v1/enrollments",
    "/api/v1/sessions",
    "/api/v1/sessions/{session_id}",
    "/api/v1/audit/sessions",
    "/api/v1/audit/sessions/{session_id}",
    "/api/v1/audit/sessions/{session_id}/recordings/{name}",
    "/api/v1/info",
    OPENAPI_PATH,
    "/api/v1/devices/{device_id}/alarms",
    "/api/v1/devices/{device_id}/daily-stats",
    "/api/v1/devices/{device_id}/snapshots",
    "/api/v1/devices/{device_id}/data-requests",
    "/api/v1/devices/{device_id}/data-requests/{request_id}",
    "/api/v1/devices/{device_id}/sessions",
    "/api/v1/devices/{device_id}/exports/{dataset}",
}
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
#: Bounds of one schemathesis run: test cases per operation, and wall time
#: (the monitoring routes doubled the operations; a loaded CI machine runs
#: them at a third of the speed of an idle one).
MAX_EXAMPLES = 30
RUN_TIMEOUT_S = 180.0
# Runs the schemathesis CLI in this interpreter (the package has no __main__).
_SCHEMATHESIS = (
    "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())"
)


@pytest.fixture
def pki(pki: PKI) -> PKI:
    """The conftest PKI with a per-address rate limit high enough that fuzzed logins
    reach the body parser and the password check instead of stopping at 429."""
    engineer_auth = dataclasses.replace(
        pki.config.engineer_auth,
        unauthenticated_per_minute=60_000.0,
        unauthenticated_burst=10_000,
    )
    return dataclasses.replace(
        pki, config=dataclasses.replace(pki.config, engineer_auth=engineer_auth)
    )


@pytest.fixture
async def client(broker: RunningBroker, pki: PKI) -> AsyncIterator[httpx.AsyncClient]:
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    async with httpx.AsyncClient(
        base_url=f"https://{LOOPBACK}:{broker.ports.engineer}",
        verify=context,
        timeout=30.0,
    ) as api:
        yield api


def _operations() -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): operation
        for path, item in OPENAPI["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    }


def test_every_api_route_is_documented_and_vice_versa() -> None:
    """The document's operations are exactly the /api/v1 routes of ROUTE_ROLES;
    the only other routes are the console's page and files, which are no API."""
    api_routes = {route for route in ROUTE_ROLES if route[1].startswith("/api/v1/")}
    assert set(_operations()) == api_routes
    assert ROUTE_ROLES[("GET", OPENAPI_PATH)] is PUBLIC
    console = {("GET", CONSOLE_PAGE_PATH), ("GET", CONSOLE_ASSETS_PATH)}
    assert set(ROUTE_ROLES) - api_routes == console
    assert all(ROUTE_ROLES[route] is PUBLIC for route in console)


def test_document_states_the_roles_of_each_route() -> None:
    """x-roles, security and the 403 answer agree with ROUTE_ROLES."""
    for route, operation in _operations().items():
        roles = ROUTE_ROLES[route]
        responses = operation["responses"]
        if roles is PUBLIC:
            assert operation["x-roles"] == ["public"], route
            assert operation["security"] == [], route
        else:
            assert set(operation["x-roles"]) == roles, route
            assert operation["security"] == [{"bearer": []}, {"session_cookie": []}]
            assert "401" in responses, route
        can_refuse_a_role = roles is not PUBLIC and roles != ALL_ROLES
        # A POST or DELETE can also be refused as cross-site (Origin, CSRF header).
        can_refuse_cross_site = route[0] in ("POST", "DELETE")
        assert ("403" in responses) == (can_refuse_a_role or can_refuse_cross_site), (
            route
        )


def test_login_documents_each_refusal() -> None:
    """POST /api/v1/login lists every answer the handler can give."""
    responses = OPENAPI["paths"]["/api/v1/login"]["post"]["responses"]
    assert set(responses) == {
        "200",
        "400",
        "401",
        "403",
        "413",
        "415",
        "429",
        "503",
    }
    assert "Retry-After" in responses["429"]["headers"]
    assert "Set-Cookie" in responses["200"]["headers"]


@pytest.mark.slow
async def test_openapi_document_is_served(client: httpx.AsyncClient) -> None:
    """GET /api/v1/openapi.json answers the OpenAPI 3.1 document without a login."""
    response = await client.get(OPENAPI_PATH)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    document = response.json()
    assert document["openapi"] == "3.1.0"
    assert set(document["paths"]) == API_PATHS
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


async def _schemathesis(
    schema_url: str, ca_file: str, cwd: str, *extra: str
) -> tuple[int, str]:
    command: Sequence[str] = [
        sys.executable,
        "-c",
        _SCHEMATHESIS,
        "run",
        schema_url,
        "--checks",
        "not_a_server_error",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--tls-verify",
        ca_file,
        "--request-timeout",
        "10",
        "--generation-database",
        "none",
        "--no-color",
        *extra,
    ]
    with trio.fail_after(RUN_TIMEOUT_S):
        done = await trio.run_process(
            command, cwd=cwd, capture_stdout=True, capture_stderr=True, check=False
        )
    output = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    return done.returncode, output


@pytest.mark.slow
async def test_schemathesis_finds_no_server_errors(
    broker: RunningBroker, pki: PKI, client: httpx.AsyncClient, tmp_path: Any
) -> None:
    """Fuzzing every documented operation, logged out and logged in, answers no 5xx."""
    secret = add_engineer(pki, "alice", password=PASSWORD)
    with pki.store() as store:
        # So that fuzzed enrollments reach the body parser and the CA code
        # instead of stopping at the permission check.
        store.set_user_can_enroll("alice", True, at=datetime.now(UTC))
    pki.enroll("device-1")
    response = await client.post(
        "/api/v1/login",
        json={
            "username": "alice",
            "password": PASSWORD,
            "totp": pyotp.TOTP(secret).at(time.time()),
        },
    )
    assert response.status_code == 200, response.text
    bearer = f"Authorization: Bearer {response.json()['token']}"
    # The audit routes refuse engineers: an auditor fuzzes their parameters.
    auditor_secret = add_engineer(pki, "audrey", role="auditor", password=PASSWORD)
    response = await client.post(
        "/api/v1/login",
        json={
            "username": "audrey",
            "password": PASSWORD,
            "totp": pyotp.TOTP(auditor_secret).at(time.time()),
        },
    )
    assert response.status_code == 200, response.text
    auditor = f"Authorization: Bearer {response.json()['token']}"
    url = f"https://{LOOPBACK}:{broker.ports.engineer}{OPENAPI_PATH}"
    ca_file, cwd = str(pki.ca_file), str(tmp_path)
    runs = {
        "logged out": (),
        # Logout last, on its own: it revokes the token the other operations use.
        "logged in": ("-H", bearer, "--exclude-path", "/api/v1/logout"),
        "auditor": ("-H", auditor, "--include-path-regex", "^/api/v1/audit/"),
        "logout": ("-H", bearer, "--include-path", "/api/v1/logout"),
    }
    for name, extra in runs.items():
        returncode, output = await _schemathesis(url, ca_file, cwd, *extra)
        assert returncode == 0, f"schemathesis run {name!r}:\n{output}"
        assert "No issues found" in output or "passed" in output, output
        if name == "auditor":
            assert "/api/v1/audit/sessions/{session_id}/recordings/{name}" in output
    # The fuzzed enrollments got past the permission check to the body parser and
    # the CA code.
    reached = ("bad_request", "bad_csr")
    assert sum(broker.sample("relay_enrollments_total", outcome=o) for o in reached)
    assert broker.sample("relay_enrollments_total", outcome="forbidden") == 0
