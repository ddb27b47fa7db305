"""Sets of session channels: what a rule allows, and what several rules allow together.

A channel is what an engineer asks for and opens streams on: ``shell`` (a PTY on
the device) or ``tcp:PORT`` (a TCP connection to a port on the device itself).
A rule names the channels it allows with the same words plus port ranges:
``tcp:8000-8099``, and ``tcp:*`` for every port. A :class:`ChannelSet` holds
that as a flag and a list of disjoint port ranges, so that the channels several
rules allow together (their intersection: the most restrictive wins) is again
a :class:`ChannelSet` that can be shown to a person exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

__all__ = ["ChannelSet", "ChannelSyntaxError", "parse_channel"]

MIN_PORT: Final = 1
MAX_PORT: Final = 65535

_TCP: Final = re.compile(r"tcp:(?:(\*)|([0-9]{1,5})(?:-([0-9]{1,5}))?)")


class ChannelSyntaxError(ValueError):
    """A channel or channel pattern that does not parse."""


def parse_channel(text: str) -> tuple[bool, int | None]:
    """One requested channel: ``(True, None)`` for ``shell``, ``(False, port)``.

    Raises:
        ChannelSyntaxError: Not ``shell`` or ``tcp:PORT`` with PORT in 1..65535.
    """
    if text == "shell":
        return True, None
    match = _TCP.fullmatch(text)
    if match is None or match.group(1) or match.group(3):
        raise ChannelSyntaxError(f"not a channel (shell or tcp:PORT): {text!r}")
    port = int(match.group(2))
    if not MIN_PORT <= port <= MAX_PORT:
        raise ChannelSyntaxError(f"port must be in 1..65535: {text!r}")
    return False, port


@dataclass(frozen=True, slots=True)
class ChannelSet:
    """``shell`` or not, and the TCP ports as sorted, disjoint, inclusive ranges."""

    shell: bool
    ports: tuple[tuple[int, int], ...]

    @classmethod
    def parse(cls, patterns: Iterable[str]) -> ChannelSet:
        """``["shell", "tcp:22", "tcp:8000-8099", "tcp:*"]`` as a set.

        Raises:
            ChannelSyntaxError: A pattern does not parse, or a range runs
                backwards.
        """
        shell = False
        ranges: list[tuple[int, int]] = []
        for text in patterns:
            if text == "shell":
                shell = True
                continue
            match = _TCP.fullmatch(text)
            if match is None:
                raise ChannelSyntaxError(
                    f"not a channel pattern (shell, tcp:PORT, tcp:LOW-HIGH, tcp:*): "
                    f"{text!r}"
                )
            if match.group(1):
                ranges.append((MIN_PORT, MAX_PORT))
                continue
            low = int(match.group(2))
            high = int(match.group(3)) if match.group(3) else low
            if not MIN_PORT <= low <= high <= MAX_PORT:
                raise ChannelSyntaxError(
                    f"ports must be in 1..65535, low to high: {text!r}"
                )
            ranges.append((low, high))
        return cls(shell=shell, ports=_merge(ranges))

    @classmethod
    def everything(cls) -> ChannelSet:
        """``shell`` and every TCP port."""
        return cls(shell=True, ports=((MIN_PORT, MAX_PORT),))  # noqa: S604 - a flag, not a subprocess

    def __contains__(self, channel: object) -> bool:
        if not isinstance(channel, str):
            return False
        try:
            shell, port = parse_channel(channel)
        except ChannelSyntaxError:
            return False
        if shell or port is None:
            return self.shell
        return any(low <= port <= high for low, high in self.ports)

    def __and__(self, other: ChannelSet) -> ChannelSet:
        """What both allow."""
        ranges = [
            (max(a_low, b_low), min(a_high, b_high))
            for a_low, a_high in self.ports
            for b_low, b_high in other.ports
            if max(a_low, b_low) <= min(a_high, b_high)
        ]
        return ChannelSet(shell=self.shell and other.shell, ports=_merge(ranges))

    def is_empty(self) -> bool:
        return not self.shell and not self.ports

    def patterns(self) -> list[str]:
        """The set in the words of a policy file, shortest form."""
        out = ["shell"] if self.shell else []
        for low, high in self.ports:
            if (low, high) == (MIN_PORT, MAX_PORT):
                out.append("tcp:*")
            elif low == high:
                out.append(f"tcp:{low}")
            else:
                out.append(f"tcp:{low}-{high}")
        return out

    def __str__(self) -> str:
        return ", ".join(self.patterns()) or "none"


def _merge(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sorted, with overlapping and touching ranges joined."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return tuple(merged)
