"""The broker's policy gate: decisions with the store's facts, reloads, rechecks."""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio

from policies import Ceiling, ChannelSet, Denial
from relay._trio.policy_gate import PolicyGate
from relay.config import PolicyConfig
from relay.metrics import POLICY_OUTCOMES, RelayMetrics
from relay.policy_files import load_policy_dir
from relay.store import StoreError
from tests.e2e.conftest import wait_until

LABELLED = """
[[rule]]
name = "acme"
engineer_groups = ["field"]
device_labels = { customer = "acme" }
channels = ["shell"]
"""


class FakeStore:
    def __init__(self) -> None:
        self.groups: dict[str, frozenset[str]] = {}
        self.labels: dict[str, dict[str, str]] = {}
        self.cursor = 0
        self.broken = False

    def user_groups(self, username: str) -> frozenset[str]:
        if self.broken:
            raise StoreError("database is locked")
        return self.groups.get(username, frozenset())

    def device_labels(self, device_id: str) -> dict[str, str]:
        return self.labels.get(device_id, {})

    def policy_subject_cursor(self) -> int:
        if self.broken:
            raise StoreError("database is locked")
        return self.cursor


def _write(directory: Path, text: str) -> None:
    path = directory / "rules.toml"
    path.write_text(text)
    stat = path.stat()  # a modification time the poll cannot miss
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))


def _gate(
    directory: Path, store: FakeStore, metrics: RelayMetrics
) -> tuple[PolicyGate, list[dict[str, Any]]]:
    config = PolicyConfig(dir=directory, reload_poll_s=0.1, recheck_s=0.1)
    events: list[dict[str, Any]] = []

    def capture(
        _logger: object, method: str, event: MutableMapping[str, Any]
    ) -> Mapping[str, Any]:
        events.append(dict(event))
        raise structlog.DropEvent

    log = structlog.wrap_logger(None, processors=[capture])
    gate = PolicyGate(
        config=config,
        ceiling=Ceiling(channels=ChannelSet.parse(["shell", "tcp:22"])),
        policy=load_policy_dir(directory),
        store=store,
        metrics=metrics,
        log=log,
        wall_clock=lambda: datetime(2026, 11, 24, 12, tzinfo=UTC),
    )
    return gate, events


async def _decide(gate: PolicyGate, **kw: Any) -> Any:
    return await gate.decide(
        engineer=kw.get("engineer", "ana"),
        role="engineer",
        device_id="dev-1",
        channels=("shell",),
        reason="INC-1",
        live_sessions=0,
    )


async def test_decisions_use_the_stores_groups_and_labels(tmp_path: Path) -> None:
    _write(tmp_path, LABELLED)
    store, metrics = FakeStore(), RelayMetrics()
    gate, _ = _gate(tmp_path, store, metrics)
    refused = await _decide(gate)
    assert refused.code is Denial.NO_MATCHING_RULE
    store.groups["ana"] = frozenset({"field"})
    store.labels["dev-1"] = {"customer": "acme"}
    allowed = await _decide(gate)
    assert allowed.allowed
    assert allowed.policy_digest == gate.policy.digest
    sample = metrics.registry.get_sample_value
    assert sample("relay_policy_decisions_total", {"outcome": "allowed"}) == 1
    assert sample("relay_policy_decisions_total", {"outcome": "no_matching_rule"}) == 1
    store.broken = True
    with pytest.raises(StoreError):
        await _decide(gate)


async def test_reloads_on_change_and_on_request_rechecks_and_keeps_a_bad_one(
    tmp_path: Path,
) -> None:
    """A changed file reloads and rechecks; the same bytes do not; a file that
    does not load is refused with file, rule and key and the old policy stays;
    a subject change rechecks; a broken store is logged, not fatal."""
    _write(tmp_path, LABELLED)
    store, metrics = FakeStore(), RelayMetrics()
    gate, events = _gate(tmp_path, store, metrics)
    changes: list[str] = []

    async def on_change(why: str) -> None:
        changes.append(why)

    sample = metrics.registry.get_sample_value
    async with trio.open_nursery() as nursery:
        await nursery.start(gate.run, on_change)
        first = gate.policy.digest

        _write(tmp_path, LABELLED.replace('"shell"]', '"shell", "tcp:22"]'))
        await wait_until(lambda: changes == ["policy_reload"], timeout_s=3)
        assert gate.policy.digest != first
        assert [e["event"] for e in events] == ["policy.loaded"]
        assert events[0]["rules"] == 1

        # Same bytes again (a touch): no event, no recheck; a forced reload
        # (SIGHUP) of the same bytes: on record, still no recheck.
        _write(tmp_path, LABELLED.replace('"shell"]', '"shell", "tcp:22"]'))
        await trio.sleep(0.5)
        assert len(events) == 1
        gate.reload_now()
        await wait_until(lambda: len(events) == 2, timeout_s=3)
        assert (events[1]["event"], events[1]["changed"]) == ("policy.loaded", False)
        assert changes == ["policy_reload"]

        loaded = gate.policy.digest
        _write(tmp_path, LABELLED + "max_concurrent_sessions = 0\n")
        await wait_until(
            lambda: sample("relay_policy_reloads_total", {"outcome": "refused"}) == 1,
            timeout_s=3,
        )
        failed = events[-1]
        assert failed["event"] == "policy.reload_failed"
        assert (failed["file"], failed["rule"], failed["key"]) == (
            "rules.toml",
            "acme",
            "max_concurrent_sessions",
        )
        assert failed["kept_digest"] == loaded
        assert gate.policy.digest == loaded
        assert changes == ["policy_reload"]

        store.cursor = 7
        await wait_until(lambda: changes[-1] == "labels_or_groups", timeout_s=3)
        store.broken = True
        await trio.sleep(0.3)
        assert any(e["event"] == "policy.subject_feed_unreadable" for e in events)
        nursery.cancel_scope.cancel()
    assert sample("relay_policy_reloads_total", {"outcome": "reloaded"}) == 1
    assert sample("relay_policy_rules") == 1


def test_every_refusal_code_has_a_metric_outcome() -> None:
    assert set(POLICY_OUTCOMES) == {"allowed"} | {d.value for d in Denial}
