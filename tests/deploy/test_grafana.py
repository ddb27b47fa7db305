"""deploy/grafana/relay-dashboard.json: a Grafana dashboard whose queries parse
as PromQL and use only the broker's metric names."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from relay.metrics import RelayMetrics
from tests.deploy.deploy_files import (
    DEPLOY,
    METRIC_NAMES,
    metric_names,
    required_binary,
    run,
)

DASHBOARD = DEPLOY / "grafana" / "relay-dashboard.json"

#: What the dashboard must show (the operators' guide lists the panels).
SHOWN = frozenset(
    {
        "relay_devices_connected",
        "relay_tls_handshake_failures_total",
        "relay_session_requests_total",
        "relay_grant_wait_seconds",
        "relay_sessions",
        "relay_session_ends_total",
        "relay_teardown_seconds",
        "relay_tunnel_bytes_total",
        "relay_tunnel_messages_total",
        "relay_audit_writable",
        "relay_certificate_expiry_timestamp_seconds",
    }
)


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def expressions() -> list[str]:
    return [
        target["expr"]
        for panel in panels(dashboard()["panels"])
        for target in panel.get("targets", [])
    ]


def test_dashboard_shape() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 39
    assert board["uid"]
    assert board["title"]
    ids = [panel["id"] for panel in panels(board["panels"])]
    assert len(ids) == len(set(ids))
    for panel in panels(board["panels"]):
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()


def test_uses_only_known_metrics_and_shows_the_essentials() -> None:
    used = set().union(*(metric_names(expr) for expr in expressions()))
    assert used <= METRIC_NAMES, used - METRIC_NAMES
    assert used >= SHOWN, SHOWN - used


def test_grant_wait_and_teardown_are_quantiles_of_histograms() -> None:
    joined = "\n".join(expressions())
    for histogram in ("relay_grant_wait_seconds", "relay_teardown_seconds"):
        assert f"rate({histogram}_bucket{{" in joined
    assert (
        "histogram_quantile(0.99, sum by (le) (rate(relay_teardown_seconds_bucket"
        in joined
    )


def test_expressions_parse_as_promql(tmp_path: Path) -> None:
    """Every query, with Grafana's variables filled in, passes promtool as the
    expression of a recording rule."""
    promtool = required_binary(
        "promtool", "Debian package prometheus; .ci/run installs it"
    )
    filled = [
        expr.replace("$__rate_interval", "1m")
        .replace("$instance", ".*")
        .replace("$job", "relay")
        for expr in expressions()
    ]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query{i}", "expr": expr}
                    for i, expr in enumerate(filled)
                ],
            }
        ]
    }
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
    result = run(promtool, "check", "rules", "dashboard.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_known_metrics_exist_in_the_broker_registry() -> None:
    """The names the dashboard and the alerts may use are all registered by a
    fresh RelayMetrics (counters as NAME_total, the build info as NAME_info)."""
    registered = set()
    for family in RelayMetrics().registry.collect():
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        registered.add(family.name + suffix)
    assert METRIC_NAMES - registered == set()
