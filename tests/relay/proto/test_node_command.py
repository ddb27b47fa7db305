"""The wire form of commands between nodes, and the receiver's memory of them."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, strategies as st

from relay.proto.node_command import (
    MAX_NODE_MESSAGE_BYTES,
    CommandKind,
    NodeAck,
    NodeCommand,
    RecentCommands,
    check_node_id,
    decode,
    encode,
)

ID = "0123456789abcdef" * 2
ARGS = {
    CommandKind.END_SESSION: {"session_id": "f" * 32, "reason": "admin"},
    CommandKind.REVOKE_DEVICE: {"device_id": "XR-0042"},
    CommandKind.DISABLE_USER: {"username": "bob"},
    CommandKind.POLICY_RELOAD: {},
    CommandKind.CLAIM_DEVICE: {"session_id": "f" * 32, "device_id": "XR-0042"},
    CommandKind.DEVICE_SEND: {
        "session_id": "f" * 32,
        "device_id": "XR-0042",
        "connection_id": "17",
        # The largest control message a grant can be (its receipt at the cap).
        "message": "x" * 12 * 1024,
    },
    CommandKind.RELEASE_DEVICE: {"session_id": "f" * 32, "device_id": "XR-0042"},
    CommandKind.DEVICE_EVENT: {
        "session_id": "f" * 32,
        "device_id": "XR-0042",
        "connection_id": "17",
        "message": '{"type":"deny"}',
    },
    CommandKind.CONTROL_LOST: {
        "session_id": "f" * 32,
        "device_id": "XR-0042",
        "connection_id": "17",
    },
    CommandKind.DATA_REQUEST: {
        "device_id": "XR-0042",
        "message": '{"type":"data_request"}',
    },
}


@pytest.mark.parametrize("kind", list(CommandKind), ids=str)
def test_every_command_kind_round_trips(kind: CommandKind) -> None:
    command = NodeCommand(ID, "node-a", kind, ARGS[kind])
    assert decode(encode(command)) == command
    assert decode(encode(command).encode()) == command


def test_an_ack_round_trips() -> None:
    ack = NodeAck(ID, "node-b.eu-1:2")
    assert decode(encode(ack)) == ack
    assert "result" not in json.loads(encode(ack))


def test_an_ack_with_a_result_round_trips() -> None:
    """A claim's answer: named strings, a PEM certificate among them."""
    pem = "-----BEGIN CERTIFICATE-----\n" + "A" * 900 + "\n-----END CERTIFICATE-----\n"
    ack = NodeAck(ID, "b", {"connection_id": "3", "certificate": pem, "version": "3"})
    assert decode(encode(ack)) == ack


def test_the_largest_forwarded_control_message_fits() -> None:
    """A grant at the receipt cap, forwarded between nodes, fits the bus."""
    from relay.proto import control, receipts

    grant = control.Grant(
        session_id="f" * 32,
        receipt="A" * receipts.MAX_WIRE_RECEIPT_CHARS,
        signature="A" * receipts.MAX_WIRE_SIGNATURE_CHARS,
    )
    message = control.encode(grant).decode()
    command = NodeCommand(
        ID,
        "node-b",
        CommandKind.DEVICE_EVENT,
        {**ARGS[CommandKind.DEVICE_EVENT], "message": message},
    )
    assert decode(encode(command)) == command


def ack(**fields: object) -> str:
    return json.dumps({"type": "ack", "id": ID, "from": "a", **fields})


def command(**fields: object) -> str:
    body = {"type": "command", "id": ID, "from": "a", "kind": "revoke_device"}
    return json.dumps({**body, "args": {"device_id": "d"}, **fields})


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "not JSON"),
        ("[1]", "not a JSON object"),
        ('{"type": "hello"}', "unknown message type"),
        (json.dumps({"type": "ack", "id": ID}), "fields must be exactly"),
        (ack(x=1), "fields must be exactly"),
        (ack(id="ABC"), "command id"),
        (ack(**{"from": "-a"}), "node id"),
        (ack(**{"from": 7}), "from: not a string"),
        (command(kind="format_disk"), "unknown command kind"),
        (command(args={}), "takes exactly"),
        (command(args={"device_id": "d", "extra": "x"}), "takes exactly"),
        (command(args={"device_id": 7}), r"1\.\.512 characters"),
        (command(args={"Device ID": "d"}), "bad argument name"),
        (command(args=["d"]), "args: an object"),
        (ack(result=["x"]), "result: an object"),
        (ack(result={"Bad Name": "x"}), "bad result name"),
        (ack(result={"version": ""}), r"1\.\.512 characters"),
        (ack(result={"certificate": "x" * 13000}), r"1\.\.12288 characters"),
        ("[" * 9000 + "]" * 9000, "over 16384 bytes"),
        ('{"a":' * 600 + "1" + "}" * 600, "unknown message type"),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        decode(text)


def test_the_size_limit_counts_bytes() -> None:
    """Multi-byte characters count as the bytes Redis carries."""
    near = MAX_NODE_MESSAGE_BYTES // 2
    body = json.dumps({"type": "ack", "id": ID, "from": "a", "pad": "é" * near})
    with pytest.raises(ValueError, match="over 16384 bytes"):
        decode(body)


@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_decode_refuses_with_value_error_only(data: str | bytes) -> None:
    with contextlib.suppress(ValueError):
        decode(data)


@given(
    st.dictionaries(
        st.sampled_from(["type", "id", "from", "kind", "args", "x"]),
        st.one_of(
            st.none(),
            st.integers(),
            st.text(max_size=40),
            st.sampled_from(["command", "ack", ID, "end_session"]),
            st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3),
        ),
    )
)
def test_decode_of_near_miss_objects_refuses_with_value_error_only(
    body: dict[str, object],
) -> None:
    with contextlib.suppress(ValueError):
        decode(json.dumps(body))


def test_commands_are_checked_when_made() -> None:
    with pytest.raises(ValueError, match="takes exactly"):
        NodeCommand(ID, "a", CommandKind.POLICY_RELOAD, {"x": "y"})
    with pytest.raises(ValueError, match=r"1\.\.512"):
        NodeCommand(ID, "a", CommandKind.DISABLE_USER, {"username": ""})
    with pytest.raises(ValueError, match="node id"):
        check_node_id("a" * 65)
    assert check_node_id("broker-1.eu:8443") == "broker-1.eu:8443"


def test_recent_commands_forget_the_oldest_beyond_their_bound() -> None:
    recent = RecentCommands(kept=3)
    for n in range(5):
        recent.add(f"{n:032x}")
    assert len(recent) == 3
    assert f"{0:032x}" not in recent
    assert f"{4:032x}" in recent
    recent.add(f"{2:032x}")  # seen again: now the newest
    recent.add(f"{5:032x}")
    assert f"{2:032x}" in recent
    assert f"{3:032x}" not in recent
    with pytest.raises(ValueError, match="at least 1"):
        RecentCommands(kept=0)


def test_recent_commands_keep_what_each_returned() -> None:
    recent = RecentCommands(kept=2)
    recent.add(f"{1:032x}", {"sent": "true"})
    recent.add(f"{2:032x}")
    assert recent.result(f"{1:032x}") == {"sent": "true"}
    assert recent.result(f"{2:032x}") == {}
