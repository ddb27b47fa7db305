"""Browser tests: a real ``relay demo`` in a subprocess, driven by Debian's Chromium.

The tests here are plain synchronous functions. Playwright's sync API runs its
own event loop, which cannot share a thread with trio's, so the system under
test is exactly what a newcomer starts: ``relay demo`` (broker, one simulated
device and its device page) in a subprocess on free ports, with a fresh data
dir. The demo prints its addresses and the demo engineer's credentials; the
fixture reads them from there, so the printed credentials are tested too.

Chromium is Debian's (``/usr/bin/chromium``, installed by ``.ci/run``), headless,
without the sandbox (CI runs as root) and without background networking. The
listener certificate is signed by the demo's own CA, which the browser does not
know: contexts ignore HTTPS errors (the TLS itself is real). Pages record
console errors and CSP violations, so a test can require that there were none.
Screenshots go to ``$RELAY_TEST_ARTIFACTS`` (default ``test-artifacts/``, not
committed).
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyotp
import pytest
from playwright.sync_api import sync_playwright

from tests.cli.lines import LineReader
from tests.cli.listen import ALL_ON_PORT_ZERO

CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None
)
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
ARTIFACTS = Path(os.environ.get("RELAY_TEST_ARTIFACTS", "test-artifacts"))

# What `relay demo` prints (see relay/cli.py cmd_demo).
_CONSOLE = re.compile(r"^  engineer listener  (https://127\.0\.0\.1:\d+/)")
_DEVICE_PAGE = re.compile(r"^  device page        (http://127\.0\.0\.1:\d+/)")
_PASSWORD = re.compile(r"^  demo engineer      user (\S+), password (\S+)")
_SECRET = re.compile(r"TOTP secret ([A-Z2-7]+)")
_READY = "Press Ctrl-C to stop."


@dataclass
class Demo:
    """A running ``relay demo`` and what it printed."""

    process: subprocess.Popen[str]
    data_dir: Path
    console_url: str = ""
    device_page_url: str = ""
    username: str = ""
    password: str = ""
    totp_secret: str = ""
    output: list[str] = field(default_factory=list)
    reader: LineReader | None = None

    def totp(self) -> str:
        """A code for the demo engineer that no login of this demo used yet.

        A code is accepted once per 30 s step; a second login in the same step
        waits for the next one.
        """
        totp = pyotp.TOTP(self.totp_secret)
        code = totp.now()
        if getattr(self, "_last_code", None) == code:
            time.sleep(30 - time.time() % 30 + 0.5)
            code = totp.now()
        self._last_code = code
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.reader is not None:
            self.reader.join(STOP_TIMEOUT_S)  # reads to EOF, then the pipe closes
        if self.process.stdout is not None:
            self.process.stdout.close()


def _start_demo(data_dir: Path, flags: dict[str, object]) -> Demo:
    argv = [sys.executable, "-m", "relay", "demo", *ALL_ON_PORT_ZERO]
    for name, value in flags.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    env = {**os.environ, "RELAY_DATA_DIR": str(data_dir)}
    env.pop("RELAY_TOTP_SEALING_KEY", None)
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=data_dir.parent,
        start_new_session=True,
    )
    assert process.stdout is not None
    # The reader drains the pipe to its end, so the demo never blocks on it.
    reader = LineReader(process.stdout)
    demo = Demo(process, data_dir, reader=reader)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (demo.output and demo.output[-1].startswith(_READY)):
        try:
            line = reader.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:  # exited, or nothing in time
            demo.stop()
            raise AssertionError("relay demo did not start:\n" + "\n".join(demo.output))
        demo.output.append(line)
        _parse(demo, line)
    printed = (demo.console_url, demo.device_page_url, demo.username, demo.password)
    assert all(printed), demo.output
    assert demo.totp_secret, demo.output
    return demo


def _parse(demo: Demo, line: str) -> None:
    if match := _CONSOLE.match(line):
        demo.console_url = match.group(1)
    elif match := _DEVICE_PAGE.match(line):
        demo.device_page_url = match.group(1)
    elif match := _PASSWORD.match(line):
        demo.username, demo.password = match.group(1), match.group(2)
    elif match := _SECRET.search(line):
        demo.totp_secret = demo.totp_secret or match.group(1)


@pytest.fixture
def demo_with(tmp_path: Path) -> Iterator[Callable[..., Demo]]:
    """Start ``relay demo`` with extra flags, e.g. ``max_session_seconds=5``."""
    started: list[Demo] = []

    def start(**flags: object) -> Demo:
        demo = _start_demo(tmp_path / f"data-{len(started)}", flags)
        started.append(demo)
        return demo

    yield start
    for demo in started:
        demo.stop()


@pytest.fixture
def demo(demo_with: Callable[..., Demo]) -> Demo:
    """``relay demo`` on its defaults (free ports, fresh data dir)."""
    return demo_with()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Debian's Chromium under Playwright, headless."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",  # CI runs as root
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
        yield browser
        browser.close()


def new_page(browser: Any, **context_options: Any) -> Any:
    """A page in a fresh context (its own cookies) that records problems.

    ``page.console_errors`` collects console errors and uncaught page errors;
    ``page.csp_violations`` the ``securitypolicyviolation`` events (directive and
    blocked URI) of every document the page loads.
    """
    context = browser.new_context(
        ignore_https_errors=True,
        viewport={"width": 1280, "height": 720},
        **context_options,
    )
    page = context.new_page()
    page.console_errors = []
    page.csp_violations = []
    page.on(
        "console",
        lambda message: (
            page.console_errors.append(message.text)
            if message.type == "error"
            else None
        ),
    )
    page.on("pageerror", lambda error: page.console_errors.append(str(error)))
    page.expose_function(
        "__relayCspViolation", lambda report: page.csp_violations.append(report)
    )
    page.add_init_script(
        "document.addEventListener('securitypolicyviolation', e => "
        "window.__relayCspViolation(e.violatedDirective + ' ' + e.blockedURI));"
    )
    return page


def screenshot(page: Any, name: str) -> Path:
    """Save a full-page screenshot as an artifact; returns its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
