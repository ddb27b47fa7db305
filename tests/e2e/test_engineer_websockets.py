"""The engineers' WebSockets on the real engineer listener (Hypercorn, TLS, loopback).

The event feed (``/api/v1/events``) stands in for every engineer WebSocket: the
Origin check, authentication, roles, and above all that a socket ends when its
login session ends (logout, ``user disable``, ``reset-totp``, timeouts) within the
5 s budget. The client is trio-websocket, an implementation independent of the
server's.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import httpx
import pytest
import trio
import trio_websocket

import auth
from relay.api_contract import EVENTS_PATH, SESSION_COOKIE
from relay.pki_files import DataDir, load_or_create_sealing_key
from relay.proto.close import CloseCode
from relay.users import reset_totp
from tests.e2e.conftest import (
    LOOPBACK,
    PKI,
    RunningBroker,
    add_engineer,
    broker_with,
    login_token,
    wait_until,
)

#: The budget for ending an engineer's sockets after logout or disable (issue 3).
END_BUDGET_S = 5.0


def _own_origin(port: int) -> str:
    return f"https://{LOOPBACK}:{port}"


def _headers(
    *,
    token: str | None = None,
    cookie: str | None = None,
    origin: str | None = None,
) -> list[tuple[bytes, bytes]]:
    headers = []
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    if cookie is not None:
        headers.append((b"cookie", f"{SESSION_COOKIE}={cookie}".encode()))
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    return headers


@asynccontextmanager
async def _events(
    pki: PKI, port: int, headers: list[tuple[bytes, bytes]]
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    # The stream is ours to close: trio-websocket 0.12 leaves the socket open
    # when the server refuses the upgrade or closes first.
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    stream = await trio.open_ssl_over_tcp_stream(
        LOOPBACK, port, ssl_context=context, https_compatible=True
    )
    async with stream, trio.open_nursery() as nursery:
        with trio.fail_after(10):
            ws = await trio_websocket.wrap_client_stream(
                nursery,
                stream,
                f"{LOOPBACK}:{port}",
                EVENTS_PATH,
                extra_headers=headers,
                max_message_size=1024 * 1024,
            )
        try:
            yield ws
        finally:
            with trio.move_on_after(5):
                await ws.aclose()
            nursery.cancel_scope.cancel()


async def _refused(
    pki: PKI, port: int, headers: list[tuple[bytes, bytes]]
) -> trio_websocket.ConnectionRejected:
    """Open the feed expecting an HTTP refusal; return it."""
    rejections: list[trio_websocket.ConnectionRejected] = []
    try:
        async with _events(pki, port, headers):
            pass
    except* trio_websocket.ConnectionRejected as group:
        rejections = [
            error
            for error in group.exceptions
            if isinstance(error, trio_websocket.ConnectionRejected)
        ]
    assert rejections, "the upgrade was accepted"
    return rejections[0]


async def _devices(ws: trio_websocket.WebSocketConnection) -> list[dict[str, object]]:
    with trio.fail_after(5):
        message = json.loads(await ws.get_message())
    assert message["type"] == "devices"
    devices: list[dict[str, object]] = message["devices"]
    return devices


async def _closed(
    ws: trio_websocket.WebSocketConnection, *, within_s: float = END_BUDGET_S
) -> trio_websocket.CloseReason:
    """Read until the broker closes *ws*; fail if it takes longer than *within_s*."""
    with (
        trio.fail_after(within_s),
        pytest.raises(trio_websocket.ConnectionClosed) as closed,
    ):
        await _read_forever(ws)
    reason = closed.value.reason
    assert reason is not None
    return reason


async def _read_forever(ws: trio_websocket.WebSocketConnection) -> None:
    while True:
        await ws.get_message()


def _record_device(pki: PKI, device_id: str) -> None:
    pki.enroll(device_id)


# --- the feed -----------------------------------------------------------------


async def test_feed_sends_the_device_list_and_its_changes(
    broker: RunningBroker, pki: PKI, client: httpx.AsyncClient
) -> None:
    """The first message is the device list; an enrollment is pushed without asking."""
    _record_device(pki, "dev-1")
    token = await login_token(client, "alice", add_engineer(pki, "alice"))
    port = broker.ports.engineer
    async with _events(pki, port, _headers(token=token)) as ws:
        first = await _devices(ws)
        assert [d["device_id"] for d in first] == ["dev-1"]
        assert first[0] == {
            "device_id": "dev-1",
            "online": False,
            "revoked": False,
            "in_session": False,
            "labels": {},
        }
        assert broker.sample("relay_engineer_websockets") == 1
        _record_device(pki, "dev-2")
        second = await _devices(ws)
        assert [d["device_id"] for d in second] == ["dev-1", "dev-2"]
    # Same list as the HTTP route.
    listed = await client.get(
        "/api/v1/devices", headers={"Authorization": f"Bearer {token}"}
    )
    assert listed.json() == second
    await _no_socket_left(broker)


async def test_client_message_closes_the_feed_with_1003(
    broker: RunningBroker, pki: PKI, client: httpx.AsyncClient
) -> None:
    """The feed takes no input: a message from the client closes it with 1003."""
    token = await login_token(client, "alice", add_engineer(pki, "alice"))
    async with _events(pki, broker.ports.engineer, _headers(token=token)) as ws:
        await _devices(ws)
        await ws.send_message("hello")
        reason = await _closed(ws)
    assert reason.code == CloseCode.UNSUPPORTED_DATA
    await _no_socket_left(broker)


async def test_message_over_the_cap_closes_with_1009(
    broker: RunningBroker, pki: PKI, client: httpx.AsyncClient
) -> None:
    """A message over max_websocket_message_bytes (64 KiB) is refused with 1009."""
    token = await login_token(client, "alice", add_engineer(pki, "alice"))
    async with _events(pki, broker.ports.engineer, _headers(token=token)) as ws:
        await _devices(ws)
        await ws.send_message(b"x" * (64 * 1024 + 1))
        reason = await _closed(ws)
    assert reason.code == CloseCode.MESSAGE_TOO_BIG
    await _no_socket_left(broker)


# --- upgrade checks --------------------------------------------------------------


async def test_browser_upgrade_from_the_own_origin_with_the_cookie_is_accepted(
    broker: RunningBroker, pki: PKI, client: httpx.AsyncClient
) -> None:
    """What the console does: the session cookie, from the listener's own origin."""
    token = await login_token(client, "alice", add_engineer(pki, "alice"))
    port = broker.ports.engineer
    async with _events(
        pki, port, _headers(cookie=token, origin=_own_origin(port))
    ) as ws:
        assert await _devices(ws) == []


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "http://127.0.0.1:{port}",  # the right host and port, the wrong scheme
        "https://127.0.0.1:1",  # another port
        "https://127.0.0.1.evil.example:{port}",
        "null",
        "not an origin",
    ],
)
async def test_foreign_origin_is_refused_with_403(
    broker: RunningBroker, pki: PKI, client: httpx.AsyncClient, origin: str
) -> None:
    """Cross-site WebSocket hijacking: a valid cookie from another origin gets 403."""
    token = await login_token(client, "alice", add_engineer(pki, "alice"))
    port = broker.ports.engineer
    refused = await _refused(
        pki, port, _headers(cookie=token, origin=origin.format(port=port))
    )
    assert refused.status_code == 403
    assert json.loads(refused.body or b"{}") == {"error": "origin not allowed"}
    headers = {name.lower(): value for name, value in refused.headers}
    assert headers[b"x-content-type-options"] == b"nosniff"
    assert b"frame-ancestors 'none'" in headers[b"content-security-policy"]
    assert broker.sample("relay_engineer_refusals_total", reason="bad_origin") == 1
    assert broker.sample("relay_engineer_websockets") == 0


async def test_no_origin_needs_a_bearer_token(
    broker: RunningBroker, pki: PKI, client: httpx.AsyncClient
) -> None:
    """Without Origin (not a browser page) the cookie alone is refused; a bearer is fine."""
    token = await login_token(client, "alice", add_engineer(pki, "alice"))
    port = broker.ports.engineer
    refused = await _refused(pki, port, _headers(cookie=token))
    assert refused.status_code == 403
    reason = "no_origin_without_bearer"
    assert broker.sample("relay_engineer_refusals_total", reason=reason) == 1
    async with _events(pki, port, _headers(token=token)) as ws:
        assert await _devices(ws) == []


async def test_configured_origins_replace_the_own_origin(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """allowed_origins set: exactly those origins pass, the listener's own no longer."""
    secret = add_engineer(pki, "alice")
    listener = {"allowed_origins": ("https://Console.Example",)}
    async with broker_with(pki, nursery, listener=listener) as (broker, api):
        token = await login_token(api, "alice", secret)
        port = broker.ports.engineer
        own = await _refused(
            pki, port, _headers(cookie=token, origin=_own_origin(port))
        )
        assert own.status_code == 403
        origin = "https://console.example:443"
        async with _events(pki, port, _headers(cookie=token, origin=origin)) as ws:
            assert await _devices(ws) == []


async def test_upgrade_without_a_session_is_401(
    broker: RunningBroker, pki: PKI
) -> None:
    """No token, or a made-up one: 401, counted like the HTTP routes."""
    port = broker.ports.engineer
    missing = await _refused(pki, port, _headers(origin=_own_origin(port)))
    assert missing.status_code == 401
    made_up = await _refused(pki, port, _headers(token="A" * 43))
    assert made_up.status_code == 401
    assert broker.sample("relay_auth_token_rejections_total", reason="missing") == 1


async def test_auditor_gets_the_feed_of_every_device(
    broker: RunningBroker, pki: PKI, client: httpx.AsyncClient
) -> None:
    """WEBSOCKET_ROLES: every role opens the feed, which lists what the user may
    see (relay._trio.feed_api): an auditor sees every device."""
    _record_device(pki, "dev-1")
    _record_device(pki, "dev-2")
    token = await login_token(
        client, "audrey", add_engineer(pki, "audrey", role="auditor")
    )
    async with _events(pki, broker.ports.engineer, _headers(token=token)) as ws:
        devices = await _devices(ws)
    assert {d["device_id"] for d in devices} == {"dev-1", "dev-2"}
    assert broker.sample("relay_auth_forbidden_total") == 0


async def test_upgrade_over_8_kib_is_431(
    broker: RunningBroker, pki: PKI, client: httpx.AsyncClient
) -> None:
    """An upgrade whose head is over 8 KiB is refused before any check runs."""
    token = await login_token(client, "alice", add_engineer(pki, "alice"))
    headers = [*_headers(token=token), (b"x-padding", b"p" * 8 * 1024)]
    refused = await _refused(pki, broker.ports.engineer, headers)
    assert refused.status_code == 431
    assert broker.sample("relay_engineer_refusals_total", reason="head_too_large") == 1
    assert broker.sample("relay_auth_token_rejections_total", reason="unknown") == 0


# --- the socket ends with the login session ------------------------------------


async def test_logout_closes_the_sessions_sockets_at_once(
    broker: RunningBroker, pki: PKI, client: httpx.AsyncClient
) -> None:
    """Logout with a live socket: it is closed with 4004 'logged out'; others stay."""
    token = await login_token(client, "alice", add_engineer(pki, "alice"))
    other = await login_token(client, "bob", add_engineer(pki, "bob"))
    port = broker.ports.engineer
    async with (
        _events(pki, port, _headers(token=token)) as ws,
        _events(pki, port, _headers(token=other)) as other_ws,
    ):
        await _devices(ws)
        await _devices(other_ws)
        logout = await client.post(
            "/api/v1/logout", headers={"Authorization": f"Bearer {token}"}
        )
        assert logout.status_code == 200
        reason = await _closed(ws, within_s=1.0)
        assert (reason.code, reason.reason) == (CloseCode.LOGIN_ENDED, "logged out")
        _record_device(pki, "dev-after")
        assert [d["device_id"] for d in await _devices(other_ws)] == ["dev-after"]
    await _no_socket_left(broker)


async def test_disabled_user_mid_session_is_closed_within_budget(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """``relay user disable`` in another process: the feed delivers it within 5 s.

    Uses the default revocation poll (1 s), not the tests' short one.
    """
    secret = add_engineer(pki, "alice")
    async with broker_with(pki, nursery, listener={"revocation_poll_s": 1.0}) as (
        broker,
        api,
    ):
        token = await login_token(api, "alice", secret)
        async with _events(pki, broker.ports.engineer, _headers(token=token)) as ws:
            await _devices(ws)
            with pki.store() as store:
                store.disable_user("alice", at=datetime.now(UTC), reason="left")
            started = trio.current_time()
            reason = await _closed(ws)
            assert trio.current_time() - started < END_BUDGET_S
        assert (reason.code, reason.reason) == (CloseCode.LOGIN_ENDED, "login revoked")
        await _no_socket_left(broker)


async def test_reset_totp_closes_the_users_sockets(
    broker: RunningBroker, pki: PKI, client: httpx.AsyncClient
) -> None:
    """A TOTP reset revokes the user's sessions, and with them their sockets."""
    token = await login_token(client, "alice", add_engineer(pki, "alice"))
    async with _events(pki, broker.ports.engineer, _headers(token=token)) as ws:
        await _devices(ws)
        reset_user_totp(pki, "alice")
        reason = await _closed(ws)
    assert (reason.code, reason.reason) == (CloseCode.LOGIN_ENDED, "login revoked")


async def test_socket_ends_at_the_absolute_session_end(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """A socket never outlives its login session's absolute lifetime."""
    secret = add_engineer(pki, "alice")
    async with broker_with(pki, nursery, session_absolute_s=2.0) as (broker, api):
        token = await login_token(api, "alice", secret)
        async with _events(pki, broker.ports.engineer, _headers(token=token)) as ws:
            await _devices(ws)
            reason = await _closed(ws, within_s=4.0)
        assert (reason.code, reason.reason) == (CloseCode.LOGIN_ENDED, "login expired")


async def test_listening_socket_does_not_keep_an_idle_session_alive(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """The feed is not use: with no request, the session idles out and the socket ends.

    Requests with the same token keep it alive meanwhile: the watcher asks the
    store before it ends a socket whose estimate has passed.
    """
    secret = add_engineer(pki, "alice")
    async with broker_with(pki, nursery, session_idle_s=1.5) as (broker, api):
        token = await login_token(api, "alice", secret)
        bearer = {"Authorization": f"Bearer {token}"}
        async with _events(pki, broker.ports.engineer, _headers(token=token)) as ws:
            await _devices(ws)
            for _ in range(4):  # 2 s of use, past the first estimate
                await trio.sleep(0.5)
                assert (await api.get("/api/v1/me", headers=bearer)).status_code == 200
            reason = await _closed(ws, within_s=3.0)
        assert (reason.code, reason.reason) == (CloseCode.LOGIN_ENDED, "login expired")
        assert (await api.get("/api/v1/me", headers=bearer)).status_code == 401


# --- helpers ------------------------------------------------------------------


def reset_user_totp(pki: PKI, username: str) -> None:
    """What ``relay user reset-totp`` does, from outside the broker."""
    key, _origin = load_or_create_sealing_key(DataDir(pki.data_dir), None)
    with pki.store() as store:
        reset_totp(
            store, auth.SecretSealer(key), username=username, now=datetime.now(UTC)
        )


async def _no_socket_left(broker: RunningBroker) -> None:
    await wait_until(lambda: broker.sample("relay_engineer_websockets") == 0)
