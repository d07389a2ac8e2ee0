"""Periodic background work inside the gateway's lifespan (checkpoints, review expiry).

A step that raises is logged and retried at the next tick; the loop never dies on its own
and is cancelled when the context closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

log = logging.getLogger("fedgate.background")


@contextlib.asynccontextmanager
async def every(interval_seconds: float, step: Callable[[], Awaitable[None]],
                name: str) -> AsyncIterator[None]:
    """While open, run ``step`` every ``interval_seconds``."""

    async def loop() -> None:
        while True:
            try:
                await step()
            except Exception:
                log.exception("%s failed; retrying in %.0f s", name, interval_seconds)
            await asyncio.sleep(interval_seconds)

    task = asyncio.create_task(loop(), name=name)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
