"""Resource meter around one job: ``python -I -m engine.meter REPORT_FD CPU_LIMIT_S PARENT -- ARGV…``.

The launcher starts this small stdlib-only program as the job's first process (the leader of
the job's process group, outside the sandbox) and it runs ``ARGV`` — bubblewrap, or the runner
itself without a sandbox — as its child. What it reports comes from the kernel, never from the
job (the sandbox cannot write to ``REPORT_FD`` and the model has no say in it):

* **CPU seconds**: user + system time of every process of the job, all threads included,
  measured two ways and reported as the larger. (1) The meter is a *child subreaper*
  (``PR_SET_CHILD_SUBREAPER``), so every process of the job ends up reaped by an ancestor
  inside the job or by the meter itself; ``wait4``'s rusage of its children then covers the
  tree — bubblewrap, the sandbox's pid 1 (also when bubblewrap dies first and pid 1 is
  re-parented here), the runner, TFF's ``worker_binary`` — since the kernel adds each reaped
  process's times (and those of the processes *it* reaped) to its reaper's. This is exact when
  the job ends on its own. (2) It is not when the job is killed: the dying pid 1 of a pid
  namespace ignores SIGCHLD while the kernel empties the namespace, so the processes killed
  then are reaped without adding their times to anyone. Hence the meter also samples the live
  tree every :data:`POLL_S` seconds (``/proc/PID/stat``: utime + stime + cutime + cstime of each
  descendant, plus what it reaped itself), and once more when the launcher's SIGTERM arrives;
  a killed job is therefore metered to within one sampling interval of its last CPU use.
* **Peak memory**: two numbers. ``max_rss_bytes`` is the kernel's ``ru_maxrss`` of the reaped
  tree: the largest peak resident set of any *single* process of the job, exact but not a sum.
  ``peak_tree_rss_bytes`` is the largest *sum* of resident sets of the job's live processes seen
  by sampling ``/proc`` every :data:`POLL_S` seconds (can miss a spike shorter than that).
* **Wall seconds**: from starting ``ARGV`` to its exit.

While the job runs the meter also sums the CPU time of the live tree (``/proc/PID/stat``: own
plus reaped children) with what it has reaped itself; when that total exceeds ``CPU_LIMIT_S``
(> 0) it kills every process of the job and reports ``"stopped": "cpu_limit"``. The per-process
``RLIMIT_CPU`` is only a backstop: a job can spread work over several processes.

The meter dies with the launcher (``PR_SET_PDEATHSIG``; ``PARENT`` is the launcher's pid, to
close the race with a launcher that died before that was set), and bubblewrap's
``--die-with-parent`` then takes the sandbox down with it, as before the meter existed.

The meter exits with its child's status (re-raising a fatal signal on itself), so the launcher
sees exactly what it saw before the meter existed. It ignores SIGTERM/SIGINT/SIGHUP (the
launcher's group kill reaches its child, which it keeps reaping) and gives up waiting for
stragglers after :data:`STRAGGLER_WAIT_S`, well inside the launcher's grace period.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import signal
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["COUNTS_FILE", "METER_PROGRAM", "POLL_S", "STRAGGLER_WAIT_S", "ResourceUsage", "main",
           "metered_argv", "read_counts", "read_report"]

METER_PROGRAM = ("-m", "engine.meter")
COUNTS_FILE = "counts.json"
"""Written by the runner into the job directory after training: ``{"client_updates": n}``, the
exact number of client updates it computed. Reported by the engine (not measured by the OS),
data-dependent (it reveals the sampling outcome), so it is kept for the owner only."""
_COUNTS_MAX_BYTES = 4096

POLL_S = 0.5
STRAGGLER_WAIT_S = 1.5
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_WALL = 0x40000000  # also "clone" children: bwrap starts the sandbox's pid 1 without SIGCHLD
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ResourceUsage:
    """What the meter measured for one job (module docstring: what each number means).

    Owner-side facts about the node's machine; none depends on user data beyond how long the
    computation took. ``stopped`` is ``"cpu_limit"`` when the meter ended the job at
    ``cpu_limit_seconds``. ``cpu_seconds`` (the billed number) is the larger of the rusage
    total ``cpu_user_seconds + cpu_system_seconds`` and the sampled ``cpu_sampled_seconds``.
    """

    cpu_seconds: float
    cpu_user_seconds: float
    cpu_system_seconds: float
    cpu_sampled_seconds: float
    wall_seconds: float
    max_rss_bytes: int
    peak_tree_rss_bytes: int
    cpu_limit_seconds: float | None = None
    stopped: str | None = None

    @property
    def peak_memory_bytes(self) -> int:
        """The larger of the two peak measures (the one billing uses)."""
        return max(self.max_rss_bytes, self.peak_tree_rss_bytes)


def metered_argv(python: str, report_fd: int, cpu_limit_s: float | None,
                 argv: list[str]) -> list[str]:
    """``argv`` run under the meter, reporting on ``report_fd`` (no CPU limit if None)."""
    return [python, "-I", *METER_PROGRAM, str(report_fd), repr(float(cpu_limit_s or 0)),
            str(os.getpid()), "--", *argv]


def read_report(fd: int) -> ResourceUsage | None:
    """The meter's report from the read end of its pipe (after it exited); None if it wrote
    none (it was killed) or something else."""
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
            if len(data) > 65536:
                return None
    except BlockingIOError:
        pass
    try:
        value = json.loads(data)
        return ResourceUsage(**value) if isinstance(value, dict) else None
    except (ValueError, TypeError):
        return None


def read_counts(job_dir: Path) -> int | None:
    """The exact client-update count from :data:`COUNTS_FILE`, or None if the runner wrote none
    (it failed before the end of training) or wrote something else. Never follows a symlink."""
    try:
        fd = os.open(job_dir / COUNTS_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        value = json.loads(os.read(fd, _COUNTS_MAX_BYTES))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    count = value.get("client_updates") if isinstance(value, dict) else None
    return count if type(count) is int and count >= 0 else None


def _process_table() -> dict[int, tuple[int, float, int]]:
    """pid → (parent pid, CPU seconds incl. reaped children, resident bytes) of every process."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # after the comm: state ppid ... utime(12) stime(13) cutime(14) cstime(15) ... rss(22)
        cpu = sum(int(fields[i]) for i in (11, 12, 13, 14)) / _TICKS
        table[int(entry.name)] = (int(fields[1]), cpu, int(fields[21]) * _PAGE)
    return table


def _descendants(table: dict[int, tuple[int, float, int]], root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


class _Meter:
    def __init__(self, cpu_limit_s: float) -> None:
        self.cpu_limit_s = cpu_limit_s
        self.user = self.system = 0.0
        self.max_rss_kib = 0
        self.peak_tree_rss = 0
        self.sampled_cpu = 0.0
        self.stopped: str | None = None

    def add(self, usage: resource.struct_rusage) -> None:
        self.user += usage.ru_utime
        self.system += usage.ru_stime
        self.max_rss_kib = max(self.max_rss_kib, usage.ru_maxrss)

    def sample(self) -> None:
        """One look at the live tree: memory sum, and the CPU limit."""
        me = os.getpid()
        table = _process_table()
        tree = _descendants(table, me)
        self.peak_tree_rss = max(self.peak_tree_rss, sum(table[pid][2] for pid in tree))
        used = self.user + self.system + sum(table[pid][1] for pid in tree)
        self.sampled_cpu = max(self.sampled_cpu, used)
        if self.cpu_limit_s > 0 and self.stopped is None and used > self.cpu_limit_s:
            self.stopped = "cpu_limit"
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _reap(meter: _Meter, child: int, deadline_after_child: float) -> int:
    """Reap children until none is left; returns the direct child's wait status."""
    status: int | None = None
    next_sample = time.monotonic()
    deadline: float | None = None
    while True:
        try:
            pid, wait_status, usage = os.wait4(-1, os.WNOHANG | _WALL)
        except ChildProcessError:
            break
        if pid:
            meter.add(usage)
            if pid == child:
                status = wait_status
                deadline = time.monotonic() + deadline_after_child
            continue
        now = time.monotonic()
        if deadline is not None and now > deadline:
            break
        if status is None and now >= next_sample:
            meter.sample()
            next_sample = now + POLL_S
        time.sleep(0.02 if status is not None else min(0.1, POLL_S))
    assert status is not None
    return status


def main(argv: list[str]) -> int:
    if len(argv) < 6 or argv[4] != "--":
        print("usage: python -m engine.meter REPORT_FD CPU_LIMIT_S PARENT -- ARGV...",
              file=sys.stderr)
        return 2
    report_fd, cpu_limit_s, parent, command = int(argv[1]), float(argv[2]), int(argv[3]), argv[5:]
    os.set_inheritable(report_fd, False)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the launcher is gone already: run nothing
        return 1
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    meter = _Meter(cpu_limit_s)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        # Survive the group kill to reap and report; sample before the namespace is emptied.
        # (A handler, unlike SIG_IGN, is reset to the default on exec.)
        signal.signal(sig, lambda *_: meter.sample())
    started = time.monotonic()
    child = os.fork()
    if child == 0:
        try:
            os.execv(command[0], command)  # noqa: S606 (argv from the launcher, no shell)
        finally:
            os._exit(127)
    status = _reap(meter, child, STRAGGLER_WAIT_S)
    wall = time.monotonic() - started
    report = {
        "cpu_seconds": round(max(meter.user + meter.system, meter.sampled_cpu), 6),
        "cpu_sampled_seconds": round(meter.sampled_cpu, 6),
        "cpu_user_seconds": round(meter.user, 6),
        "cpu_system_seconds": round(meter.system, 6),
        "wall_seconds": round(wall, 6),
        "max_rss_bytes": meter.max_rss_kib * 1024,
        "peak_tree_rss_bytes": meter.peak_tree_rss,
        "cpu_limit_seconds": cpu_limit_s if cpu_limit_s > 0 else None,
        "stopped": meter.stopped,
    }
    os.write(report_fd, (json.dumps(report) + "\n").encode())
    os.close(report_fd)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        return 128 + sig  # only if the signal does not end this process
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
