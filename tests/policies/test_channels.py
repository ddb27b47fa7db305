"""Tests for policies.channels: channel patterns, their sets, merging and intersection."""

from __future__ import annotations

import pytest

from policies.channels import ChannelSet, ChannelSyntaxError, parse_channel

EVERY_PORT = ((1, 65535),)


# --- Parsing patterns -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "shell", "ports"),
    [
        pytest.param(["shell"], True, (), id="shell"),
        pytest.param(["tcp:22"], False, ((22, 22),), id="one-port"),
        pytest.param(["tcp:8000-8099"], False, ((8000, 8099),), id="range"),
        pytest.param(["tcp:*"], False, EVERY_PORT, id="every-port"),
        pytest.param(["tcp:1-65535"], False, EVERY_PORT, id="full-range-spelled-out"),
        pytest.param(
            ["tcp:1", "tcp:65535"], False, ((1, 1), (65535, 65535)), id="edges"
        ),
        pytest.param(["tcp:22-22"], False, ((22, 22),), id="range-of-one"),
        pytest.param(
            ["tcp:443", "shell", "tcp:22"],
            True,
            ((22, 22), (443, 443)),
            id="mixed-sorted",
        ),
        pytest.param([], False, (), id="nothing"),
    ],
)
def test_parse_patterns(
    patterns: list[str], shell: bool, ports: tuple[tuple[int, int], ...]
) -> None:
    """Each pattern kind gives the shell flag and sorted inclusive port ranges."""
    assert ChannelSet.parse(patterns) == ChannelSet(shell=shell, ports=ports)


@pytest.mark.parametrize(
    ("patterns", "ports"),
    [
        pytest.param(["tcp:10-20", "tcp:15-30"], ((10, 30),), id="overlapping"),
        pytest.param(["tcp:10-20", "tcp:21-30"], ((10, 30),), id="touching"),
        pytest.param(["tcp:10-20", "tcp:22-30"], ((10, 20), (22, 30)), id="gap-of-one"),
        pytest.param(["tcp:10-30", "tcp:12-14"], ((10, 30),), id="contained"),
        pytest.param(["tcp:22", "tcp:22"], ((22, 22),), id="duplicate"),
        pytest.param(
            ["tcp:23", "tcp:21", "tcp:22"], ((21, 23),), id="adjacent-singles"
        ),
        pytest.param(["tcp:100-200", "tcp:*"], EVERY_PORT, id="star-swallows-all"),
        pytest.param(
            ["tcp:50-60", "tcp:1-9", "tcp:10-12"], ((1, 12), (50, 60)), id="unsorted"
        ),
    ],
)
def test_ranges_are_merged(
    patterns: list[str], ports: tuple[tuple[int, int], ...]
) -> None:
    """Overlapping and touching ranges are joined; separate ones stay apart."""
    assert ChannelSet.parse(patterns).ports == ports


@pytest.mark.parametrize(
    "pattern",
    [
        pytest.param("tcp:30-20", id="backwards-range"),
        pytest.param("tcp:0", id="port-0"),
        pytest.param("tcp:65536", id="port-65536"),
        pytest.param("tcp:0-22", id="range-from-0"),
        pytest.param("tcp:1-65536", id="range-to-65536"),
        pytest.param("tcp:123456", id="six-digits"),
        pytest.param("tcp:", id="no-port"),
        pytest.param("tcp:22-", id="open-range"),
        pytest.param("tcp:-22", id="negative"),
        pytest.param("tcp:22,23", id="comma-list"),
        pytest.param("tcp:*-22", id="star-range"),
        pytest.param("TCP:22", id="upper-case"),
        pytest.param("udp:53", id="udp"),
        pytest.param("Shell", id="capital-shell"),
        pytest.param(" shell", id="leading-space"),
        pytest.param("shell\n", id="trailing-newline"),
        pytest.param("tcp:22 ", id="trailing-space"),
        pytest.param("", id="empty"),
        pytest.param("*", id="bare-star"),
    ],
)
def test_bad_patterns_are_refused(pattern: str) -> None:
    """A pattern that is not shell, tcp:PORT, tcp:LOW-HIGH or tcp:* with ports in range raises."""
    with pytest.raises(
        ChannelSyntaxError,
        match=r"^(not a channel pattern|ports must be in 1\.\.65535)",
    ):
        ChannelSet.parse(["shell", pattern])


def test_backwards_range_message_names_the_pattern() -> None:
    """The error for a backwards range says what is wrong and quotes the pattern."""
    with pytest.raises(ChannelSyntaxError) as caught:
        ChannelSet.parse(["tcp:30-20"])
    assert str(caught.value) == "ports must be in 1..65535, low to high: 'tcp:30-20'"


# --- Requested channels ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        pytest.param("shell", (True, None), id="shell"),
        pytest.param("tcp:22", (False, 22), id="tcp-22"),
        pytest.param("tcp:1", (False, 1), id="lowest"),
        pytest.param("tcp:65535", (False, 65535), id="highest"),
    ],
)
def test_parse_channel(text: str, parsed: tuple[bool, int | None]) -> None:
    """A requested channel is shell or one TCP port."""
    assert parse_channel(text) == parsed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("tcp:22-23", "not a channel", id="range"),
        pytest.param("tcp:*", "not a channel", id="star"),
        pytest.param("udp:53", "not a channel", id="udp"),
        pytest.param("ssh", "not a channel", id="word"),
        pytest.param("tcp:0", "port must be in 1..65535", id="port-0"),
        pytest.param("tcp:65536", "port must be in 1..65535", id="port-65536"),
    ],
)
def test_parse_channel_refuses_patterns_and_junk(text: str, message: str) -> None:
    """A request names one channel: a range, a star, another protocol or a bad port raise."""
    with pytest.raises(ChannelSyntaxError, match=message):
        parse_channel(text)


SOME = ChannelSet.parse(["shell", "tcp:22", "tcp:8000-8099"])


@pytest.mark.parametrize(
    ("channel", "inside"),
    [
        pytest.param("shell", True, id="shell"),
        pytest.param("tcp:22", True, id="listed-port"),
        pytest.param("tcp:8000", True, id="range-low-end"),
        pytest.param("tcp:8050", True, id="range-middle"),
        pytest.param("tcp:8099", True, id="range-high-end"),
        pytest.param("tcp:7999", False, id="below-range"),
        pytest.param("tcp:8100", False, id="above-range"),
        pytest.param("tcp:23", False, id="unlisted-port"),
        pytest.param("tcp:0", False, id="port-0"),
        pytest.param("tcp:65536", False, id="port-65536"),
        pytest.param("tcp:22-23", False, id="range-as-request"),
        pytest.param("tcp:*", False, id="star-as-request"),
        pytest.param("udp:53", False, id="udp"),
        pytest.param("", False, id="empty"),
        pytest.param(42, False, id="not-a-string"),
        pytest.param(None, False, id="none"),
        pytest.param(b"shell", False, id="bytes"),
    ],
)
def test_membership_of_requested_channels(channel: object, inside: bool) -> None:
    """`in` answers for one requested channel; junk is never inside, and never raises."""
    assert (channel in SOME) is inside


def test_shell_is_not_inside_a_ports_only_set() -> None:
    """A set of ports does not allow shell, and a shell-only set allows no port."""
    assert "shell" not in ChannelSet.parse(["tcp:*"])
    assert "tcp:22" not in ChannelSet.parse(["shell"])


def test_everything_allows_shell_and_every_port() -> None:
    """ChannelSet.everything() is shell and tcp:*."""
    everything = ChannelSet.everything()
    assert everything == ChannelSet.parse(["shell", "tcp:*"])
    assert "shell" in everything
    assert "tcp:1" in everything
    assert "tcp:65535" in everything


# --- Intersection ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("left", "right", "both"),
    [
        pytest.param(["shell"], ["shell"], ["shell"], id="shell-both"),
        pytest.param(["shell", "tcp:22"], ["tcp:22"], ["tcp:22"], id="shell-one-side"),
        pytest.param(
            ["tcp:*"], ["tcp:22", "tcp:443"], ["tcp:22", "tcp:443"], id="star"
        ),
        pytest.param(["tcp:1-100"], ["tcp:50-200"], ["tcp:50-100"], id="overlap"),
        pytest.param(
            ["tcp:1-100"], ["tcp:100-200"], ["tcp:100"], id="one-port-overlap"
        ),
        pytest.param(["tcp:1-99"], ["tcp:100-200"], [], id="touching-is-not-overlap"),
        pytest.param(
            ["tcp:1-10", "tcp:20-30"],
            ["tcp:5-25"],
            ["tcp:5-10", "tcp:20-25"],
            id="two-pieces",
        ),
        pytest.param(["shell", "tcp:*"], [], [], id="with-nothing"),
        pytest.param(
            ["shell", "tcp:*"],
            ["shell", "tcp:22", "tcp:443"],
            ["shell", "tcp:22", "tcp:443"],
            id="everything-with-default-ceiling",
        ),
    ],
)
def test_intersection(left: list[str], right: list[str], both: list[str]) -> None:
    """`&` keeps what both sets allow (shell only if both do), in either order."""
    a, b = ChannelSet.parse(left), ChannelSet.parse(right)
    assert (a & b).patterns() == both
    assert (b & a) == (a & b)


def test_intersection_of_disjoint_sets_is_empty() -> None:
    """Nothing in common gives an empty set that shows as 'none'."""
    nothing = ChannelSet.parse(["shell"]) & ChannelSet.parse(["tcp:22"])
    assert nothing.is_empty()
    assert str(nothing) == "none"
    assert not ChannelSet.parse(["tcp:22"]).is_empty()


# --- Showing a set --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "shortest"),
    [
        pytest.param(["tcp:1-65535"], ["tcp:*"], id="full-range-is-star"),
        pytest.param(["tcp:22-22"], ["tcp:22"], id="range-of-one-is-port"),
        pytest.param(["tcp:22", "tcp:23", "tcp:24"], ["tcp:22-24"], id="run-is-range"),
        pytest.param(["tcp:443", "shell"], ["shell", "tcp:443"], id="shell-first"),
        pytest.param(
            ["tcp:8000-8099", "tcp:22", "shell"],
            ["shell", "tcp:22", "tcp:8000-8099"],
            id="mixed",
        ),
    ],
)
def test_patterns_are_the_shortest_form(
    patterns: list[str], shortest: list[str]
) -> None:
    """patterns() shows a set in the fewest policy words, shell first, ports ascending."""
    assert ChannelSet.parse(patterns).patterns() == shortest


@pytest.mark.parametrize(
    "channels",
    [
        pytest.param(ChannelSet.everything(), id="everything"),
        pytest.param(ChannelSet(shell=False, ports=()), id="nothing"),
        pytest.param(SOME, id="shell-port-range"),
        pytest.param(
            ChannelSet(shell=False, ports=((1, 1), (3, 5), (65535, 65535))),
            id="edges",
        ),
    ],
)
def test_patterns_round_trip(channels: ChannelSet) -> None:
    """Parsing what patterns() shows gives the same set back."""
    assert ChannelSet.parse(channels.patterns()) == channels


def test_str_joins_the_patterns() -> None:
    """str() is the patterns separated by commas (what a refusal message shows)."""
    assert str(SOME) == "shell, tcp:22, tcp:8000-8099"
