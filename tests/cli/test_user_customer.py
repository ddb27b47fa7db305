"""``relay user add --role customer --organisation``, ``relay user set
--organisation`` and what ``relay user list`` shows of customers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.test_cli import json_logs
from tests.cli.test_user import PASSWORD, Users, add_with


@pytest.fixture
def users(tmp_path: Path) -> Users:
    """The command line on a fresh, not yet created data dir."""
    return Users(tmp_path)


def test_add_customer_with_an_organisation(users: Users) -> None:
    """A customer is added with its organisation, which list (JSON and plain)
    shows and the audit event names."""
    result = add_with(users, "carla", "customer", "--organisation", "ACME Labs")
    assert result.returncode == 0, result.stderr
    [event] = [e for e in json_logs(result.stderr) if e["event"] == "user.added"]
    assert (event["role"], event["organisation"], event["audit"]) == (
        "customer",
        "ACME Labs",
        True,
    )
    row = users.list()["carla"]
    assert (row["role"], row["organisation"]) == ("customer", "ACME Labs")
    plain = users("list")
    assert plain.returncode == 0, plain.stderr
    [line] = [line for line in plain.stdout.splitlines() if line.startswith("carla")]
    assert "ACME Labs" in line


def test_add_customer_without_an_organisation_is_refused(users: Users) -> None:
    """A customer needs an organisation: exit 2, no user, no password asked."""
    result = users("add", "carla", "--role", "customer")
    assert result.returncode == 2
    assert "a customer needs an organisation" in result.stderr
    assert "Password" not in result.stderr
    assert users.list() == {}


def test_an_organisation_for_another_role_is_refused(users: Users) -> None:
    """Only customers belong to an organisation (so an organisation never widens
    what an engineer sees): exit 2."""
    result = add_with(users, "eve", "engineer", "--organisation", "ACME")
    assert result.returncode == 2
    assert "only customers belong to an organisation" in result.stderr
    assert users.list() == {}


@pytest.mark.parametrize("organisation", [" ACME", "ACME\tLabs", "x" * 129, "a=b"])
def test_a_malformed_organisation_is_refused(users: Users, organisation: str) -> None:
    """The organisation has the form of a device label value; anything else
    exits 2."""
    result = add_with(users, "carla", "customer", "--organisation", organisation)
    assert result.returncode == 2
    assert "organisation" in result.stderr
    assert users.list() == {}


def test_customer_with_can_enroll_is_refused(users: Users) -> None:
    """Customers never enroll devices."""
    result = users(
        "add",
        "carla",
        "--role",
        "customer",
        "--organisation",
        "ACME",
        "--can-enroll",
        "--password-stdin",
        stdin=PASSWORD + "\n",
    )
    assert result.returncode == 2
    assert "customers never enroll devices" in result.stderr


def test_set_organisation_moves_a_customer(users: Users) -> None:
    """set --organisation changes a customer's organisation, says what it now
    sees, and logs an audit event with the old and new one."""
    assert (
        add_with(users, "carla", "customer", "--organisation", "ACME").returncode == 0
    )
    result = users("set", "carla", "--organisation", "Globex")
    assert result.returncode == 0, result.stderr
    assert "customer=Globex" in result.stderr
    [event] = [
        e for e in json_logs(result.stderr) if e["event"] == "user.organisation_changed"
    ]
    assert (event["organisation"], event["previous"], event["audit"]) == (
        "Globex",
        "ACME",
        True,
    )
    assert users.list()["carla"]["organisation"] == "Globex"


def test_set_organisation_of_an_engineer_is_refused(users: Users) -> None:
    """An engineer gets no organisation: exit 2, nothing changed."""
    users.add("eve")
    result = users("set", "eve", "--organisation", "ACME")
    assert result.returncode == 2
    assert "only customers belong to an organisation" in result.stderr
    assert users.list()["eve"]["organisation"] is None


def test_set_organisation_of_an_unknown_user_is_an_error(users: Users) -> None:
    """An unknown user is an error (exit 1) that names it."""
    users.add("eve")
    result = users("set", "nobody", "--organisation", "ACME")
    assert result.returncode == 1
    assert "unknown user 'nobody'" in result.stderr
