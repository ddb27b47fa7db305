"""Tests for auth.totp: secrets, provisioning URIs, the t-1..t window, reuse, tries.

Codes are made with pyotp itself (the "client", as an authenticator app would), for
fixed instants; nothing here reads the clock.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import pickle
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pyotp
import pytest
from hypothesis import given, settings, strategies as st

from auth import (
    TOTP_DIGITS,
    TOTP_ISSUER,
    TOTP_STEP_S,
    AuthError,
    InvalidCredentials,
    TotpPolicy,
    generate_secret,
    provisioning_uri,
    verify_totp,
)

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"  # noqa: S105 - a test vector, not a credential
# The first instant of step T: 2026-06-01T12:00:00Z is 59343840 * 30 s.
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
T = 59343840
STEP = timedelta(seconds=TOTP_STEP_S)
# Matches no step near T for SECRET (checked below).
WRONG = "000000"

# For SECRET, steps 59655936 and 59655937 happen to have the same code (236860),
# found by a one-off scan; it exercises "a code matching both t-1 and t".
COLLISION_STEP = 59655937
COLLISION_NOW = datetime(2026, 9, 17, 20, 48, 30, tzinfo=UTC)

# Any text, lone surrogates included (valid in JSON, so possible in a request);
# Hypothesis leaves them out of st.text() by default.
ANY_TEXT = st.text(st.characters(exclude_categories=())) | st.text(
    st.characters(categories=["Cs"]) | st.characters(), min_size=1
)


def _code_at(moment: datetime, secret: str = SECRET) -> str:
    """The code an authenticator app whose clock shows *moment* displays."""
    return pyotp.TOTP(secret).at(moment)


def _code_for_step(step: int, secret: str = SECRET) -> str:
    return _code_at(datetime.fromtimestamp(step * TOTP_STEP_S, UTC), secret)


def _outcome(code: str, *, now: datetime = NOW, last: int | None = None) -> int | str:
    """The accepted step, or the reason of the refusal."""
    try:
        return verify_totp(SECRET, code, now=now, last_accepted_step=last)
    except InvalidCredentials as error:
        return error.reason


def _accept(code: str, *, now: datetime = NOW, last: int | None = None) -> int:
    outcome = _outcome(code, now=now, last=last)
    assert isinstance(outcome, int), f"refused: {outcome}"
    return outcome


def _refusal(code: str, *, now: datetime = NOW, last: int | None = None) -> str:
    outcome = _outcome(code, now=now, last=last)
    assert isinstance(outcome, str), f"accepted for step {outcome}"
    return outcome


def _reason(call: Callable[[], object]) -> str:
    with pytest.raises(InvalidCredentials) as info:
        call()
    return info.value.reason


# ---------------------------------------------------------------------------
# Fixtures of the test data itself


def test_fixed_instants_are_where_the_tests_assume() -> None:
    """NOW starts step T, and the collision instant starts step COLLISION_STEP."""
    assert NOW.timestamp() == T * TOTP_STEP_S
    assert COLLISION_NOW.timestamp() == COLLISION_STEP * TOTP_STEP_S
    codes = {_code_for_step(T + offset) for offset in range(-3, 4)}
    assert len(codes) == 7, "codes around T must differ for the window tests"
    assert WRONG not in codes
    assert _code_for_step(COLLISION_STEP - 1) == _code_for_step(COLLISION_STEP)


def test_constants_match_the_authenticator_defaults() -> None:
    """30 s steps and 6 digits: what apps assume when the URI does not say."""
    assert (TOTP_STEP_S, TOTP_DIGITS) == (30, 6)


# ---------------------------------------------------------------------------
# The window: steps t-1 and t only


def test_code_for_the_current_step_is_accepted() -> None:
    """A code for step t is accepted, and t is returned for the caller to store."""
    assert _accept(_code_at(NOW)) == T


def test_code_for_the_previous_step_is_accepted() -> None:
    """A code typed just before the step changed (step t-1) is still accepted."""
    assert _accept(_code_at(NOW - timedelta(seconds=1))) == T - 1


def test_window_follows_the_server_clock_within_a_step() -> None:
    """Anywhere inside step t (0 to 29.999999 s), codes for t and t-1 are accepted."""
    end_of_step = NOW + STEP - timedelta(microseconds=1)
    assert _accept(_code_for_step(T), now=end_of_step) == T
    assert _accept(_code_for_step(T - 1), now=end_of_step) == T - 1


def test_previous_code_expires_when_the_next_step_starts() -> None:
    """At the start of step t+1, the code for t-1 (now t-2) is refused."""
    assert _accept(_code_for_step(T), now=NOW + STEP) == T
    assert _refusal(_code_for_step(T - 1), now=NOW + STEP) == "bad_totp"


@pytest.mark.parametrize("offset", [-3, -2, 1, 2, 3])
def test_codes_outside_t_minus_1_to_t_are_refused(offset: int) -> None:
    """Codes for t-2 and older, and for any future step (t+1, t+2), are bad_totp."""
    assert _refusal(_code_for_step(T + offset)) == "bad_totp"


# Clock skew between server and client, as (server's phase within step T in
# seconds, client clock minus server clock in seconds, step accepted or None).
SKEW_CASES = [
    pytest.param(0, 45, None, id="server 45s behind, client in t+1"),
    pytest.param(20, 45, None, id="server 45s behind, client in t+2"),
    pytest.param(20, -45, T - 1, id="server 45s ahead, client in t-1"),
    pytest.param(10, -45, None, id="server 45s ahead, client in t-2"),
    pytest.param(15, -45, T - 1, id="server 45s ahead, client just in t-1"),
    pytest.param(14, -45, None, id="server 45s ahead, client just in t-2"),
    pytest.param(0, 300, None, id="server 5min behind"),
    pytest.param(0, -300, None, id="server 5min ahead"),
]


@pytest.mark.parametrize(("phase_s", "client_minus_server_s", "expected"), SKEW_CASES)
def test_clock_skew_is_tolerated_only_as_far_as_the_window_allows(
    phase_s: int, client_minus_server_s: int, expected: int | None
) -> None:
    """A skewed client is accepted only when its code lands in step t-1 or t.

    Server 45 s *behind* the client: the client's code is for step t+1 (server at
    0..14 s into t) or t+2 (15..29 s), so it is always refused; future steps are
    never accepted. Server 45 s *ahead*: the client is in t-1 when the server is
    15..29 s into t (accepted), in t-2 when 0..14 s (refused). Five minutes either
    way is ten steps off: refused. The fix for a skewed clock is NTP, not a wider
    window.
    """
    server_now = NOW + timedelta(seconds=phase_s)
    code = _code_at(server_now + timedelta(seconds=client_minus_server_s))
    if expected is None:
        assert _refusal(code, now=server_now) == "bad_totp"
    else:
        assert _accept(code, now=server_now) == expected


def test_time_zone_of_now_does_not_matter() -> None:
    """The same instant in another zone (UTC+2) gives the same result."""
    elsewhere = NOW.astimezone(timezone(timedelta(hours=2)))
    assert _accept(_code_at(NOW), now=elsewhere) == T


def test_sub_second_part_of_now_is_ignored() -> None:
    """The step is floor(now / 30 s): 1 us before a step starts is the step before."""
    just_before = NOW - timedelta(microseconds=1)
    assert _accept(_code_for_step(T - 1), now=just_before) == T - 1
    assert _refusal(_code_for_step(T), now=just_before) == "bad_totp"


def test_wrong_code_is_refused() -> None:
    """A six-digit code that matches neither step is bad_totp."""
    assert _refusal(WRONG) == "bad_totp"


def test_code_from_another_secret_is_refused() -> None:
    """The current code of another user's secret does not open this one."""
    other = "KRSXG5CTMVRXEZLUKN2XAZLSKNSWG4TF"
    assert _refusal(_code_at(NOW, other)) == "bad_totp"


def test_both_window_steps_are_always_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    """A match on the first step compared does not skip the second (constant time)."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for code in (_code_for_step(T - 1), _code_for_step(T), WRONG):
        calls.clear()
        with contextlib.suppress(InvalidCredentials):
            verify_totp(SECRET, code, now=NOW, last_accepted_step=None)
        assert len(calls) == 2


# ---------------------------------------------------------------------------
# Single use


def test_reused_code_is_refused() -> None:
    """A code accepted once is refused the second time: its step is not newer."""
    code = _code_at(NOW)
    step = _accept(code)
    assert _refusal(code, last=step) == "totp_reused"


def test_reused_code_is_refused_in_the_next_step_too() -> None:
    """The code for t, used at t, is still refused at t+1 where it is t-1."""
    assert _refusal(_code_for_step(T), now=NOW + STEP, last=T) == "totp_reused"


def test_older_step_after_a_newer_one_is_refused() -> None:
    """After a login with the code for t, the still-in-window code for t-1 is refused."""
    assert _refusal(_code_for_step(T - 1), last=T) == "totp_reused"


def test_newer_step_after_an_older_one_is_accepted() -> None:
    """After a login with the code for t-1, the code for t works (it is newer)."""
    assert _accept(_code_for_step(T), last=T - 1) == T


@pytest.mark.parametrize("step", [T - 1, T])
def test_last_step_from_the_future_refuses_everything(step: int) -> None:
    """If the stored step is ahead of the server (clock set back), no code passes."""
    assert _refusal(_code_for_step(step), last=T + 5) == "totp_reused"


def test_wrong_code_is_bad_even_when_steps_are_used_up() -> None:
    """A non-matching code is bad_totp, not totp_reused, whatever was used before."""
    assert _refusal(WRONG, last=T) == "bad_totp"


@pytest.mark.parametrize("last", [None, COLLISION_STEP - 1])
def test_code_matching_both_steps_returns_the_newest_unused(last: int | None) -> None:
    """A code equal for t-1 and t (a chance collision) is accepted for t."""
    code = _code_for_step(COLLISION_STEP)
    assert _accept(code, now=COLLISION_NOW, last=last) == COLLISION_STEP


def test_code_matching_both_steps_is_refused_once_t_was_used() -> None:
    """The colliding code, once accepted for t, is not accepted again for t-1."""
    code = _code_for_step(COLLISION_STEP)
    assert _refusal(code, now=COLLISION_NOW, last=COLLISION_STEP) == "totp_reused"


# ---------------------------------------------------------------------------
# Shape of the code


def _fullwidth(code: str) -> str:
    return "".join(chr(0xFF10 + int(digit)) for digit in code)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda code: "", id="empty"),
        pytest.param(lambda code: code[:5], id="five digits"),
        pytest.param(lambda code: code + "0", id="seven digits"),
        pytest.param(lambda code: " " + code, id="leading space"),
        pytest.param(lambda code: code + "\n", id="trailing newline"),
        pytest.param(lambda code: code[:3] + " " + code[3:], id="space inside"),
        pytest.param(lambda code: code[:5] + "a", id="letter"),
        pytest.param(lambda code: "-" + code[1:], id="sign"),
        pytest.param(_fullwidth, id="full-width digits"),
        pytest.param(
            lambda code: "".join(chr(0x0660 + int(d)) for d in code), id="Arabic-Indic"
        ),
        pytest.param(lambda code: code * 1000, id="long"),
    ],
)
def test_malformed_codes_are_refused(make: Callable[[str], str]) -> None:
    """Only exactly six ASCII digits are compared; anything else is bad_totp."""
    assert _refusal(make(_code_at(NOW))) == "bad_totp"


def test_full_width_digits_pass_pyotp_but_not_us() -> None:
    """pyotp's own verify() NFKC-normalises and accepts full-width digits; we don't."""
    fullwidth = _fullwidth(_code_at(NOW))
    assert pyotp.TOTP(SECRET).verify(fullwidth, for_time=NOW)
    assert _refusal(fullwidth) == "bad_totp"


@settings(database=None, max_examples=300)
@given(
    code=st.one_of(
        ANY_TEXT,
        st.text(alphabet="0123456789", min_size=6, max_size=6),
        st.sampled_from([_code_for_step(T + offset) for offset in range(-2, 3)]),
    ),
    last=st.one_of(st.none(), st.integers(min_value=T - 3, max_value=T + 3)),
)
def test_any_code_is_accepted_in_window_or_refused_with_credentials_error(
    code: str, last: int | None
) -> None:
    """Any text returns a fresh step in t-1..t or raises InvalidCredentials."""
    outcome = _outcome(code, last=last)
    if isinstance(outcome, str):
        assert outcome in {"bad_totp", "totp_reused"}
    else:
        assert outcome in {T - 1, T}
        assert last is None or outcome > last
        assert code == _code_for_step(outcome)


# ---------------------------------------------------------------------------
# Caller errors (not login failures)


def test_naive_now_is_a_value_error() -> None:
    """A naive ``now`` is a programming error, not a failed login."""
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_totp(
            SECRET, "123456", now=NOW.replace(tzinfo=None), last_accepted_step=None
        )


def test_now_at_the_epoch_is_a_value_error() -> None:
    """Step t-1 must exist: ``now`` in the first 30 s after 1970 is refused."""
    with pytest.raises(ValueError, match="1970"):
        verify_totp(
            SECRET,
            "123456",
            now=datetime(1970, 1, 1, 0, 0, 29, tzinfo=UTC),
            last_accepted_step=None,
        )
    first = datetime(1970, 1, 1, 0, 0, 30, tzinfo=UTC)
    assert _accept(_code_for_step(0), now=first) == 0


@pytest.mark.parametrize(
    "secret",
    ["", "not base32!", "JBSWY3DP", "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PX\u00e9"],
    ids=["empty", "not base32", "40 bits", "non-ASCII"],
)
def test_unusable_secret_is_a_value_error(secret: str) -> None:
    """A broken stored secret is a ValueError (a store problem), for any code."""
    for code in ("123456", "x"):
        with pytest.raises(ValueError, match="base32") as info:
            verify_totp(secret, code, now=NOW, last_accepted_step=None)
        assert not isinstance(info.value, AuthError)


def test_lowercase_secret_works() -> None:
    """pyotp decodes base32 case-insensitively, so a lower-cased secret still works."""
    code = _code_at(NOW)
    assert verify_totp(SECRET.lower(), code, now=NOW, last_accepted_step=None) == T


# ---------------------------------------------------------------------------
# Secrets and provisioning


def test_generated_secret_is_160_random_bits_of_base32() -> None:
    """A new secret is 32 base32 characters (20 bytes), different each time."""
    secrets = {generate_secret() for _ in range(20)}
    assert len(secrets) == 20
    for secret in secrets:
        assert len(secret) == 32
        assert len(base64.b32decode(secret)) == 20


def test_generated_secret_works_with_verify() -> None:
    """A generated secret round-trips through an authenticator and verify_totp."""
    secret = generate_secret()
    code = _code_at(NOW, secret)
    assert verify_totp(secret, code, now=NOW, last_accepted_step=None) == T


def test_provisioning_uri_round_trips_through_pyotp() -> None:
    """The URI names the secret, user and issuer; defaults are 6 digits and 30 s."""
    uri = provisioning_uri(SECRET, username="alice")
    assert uri.startswith("otpauth://totp/Remote%20Care%20relay:alice?")
    parsed = pyotp.parse_uri(uri)
    assert isinstance(parsed, pyotp.TOTP)
    assert (parsed.secret, parsed.name, parsed.issuer) == (SECRET, "alice", TOTP_ISSUER)
    assert (parsed.digits, parsed.interval) == (TOTP_DIGITS, TOTP_STEP_S)
    assert parsed.at(NOW) == _code_at(NOW)


def test_provisioning_uri_quotes_names() -> None:
    """Spaces and other characters in names are percent-encoded."""
    uri = provisioning_uri(SECRET, username="dr who", issuer="Lab & Co")
    parsed = pyotp.parse_uri(uri)
    assert (parsed.name, parsed.issuer) == ("dr who", "Lab & Co")
    assert " " not in uri


@pytest.mark.parametrize(
    ("username", "issuer"),
    [("", TOTP_ISSUER), ("a:b", TOTP_ISSUER), ("alice", ""), ("alice", "x:y")],
)
def test_provisioning_uri_refuses_empty_names_and_colons(
    username: str, issuer: str
) -> None:
    """Empty names and ':' (the label separator) are refused."""
    with pytest.raises(ValueError, match="no ':'"):
        provisioning_uri(SECRET, username=username, issuer=issuer)


def test_provisioning_uri_refuses_a_bad_secret() -> None:
    """A secret pyotp cannot use is refused before any URI is built."""
    with pytest.raises(ValueError, match="base32"):
        provisioning_uri("JBSWY3DP", username="alice")


# ---------------------------------------------------------------------------
# Other policies (engineer_auth.totp_step_s, totp_digits, totp_past_steps)

LONG = TotpPolicy(step_s=60, digits=8)
# NOW starts an even 30 s step, so it starts a 60 s step too.
T60 = T // 2


def _long_code_for_step(step: int, secret: str = SECRET) -> str:
    """The code an app set up with LONG's URI shows during 60 s step *step*."""
    app = pyotp.TOTP(secret, digits=8, interval=60)
    return app.at(datetime.fromtimestamp(step * 60, UTC))


def _with(
    policy: TotpPolicy, code: str, *, now: datetime = NOW, last: int | None = None
) -> int | str:
    """The accepted step under *policy*, or the reason of the refusal."""
    try:
        return verify_totp(
            SECRET, code, now=now, last_accepted_step=last, policy=policy
        )
    except InvalidCredentials as error:
        return error.reason


def _long(code: str, *, now: datetime = NOW, last: int | None = None) -> int | str:
    return _with(LONG, code, now=now, last=last)


def test_default_policy_is_the_brief_budget() -> None:
    """30 s steps, 6 digits, steps t-1..t."""
    assert TotpPolicy() == TotpPolicy(step_s=30, digits=6, past_steps=1)
    assert (TotpPolicy().step_s, TotpPolicy().digits) == (TOTP_STEP_S, TOTP_DIGITS)


def test_60_s_steps_accept_t_and_t_minus_1_of_the_60_s_sequence() -> None:
    """With 60 s steps the step number halves; codes of t and t-1 pass, t-2 not."""
    assert NOW.timestamp() == T60 * 60
    assert _long(_long_code_for_step(T60)) == T60
    assert _long(_long_code_for_step(T60 - 1)) == T60 - 1
    # Still step T60 59 s later: both codes still pass.
    late = NOW + timedelta(seconds=59)
    assert _long(_long_code_for_step(T60), now=late) == T60
    assert _long(_long_code_for_step(T60 - 1), now=late) == T60 - 1
    assert _long(_long_code_for_step(T60 - 2)) == "bad_totp"
    assert _long(_long_code_for_step(T60 + 1)) == "bad_totp"


def test_60_s_policy_refuses_a_30_s_code() -> None:
    """A code of the 30 s sequence does not pass 60 s steps: not the 6-digit one
    under a 60 s, 6-digit policy, and not by shape under LONG (8 digits)."""
    sixty = TotpPolicy(step_s=60)
    thirty_code = _code_at(NOW + timedelta(seconds=30))  # step T+1, inside T60
    assert thirty_code != pyotp.TOTP(SECRET, interval=60).at(NOW)
    assert _with(sixty, thirty_code) == "bad_totp"
    assert _long(_code_at(NOW)) == "bad_totp"
    assert _with(sixty, pyotp.TOTP(SECRET, interval=60).at(NOW)) == T60


def test_8_digit_codes() -> None:
    """8 digits: the 8-digit code passes; six digits (its last six are the 6-digit
    code of the same step) do not, and the default policy refuses eight."""
    policy = TotpPolicy(digits=8)
    code = pyotp.TOTP(SECRET, digits=8).at(NOW)
    assert len(code) == 8
    assert _with(policy, code) == T
    assert code[2:] == _code_at(NOW)
    for other in (code[2:], code[:6], code + "0"):
        assert _with(policy, other) == "bad_totp"
    assert _refusal(code) == "bad_totp"


def test_no_past_steps_accepts_only_t(monkeypatch: pytest.MonkeyPatch) -> None:
    """past_steps=0: the code of t-1 is refused, the code of t accepted, and one
    step is compared."""
    policy = TotpPolicy(past_steps=0)
    assert _with(policy, _code_for_step(T)) == T
    assert _with(policy, _code_for_step(T - 1)) == "bad_totp"
    calls: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(a)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    with contextlib.suppress(InvalidCredentials):
        verify_totp(SECRET, WRONG, now=NOW, last_accepted_step=None, policy=policy)
    assert len(calls) == 1


def test_reuse_rule_holds_with_another_policy() -> None:
    """With 60 s steps a code accepted once is refused again, also a step later,
    and the t-1 code after the t code is refused too."""
    code = _long_code_for_step(T60)
    step = _long(code)
    assert step == T60
    assert _long(code, last=step) == "totp_reused"
    assert _long(code, now=NOW + timedelta(seconds=60), last=step) == "totp_reused"
    assert _long(_long_code_for_step(T60 - 1), last=step) == "totp_reused"
    assert (
        _long(_long_code_for_step(T60 + 1), now=NOW + timedelta(seconds=60), last=step)
        == T60 + 1
    )


def test_the_epoch_limit_follows_the_policy() -> None:
    """Step t-1 must exist: with 60 s steps, from 1970-01-01 00:01 UTC on; with no
    past step, from the epoch on."""
    with pytest.raises(ValueError, match="1970-01-01T00:01:00Z"):
        verify_totp(
            SECRET,
            "12345678",
            now=datetime(1970, 1, 1, 0, 0, 59, tzinfo=UTC),
            last_accepted_step=None,
            policy=LONG,
        )
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert _with(TotpPolicy(past_steps=0), _code_for_step(0), now=epoch) == 0


def test_provisioning_uri_states_non_default_digits_and_period() -> None:
    """8 digits and 60 s are in the URI (an app would assume 6 and 30 otherwise);
    the defaults are left implicit."""
    uri = provisioning_uri(SECRET, username="alice", policy=LONG)
    assert "digits=8&period=60" in uri
    parsed = pyotp.parse_uri(uri)
    assert isinstance(parsed, pyotp.TOTP)
    assert (parsed.digits, parsed.interval) == (8, 60)
    assert _long(parsed.at(NOW)) == T60
    default = provisioning_uri(SECRET, username="alice", policy=TotpPolicy())
    assert default == provisioning_uri(SECRET, username="alice")
    assert "digits=" not in default
    assert "period=" not in default
    assert "period=60" in provisioning_uri(
        SECRET, username="alice", policy=TotpPolicy(step_s=60)
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"step_s": 45}, "step_s must be 30 or 60, got 45"),
        ({"step_s": 30.0}, "step_s must be 30 or 60, got 30.0"),
        ({"digits": 7}, "digits must be 6 or 8, got 7"),
        ({"past_steps": 2}, "past_steps must be in 0..1, got 2"),
        ({"past_steps": -1}, "past_steps must be in 0..1, got -1"),
        ({"past_steps": True}, "past_steps must be in 0..1, got True"),
    ],
)
def test_policy_refuses_what_apps_do_not_support(
    kwargs: dict[str, object], message: str
) -> None:
    """Only 30/60 s, 6/8 digits and 0/1 past steps (ints, not bools or floats)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        TotpPolicy(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# The exception


def test_invalid_credentials_has_one_text_for_every_reason() -> None:
    """str() is the same for every cause, so it can go to the client as-is."""
    texts = {
        str(InvalidCredentials(reason))
        for reason in (
            "unknown_user",
            "bad_password",
            "bad_totp",
            "totp_reused",
            "totp_reset",
        )
    }
    assert texts == {"invalid username, password or code"}


def test_invalid_credentials_pickles_with_its_reason() -> None:
    """The reason survives a pickle round trip (for process pools, logging queues)."""
    error = InvalidCredentials("totp_reused")
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
    assert isinstance(copy, InvalidCredentials)
    assert isinstance(copy, AuthError)
    assert (copy.reason, str(copy)) == ("totp_reused", str(error))
    assert (
        repr(copy)
        == "InvalidCredentials('totp_reused', 'invalid username, password or code')"
    )
