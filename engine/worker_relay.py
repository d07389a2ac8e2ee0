"""The only way out of a job's sandbox: a relay to the owner's TFF remote workers.

A job keeps its loopback-only network namespace even when the node uses remote workers. The
launcher (in the gateway's event loop, outside the sandbox) opens one Unix socket per configured
worker in a fresh directory that is bound read-only into the sandbox; every connection to
socket *i* is relayed, byte for byte, to worker *i*'s TCP address and nowhere else. The job
therefore reaches exactly the workers in ``[engine] remote_workers`` — it names no address, so
it cannot pick another one — and the gRPC stream itself is TFF's executor protocol, unchanged.

What crosses the relay is what TFF sends its workers: the model, the computations built from
the validated artifact and the sampled users' examples (unencrypted, unauthenticated gRPC, as
TFF's ``worker_binary`` offers nothing else). Workers are therefore part of the node's trust
domain (docs/sandbox.md, "Remote workers"). The relay counts connections per worker for the
owner's log; it never looks at the bytes.

Stdlib only: the gateway imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from engine.sandbox import WorkerAddress

__all__ = ["WorkerRelay", "WorkersUnreachable", "check_reachable"]

CONNECT_TIMEOUT_S = 5.0
_CHUNK = 1 << 16
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes


class WorkersUnreachable(RuntimeError):
    """A configured remote worker does not accept TCP connections; ``reason`` names it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def check_reachable(workers: Sequence[WorkerAddress],
                          timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Open (and close) one TCP connection to every worker, before a job starts: a job whose
    workers are down then fails before it reads data, with a reason for the owner."""
    for worker in workers:
        try:
            async with asyncio.timeout(timeout_s):
                _, writer = await asyncio.open_connection(worker.host, worker.port)
        except (OSError, TimeoutError) as error:
            detail = "timed out" if isinstance(error, TimeoutError) else error.strerror or error
            raise WorkersUnreachable(f"remote worker {worker} is unreachable ({detail})") \
                from error
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class WorkerRelay:
    """Unix sockets ``DIR/0.sock`` … relaying to the workers, for one job; ``async with``."""

    def __init__(self, workers: Sequence[WorkerAddress]) -> None:
        self.workers = tuple(workers)
        self.directory: Path | None = None
        self.connections = [0] * len(self.workers)
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def targets(self) -> tuple[str, ...]:
        """The gRPC targets the runner uses, in worker order."""
        assert self.directory is not None
        return tuple(f"unix:{self.directory / f'{i}.sock'}" for i in range(len(self.workers)))

    async def __aenter__(self) -> WorkerRelay:
        # Sockets must be reachable by the sandbox uid: directory 0755, sockets 0666; both are
        # owned by the gateway, so the job can use but not replace them.
        self.directory = Path(tempfile.mkdtemp(prefix="fedgate-relay-"))
        try:
            if len(str(self.directory)) + 8 > _MAX_SOCKET_PATH:
                raise WorkersUnreachable(f"relay directory {self.directory} is too long for a "
                                         "Unix socket path; set TMPDIR to a shorter directory")
            self.directory.chmod(0o755)
            for i, worker in enumerate(self.workers):
                path = self.directory / f"{i}.sock"
                server = await asyncio.start_unix_server(
                    lambda r, w, i=i, worker=worker: self._accept(i, worker, r, w), path=path)
                self._servers.append(server)
                path.chmod(0o666)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop accepting, cut every relayed connection, remove the directory."""
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._servers.clear()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    async def _accept(self, index: int, worker: WorkerAddress, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                upstream_reader, upstream_writer = await asyncio.open_connection(
                    worker.host, worker.port)
        except (OSError, TimeoutError):
            writer.close()  # the runner's gRPC channel sees the worker as unavailable
            self._tasks.discard(task)
            return
        self.connections[index] += 1
        try:
            await asyncio.gather(_pump(reader, upstream_writer), _pump(upstream_reader, writer))
        finally:
            for stream in (writer, upstream_writer):
                stream.close()
            self._tasks.discard(task)


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close the other side (gRPC ends streams that way)."""
    try:
        while chunk := await source.read(_CHUNK):
            sink.write(chunk)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
    except (ConnectionError, OSError):
        sink.close()
