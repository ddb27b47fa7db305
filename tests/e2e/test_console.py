"""The browser console as the engineer listener serves it, against a real broker.

The page and its files (content types, the page's CSP, no path outside the
package's own files), the end wording the pages import, and what the console
reads from the API for a session: ``grant_deadline`` and the device list's
``in_session``, on the HTTP route and on the event feed. The console's
behaviour in a browser is tested in tests/browser/.
"""

from __future__ import annotations

import json
import re
import ssl
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

from relay._trio import engineer_session
from relay._trio.engineer_middleware import CONSOLE_CSP, CSP
from relay.console import DEVICE_ASSETS, ConsoleFiles, end_wording_module
from relay.end_wording import AUDIT_END_WORDING, DEVICE_END_WORDING, END_WORDING
from relay.proto.session import EndReason
from tests.e2e.conftest import LOOPBACK, PKI, RunningBroker, wait_until
from tests.e2e.test_engineer_websockets import _events, _headers
from tests.e2e.test_sessions_broker import fake_device, harness

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[2]
CONSOLE_DIR = Path(str(resources.files("relay.console")))
#: Every asset the console page needs, and what it must be answered as.
EXPECTED_ASSETS = {
    "console.js": "text/javascript; charset=utf-8",
    "tunnel.js": "text/javascript; charset=utf-8",
    "common.js": "text/javascript; charset=utf-8",
    "device.js": "text/javascript; charset=utf-8",
    "end-wording.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
    "vendor/xterm/xterm.mjs": "text/javascript; charset=utf-8",
    "vendor/xterm/xterm.css": "text/css; charset=utf-8",
    "vendor/xterm/LICENSE": "text/plain; charset=utf-8",
    "vendor/addon-fit/addon-fit.mjs": "text/javascript; charset=utf-8",
    "vendor/addon-fit/LICENSE": "text/plain; charset=utf-8",
    "audit.js": "text/javascript; charset=utf-8",
    "vendor/asciinema-player/index.js": "text/javascript; charset=utf-8",
    "vendor/asciinema-player/core-BMGzPqRb.js": "text/javascript; charset=utf-8",
    "vendor/asciinema-player/opts-flwsQGx_.js": "text/javascript; charset=utf-8",
    "vendor/asciinema-player/logging-CQ2B4GZY.js": "text/javascript; charset=utf-8",
    "vendor/asciinema-player/asciinema-player.css": "text/css; charset=utf-8",
    "vendor/asciinema-player/LICENSE": "text/plain; charset=utf-8",
    "vendor/asciinema-player/solid-js/LICENSE": "text/plain; charset=utf-8",
    "monitoring.js": "text/javascript; charset=utf-8",
    "vendor/uplot/uPlot.esm.js": "text/javascript; charset=utf-8",
    "vendor/uplot/uPlot.min.css": "text/css; charset=utf-8",
    "vendor/uplot/LICENSE": "text/plain; charset=utf-8",
}
# The player's chunks: the refresh script copies them in a loop, found by
# following index.js's imports (their names change with each release).
_PLAYER_CHUNKS = {
    name
    for name in EXPECTED_ASSETS
    if name.startswith("vendor/asciinema-player/") and name.endswith(".js")
}


# --- the page and its files ---------------------------------------------------------


async def test_console_page_is_served_with_its_policy(
    client: httpx.AsyncClient,
) -> None:
    """GET / is the console page, without a login, under the console's CSP: scripts
    from the listener only, no inline script or style in the page itself."""
    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers.get_list("content-security-policy") == [CONSOLE_CSP]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
    html = page.text
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts == ['<script type="module" src="/console/console.js">']
    assert "<script>" not in html
    assert "style=" not in html
    assert "<style" not in html
    assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers
    for linked in re.findall(r'(?:src|href)="(/[^"]*)"', html):
        assert (await client.get(linked)).status_code == 200, linked


def test_console_policy_relaxes_styles_and_wasm_only() -> None:
    """The console's CSP is the listener's with style-src added (xterm's own
    <style> elements), WebAssembly compilation allowed (the player's terminal)
    and form-action 'none'; scripts still come from the listener only."""
    directives = dict(part.split(" ", 1) for part in CONSOLE_CSP.split("; "))
    strict = dict(part.split(" ", 1) for part in CSP.split("; "))
    assert directives.pop("style-src") == "'self' 'unsafe-inline'"
    assert directives.pop("form-action") == "'none'"
    assert directives.pop("script-src") == "'self' 'wasm-unsafe-eval'"
    assert strict.pop("script-src") == "'self'"
    assert directives == strict


async def test_every_asset_is_served_with_its_type(client: httpx.AsyncClient) -> None:
    """Each file the pages load answers 200 with its content type, nosniff, the
    strict CSP and an ETag; a request with that ETag is answered 304."""
    assert ConsoleFiles().asset_names() == set(EXPECTED_ASSETS)
    for name, content_type in EXPECTED_ASSETS.items():
        answer = await client.get(f"/console/{name}")
        assert answer.status_code == 200, name
        assert answer.headers["content-type"] == content_type, name
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["content-security-policy"] == CSP
        assert answer.headers["cache-control"] == "no-cache"
        if name != "end-wording.js":
            assert answer.content == (CONSOLE_DIR / name).read_bytes(), name
        again = await client.get(
            f"/console/{name}", headers={"If-None-Match": answer.headers["etag"]}
        )
        assert again.status_code == 304, name
        assert again.content == b""


@pytest.mark.parametrize(
    "path",
    [
        "/console/nope.js",
        "/console/",
        "/console/vendor",
        "/console/vendor/xterm/",
        "/console/index.html",  # pages only at their own route, with their CSP
        "/console/device.html",
        "/console/__init__.py",
        "/console/%2e%2e/__init__.py",
        "/console/..%2f__init__.py",
        "/console/%2e%2e%2f%2e%2e%2fcli.py",
        "/console//etc/passwd",
        "/console/%2fetc%2fpasswd",
        "/console/vendor/xterm/xterm.mjs.map",
        "/console/CONSOLE.JS",
    ],
)
async def test_unknown_files_and_traversal_attempts_are_404(
    client: httpx.AsyncClient, path: str
) -> None:
    """Only the files the package holds are answered: anything else is 404, with
    the listener's headers."""
    answer = await client.get(path)
    assert answer.status_code == 404
    assert answer.headers["content-security-policy"] == CSP
    assert answer.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(
    "target",
    [
        b"/console/../relay/cli.py",
        b"/console/../../pyproject.toml",
        b"/console/vendor/../__init__.py",
        b"/console/./__init__.py",
    ],
)
async def test_raw_dot_segments_find_nothing(
    broker: RunningBroker, pki: PKI, target: bytes
) -> None:
    """Dot segments sent as they are (no client normalises them away) reach no file."""
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    stream = await trio.open_ssl_over_tcp_stream(
        LOOPBACK, broker.ports.engineer, ssl_context=context, https_compatible=True
    )
    async with stream:
        request = (
            b"GET " + target + b" HTTP/1.1\r\nHost: " + LOOPBACK.encode() + b"\r\n"
            b"Connection: close\r\n\r\n"
        )
        await stream.send_all(request)
        answer = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some():
                answer += chunk
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line in (b"HTTP/1.1 404 ", b"HTTP/1.1 400 "), status_line
    assert b"import" not in answer


def test_every_file_of_the_package_is_answered_somewhere() -> None:
    """No file in relay/console is silently left out: each is a page or an asset,
    and each vendored package ships its licence."""
    files = {
        path.relative_to(CONSOLE_DIR).as_posix()
        for path in CONSOLE_DIR.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    files.discard("__init__.py")
    assert files == (set(EXPECTED_ASSETS) - {"end-wording.js"}) | {
        "index.html",
        "device.html",
    }
    assert ConsoleFiles(assets=DEVICE_ASSETS).asset_names() == DEVICE_ASSETS


def test_vendored_terminal_is_pinned() -> None:
    """scripts/vendor pins exact versions, its lock file agrees, and the refresh
    script copies every vendored file."""
    package = json.loads((PROJECT / "scripts/vendor/package.json").read_text())
    lock = json.loads((PROJECT / "scripts/vendor/package-lock.json").read_text())
    pins = package["dependencies"]
    assert set(pins) == {
        "@xterm/xterm",
        "@xterm/addon-fit",
        "asciinema-player",
        "uplot",
    }
    assert pins["@xterm/xterm"].startswith("6.")
    assert pins["uplot"].startswith("1.")
    assert pins["asciinema-player"].startswith("3.")
    for name, version in pins.items():
        assert re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+", version), (name, version)
        locked = lock["packages"][f"node_modules/{name}"]
        assert locked["version"] == version
        assert locked["integrity"].startswith("sha512-")
    script = (PROJECT / "scripts/refresh-vendor").read_text()
    assert "npm ci" in script
    assert '"$target/asciinema-player/$chunk"' in script
    for name in EXPECTED_ASSETS:
        if name.startswith("vendor/") and name not in _PLAYER_CHUNKS:
            assert f'"$target/{name.removeprefix("vendor/")}"' in script, name


# --- the end wording ------------------------------------------------------------------


def _wording_tables(module: str) -> dict[str, dict[str, str]]:
    tables: dict[str, dict[str, str]] = {}
    for match in re.finditer(
        r"export const (\w+) = Object\.freeze\((\{.*?\})\);", module, re.DOTALL
    ):
        tables[match.group(1)] = json.loads(match.group(2))
    return tables


async def test_served_end_wording_is_the_python_table(
    client: httpx.AsyncClient,
) -> None:
    """end-wording.js says every end reason exactly as relay.end_wording does,
    which is the table the CLI prints from."""
    answer = await client.get("/console/end-wording.js")
    assert answer.text == end_wording_module()
    tables = _wording_tables(answer.text)
    assert tables == {
        "END_WORDING": dict(END_WORDING),
        "DEVICE_END_WORDING": dict(DEVICE_END_WORDING),
        "AUDIT_END_WORDING": dict(AUDIT_END_WORDING),
    }
    assert set(AUDIT_END_WORDING) == {reason.value for reason in EndReason} | {
        "broker_crash"
    }
    reasons = {reason.value for reason in EndReason}
    assert set(END_WORDING) == set(DEVICE_END_WORDING) == reasons
    assert engineer_session.END_WORDING is END_WORDING
    assert END_WORDING["onsite"] == "ended by the person at the instrument"
    assert END_WORDING["time_cap"] == "one-hour limit reached"
    assert END_WORDING["grant_timeout"] == "no answer at the instrument"


# --- what the console reads from the API -----------------------------------------------


async def test_session_view_has_the_grant_deadline(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """GET /api/v1/sessions/{id} answers grant_deadline, the request time plus the
    grant timeout, before and after the end."""
    async with harness(pki, nursery, grant_timeout_s=5.0) as h, fake_device(h) as dev:
        before = datetime.now(UTC)
        response = await h.request(channels=["shell"])
        assert response.status_code == 201
        session_id = response.json()["session_id"]
        await dev.next_event()  # the offer
        path = f"/api/v1/sessions/{session_id}"
        view = (await h.api.get(path, headers=h.headers())).json()
        deadline = datetime.fromisoformat(view["grant_deadline"])
        expected = before + timedelta(seconds=5)
        assert abs(deadline - expected) < timedelta(seconds=1)
        assert view["granted_at"] is None
        ended = await h.api.delete(path, headers=h.headers())
        assert ended.json()["grant_deadline"] == view["grant_deadline"]
        assert ended.json()["end_reason"] == "cancelled"


async def _device_on_feed(
    ws: trio_websocket.WebSocketConnection, device_id: str, **wanted: Any
) -> None:
    """Read the feed until *device_id* shows the *wanted* fields."""
    with trio.fail_after(5):
        while True:
            message = json.loads(await ws.get_message())
            assert message["type"] == "devices"
            found = [d for d in message["devices"] if d["device_id"] == device_id]
            if found and all(found[0][k] == v for k, v in wanted.items()):
                return


async def test_in_session_on_the_device_list_and_the_feed(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """A device is in_session from the request until the end; the event feed
    pushes both changes and GET /api/v1/devices agrees."""
    async with (
        harness(pki, nursery) as h,
        fake_device(h) as dev,
        _events(pki, h.broker.ports.engineer, _headers(token=h.token)) as feed,
    ):
        device_id = dev.device_id

        async def listed() -> dict[str, Any]:
            devices = (await h.api.get("/api/v1/devices", headers=h.headers())).json()
            [device] = [d for d in devices if d["device_id"] == device_id]
            return dict(device)

        await _device_on_feed(feed, device_id, online=True, in_session=False)
        assert (await listed())["in_session"] is False
        response = await h.request(channels=["shell"])
        session_id = response.json()["session_id"]
        await dev.next_event()  # the offer
        assert h.sessions.device_in_session(device_id)
        await _device_on_feed(feed, device_id, in_session=True)
        assert (await listed())["in_session"] is True
        await h.api.delete(f"/api/v1/sessions/{session_id}", headers=h.headers())
        await wait_until(lambda: not h.sessions.device_in_session(device_id))
        await _device_on_feed(feed, device_id, in_session=False)
        assert (await listed())["in_session"] is False
