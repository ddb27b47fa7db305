"""The agent's local device UI (page, JSON API, local-only checks) and terminal prompt."""

from __future__ import annotations

import base64
import gc
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import httpx
import pytest
import trio
import trio.testing

import auth
from relay._trio.agent_sessions import DeviceIdentity, OfferView, SessionRuntime
from relay._trio.agent_ui import CSP, TerminalPrompt, serve_agent_ui
from relay._trio.websocket import WebSocketConnection
from relay.config import AgentConfig, ListenAddress
from relay.console import end_wording_module
from relay.proto import control
from relay.proto.session import new_session_id

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test() -> Iterator[None]:
    yield
    gc.collect()


def _offer(channels: tuple[str, ...] = ("shell", "tcp:22", "tcp:80")) -> control.Offer:
    return control.Offer(
        session_id=new_session_id(secrets.token_bytes(16)),
        engineer="alice",
        engineer_role="engineer, Example Service",
        reason="ticket 4711 \x1b[2J",
        channels=channels,
        max_seconds=1800,
        grant_deadline_ms=time.time_ns() // 1_000_000 + 60_000,
        nonce=base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode(),
    )


def _no_tunnel(
    _session_id: str, _tunnel_url: str | None
) -> AbstractAsyncContextManager[WebSocketConnection]:
    raise AssertionError("no tunnel in these tests")


@dataclass
class UI:
    runtime: SessionRuntime
    client: httpx.AsyncClient
    base: str


@pytest.fixture
async def ui(nursery: trio.Nursery) -> AsyncIterator[UI]:
    key = auth.generate_private_key()
    runtime = SessionRuntime(
        config=AgentConfig(shell_command=("/bin/sh",)),
        load_identity=lambda: DeviceIdentity(device_id="dev-ui", private_key=key),
        open_tunnel=_no_tunnel,
    )
    await nursery.start(runtime.run)
    port = await nursery.start(
        serve_agent_ui, runtime, ListenAddress(host="127.0.0.1", port=0)
    )
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base) as client:
        yield UI(runtime=runtime, client=client, base=base)
    nursery.cancel_scope.cancel()


async def test_state_offer_and_deny(ui: UI) -> None:
    """/api/state shows the offer as the device would grant it; deny answers it;
    a stale id is 409."""
    answer = await ui.client.get("/api/state")
    assert answer.status_code == 200
    assert answer.json()["offer"] is None
    assert answer.json()["session"] is None
    offer = _offer()
    ui.runtime.handle_control(offer)
    state = (await ui.client.get("/api/state")).json()["offer"]
    assert state["session_id"] == offer.session_id
    assert state["engineer"] == "alice"
    assert state["reason"] == offer.reason
    assert state["channels"] == ["shell", "tcp:22"]
    assert state["refused_channels"] == ["tcp:80"]
    assert state["max_seconds"] == 1800
    assert state["grant_deadline"] == offer.grant_deadline_ms
    stale = await ui.client.post("/api/grant", json={"session_id": "0" * 32})
    assert stale.status_code == 409
    denied = await ui.client.post("/api/deny", json={"session_id": offer.session_id})
    assert denied.status_code == 200
    assert denied.json()["offer"] is None
    again = await ui.client.post("/api/deny", json={"session_id": offer.session_id})
    assert again.status_code == 409
    ended = await ui.client.post("/api/end", json={"session_id": offer.session_id})
    assert ended.status_code == 409


async def test_grant_through_the_ui(ui: UI) -> None:
    """POST /api/grant takes the offer; with no control channel the grant cannot
    be sent, so the session is dropped again (the broker never saw it)."""
    offer = _offer()
    ui.runtime.handle_control(offer)
    granted = await ui.client.post("/api/grant", json={"session_id": offer.session_id})
    assert granted.status_code == 200
    assert granted.json()["offer"] is None
    with trio.fail_after(5):
        while ui.runtime.state()["session"] is not None:  # noqa: ASYNC110 - runtime state
            await trio.sleep(0.01)


async def test_dns_rebinding_and_cross_site_requests_are_refused(ui: UI) -> None:
    """A foreign Host (DNS rebinding), a foreign Origin and a non-JSON POST are refused."""
    rebound = await ui.client.get("/api/state", headers={"Host": "evil.example:7070"})
    assert rebound.status_code == 403
    page = await ui.client.get("/", headers={"Host": "evil.example"})
    assert page.status_code == 403
    offer = _offer()
    ui.runtime.handle_control(offer)
    cross = await ui.client.post(
        "/api/grant",
        json={"session_id": offer.session_id},
        headers={"Origin": "http://evil.example"},
    )
    assert cross.status_code == 403
    form = await ui.client.post(
        "/api/grant",
        content=f"session_id={offer.session_id}",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert form.status_code == 415
    assert ui.runtime.offer is not None  # nothing of that answered the offer
    same_origin = await ui.client.post(
        "/api/deny", json={"session_id": offer.session_id}, headers={"Origin": ui.base}
    )
    assert same_origin.status_code == 200
    bad = await ui.client.post(
        "/api/deny", content=b"[", headers={"Content-Type": "application/json"}
    )
    assert bad.status_code == 400


async def test_page_has_no_inline_script_and_a_strict_csp(ui: UI) -> None:
    """The page loads one module script file; every answer carries the CSP and
    no-store, exactly once."""
    page = await ui.client.get("/")
    assert page.status_code == 200
    assert page.headers.get_list("content-security-policy") == [
        "default-src 'self'; frame-ancestors 'none'"
    ]
    assert page.headers.get_list("cache-control") == ["no-store"]
    assert '<script type="module" src="/console/device.js"></script>' in page.text
    assert page.text.count("<script") == 1
    assert "style=" not in page.text
    assert "<style" not in page.text
    for name in ("device.js", "common.js", "end-wording.js"):
        script = await ui.client.get(f"/console/{name}")
        assert script.status_code == 200
        assert script.headers["content-type"] == "text/javascript; charset=utf-8"
        assert script.headers.get_list("cache-control") == ["no-store"]
        assert "innerHTML" not in script.text
    assert "textContent" in (await ui.client.get("/console/common.js")).text


async def test_page_shares_the_console_look_and_wording(ui: UI) -> None:
    """The device page loads the console's style sheet and shared helpers, and the
    end wording from the one Python table, said from the instrument's side."""
    page = (await ui.client.get("/")).text
    assert '<link rel="stylesheet" href="/console/console.css">' in page
    style = await ui.client.get("/console/console.css")
    assert style.status_code == 200
    assert style.headers["content-type"] == "text/css; charset=utf-8"
    device_js = (await ui.client.get("/console/device.js")).text
    assert 'from "./common.js"' in device_js
    assert 'import { DEVICE_END_WORDING } from "./end-wording.js"' in device_js
    wording = (await ui.client.get("/console/end-wording.js")).text
    assert wording == end_wording_module()
    assert '"onsite": "ended by the person at the instrument"' in wording
    assert '"engineer": "ended by the engineer"' in wording


@pytest.mark.parametrize(
    "path",
    [
        "/console/index.html",  # the engineers' page is not the device's
        "/console/console.js",
        "/console/tunnel.js",
        "/console/vendor/xterm/xterm.mjs",
        "/console/device.html",
        "/console/../agent_ui.py",
        "/console/%2e%2e/__init__.py",
        "/console/__init__.py",
        "/agent.js",
    ],
)
async def test_only_the_device_pages_files_are_served(ui: UI, path: str) -> None:
    """The agent UI answers the device page's files and nothing else of the package."""
    answer = await ui.client.get(path)
    assert answer.status_code == 404
    assert answer.headers["content-security-policy"] == CSP


def _view() -> OfferView:
    return OfferView(
        session_id="a" * 32,
        engineer="alice",
        engineer_role="engineer",
        reason="ticket 4711 \x1b[2J",
        channels=("shell",),
        refused_channels=("tcp:80",),
        max_seconds=3600,
        grant_deadline_ms=0,
    )


@pytest.mark.parametrize(
    ("typed", "expected"), [(b"maybe\ny\n", True), (b"NO\n", False), (b"", False)]
)
async def test_terminal_prompt(typed: bytes, expected: bool) -> None:
    """The prompt prints the offer without escape sequences and reads y/n."""
    keyboard_send, keyboard = trio.testing.memory_stream_one_way_pair()
    screen, screen_receive = trio.testing.memory_stream_one_way_pair()
    prompt = TerminalPrompt(keyboard, screen)
    async with trio.open_nursery() as nursery:
        result: list[bool] = []

        async def ask() -> None:
            result.append(await prompt.decide(_view()))

        nursery.start_soon(ask)
        if typed:
            await keyboard_send.send_all(typed)
        else:
            await keyboard_send.aclose()
    assert result == [expected]
    output = await screen_receive.receive_some()
    assert b"alice" in output
    assert b"\x1b" not in output
    assert b"tcp:80" in output
