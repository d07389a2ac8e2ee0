"""Secrets never reach the access log: a logging filter for uvicorn's access lines.

The officer's one-time sign-in link is ``GET /dashboard/login?token=...``; uvicorn logs every
request's full path, so the token (valid until used or expired) would sit in the gateway log,
readable by whoever reads logs. :class:`RedactSecrets` replaces the value of every query
parameter named in :data:`SECRET_PARAMETERS` with ``REDACTED`` before the line is formatted.
"""

from __future__ import annotations

import logging
import re

__all__ = ["SECRET_PARAMETERS", "RedactSecrets", "install"]

SECRET_PARAMETERS = ("token",)
_SECRET = re.compile(r"([?&](?:" + "|".join(SECRET_PARAMETERS) + r")=)[^&#\s]*")


def redact(path: str) -> str:
    """``path`` with the values of secret query parameters replaced."""
    return _SECRET.sub(r"\1REDACTED", path)


class RedactSecrets(logging.Filter):
    """Rewrites uvicorn access records (args: client, method, path, http version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact(args[2]), *args[3:])
        return True


def install(logger_name: str = "uvicorn.access") -> None:
    """Add the filter to ``logger_name`` once (idempotent)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, RedactSecrets) for f in logger.filters):
        logger.addFilter(RedactSecrets())
