"""User accounts: creating them and resetting their second factor.

The sync glue between the pure credential code (``auth``) and the store, shared by
``relay user ...`` and the engineer API. Passwords are hashed with argon2id, TOTP
secrets are sealed with the data dir's sealing key before they reach the store,
and the plain secret leaves this module only inside the ``otpauth://`` URI that
the new user scans once.

Customers (role ``customer``) are accounts of an instrument owner's staff: they
belong to one organisation and see only the instruments labelled
``customer=<organisation>`` (docs/monitoring.md, "Who sees what"). The
organisation has the form of a device label value, so that it can be compared
with one; every other role has none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Final

import auth
from policies.model import LABEL_VALUE
from relay.store import USER_ROLES

if TYPE_CHECKING:
    from relay.config import EngineerAuthConfig
    from relay.store import Store

USERNAME_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_DEFAULT_TOTP_POLICY: Final = auth.TotpPolicy()


def validate_username(text: str) -> str:
    """Return *text* if it is a valid login name.

    Names are lower case so that "Alice" and "alice" can never be two accounts
    (or two throttles).

    Raises:
        ValueError: Not 1-64 characters of ``a-z 0-9 . _ -`` starting with a letter
            or digit.
    """
    if not USERNAME_PATTERN.fullmatch(text):
        raise ValueError(
            "user names are 1-64 characters: lower-case letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    return text


def validate_role(text: str) -> str:
    """Return *text* if it is a known role.

    Raises:
        ValueError: Not one of engineer, auditor, admin, customer.
    """
    if text not in USER_ROLES:
        raise ValueError(f"role must be one of {', '.join(sorted(USER_ROLES))}")
    return text


def validate_organisation(role: str, organisation: str | None) -> str | None:
    """Return *organisation* if *role* may (and must) have it.

    A customer needs one, of the form of a device label value (what
    ``customer=<organisation>`` on an instrument is compared with: ``ACME``,
    ``Lab 4 GmbH``); every other role has none, so that an organisation never
    widens what an engineer or auditor sees.

    Raises:
        ValueError: A customer without an organisation, one of the wrong form,
            or an organisation for another role.
    """
    if role != "customer":
        if organisation is not None:
            raise ValueError("only customers belong to an organisation")
        return None
    if organisation is None:
        raise ValueError("a customer needs an organisation (--organisation)")
    if not LABEL_VALUE.fullmatch(organisation):
        raise ValueError(
            "an organisation is 1-128 characters: letters, digits, spaces inside, "
            "and _ . : / @ + -"
        )
    return organisation


@dataclass(frozen=True, slots=True)
class NewUser:
    """What a person needs after an account was created or its TOTP reset."""

    username: str
    role: str
    otpauth_uri: str


def totp_policy(config: EngineerAuthConfig) -> auth.TotpPolicy:
    """The TOTP policy the ``engineer_auth`` settings ask for."""
    return auth.TotpPolicy(
        step_s=config.totp_step_s,
        digits=config.totp_digits,
        past_steps=config.totp_past_steps,
    )


def totp_context(username: str) -> str:
    """Associated data for a user's sealed TOTP secret (binds it to the row)."""
    return f"totp:{username}"


def create_user(
    store: Store,
    hasher: auth.PasswordHasher,
    sealer: auth.SecretSealer,
    *,
    username: str,
    role: str,
    password: str,
    now: datetime,
    can_enroll: bool = False,
    policy: auth.TotpPolicy = _DEFAULT_TOTP_POLICY,
    organisation: str | None = None,
) -> NewUser:
    """Create an account with a new TOTP secret.

    Args:
        can_enroll: Give the account the enroll permission (engineers; admins
            may enroll anyway; refused for auditors).
        policy: Step length and digits, stated in the provisioning URI.
        organisation: A customer's organisation (required for customers,
            refused for every other role).

    Raises:
        ValueError: Invalid name, role, organisation or password (too short or
            too long), or *can_enroll* for an auditor or a customer.
        relay.store.UserExists: The name is taken.
    """
    validate_username(username)
    validate_role(role)
    validate_organisation(role, organisation)
    if can_enroll and role == "customer":
        raise ValueError("customers never enroll devices")
    auth.validate_new_password(password)
    secret = auth.generate_secret()
    store.add_user(
        username=username,
        role=role,
        password_hash=hasher.hash(password),
        totp_secret_sealed=sealer.seal(secret, context=totp_context(username)),
        at=now,
        can_enroll=can_enroll,
        organisation=organisation,
    )
    return NewUser(
        username, role, auth.provisioning_uri(secret, username=username, policy=policy)
    )


def reset_totp(
    store: Store,
    sealer: auth.SecretSealer,
    *,
    username: str,
    now: datetime,
    policy: auth.TotpPolicy = _DEFAULT_TOTP_POLICY,
) -> tuple[NewUser, list[str]]:
    """Give *username* a new TOTP secret; their sessions end.

    The last accepted TOTP step is cleared with the old secret, so this is also
    how a user moves to a changed *policy* (step numbers depend on its step).

    Args:
        policy: Step length and digits, stated in the provisioning URI.

    Returns:
        The new enrolment, and the token hashes of the sessions that were revoked.

    Raises:
        relay.store.UnknownUser: No such user.
    """
    secret = auth.generate_secret()
    revoked = store.reset_totp(
        username,
        totp_secret_sealed=sealer.seal(secret, context=totp_context(username)),
        at=now,
    )
    user = store.get_user(username)
    role = user.role if user is not None else ""
    return NewUser(
        username, role, auth.provisioning_uri(secret, username=username, policy=policy)
    ), revoked
