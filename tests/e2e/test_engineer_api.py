"""Engineer login and the API against a real broker on loopback TLS."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pyotp
import pytest
import structlog
import trio

import auth
from relay import __version__
from relay.api_contract import PUBLIC, ROUTE_ROLES, SESSION_COOKIE
from tests.e2e.conftest import (
    LOOPBACK,
    PKI,
    RunningBroker,
    add_engineer,
    broker_with,
)

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery"  # noqa: S105 - test account
WRONG_PASSWORD = "wrong password!!"  # noqa: S105 - test account
LOGIN = "/api/v1/login"
FAILED_LOGIN_BODY = {"error": "invalid username, password or code"}
SECURITY_HEADERS = {
    "strict-transport-security": "max-age=31536000",
    "content-security-policy": "default-src 'self'; script-src 'self'; "
    "object-src 'none'; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def _code(secret: str, *, steps: int = 0) -> str:
    return pyotp.TOTP(secret).at(time.time() + steps * 30)


def _wrong_code(secret: str) -> str:
    valid = {_code(secret, steps=s) for s in (-1, 0, 1)}
    return next(c for c in (f"{n:06d}" for n in range(10)) if c not in valid)


async def _login(
    api: httpx.AsyncClient, username: str, code: str, *, password: str = PASSWORD
) -> httpx.Response:
    response = await api.post(
        LOGIN, json={"username": username, "password": password, "totp": code}
    )
    api.cookies.clear()  # each test says which credential it sends
    return response


async def _token(api: httpx.AsyncClient, username: str, secret: str) -> str:
    response = await _login(api, username, _code(secret))
    assert response.status_code == 200, response.text
    token: str = response.json()["token"]
    return token


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _failures(broker: RunningBroker, factor: str, reason: str) -> float:
    return broker.sample("relay_auth_failures_total", factor=factor, reason=reason)


async def test_login_returns_token_and_strict_cookie(
    broker: RunningBroker, pki: PKI, client: httpx.AsyncClient
) -> None:
    """A correct password and code answer a fresh token and a __Host- cookie with every hardening attribute."""
    secret = add_engineer(pki, "alice")
    with structlog.testing.capture_logs() as events:
        response = await _login(client, "alice", _code(secret))
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"token", "expires_at", "csrf_token"}
    auth.verify_token_format(body["token"])
    assert body["csrf_token"] == auth.csrf_token(body["token"])
    expires_at = datetime.fromisoformat(body["expires_at"])
    assert abs(expires_at - (datetime.now(UTC) + timedelta(hours=12))) < timedelta(
        minutes=1
    )
    assert response.headers.get_list("set-cookie") == [
        f"{SESSION_COOKIE}={body['token']}; Secure; HttpOnly; SameSite=Strict; "
        "Path=/; Max-Age=43200"
    ]
    assert broker.sample("relay_auth_logins_total") == 1
    [event] = [e for e in events if e["event"] == "auth.login"]
    assert event["token_hash"] == auth.token_hash(body["token"])[:12]
    assert body["token"] not in repr(events)


async def test_me_with_bearer_and_with_cookie(
    pki: PKI, client: httpx.AsyncClient
) -> None:
    """/me answers the user and role for a bearer token and for the session cookie alike."""
    secret = add_engineer(pki, "alice", role="auditor")
    token = await _token(client, "alice", secret)
    expected = {
        "username": "alice",
        "role": "auditor",
        "csrf_token": auth.csrf_token(token),
    }
    by_bearer = await client.get("/api/v1/me", headers=_bearer(token))
    assert (by_bearer.status_code, by_bearer.json()) == (200, expected)
    by_cookie = await client.get(
        "/api/v1/me", headers={"Cookie": f"{SESSION_COOKIE}={token}"}
    )
    assert (by_cookie.status_code, by_cookie.json()) == (200, expected)
    anonymous = await client.get("/api/v1/me")
    assert anonymous.status_code == 401


async def test_every_login_failure_answers_identically(
    broker: RunningBroker, pki: PKI, client: httpx.AsyncClient
) -> None:
    """Wrong password, unknown user, wrong code and disabled user give byte-identical 401s; only the metric tells them apart."""
    alice = add_engineer(pki, "alice")
    bob = add_engineer(pki, "bob")
    carol = add_engineer(pki, "carol")
    with pki.store() as store:
        store.disable_user("carol", at=datetime.now(UTC), reason="test")
    long_name = "n" * 100
    with structlog.testing.capture_logs() as events:
        responses = [
            await _login(client, "alice", _code(alice), password=WRONG_PASSWORD),
            await _login(client, long_name, _code(alice)),
            await _login(client, "bob", _wrong_code(bob)),
            await _login(client, "carol", _code(carol)),
        ]

    def shape(response: httpx.Response) -> tuple[int, bytes, list[tuple[str, str]]]:
        headers = sorted(
            (name, value) for name, value in response.headers.items() if name != "date"
        )
        return response.status_code, response.content, headers

    first = shape(responses[0])
    assert first[0] == 401
    assert json.loads(first[1]) == FAILED_LOGIN_BODY
    assert all(shape(response) == first for response in responses[1:])
    assert _failures(broker, "password", "bad_password") == 1
    assert _failures(broker, "user", "unknown_user") == 1
    assert _failures(broker, "totp", "bad_totp") == 1
    assert _failures(broker, "user", "user_disabled") == 1
    audit = [
        (event["username"], event["reason"], event["source"])
        for event in events
        if event["event"] == "auth.login_failed"
    ]
    assert audit == [
        ("alice", "bad_password", LOOPBACK),
        ("n" * 64, "unknown_user", LOOPBACK),
        ("bob", "bad_totp", LOOPBACK),
        ("carol", "user_disabled", LOOPBACK),
    ]


async def test_accepted_code_cannot_be_reused(
    broker: RunningBroker, pki: PKI, client: httpx.AsyncClient
) -> None:
    """A code that already logged in is refused the second time, counted as totp_reused."""
    secret = add_engineer(pki, "alice")
    code = _code(secret)
    assert (await _login(client, "alice", code)).status_code == 200
    again = await _login(client, "alice", code)
    assert (again.status_code, again.json()) == (401, FAILED_LOGIN_BODY)
    assert _failures(broker, "totp", "totp_reused") == 1


async def test_code_from_two_steps_ago_is_refused(
    broker: RunningBroker, pki: PKI, client: httpx.AsyncClient
) -> None:
    """A code of step t-2 is outside the accepted window (t-1..t)."""
    secret = add_engineer(pki, "alice")
    response = await _login(client, "alice", _code(secret, steps=-2))
    assert response.status_code == 401
    assert _failures(broker, "totp", "bad_totp") == 1


async def test_login_with_8_digit_60_s_codes_when_configured(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """With engineer_auth.totp_step_s = 60 and totp_digits = 8, an 8-digit code of
    the 60 s sequence logs in once; a 6-digit 30 s code and a reused code do not."""
    secret = add_engineer(pki, "alice")
    code = pyotp.TOTP(secret, digits=8, interval=60).now()
    async with broker_with(pki, nursery, totp_step_s=60, totp_digits=8) as (
        broker,
        api,
    ):
        refused = await _login(api, "alice", _code(secret))
        assert refused.status_code == 401
        assert _failures(broker, "totp", "bad_totp") == 1
        response = await _login(api, "alice", code)
        assert response.status_code == 200, response.text
        reused = await _login(api, "alice", code)
        assert reused.status_code == 401
        assert _failures(broker, "totp", "totp_reused") == 1


async def test_sixth_wrong_password_must_wait(pki: PKI, nursery: trio.Nursery) -> None:
    """After 5 wrong passwords from one address, the 6th attempt (even a right one) gets 429 with Retry-After."""
    secret = add_engineer(pki, "alice")
    async with broker_with(pki, nursery, login_base_delay_s=30.0) as (broker, api):
        for _ in range(5):
            failed = await _login(api, "alice", _code(secret), password=WRONG_PASSWORD)
            assert failed.status_code == 401
        refused = await _login(api, "alice", _code(secret))
        assert refused.status_code == 429
        assert refused.json() == {"error": "too many requests"}
        assert 1 <= int(refused.headers["retry-after"]) <= 30
        assert broker.sample("relay_auth_throttled_total", reason="source_delay") == 1


async def test_per_address_rate_limit(pki: PKI, nursery: trio.Nursery) -> None:
    """An address over its unauthenticated allowance gets 429 with Retry-After before its body is read."""
    async with broker_with(
        pki, nursery, unauthenticated_per_minute=1.0, unauthenticated_burst=3
    ) as (broker, api):
        for _ in range(3):
            response = await api.post(LOGIN, json={})
            assert response.status_code == 400
        refused = await api.post(LOGIN, json={})
        assert refused.status_code == 429
        assert refused.json() == {"error": "too many requests"}
        assert int(refused.headers["retry-after"]) >= 1
        assert broker.sample("relay_auth_throttled_total", reason="rate_limit") == 1


async def test_parallel_logins_with_one_code_have_one_winner(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """Of 20 simultaneous logins with the same valid code, exactly one gets a session."""
    secret = add_engineer(pki, "alice")
    code = _code(secret)
    statuses: list[int] = []
    async with broker_with(pki, nursery, login_free_failures=50) as (broker, api):

        async def attempt() -> None:
            response = await api.post(
                LOGIN, json={"username": "alice", "password": PASSWORD, "totp": code}
            )
            statuses.append(response.status_code)

        async with trio.open_nursery() as attempts:
            for _ in range(20):
                attempts.start_soon(attempt)
        assert sorted(statuses) == [200] + [401] * 19
        assert _failures(broker, "totp", "totp_reused") == 19


async def test_logout_revokes_the_token(pki: PKI, client: httpx.AsyncClient) -> None:
    """After logout the token is refused at once and the cookie is cleared."""
    secret = add_engineer(pki, "alice")
    token = await _token(client, "alice", secret)
    response = await client.post("/api/v1/logout", headers=_bearer(token))
    assert (response.status_code, response.json()) == (200, {"ok": True})
    assert response.headers["set-cookie"] == (
        f"{SESSION_COOKIE}=; Secure; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"
    )
    after = await client.get("/api/v1/me", headers=_bearer(token))
    assert (after.status_code, after.json()) == (401, {"error": "unauthorized"})


async def test_cookie_requests_that_change_state_need_the_csrf_header(
    broker: RunningBroker, pki: PKI, client: httpx.AsyncClient
) -> None:
    """With the cookie, a POST needs the session's X-Relay-CSRF header and, when
    an Origin is sent, our own; each refusal is 403, counted and audited, and
    leaves the session alive. Bearer requests and GETs need no header."""
    token = await _token(client, "alice", add_engineer(pki, "alice"))
    cookie = {"Cookie": f"{SESSION_COOKIE}={token}"}
    own_origin = str(client.base_url).rstrip("/")
    csrf = auth.csrf_token(token)
    refused_headers = [
        {},  # no token at all: what a cross-site form post would send
        {"X-Relay-CSRF": auth.csrf_token(auth.new_token())},  # another session's
        {"X-Relay-CSRF": csrf, "Origin": "https://evil.example"},
        {"X-Relay-CSRF": csrf, "Origin": "null"},
    ]
    with structlog.testing.capture_logs() as events:
        for extra in refused_headers:
            response = await client.post("/api/v1/logout", headers=cookie | extra)
            assert (response.status_code, response.json()) == (
                403,
                {"error": "cross-site request refused"},
            ), extra
    reasons = [e["reason"] for e in events if e["event"] == "auth.csrf_refused"]
    assert reasons == ["csrf", "csrf", "bad_origin", "bad_origin"]
    assert broker.sample("relay_engineer_refusals_total", reason="csrf") == 2
    assert broker.sample("relay_engineer_refusals_total", reason="bad_origin") == 2
    alive = await client.get("/api/v1/me", headers=cookie)  # GET: no header needed
    assert alive.status_code == 200
    accepted = await client.post(
        "/api/v1/logout",
        headers=cookie | {"X-Relay-CSRF": csrf, "Origin": own_origin},
    )
    assert accepted.status_code == 200
    assert (await client.get("/api/v1/me", headers=cookie)).status_code == 401
    # A bearer client (the CLI) sends neither Origin nor the header.
    other = await _token(client, "bob", add_engineer(pki, "bob"))
    assert (
        await client.post("/api/v1/logout", headers=_bearer(other))
    ).status_code == 200


async def test_login_from_another_sites_page_is_refused(
    broker: RunningBroker, pki: PKI, client: httpx.AsyncClient
) -> None:
    """Login CSRF: a login POST with a foreign Origin is 403 before any check of
    the credentials; with our own Origin (the console) it works."""
    secret = add_engineer(pki, "alice")
    body = {"username": "alice", "password": PASSWORD, "totp": _code(secret)}
    foreign = await client.post(
        LOGIN, json=body, headers={"Origin": "https://evil.example"}
    )
    assert (foreign.status_code, foreign.json()) == (
        403,
        {"error": "cross-site request refused"},
    )
    assert broker.sample("relay_auth_logins_total") == 0
    own = await client.post(
        LOGIN, json=body, headers={"Origin": str(client.base_url).rstrip("/")}
    )
    assert own.status_code == 200


async def test_forged_and_truncated_tokens_are_refused(
    broker: RunningBroker, pki: PKI, client: httpx.AsyncClient
) -> None:
    """A made-up token, a truncated one and one with a changed character all get 401."""
    secret = add_engineer(pki, "alice")
    token = await _token(client, "alice", secret)
    changed = ("B" if token[0] == "A" else "A") + token[1:]
    for bad in (auth.new_token(), token[:-1], changed, token + "A", "x" * 5_000):
        response = await client.get("/api/v1/me", headers=_bearer(bad))
        assert response.status_code == 401, bad[:50]
    assert broker.sample("relay_auth_token_rejections_total", reason="unknown") == 2
    basic = await client.get("/api/v1/me", headers={"Authorization": f"Basic {token}"})
    assert basic.status_code == 401


async def test_another_users_token_is_that_user(
    pki: PKI, client: httpx.AsyncClient
) -> None:
    """Bob's token authenticates Bob, never Alice; with a bearer and a cookie both sent, the bearer wins."""
    alice_token = await _token(client, "alice", add_engineer(pki, "alice"))
    bob_token = await _token(client, "bob", add_engineer(pki, "bob", role="auditor"))
    response = await client.get(
        "/api/v1/me",
        headers={**_bearer(bob_token), "Cookie": f"{SESSION_COOKIE}={alice_token}"},
    )
    assert response.json()["username"] == "bob"
    assert response.json()["csrf_token"] == auth.csrf_token(bob_token)


async def test_token_in_query_string_is_ignored(
    pki: PKI, client: httpx.AsyncClient
) -> None:
    """A valid token in the URL's query string does not authenticate."""
    token = await _token(client, "alice", add_engineer(pki, "alice"))
    for name in ("token", "access_token", SESSION_COOKIE):
        response = await client.get("/api/v1/me", params={name: token})
        assert response.status_code == 401


async def test_devices_for_engineers_and_auditors(
    pki: PKI, client: httpx.AsyncClient
) -> None:
    """Engineers list the devices the policy lets them reach (the default policy:
    all); auditors list every device (docs/monitoring.md, "Who sees what")."""
    pki.enroll("dev-1")
    engineer = await _token(client, "alice", add_engineer(pki, "alice"))
    auditor = await _token(client, "bob", add_engineer(pki, "bob", role="auditor"))
    listed = await client.get("/api/v1/devices", headers=_bearer(engineer))
    assert listed.status_code == 200
    assert listed.json() == [
        {
            "device_id": "dev-1",
            "online": False,
            "revoked": False,
            "in_session": False,
            "labels": {},
        }
    ]
    audited = await client.get("/api/v1/devices", headers=_bearer(auditor))
    assert audited.status_code == 200
    assert audited.json() == listed.json()


async def test_idle_session_expires(pki: PKI, nursery: trio.Nursery) -> None:
    """A token unused for longer than the idle lifetime is refused."""
    secret = add_engineer(pki, "alice")
    skew = [timedelta(0)]
    async with broker_with(
        pki, nursery, wall_clock=lambda: datetime.now(UTC) + skew[0]
    ) as (_broker, api):
        token = await _token(api, "alice", secret)
        assert (await api.get("/api/v1/me", headers=_bearer(token))).status_code == 200
        skew[0] = timedelta(minutes=15, seconds=1)
        assert (await api.get("/api/v1/me", headers=_bearer(token))).status_code == 401


async def test_oversized_body_is_413(client: httpx.AsyncClient) -> None:
    """A login body over 4 KiB is refused with 413 before it is parsed."""
    body = {"username": "alice", "password": "x" * 5000, "totp": "123456"}
    response = await client.post(LOGIN, json=body)
    assert response.status_code == 413


async def test_oversized_chunked_body_is_413(client: httpx.AsyncClient) -> None:
    """A chunked body declares no length: it is cut off once past 4 KiB."""

    async def chunks() -> AsyncIterator[bytes]:
        # Crossing the cap with the last chunk but one: the server has read
        # (almost) everything when it answers, so the client is not cut off
        # mid-send.
        yield b'{"username": "alice", "password": "'
        for _ in range(4):
            yield b"x" * 1024
        yield b'", "totp": "123456"}'

    response = await client.post(
        LOGIN, content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"[]",
        b"\xff\xfe",
        b'{"username": 1, "password": "p", "totp": "123456"}',
        b'{"username": "alice", "password": "p"}',
        b'{"username": "a", "password": "p", "totp": "1", "extra": 1}',
    ],
)
async def test_malformed_login_body_is_400(
    client: httpx.AsyncClient, body: bytes
) -> None:
    """Bodies that are not JSON objects of exactly three strings get 400 bad request."""
    response = await client.post(
        LOGIN, content=body, headers={"Content-Type": "application/json"}
    )
    assert (response.status_code, response.json()) == (400, {"error": "bad request"})


async def test_login_needs_json_content_type(client: httpx.AsyncClient) -> None:
    """A form-encoded login is refused with 415."""
    response = await client.post(LOGIN, data={"username": "alice"})
    assert response.status_code == 415


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/info"),
        ("GET", "/api/v1/me"),
        ("POST", LOGIN),
        ("GET", "/nope"),
        ("GET", "/console/common.js"),
        ("GET", "/console/nope.js"),
    ],
)
async def test_security_headers_on_every_response(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    """HSTS, CSP, nosniff and no-referrer are on every response, and API responses are not cached."""
    response = await client.request(method, path)
    for name, value in SECURITY_HEADERS.items():
        assert response.headers[name] == value
    if path.startswith("/api/"):
        assert response.headers["cache-control"] == "no-store"


async def test_banner_still_served(client: httpx.AsyncClient) -> None:
    """GET /api/v1/info answers the service name and version without a login."""
    response = await client.get("/api/v1/info")
    assert response.status_code == 200
    assert response.json() == {"service": "remote-care-relay", "version": __version__}


def test_every_route_states_its_roles() -> None:
    """Each route of the table allows known roles only, or is explicitly public."""
    known = {"engineer", "auditor", "admin", "customer"}
    for route, roles in ROUTE_ROLES.items():
        assert roles is PUBLIC or roles <= known, route
    public = {route for route, roles in ROUTE_ROLES.items() if roles is PUBLIC}
    assert public == {
        ("GET", "/"),
        ("GET", "/console/{path:path}"),
        ("POST", LOGIN),
        ("GET", "/api/v1/info"),
        ("GET", "/api/v1/openapi.json"),
    }
