"""Start one engine job from the gateway (asyncio; never imports TensorFlow).

The runner (``python -I -m engine.runner JOB_DIR``) gets its own session and process group,
so the whole job — including TFF's ``worker_binary``, which can outlive its parent — is killed
as one group when the job ends, times out, or this coroutine is cancelled: SIGTERM, a short
grace period, then SIGKILL, always.

What comes back to the gateway is deliberately small: success, whether user data was touched
(the ``data_access`` marker, which decides refund vs. commit), the release path, and a generic
failure text. The runner's stdout/stderr go to the owner's local log only; progress arrives on
a dedicated pipe and only lines that are exactly one of the four event shapes in
:mod:`engine.job` are passed on.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.job import DATA_ACCESS_MARKER, PROGRESS_FD_ENV, RELEASE_FILE, parse_event

__all__ = ["JobOutcome", "run_job"]

TERMINATE_GRACE_S = 2.0
_DRAIN_TIMEOUT_S = 5.0
_LINE_LIMIT = 4096

EventCallback = Callable[[dict[str, Any]], Awaitable[None] | None]


@dataclass(frozen=True)
class JobOutcome:
    """How a job ended, in terms safe to show the researcher."""

    succeeded: bool
    data_accessed: bool
    release_path: Path | None
    failure: str | None
    ignored_progress_lines: int = 0


async def run_job(
    job_dir: Path,
    *,
    on_event: EventCallback,
    timeout_s: float,
    python: str = sys.executable,
    stderr_log: Path,
) -> JobOutcome:
    """Run ``JOB_DIR`` to completion (or timeout) and kill its whole process group.

    ``on_event`` is called, in order, with each valid progress event. Cancelling this coroutine
    kills the job as well.
    """
    job_dir = Path(job_dir)
    read_fd, write_fd = os.pipe()
    try:
        with open(stderr_log, "ab") as log:
            process = await asyncio.create_subprocess_exec(
                python, "-I", "-m", "engine.runner", str(job_dir),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=job_dir,
                env={**os.environ, PROGRESS_FD_ENV: str(write_fd)},
                pass_fds=(write_fd,),
                start_new_session=True,
            )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)  # the runner holds the only write end now

    progress = _ProgressReader(read_fd, on_event)
    reader = asyncio.create_task(progress.read_all())
    exited = asyncio.ensure_future(process.wait())
    timed_out = False
    try:
        async with asyncio.timeout(timeout_s):
            done, _ = await asyncio.wait({reader, exited}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done and not reader.cancelled() and reader.exception() is None:
                await exited  # EOF came first: still wait for the exit
    except TimeoutError:
        timed_out = True
    finally:
        await _kill_group(process)
        if not reader.done():  # with the group dead, the pipe's EOF is imminent
            await asyncio.wait({reader}, timeout=_DRAIN_TIMEOUT_S)
        reader.cancel()
        progress.close()
    if not reader.cancelled():
        reader.result()  # re-raise an on_event failure

    data_accessed = (job_dir / DATA_ACCESS_MARKER).exists() or progress.saw_data_access
    release = job_dir / RELEASE_FILE
    code = process.returncode
    if timed_out:
        failure: str | None = f"timed out after {timeout_s:g} s"
    elif code is not None and code < 0:
        failure = f"engine killed by signal {-code}"
    elif code != 0:
        failure = f"engine exited with status {code}"
    elif not release.is_file():
        failure = "engine produced no release"
    else:
        failure = None
    return JobOutcome(
        succeeded=failure is None,
        data_accessed=data_accessed,
        release_path=release if failure is None else None,
        failure=failure,
        ignored_progress_lines=progress.ignored,
    )


async def _kill_group(process: asyncio.subprocess.Process) -> None:
    """SIGTERM the job's process group, wait briefly, then SIGKILL it regardless.

    The group id is the runner's pid (``start_new_session``); it stays valid while any member
    (e.g. an orphaned worker_binary) is alive, even after the runner itself has exited.
    """
    group = process.pid
    if _signal_group(group, signal.SIGTERM):
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), TERMINATE_GRACE_S)
        except TimeoutError:
            pass
        finally:  # also when this coroutine is cancelled during the grace period
            _signal_group(group, signal.SIGKILL)
    await process.wait()


def _signal_group(group: int, sig: signal.Signals) -> bool:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        return False
    return True


class _ProgressReader:
    """Reads progress lines until EOF, passing on only exact event shapes."""

    def __init__(self, fd: int, on_event: EventCallback) -> None:
        self._file = os.fdopen(fd, "rb", buffering=0)
        self._on_event = on_event
        self.ignored = 0
        self.saw_data_access = False

    async def read_all(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_LINE_LIMIT)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), self._file
        )
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # longer than the limit: dropped by the reader
                    self.ignored += 1
                    continue
                if not line:
                    return
                event = parse_event(line)
                if event is None:
                    self.ignored += 1
                    continue
                self.saw_data_access |= event["event"] == "data_access"
                result = self._on_event(event)
                if inspect.isawaitable(result):
                    await result
        finally:
            transport.close()

    def close(self) -> None:
        self._file.close()
