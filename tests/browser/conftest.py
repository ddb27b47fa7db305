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
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import sync_playwright

from tests.demo_process import DemoProcess, start_demo

CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None
)
ARTIFACTS = Path(os.environ.get("RELAY_TEST_ARTIFACTS", "test-artifacts"))

#: A running ``relay demo`` (tests/demo_process.py), as the fixtures give it.
Demo = DemoProcess


@pytest.fixture
def demo_with(tmp_path: Path) -> Iterator[Callable[..., Demo]]:
    """Start ``relay demo`` with extra flags, e.g. ``max_session_seconds=5``."""
    started: list[Demo] = []

    def start(**flags: object) -> Demo:
        demo = start_demo(tmp_path / f"data-{len(started)}", flags)
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
