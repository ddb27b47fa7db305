"""Tests for auth.passwords: argon2id hashing, verification and the unknown-user path.

All but one test use cheap argon2 parameters; the one that checks the defaults
reads them back from a hash string. Timing equality between an unknown user and a
wrong password is checked by counting argon2 verifications, never by a stopwatch.
"""

from __future__ import annotations

import pickle
import unicodedata
from collections.abc import Callable
from typing import Literal

import argon2
import pytest
from argon2 import extract_parameters
from hypothesis import given, settings, strategies as st

from auth import (
    DEFAULT_MEMORY_COST,
    DEFAULT_PARALLELISM,
    DEFAULT_TIME_COST,
    MAX_PASSWORD_CHARS,
    MIN_PASSWORD_CHARS,
    AuthError,
    InvalidCredentials,
    PasswordHasher,
    validate_new_password,
)

CHEAP = {"time_cost": 1, "memory_cost": 1024, "parallelism": 1}
PASSWORD = "correct horse battery staple"  # noqa: S105 - a test input, not a credential
GENERIC_TEXT = "invalid username, password or code"

# Any text, lone surrogates included (valid in JSON, so possible in a request);
# Hypothesis leaves them out of st.text() by default.
ANY_TEXT = st.text(st.characters(exclude_categories=())) | st.text(
    st.characters(categories=["Cs"]) | st.characters(), min_size=1
)


@pytest.fixture(scope="module")
def hasher() -> PasswordHasher:
    return PasswordHasher(**CHEAP)


@pytest.fixture(scope="module")
def stored(hasher: PasswordHasher) -> str:
    return hasher.hash(PASSWORD)


@pytest.fixture
def argon2_verifications(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the hash given to every argon2 verification, in order."""
    # argon2.PasswordHasher has __slots__, so the method is replaced on the class
    # (for this test only), not on the instance.
    seen: list[str] = []
    real = argon2.PasswordHasher.verify

    def counting(
        self: argon2.PasswordHasher, hash: str | bytes, password: str | bytes
    ) -> bool:
        seen.append(hash if isinstance(hash, str) else hash.decode("ascii"))
        return real(self, hash, password)

    monkeypatch.setattr(argon2.PasswordHasher, "verify", counting)
    return seen


def _reason(call: Callable[..., object], *args: str) -> str:
    with pytest.raises(InvalidCredentials) as info:
        call(*args)
    return info.value.reason


# ---------------------------------------------------------------------------
# Hash and verify


def test_right_password_verifies(hasher: PasswordHasher, stored: str) -> None:
    """verify() returns without raising for the right password."""
    hasher.verify(stored, PASSWORD)


def test_wrong_password_raises_bad_password(
    hasher: PasswordHasher, stored: str
) -> None:
    """A wrong password raises InvalidCredentials('bad_password') with the generic text."""
    with pytest.raises(InvalidCredentials) as info:
        hasher.verify(stored, PASSWORD + "!")
    assert info.value.reason == "bad_password"
    assert str(info.value) == GENERIC_TEXT
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_each_hash_has_a_fresh_salt(hasher: PasswordHasher) -> None:
    """Hashing one password twice gives two different hashes, both valid."""
    first, second = hasher.hash(PASSWORD), hasher.hash(PASSWORD)
    assert first != second
    hasher.verify(first, PASSWORD)
    hasher.verify(second, PASSWORD)


def test_hash_is_argon2id_with_the_cheap_parameters(stored: str) -> None:
    """The hash records argon2id and the parameters the hasher was built with."""
    parameters = extract_parameters(stored)
    assert parameters.type is argon2.Type.ID
    assert (parameters.time_cost, parameters.memory_cost, parameters.parallelism) == (
        1,
        1024,
        1,
    )
    assert (parameters.salt_len, parameters.hash_len) == (16, 32)


def test_defaults_are_argon2id_t3_m64mib_p4() -> None:
    """The default hasher makes argon2id hashes with t=3, m=65536 KiB, p=4."""
    assert (DEFAULT_TIME_COST, DEFAULT_MEMORY_COST, DEFAULT_PARALLELISM) == (
        3,
        65536,
        4,
    )
    default = PasswordHasher()
    stored = default.hash(PASSWORD)
    assert stored.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    parameters = extract_parameters(stored)
    assert parameters.type is argon2.Type.ID
    assert (parameters.salt_len, parameters.hash_len) == (16, 32)
    assert (
        repr(default) == "PasswordHasher(time_cost=3, memory_cost=65536, parallelism=4)"
    )


def test_hash_made_with_other_parameters_still_verifies(stored: str) -> None:
    """Parameters are read from the stored hash, so old hashes keep working."""
    stronger = PasswordHasher(time_cost=2, memory_cost=2048, parallelism=2)
    stronger.verify(stored, PASSWORD)
    assert _reason(stronger.verify, stored, "wrong") == "bad_password"


def test_argon2i_hash_verifies_but_needs_rehash(hasher: PasswordHasher) -> None:
    """A legacy argon2i hash still verifies (argon2-cffi reads the type); rehash it."""
    legacy = argon2.PasswordHasher(
        time_cost=1, memory_cost=1024, parallelism=1, type=argon2.Type.I
    ).hash(PASSWORD)
    hasher.verify(legacy, PASSWORD)
    assert hasher.needs_rehash(legacy)


# ---------------------------------------------------------------------------
# Rehash


def test_own_hash_needs_no_rehash(hasher: PasswordHasher, stored: str) -> None:
    """A hash made with the current parameters needs no rehash."""
    assert not hasher.needs_rehash(stored)


@pytest.mark.parametrize(
    "parameters",
    [
        {"time_cost": 2, "memory_cost": 1024, "parallelism": 1},
        {"time_cost": 1, "memory_cost": 2048, "parallelism": 1},
        {"time_cost": 1, "memory_cost": 1024, "parallelism": 2},
    ],
)
def test_hash_with_other_parameters_needs_rehash(
    hasher: PasswordHasher, parameters: dict[str, int]
) -> None:
    """A change of any cost parameter makes older hashes need a rehash."""
    assert hasher.needs_rehash(PasswordHasher(**parameters).hash(PASSWORD))


def test_needs_rehash_refuses_a_non_hash(hasher: PasswordHasher) -> None:
    """needs_rehash() on something that is not an argon2 hash is a ValueError."""
    with pytest.raises(ValueError, match="not an argon2 hash"):
        hasher.needs_rehash("not a hash")


# ---------------------------------------------------------------------------
# Broken stored hashes are data errors, not login failures


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param("", id="empty"),
        pytest.param("correct horse battery staple", id="plaintext"),
        pytest.param("$2b$12$abcdefghijklmnopqrstuv", id="bcrypt"),
        pytest.param("$argon2id$v=19$m=1024,t=1,p=1$zzz$zzz", id="bad base64"),
        pytest.param("$argon2id$v=19$m=1024,t=1,p=1$\u00e9$x", id="non-ASCII"),
        pytest.param("NUL", id="NUL-suffixed copy of a good hash"),
    ],
)
def test_broken_stored_hash_is_a_value_error(
    hasher: PasswordHasher, stored: str, broken: str
) -> None:
    """A stored value that is no argon2 hash raises ValueError, not InvalidCredentials.

    The NUL case matters because argon2's C code stops reading at a NUL, so
    argon2-cffi alone would accept "good hash" + "\\0junk" as the good hash.
    """
    if broken == "NUL":
        broken = stored + "\0junk"
    for password in (PASSWORD, "wrong"):
        with pytest.raises(ValueError, match="not an argon2 hash") as info:
            hasher.verify(broken, password)
        assert not isinstance(info.value, AuthError)


# ---------------------------------------------------------------------------
# Unknown users cost the same as wrong passwords


def test_unknown_user_raises_unknown_user(hasher: PasswordHasher) -> None:
    """verify_unknown_user() always raises InvalidCredentials('unknown_user')."""
    with pytest.raises(InvalidCredentials) as info:
        hasher.verify_unknown_user(PASSWORD)
    assert info.value.reason == "unknown_user"
    assert str(info.value) == GENERIC_TEXT


def test_unknown_user_and_wrong_password_each_run_one_argon2_verify(
    hasher: PasswordHasher, stored: str, argon2_verifications: list[str]
) -> None:
    """Both failure paths run exactly one argon2 verification, of equal parameters."""
    assert _reason(hasher.verify, stored, "wrong password") == "bad_password"
    assert argon2_verifications == [stored]
    argon2_verifications.clear()

    assert _reason(hasher.verify_unknown_user, "wrong password") == "unknown_user"
    assert len(argon2_verifications) == 1
    dummy = argon2_verifications[0]
    assert dummy != stored
    # Same type, version, costs and lengths: the same work for argon2.
    assert extract_parameters(dummy) == extract_parameters(stored)


def test_right_password_also_runs_one_argon2_verify(
    hasher: PasswordHasher, stored: str, argon2_verifications: list[str]
) -> None:
    """A successful check costs the same one verification as a failed one."""
    hasher.verify(stored, PASSWORD)
    assert argon2_verifications == [stored]


def test_dummy_hash_is_made_once_per_hasher(
    hasher: PasswordHasher, argon2_verifications: list[str]
) -> None:
    """Every unknown-user check uses the same dummy hash, made at construction."""
    for password in ("a", "b", PASSWORD):
        with pytest.raises(InvalidCredentials):
            hasher.verify_unknown_user(password)
    assert len(argon2_verifications) == 3
    assert len(set(argon2_verifications)) == 1


def test_unknown_user_is_refused_even_if_the_dummy_matched(
    hasher: PasswordHasher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even a (practically impossible) dummy match still raises unknown_user."""

    def always_matches(
        self: argon2.PasswordHasher, hash: str | bytes, password: str | bytes
    ) -> bool:
        return True

    monkeypatch.setattr(argon2.PasswordHasher, "verify", always_matches)
    assert _reason(hasher.verify_unknown_user, PASSWORD) == "unknown_user"


# ---------------------------------------------------------------------------
# How passwords become bytes


def test_decomposed_unicode_matches_composed(hasher: PasswordHasher) -> None:
    """A password typed in decomposed form (as macOS may send it) still matches (NFKC)."""
    composed = "Passw\u00f6rter f\u00fcr \u00c4rzte"
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    hasher.verify(hasher.hash(composed), decomposed)
    hasher.verify(hasher.hash(decomposed), composed)


def test_compatibility_forms_match(hasher: PasswordHasher) -> None:
    """NFKC folds compatibility characters: full-width letters match ASCII ones."""
    hasher.verify(hasher.hash("password-1234"), "\uff50assword-1234")


def test_lone_surrogate_is_a_wrong_password_not_a_crash(
    hasher: PasswordHasher, stored: str, argon2_verifications: list[str]
) -> None:
    """A lone surrogate (valid in JSON) costs one argon2 run and fails like any other."""
    assert _reason(hasher.verify, stored, "\ud800" * 20) == "bad_password"
    assert _reason(hasher.verify_unknown_user, "\ud800") == "unknown_user"
    assert len(argon2_verifications) == 2


def test_surrogate_password_can_be_hashed_and_verified(hasher: PasswordHasher) -> None:
    """hash() and verify() agree on strings with surrogates (no encoding error)."""
    odd = "abc\udfffdef"
    hasher.verify(hasher.hash(odd), odd)


def test_overlong_password_is_not_normalised(
    hasher: PasswordHasher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past 256 characters normalisation is skipped (it is quadratic on combining marks)."""
    attack = "a" + "\u0301" * MAX_PASSWORD_CHARS
    stored = hasher.hash(attack)
    normalised: list[int] = []
    real = unicodedata.normalize

    def recording(form: Literal["NFC", "NFD", "NFKC", "NFKD"], text: str) -> str:
        normalised.append(len(text))
        return real(form, text)

    # A context, not the whole test: pytest's own output calls normalize() too.
    with monkeypatch.context() as patch:
        patch.setattr(unicodedata, "normalize", recording)
        hasher.verify(stored, attack)
        refusal = _reason(hasher.verify, stored, attack + "x")
        hasher.verify(hasher.hash(PASSWORD), PASSWORD)
    assert refusal == "bad_password"
    assert normalised == [len(PASSWORD), len(PASSWORD)]


@settings(database=None, max_examples=50, deadline=None)
@given(password=ANY_TEXT)
def test_any_password_is_accepted_or_refused_with_credentials_error(
    hasher: PasswordHasher, stored: str, password: str
) -> None:
    """Any text (surrogates included) either matches or raises InvalidCredentials."""
    try:
        hasher.verify(stored, password)
    except InvalidCredentials as error:
        outcome = error.reason
    else:
        outcome = "accepted"
    assert outcome == ("accepted" if password == PASSWORD else "bad_password")


# ---------------------------------------------------------------------------
# Construction


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"time_cost": 0}, "time_cost must be at least 1"),
        ({"parallelism": 0}, "parallelism must be at least 1"),
        ({"memory_cost": 7, "parallelism": 1}, "memory_cost must be at least 8 KiB"),
        ({"memory_cost": 31, "parallelism": 4}, r"32 KiB for parallelism=4"),
    ],
)
def test_out_of_range_parameters_are_value_errors(
    parameters: dict[str, int], message: str
) -> None:
    """Bad costs fail at construction with a ValueError that names the parameter."""
    with pytest.raises(ValueError, match=message):
        PasswordHasher(**{**CHEAP, **parameters})


def test_smallest_parameters_work() -> None:
    """t=1, m=8 KiB, p=1 is the smallest argon2 accepts, and it works."""
    tiny = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    tiny.verify(tiny.hash(PASSWORD), PASSWORD)


def test_repr_shows_parameters_only(hasher: PasswordHasher) -> None:
    """The repr shows the costs and nothing else (no dummy hash)."""
    assert (
        repr(hasher) == "PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)"
    )


# ---------------------------------------------------------------------------
# New-password rules


@pytest.mark.parametrize("length", [MIN_PASSWORD_CHARS, 40, MAX_PASSWORD_CHARS])
def test_new_password_of_allowed_length_is_returned_unchanged(length: int) -> None:
    """12 to 256 characters pass and come back unchanged."""
    password = ("p\u00e4ss" * 100)[:length]
    assert validate_new_password(password) is password


@pytest.mark.parametrize(
    ("password", "message"),
    [
        ("", "too short: use at least 12"),
        ("x" * (MIN_PASSWORD_CHARS - 1), "too short: use at least 12"),
        ("x" * (MAX_PASSWORD_CHARS + 1), "too long: use at most 256"),
        ("twelve chars\ud800", "invalid characters"),
    ],
    ids=["empty", "11", "257", "surrogate"],
)
def test_new_password_outside_the_rules_is_a_value_error(
    password: str, message: str
) -> None:
    """Too short, too long or unencodable passwords are refused, without echoing them."""
    with pytest.raises(ValueError, match=message) as info:
        validate_new_password(password)
    assert not password or password not in str(info.value)


def test_min_length_follows_pci_dss() -> None:
    """The minimum is 12 characters (PCI DSS v4.0 8.3.6); the maximum 256."""
    assert (MIN_PASSWORD_CHARS, MAX_PASSWORD_CHARS) == (12, 256)


# ---------------------------------------------------------------------------
# The exception


def test_invalid_credentials_is_an_auth_error_and_pickles() -> None:
    """InvalidCredentials is an AuthError and keeps its reason through pickle."""
    error = InvalidCredentials("bad_password")
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
    assert isinstance(copy, InvalidCredentials)
    assert issubclass(InvalidCredentials, AuthError)
    assert (copy.reason, str(copy)) == ("bad_password", GENERIC_TEXT)
