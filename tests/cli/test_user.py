"""``relay user ...``, run as a real subprocess on a temporary data dir.

Like ``test_cli.py``: each test runs ``python -m relay user ...`` with
``RELAY_DATA_DIR`` in ``tmp_path`` and checks the exit code and the output. Every
run also checks that no traceback, no password hash, no sealed secret and no
sealing key was printed. The child runs in a new session, so it has no
controlling terminal: getpass then reads stdin instead of ``/dev/tty``, and a
test can never hang on a prompt.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pyotp
import pytest

import auth
from relay.config import BrokerConfig
from relay.store import Store
from relay.users import totp_context
from tests.cli.test_cli import json_logs

PASSWORD = "correct horse battery staple"  # noqa: S105 - a test input, not a credential
# base64 of 32 bytes, as `openssl rand -base64 32` prints it.
ENV_KEY = auth.key_to_text(bytes(range(32)))
# What a terminal QR code is drawn with (segno's compact mode).
QR_BLOCKS = ("\u2580", "\u2584", "\u2588")


@dataclass(frozen=True)
class Users:
    """Runs ``relay user ...`` against one data dir."""

    workdir: Path

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def key_file(self) -> Path:
        return self.data_dir / "secrets" / "totp-sealing.key"

    def __call__(
        self, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``relay user ARGS`` with *stdin* (closed when ``None``) and *env* added.

        Fails the test on a traceback, a password hash, a sealed secret or a
        sealing key in the output.
        """
        environ = {**os.environ, "RELAY_DATA_DIR": str(self.data_dir)}
        environ.pop("RELAY_TOTP_SEALING_KEY", None)
        environ.update(env or {})
        result = subprocess.run(
            [sys.executable, "-m", "relay", "user", *args],
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
        output = result.stdout + result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        assert "argon2" not in output, output
        assert "v1:" not in output, output
        assert ENV_KEY not in output, output
        if self.key_file.exists():
            assert self.key_file.read_text().strip() not in output, output
        return result

    def add(
        self, name: str, role: str = "engineer", *, env: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """``user add NAME --role ROLE --password-stdin --json``, which must succeed."""
        result = self(
            "add",
            name,
            "--role",
            role,
            "--password-stdin",
            "--json",
            stdin=PASSWORD + "\n",
            env=env,
        )
        assert result.returncode == 0, result.stderr
        value = json.loads(result.stdout)
        assert isinstance(value, dict)
        return value

    def list(self) -> dict[str, dict[str, Any]]:
        """``user list --json`` as a dict keyed by user name."""
        result = self("list", "--json")
        assert result.returncode == 0, result.stderr
        rows = json.loads(result.stdout)
        assert isinstance(rows, list)
        return {row["username"]: row for row in rows}

    def sealed_secret(self, name: str) -> str:
        """The user's TOTP secret as the store holds it (sealed)."""
        url = BrokerConfig(data_dir=self.data_dir).effective_database_url
        with closing(Store.open(url)) as store:
            user = store.get_user(name)
        assert user is not None
        return user.totp_secret_sealed


@pytest.fixture
def users(tmp_path: Path) -> Users:
    """The command line on a fresh, not yet created data dir."""
    return Users(tmp_path)


def uri_secret(uri: str, name: str) -> str:
    """The secret in an otpauth URI, after checking the URI's form."""
    parts = urlsplit(uri)
    assert (parts.scheme, parts.netloc) == ("otpauth", "totp"), uri
    assert unquote(parts.path) == f"/{auth.TOTP_ISSUER}:{name}", uri
    query = parse_qs(parts.query)
    assert query["issuer"] == [auth.TOTP_ISSUER], uri
    [secret] = query["secret"]
    return secret


def verify(sealer: auth.SecretSealer, sealed: str, name: str, code: str) -> int:
    """Check *code* the way a login does: against the unsealed stored secret."""
    secret = sealer.unseal(sealed, context=totp_context(name))
    return auth.verify_totp(
        secret, code, now=datetime.now(UTC), last_accepted_step=None
    )


def test_add_json_gives_a_uri_whose_codes_verify_against_the_sealed_secret(
    users: Users,
) -> None:
    """A code from the printed URI's secret verifies against the store's sealed one."""
    result = users(
        "add",
        "alice",
        "--role",
        "engineer",
        "--password-stdin",
        "--json",
        stdin=PASSWORD + "\n",
    )
    assert result.returncode == 0, result.stderr
    value = json.loads(result.stdout)
    assert set(value) == {"username", "role", "otpauth_uri", "organisation"}
    assert value["organisation"] is None
    assert (value["username"], value["role"]) == ("alice", "engineer")
    secret = uri_secret(value["otpauth_uri"], "alice")
    assert not any(block in result.stdout for block in QR_BLOCKS)
    sealer = auth.SecretSealer(auth.key_from_text(users.key_file.read_text()))
    sealed = users.sealed_secret("alice")
    assert secret not in sealed
    assert verify(sealer, sealed, "alice", pyotp.TOTP(secret).now()) >= 0


def test_add_prints_the_uri_and_a_qr_code(users: Users) -> None:
    """Without --json, add prints the user, the URI, a QR code and a scan-now note."""
    result = users(
        "add", "bob", "--role", "auditor", "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert result.returncode == 0, result.stderr
    assert "bob" in result.stdout
    assert "auditor" in result.stdout
    assert "otpauth://totp/" in result.stdout
    assert sum(result.stdout.count(block) for block in QR_BLOCKS) > 100
    assert "not shown again" in result.stdout
    assert "reset-totp" in result.stdout
    assert users.list()["bob"]["role"] == "auditor"


def test_add_with_interactive_matching_passwords_adds_the_user(users: Users) -> None:
    """Without --password-stdin the password is asked twice; equal answers add the user."""
    result = users(
        "add", "carol", "--role", "admin", "--json", stdin=f"{PASSWORD}\n{PASSWORD}\n"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["role"] == "admin"
    assert PASSWORD not in result.stdout + result.stderr
    assert "carol" in users.list()


def test_add_with_interactive_passwords_that_differ_is_refused(users: Users) -> None:
    """Two different answers to the password prompts exit 2 and add nobody."""
    result = users(
        "add", "carol", "--role", "admin", stdin=f"{PASSWORD}\n{PASSWORD}x\n"
    )
    assert result.returncode == 2
    assert "relay: error: passwords do not match" in result.stderr
    assert result.stdout == ""
    assert users.list() == {}


def test_add_interactive_with_closed_stdin_fails_instead_of_hanging(
    users: Users,
) -> None:
    """With no terminal and stdin at EOF, the prompt fails with exit 2 at once."""
    result = users("add", "carol", "--role", "admin")
    assert result.returncode == 2
    assert "relay: error: no password" in result.stderr
    assert "--password-stdin" in result.stderr
    assert users.list() == {}


def test_add_password_stdin_with_empty_stdin_is_refused(users: Users) -> None:
    """--password-stdin with nothing on stdin exits 2."""
    result = users("add", "dave", "--role", "engineer", "--password-stdin", stdin="")
    assert result.returncode == 2
    assert "relay: error: --password-stdin: no password on stdin" in result.stderr


def test_add_twice_is_refused(users: Users) -> None:
    """Adding a name that exists exits 1 with "user NAME exists"."""
    users.add("alice")
    result = users(
        "add", "alice", "--role", "admin", "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert result.returncode == 1
    assert "relay: error: user alice exists" in result.stderr
    assert result.stdout == ""
    assert users.list()["alice"]["role"] == "engineer"


def test_add_refuses_a_short_password(users: Users) -> None:
    """A password under the minimum length exits 2 with the reason."""
    result = users(
        "add", "alice", "--role", "engineer", "--password-stdin", stdin="short\n"
    )
    assert result.returncode == 2
    assert "relay: error: password is too short" in result.stderr
    assert users.list() == {}


@pytest.mark.parametrize("name", ["Alice", "_alice", "a:b", "a" * 65, ""])
def test_add_refuses_an_invalid_name(users: Users, name: str) -> None:
    """A name that is not 1-64 of a-z 0-9 . _ - exits 2, before any file is made."""
    result = users(
        "add", name, "--role", "engineer", "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert result.returncode == 2
    assert "relay: error: invalid user name" in result.stderr
    assert not users.data_dir.exists()


@pytest.mark.parametrize("role", ["root", "Engineer", ""])
def test_add_refuses_an_unknown_role(users: Users, role: str) -> None:
    """A role other than engineer, auditor, admin or customer exits 2 and names
    the choices."""
    result = users(
        "add", "alice", "--role", role, "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert result.returncode == 2
    assert "relay: error: invalid role" in result.stderr
    assert "admin, auditor, customer, engineer" in result.stderr


def test_add_logs_an_audit_event_without_secrets(users: Users) -> None:
    """user.added is logged with name and role, never the password, secret or URI."""
    result = users(
        "add", "alice", "--role", "engineer", "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert result.returncode == 0, result.stderr
    [event] = [e for e in json_logs(result.stderr) if e["event"] == "user.added"]
    assert (event["username"], event["role"], event["audit"]) == (
        "alice",
        "engineer",
        True,
    )
    secret = uri_secret(result.stdout.split("TOTP for alice: ")[1].split()[0], "alice")
    for forbidden in (PASSWORD, secret, "otpauth"):
        assert forbidden not in result.stderr


def test_disable_marks_the_user_disabled(users: Users) -> None:
    """disable exits 0, says how many sessions ended, and list shows the flag."""
    users.add("alice")
    users.add("bob")
    result = users("disable", "alice")
    assert result.returncode == 0, result.stderr
    assert "disabled alice (0 session(s) ended)" in result.stderr
    [event] = [e for e in json_logs(result.stderr) if e["event"] == "user.disabled"]
    assert (event["username"], event["sessions_revoked"]) == ("alice", 0)
    rows = users.list()
    assert rows["alice"]["disabled"] is True
    assert rows["bob"]["disabled"] is False


def test_disable_ends_the_users_sessions(users: Users) -> None:
    """disable revokes the user's live login sessions and counts them."""
    users.add("alice")
    url = BrokerConfig(data_dir=users.data_dir).effective_database_url
    with closing(Store.open(url)) as store:
        sealed = store.get_user("alice")
        assert sealed is not None
        for _ in range(2):
            store.create_login_session(
                token_hash=auth.token_hash(auth.new_token()),
                username="alice",
                at=datetime.now(UTC),
                source="127.0.0.1",
                totp_secret_sealed=sealed.totp_secret_sealed,
            )
    result = users("disable", "alice")
    assert result.returncode == 0, result.stderr
    assert "disabled alice (2 session(s) ended)" in result.stderr


def test_disable_unknown_user_is_an_error(users: Users) -> None:
    """Disabling a name nobody has exits 1."""
    result = users("disable", "nobody")
    assert result.returncode == 1
    assert "relay: error: unknown user 'nobody'" in result.stderr


def test_reset_totp_replaces_the_secret(users: Users) -> None:
    """reset-totp prints a new URI and QR; the old secret's codes stop verifying."""
    old_secret = uri_secret(users.add("alice")["otpauth_uri"], "alice")
    result = users("reset-totp", "alice")
    assert result.returncode == 0, result.stderr
    uri = result.stdout.split("TOTP for alice: ")[1].split()[0]
    new_secret = uri_secret(uri, "alice")
    assert new_secret != old_secret
    assert sum(result.stdout.count(block) for block in QR_BLOCKS) > 100
    assert "not shown again" in result.stdout
    assert any(e["event"] == "user.totp_reset" for e in json_logs(result.stderr))
    sealer = auth.SecretSealer(auth.key_from_text(users.key_file.read_text()))
    sealed = users.sealed_secret("alice")
    assert verify(sealer, sealed, "alice", pyotp.TOTP(new_secret).now()) >= 0
    with pytest.raises(auth.InvalidCredentials):
        verify(sealer, sealed, "alice", pyotp.TOTP(old_secret).now())


def test_add_and_reset_totp_state_the_configured_digits_and_period(
    users: Users,
) -> None:
    """With engineer_auth.totp_digits = 8 and totp_step_s = 60, the URIs of
    ``user add`` and ``user reset-totp`` say so, and their codes verify under
    that policy."""
    env = {
        "RELAY_ENGINEER_AUTH__TOTP_STEP_S": "60",
        "RELAY_ENGINEER_AUTH__TOTP_DIGITS": "8",
    }
    added = users.add("alice", env=env)["otpauth_uri"]
    result = users("reset-totp", "alice", env=env)
    assert result.returncode == 0, result.stderr
    reset = result.stdout.split("TOTP for alice: ")[1].split()[0]
    policy = auth.TotpPolicy(step_s=60, digits=8)
    sealer = auth.SecretSealer(auth.key_from_text(users.key_file.read_text()))
    secret = sealer.unseal(users.sealed_secret("alice"), context=totp_context("alice"))
    for uri in (added, reset):
        assert "digits=8&period=60" in uri
    app = pyotp.parse_uri(reset)
    assert isinstance(app, pyotp.TOTP)
    assert uri_secret(reset, "alice") == secret
    code = app.now()
    assert len(code) == 8
    now = datetime.now(UTC)
    assert (
        auth.verify_totp(secret, code, now=now, last_accepted_step=None, policy=policy)
        >= 0
    )
    # Without the setting, the URI keeps the authenticator defaults.
    plain = users.add("bob")["otpauth_uri"]
    assert "digits=" not in plain
    assert "period=" not in plain


def test_reset_totp_unknown_user_is_an_error(users: Users) -> None:
    """reset-totp of a name nobody has exits 1 and creates no sealing key."""
    result = users("reset-totp", "nobody")
    assert result.returncode == 1
    assert "relay: error: unknown user 'nobody'" in result.stderr
    assert result.stdout == ""
    assert not users.key_file.exists()


def test_list_json_shows_only_public_fields(users: Users) -> None:
    """list --json gives name, role, created, disabled and the enroll permission;
    no hash, no sealed secret."""
    users.add("alice", "admin")
    result = users("list", "--json")
    assert result.returncode == 0, result.stderr
    [row] = json.loads(result.stdout)
    assert set(row) == {
        "username",
        "role",
        "created_at",
        "disabled",
        "can_enroll",
        "groups",
        "organisation",
    }
    assert (row["username"], row["role"], row["disabled"]) == ("alice", "admin", False)
    assert row["can_enroll"] is False
    assert datetime.fromisoformat(row["created_at"]).tzinfo is not None
    assert "argon2" not in result.stdout
    assert "v1:" not in result.stdout


def test_list_plain_shows_a_header_and_each_user(users: Users) -> None:
    """list without --json prints a header and one line per user with its flag."""
    users.add("alice")
    assert users("disable", "alice").returncode == 0
    result = users("list")
    assert result.returncode == 0, result.stderr
    header, line = result.stdout.splitlines()
    assert header.split() == [
        "USER",
        "ROLE",
        "CREATED",
        "ENROLL",
        "DISABLED",
        "ORGANISATION",
        "GROUPS",
    ]
    assert line.split()[:2] == ["alice", "engineer"]
    assert line.split()[-4:] == ["no", "yes", "-", "-"]


def test_list_on_an_empty_data_dir_has_no_users(users: Users) -> None:
    """list --json on a fresh data dir prints an empty list."""
    result = users("list", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_first_add_creates_a_private_sealing_key_file(users: Users) -> None:
    """The first add creates secrets/totp-sealing.key (0600) and logs that it did."""
    result = users(
        "add", "alice", "--role", "engineer", "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(users.key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(users.key_file.parent.stat().st_mode) == 0o700
    assert len(auth.key_from_text(users.key_file.read_text())) == 32
    [event] = [
        e for e in json_logs(result.stderr) if e["event"] == "secrets.sealing_key"
    ]
    assert (event["source"], event["created"]) == (str(users.key_file), True)
    key = users.key_file.read_bytes()
    result = users(
        "add", "bob", "--role", "engineer", "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert result.returncode == 0, result.stderr
    [event] = [
        e for e in json_logs(result.stderr) if e["event"] == "secrets.sealing_key"
    ]
    assert event["created"] is False
    assert users.key_file.read_bytes() == key


def test_sealing_key_from_the_environment_is_used_instead_of_a_file(
    users: Users,
) -> None:
    """With RELAY_TOTP_SEALING_KEY set, no key file is made and that key seals."""
    env = {"RELAY_TOTP_SEALING_KEY": ENV_KEY}
    result = users(
        "add",
        "alice",
        "--role",
        "engineer",
        "--password-stdin",
        "--json",
        stdin=PASSWORD + "\n",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert not users.key_file.exists()
    [event] = [
        e for e in json_logs(result.stderr) if e["event"] == "secrets.sealing_key"
    ]
    assert (event["source"], event["created"]) == ("configuration", False)
    secret = uri_secret(json.loads(result.stdout)["otpauth_uri"], "alice")
    sealer = auth.SecretSealer(auth.key_from_text(ENV_KEY))
    sealed = users.sealed_secret("alice")
    assert verify(sealer, sealed, "alice", pyotp.TOTP(secret).now()) >= 0


def test_a_malformed_sealing_key_in_the_environment_is_an_error(users: Users) -> None:
    """A RELAY_TOTP_SEALING_KEY that is not base64 of 32 bytes exits 1, adds nobody."""
    result = users(
        "add",
        "alice",
        "--role",
        "engineer",
        "--password-stdin",
        stdin=PASSWORD + "\n",
        env={"RELAY_TOTP_SEALING_KEY": "not-a-key"},
    )
    assert result.returncode == 1
    assert "relay: error: unusable TOTP sealing key in RELAY_TOTP_SEALING_KEY" in (
        result.stderr
    )
    assert "not-a-key" not in result.stderr
    assert not users.key_file.exists()
    assert users.list() == {}


# The enroll permission: user add --can-enroll, user set --can-enroll, list


def add_with(
    users: Users, name: str, role: str, *flags: str
) -> subprocess.CompletedProcess[str]:
    """``user add NAME --role ROLE FLAGS --password-stdin --json``, as run."""
    return users(
        "add",
        name,
        "--role",
        role,
        *flags,
        "--password-stdin",
        "--json",
        stdin=PASSWORD + "\n",
    )


def test_add_with_can_enroll_grants_the_permission(users: Users) -> None:
    """add --can-enroll stores the flag, logs it, and list shows it; without the
    flag a user may not enroll."""
    result = add_with(users, "alice", "engineer", "--can-enroll")
    assert result.returncode == 0, result.stderr
    [event] = [e for e in json_logs(result.stderr) if e["event"] == "user.added"]
    assert event["can_enroll"] is True
    users.add("bob")
    rows = users.list()
    assert (rows["alice"]["can_enroll"], rows["bob"]["can_enroll"]) == (True, False)


def test_add_auditor_with_can_enroll_is_refused(users: Users) -> None:
    """Auditors never enroll: add --role auditor --can-enroll exits 2, adds nobody,
    and asks for no password."""
    result = users("add", "carol", "--role", "auditor", "--can-enroll")
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        "relay: error: auditors never enroll devices; --can-enroll is for engineers "
        "(admins may always enroll)"
    )
    assert "Password" not in result.stderr
    assert users.list() == {}


def test_set_can_enroll_yes_and_no(users: Users) -> None:
    """set --can-enroll yes|no changes the stored flag, says so, and logs an audit
    event with the old and new value."""
    users.add("alice")
    granted = users("set", "alice", "--can-enroll", "yes")
    assert granted.returncode == 0, granted.stderr
    assert "alice may enroll devices" in granted.stderr
    [event] = [
        e for e in json_logs(granted.stderr) if e["event"] == "user.permissions_changed"
    ]
    assert (event["can_enroll"], event["previous_can_enroll"], event["audit"]) == (
        True,
        False,
        True,
    )
    assert users.list()["alice"]["can_enroll"] is True
    again = users("set", "alice", "--can-enroll", "yes")
    assert "alice may enroll devices (unchanged)" in again.stderr
    withdrawn = users("set", "alice", "--can-enroll", "no")
    assert withdrawn.returncode == 0, withdrawn.stderr
    assert "alice may not enroll devices" in withdrawn.stderr
    assert users.list()["alice"]["can_enroll"] is False


def test_set_json_prints_the_user_as_list_does(users: Users) -> None:
    """set --json prints the changed user's row, the same shape as list --json."""
    users.add("alice")
    result = users("set", "alice", "--can-enroll", "yes", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == users.list()["alice"]
    assert json.loads(result.stdout)["can_enroll"] is True


def test_set_can_enroll_on_an_auditor_is_refused(users: Users) -> None:
    """Granting the permission to an auditor exits 2 with the reason; nothing
    changes. Withdrawing it (a no-op) is fine."""
    users.add("carol", "auditor")
    result = users("set", "carol", "--can-enroll", "yes")
    assert result.returncode == 2
    assert "relay: error: auditors never enroll devices" in result.stderr
    assert users.list()["carol"]["can_enroll"] is False
    assert users("set", "carol", "--can-enroll", "no").returncode == 0


def test_set_on_an_admin_notes_that_admins_always_enroll(users: Users) -> None:
    """The flag is stored for an admin, with a note that admins enroll anyway;
    the table shows "always" for admins."""
    users.add("root", "admin")
    result = users("set", "root", "--can-enroll", "no")
    assert result.returncode == 0, result.stderr
    assert "admins may always enroll" in result.stderr
    listed = users("list")
    [line] = listed.stdout.splitlines()[1:]
    assert line.split()[1] == "admin"
    assert line.split()[-4:] == ["always", "no", "-", "-"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("set", "alice"), "nothing to set: give --can-enroll yes|no"),
        (("set", "alice", "--can-enroll", "maybe"), "expected yes or no, got 'maybe'"),
        (("set", "Alice", "--can-enroll", "yes"), "invalid user name 'Alice'"),
    ],
    ids=["no-option", "not-yes-or-no", "bad-name"],
)
def test_set_usage_errors_exit_2(
    users: Users, args: tuple[str, ...], message: str
) -> None:
    """set without a setting, with a value other than yes/no, or with an invalid
    name exits 2 and changes nothing."""
    users.add("alice")
    result = users(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert users.list()["alice"]["can_enroll"] is False


def test_set_unknown_user_is_an_error(users: Users) -> None:
    """set on a user that does not exist exits 1."""
    result = users("set", "ghost", "--can-enroll", "yes")
    assert result.returncode == 1
    assert "relay: error: unknown user 'ghost'" in result.stderr
