"""Hostile-input properties for every parser the relay runs on outside data.

Reference matrix section 5 (fuzzing) and the parser rows of section 4: each
property feeds a parser arbitrary bytes or a valid encoding that was mutated
(bit flips, truncation, insertion, huge lengths, deep nesting, values of the
wrong type) and checks that it returns a valid value or raises its one
documented error type; any other exception fails the property, and so does an
example slower than the deadline (a hang, or work out of proportion to the
input). Round-trip properties live next to each parser's unit tests; these are
the hostile ones, and each also checks that what it accepts is consistent
(re-encodes to the same bytes, stays within its limits) and that a change it
should notice is noticed.

Each property counts its examples and, once it has passed, records one
``record_fuzzing`` line for the scorecard. The example count is
``scorecard.scaled(200, 5000)``.
"""

from __future__ import annotations

import atexit
import base64
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, get_args

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, example, given, settings, strategies as st

import auth
from fuzz._shared import json_request
from relay._trio import enrollment_api
from relay.api_contract import MAX_ENROLLMENT_BODY_BYTES
from relay.audit import PROBLEM_REASONS, AuditChain, parse_record, verify_lines
from relay.audit.chain import record_hash
from relay.audit_log import public_key_pem
from relay.audit_reader import (
    export_bundle,
    read_records,
    session_timeline,
    verify_bundle,
    verify_directory,
)
from relay.config import AgentConfig, BrokerConfig, ListenAddress, PKIConfig
from relay.config_file import (
    ConfigError,
    example_agent_config,
    example_config,
    load_agent_config,
    load_config,
)
from relay.proto import control, receipts, tunnel
from relay.proto.errors import RemoteProtocolError
from reliability import scorecard

# Sizes and settings
# ==================

EXAMPLES = int(scorecard.scaled(200, 5000))
#: Per example. The slowest parser here (a CSR that parses and is signed, or a
#: bundle checked file by file) takes a few milliseconds; two seconds is far
#: beyond any honest example on a loaded machine and far below a hang.
DEADLINE = timedelta(seconds=2)
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=DEADLINE,
    # The suite's run is the same every time (a CI run passes or fails for the
    # code, not for the draw); the scorecard's full run explores at random, and
    # what it finds becomes an @example here.
    derandomize=not scorecard.full(),
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
#: Where the file-based properties write (memory, where there is a tmpfs).
SHM = "/dev/shm"  # noqa: S108 - a scratch tmpfs; names still come from mkdtemp
SCRATCH = SHM if os.access(SHM, os.W_OK) else None
#: Deep enough to exhaust any recursive parser's stack (CPython's limit is 1000).
DEPTHS = st.sampled_from([2, 100, 999, 1001, 5_000, 50_000, 200_000])


@dataclass
class Counter:
    """Examples run by one property, recorded for the scorecard once it passes."""

    name: str
    parser: str
    executions: int = 0

    def hit(self) -> None:
        """Count one example."""
        self.executions += 1

    def run(self, prop: Callable[[], None]) -> None:
        """Run the hypothesis property *prop*, check it ran, record it."""
        self.executions = 0
        start = time.monotonic()
        prop()
        seconds = time.monotonic() - start
        # Hypothesis may stop early only when the input space is exhausted,
        # which none of these strategies is.
        assert self.executions >= EXAMPLES // 2, self.executions
        scorecard.record_fuzzing(
            self.name,
            tool="hypothesis",
            executions=self.executions,
            seconds=seconds,
            crashes=0,
            hangs=0,
            parser=self.parser,
            max_examples=EXAMPLES,
            deadline_s=DEADLINE.total_seconds(),
        )


def outcome(call: Callable[[], object], *errors: type[Exception]) -> object:
    """What *call* returns, or the exception of one of *errors* it raised.

    Any other exception propagates and fails the property: that is the crash
    these properties look for.
    """
    try:
        return call()
    except errors as exc:
        return exc


# Mutations shared by every parser
# ================================


def deep_json(depth: int, kind: str) -> bytes:
    """A JSON value nested *depth* levels: arrays, objects or unclosed arrays."""
    if kind == "array":
        return b"[" * depth + b"]" * depth
    if kind == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    return b"[" * depth


HOSTILE_JSON_VALUES: list[object] = [
    None,
    True,
    False,
    0,
    -1,
    2**53,
    2**64,
    -(2**63),
    1.5,
    1e308,
    "",
    "x" * 70_000,
    "\ud800",
    "\x00\x1b[31m\u202e",
    [],
    [[[[]]]],
    ["x"] * 1000,
    {},
    {"type": "hello"},
]


JSON_VALUES: st.SearchStrategy[object] = (
    st.sampled_from(HOSTILE_JSON_VALUES)
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | st.lists(st.integers() | st.text(max_size=8), max_size=4)
)
# One byte-level mutation: (op, position, size, bytes to insert, depth, kind of
# nesting, padding byte). The plan is drawn independently of the input, so the
# strategies are built once (hypothesis is slow to build new ones per example).
MUTATION_STEP = st.tuples(
    st.sampled_from(
        ["flip", "set", "truncate", "insert", "delete", "duplicate", "pad", "nest"]
    ),
    st.integers(0, 2**31),
    st.integers(1, 1 << 17),
    st.binary(min_size=1, max_size=16),
    DEPTHS,
    st.sampled_from(["array", "object", "open"]),
    st.sampled_from([b"\x00", b"A", b" ", b"9"]),
)
MUTATIONS = st.lists(MUTATION_STEP, min_size=1, max_size=4)
JSON_EDIT = st.tuples(
    st.sampled_from(["replace", "add", "remove", "repeat"]),
    st.integers(0, 2**16),
    st.text(max_size=12),
    JSON_VALUES,
)


def apply_mutations(
    base: bytes,
    plan: Sequence[tuple[str, int, int, bytes, int, str, bytes]],
    max_total: int,
) -> bytes:
    """*base* after the byte-level mutations of *plan* (see MUTATION_STEP).

    Bit flips, byte sets, truncation, insertion, deletion, duplication of a
    slice, padding to a large size, and inserting deep nesting.
    """
    data = bytearray(base)
    for op, where, size, insert, depth, kind, pad in plan:
        pos = where % (len(data) + 1)
        if op == "flip" and data:
            data[min(pos, len(data) - 1)] ^= 1 << (size % 8)
        elif op == "set" and data:
            data[min(pos, len(data) - 1)] = size % 256
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = insert
        elif op == "delete":
            del data[pos : pos + 1 + size % 32]
        elif op == "duplicate":
            data[pos:pos] = data[pos : pos + 1 + size % 64] * (1 + size % 8)
        elif op == "pad":
            data[pos:pos] = pad * size
        elif op == "nest":
            data[pos:pos] = deep_json(depth, kind)
        del data[max_total:]
    return bytes(data)


def apply_json_edit(body: dict[str, Any], edit: tuple[str, int, str, object]) -> bytes:
    """*body* with one field's value replaced, a field added or removed, or a key
    repeated; written as compact JSON."""
    op, index, new_key, value = edit
    body = dict(body)
    keys = sorted(body)
    key = keys[index % len(keys)] if keys else new_key
    if op == "replace":
        body[key] = value
    elif op == "add":
        body[new_key] = value
    elif op == "remove":
        body.pop(key, None)
    text = json.dumps(body, separators=(",", ":"))
    if op == "repeat":
        extra = json.dumps({key: value}, separators=(",", ":"))
        text = (text[:-1] + "," if body else "{") + extra[1:]
    return text.encode("utf-8", "surrogatepass")


def mutated(base: bytes, *, max_total: int = 1 << 20) -> st.SearchStrategy[bytes]:
    """*base* after 1 to 4 byte-level mutations."""
    return MUTATIONS.map(functools.partial(_mutate, base, max_total))


def _mutate(
    base: bytes,
    max_total: int,
    plan: Sequence[tuple[str, int, int, bytes, int, str, bytes]],
) -> bytes:
    return apply_mutations(base, plan, max_total)


@functools.lru_cache(maxsize=512)
def mutated_or_json(base: bytes) -> st.SearchStrategy[bytes]:
    """Byte mutations of *base*, or JSON-level ones if it is a JSON object, or both."""
    try:
        body = json.loads(base)
    except (ValueError, RecursionError):
        return mutated(base)
    if not isinstance(body, dict):
        return mutated(base)
    edit = functools.partial(apply_json_edit, body)
    return (
        mutated(base)
        | JSON_EDIT.map(edit)
        | st.tuples(JSON_EDIT, MUTATIONS).map(
            lambda pair: apply_mutations(edit(pair[0]), pair[1], 1 << 20)
        )
    )


# Tunnel frames (relay.proto.tunnel)
# ==================================

STREAM_IDS = st.sampled_from([1, 3, 5, 2**31 - 1]) | st.integers(0, 2**32 - 1)
VALID_FRAMES: list[tunnel.Frame] = [
    tunnel.StreamOpen(stream_id=1, channel="shell", cols=80, rows=24),
    tunnel.StreamOpen(stream_id=3, channel="tcp:443"),
    tunnel.StreamOpenOk(stream_id=1),
    tunnel.StreamOpenFail(
        stream_id=3, code=tunnel.OpenFailCode.CONNECT_FAILED, reason="refused"
    ),
    tunnel.StreamData(stream_id=1, payload=b"ls -l\r"),
    tunnel.StreamData(stream_id=1, payload=b"\xff" * tunnel.MAX_DATA_BYTES),
    tunnel.StreamWindow(stream_id=1, credit=65536),
    tunnel.StreamEof(stream_id=1),
    tunnel.StreamClose(stream_id=1, code=tunnel.StreamCloseCode.ABORTED),
    tunnel.StreamResize(stream_id=1, cols=1000, rows=1),
]
VALID_WIRES = [tunnel.encode(frame) for frame in VALID_FRAMES]


@st.composite
def hostile_frames(draw: st.DrawFn) -> bytes:
    """A valid frame mutated, or one with an extreme header, or a size at the cap."""
    base = draw(st.sampled_from(VALID_WIRES), label="base")
    how = draw(st.sampled_from(["mutate", "header", "size"]), label="how")
    if how == "mutate":
        return draw(mutated(base, max_total=3 * tunnel.MAX_FRAME_BYTES))
    if how == "header":
        head = bytes([draw(st.integers(0, 255))]) + draw(STREAM_IDS).to_bytes(4, "big")
        return head + base[tunnel.HEADER_BYTES :]
    size = draw(
        st.sampled_from(
            [
                tunnel.MAX_FRAME_BYTES - 1,
                tunnel.MAX_FRAME_BYTES,
                tunnel.MAX_FRAME_BYTES + 1,
                4 * tunnel.MAX_FRAME_BYTES,
            ]
        )
    )
    return (base + b"\x00" * size)[:size]


TUNNEL = Counter("tunnel.decode: mutated frames", parser="relay.proto.tunnel.decode")


@SETTINGS
@given(hostile_frames())
@example(b"\x04\x00\x00\x00\x01" + b"x" * (tunnel.MAX_DATA_BYTES + 1))
def _tunnel_decode(wire: bytes) -> None:
    TUNNEL.hit()
    frame = outcome(lambda: tunnel.decode(wire), RemoteProtocolError)
    if isinstance(frame, RemoteProtocolError):
        if len(wire) > tunnel.MAX_FRAME_BYTES:
            assert frame.close_code == 1009
        return
    assert isinstance(frame, tunnel.Frame)
    assert len(wire) <= tunnel.MAX_FRAME_BYTES
    assert tunnel.encode(frame) == wire


def test_tunnel_decode_survives_mutated_frames() -> None:
    """Mutated, re-headed and cap-sized frames decode to the same bytes or raise
    RemoteProtocolError (1009 above 64 KiB), nothing else."""
    TUNNEL.run(_tunnel_decode)


STREAMS = Counter(
    "tunnel.StreamTable: hostile frame sequences",
    parser="relay.proto.tunnel.StreamTable.receive",
)
SESSION_SCRIPT: list[tuple[tunnel.Side, bytes]] = [
    (tunnel.Side.ENGINEER, VALID_WIRES[0]),  # OPEN 1 shell
    (tunnel.Side.DEVICE, VALID_WIRES[2]),  # OPEN_OK 1
    (tunnel.Side.ENGINEER, VALID_WIRES[4]),  # DATA
    (tunnel.Side.DEVICE, VALID_WIRES[4]),
    (tunnel.Side.DEVICE, VALID_WIRES[6]),  # WINDOW
    (tunnel.Side.ENGINEER, VALID_WIRES[9]),  # RESIZE
    (tunnel.Side.ENGINEER, VALID_WIRES[1]),  # OPEN 3 tcp
    (tunnel.Side.DEVICE, VALID_WIRES[3]),  # OPEN_FAIL 3
    (tunnel.Side.ENGINEER, VALID_WIRES[7]),  # EOF
    (tunnel.Side.ENGINEER, VALID_WIRES[8]),  # CLOSE
    (tunnel.Side.DEVICE, VALID_WIRES[8]),
]


@st.composite
def frame_sequences(draw: st.DrawFn) -> list[tuple[tunnel.Side, bytes]]:
    """The script of a session with steps mutated, dropped, repeated or re-sided."""
    steps: list[tuple[tunnel.Side, bytes]] = []
    for side, wire in SESSION_SCRIPT:
        what = draw(
            st.sampled_from(["keep", "keep", "keep", "drop", "twice", "mutate", "swap"])
        )
        if what == "drop":
            continue
        if what == "mutate":
            wire = draw(mutated(wire, max_total=2 * tunnel.MAX_FRAME_BYTES))
        if what == "swap":
            side = side.peer
        steps.append((side, wire))
        if what == "twice":
            steps.append((side, wire))
    extra = draw(
        st.lists(
            st.tuples(st.sampled_from(list(tunnel.Side)), st.sampled_from(VALID_WIRES)),
            max_size=6,
        )
    )
    for item in extra:
        steps.insert(draw(st.integers(0, len(steps))), item)
    return steps


@SETTINGS
@given(frame_sequences(), st.integers(1, 3), st.integers(1, 300_000))
def _stream_table(
    steps: list[tuple[tunnel.Side, bytes]], max_streams: int, window: int
) -> None:
    STREAMS.hit()
    table = tunnel.StreamTable(max_streams=max_streams, initial_window_bytes=window)
    broken = False
    for side, wire in steps:
        try:
            frame = tunnel.decode(wire)
        except RemoteProtocolError:
            continue  # the broker closes the session; the table never sees it
        try:
            outcome = table.receive(frame, sender=side)
        except RemoteProtocolError:
            broken = True
            continue
        assert not broken, "the table took a frame after a protocol error"
        assert outcome in (tunnel.Disposition.DELIVER, tunnel.Disposition.DROP)
        assert len(table) <= max_streams
        for stream_id in table:
            for sender in tunnel.Side:
                assert 0 <= table.credit(stream_id, sender) <= tunnel.MAX_WINDOW_BYTES


def test_stream_table_survives_hostile_frame_sequences() -> None:
    """Any sequence of valid and mutated frames from either side is delivered,
    dropped or refused with RemoteProtocolError; after a refusal every frame is
    refused; streams and credit stay within their limits."""
    STREAMS.run(_stream_table)


# Control messages (relay.proto.control)
# ======================================

SESSION_ID = "0123456789abcdef0123456789abcdef"
NONCE = "A" * 42 + "E"
CONTROL_EVENTS: list[control.Event] = [
    control.Hello(version=1, device_id="pump-7", agent_version="1.0.0"),
    control.Welcome(version=1, heartbeat_interval_s=15.0, broker_version="1.0"),
    control.Heartbeat(seq=7),
    control.Offer(
        session_id=SESSION_ID,
        engineer="alice",
        engineer_role="engineer, ACME",
        reason="pump alarm",
        channels=("shell", "tcp:443"),
        max_seconds=3600,
        grant_deadline_ms=1_700_000_000_000,
        nonce=NONCE,
    ),
    control.Grant(session_id=SESSION_ID, receipt="AQID", signature="BAUG"),
    control.Deny(session_id=SESSION_ID, reason="busy"),
    control.SessionEnded(session_id=SESSION_ID, receipt="AQID", signature="BAUG"),
    control.EndReceiptAck(session_id=SESSION_ID),
    control.RenewRequest(
        csr="-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
    ),
    control.RenewRefused(reason="rate_limited", detail="later"),
]
CONTROL_WIRES = [control.encode(event) for event in CONTROL_EVENTS]
CONTROL = Counter(
    "control.decode + ControlChannel: mutated messages",
    parser="relay.proto.control.decode, ControlChannel.next_event",
)


@st.composite
def hostile_control(draw: st.DrawFn) -> bytes:
    """A valid control message mutated at the byte or JSON level, or deep nesting."""
    if draw(st.integers(0, 9)) == 0:
        return deep_json(draw(DEPTHS), draw(st.sampled_from(["array", "object"])))
    return draw(mutated_or_json(draw(st.sampled_from(CONTROL_WIRES))))


@SETTINGS
@given(st.lists(hostile_control(), min_size=1, max_size=4), st.booleans())
@example([b"[" * 100_000], False)
def _control(messages: list[bytes], hello_first: bool) -> None:
    CONTROL.hit()
    for message in messages:
        try:
            event = control.decode(message)
        except RemoteProtocolError:
            continue
        assert isinstance(event, control.Event)
        assert control.decode(control.encode(event)) == event
    channel = control.ControlChannel(control.Role.BROKER)
    if hello_first:
        channel.receive_message(CONTROL_WIRES[0])
    for message in messages:
        channel.receive_message(message)
    for _ in range(len(messages) + 1):
        try:
            pulled = channel.next_event()
        except RemoteProtocolError:
            assert channel.state is control.State.ERROR
            break
        if pulled is control.NEED_DATA:
            break


def test_control_messages_survive_mutation() -> None:
    """Mutated control messages (wrong types, huge values, extra, missing and
    repeated keys, deep nesting) decode to an event that re-encodes, or raise
    RemoteProtocolError; a channel fed them errs only into State.ERROR."""
    CONTROL.run(_control)


# Receipts (relay.proto.receipts) and the CSR intake (auth.pki)
# ==============================================================


def _fixed_key(secret: int) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(secret, ec.SECP256R1())


@functools.cache
def _pki() -> tuple[auth.CertificateAuthority, ec.EllipticCurvePrivateKey, bytes]:
    """A CA, a device key, and that device's CSR (PEM)."""
    ca = auth.create_ca(
        common_name="Fuzz CA", now=datetime.now(UTC), lifetime=timedelta(days=30)
    )
    key = _fixed_key(0x5EED)
    return ca, key, auth.build_device_csr(key, "pump-7")


@functools.cache
def _device_certificate() -> x509.Certificate:
    ca, _, csr = _pki()
    return auth.sign_device_csr(
        ca,
        csr,
        now=datetime.now(UTC),
        lifetime=timedelta(days=1),
        max_csr_bytes=PKIConfig().max_csr_bytes,
    ).certificate


GRANT = receipts.GrantReceipt(
    session_id=SESSION_ID,
    device_id="pump-7",
    nonce=NONCE,
    engineer="alice",
    channels=("shell", "tcp:443"),
    max_seconds=600,
    granted_at_ms=1_700_000_000_000,
    decided_by="touchscreen",
)
END = receipts.EndReceipt(
    session_id=SESSION_ID,
    device_id="pump-7",
    nonce=NONCE,
    reason="engineer",
    ended_at_ms=1_700_000_600_000,
    bytes_to_device=10,
    bytes_from_device=20,
    streams_opened=1,
)
RECEIPTS = Counter(
    "receipts: mutated signed grant and end receipts",
    parser="relay.proto.receipts.SignedReceipt.from_wire, verify_grant, verify_end",
)


#: Deterministic ECDSA (RFC 6979), so that hypothesis sees the same signature
#: bytes for the same example; verification is the same as for random nonces.
DETERMINISTIC = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)


def _signed(
    key: ec.EllipticCurvePrivateKey, receipt: receipts.Receipt
) -> receipts.SignedReceipt:
    payload = receipts.encode(receipt)
    return receipts.SignedReceipt(
        payload=payload, signature=key.sign(payload, DETERMINISTIC)
    )


@st.composite
def hostile_receipts(draw: st.DrawFn) -> tuple[bool, str, str, bool, bool]:
    """(is_grant, receipt text, signature text, resigned, changed)."""
    is_grant = draw(st.booleans())
    _, key, _ = _pki()
    signed = _signed(key, GRANT if is_grant else END)
    payload, signature = signed.payload, signed.signature
    where = draw(st.sampled_from(["payload", "payload+resign", "signature", "text"]))
    if where.startswith("payload"):
        payload = draw(mutated(payload, max_total=2 * receipts.MAX_PAYLOAD_BYTES))
        if where == "payload+resign":
            # Past the signature check, into the decoder: what a device key
            # holder could send.
            signature = key.sign(payload, DETERMINISTIC)
    elif where == "signature":
        signature = draw(mutated(signature, max_total=2 * receipts.MAX_SIGNATURE_BYTES))
    wire = receipts.SignedReceipt(payload=payload, signature=signature).to_wire()
    wire_receipt, wire_signature = wire
    if where == "text":
        text = draw(mutated(wire_receipt.encode(), max_total=10_000))
        wire_receipt = text.decode("latin-1")
    changed = (wire_receipt, wire_signature) != signed.to_wire()
    return is_grant, wire_receipt, wire_signature, where == "payload+resign", changed


@SETTINGS
@given(hostile_receipts())
def _receipts(case: tuple[bool, str, str, bool, bool]) -> None:
    RECEIPTS.hit()
    is_grant, wire_receipt, wire_signature, resigned, changed = case
    certificate = _device_certificate()
    try:
        signed = receipts.SignedReceipt.from_wire(wire_receipt, wire_signature)
        if is_grant:
            result: receipts.Receipt = receipts.verify_grant(
                certificate,
                signed,
                session_id=SESSION_ID,
                device_id="pump-7",
                nonce=NONCE,
                engineer="alice",
                offered_channels=("shell", "tcp:443"),
                offered_max_seconds=3600,
            )
        else:
            result = receipts.verify_end(
                certificate,
                signed,
                session_id=SESSION_ID,
                device_id="pump-7",
                nonce=NONCE,
            )
    except receipts.ReceiptError as exc:
        reason = exc.reason
    else:
        # What verifies is exactly what the device key signed, canonically
        # encoded.
        assert not changed or resigned
        assert receipts.encode(result) == signed.payload
        return
    assert reason in get_args(receipts.ReceiptErrorReason)


def test_receipts_survive_mutation() -> None:
    """Mutated receipt payloads (re-signed or not), signatures and wire text verify
    to the receipt signed, or raise ReceiptError with a documented reason."""
    RECEIPTS.run(_receipts)


CSR = Counter(
    "auth.sign_device_csr: mutated PEM requests",
    parser="auth.pki.sign_device_csr",
)
MAX_CSR_BYTES = PKIConfig().max_csr_bytes
CSR_REASONS = {"too_large", "malformed", "bad_signature", "weak_key", "bad_device_id"}


@st.composite
def hostile_csrs(draw: st.DrawFn) -> bytes:
    """The device CSR mutated in its PEM armour, its base64, its DER, or its size."""
    _, _, pem = _pki()
    how = draw(st.sampled_from(["bytes", "base64", "der", "size", "blocks"]))
    if how == "bytes":
        return draw(mutated(pem, max_total=2 * MAX_CSR_BYTES))
    lines = pem.splitlines(keepends=True)
    der = base64.b64decode(b"".join(lines[1:-1]))
    if how == "base64":
        body = draw(mutated(b"".join(lines[1:-1]), max_total=2 * MAX_CSR_BYTES))
        return lines[0] + body + lines[-1]
    if how == "der":
        body = draw(mutated(der, max_total=MAX_CSR_BYTES))
        return (
            draw(st.sampled_from([b"", lines[0]]))
            + base64.encodebytes(body)
            + lines[-1]
        )
    if how == "size":
        size = draw(
            st.sampled_from([MAX_CSR_BYTES - 1, MAX_CSR_BYTES, MAX_CSR_BYTES + 1])
        )
        return (pem + b"\n" * size)[:size]
    return pem * draw(st.integers(2, 40))


def _sign(csr: bytes) -> auth.SignedDevice:
    ca, _, _ = _pki()
    return auth.sign_device_csr(
        ca,
        csr,
        now=datetime.now(UTC),
        lifetime=timedelta(days=1),
        max_csr_bytes=MAX_CSR_BYTES,
    )


@SETTINGS
@given(hostile_csrs(), st.booleans())
def _csr(csr: bytes, strict: bool) -> None:
    CSR.hit()
    with warnings.catch_warnings():
        # The broker runs with warnings printed, never raised; pki must cope
        # with both (it turns a raised UserWarning into a refusal).
        warnings.simplefilter("error" if strict else "ignore")
        signed = outcome(lambda: _sign(csr), auth.CertificateRequestError)
    if isinstance(signed, auth.CertificateRequestError):
        assert signed.reason in CSR_REASONS
        assert (signed.reason == "too_large") == (len(csr) > MAX_CSR_BYTES)
        return
    assert isinstance(signed, auth.SignedDevice)
    assert len(csr) <= MAX_CSR_BYTES
    auth.validate_device_id(signed.identity.device_id)


def test_csr_intake_survives_mutated_pem() -> None:
    """A mutated device CSR (PEM armour, base64, DER, size at the cap, repeated
    blocks) is signed for a valid device id or refused with
    CertificateRequestError (too_large above max_csr_bytes), nothing else."""
    CSR.run(_csr)


ENROLL = Counter(
    "enrollment API: hostile request bodies",
    parser="relay._trio.enrollment_api._read_csr + auth.sign_device_csr",
)


@st.composite
def hostile_bodies(draw: st.DrawFn) -> bytes:
    """The JSON body of an enrollment, mutated (JSON and bytes) or oversized."""
    _, _, pem = _pki()
    base = json.dumps({"csr": pem.decode()}).encode()
    how = draw(st.sampled_from(["mutate", "csr", "size"]))
    if how == "mutate":
        return draw(mutated_or_json(base))
    if how == "csr":
        return json.dumps(
            {"csr": draw(hostile_csrs()).decode("latin-1")}, ensure_ascii=False
        ).encode("utf-8")
    size = draw(
        st.sampled_from(
            [MAX_ENROLLMENT_BODY_BYTES, MAX_ENROLLMENT_BODY_BYTES + 1, 1 << 20]
        )
    )
    return base[:-2] + b" " * max(0, size - len(base)) + base[-2:]


@SETTINGS
@given(
    hostile_bodies(),
    st.sampled_from(
        [b"application/json", b"application/json; charset=utf-8", b"text/plain", b""]
    ),
)
@example(b"[" * 50_000, b"application/json")
def _enrollment(body: bytes, content_type: bytes) -> None:
    ENROLL.hit()
    request = json_request(body, content_type)
    csr = outcome(
        lambda: trio.run(enrollment_api._read_csr, request, MAX_ENROLLMENT_BODY_BYTES),
        enrollment_api._Refused,
    )
    if isinstance(csr, enrollment_api._Refused):
        assert csr.status in (400, 413, 415)
        if len(body) > MAX_ENROLLMENT_BODY_BYTES:
            assert csr.status in (413, 415)
        return
    assert isinstance(csr, bytes)
    assert content_type.startswith(b"application/json")
    assert csr.isascii()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _sign(csr)
        except auth.CertificateRequestError:
            return


def test_enrollment_intake_survives_hostile_bodies() -> None:
    """What the enrollment API does with a posted body, up to the signature:
    a refusal of 400, 413 or 415, or ASCII CSR bytes that are signed or refused
    with CertificateRequestError; deep nesting and oversized bodies included."""
    ENROLL.run(_enrollment)


# Audit records (relay.audit.chain, relay.audit.verify, relay.audit_reader)
# =========================================================================

AUDIT_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
AUDIT_PUBLIC = AUDIT_KEY.public_key()
T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def _audit_lines() -> list[bytes]:
    """A small log: every field type, a long string, a checkpoint in the middle,
    and an unsealed record after the last checkpoint."""
    chain = AuditChain()
    lines = [
        chain.append("broker.start", {"version": "1.0", "pid": 42}, T0),
        chain.append(
            "session.requested",
            {
                "session_id": SESSION_ID,
                "engineer": "alice",
                "channels": ["shell", "tcp:443"],
                "reason": "p\u00fcmp \u202e\x1b[31m" + "x" * 2000,
                "urgent": True,
                "ticket": None,
            },
            T0 + timedelta(seconds=1),
        ),
        chain.checkpoint(T0 + timedelta(seconds=2), AUDIT_KEY),
        chain.append("session.end", {"session_id": SESSION_ID, "bytes": 2**53 - 1}, T0),
        chain.checkpoint(T0 + timedelta(seconds=3), AUDIT_KEY),
        chain.append("user.added", {"username": "bob"}, T0 + timedelta(seconds=4)),
    ]
    return lines


AUDIT_LINES = _audit_lines()


def mutated_or_json_line(line: bytes) -> st.SearchStrategy[bytes]:
    """An audit line mutated at the byte or JSON level, newline kept or not."""
    return st.tuples(mutated_or_json(line.removesuffix(b"\n")), st.booleans()).map(
        lambda pair: pair[0] + (b"\n" if pair[1] else b"")
    )


LAST_CHECKPOINT = 5  # seq of the last checkpoint in AUDIT_LINES
RECORDS = Counter(
    "audit parse_record: mutated records", parser="relay.audit.chain.parse_record"
)


@SETTINGS
@given(st.sampled_from(AUDIT_LINES).flatmap(mutated_or_json_line))
def _parse_record(line: bytes) -> None:
    RECORDS.hit()
    try:
        record = parse_record(line)
    except ValueError:
        return
    assert record.hash == record_hash(line)
    assert 1 <= record.seq <= 2**53 - 1


def test_audit_record_parser_survives_mutation() -> None:
    """A mutated audit line parses to a canonical record whose hash is its own,
    or raises ValueError, nothing else (deep nesting and huge lines included)."""
    RECORDS.run(_parse_record)


@st.composite
def hostile_logs(draw: st.DrawFn) -> list[bytes]:
    """AUDIT_LINES with lines mutated, dropped, repeated, swapped or inserted."""
    lines = list(AUDIT_LINES)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["mutate", "drop", "repeat", "swap", "insert"]))
        if not lines:
            break
        index = draw(st.integers(0, len(lines) - 1))
        if op == "mutate":
            lines[index] = draw(mutated_or_json_line(lines[index]))
        elif op == "drop":
            del lines[index]
        elif op == "repeat":
            lines.insert(index, lines[index])
        elif op == "swap":
            other = draw(st.integers(0, len(lines) - 1))
            lines[index], lines[other] = lines[other], lines[index]
        else:
            lines.insert(index, draw(mutated(b"{}\n")))
    return lines


VERIFY = Counter(
    "audit verify_lines: hostile logs", parser="relay.audit.verify.verify_lines"
)


def _unchanged_through(lines: Sequence[bytes], count: int) -> bool:
    """Whether the first *count* records are the original's (newlines aside)."""
    return [line.removesuffix(b"\n") for line in lines[:count]] == [
        line.removesuffix(b"\n") for line in AUDIT_LINES[:count]
    ]


@SETTINGS
@given(hostile_logs(), st.booleans())
def _verify(lines: list[bytes], expect: bool) -> None:
    VERIFY.hit()
    report = verify_lines(
        lines, AUDIT_PUBLIC, expect_checkpoint_seq=LAST_CHECKPOINT if expect else None
    )
    assert report.records <= len(lines)
    if report.problem is not None:
        assert report.problem.reason in PROBLEM_REASONS
        assert 1 <= report.problem.line <= len(lines) + 1
    elif expect:
        # A log that verifies against the sealed seq holds the sealed records
        # byte for byte: nothing before a valid checkpoint can change.
        assert _unchanged_through(lines, LAST_CHECKPOINT)


def test_audit_verifier_survives_hostile_logs() -> None:
    """verify_lines over a log with records mutated, dropped, repeated, swapped or
    inserted returns a report (never raises) naming a documented reason; when it
    verifies up to the last sealed checkpoint, the sealed records are intact."""
    VERIFY.run(_verify)


DIRECTORY = Counter(
    "audit directory: read_records, session_timeline, verify_directory",
    parser="relay.audit_reader.read_records, session_timeline, verify_directory",
)


@st.composite
def hostile_directories(draw: st.DrawFn) -> tuple[list[bytes], int, bytes | None]:
    """(log lines, seq the file is named for, sink line or None)."""
    lines = draw(hostile_logs())
    first = draw(st.sampled_from([1, 1, 1, 2, 3]))
    checkpoint = AUDIT_LINES[LAST_CHECKPOINT - 1]
    sink = draw(
        st.sampled_from([None, checkpoint, AUDIT_LINES[2]])
        | mutated_or_json_line(checkpoint)
    )
    return lines[first - 1 :], first, sink


@SETTINGS
@given(hostile_directories(), st.booleans())
@example(([*AUDIT_LINES, b"[" * 100_000 + b"\n"], 1, None), False)
def _directory(case: tuple[list[bytes], int, bytes | None], partial: bool) -> None:
    DIRECTORY.hit()
    lines, first, sink = case
    with tempfile.TemporaryDirectory(prefix="fuzz-audit-", dir=SCRATCH) as name:
        directory = Path(name)
        (directory / f"audit-{first:012d}.jsonl").write_bytes(b"".join(lines))
        (directory / "audit-key.pem").write_bytes(public_key_pem(AUDIT_PUBLIC))
        if sink is not None:
            (directory / "checkpoints.jsonl").write_bytes(sink)
        for record in read_records(directory, from_seq=2):
            assert isinstance(record, dict)
            assert isinstance(record["seq"], int)
            assert record["seq"] >= 2
        timeline = session_timeline(directory, SESSION_ID, start_seq=0)
        assert all(record.get("session_id") == SESSION_ID for record in timeline)
        result = verify_directory(directory, allow_missing_head=partial)
    problem = result.report.problem
    assert problem is None or problem.reason in PROBLEM_REASONS


def test_audit_directory_readers_survive_hostile_logs() -> None:
    """The audit directory readers (the session timeline the API serves, and
    ``relay audit verify``) over hostile logs and sinks: records and a report,
    never an exception."""
    DIRECTORY.run(_directory)


BUNDLE = Counter(
    "audit verify_bundle: mutated evidence bundles",
    parser="relay.audit_reader.verify_bundle",
)


def _bundle_source(root: Path) -> None:
    """An audit directory and recordings for one session with both receipts."""
    _, key, _ = _pki()
    certificate = _device_certificate()
    fingerprint = auth.certificate_fingerprint(certificate)
    audit_dir, recordings = root / "audit", root / "recordings" / SESSION_ID
    audit_dir.mkdir()
    recordings.mkdir(parents=True)
    cast = b'{"version": 2}\n[0.5, "o", "$ "]\n'
    (recordings / "shell-1.cast").write_bytes(cast)
    (recordings / "device.crt").write_bytes(
        certificate.public_bytes(serialization.Encoding.PEM)
    )
    for kind, receipt in (("grant", GRANT), ("end", END)):
        wire_receipt, wire_signature = _signed(key, receipt).to_wire()
        (recordings / f"{kind}-receipt.json").write_text(
            json.dumps({"receipt": wire_receipt, "signature": wire_signature})
        )
    common = {"session_id": SESSION_ID, "device_id": "pump-7"}
    chain = AuditChain()
    lines = [
        chain.append(
            "session.requested", {**common, "device_fingerprint": fingerprint}, T0
        ),
        chain.append(
            "session.granted",
            {
                "session_id": SESSION_ID,
                "decided_by": GRANT.decided_by,
                "channels": list(GRANT.channels),
                "max_seconds": GRANT.max_seconds,
            },
            T0,
        ),
        chain.append("session.end", {**common, "device_fingerprint": fingerprint}, T0),
        chain.append(
            "session.recording",
            {
                "session_id": SESSION_ID,
                "name": "shell-1.cast",
                "sha256": hashlib.sha256(cast).hexdigest(),
            },
            T0,
        ),
    ]
    checkpoint = chain.checkpoint(T0, AUDIT_KEY)
    (audit_dir / "audit-000000000001.jsonl").write_bytes(b"".join([*lines, checkpoint]))
    (audit_dir / "checkpoints.jsonl").write_bytes(checkpoint)


@functools.cache
def _bundle() -> tuple[Path, tuple[str, ...]]:
    """A valid evidence bundle (built once) and its files, relative names."""
    root = Path(tempfile.mkdtemp(prefix="fuzz-bundle-", dir=SCRATCH))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    _bundle_source(root)
    out = root / "bundle"
    export_bundle(
        audit_dir=root / "audit",
        recordings_dir=root / "recordings",
        since=T0 - timedelta(days=1),
        until=T0 + timedelta(days=1),
        out=out,
        signer=AUDIT_KEY,
    )
    report = verify_bundle(out)
    assert report.ok, report.problems
    assert (report.recordings_checked, report.receipts_checked) == (1, 2)
    names = tuple(
        sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    )
    return out, names


@st.composite
def bundle_changes(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """(file, what, new content): a file mutated, removed or added."""
    out, names = _bundle()
    name = draw(st.sampled_from(names))
    what = draw(st.sampled_from(["mutate", "mutate", "mutate", "remove", "add"]))
    if what == "add":
        return (
            draw(st.sampled_from(["extra.txt", f"sessions/{SESSION_ID}/shell-2.cast"])),
            what,
            b"x",
        )
    if what == "remove":
        return name, what, b""
    original = (out / name).read_bytes()
    if name.endswith(".json"):
        return name, what, draw(mutated_or_json(original))
    return name, what, draw(mutated(original))


@SETTINGS
@given(bundle_changes())
@example(("manifest.json", "mutate", b"[" * 100_000))
@example((f"sessions/{SESSION_ID}/grant-receipt.json", "mutate", b"[" * 100_000))
def _verify_bundle(change: tuple[str, str, bytes]) -> None:
    BUNDLE.hit()
    name, what, content = change
    source, _ = _bundle()
    with tempfile.TemporaryDirectory(prefix="fuzz-bundle-", dir=SCRATCH) as parent:
        bundle = Path(parent) / "bundle"
        shutil.copytree(source, bundle)
        target = bundle / name
        original = target.read_bytes() if target.is_file() else None
        if what == "remove":
            target.unlink()
        else:
            target.write_bytes(content)
        with warnings.catch_warnings():
            # As in `relay audit verify-bundle`: warnings are printed, not raised.
            warnings.simplefilter("ignore")
            report = verify_bundle(bundle)
    unchanged = what == "mutate" and (
        content == original
        or (
            name == "manifest.sig"
            and original is not None
            and content.strip() == original.strip()
        )
    )
    assert report.ok == unchanged, (report.problems, report.notes)


def test_bundle_verifier_survives_mutated_bundles() -> None:
    """verify_bundle over a bundle with one file mutated (bytes or JSON), removed
    or added returns a report, never raises, and the report is not ok exactly
    when something changed."""
    BUNDLE.run(_verify_bundle)


# Configuration (relay.config_file, relay.config)
# ===============================================

TOML_VALUES = st.sampled_from(
    [
        "[" * 5_000 + "]" * 5_000,
        "{a=" * 3_000 + "1" + "}" * 3_000,
        "1" + "0" * 400,
        "-1",
        "0",
        "1e400",
        "inf",
        "-inf",
        "nan",
        "true",
        '"x"',
        '""',
        "[1, 2]",
        '["shell", 3]',
        "{ a = 1 }",
        "1979-05-27T07:32:00Z",
        "07:32:00",
        '"' + "x" * 100_000 + '"',
        "0x7fffffffffffffff",
        "3.5",
        '"[::1]:99999"',
        '"host:"',
    ]
) | st.text(max_size=20)
CONFIG = Counter(
    "config files: mutated broker and agent TOML",
    parser="relay.config_file.load_config, load_agent_config",
)


@st.composite
def hostile_config_text(draw: st.DrawFn, base: str) -> bytes:
    """The example file with values replaced, lines mutated, or bytes mutated."""
    lines = base.splitlines()
    settable = [i for i, line in enumerate(lines) if " = " in line]
    # Uncomment some unset keys so they are parsed too.
    for index, line in enumerate(lines):
        if line.startswith("# ") and line.endswith("(unset by default)"):
            lines[index] = line[2:].split(" = ")[0] + ' = "x"'
            settable.append(index)
    how = draw(st.sampled_from(["value", "value", "bytes", "line"]))
    if how == "value":
        for _ in range(draw(st.integers(1, 3))):
            index = draw(st.sampled_from(settable))
            key = lines[index].split(" = ")[0]
            lines[index] = f"{key} = {draw(TOML_VALUES)}"
        return "\n".join(lines).encode("utf-8", "surrogatepass")
    if how == "line":
        index = draw(st.integers(0, len(lines) - 1))
        lines.insert(
            index,
            draw(st.sampled_from([*lines, "[sessions]", "[[audit]]", "x.y.z = 1"])),
        )
        return "\n".join(lines).encode()
    return draw(mutated(base.encode()))


BROKER_EXAMPLE = example_config()
AGENT_EXAMPLE = example_agent_config()


@SETTINGS
@given(
    st.tuples(st.just(False), hostile_config_text(BROKER_EXAMPLE))
    | st.tuples(st.just(True), hostile_config_text(AGENT_EXAMPLE))
)
@example((False, b"a = " + b"[" * 3_000 + b"]" * 3_000))
@example((True, b"backoff_base_s = 1" + b"0" * 400))
@example((False, b"shutdown_grace_s = " + b"9" * 4_301))  # int digit limit
def _config(case: tuple[bool, bytes]) -> None:
    CONFIG.hit()
    agent, text = case
    with tempfile.TemporaryDirectory(prefix="fuzz-config-", dir=SCRATCH) as name:
        path = Path(name) / "relay.toml"
        path.write_bytes(text)
        config = outcome(
            lambda: load_agent_config(path) if agent else load_config(path, {}),
            ConfigError,
        )
    if isinstance(config, ConfigError):
        assert config.source == str(path)
        return
    assert isinstance(config, AgentConfig if agent else BrokerConfig)


def test_config_files_survive_mutation() -> None:
    """The broker's and the agent's example files with values of every TOML type
    (deep nesting, huge numbers, wrong types), lines or bytes mutated load to a
    config or raise ConfigError naming the file, nothing else."""
    CONFIG.run(_config)


ENVIRONMENT = Counter(
    "config environment: hostile RELAY_* overrides",
    parser="relay.config_file.load_config (environment), ListenAddress.parse",
)
KNOWN_ENV = [
    "RELAY_DATA_DIR",
    "RELAY_DEVICE_LISTEN",
    "RELAY_SERVER_NAMES",
    "RELAY_SHUTDOWN_GRACE_S",
    "RELAY_SESSIONS__MAX_SESSION_SECONDS",
    "RELAY_SESSIONS__WARNING_SECONDS",
    "RELAY_AUDIT__CHECKPOINT_EVERY_RECORDS",
    "RELAY_AUDIT_CHECKPOINT_SINK",
    "RELAY_WEBSOCKET__MAX_MESSAGE_BYTES",
    "RELAY_PKI__MAX_CSR_BYTES",
    "RELAY_ENGINEER_AUTH__TOTP_DIGITS",
    "RELAY_NO_SUCH__KEY",
    "RELAY_CONFIG",
]


@SETTINGS
@given(
    st.dictionaries(
        st.sampled_from(KNOWN_ENV),
        TOML_VALUES | TOML_VALUES.map(lambda value: f'"{value}"'),
        min_size=1,
        max_size=3,
    ),
    st.text(max_size=30)
    | st.sampled_from(["[::1]:0", "host:65536", "h:²", "h:" + "9" * 5000]),
)
@example({"RELAY_SESSIONS__MAX_SESSION_SECONDS": "[" * 5_000 + "]" * 5_000}, "")
def _environment(env: dict[str, str], address: str) -> None:
    ENVIRONMENT.hit()
    config = outcome(lambda: load_config(None, env), ConfigError)
    if isinstance(config, ConfigError):
        assert config.source in env
    else:
        assert isinstance(config, BrokerConfig)
    try:
        parsed = ListenAddress.parse(address)
    except ValueError:
        return
    assert 0 <= parsed.port <= 65535
    assert ListenAddress.parse(str(parsed)) == parsed


def test_config_environment_survives_hostile_overrides() -> None:
    """RELAY_* overrides with hostile TOML values give a config or a ConfigError
    naming the variable; any HOST:PORT text parses to an address that prints and
    parses back the same, or raises ValueError."""
    ENVIRONMENT.run(_environment)
