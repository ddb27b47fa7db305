"""Engineer login limits against a real broker on loopback TLS.

Server clock skew for TOTP, the hourly failure cap per account, the per-address
rate limit under credential stuffing, and oversized request headers.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pyotp
import pytest
import trio

from auth.totp import TOTP_STEP_S
from tests.e2e.conftest import (
    PKI,
    RunningBroker,
    add_engineer,
    broker_with,
)

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery"  # noqa: S105 - test account
WRONG_PASSWORD = "wrong password!!"  # noqa: S105 - test account
LOGIN = "/api/v1/login"
TOO_MANY_BODY = {"error": "too many requests"}
FAILED_LOGIN_BODY = {"error": "invalid username, password or code"}
#: Limits high enough that neither the per-address rate nor the per-source
#: delay interferes with what a test checks.
GENEROUS: dict[str, Any] = {
    "unauthenticated_per_minute": 1000.0,
    "unauthenticated_burst": 1000,
    "login_free_failures": 100,
}


async def _login(
    api: httpx.AsyncClient, username: str, code: str, *, password: str = PASSWORD
) -> httpx.Response:
    response = await api.post(
        LOGIN, json={"username": username, "password": password, "totp": code}
    )
    api.cookies.clear()
    return response


def _now_code(secret: str) -> str:
    return pyotp.TOTP(secret).now()


def _client_time(seconds_into_step: int) -> int:
    """A Unix time *seconds_into_step* into a step that began 30-60 s ago.

    In the past, so that a server clock up to 5 min ahead still issues a listener
    certificate (backdated 5 min) that is already valid for the real-time client.
    """
    now = int(datetime.now(UTC).timestamp())
    step_start = (now // TOTP_STEP_S - 1) * TOTP_STEP_S
    return step_start + seconds_into_step


def _fixed_clock(unix_time: float) -> Callable[[], datetime]:
    at = datetime.fromtimestamp(unix_time, UTC)
    return lambda: at


def _bad_totp(broker: RunningBroker) -> float:
    return broker.sample("relay_auth_failures_total", factor="totp", reason="bad_totp")


# --- 1. server clock skew ----------------------------------------------------


async def test_server_45s_ahead_early_in_step_accepts_code(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """A server clock 45 s ahead of a client 5 s into step t is in step t+1, so the client's code is the server's t-1 and is accepted."""
    secret = add_engineer(pki, "alice")
    client_time = _client_time(5)
    code = pyotp.TOTP(secret).at(client_time)
    server_clock = _fixed_clock(client_time + 45)
    async with broker_with(pki, nursery, wall_clock=server_clock) as (broker, api):
        response = await _login(api, "alice", code)
        assert response.status_code == 200, response.text
        assert broker.sample("relay_auth_logins_total") == 1
        assert _bad_totp(broker) == 0


@pytest.mark.parametrize(
    ("seconds_into_step", "offset_s", "server_step"),
    [
        # 20 + 45 = 65 s: the server is in step t+2, the code is its t-2.
        (20, 45, 2),
        # 5 - 45 = -40 s: the server is in step t-2, the code is its t+2.
        (5, -45, -2),
        # 20 - 45 = -25 s: the server is in step t-1, the code is its t+1.
        (20, -45, -1),
        (5, 300, 10),
        (5, -300, -10),
    ],
)
async def test_skewed_server_refuses_code_outside_window(
    pki: PKI,
    nursery: trio.Nursery,
    seconds_into_step: int,
    offset_s: int,
    server_step: int,
) -> None:
    """A code whose step is not the server's t-1 or t (server clock +-45 s or +-5 min off) is refused with 401 and counted as bad_totp."""
    secret = add_engineer(pki, "alice")
    client_time = _client_time(seconds_into_step)
    assert (client_time + offset_s) // TOTP_STEP_S - client_time // TOTP_STEP_S == (
        server_step
    )
    code = pyotp.TOTP(secret).at(client_time)
    server_clock = _fixed_clock(client_time + offset_s)
    async with broker_with(pki, nursery, wall_clock=server_clock) as (broker, api):
        response = await _login(api, "alice", code)
        assert (response.status_code, response.json()) == (401, FAILED_LOGIN_BODY)
        assert _bad_totp(broker) == 1
        assert broker.sample("relay_auth_logins_total") == 0


# --- 2. hourly cap per account -------------------------------------------------


async def test_hourly_cap_refuses_even_right_credentials(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """After login_failures_per_hour failures for an account, the next login, even with the right password and code, gets 429 with Retry-After."""
    secret = add_engineer(pki, "alice")
    async with broker_with(pki, nursery, login_failures_per_hour=10, **GENEROUS) as (
        broker,
        api,
    ):
        for _ in range(10):
            failed = await _login(
                api, "alice", _now_code(secret), password=WRONG_PASSWORD
            )
            assert failed.status_code == 401
        refused = await _login(api, "alice", _now_code(secret))
        assert (refused.status_code, refused.json()) == (429, TOO_MANY_BODY)
        # The oldest failure leaves the sliding hour in just under an hour.
        assert 3500 <= int(refused.headers["retry-after"]) <= 3600
        assert (
            broker.sample("relay_auth_throttled_total", reason="account_hourly_cap")
            == 1
        )
        assert broker.sample("relay_auth_logins_total") == 0
        assert (
            broker.sample(
                "relay_auth_failures_total", factor="password", reason="bad_password"
            )
            == 10
        )


# --- 3. credential stuffing from one address -----------------------------------


async def test_credential_stuffing_hits_per_address_limit(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """Wrong passwords for many different user names from one address get 429 with Retry-After once the address's allowance (burst 5) is spent."""
    async with broker_with(
        pki, nursery, unauthenticated_per_minute=5.0, unauthenticated_burst=5
    ) as (broker, api):
        for n in range(5):
            failed = await _login(api, f"user{n}", "123456", password=WRONG_PASSWORD)
            assert (failed.status_code, failed.json()) == (401, FAILED_LOGIN_BODY)
        refused = await _login(api, "user5", "123456", password=WRONG_PASSWORD)
        assert (refused.status_code, refused.json()) == (429, TOO_MANY_BODY)
        # 5 a minute: the next token is at most 12 s away.
        assert 1 <= int(refused.headers["retry-after"]) <= 12
        assert broker.sample("relay_auth_throttled_total", reason="rate_limit") == 1
        assert (
            broker.sample(
                "relay_auth_failures_total", factor="user", reason="unknown_user"
            )
            == 5
        )


# --- 4. oversized request headers ----------------------------------------------


@pytest.mark.parametrize("padding_kib", [9, 17, 60])
async def test_request_head_over_8_kib_is_431_with_security_headers(
    pki: PKI, nursery: trio.Nursery, padding_kib: int
) -> None:
    """Any head over max_request_head_bytes (8 KiB) is 431, whatever Hypercorn's
    own limit would let through; the answer carries the listener's headers, and
    just under the cap is fine."""
    async with broker_with(pki, nursery) as (broker, api):
        big = await api.get(
            "/api/v1/me", headers={"X-Padding": "x" * padding_kib * 1024}
        )
        assert big.status_code == 431
        assert big.json() == {"error": "request header fields too large"}
        assert big.headers["x-content-type-options"] == "nosniff"
        assert big.headers["cache-control"] == "no-store"
        assert (
            broker.sample("relay_engineer_refusals_total", reason="head_too_large") == 1
        )
        # Nothing ran: not even the session check.
        assert broker.sample("relay_auth_token_rejections_total", reason="missing") == 0
        fits = await api.get("/api/v1/info", headers={"X-Padding": "x" * 7 * 1024})
        assert fits.status_code == 200


async def test_100_kib_header_is_431_and_broker_survives(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """A request with a 100 KiB Cookie header is refused by Hypercorn itself (431,
    connection closed) before our cap sees it; the next request is served normally."""
    async with broker_with(pki, nursery) as (_broker, api):
        big = await api.get("/api/v1/info", headers={"Cookie": "a=" + "x" * 100 * 1024})
        assert big.status_code == 431
        assert big.headers["connection"] == "close"
        assert big.content == b""
        normal = await api.get("/api/v1/info")
        assert normal.status_code == 200
        assert normal.json()["service"] == "remote-care-relay"
