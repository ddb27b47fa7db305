"""The demo's engineer account, so that a newcomer can log in to the console at once.

``relay demo`` creates the engineer ``demo`` on its first run, with a random
password and a new TOTP secret, and keeps both in ``demo-engineer.json`` in the
data dir (mode 0600), so that every later run prints the same credentials.

Decision: this file holds a password and a TOTP secret in clear. That is
acceptable for the demo only (its data dir is a playground on the developer's
machine) and is why only ``relay demo`` ever writes it; ``relay serve`` never
creates accounts on its own. An operator who points the demo at a data dir that
matters gets the account there too: the README says to keep the demo's data dir
apart.

When the account exists but the file is gone (or unreadable), the credentials
cannot be shown again: the demo then says so and names ``relay user add``; it
never resets an account it cannot vouch for. When the file exists but the
account is gone (a fresh database), a new account and file are made.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qs, urlsplit

import auth
from relay.users import create_user

if TYPE_CHECKING:
    from relay.store import Store

__all__ = ["DEMO_ENGINEER", "DemoEngineer", "ensure_demo_engineer"]

DEMO_ENGINEER: Final = "demo"
CREDENTIALS_FILE: Final = "demo-engineer.json"
_PASSWORD_BYTES: Final = 12  # 16 URL-safe characters, within the password rules
_DEFAULT_TOTP_POLICY: Final = auth.TotpPolicy()


@dataclass(frozen=True, slots=True)
class DemoEngineer:
    """The demo account's credentials, as the demo prints them."""

    username: str
    password: str
    otpauth_uri: str

    @property
    def totp_secret(self) -> str:
        """The base32 secret inside :attr:`otpauth_uri` (for manual entry)."""
        query = parse_qs(urlsplit(self.otpauth_uri).query)
        return query["secret"][0]


def ensure_demo_engineer(
    store: Store,
    sealer: auth.SecretSealer,
    data_dir: Path,
    *,
    now: datetime,
    policy: auth.TotpPolicy = _DEFAULT_TOTP_POLICY,
) -> DemoEngineer | None:
    """The demo engineer's credentials, creating the account on first use.

    *policy* (step length and digits) goes into a new account's URI; a saved
    account keeps the URI it was made with.

    Returns:
        The credentials, or None when the account exists but its credentials
        file is missing or unreadable (they cannot be shown again).
    """
    path = data_dir / CREDENTIALS_FILE
    saved = _read(path)
    exists = store.get_user(DEMO_ENGINEER) is not None
    if exists:
        return saved
    password = secrets.token_urlsafe(_PASSWORD_BYTES)
    new_user = create_user(
        store,
        auth.PasswordHasher(),
        sealer,
        username=DEMO_ENGINEER,
        role="engineer",
        password=password,
        now=now,
        policy=policy,
    )
    engineer = DemoEngineer(DEMO_ENGINEER, password, new_user.otpauth_uri)
    _write(path, engineer)
    return engineer


def _read(path: Path) -> DemoEngineer | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        engineer = DemoEngineer(
            str(data["username"]), str(data["password"]), str(data["otpauth_uri"])
        )
        engineer.totp_secret  # noqa: B018 - checks the URI carries a secret
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return engineer


def _write(path: Path, engineer: DemoEngineer) -> None:
    body = json.dumps(
        {
            "username": engineer.username,
            "password": engineer.password,
            "otpauth_uri": engineer.otpauth_uri,
        },
        indent=2,
    )
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(body + "\n")
    os.replace(temporary, path)
