"""The engineers' console and the device page in a real headless Chromium.

Each test runs ``relay demo`` (broker, one simulated instrument and its device
page) in a subprocess and drives two browser contexts: the engineer's console
and the device page (the instrument's touchscreen stand-in). Every page must
finish without CSP violations and without console errors other than the
answers a test provokes on purpose (the 401 of a wrong login, the 401 of the
first ``GET /api/v1/me`` before anybody logged in). Each end state is saved
as a screenshot artifact.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from relay.proto import tunnel
from relay.proto.errors import RemoteProtocolError
from tests.browser.conftest import Demo, new_page, screenshot

pytestmark = pytest.mark.slow

DEVICE_ID = "demo-0001"
REASON = "ticket 4711: conductivity alarm"
#: Invariant 3: the engineer is told of the on-site End within 2 s.
ONSITE_END_BUDGET_MS = 2000
#: How long a page may take to show what it is waiting for (polls, start-up).
STEP_MS = 15000
#: Errors a test provokes on purpose: a refused login, and the first
#: GET /api/v1/me before anybody is logged in.
_EXPECTED_ERRORS = re.compile(r"Failed to load resource: .*status of 401")


def assert_clean(page: Any) -> None:
    """No CSP violation, no console error the test did not provoke."""
    assert page.csp_violations == []
    unexpected = [e for e in page.console_errors if not _EXPECTED_ERRORS.search(e)]
    assert unexpected == []


def log_in(console: Any, demo: Demo, *, code: str | None = None) -> None:
    console.goto(demo.console_url)
    console.get_by_label("Username").fill(demo.username)
    console.get_by_label("Password").fill(demo.password)
    console.get_by_label("Code from your authenticator app").fill(code or demo.totp())
    console.get_by_role("button", name="Log in").click()


def request_shell(console: Any) -> None:
    """From the instrument list, ask for a shell on the demo device."""
    request = console.get_by_role("button", name=f"Request a session on {DEVICE_ID}")
    expect(request).to_be_enabled(timeout=STEP_MS)
    request.click()
    console.get_by_label("Reason").fill(REASON)
    console.get_by_role("button", name="Request session", exact=True).click()
    expect(
        console.get_by_text("Waiting for the person at the instrument to allow access")
    ).to_be_visible()


def open_device_page(browser: Any, demo: Demo) -> Any:
    device = new_page(browser)
    device.goto(demo.device_page_url)
    expect(device.get_by_role("heading", name="No remote session")).to_be_visible()
    return device


def offered(browser: Any, demo: Demo, **console_options: Any) -> tuple[Any, Any]:
    """Log in, ask for a shell, and wait for the offer on the device page:
    (console, device page)."""
    console = new_page(browser, **console_options)
    console.websocket_urls = []
    console.on("websocket", lambda socket: console.websocket_urls.append(socket.url))
    device = open_device_page(browser, demo)
    log_in(console, demo)
    request_shell(console)
    expect(device.get_by_role("heading", name="Remote access requested")).to_be_visible(
        timeout=STEP_MS
    )
    expect(device.locator("#offer-reason")).to_have_text(REASON)
    return console, device


def terminal_lines(console: Any) -> list[str]:
    text: str = console.locator("#terminal .xterm-rows").inner_text()
    return [line.rstrip() for line in text.splitlines()]


def wait_for_terminal_line(console: Any, wanted: str) -> None:
    deadline = time.monotonic() + STEP_MS / 1000
    while wanted not in terminal_lines(console):
        assert time.monotonic() < deadline, terminal_lines(console)
        console.wait_for_timeout(100)


def terminal_size(console: Any, tag: str) -> tuple[int, int]:
    """(rows, cols) as the shell on the instrument sees them (``stty size``)."""
    console.locator("#terminal .xterm-helper-textarea").focus()
    console.keyboard.type(f"clear; echo {tag}-$(stty size | tr ' ' x)")
    console.keyboard.press("Enter")
    deadline = time.monotonic() + STEP_MS / 1000
    while True:
        for line in terminal_lines(console):
            if match := re.fullmatch(rf"{tag}-(\d+)x(\d+)", line):
                return int(match[1]), int(match[2])
        assert time.monotonic() < deadline, terminal_lines(console)
        console.wait_for_timeout(100)


def end_reason(console: Any) -> Any:
    return console.locator("#end-reason")


def start_session(browser: Any, demo: Demo) -> tuple[Any, Any]:
    """Log in, request a shell and allow it: (console, device page), shell open."""
    console, device = offered(
        browser, demo, permissions=["clipboard-read", "clipboard-write"]
    )
    device.get_by_role("button", name="Allow").click()
    expect(console.get_by_text("Connected to the instrument's shell.")).to_be_visible(
        timeout=STEP_MS
    )
    expect(console.get_by_role("button", name="End session")).to_be_visible()
    expect(console.locator("#time-left")).to_have_text(re.compile(r"^\d+:\d\d$"))
    return console, device


# --- the whole flow -------------------------------------------------------------------


def test_engineer_reaches_the_shell_and_the_onsite_end_is_shown(
    browser: Any, demo: Demo
) -> None:
    """Log in with a computed TOTP, request a shell, Allow on the device page, run
    a command, then End on the device page: the console says why within 2 s."""
    console, device = start_session(browser, demo)
    expect(
        device.get_by_role("heading", name="Remote session in progress")
    ).to_be_visible(timeout=STEP_MS)
    expect(device.locator("#session-countdown")).to_have_text(re.compile(r"^\d+:\d\d$"))
    console.locator("#terminal .xterm-helper-textarea").focus()
    console.keyboard.type("echo console-ok")
    console.keyboard.press("Enter")
    wait_for_terminal_line(console, "console-ok")
    screenshot(console, "console-terminal")
    screenshot(device, "device-session")
    # The login lives in the HttpOnly cookie only: nothing stored, nothing in a URL.
    assert console.evaluate("localStorage.length + sessionStorage.length") == 0
    assert console.evaluate("document.cookie") == ""
    fetched = console.evaluate(
        "performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert [url for url in fetched + console.websocket_urls if "?" in url] == []
    assert any(url.endswith("/attach") for url in console.websocket_urls)
    assert any(url.endswith("/api/v1/events") for url in console.websocket_urls)

    device.get_by_role("button", name="End session").click()
    expect(end_reason(console)).to_have_text(
        "Ended by the person at the instrument.", timeout=ONSITE_END_BUDGET_MS
    )
    expect(console.get_by_role("heading", name="Session ended")).to_be_focused()
    expect(console.get_by_role("button", name="End session")).to_be_hidden()
    # The last output stays readable; typing goes nowhere.
    assert "console-ok" in terminal_lines(console)
    expect(device.locator("#last-end")).to_have_text(
        "Last session: ended by the person at the instrument.", timeout=STEP_MS
    )
    screenshot(console, "console-end-onsite")
    screenshot(device, "device-end-onsite")
    console.get_by_role("button", name="Back to the instruments").click()
    expect(console.get_by_role("heading", name="Instruments")).to_be_visible()
    assert_clean(console)
    assert_clean(device)


def test_engineer_ends_copies_and_pastes_and_logs_out(browser: Any, demo: Demo) -> None:
    """Paste reaches the shell, Ctrl+Shift+C copies the selection, output beyond
    the first window flows (credit goes back), UTF-8 split anywhere shows right,
    the terminal follows the window's size, End (from the keyboard) says "ended
    by you", and Logout goes back to the login form."""
    console, device = start_session(browser, demo)
    textarea = console.locator("#terminal .xterm-helper-textarea")
    textarea.focus()
    # A paste event as the browser fires it (context menu, Ctrl+Shift+V).
    textarea.evaluate(
        """(area) => {
            const data = new DataTransfer();
            data.setData("text/plain", "echo pasted-$((40 + 2))");
            area.dispatchEvent(new ClipboardEvent("paste", {clipboardData: data, bubbles: true}));
        }"""
    )
    console.keyboard.press("Enter")
    wait_for_terminal_line(console, "pasted-42")
    console.locator("#terminal .xterm-screen").dblclick(position={"x": 20, "y": 8})
    console.keyboard.press("Control+Shift+C")
    copied = console.evaluate("navigator.clipboard.readText()")
    assert copied.strip() != ""
    assert copied in "\n".join(terminal_lines(console))

    # More output than the first window (256 KiB): credit must flow back.
    textarea.focus()
    console.keyboard.type("seq 1 60000; printf 'flow-\\342\\202\\254-%d\\n' 42")
    console.keyboard.press("Enter")
    wait_for_terminal_line(console, "flow-\u20ac-42")

    rows_before, cols_before = terminal_size(console, "before")
    console.set_viewport_size({"width": 700, "height": 500})
    rows_after, cols_after = terminal_size(console, "after")
    assert 0 < cols_after < cols_before
    assert 0 < rows_after < rows_before

    # Tab belongs to the shell; Ctrl+Shift+E leaves the terminal for End.
    textarea.focus()
    console.keyboard.press("Control+Shift+E")
    expect(console.get_by_role("button", name="End session")).to_be_focused()
    console.keyboard.press("Enter")
    expect(end_reason(console)).to_have_text("Ended by you.", timeout=STEP_MS)
    expect(device.locator("#last-end")).to_have_text(
        "Last session: ended by the engineer.", timeout=STEP_MS
    )
    screenshot(console, "console-end-engineer")
    console.get_by_role("button", name="Log out").click()
    expect(console.get_by_role("heading", name="Log in")).to_be_visible()
    # The cookie is gone with the login: a reload shows the login form again.
    console.reload()
    expect(console.get_by_role("heading", name="Log in")).to_be_visible(timeout=STEP_MS)
    assert_clean(console)
    assert_clean(device)


# --- how a session can end before it starts, and the cap -----------------------------


def test_wrong_totp_is_refused_with_one_message(browser: Any, demo: Demo) -> None:
    """A wrong code is answered like any wrong credential."""
    console = new_page(browser)
    code = demo.totp()
    wrong = f"{(int(code) + 500_000) % 1_000_000:06d}"
    log_in(console, demo, code=wrong)
    expect(console.get_by_role("alert")).to_have_text(
        "Wrong username, password or code."
    )
    expect(console.get_by_label("Code from your authenticator app")).to_have_value("")
    screenshot(console, "console-wrong-totp")
    assert_clean(console)


def test_repeated_failures_say_how_long_to_wait(browser: Any, demo: Demo) -> None:
    """After the free failures the login throttle answers 429: the page says how
    long to wait instead of checking the password."""
    console = new_page(browser)
    console.goto(demo.console_url)
    alert = console.get_by_role("alert")
    button = console.get_by_role("button", name="Log in")
    for _attempt in range(6):
        console.get_by_label("Username").fill(demo.username)
        console.get_by_label("Password").fill("not the password")
        console.get_by_label("Code from your authenticator app").fill("000000")
        button.click()
        expect(button).to_be_enabled(timeout=STEP_MS)
        expect(alert).not_to_be_empty()
        if "Too many attempts" in alert.inner_text():
            break
    expect(alert).to_have_text(
        re.compile(r"^Too many attempts\. Wait \d+ seconds? before trying again\.$")
    )
    screenshot(console, "console-throttled")
    throttled = re.compile(r"Failed to load resource: .*status of 429")
    console.console_errors[:] = [
        e for e in console.console_errors if not throttled.search(e)
    ]
    assert_clean(console)


def test_deny_on_the_device_page_is_shown(browser: Any, demo: Demo) -> None:
    """Deny on the touchscreen ends the request; the console says so."""
    console, device = offered(browser, demo)
    screenshot(console, "console-waiting")
    screenshot(device, "device-offer")
    device.get_by_role("button", name="Deny").click()
    expect(end_reason(console)).to_have_text(
        "Denied by the person at the instrument.", timeout=STEP_MS
    )
    expect(console.locator("#terminal")).to_be_hidden()
    expect(device.locator("#last-end")).to_have_text(
        "Last request: denied by the person at the instrument.", timeout=STEP_MS
    )
    screenshot(console, "console-end-denied")
    screenshot(device, "device-end-denied")
    assert_clean(console)
    assert_clean(device)


def test_no_answer_at_the_instrument(
    browser: Any, demo_with: Callable[..., Demo]
) -> None:
    """Nobody answers within the grant timeout: the request counts as denied, and
    the waiting view counted the deadline down."""
    demo = demo_with(grant_timeout_seconds=3)
    console = new_page(browser)
    log_in(console, demo)
    request_shell(console)
    expect(console.locator("#grant-countdown")).to_have_text(re.compile(r"^0:0[0-3]$"))
    expect(end_reason(console)).to_have_text(
        "No answer at the instrument.", timeout=STEP_MS
    )
    screenshot(console, "console-end-no-answer")
    assert_clean(console)


def test_cancel_while_waiting(browser: Any, demo: Demo) -> None:
    """Cancel withdraws the request; the device page's offer goes away."""
    console, device = offered(browser, demo)
    console.get_by_role("button", name="Cancel request").click()
    expect(end_reason(console)).to_have_text("Request withdrawn.", timeout=STEP_MS)
    expect(device.get_by_role("heading", name="No remote session")).to_be_visible(
        timeout=STEP_MS
    )
    expect(device.locator("#last-end")).to_have_text(
        "Last request: withdrawn, or not answered in time."
    )
    assert_clean(console)
    assert_clean(device)


def test_the_cap_ends_the_session(browser: Any, demo_with: Callable[..., Demo]) -> None:
    """With a 5 s cap the session ends on its own, with the cap's wording."""
    demo = demo_with(max_session_seconds=5)
    console, device = start_session(browser, demo)
    expect(end_reason(console)).to_have_text("One-hour limit reached.", timeout=STEP_MS)
    screenshot(console, "console-end-time-cap")
    expect(device.locator("#last-end")).to_contain_text(
        "Last session:", timeout=STEP_MS
    )
    screenshot(device, "device-end-time-cap")
    assert_clean(console)
    assert_clean(device)


def test_the_one_minute_warning_is_shown_on_both_sides(
    browser: Any, demo_with: Callable[..., Demo]
) -> None:
    """With a 65 s cap the T-1 min warning comes 5 s after the grant (T-10 min is
    already past and skipped): the console and the device page both show it."""
    demo = demo_with(max_session_seconds=65)
    console, device = start_session(browser, demo)
    warning = "1 min left in this session. It ends on its own at the limit."
    expect(console.get_by_role("alert")).to_have_text(warning, timeout=STEP_MS)
    expect(device.get_by_role("alert")).to_have_text(warning, timeout=STEP_MS)
    screenshot(console, "console-warning")
    screenshot(device, "device-warning")
    console.get_by_role("button", name="End session").click()
    expect(end_reason(console)).to_have_text("Ended by you.", timeout=STEP_MS)
    expect(console.get_by_role("alert")).to_be_hidden()
    assert_clean(console)
    assert_clean(device)


# --- security -------------------------------------------------------------------------------


_FOREIGN_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>somebody else's page</title>
<script src="foreign.js" defer></script></head>
<body><p id="result">pending</p></body></html>
"""
_FOREIGN_SCRIPT = """
const result = document.getElementById("result");
const socket = new WebSocket(decodeURIComponent(location.hash.slice(1)));
socket.onopen = () => { result.textContent = "opened"; };
socket.onclose = (event) => {
  if (result.textContent !== "opened") result.textContent = "refused " + event.code;
};
"""


@pytest.fixture
def foreign_site(tmp_path: Path) -> Iterator[str]:
    """Another origin on this machine: a tiny page served by http.server."""
    root = tmp_path / "foreign"
    root.mkdir()
    (root / "index.html").write_text(_FOREIGN_PAGE)
    (root / "foreign.js").write_text(_FOREIGN_SCRIPT)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(Quiet, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _metric(demo: Demo, name: str, **labels: str) -> float:
    [url] = [
        m.group(1)
        for line in demo.output
        if (m := re.match(r"^  metrics\s+(http://\S+/metrics)", line))
    ]
    with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 - our own
        text = answer.read().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.split()[-1])
    return 0.0


def test_a_foreign_origin_cannot_open_the_attach_socket(
    browser: Any, demo: Demo, foreign_site: str
) -> None:
    """A page of another origin, in the browser of a logged-in engineer with a
    live session, cannot open that session's attach socket: the broker refuses
    the Origin."""
    console, device = start_session(browser, demo)
    session_id = console.evaluate(
        "performance.getEntriesByType('resource').map(e => e.name)"
        ".find(n => /\\/api\\/v1\\/sessions\\/[0-9a-f]{32}$/.test(n))"
    ).rsplit("/", 1)[1]
    attach = demo.console_url.replace("https://", "wss://") + (
        f"api/v1/sessions/{session_id}/attach"
    )
    refused_before = _metric(demo, "relay_engineer_refusals_total", reason="bad_origin")
    foreign = console.context.new_page()  # same browser, same cookies
    foreign.goto(foreign_site + "#" + attach)
    expect(foreign.locator("#result")).to_have_text("refused 1006", timeout=STEP_MS)
    refused_after = _metric(demo, "relay_engineer_refusals_total", reason="bad_origin")
    assert refused_after == refused_before + 1
    # The engineer's own session goes on.
    console.locator("#terminal .xterm-helper-textarea").focus()
    console.keyboard.type("echo still-mine")
    console.keyboard.press("Enter")
    wait_for_terminal_line(console, "still-mine")
    assert_clean(console)
    assert_clean(device)


# --- keyboard, narrow window -------------------------------------------------------------------


def test_keyboard_only_on_a_narrow_window(browser: Any, demo: Demo) -> None:
    """At 400 px the login and the instrument list fit without sideways scrolling,
    and a keyboard alone logs in, filters (by id and by label) and opens the
    request form."""
    labelled = subprocess.run(
        [sys.executable, "-m", "relay", "device", "label", DEVICE_ID, "site=lyon-2"],
        env={**os.environ, "RELAY_DATA_DIR": str(demo.data_dir)},
        cwd=demo.data_dir.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert labelled.returncode == 0, labelled.stderr
    console = new_page(browser)
    console.set_viewport_size({"width": 400, "height": 800})
    console.goto(demo.console_url)
    expect(console.get_by_label("Username")).to_be_focused(timeout=STEP_MS)
    console.keyboard.type(demo.username)
    console.keyboard.press("Tab")
    console.keyboard.type(demo.password)
    console.keyboard.press("Tab")
    console.keyboard.type(demo.totp())
    console.keyboard.press("Enter")
    expect(console.get_by_role("heading", name="Instruments")).to_be_focused(
        timeout=STEP_MS
    )
    fits = "document.documentElement.scrollWidth <= window.innerWidth"
    assert console.evaluate(fits)
    console.keyboard.press("Tab")
    expect(console.get_by_label("Filter by instrument id")).to_be_focused()
    console.keyboard.type("no-such-id")
    expect(console.locator("#devices-summary")).to_contain_text("No instrument id")
    console.keyboard.press("Control+A")
    console.keyboard.type("site=lyon")  # a label finds the instrument too
    expect(console.locator("#devices .badge.label")).to_have_text("site=lyon-2")
    console.keyboard.press("Control+A")
    console.keyboard.type("demo")
    request = console.get_by_role("button", name=f"Request a session on {DEVICE_ID}")
    expect(request).to_be_enabled(timeout=STEP_MS)
    console.keyboard.press("Tab")
    expect(request).to_be_focused()
    console.keyboard.press("Enter")
    expect(console.get_by_label("Reason")).to_be_focused()
    outline = console.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"
    assert console.evaluate(fits)
    screenshot(console, "console-narrow-request")
    assert_clean(console)


# --- the browser's codec against the Python one ---------------------------------------------


_FRAMES = [
    tunnel.StreamOpen(stream_id=1, channel="shell", cols=80, rows=24),
    tunnel.StreamOpen(stream_id=3, channel="tcp:443"),
    tunnel.StreamOpenOk(stream_id=1),
    tunnel.StreamOpenFail(
        stream_id=5, code=tunnel.OpenFailCode.NO_PTY, reason="no pty, désolé"
    ),
    tunnel.StreamData(stream_id=1, payload=bytes(range(256)) * 4),
    tunnel.StreamData(stream_id=1, payload=b"\xff" * tunnel.MAX_DATA_BYTES),
    tunnel.StreamWindow(stream_id=1, credit=tunnel.MAX_WINDOW_BYTES),
    tunnel.StreamEof(stream_id=7),
    tunnel.StreamClose(stream_id=1, code=tunnel.StreamCloseCode.ABORTED),
    tunnel.StreamResize(stream_id=1, cols=1000, rows=1),
]
_MALFORMED = [
    b"",
    b"\x02\x00\x00\x00",  # short header
    b"\x09\x00\x00\x00\x01",  # unknown type
    b"\x02\x00\x00\x00\x02",  # even stream id
    b"\x02\x00\x00\x00\x01\x00",  # trailing byte
    b"\x04\x00\x00\x00\x01",  # DATA without payload
    b"\x05\x00\x00\x00\x01\x00\x00\x00\x00",  # WINDOW of 0
    b"\x07\x00\x00\x00\x01\x00\x09",  # unknown CLOSE code
    b"\x08\x00\x00\x00\x01\x00\x00\x00\x18",  # RESIZE to 0 columns
    b"\x01\x00\x00\x00\x01\x00\x50\x00\x18bash",  # unknown channel
    b"\x01\x00\x00\x00\x01\x00\x50\x00\x18tcp:443",  # tcp with a size
    b"\x03\x00\x00\x00\x01\x00\x01\x1b[2J",  # reason with ESC
    b"\x03\x00\x00\x00\x01\x00\x01\xff",  # reason not UTF-8
    b"\x04\x00\x00\x00\x01" + b"x" * (tunnel.MAX_DATA_BYTES + 1),  # too big
]
_CODEC_SCRIPT = """async ([frames, malformed]) => {
  const codec = await import("/console/tunnel.js");
  const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  const unhex = (text) => Uint8Array.from(text.match(/../g) ?? [], (h) => parseInt(h, 16));
  const decoded = frames.map((wire) => {
    const frame = codec.decode(unhex(wire));
    if (frame.payload) frame.payload = hex(frame.payload);
    return frame;
  });
  const encoded = decoded.map((frame) => {
    const copy = {...frame};
    if (copy.payload) copy.payload = unhex(copy.payload);
    return hex(codec.encode(copy));
  });
  const refused = malformed.map((wire) => {
    try { codec.decode(unhex(wire)); return false; }
    catch (error) { return error instanceof codec.TunnelError; }
  });
  return {decoded, encoded, refused};
}"""


def test_the_console_codec_is_the_python_codec(browser: Any, demo: Demo) -> None:
    """tunnel.js decodes what relay.proto.tunnel encodes into the same fields,
    encodes them back to the same bytes, and refuses what Python refuses."""
    for data in _MALFORMED:
        with pytest.raises(RemoteProtocolError):
            tunnel.decode(data)
    page = new_page(browser)
    page.goto(demo.console_url)
    result = page.evaluate(
        _CODEC_SCRIPT,
        [[tunnel.encode(f).hex() for f in _FRAMES], [m.hex() for m in _MALFORMED]],
    )
    assert result["encoded"] == [tunnel.encode(f).hex() for f in _FRAMES]
    assert result["refused"] == [True] * len(_MALFORMED)
    for frame, seen in zip(_FRAMES, result["decoded"], strict=True):
        expected: dict[str, Any] = {
            "type": int(frame.TYPE),
            "streamId": frame.stream_id,
        }
        for name in ("channel", "cols", "rows", "code", "reason", "credit"):
            if hasattr(frame, name):
                expected[name] = (
                    int(value)
                    if isinstance(value := getattr(frame, name), int)
                    else value
                )
        if isinstance(frame, tunnel.StreamData):
            expected["payload"] = frame.payload.hex()
        assert seen == expected, json.dumps(seen)[:200]
    assert_clean(page)
