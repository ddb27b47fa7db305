"""The auditors' pages of the console in a real headless Chromium.

A demo engineer runs a real shell session through the console (allowed on the
device page, one command typed, ended), then an auditor, added with ``relay
user add`` to the demo's data dir, finds that session in the Audit view, opens
it, and plays its shell recording back in asciinema-player: the player's
terminal must show the command's output. The page must do it without CSP
violations (the player's terminal emulator is WebAssembly: the console's CSP
allows ``'wasm-unsafe-eval'`` for it) and without console errors. Engineers see
no Audit view, and the audit API refuses them.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlparse

import pyotp
import pytest
from playwright.sync_api import expect

from tests.browser.conftest import Demo, new_page, screenshot
from tests.browser.test_console import (
    DEVICE_ID,
    REASON,
    STEP_MS,
    assert_clean,
    end_reason,
    log_in,
    start_session,
    wait_for_terminal_line,
)

pytestmark = pytest.mark.slow

AUDITOR = "audrey"
#: What the engineer types, and what the shell answers (the arithmetic is the
#: shell's, so the answer is output, not an echo of the typing).
COMMAND = "echo audit-$((6*7))"
OUTPUT = "audit-42"
#: Playback shortens pauses to 2 s; the recorded session is a few seconds long.
PLAYBACK_MS = 60000
_FORBIDDEN = re.compile(r"Failed to load resource: .*status of 403")


@dataclass(frozen=True)
class Auditor:
    username: str
    password: str
    totp_secret: str

    def totp(self) -> str:
        return pyotp.TOTP(self.totp_secret).now()


def add_auditor(demo: Demo) -> Auditor:
    """``relay user add --role auditor`` against the running demo's data dir."""
    env = {**os.environ, "RELAY_DATA_DIR": str(demo.data_dir)}
    env.pop("RELAY_TOTP_SEALING_KEY", None)  # the demo's own key file, as the demo
    password = secrets.token_urlsafe(24)
    added = subprocess.run(
        [
            sys.executable,
            "-m",
            "relay",
            "user",
            "add",
            AUDITOR,
            "--role",
            "auditor",
            "--password-stdin",
            "--json",
        ],
        input=password + "\n",
        capture_output=True,
        text=True,
        env=env,
        cwd=demo.data_dir.parent,
        check=True,
        timeout=60,
    )
    printed = json.loads(added.stdout)
    assert printed["username"] == AUDITOR
    assert printed["role"] == "auditor"
    [secret] = parse_qs(urlparse(printed["otpauth_uri"]).query)["secret"]
    return Auditor(AUDITOR, password, secret)


def log_in_as(page: Any, demo: Demo, auditor: Auditor) -> None:
    page.goto(demo.console_url)
    page.get_by_label("Username").fill(auditor.username)
    page.get_by_label("Password").fill(auditor.password)
    page.get_by_label("Code from your authenticator app").fill(auditor.totp())
    page.get_by_role("button", name="Log in").click()


def run_a_recorded_session(browser: Any, demo: Demo) -> None:
    """The demo engineer opens a shell, runs :data:`COMMAND` and ends the session."""
    console, device = start_session(browser, demo)
    console.locator("#terminal .xterm-helper-textarea").focus()
    console.keyboard.type(COMMAND)
    console.keyboard.press("Enter")
    wait_for_terminal_line(console, OUTPUT)
    console.get_by_role("button", name="End session").click()
    expect(end_reason(console)).to_have_text("Ended by you.", timeout=STEP_MS)
    assert_clean(console)
    assert_clean(device)
    console.context.close()
    device.context.close()


def find_session_with_shell_recording(page: Any) -> Any:
    """Filter the list by the demo instrument until its session shows its shell
    recording (the broker may write the recording just after the end); the
    session's Open button."""
    page.get_by_label("Instrument id", exact=True).fill(DEVICE_ID)
    recordings_column = 7
    deadline = time.monotonic() + STEP_MS / 1000
    while True:
        page.get_by_role("button", name="Show sessions").click()
        expect(page.get_by_role("button", name="Show sessions")).to_be_enabled()
        rows = page.locator("#audit-rows tr")
        if rows.count() == 1:
            cells = rows.first.locator("td")
            if "shell" in cells.nth(recordings_column).inner_text():
                break
        assert time.monotonic() < deadline, page.locator("#audit-summary").inner_text()
        page.wait_for_timeout(250)
    expect(page.locator("#audit-summary")).to_have_text("1 session, newest first.")
    row = page.locator("#audit-rows tr").first
    expect(row.locator("td").nth(1)).to_have_text(DEVICE_ID)
    expect(row.locator("td").nth(3)).to_have_text(REASON)
    expect(row.locator("td").nth(6)).to_have_text("ended by the engineer")
    return page.get_by_role(
        "button", name=re.compile(rf"^Open the session on {DEVICE_ID} by ")
    )


def player_lines(page: Any) -> list[str]:
    """The player's terminal, line by line (the player pads lines with spaces)."""
    text: str = page.locator("#audit-playback .ap-term-text").first.inner_text()
    return [line.rstrip() for line in text.splitlines()]


def test_auditor_finds_the_session_and_plays_it_back(browser: Any, demo: Demo) -> None:
    """An auditor finds a just-ended shell session by its instrument, opens it,
    sees its timeline and receipts, and the player shows the command's output;
    the recording downloads as asciicast."""
    run_a_recorded_session(browser, demo)
    auditor = add_auditor(demo)

    page = new_page(browser)
    log_in_as(page, demo, auditor)
    # An auditor cannot open sessions: the console opens on the audit pages; the
    # header offers the Instruments section too (their monitoring pages, no
    # session buttons: docs/monitoring.md).
    expect(page.get_by_role("heading", name="Audit: remote sessions")).to_be_focused(
        timeout=STEP_MS
    )
    expect(page.locator("#who-name")).to_have_text(f"{AUDITOR} (auditor)")
    sections = page.get_by_role("navigation", name="Console sections")
    expect(sections.get_by_role("button", name="Instruments")).to_have_count(1)
    sections.get_by_role("button", name="Audit", exact=True).click()
    expect(page.get_by_role("heading", name="Audit: remote sessions")).to_be_focused()

    find_session_with_shell_recording(page).click()
    expect(
        page.get_by_role("heading", name=f"Session on {DEVICE_ID}", level=1)
    ).to_be_focused(timeout=STEP_MS)
    facts = page.locator("#audit-facts")
    expect(facts).to_contain_text(REASON)
    expect(facts).to_contain_text(demo.username)
    expect(facts).to_contain_text("ended by the engineer (engineer)")
    timeline = page.locator("#audit-timeline")
    for event in ("session.requested", "session.granted", "session.end"):
        expect(timeline).to_contain_text(event)
    expect(page.locator("#audit-receipt-grant")).not_to_have_text("No receipt.")
    expect(page.locator("#audit-receipt-end")).not_to_have_text("No receipt.")

    # Playback: the player loads the .cast (same origin, the cookie), and its
    # terminal (WebAssembly) shows what the shell answered.
    playback = page.locator("#audit-playback")
    expect(playback.locator(".ap-player")).to_be_visible(timeout=STEP_MS)
    play = playback.get_by_role("button", name="Play").first
    expect(play).to_be_visible(timeout=STEP_MS)
    play.click()
    deadline = time.monotonic() + PLAYBACK_MS / 1000
    while OUTPUT not in player_lines(page):
        assert time.monotonic() < deadline, player_lines(page)
        page.wait_for_timeout(200)
    screenshot(page, "audit-playback")

    # The download link is the same recording, as asciicast.
    download = playback.get_by_role("link", name=re.compile(r"^Download .+\.cast$"))
    href = download.first.get_attribute("href")
    assert href is not None
    assert href.startswith("/api/v1/audit/sessions/")
    answer = page.evaluate(
        "(href) => fetch(href, {credentials: 'same-origin'}).then(async (r) => "
        "({status: r.status, type: r.headers.get('content-type'), text: await r.text()}))",
        href,
    )
    assert answer["status"] == 200
    assert answer["type"].startswith("application/x-asciicast")
    header, *lines = answer["text"].splitlines()
    assert json.loads(header)["version"] == 2
    events = [json.loads(line) for line in lines if line.strip()]
    assert OUTPUT in "".join(data for _t, code, data in events if code == "o")

    page.get_by_role("button", name="Back to the sessions").click()
    expect(page.get_by_role("heading", name="Audit: remote sessions")).to_be_visible()
    expect(
        page.get_by_role(
            "button", name=re.compile(rf"^Open the session on {DEVICE_ID}")
        )
    ).to_be_focused()
    screenshot(page, "audit-list")
    assert_clean(page)


def test_engineers_see_no_audit_pages(browser: Any, demo: Demo) -> None:
    """The demo engineer's console offers no Audit section, and the audit API
    answers their cookie with 403."""
    page = new_page(browser)
    log_in(page, demo)
    expect(page.get_by_role("heading", name="Instruments")).to_be_visible(
        timeout=STEP_MS
    )
    expect(page.get_by_role("button", name="Audit", exact=True)).to_have_count(0)
    expect(page.locator("#nav")).to_be_hidden()
    status = page.evaluate(
        "fetch('/api/v1/audit/sessions', {credentials: 'same-origin'})"
        ".then((answer) => answer.status)"
    )
    assert status == 403
    # The refused fetch above is the only error the page may log.
    page.console_errors[:] = [
        e for e in page.console_errors if not _FORBIDDEN.search(e)
    ]
    assert_clean(page)
