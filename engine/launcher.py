"""Start one engine job from the gateway (asyncio; never imports TensorFlow).

The runner (``python -I -m engine.runner JOB_DIR``) runs in the sandbox that
:class:`~engine.sandbox.SandboxSettings` describe — by default bubblewrap with a seccomp filter
and resource limits, as an unprivileged uid (:mod:`engine.sandbox`, docs/sandbox.md) — and in
its own session and process group, so the whole job — including TFF's ``worker_binary``, which
can outlive its parent — is killed as one group when the job ends, times out, or this coroutine
is cancelled: SIGTERM, a short grace period, then SIGKILL, always. Under bubblewrap the job also
has its own pid namespace, which the kernel empties as soon as bubblewrap dies.

What comes back to the gateway is deliberately small: success, whether user data was touched
(the ``data_access`` marker or event, which decides refund vs. commit), the release path, and a
generic failure text. The runner's stdout/stderr go to the owner's local log only (through a
pipe, capped per job, so the job never holds the log file itself); progress arrives on a
dedicated pipe and only lines that are exactly one of the four event shapes in :mod:`engine.job`
are passed on. A job whose sandbox cannot be set up fails before it starts (no data access, so
its budget is refunded) and the owner's log says why.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import signal
import stat
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from engine.job import DATA_ACCESS_MARKER, RELEASE_FILE, parse_event
from engine.meter import ResourceUsage, metered_argv, read_report
from engine.sandbox import SandboxSettings, SandboxUnavailable
from engine.sandbox_launch import Launch, prepare_launch
from engine.worker_relay import WorkerRelay, WorkersUnreachable, check_reachable

__all__ = ["RUNNER_PROGRAM", "JobOutcome", "run_job"]

TERMINATE_GRACE_S = 2.0
RUNNER_PROGRAM = ("-m", "engine.runner")
MAX_OUTPUT_BYTES = 8 << 20
"""Engine stdout/stderr kept in the owner's log per job; the rest is dropped (and said so)."""

_DRAIN_TIMEOUT_S = 5.0
_LINE_LIMIT = 4096
_SIGNALLED = 128  # bwrap reports a program killed by signal n as exit status 128 + n

log = logging.getLogger("fedgate.engine")

EventCallback = Callable[[dict[str, Any]], Awaitable[None] | None]


@dataclass(frozen=True)
class JobOutcome:
    """How a job ended, in terms safe to show the researcher."""

    succeeded: bool
    data_accessed: bool
    release_path: Path | None
    failure: str | None
    ignored_progress_lines: int = 0
    usage: ResourceUsage | None = None
    """What the meter measured (:mod:`engine.meter`); None if the job never started or the meter
    was killed before it reported. Owner-side only: never shown to researchers as is."""


async def run_job(
    job_dir: Path,
    *,
    on_event: EventCallback,
    timeout_s: float,
    stderr_log: Path,
    sandbox: SandboxSettings | None = None,
    python: str = sys.executable,
    program: Sequence[str] = RUNNER_PROGRAM,
    cpu_limit_s: float | None = None,
) -> JobOutcome:
    """Run ``JOB_DIR`` in its sandbox (:func:`_run_job`), with the remote-worker relay if the
    owner configured remote workers (``sandbox.remote_workers``).

    Remote workers are checked first: a job whose workers do not accept connections fails
    before it starts (no data access, refunded) and the owner's log names the worker. During
    the job, :class:`~engine.worker_relay.WorkerRelay` is the sandbox's only way out, to exactly
    those workers; it is closed when the job has ended, and the owner's log records how many
    connections went to each worker.
    """
    sandbox = sandbox or SandboxSettings()
    run = functools.partial(_run_job, Path(job_dir), on_event=on_event, timeout_s=timeout_s,
                            stderr_log=stderr_log, sandbox=sandbox, python=python,
                            program=program, cpu_limit_s=cpu_limit_s)
    if not sandbox.remote_workers:
        return await run(relay=None)
    owner_log = _OwnerLog(stderr_log, Path(job_dir).name)
    workers = ", ".join(str(worker) for worker in sandbox.remote_workers)
    try:
        await check_reachable(sandbox.remote_workers)
    except WorkersUnreachable as error:
        owner_log.error(f"job not started: {error.reason}")
        return JobOutcome(succeeded=False, data_accessed=False, release_path=None,
                          failure="remote workers unreachable")
    owner_log.warning(f"remote workers {workers}: this job's sampled users' data and model "
                      "go to them over unauthenticated gRPC (docs/sandbox.md)")
    async with WorkerRelay(sandbox.remote_workers) as relay:
        try:
            return await run(relay=relay)
        finally:
            counts = ", ".join(f"{worker}: {count}" for worker, count
                               in zip(relay.workers, relay.connections, strict=True))
            owner_log.info(f"remote-worker connections relayed: {counts}")


async def _run_job(
    job_dir: Path,
    *,
    on_event: EventCallback,
    timeout_s: float,
    stderr_log: Path,
    sandbox: SandboxSettings,
    python: str,
    program: Sequence[str],
    cpu_limit_s: float | None,
    relay: WorkerRelay | None,
) -> JobOutcome:
    """Run ``JOB_DIR`` to completion (or timeout) and kill its whole process group.

    ``on_event`` is called, in order, with each valid progress event. Cancelling this coroutine
    kills the job as well. ``sandbox`` defaults to bubblewrap with the default limits;
    ``program`` (the interpreter arguments before ``JOB_DIR``) exists for tests that run a
    probe in exactly the sandbox a job gets. The job runs under :mod:`engine.meter`, which
    measures its CPU, memory and wall time from the kernel and stops it once its processes
    together used ``cpu_limit_s`` CPU seconds (the outcome's ``failure`` then says so).
    """
    job_dir = Path(job_dir)
    sandbox = sandbox or SandboxSettings()
    owner_log = _OwnerLog(stderr_log, job_dir.name)
    if sandbox.mode == "none":
        owner_log.warning('SANDBOX DISABLED ([engine] sandbox = "none"): this job runs without '
                          "bubblewrap, seccomp or an unprivileged uid; never use it in production")
    read_fd, write_fd = os.pipe()
    try:
        launch = prepare_launch(
            sandbox, job_dir, program, python=python, progress_fd=write_fd,
            worker_targets=relay.targets if relay else (),
            relay_dir=relay.directory if relay else None,
        )
    except SandboxUnavailable as error:
        os.close(read_fd)
        os.close(write_fd)
        owner_log.error(f"job not started, the sandbox is unavailable: {error.reason}")
        return JobOutcome(succeeded=False, data_accessed=False, release_path=None,
                          failure="sandbox unavailable")
    output_read, output_write = os.pipe()
    report_read, report_write = os.pipe()
    try:
        process = await asyncio.create_subprocess_exec(
            *metered_argv(python, report_write, cpu_limit_s, launch.argv),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=output_write,
            stderr=output_write,
            cwd=launch.cwd,
            env=launch.env,
            pass_fds=(*launch.pass_fds, report_write),
            start_new_session=True,
            preexec_fn=launch.preexec_fn,
        )
    except BaseException:
        os.close(read_fd)
        os.close(output_read)
        os.close(report_read)
        launch.close()
        raise
    finally:
        os.close(write_fd)  # the runner holds the only write ends now
        os.close(output_write)
        os.close(report_write)
        launch.started()

    try:
        outcome = await _supervise(process, launch, job_dir, read_fd, output_read, on_event,
                                   timeout_s, stderr_log)
        usage = read_report(report_read)
        if usage is not None and usage.stopped == "cpu_limit":
            owner_log.error(f"stopped at its CPU reservation of {cpu_limit_s:g} s "
                            f"(used {usage.cpu_seconds:.1f} s)")
            return replace(outcome.result, succeeded=False, release_path=None, usage=usage,
                           failure=f"stopped at its CPU reservation of {cpu_limit_s:g} s")
        if outcome.setup_failed and not launch.sandbox_started():
            owner_log.error("the bubblewrap sandbox could not be set up (bwrap exited with "
                            f"status {process.returncode}; its message is above in this log); "
                            "the job did not start")
            return JobOutcome(succeeded=False, data_accessed=outcome.result.data_accessed,
                              release_path=None, failure="sandbox could not be set up",
                              usage=usage)
        if usage is None:
            owner_log.error("the resource meter reported nothing for this job")
        return replace(outcome.result, usage=usage)
    finally:
        os.close(report_read)
        launch.close()


@dataclass(frozen=True)
class _Supervised:
    result: JobOutcome
    setup_failed: bool  # exited on its own with an error: the sandbox may not have started


async def _supervise(process: asyncio.subprocess.Process, launch: Launch, job_dir: Path,
                     read_fd: int, output_fd: int, on_event: EventCallback, timeout_s: float,
                     stderr_log: Path) -> _Supervised:
    """Wait for the job (or its timeout), then make sure every process of it is gone *before*
    reading the data-access marker, so that no process can still begin data access unseen."""
    progress = _ProgressReader(read_fd, on_event)
    output = _OutputPump(output_fd, stderr_log)
    reader = asyncio.create_task(progress.read_all())
    pump = asyncio.create_task(output.pump_all())
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
        await _await_sandbox_exit(launch.sandbox_init())
        # With the job dead, both pipes' EOF is imminent.
        pending = {task for task in (reader, pump) if not task.done()}
        if pending:
            await asyncio.wait(pending, timeout=_DRAIN_TIMEOUT_S)
        reader.cancel()
        pump.cancel()
        progress.close()
        output.close()
    if not reader.cancelled():
        reader.result()  # re-raise an on_event failure

    # lexists: a marker replaced by a symlink still counts as data access (charge, not refund).
    data_accessed = os.path.lexists(job_dir / DATA_ACCESS_MARKER) or progress.saw_data_access
    release = job_dir / RELEASE_FILE
    code = _program_status(process.returncode, sandboxed=launch.status_fd is not None)
    if timed_out:
        failure: str | None = f"timed out after {timeout_s:g} s"
    elif code is not None and code < 0:
        failure = f"engine killed by signal {-code}"
    elif code != 0:
        failure = f"engine exited with status {code}"
    elif not _regular_file(release):
        failure = "engine produced no release"
    else:
        failure = None
    result = JobOutcome(
        succeeded=failure is None,
        data_accessed=data_accessed,
        release_path=release if failure is None else None,
        failure=failure,
        ignored_progress_lines=progress.ignored,
    )
    return _Supervised(result, setup_failed=not timed_out and code not in (0, None))


def _program_status(code: int | None, *, sandboxed: bool) -> int | None:
    """The program's exit status, negative if a signal killed it (bwrap reports that as
    128 + the signal number)."""
    if sandboxed and code is not None and code > _SIGNALLED:
        return -(code - _SIGNALLED)
    return code


def _regular_file(path: Path) -> bool:
    """True for a regular file, not a symlink (the job could plant one pointing anywhere)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


async def _kill_group(process: asyncio.subprocess.Process) -> None:
    """SIGTERM the job's process group, wait briefly, then SIGKILL it regardless.

    The group id is the started process's pid (``start_new_session``): bubblewrap's, or the
    runner's without a sandbox; it stays valid while any member (e.g. an orphaned
    worker_binary) is alive, even after that process itself has exited.
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


async def _await_sandbox_exit(init: tuple[int, int] | None) -> None:
    """Kill the sandbox's pid 1 if it is still there and wait until it has exited: only then
    is its pid namespace — every process of the job — gone. bubblewrap has exited already.
    ``init`` is (host pid, pid-namespace inode) as bubblewrap reported them."""
    if init is None:
        return
    pid, namespace = init
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        try:  # the pidfd pins this process; make sure it is the reaper, not a pid reuse
            if os.stat(f"/proc/{pid}/ns/pid").st_ino != namespace:
                return
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except (ProcessLookupError, FileNotFoundError):
            return
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        loop.add_reader(pidfd, lambda: exited.done() or exited.set_result(None))
        try:
            await asyncio.wait_for(exited, _DRAIN_TIMEOUT_S)
        except TimeoutError:  # not seen in practice: SIGKILL cannot be ignored
            log.error("the sandbox's pid 1 (host pid %d) survived SIGKILL for %g s", pid,
                      _DRAIN_TIMEOUT_S)
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)


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


class _OutputPump:
    """Copies the job's stdout/stderr from a pipe into the owner's log, at most
    :data:`MAX_OUTPUT_BYTES` per job. The job never holds the log file: it cannot truncate it,
    and the file-size limit of the sandbox does not apply to the shared log."""

    def __init__(self, fd: int, path: Path) -> None:
        self._pipe = os.fdopen(fd, "rb", buffering=0)
        self._path = path
        self._kept = 0
        self._dropped = False

    async def pump_all(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), self._pipe
        )
        try:
            with open(self._path, "ab") as sink:
                while chunk := await reader.read(65536):
                    room = MAX_OUTPUT_BYTES - self._kept
                    if room > 0:
                        sink.write(chunk[:room])
                        sink.flush()
                        self._kept += min(room, len(chunk))
                    if len(chunk) > room and not self._dropped:
                        self._dropped = True
                        sink.write(b"\nfedgate: further engine output of this job dropped\n")
                        sink.flush()
        finally:
            transport.close()

    def close(self) -> None:
        self._pipe.close()


class _OwnerLog:
    """Lines for the node owner about one job: in the engine log and the gateway's log."""

    def __init__(self, path: Path, job: str) -> None:
        self._path = path
        self._job = job

    def warning(self, message: str) -> None:
        log.warning("job %s: %s", self._job, message)
        self._append("WARNING", message)

    def error(self, message: str) -> None:
        log.error("job %s: %s", self._job, message)
        self._append("ERROR", message)

    def info(self, message: str) -> None:
        log.info("job %s: %s", self._job, message)
        self._append("INFO", message)

    def _append(self, level: str, message: str) -> None:
        with open(self._path, "a") as f:
            f.write(f"fedgate {level}: job {self._job}: {message}\n")
