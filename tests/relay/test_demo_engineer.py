"""The demo's engineer account: made once, printed from its file, never reset."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pyotp
import pytest

import auth
from relay.demo_engineer import (
    CREDENTIALS_FILE,
    DEMO_ENGINEER,
    ensure_demo_engineer,
)
from relay.store import Store
from relay.users import totp_context

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
SEALER = auth.SecretSealer(bytes(range(32)))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open(f"sqlite:///{tmp_path / 'db' / 'relay.sqlite3'}")
    try:
        yield opened
    finally:
        opened.close()


def test_first_run_creates_a_working_account_and_a_private_file(
    store: Store, tmp_path: Path
) -> None:
    """The printed password and TOTP secret are the account's; the file is 0600."""
    engineer = ensure_demo_engineer(store, SEALER, tmp_path, now=NOW)
    assert engineer is not None
    user = store.get_user(DEMO_ENGINEER)
    assert user is not None
    assert user.role == "engineer"
    auth.PasswordHasher().verify(user.password_hash, engineer.password)  # raises if not
    secret = SEALER.unseal(user.totp_secret_sealed, context=totp_context("demo"))
    assert secret == engineer.totp_secret
    assert pyotp.TOTP(secret).now() == pyotp.TOTP(engineer.totp_secret).now()
    path = tmp_path / CREDENTIALS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["password"] == engineer.password


def test_later_runs_print_the_same_credentials(store: Store, tmp_path: Path) -> None:
    first = ensure_demo_engineer(store, SEALER, tmp_path, now=NOW)
    again = ensure_demo_engineer(store, SEALER, tmp_path, now=NOW)
    assert again == first


def test_an_account_without_its_file_is_not_reset(store: Store, tmp_path: Path) -> None:
    """Credentials that cannot be shown again are not invented: None, account kept."""
    first = ensure_demo_engineer(store, SEALER, tmp_path, now=NOW)
    assert first is not None
    before = store.get_user(DEMO_ENGINEER)
    (tmp_path / CREDENTIALS_FILE).write_text("{not json")
    assert ensure_demo_engineer(store, SEALER, tmp_path, now=NOW) is None
    assert store.get_user(DEMO_ENGINEER) == before


def test_a_file_without_its_account_makes_a_new_account(
    store: Store, tmp_path: Path
) -> None:
    """A fresh database with an old file (say, the database was deleted)."""
    (tmp_path / CREDENTIALS_FILE).write_text(
        json.dumps(
            {
                "username": "demo",
                "password": "old",
                "otpauth_uri": "otpauth://x?secret=A",
            }
        )
    )
    engineer = ensure_demo_engineer(store, SEALER, tmp_path, now=NOW)
    assert engineer is not None
    assert engineer.password != "old"  # noqa: S105 - the stale file's value
    user = store.get_user(DEMO_ENGINEER)
    assert user is not None
    auth.PasswordHasher().verify(user.password_hash, engineer.password)  # raises if not
