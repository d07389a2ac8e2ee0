"""The node's origin: the scheme and authority every signed request must be addressed to.

A request's signature covers ``@target-uri`` — scheme, authority, path and query — so it names
the node it was made for. The gateway rebuilds that URI from the node's own origin, never from
the request's ``Host`` header, and refuses a request whose ``Host`` names another authority
(``wrong-node``). A request signed for node A and replayed to node B is therefore refused by B
whatever ``Host`` it carries: A's authority is not B's, and B's own authority is not what was
signed.

The origin is ``[gateway] public_origin`` when the owner configures it (required for a node
behind a reverse proxy or reached by a DNS name), else the address the connection arrived on:
the scheme and the listening socket's host and port, exact for a node addressed by IP and port.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.types import Scope

DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Origin:
    """``scheme://host[:port]``; ``host`` in lower case, an IPv6 address without brackets."""

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Origin:
        """An origin from ``http(s)://host[:port]``; anything else (a path, a query, user
        information, another scheme) raises ``ValueError``."""
        parts = urlsplit(text)
        if (parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/")
                or parts.query or parts.fragment or parts.username is not None):
            raise ValueError(f"{text!r} is not an origin such as https://node.example:8443")
        return cls(parts.scheme, parts.hostname.lower(), parts.port or DEFAULT_PORTS[parts.scheme])

    @property
    def authority(self) -> str:
        """``host[:port]`` as a client writes it (the scheme's default port left out)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}"

    def is_named_by(self, host_header: str) -> bool:
        """True iff a ``Host`` header value names this origin's host and port."""
        try:
            parts = urlsplit(f"{self.scheme}://{host_header}")
            port = parts.port or DEFAULT_PORTS[self.scheme]
        except ValueError:
            return False
        return (parts.hostname == self.host and port == self.port and not parts.path
                and parts.username is None and not parts.query and not parts.fragment)

    def target_uri(self, scope: Scope) -> str:
        """The request's ``@target-uri`` at this origin: the URI a client signs for this node."""
        path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        query = scope.get("query_string", b"").decode("latin-1")
        return f"{self}{path}" + (f"?{query}" if query else "")


def arrival_origin(scope: Scope) -> Origin | None:
    """The origin of the socket the request arrived on (ASGI ``server``); None for a Unix
    socket, which has no authority to compare with."""
    server = scope.get("server")
    if not server or server[1] is None or scope.get("scheme") not in DEFAULT_PORTS:
        return None
    return Origin(scope["scheme"], str(server[0]).lower(), int(server[1]))
