"""deploy/prometheus: promtool accepts the config and the rules, the rules' unit
tests pass, and every alert is tested both firing and not firing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_files import (
    DEPLOY,
    METRIC_NAMES,
    metric_names,
    required_binary,
    run,
)

PROMETHEUS = DEPLOY / "prometheus"
WHY = "Debian package prometheus; .ci/run installs it"

#: The alerts the operators' guide promises.
ALERTS = frozenset(
    {
        "RelayBrokerDown",
        "RelayDeviceFleetDrop",
        "RelayRedisUnreachable",
        "RelayTLSHandshakeFailureSpike",
        "RelayAuditWriteFailures",
        "RelayAuditNotWritable",
        "RelaySessionKillSpike",
        "RelayCertificateExpiringSoon",
        "RelayDeviceCertificateRenewalsFailing",
        "RelayFeedBacklog",
        "RelayFeedRecordsRejected",
    }
)


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rules() -> list[dict[str, Any]]:
    return [
        rule
        for group in load(PROMETHEUS / "rules.yml")["groups"]
        for rule in group["rules"]
    ]


@pytest.mark.parametrize(
    "args",
    [
        ("check", "config", "prometheus.yml"),
        ("check", "rules", "rules.yml"),
        ("test", "rules", "rules_test.yml"),
    ],
    ids=" ".join,
)
def test_promtool(args: tuple[str, ...]) -> None:
    promtool = required_binary("promtool", WHY)
    result = run(promtool, *args, cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_scrape_job_is_relay_on_the_metrics_listener() -> None:
    """The alerts' job="relay" scrapes /metrics on port 9464 (the metrics listener)."""
    (job,) = load(PROMETHEUS / "prometheus.yml")["scrape_configs"]
    assert job["job_name"] == "relay"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for config in job["static_configs"] for t in config["targets"]]
    assert targets
    assert all(t.endswith(":9464") for t in targets)


def test_alerts_are_the_documented_ones_with_severity() -> None:
    assert {rule["alert"] for rule in rules()} == ALERTS
    for rule in rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]


def test_rules_use_only_known_metrics() -> None:
    for rule in rules():
        used = metric_names(rule["expr"])
        assert used or "up{" in rule["expr"], rule["alert"]
        assert used <= METRIC_NAMES, (rule["alert"], used - METRIC_NAMES)


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    """rules_test.yml checks each alert at a time when it fires and one when it
    must not (promtool test rules runs them in test_promtool)."""
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in load(PROMETHEUS / "rules_test.yml")["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert firing == ALERTS
    assert quiet == ALERTS
