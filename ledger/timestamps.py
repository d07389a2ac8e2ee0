"""Timestamps as fedgate writes them: RFC 3339 UTC with microseconds and a ``Z``.

Pure (standard library only), so the researcher SDK and the release path can stamp
times without loading the ledger's database layer.
"""

from __future__ import annotations

import datetime as dt


def utc_timestamp() -> str:
    """The current time, e.g. ``2025-01-31T12:00:00.123456Z``."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
