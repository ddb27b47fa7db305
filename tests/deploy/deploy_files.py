"""What the tests of deploy/ share: paths, the broker's metric names, tool lookup."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CONTAINERFILE = ROOT / "Containerfile"

#: Every metric the broker exposes that dashboards and alerts may use, as named in
#: PromQL (counters with ``_total``, the build info with ``_info``).
METRIC_NAMES = frozenset(
    {
        "relay_devices_connected",
        "relay_device_connects_total",
        "relay_device_disconnects_total",
        "relay_device_rejections_total",
        "relay_tls_handshake_failures_total",
        "relay_pending_handshakes",
        "relay_websocket_closes_total",
        "relay_auth_failures_total",
        "relay_auth_logins_total",
        "relay_sessions",
        "relay_session_requests_total",
        "relay_grant_wait_seconds",
        "relay_session_duration_seconds",
        "relay_session_ends_total",
        "relay_teardown_seconds",
        "relay_tunnel_bytes_total",
        "relay_tunnel_messages_total",
        "relay_audit_write_failures_total",
        "relay_audit_writable",
        "relay_build_info",
        "relay_certificate_expiry_timestamp_seconds",
        "relay_device_certificates_expiring_soon",
        "relay_device_certificate_renewals_total",
        "relay_redis_up",
        "relay_node_commands_total",
        "relay_feed_records_stored_total",
        "relay_feed_records_duplicate_total",
        "relay_feed_alarms_received_total",
        "relay_feed_records_rejected_total",
        "relay_feed_store_failures_total",
        "relay_feed_records_deferred_total",
        "relay_feed_agent_queue_depth",
        "relay_feed_agent_queue_depth_max",
        "relay_feed_agent_dropped_records",
        "relay_feed_data_requests_total",
    }
)
HISTOGRAMS = frozenset(
    {
        "relay_grant_wait_seconds",
        "relay_session_duration_seconds",
        "relay_teardown_seconds",
    }
)

_METRIC = re.compile(r"\brelay_[a-z0-9_]+\b")
_HISTOGRAM_SERIES = re.compile(r"^(?P<base>.+)_(?:bucket|sum|count)$")


def metric_names(expr: str) -> set[str]:
    """The ``relay_*`` metric names a PromQL expression uses, histogram series
    (``_bucket``, ``_sum``, ``_count``) folded into their histogram's name."""
    names = set()
    for name in _METRIC.findall(expr):
        match = _HISTOGRAM_SERIES.match(name)
        if match and match["base"] in HISTOGRAMS:
            name = match["base"]
        names.add(name)
    return names


def required_binary(name: str, why: str) -> str:
    """The path of *name*: the venv's bin directory first, then PATH. Skipped when
    missing, which RELAY_TEST_REQUIRE_ALL=1 (CI) turns into a failure."""
    in_venv = Path(sys.executable).parent / name
    if in_venv.is_file() and os.access(in_venv, os.X_OK):
        return str(in_venv)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not installed ({why})")
    return found


def run(*args: str, cwd: Path = DEPLOY) -> subprocess.CompletedProcess[str]:
    """A tool's run, never raising on its exit status."""
    return subprocess.run(
        args,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def relay_config_check(path: Path, env: dict[str, str] | None = None) -> str:
    """``relay config check PATH`` with no RELAY_* variables but *env*; its stdout.

    Fails the test on any exit status but 0."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "config", "check", str(path)],
        env={**base, **(env or {})},
        cwd=path.parent,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout
