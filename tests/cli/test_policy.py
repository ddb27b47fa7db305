"""``relay policy check``, ``relay policy explain`` and ``relay ca sign --label``.

Real subprocesses on a temporary data dir (tests/cli/test_labels_groups.py's
``Relay``); each run costs a second or two, so one test walks several steps.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.cli.test_labels_groups import Relay, enroll
from tests.cli.test_user import PASSWORD


@pytest.fixture
def relay(tmp_path: Path) -> Relay:
    return Relay(tmp_path)


ACME = """
[[rule]]
name = "acme-office-hours"
description = "ACME instruments, office hours in Berlin"
engineer_roles = ["engineer"]
engineer_groups = ["acme-field"]
device_labels = { customer = "acme" }
channels = ["shell", "tcp:22"]
max_session_seconds = 1800
reason_pattern = "^INC-[0-9]+"
windows = [{ days = ["mon-fri"], from = "08:00", to = "18:00", timezone = "Europe/Berlin" }]

[[rule]]
name = "no-validation"
effect = "deny"
description = "instruments under validation"
device_labels = { state = "validation" }
"""


def _policy(tmp_path: Path, text: str) -> Path:
    directory = tmp_path / "policy"
    directory.mkdir()
    (directory / "10-acme.toml").write_text(text)
    (directory / "README.md").write_text("not a policy file: ignored\n")
    return directory


def test_check_lists_the_rules_or_names_the_problem(
    relay: Relay, tmp_path: Path
) -> None:
    """A good directory: exit 0 and one line per rule; a bad one: exit 2 naming
    file, rule and key; the shipped default loads."""
    directory = _policy(tmp_path, ACME)
    good = relay("policy", "check", str(directory))
    assert good.returncode == 0, good.stderr
    assert "1 file(s), 2 rule(s)" in good.stdout
    assert "acme-office-hours (10-acme.toml): allow; roles engineer" in good.stdout
    assert "no-validation (10-acme.toml): deny" in good.stdout

    (directory / "10-acme.toml").write_text(ACME.replace("1800", "7200"))
    bad = relay("policy", "check", str(directory), "--json")
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert (
        "relay: error: " + str(directory) + ": 10-acme.toml: rule acme-office-hours: "
        "max_session_seconds: must be an integer in 1..3600"
    ) in bad.stderr

    shipped = relay(
        "policy", "check", str(Path("policies/default").resolve()), "--json"
    )
    assert shipped.returncode == 0, shipped.stderr
    assert json.loads(shipped.stdout)["rules"] == ["engineers-any-instrument"]


def test_explain_gives_the_brokers_decision_and_why(
    relay: Relay, tmp_path: Path
) -> None:
    """explain reads role, groups and labels from the store: refused without the
    group, allowed with it inside the window, refused outside it and for a
    reason off the pattern; exit 0 allowed, 1 refused."""
    directory = _policy(tmp_path, ACME)
    added = relay(
        "user", "add", "ana", "--role", "engineer", "--password-stdin",
        stdin=PASSWORD + "\n",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    with relay.store() as store:
        enroll(store, "dev-1", "0a")
        store.set_device_labels(
            "dev-1", set={"customer": "acme"}, remove=(), at=datetime.now(UTC)
        )
    base = ["policy", "explain", "--engineer", "ana", "--device", "dev-1",
            "--policy", str(directory), "--channel", "shell"]  # fmt: skip
    tuesday_noon = "2026-11-24T12:00:00+01:00"

    no_group = relay(*base, "--at", tuesday_noon, "--reason", "INC-42")
    assert no_group.returncode == 1, no_group.stderr
    assert "decision: refused (no_matching_rule)" in no_group.stdout
    assert (
        "acme-office-hours (10-acme.toml): ana is in none of the groups [acme-field]"
        in no_group.stdout
    )

    grouped = relay("user", "set", "ana", "--add-group", "acme-field")
    assert grouped.returncode == 0, grouped.stderr
    allowed = relay(*base, "--at", tuesday_noon, "--reason", "INC-42 pump alarm")
    assert allowed.returncode == 0, allowed.stderr + allowed.stdout
    assert allowed.stdout.startswith("decision: allowed\n")
    assert "engineer: ana (role engineer; groups acme-field)" in allowed.stdout
    assert "device:   dev-1 (labels customer=acme)" in allowed.stdout
    assert "channels:            shell, tcp:22" in allowed.stdout
    # 12:00 Berlin: the window ends at 18:00, under the rule's 1800 s cap.
    assert "session cap:         1800 s" in allowed.stdout
    assert "window ends at:      2026-11-24T17:00:00+00:00" in allowed.stdout

    evening = relay(
        *base, "--at", "2026-11-24T19:00:00+01:00", "--reason", "INC-42", "--json"
    )
    assert evening.returncode == 1
    explained = json.loads(evening.stdout)
    assert explained["decision"]["code"] == "outside_window"
    assert explained["decision"]["rules"] == ["acme-office-hours"]
    assert explained["engineer"]["groups"] == ["acme-field"]
    assert explained["not_applied"] == {"no-validation": "device has no label state"}

    off_pattern = relay(*base, "--at", tuesday_noon, "--reason", "pump alarm")
    assert off_pattern.returncode == 1
    assert (
        "refused (reason_mismatch): the reason must match the pattern ^INC-[0-9]+"
        in off_pattern.stdout
    )

    unknown = relay("policy", "explain", "--engineer", "nobody", "--device", "dev-1")
    assert (unknown.returncode, unknown.stderr.strip()) == (
        1,
        "relay: error: unknown user 'nobody'",
    )


def test_ca_sign_sets_labels_at_enrollment(relay: Relay) -> None:
    """`ca sign --label` labels the new device and audits it; a bad label is
    refused (exit 2) before anything is signed."""
    assert relay("ca", "init").returncode == 0
    agent = relay.workdir / "agent"
    enrolled = relay("agent", "enroll", "--device-id", "dev-7", "--dir", str(agent))
    assert enrolled.returncode == 0, enrolled.stderr
    out = agent / "device.crt"
    bad = relay("ca", "sign", str(agent / "device.csr"), "--out", str(out),
                "--label", "Customer=acme")  # fmt: skip
    assert bad.returncode == 2
    assert "invalid label key 'Customer'" in bad.stderr
    assert not out.exists()
    signed = relay("ca", "sign", str(agent / "device.csr"), "--out", str(out),
                   "--label", "customer=acme", "--label", "site=berlin-2")  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    with relay.store() as store:
        assert store.device_labels("dev-7") == {"customer": "acme", "site": "berlin-2"}
    [event] = relay.audit_events("device.labels_changed")
    assert (event["device_id"], event["labels"]) == (
        "dev-7",
        "customer=acme,site=berlin-2",
    )
