"""``relay device label``, ``relay user add/set --group`` and the LABELS and GROUPS
columns of the listings.

As in ``test_user.py`` the full paths run as real subprocesses on a temporary
data dir; each run costs a second or two, so one test walks several steps. The
refusals that happen before the data dir is touched (argument checks) call the
command functions in-process instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from relay import cli
from relay.audit_reader import read_records
from relay.config import BrokerConfig
from relay.pki_files import DataDir
from relay.store import Store
from tests.cli.test_cli import json_logs
from tests.cli.test_user import PASSWORD

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


class Relay:
    """Runs ``relay ARGS`` against one data dir."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "data"

    def __call__(
        self, *args: str, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        environ = {**os.environ, "RELAY_DATA_DIR": str(self.data_dir)}
        environ.pop("RELAY_TOTP_SEALING_KEY", None)
        result = subprocess.run(
            [sys.executable, "-m", "relay", *args],
            env=environ,
            cwd=self.workdir,
            input=stdin,
            stdin=subprocess.DEVNULL if stdin is None else None,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            start_new_session=True,
        )
        assert "Traceback" not in result.stderr, result.stderr
        return result

    def store(self) -> closing[Store]:
        url = BrokerConfig(data_dir=self.data_dir).effective_database_url
        return closing(Store.open(url))

    def audit_events(self, event: str) -> list[dict[str, Any]]:
        """The records named *event* in the data dir's audit log, in order."""
        records = read_records(DataDir(self.data_dir).audit_dir)
        return [r for r in records if r.get("event") == event]


@pytest.fixture
def relay(tmp_path: Path) -> Relay:
    return Relay(tmp_path)


def enroll(store: Store, device_id: str, serial_hex: str) -> None:
    store.record_enrollment(
        device_id=device_id,
        serial_hex=serial_hex,
        fingerprint_sha256=serial_hex.rjust(64, "0"),
        not_before=T0,
        not_after=T0 + timedelta(days=365),
        issued_at=T0,
    )


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(argv)


def test_device_label_sets_removes_lists_and_audits(relay: Relay) -> None:
    """label sets and removes labels, prints them, logs device.labels_changed to
    the audit log; list shows them; an unknown device exits 1, a bad key 2."""
    with relay.store() as store:
        enroll(store, "dev-1", "0a")
        enroll(store, "dev-2", "0b")

    first = relay("device", "label", "dev-1", "customer=acme", "site=lyon", "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {
        "device_id": "dev-1",
        "labels": {"customer": "acme", "site": "lyon"},
    }
    [logged] = [
        e for e in json_logs(first.stderr) if e["event"] == "device.labels_changed"
    ]
    assert (logged["device_id"], logged["labels"], logged["audit"]) == (
        "dev-1",
        "customer=acme,site=lyon",
        True,
    )

    second = relay("device", "label", "dev-1", "site=paris 2", "--remove", "customer")
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == ["site=paris 2"]
    assert "device dev-1 has 1 label(s)" in second.stderr

    records = relay.audit_events("device.labels_changed")
    assert [(r["device_id"], r["labels"], r["previous"]) for r in records] == [
        ("dev-1", "customer=acme,site=lyon", ""),
        ("dev-1", "site=paris 2", "customer=acme,site=lyon"),
    ]

    listed = relay("device", "list")
    assert listed.returncode == 0, listed.stderr
    header, *lines = listed.stdout.splitlines()
    assert header.split()[-1] == "LABELS"
    assert [line.split()[0] for line in lines] == ["dev-1", "dev-2"]
    assert lines[0].endswith(" site=paris 2")
    assert lines[1].split()[-1] == "-"
    rows = json.loads(relay("device", "list", "--json").stdout)
    assert [row["labels"] for row in rows] == [{"site": "paris 2"}, {}]

    unknown = relay("device", "label", "ghost", "site=lyon")
    assert unknown.returncode == 1
    assert unknown.stderr.strip().endswith("relay: error: unknown device 'ghost'")
    bad = relay("device", "label", "dev-1", "Site=lyon")
    assert bad.returncode == 2
    assert "relay: error: invalid label key 'Site'" in bad.stderr
    with relay.store() as store:
        assert store.device_labels("dev-1") == {"site": "paris 2"}
    assert len(relay.audit_events("device.labels_changed")) == 2


def test_user_groups_on_add_set_and_list_with_audit(relay: Relay) -> None:
    """add --group and set --add-group/--remove-group store the groups, log them
    to the audit log, and list shows them (sorted in JSON)."""
    added = relay(
        "user",
        "add",
        "bob",
        "--role",
        "engineer",
        "--group",
        "field-eu",
        "--group",
        "acme",
        "--password-stdin",
        "--json",
        stdin=PASSWORD + "\n",
    )
    assert added.returncode == 0, added.stderr
    [event] = relay.audit_events("user.added")
    assert (event["username"], event["groups"]) == ("bob", "acme,field-eu")

    changed = relay(
        "user", "set", "bob", "--add-group", "ops", "--remove-group", "acme", "--json"
    )
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout)["groups"] == ["field-eu", "ops"]
    [event] = relay.audit_events("user.groups_changed")
    assert (event["username"], event["groups"], event["previous"]) == (
        "bob",
        "field-eu,ops",
        "acme,field-eu",
    )
    # Only groups were asked for: the enroll permission is not touched or logged.
    assert relay.audit_events("user.permissions_changed") == []

    listed = relay("user", "list")
    assert listed.returncode == 0, listed.stderr
    header, line = listed.stdout.splitlines()
    assert header.split()[-1] == "GROUPS"
    assert line.split()[0] == "bob"
    assert line.split()[-1] == "field-eu,ops"
    [row] = json.loads(relay("user", "list", "--json").stdout)
    assert row["groups"] == ["field-eu", "ops"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("device", "label", "dev-1"), "nothing to change: give KEY=VALUE"),
        (("device", "label", "dev-1", "site"), "malformed label 'site'"),
        (("device", "label", "dev-1", "=lyon"), "malformed label '=lyon'"),
        (("device", "label", "dev-1", "a=1", "a=2"), "label 'a' is given twice"),
        (("user", "set", "bob"), "nothing to set: give --can-enroll yes|no, --add"),
        (
            ("user", "set", "bob", "--can-enroll", "yes", "--add-group", "Ops"),
            "invalid group name 'Ops'",
        ),
        (
            ("user", "set", "bob", "--add-group", "ops", "--remove-group", "ops"),
            "group 'ops' is both added and removed",
        ),
        (
            ("user", "add", "bob", "--role", "engineer", "--group", "a b"),
            "invalid group name 'a b'",
        ),
        (
            (
                "user",
                "add",
                "bob",
                "--role",
                "engineer",
                *(f"--group=g{i}" for i in range(33)),
            ),
            "33 groups; a user is in at most 32",
        ),
    ],
    ids=[
        "label-nothing",
        "label-no-equals",
        "label-no-key",
        "label-twice",
        "set-nothing",
        "set-bad-group",
        "set-add-and-remove",
        "add-bad-group",
        "add-too-many",
    ],
)
def test_bad_arguments_exit_2_before_anything_is_opened(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    argv: tuple[str, ...],
    message: str,
) -> None:
    """Malformed labels, group names and empty changes are refused with exit 2
    before the data dir (audit log, store) is even created."""
    data_dir = tmp_path / "data"
    monkeypatch.setenv("RELAY_DATA_DIR", str(data_dir))
    args = parse(*argv)
    with pytest.raises(cli.CLIError, match=message) as refused:
        args.func(args)
    assert refused.value.exit_code == 2
    assert not data_dir.exists()
