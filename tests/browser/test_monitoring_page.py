"""An instrument's monitoring page in a real headless Chromium: the charts of the
daily statistics are drawn (uPlot), the alarms listed, the export links there.

The system under test is ``relay demo`` (tests/browser/conftest.py). The demo's
simulated water purifier (relay/simulated_instrument.py) feeds its agent; so
that the test does not wait for the agent's first delivery, the same
simulator's records are also written into the demo's store, as the broker's
intake stores them (the record ids differ, the measurements are the same).
"""

from __future__ import annotations

import random
import re
from contextlib import closing
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyotp
import pytest
from playwright.sync_api import expect

import auth
from relay import simulated_instrument as instrument
from relay.config import BrokerConfig
from relay.pki_files import DataDir, load_or_create_sealing_key
from relay.proto import feed
from relay.store import Store
from relay.users import create_user
from tests.browser.conftest import Demo, new_page, screenshot
from tests.browser.test_console import DEVICE_ID, STEP_MS, assert_clean, log_in

pytestmark = pytest.mark.slow

DAYS = 30
CUSTOMER_PASSWORD = "correct horse battery staple"  # noqa: S105 - test account


def _store(demo: Demo) -> closing[Store]:
    return closing(
        Store.open(BrokerConfig(data_dir=demo.data_dir).effective_database_url)
    )


def _seed(demo: Demo) -> tuple[list[feed.DailyStats], list[feed.Alarm]]:
    """Put 30 days of the simulator's statistics and a few of its alarms into the
    demo's store; returns them."""
    rng = random.Random(12)  # noqa: S311 - simulated readings, not secrets
    today = datetime.now(UTC).date()
    history = instrument.daily_stats_history(today - timedelta(days=1), DAYS, rng)
    now = datetime.now(UTC)
    alarms = [
        instrument.random_alarm(now - timedelta(hours=hours), rng)
        for hours in (1, 5, 9)
    ]
    with _store(demo) as store:
        records: list[feed.Record] = [*history, *alarms]
        for index, record in enumerate(records):
            store.add_feed_record(
                DEVICE_ID,
                record,
                record_id=f"browser-test-{index}",
                request_id=None,
                received_at=now,
            )
    return history, alarms


def _drawn_pixels(console: Any, index: int) -> int:
    """How many pixels of the index-th chart's canvas are not transparent."""
    count: int = console.evaluate(
        """(index) => {
            const canvas = document.querySelectorAll("#monitor-charts canvas")[index];
            const context = canvas.getContext("2d");
            const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
            let drawn = 0;
            for (let i = 3; i < data.length; i += 4) if (data[i] !== 0) drawn += 1;
            return drawn;
        }""",
        index,
    )
    return count


def test_monitoring_page_draws_a_chart_per_measurement(
    demo: Demo, browser: Any
) -> None:
    """The engineer opens the instrument's monitoring page: one uPlot chart per
    measurement, titled with its unit, drawn on a canvas of non-zero size; the
    alarms newest first with their severity; export links; no CSP violation."""
    history, alarms = _seed(demo)
    names = [m.name for m in history[0].values]
    units = {m.name: m.unit for m in history[0].values}
    console = new_page(browser)
    log_in(console, demo)
    monitor = console.get_by_role(
        "button", name=f"Alarms, statistics and history of {DEVICE_ID}"
    )
    expect(monitor).to_be_visible(timeout=STEP_MS)
    monitor.click()
    expect(
        console.get_by_role("heading", name=f"Instrument {DEVICE_ID}")
    ).to_be_visible()

    charts = console.locator("#monitor-charts figure.chart")
    expect(charts).to_have_count(len(names), timeout=STEP_MS)
    for index, name in enumerate(names):
        figure = charts.nth(index)
        assert figure.get_attribute("data-measurement") == name
        caption = figure.locator("figcaption").inner_text()
        if units[name]:
            assert caption.endswith(f"({units[name]})"), caption
        canvas = figure.locator("canvas")
        expect(canvas).to_have_count(1)
        box = canvas.bounding_box()
        assert box is not None
        assert box["width"] > 100, box
        assert box["height"] > 50, box
        drawn = figure.locator(".uplot").get_attribute("data-drawn")
        assert drawn is not None
        assert int(drawn) >= 1
        assert _drawn_pixels(console, index) > 0, name

    items = console.locator("#monitor-alarms li")
    expect(items).to_have_count(len(alarms), timeout=STEP_MS)
    newest = max(alarms, key=lambda alarm: alarm.device_time)
    expect(items.first).to_contain_text(newest.code)
    assert f"severity-{newest.severity}" in (items.first.get_attribute("class") or "")

    links = console.locator("#monitor-exports a")
    expect(links).to_have_count(4)
    href = links.first.get_attribute("href") or ""
    assert href.startswith(f"/api/v1/devices/{DEVICE_ID}/exports/alarms?format=csv")
    # The engineer may ask; the button is there (its answer needs the agent).
    expect(console.locator("#monitor-request-configuration")).to_be_visible()
    screenshot(console, "monitoring-page")
    assert_clean(console)


def test_daily_stats_days_are_those_of_the_simulator(demo: Demo, browser: Any) -> None:
    """The chart's data points are the simulator's days: the API answers the
    seeded days (and whatever the agent delivered, the same names)."""
    history, _alarms = _seed(demo)
    console = new_page(browser)
    log_in(console, demo)
    expect(
        console.get_by_role(
            "button", name=f"Alarms, statistics and history of {DEVICE_ID}"
        )
    ).to_be_visible(timeout=STEP_MS)
    days: list[str] = console.evaluate(
        """async (device) => {
            const answer = await fetch(`/api/v1/devices/${device}/daily-stats`);
            const body = await answer.json();
            return body.daily_stats.map((record) => record.day);
        }""",
        DEVICE_ID,
    )
    seeded = {stats.day.isoformat() for stats in history}
    assert seeded <= set(days)
    assert all(date.fromisoformat(day) for day in days)
    assert_clean(console)


def _add_customer(demo: Demo, username: str, organisation: str) -> str:
    """A customer of *organisation* in the demo's store (as ``relay user add``
    does); returns its TOTP secret."""
    key, _origin = load_or_create_sealing_key(DataDir(demo.data_dir), None)
    with _store(demo) as store:
        new_user = create_user(
            store,
            auth.PasswordHasher(),
            auth.SecretSealer(key),
            username=username,
            role="customer",
            password=CUSTOMER_PASSWORD,
            now=datetime.now(UTC),
            organisation=organisation,
        )
    secret: str = pyotp.parse_uri(new_user.otpauth_uri).secret
    return secret


def test_a_customer_sees_its_own_instrument_without_session_controls(
    demo: Demo, browser: Any
) -> None:
    """A customer of ACME lists only the instrument labelled customer=ACME (not
    another organisation's), has no session button, and opens its monitoring
    page with the charts and the history."""
    _seed(demo)
    now = datetime.now(UTC)
    with _store(demo) as store:
        store.set_device_labels(DEVICE_ID, set={"customer": "ACME"}, remove=(), at=now)
        store.record_enrollment(
            device_id="globex-0001",
            serial_hex="7e57",
            fingerprint_sha256="7e" * 32,
            not_before=now - timedelta(days=1),
            not_after=now + timedelta(days=365),
            issued_at=now - timedelta(days=1),
        )
        store.set_device_labels(
            "globex-0001", set={"customer": "Globex"}, remove=(), at=now
        )
    secret = _add_customer(demo, "carla", "ACME")
    console = new_page(browser)
    console.goto(demo.console_url)
    console.get_by_label("Username").fill("carla")
    console.get_by_label("Password").fill(CUSTOMER_PASSWORD)
    console.get_by_label("Code from your authenticator app").fill(
        pyotp.TOTP(secret).now()
    )
    console.get_by_role("button", name="Log in").click()
    devices = console.locator("#devices li")
    expect(devices).to_have_count(1, timeout=STEP_MS)
    expect(devices.first).to_contain_text(DEVICE_ID)
    expect(console.get_by_text("globex-0001")).to_have_count(0)
    expect(console.get_by_role("button", name="Request session")).to_have_count(0)
    console.get_by_role(
        "button", name=f"Alarms, statistics and history of {DEVICE_ID}"
    ).click()
    expect(console.locator("#monitor-charts figure.chart canvas").first).to_be_visible(
        timeout=STEP_MS
    )
    # A customer may ask for the configuration, and the answer shows here.
    expect(console.locator("#monitor-request-configuration")).to_be_visible()
    # The other organisation's instrument is a 404, like an unknown one.
    status: int = console.evaluate(
        """async () => (await fetch("/api/v1/devices/globex-0001/alarms")).status"""
    )
    assert status == 404
    screenshot(console, "monitoring-page-customer")
    unexpected = [
        e for e in console.console_errors if "404" not in e and "401" not in e
    ]
    assert unexpected == []
    assert console.csp_violations == []


def test_request_now_shows_the_instruments_answer(demo: Demo, browser: Any) -> None:
    """ "Request now" for the consumables: the request is sent, polled, and its
    outcome shown (the demo's instrument answers, or says why not); the
    snapshot or the refusal appears on the page."""
    console = new_page(browser)
    log_in(console, demo)
    console.get_by_role(
        "button", name=f"Alarms, statistics and history of {DEVICE_ID}"
    ).click()
    console.get_by_label("Why you ask (shown on the instrument, optional)").fill(
        "browser test"
    )
    console.locator("#monitor-request-consumables").click()
    status = console.locator("#monitor-request-consumables-status")
    expect(status).to_contain_text(
        re.compile("Answered at|refused|did not answer|not connected|too old"),
        timeout=60000,
    )
    expect(console.locator("#monitor-requests li").first).to_contain_text(
        "consumables asked by demo"
    )
    if "Answered" in status.inner_text():
        expect(console.locator("#monitor-consumables tr").first).to_be_visible()
    screenshot(console, "monitoring-page-request")
    assert_clean(console)
