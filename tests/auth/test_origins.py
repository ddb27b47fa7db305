"""The Origin allow-list: canonical forms, exact matching, refusals."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from auth import OriginAllowList, canonical_origin, origins_for_names


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("https://console.example", "https://console.example"),
        ("https://Console.EXAMPLE", "https://console.example"),
        ("HTTPS://console.example:443", "https://console.example"),
        ("https://console.example:443/", "https://console.example"),
        ("https://console.example:9443", "https://console.example:9443"),
        ("http://console.example:80", "http://console.example"),
        ("http://console.example:443", "http://console.example:443"),
        ("https://127.0.0.1:9443", "https://127.0.0.1:9443"),
        ("https://[::1]:9443", "https://[::1]:9443"),
        ("https://[0:0::1]:9443", "https://[::1]:9443"),
    ],
)
def test_canonical_forms(text: str, canonical: str) -> None:
    """Case, the default port and a bare slash do not make another origin."""
    assert canonical_origin(text) == canonical


@pytest.mark.parametrize(
    "text",
    [
        "",
        "null",
        "console.example",
        "ftp://console.example",
        "wss://console.example",
        "https://",
        "https://console.example/path",
        "https://console.example?x=1",
        "https://console.example#top",
        "https://user@console.example",
        "https://user:pw@console.example",
        "https://console.example:0",
        "https://console.example:65536",
        "https://console.example:port",
        "https://console.example\r\nX: y",
        "https://cönsole.example",
        "https://" + "a" * 600 + ".example",
    ],
)
def test_what_is_not_a_web_origin(text: str) -> None:
    """Anything but scheme://host[:port] with http(s) is refused, not guessed at."""
    with pytest.raises(ValueError, match="not a web origin"):
        canonical_origin(text)


def test_allow_list_matches_exactly() -> None:
    """No suffix, prefix, scheme or port tolerance."""
    allowed = OriginAllowList(["https://console.example:9443"])
    assert allowed.allows("https://console.example:9443")
    assert allowed.allows("https://CONSOLE.example:9443")
    for other in (
        "https://console.example",
        "http://console.example:9443",
        "https://evil-console.example:9443",
        "https://console.example.evil:9443",
        "https://sub.console.example:9443",
        "null",
        "",
    ):
        assert not allowed.allows(other), other


def test_empty_allow_list_refuses_everything() -> None:
    """Before the listener knows its port, nothing is allowed."""
    assert not OriginAllowList([]).allows("https://console.example")


def test_bad_entry_in_the_list_is_refused_with_its_name() -> None:
    """A configuration mistake names the entry."""
    with pytest.raises(ValueError, match=r"console\.example/path"):
        OriginAllowList(["https://ok.example", "https://console.example/path"])


def test_origins_for_certificate_names() -> None:
    """DNS names and IP addresses of the listener certificate, on its port."""
    assert origins_for_names(["localhost", "127.0.0.1", "::1"], 9443) == [
        "https://localhost:9443",
        "https://127.0.0.1:9443",
        "https://[::1]:9443",
    ]
    assert origins_for_names(["relay.example"], 443) == ["https://relay.example"]


def test_repr_and_origins_show_the_canonical_list() -> None:
    """For the startup log and debugging."""
    allowed = OriginAllowList(["https://B.example:443", "https://a.example"])
    assert allowed.origins == {"https://a.example", "https://b.example"}
    assert (
        repr(allowed) == "OriginAllowList(['https://a.example', 'https://b.example'])"
    )


@given(st.text(max_size=200))
def test_allows_never_raises(header: str) -> None:
    """Whatever the client sends as Origin, the answer is a bool."""
    assert OriginAllowList(["https://console.example"]).allows(header) in (
        True,
        False,
    )
