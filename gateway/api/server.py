"""How ``fedgate serve`` runs the gateway on uvicorn: connection cap, header size and timeouts.

uvicorn bounds a request's header block (``h11_max_incomplete_event_size``) and answers 503 past
``limit_concurrency`` connections, but it has no header-read timeout: a client that opens
connections and sends its headers a byte at a time (slowloris) holds each one forever, and with
them the connection cap. ``HeaderTimeoutProtocol`` closes a connection whose request headers
have not all arrived ``header_timeout_seconds`` after it opened or after its previous response.
Body reads have no timer here: a body is read only for an authenticated request
(``gateway.api.middleware``). In production, a reverse proxy in front of the node adds the
timeouts for slow bodies and slow readers (docs/security.md).
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import uvicorn
import uvicorn.config
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.node.deployment import NodeConfig

MAX_HEADER_BYTES = 16 * 1024
KEEP_ALIVE_SECONDS = 5


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers are late."""

    header_timeout_seconds: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers(after=None)

    def on_response_complete(self) -> None:
        finished = self.cycle
        super().on_response_complete()  # may start a pipelined request's cycle at once
        self._await_headers(after=finished)

    def _await_headers(self, *, after: object) -> None:
        """Close the connection unless a request's headers complete in time. uvicorn starts a
        new request cycle exactly when a request's headers have all arrived, so the connection
        is late iff its cycle is still ``after`` (None: no request yet)."""

        def close_if_still_waiting() -> None:
            if self.cycle is after and not self.transport.is_closing():
                self.transport.close()

        self.loop.call_later(self.header_timeout_seconds, close_if_still_waiting)


def uvicorn_settings(config: NodeConfig) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` that bound what one client can hold."""
    protocol = type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,),
                    {"header_timeout_seconds": config.header_timeout_seconds})
    return {
        "http": protocol,
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
        "limit_concurrency": config.max_connections,
        "timeout_keep_alive": KEEP_ALIVE_SECONDS,
    }


def logging_config(log_level: str) -> dict[str, Any]:
    """uvicorn's logging, plus the gateway's own loggers (``fedgate.*``: the job lines of
    ``gateway.node.decision_log``, warnings and errors) on the same stream and format, at
    ``log_level``; without this they would reach no handler and their info lines would be lost."""
    settings = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    settings["formatters"]["fedgate"] = {"()": "uvicorn.logging.DefaultFormatter",
                                         "fmt": "%(levelprefix)s %(name)s: %(message)s"}
    settings["handlers"]["fedgate"] = {"formatter": "fedgate", "class": "logging.StreamHandler",
                                       "stream": "ext://sys.stderr"}
    settings["loggers"]["fedgate"] = {"handlers": ["fedgate"], "level": log_level.upper(),
                                      "propagate": False}
    return settings


def serve(app: Any, config: NodeConfig, *, host: str, port: int, log_level: str) -> None:
    """Serve ``app`` until interrupted."""
    uvicorn.run(app, host=host, port=port, log_level=log_level,
                log_config=logging_config(log_level), **uvicorn_settings(config))
