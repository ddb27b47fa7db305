"""The Origin check for WebSocket routes: an exact allow-list of web origins (pure).

A browser sends ``Origin`` with every WebSocket upgrade, and sends the session
cookie along whatever page started it. Without a check, any web page the engineer
visits could open the console's WebSocket with the engineer's cookie
(cross-site WebSocket hijacking; SameSite=Strict helps only in browsers that
honour it). So every WebSocket route compares the Origin with an allow-list,
exactly: scheme, host and port, no wildcards, no suffix matching.

Origins are compared in a canonical form (RFC 6454 serialisation): lower-case
scheme and host, the port left out when it is the scheme's default, no path, no
trailing slash. ``https://Console.Example:443`` and ``https://console.example`` are
the same origin; ``https://console.example:9443`` is another. Only ``https`` and
``http`` origins can be allowed (``http`` is for tests behind a TLS-terminating
proxy and is not recommended).

A request without an ``Origin`` header did not come from a browser page (every
browser sends it on WebSocket upgrades), so the cookie-riding attack does not
apply; the caller decides what such a request may do (the engineer listener lets
it in only with a bearer token, see :mod:`relay._trio.engineer_api`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final
from urllib.parse import urlsplit

__all__ = ["OriginAllowList", "canonical_origin", "origins_for_names"]

_DEFAULT_PORTS: Final = {"https": 443, "http": 80}
#: Longest Origin header looked at; a real one is a scheme, a host and a port.
MAX_ORIGIN_CHARS: Final = 512


def canonical_origin(text: str) -> str:
    """Return the canonical form of the web origin *text*.

    Raises:
        ValueError: *text* is not ``scheme://host[:port]`` with scheme ``https``
            or ``http``, a host, and a port in 1..65535; or it has a path, a
            query, a fragment or user info; or it is over-long.
    """
    if len(text) > MAX_ORIGIN_CHARS or not text.isascii() or not text.isprintable():
        raise ValueError("not a web origin")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(f"not a web origin: {text!r}") from None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if (
        scheme not in _DEFAULT_PORTS
        or not host
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
        or parts.password is not None
        or port == 0
    ):
        raise ValueError(f"not a web origin: {text!r}")
    if ":" in host:  # an IPv6 literal: urlsplit has dropped the brackets
        host = f"[{ipaddress.IPv6Address(host).compressed}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def origins_for_names(names: Iterable[str], port: int) -> list[str]:
    """The ``https`` origins of a listener reached as each of *names* on *port*.

    Names are DNS names or IP addresses (IPv6 without brackets), as found in a
    listener certificate's subject alternative names.
    """
    origins = []
    for name in names:
        host = f"[{name}]" if ":" in name else name
        origins.append(canonical_origin(f"https://{host}:{port}"))
    return origins


class OriginAllowList:
    """An exact allow-list of web origins.

    Args:
        origins: The allowed origins, in any spelling :func:`canonical_origin`
            accepts.

    Raises:
        ValueError: An entry is not a web origin (the message names it).
    """

    __slots__ = ("_allowed",)

    def __init__(self, origins: Iterable[str]) -> None:
        self._allowed = frozenset(canonical_origin(origin) for origin in origins)

    def __repr__(self) -> str:
        return f"OriginAllowList({sorted(self._allowed)!r})"

    @property
    def origins(self) -> frozenset[str]:
        """The allowed origins, canonical."""
        return self._allowed

    def allows(self, header: str) -> bool:
        """Whether an ``Origin`` header value names an allowed origin.

        ``null`` (sandboxed frames, file pages), malformed values and
        everything not on the list are refused.
        """
        try:
            return canonical_origin(header) in self._allowed
        except ValueError:
            return False
