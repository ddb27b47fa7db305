"""Audit records and the writer's chain (relay/audit/chain.py)."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Final

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, strategies as st

from relay.audit import (
    CHECKPOINT_DOMAIN,
    CHECKPOINT_EVENT,
    GENESIS_HASH,
    MAX_FIELDS,
    MAX_LINE_BYTES,
    MAX_LIST_ITEMS,
    MAX_STRING_CHARS,
    AuditChain,
    checkpoint_due,
    checkpoint_message,
    parse_record,
    record_hash,
)

NOW: Final = datetime(2026, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)
KEY: Final = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))

INJECTIONS: Final = [
    "alice\r\nevent=forged",
    "\x1b[31mred\x1b[0m",
    "evil\u202etxt.exe",
    "nul\x00byte",
    "del\x7fchar",
    "line\u2028sep",
    '"quote" and \\backslash',
]


def _line(event: str = "session.start", **fields: object) -> bytes:
    return AuditChain().append(event, fields, NOW)


def test_first_record_format() -> None:
    """The first record is one canonical line with seq 1, genesis prev and UTC millis."""
    line = _line(session_id="ab12", port=22, ok=True, note=None, channels=["shell"])
    assert line == (
        b'{"channels":["shell"],"event":"session.start","note":null,"ok":true,'
        b'"port":22,"prev":"' + GENESIS_HASH.encode() + b'","seq":1,'
        b'"session_id":"ab12","ts":"2026-06-01T12:00:00.123Z"}\n'
    )


def test_ts_is_converted_to_utc() -> None:
    """An aware time in another zone is written as the same instant in UTC."""
    cet = timezone(timedelta(hours=2))
    line = AuditChain().append("a.b", {}, datetime(2026, 6, 1, 14, 0, tzinfo=cet))
    assert parse_record(line).ts == "2026-06-01T12:00:00.000Z"


def test_naive_ts_is_refused() -> None:
    """A naive datetime is refused, and the error names the field."""
    with pytest.raises(ValueError, match="'ts'"):
        AuditChain().append("a.b", {}, datetime(2026, 6, 1))


def test_chain_links_records() -> None:
    """Each record carries seq + 1 and the hash of the previous line."""
    chain = AuditChain()
    first = chain.append("user.add", {"name": "bob"}, NOW)
    second = chain.append("user.disable", {"name": "bob"}, NOW)
    assert parse_record(second).seq == 2
    assert parse_record(second).prev == hashlib.sha256(first[:-1]).hexdigest()
    assert chain.seq == 2
    assert chain.head == record_hash(second) == parse_record(second).hash


@pytest.mark.parametrize("text", INJECTIONS)
def test_injection_never_appears_raw(text: str) -> None:
    """Control characters, bidi overrides and quotes are escaped and come back intact."""
    line = _line(name=text)
    body = line[:-1]
    assert body.isascii()
    assert all(0x20 <= byte < 0x7F for byte in body)
    assert parse_record(line).fields["name"] == text


def test_long_string_is_cut_within_the_cap() -> None:
    """A 10 KB string comes back cut to the cap with a marker naming what was cut."""
    text = "A" * 10_240
    value = parse_record(_line(name=text)).fields["name"]
    assert isinstance(value, str)
    assert len(value) <= MAX_STRING_CHARS
    kept = value.index("…")
    assert value == "A" * kept + f"…[cut {10_240 - kept}]"


def test_string_at_the_cap_is_kept() -> None:
    """A string of exactly the cap is written whole."""
    text = "é" * MAX_STRING_CHARS
    assert parse_record(_line(name=text)).fields["name"] == text


def test_list_strings_are_cut_and_tuples_become_lists() -> None:
    """Strings inside a list are capped too; a tuple is written as a list."""
    value = parse_record(_line(items=("x" * 5000, 1))).fields["items"]
    assert isinstance(value, list)
    assert isinstance(value[0], str)
    assert len(value[0]) <= MAX_STRING_CHARS
    assert value[1] == 1


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"nested": {"a": 1}}, "nested"),
        ({"deep": [[1]]}, "deep"),
        ({"ratio": 0.5}, "ratio"),
        ({"blob": b"x"}, "blob"),
        ({"big": 2**53}, "big"),
        ({"small": -(2**53)}, "small"),
        ({"many": list(range(MAX_LIST_ITEMS + 1))}, "many"),
        ({"Bad": 1}, "Bad"),
        ({"has space": 1}, "has space"),
        ({"x" * 33: 1}, "x" * 20),
        ({"seq": 5}, "seq"),
        ({"prev": "0"}, "prev"),
        ({"ts": "now"}, "ts"),
        ({"event": "x.y"}, "event"),
    ],
)
def test_bad_fields_are_refused_by_name(fields: dict[str, object], named: str) -> None:
    """Nested values, floats, bytes, big ints, long lists and bad names are refused."""
    chain = AuditChain()
    with pytest.raises(ValueError, match=named):
        chain.append("a.b", fields, NOW)
    assert chain.seq == 0


def test_too_many_fields_are_refused() -> None:
    """More than MAX_FIELDS fields is refused."""
    fields = {f"f{i}": i for i in range(MAX_FIELDS + 1)}
    with pytest.raises(ValueError, match="fields"):
        AuditChain().append("a.b", fields, NOW)


def test_largest_record_fits_the_line_cap() -> None:
    """The worst-case record the writer accepts still parses (MAX_LINE_BYTES bounds it)."""
    worst = "\U0001f600" * MAX_STRING_CHARS
    fields = {f"f{i}": [worst] * MAX_LIST_ITEMS for i in range(MAX_FIELDS)}
    line = AuditChain().append("a.b", fields, NOW)
    assert len(line) <= MAX_LINE_BYTES
    assert parse_record(line).fields == fields


@pytest.mark.parametrize(
    "event", ["session", "Session.start", "a..b", "a.b.c.d.e", ".a", "a.b-c", "a.b\n"]
)
def test_bad_event_names_are_refused(event: str) -> None:
    """An event name must be two to four dotted lowercase parts."""
    with pytest.raises(ValueError, match="'event'"):
        AuditChain().append(event, {}, NOW)


def test_append_refuses_the_checkpoint_event() -> None:
    """Only checkpoint() writes audit.checkpoint records."""
    with pytest.raises(ValueError, match="checkpoint"):
        AuditChain().append(CHECKPOINT_EVENT, {}, NOW)


def test_checkpoint_signs_the_head() -> None:
    """A checkpoint covers the record before it and its signature verifies."""
    chain = AuditChain()
    chain.append("a.b", {}, NOW)
    head = chain.head
    record = parse_record(chain.checkpoint(NOW, KEY))
    assert record.is_checkpoint
    assert record.seq == 2
    assert record.prev == head
    assert record.fields["head_seq"] == 1
    assert record.fields["head"] == head
    sig = record.fields["sig"]
    assert isinstance(sig, str)
    assert len(sig) == 86
    message = CHECKPOINT_DOMAIN + f'{{"head":"{head}","seq":1}}'.encode()
    assert checkpoint_message(1, head) == message
    KEY.public_key().verify(base64.urlsafe_b64decode(sig + "=="), message)


def test_checkpoint_with_a_signing_callable() -> None:
    """A callable signer (an HSM, a key service) is used as given."""
    seen: list[bytes] = []

    def sign(message: bytes) -> bytes:
        seen.append(message)
        return KEY.sign(message)

    chain = AuditChain()
    chain.append("a.b", {}, NOW)
    chain.checkpoint(NOW, sign)
    assert seen == [checkpoint_message(1, parse_record(_line("a.b")).hash)]


def test_checkpoint_refuses_a_bad_signer_and_an_empty_chain() -> None:
    """A signature that is not 64 bytes, or an empty chain, is refused without moving."""
    chain = AuditChain()
    with pytest.raises(ValueError, match="head_seq"):
        chain.checkpoint(NOW, KEY)
    chain.append("a.b", {}, NOW)
    with pytest.raises(ValueError, match="'sig'"):
        chain.checkpoint(NOW, lambda message: b"short")
    assert chain.seq == 1


@given(st.lists(st.sampled_from(["a.b", "cp"]), min_size=1, max_size=12))
def test_resume_continues_seq_and_prev(steps: list[str]) -> None:
    """A chain resumed from the last line writes what the original would have."""
    chain = AuditChain()
    last = chain.append("a.b", {}, NOW)
    for step in steps:
        last = (
            chain.checkpoint(NOW, KEY) if step == "cp" else chain.append(step, {}, NOW)
        )
    resumed = AuditChain.resume(last)
    assert (resumed.seq, resumed.head) == (chain.seq, chain.head)
    assert resumed.append("x.y", {"n": 1}, NOW) == chain.append("x.y", {"n": 1}, NOW)


def test_resume_refuses_a_torn_line() -> None:
    """A last line that is not a whole record cannot be resumed from."""
    with pytest.raises(ValueError, match="JSON"):
        AuditChain.resume(_line()[:-5])


def _body(**obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


_GOOD: Final = {
    "event": "a.b",
    "prev": GENESIS_HASH,
    "seq": 1,
    "ts": "2026-06-01T12:00:00.000Z",
}
_CP: Final = {
    **_GOOD,
    "event": CHECKPOINT_EVENT,
    "head_seq": 0,
    "head": GENESIS_HASH,
    "sig": "A" * 86,
}


@pytest.mark.parametrize(
    ("line", "named"),
    [
        (b"", "JSON"),
        (b"\xff", "JSON"),
        (b'{"a":1.5}', "JSON"),
        (b'{"a":NaN}', "JSON"),
        (b"[" * 100_000, "JSON"),
        (b"[1]", "object"),
        (b"x" * (MAX_LINE_BYTES + 1), "over"),
        (_body(**{k: v for k, v in _GOOD.items() if k != "ts"}), "'ts'"),
        (_body(**{**_GOOD, "seq": 0}), "'seq'"),
        (_body(**{**_GOOD, "seq": True}), "'seq'"),
        (_body(**{**_GOOD, "seq": "1"}), "'seq'"),
        (_body(**{**_GOOD, "prev": "0" * 63}), "'prev'"),
        (_body(**{**_GOOD, "prev": "A" * 64}), "'prev'"),
        (_body(**{**_GOOD, "ts": "2026-06-01T12:00:00Z"}), "'ts'"),
        (_body(**{**_GOOD, "ts": 5}), "'ts'"),
        (_body(**{**_GOOD, "ts": "2026-13-01T12:00:00.000Z"}), "'ts'"),
        (_body(**{**_GOOD, "event": 5}), "'event'"),
        (_body(**{**_GOOD, "name": "x" * (MAX_STRING_CHARS + 1)}), "'name'"),
        (_body(**{**_GOOD, "name": {"a": 1}}), "'name'"),
        (_body(**_GOOD).replace(b",", b", ", 1), "canonical"),
        (_body(**_GOOD).replace(b'"a.b"', b'"\\u0061.b"'), "canonical"),
        (_body(**_GOOD)[:-1] + b',"seq":1}', "canonical"),
        (_body(**_CP), None),
        (_body(**{**_CP, "extra": 1}), "checkpoint"),
        (_body(**{**_CP, "head_seq": -1}), "'head_seq'"),
        (_body(**{**_CP, "head_seq": False}), "'head_seq'"),
        (_body(**{**_CP, "head": "z" * 64}), "'head'"),
        (_body(**{**_CP, "sig": "A" * 85 + "B"}), "'sig'"),
        (_body(**{**_CP, "sig": 5}), "'sig'"),
    ],
)
def test_parse_refuses_what_the_writer_never_writes(
    line: bytes, named: str | None
) -> None:
    """parse_record accepts only the one canonical form of a well-formed record."""
    if named is None:
        assert parse_record(line).is_checkpoint
        return
    with pytest.raises(ValueError, match=named):
        parse_record(line)


@pytest.mark.parametrize(
    ("records", "seconds", "due"),
    [
        (0, 10_000.0, False),
        (1, 0.0, False),
        (100, 0.0, True),
        (1, 60.0, True),
        (99, 59.9, False),
    ],
)
def test_checkpoint_due(records: int, seconds: float, due: bool) -> None:
    """A checkpoint is due after N records or T seconds, and never with nothing to seal."""
    assert (
        checkpoint_due(
            records_since_checkpoint=records,
            seconds_since_checkpoint=seconds,
            every_records=100,
            every_seconds=60.0,
        )
        is due
    )
