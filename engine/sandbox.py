"""The per-job sandbox, described as values: bubblewrap's command line and the resource limits.

Everything here is a pure function of its arguments (plus two small discovery helpers that only
read ``sys`` and the host's top-level symlinks), so the exact sandbox can be checked without
running it; :mod:`engine.sandbox_launch` prepares the descriptors and starts the process.

Invariants of a command built by :func:`build_command`:

* new pid, network, IPC, UTS and cgroup namespaces; the sandbox dies with the launcher; the job
  runs in a new session, as an unprivileged uid with no capabilities, an empty bounding set
  and ``no_new_privs`` (see :class:`UidSwitch` for how), under the seccomp filter of
  :mod:`engine.seccomp`;
* the root is a tmpfs, read-only once set up: the only host paths visible inside are ``/usr``
  (and the ``/bin``, ``/lib*``, ``/sbin`` links or binds into it), ``/etc/ld.so.cache``, the
  Python runtime and the ``engine`` package, the job's dataset directory and model file — all
  read-only — and the job directory, the only writable host path. ``/tmp`` and ``/dev/shm`` are
  private size-limited tmpfs; ``/proc`` belongs to the sandbox's pid namespace; ``/dev`` holds
  only the null/zero/full/random/urandom/tty nodes. Host paths keep their paths inside, so the
  absolute paths in ``job.json`` work unchanged; in particular the deployment directory
  (node key, ledger, other datasets) is not visible, only the binds inside it;
* the environment is cleared and rebuilt from :func:`sandbox_environment` (the gateway's own
  environment, e.g. a database URL, never enters);
* the network namespace has only loopback (bwrap brings ``lo`` up), so TFF's
  ``worker_binary``, which listens on ``[::]`` without authentication, is reachable only from
  inside this job, and the job reaches nothing outside. With remote workers configured
  (``SandboxSettings.remote_workers``) the namespace stays the same: the job reaches exactly
  those workers, and nothing else, through Unix sockets of the launcher's relay
  (:mod:`engine.worker_relay`), bound read-only from one relay directory.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "DEFAULT_LIMITS",
    "REMOTE_WORKERS_ENV",
    "SANDBOX_ID",
    "SANDBOX_MODES",
    "Bind",
    "HostLayout",
    "ResourceLimits",
    "Runtime",
    "SandboxMode",
    "SandboxSettings",
    "SandboxUnavailable",
    "UidSwitch",
    "WorkerAddress",
    "build_command",
    "job_binds",
    "rlimit_settings",
    "sandbox_environment",
]

SandboxMode = Literal["bwrap", "none"]
SANDBOX_MODES: tuple[SandboxMode, ...] = ("bwrap", "none")
SANDBOX_ID = 65534
"""uid and gid of the job inside its user namespace (``nobody``/``nogroup``)."""
REMOTE_WORKERS_ENV = "FEDGATE_REMOTE_WORKERS"
"""The runner's gRPC targets for remote workers (comma-separated ``unix:`` relay sockets)."""

_SYSTEM_TREE = Path("/usr")
_SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_SYSTEM_FILES = ("/etc/ld.so.cache",)
# The sandbox's own /tmp and /dev/shm: private tmpfs mounts, not the host's shared directories.
_PRIVATE_TMP = "/tmp"  # noqa: S108
_PRIVATE_SHM = "/dev/shm"  # noqa: S108
_PRIVATE_TREES = (Path("/proc"), Path("/dev"), Path("/sys"))
_SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
_SWITCH_CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP")
_GiB = 1 << 30
_MiB = 1 << 20


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot be set up here; ``reason`` tells the node owner why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ResourceLimits:
    """Limits of every process in the job (each process has its own CPU and memory account).

    ``cpu_seconds``: CPU time per process (all its threads), soft limit → SIGXCPU, SIGKILL
    5 s later. A backstop: the launcher's wall-clock timeout is the primary bound.
    ``address_space_bytes``: virtual memory per process (RLIMIT_AS); TensorFlow reserves far
    more than it touches, so this bounds runaway allocation, not resident memory.
    ``open_files``: file descriptors per process. ``processes``: tasks (threads included) of
    the sandbox's host uid (RLIMIT_NPROC; shared by concurrent jobs under the same uid).
    ``file_size_bytes``: largest file a process may write. ``tmp_bytes``: size of each
    private tmpfs (``/tmp``, ``/dev/shm``), which lives in memory. ``memory_bytes``: the
    memory a job may expect to use (``engine.memory.job_memory``, from public parameters
    only): admission refuses a larger job, and the engine refuses it before reading data.
    Core dumps are always disabled: they would hold raw training data.
    """

    cpu_seconds: int = 4 * 3600
    address_space_bytes: int = 16 * _GiB
    open_files: int = 1024
    processes: int = 1024
    file_size_bytes: int = 1 * _GiB
    tmp_bytes: int = 256 * _MiB
    memory_bytes: int = 8 * _GiB

    def __post_init__(self) -> None:
        for name in ("cpu_seconds", "address_space_bytes", "open_files", "processes",
                     "file_size_bytes", "tmp_bytes", "memory_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"sandbox limit {name} must be a positive integer")


DEFAULT_LIMITS = ResourceLimits()

_CPU_KILL_GRACE_S = 5


def rlimit_settings(limits: ResourceLimits) -> tuple[tuple[int, tuple[int, int]], ...]:
    """``(resource, (soft, hard))`` pairs to apply in the job's first process."""
    return (
        (resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + _CPU_KILL_GRACE_S)),
        (resource.RLIMIT_AS, (limits.address_space_bytes, limits.address_space_bytes)),
        (resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files)),
        (resource.RLIMIT_NPROC, (limits.processes, limits.processes)),
        (resource.RLIMIT_FSIZE, (limits.file_size_bytes, limits.file_size_bytes)),
        (resource.RLIMIT_CORE, (0, 0)),
    )


@dataclass(frozen=True)
class WorkerAddress:
    """One TFF remote worker (``worker_binary --port N`` on an owner-operated host)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: object) -> WorkerAddress:
        """``host:port`` or ``[v6]:port``; a port in 1–65535, a host of letters, digits, dots,
        hyphens (or colons inside brackets) only — nothing a URL or gRPC target could
        reinterpret."""
        if not isinstance(text, str):
            raise ValueError(f"remote worker {text!r} must be a string host:port")
        host, colon, port = text.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host, allowed = host[1:-1], set("0123456789abcdefABCDEF:.")
        else:
            allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-")
        if not (colon and host and set(host) <= allowed and port.isdigit()
                and 0 < int(port) < 65536 and len(host) <= 253):
            raise ValueError(f"remote worker {text!r} is not host:port")
        return cls(host=host, port=int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class SandboxSettings:
    """How the node runs jobs: ``mode`` "bwrap" (production) or "none" (development only:
    a plain process group and a private network namespace, nothing else), the limits, the
    host uid/gid a root gateway switches to before starting bubblewrap, and the TFF remote
    workers the owner configured (empty: TFF's local runtime inside the sandbox).

    ``remote_workers`` receive the sampled users' data and the model (TFF's executor protocol,
    plain gRPC without authentication): they must be hosts the owner operates, in the node's
    trust domain (docs/sandbox.md, "Remote workers")."""

    mode: SandboxMode = "bwrap"
    limits: ResourceLimits = DEFAULT_LIMITS
    host_uid: int = SANDBOX_ID
    host_gid: int = SANDBOX_ID
    remote_workers: tuple[WorkerAddress, ...] = ()

    def __post_init__(self) -> None:
        if not all(isinstance(worker, WorkerAddress) for worker in self.remote_workers):
            raise ValueError("remote_workers must be WorkerAddress values")
        if len(set(self.remote_workers)) != len(self.remote_workers):
            raise ValueError("remote_workers lists a worker twice")
        if self.mode not in SANDBOX_MODES:
            raise ValueError(f"sandbox must be one of {', '.join(SANDBOX_MODES)}, "
                             f"not {self.mode!r}")
        for name in ("host_uid", "host_gid"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**32 - 1:
                raise ValueError(f"sandbox {name} must be a non-root id")


@dataclass(frozen=True)
class Bind:
    """A host path made visible at the same path inside, read-only unless ``writable``."""

    path: Path
    writable: bool = False


@dataclass(frozen=True)
class HostLayout:
    """Top-level system paths: ``links`` are symlinks recreated inside (merged-/usr systems),
    ``trees`` are directories bound read-only, ``files`` single files bound read-only."""

    links: tuple[tuple[str, str], ...]
    trees: tuple[Path, ...]
    files: tuple[Path, ...]

    @classmethod
    def current(cls) -> HostLayout:
        links, trees = [], [_SYSTEM_TREE]
        for name in _SYSTEM_LINKS:
            path = Path(name)
            if path.is_symlink():
                links.append((str(path.readlink()), name))
            elif path.is_dir():
                trees.append(path)
        files = tuple(Path(name) for name in _SYSTEM_FILES if Path(name).is_file())
        return cls(links=tuple(links), trees=tuple(trees), files=files)


@dataclass(frozen=True)
class Runtime:
    """The interpreter and the code the runner needs, bound read-only: the virtual
    environment, the base Python installation, and the directories holding the ``engine``
    package and the ``ledger`` package's code (the engine validates parameters with
    ``ledger.mechanism`` and rebuilds its DP event with ``ledger.accounting``; for an editable
    install only those package directories — not the repository, and never the ledger's
    database, which lives in the deployment directory)."""

    python: Path
    trees: tuple[Path, ...]

    @classmethod
    def current(cls, python: str = sys.executable) -> Runtime:
        engine_dir = Path(__file__).resolve().parent
        ledger_dir = engine_dir.parent / "ledger"
        trees = _outermost([Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(),
                            engine_dir, ledger_dir])
        runtime = cls(python=Path(python), trees=trees)
        real = Path(python).resolve()
        if not any(real.is_relative_to(tree) for tree in (*trees, _SYSTEM_TREE)):
            raise SandboxUnavailable(f"interpreter {real} is outside the paths bound into the "
                                     "sandbox (the virtual environment and base Python)")
        return runtime


def job_binds(job_dir: Path, dataset_dir: Path | None, model_path: Path | None,
              runtime: Runtime, relay_dir: Path | None = None) -> tuple[Bind, ...]:
    """What one job sees of the host besides the system: runtime, dataset and model read-only,
    the job directory writable, and with remote workers the relay's socket directory read-only
    (connecting to a Unix socket needs no write access to its mount). ``dataset_dir``/
    ``model_path`` are None when ``job.json`` is unreadable (the runner then rejects the job
    without needing them)."""
    binds = [Bind(tree) for tree in runtime.trees]
    binds += [Bind(path) for path in (dataset_dir, model_path, relay_dir) if path is not None]
    binds.append(Bind(job_dir, writable=True))
    for bind in binds:
        if not bind.path.is_absolute():
            raise SandboxUnavailable(f"sandbox path {bind.path} is not absolute")
        if any(bind.path == tree or bind.path.is_relative_to(tree) for tree in _PRIVATE_TREES):
            raise SandboxUnavailable(f"{bind.path} cannot be bound into the sandbox: it is under "
                                     f"one of the sandbox's private trees")
    return tuple(binds)


def sandbox_environment(progress_fd_env: str, progress_fd: int,
                        worker_targets: Sequence[str] = ()) -> dict[str, str]:
    """The job's entire environment: no variable of the gateway's is passed through.
    ``worker_targets`` are the relay's gRPC targets for the remote workers, if any."""
    env = {
        "PATH": _SANDBOX_PATH,
        "HOME": _PRIVATE_TMP,
        "TMPDIR": _PRIVATE_TMP,
        "LANG": "C.UTF-8",
        progress_fd_env: str(progress_fd),
    }
    if worker_targets:
        env[REMOTE_WORKERS_ENV] = ",".join(worker_targets)
    return env


@dataclass(frozen=True)
class UidSwitch:
    """For a root gateway: the unprivileged host uid/gid the job becomes, and the ``setpriv``
    (util-linux) that switches to it inside the sandbox, after bwrap's set-up."""

    uid: int
    gid: int
    setpriv: str


def build_command(
    bwrap: str,
    *,
    layout: HostLayout,
    binds: Sequence[Bind],
    argv: Sequence[str],
    env: Mapping[str, str],
    workdir: Path,
    limits: ResourceLimits,
    seccomp_fd: int,
    status_fd: int,
    switch: UidSwitch | None,
) -> list[str]:
    """The bwrap argv running ``argv`` in the sandbox described in the module docstring.

    ``seccomp_fd`` holds the BPF program (:func:`engine.seccomp.compile_filter`); bwrap writes
    its JSON status lines to ``status_fd`` (an ``exit-code`` line appears only if the sandbox
    was set up and ``argv`` started).

    With ``switch`` (the gateway is root) bwrap runs as root without a user namespace, so its
    set-up can read what root can; it keeps only CAP_SETUID/SETGID/SETPCAP, and ``setpriv``
    then clears the bounding set and supplementary groups and becomes ``switch.uid``/``gid``
    for good — the kernel clears every capability on that switch — before ``argv`` runs. The
    job's processes are then that host uid (its file permissions and RLIMIT_NPROC apply).
    Without ``switch`` bwrap runs unprivileged in a user namespace that maps
    :data:`SANDBOX_ID` to the gateway's own uid, and nested user namespaces are disabled.
    """
    command = [bwrap]
    if switch is not None:
        command += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                    "--unshare-cgroup-try", "--cap-drop", "ALL"]
        command += [arg for cap in _SWITCH_CAPS for arg in ("--cap-add", cap)]
    else:
        command += ["--unshare-all", "--unshare-user", "--disable-userns",
                    "--uid", str(SANDBOX_ID), "--gid", str(SANDBOX_ID), "--cap-drop", "ALL"]
    command += [
        "--die-with-parent", "--new-session",
        "--hostname", "fedgate-job",
        "--json-status-fd", str(status_fd),
        "--seccomp", str(seccomp_fd),
    ]
    for tree in layout.trees:
        command += ["--ro-bind", str(tree), str(tree)]
    for target, name in layout.links:
        command += ["--symlink", target, name]
    command += [
        "--proc", "/proc",
        "--dev", "/dev",
        "--perms", "1777", "--size", str(limits.tmp_bytes), "--tmpfs", _PRIVATE_TMP,
        "--perms", "1777", "--size", str(limits.tmp_bytes), "--tmpfs", _PRIVATE_SHM,
    ]
    for directory in _mount_point_parents(layout, binds):
        command += ["--perms", "0755", "--dir", str(directory)]
    for path in layout.files:
        command += ["--ro-bind", str(path), str(path)]
    # Parents before children: a bind nested in another (the engine package inside a
    # virtual environment, say) must be mounted after it.
    for bind in sorted(binds, key=lambda bind: len(bind.path.parts)):
        command += ["--bind" if bind.writable else "--ro-bind", str(bind.path), str(bind.path)]
    command += ["--remount-ro", "/", "--clearenv"]
    for name, value in sorted(env.items()):
        command += ["--setenv", name, value]
    command += ["--chdir", str(workdir), "--"]
    if switch is not None:
        command += [switch.setpriv, f"--reuid={switch.uid}", f"--regid={switch.gid}",
                    "--clear-groups", "--inh-caps=-all", "--bounding-set=-all",
                    "--no-new-privs", "--pdeathsig=keep", "--"]
    command += argv
    return command


def _mount_point_parents(layout: HostLayout, binds: Sequence[Bind]) -> list[Path]:
    """Directories to create (mode 0755, traversable by the job's uid; bwrap's own would be
    0700) on the way to each bound file or directory: every ancestor not already provided by
    the root, a system tree, ``/tmp`` or another bind. Sorted parents first."""
    provided = [*layout.trees, *(Path(name) for _, name in layout.links),
                *(bind.path for bind in binds)]
    needed = {
        parent
        for path in (*layout.files, *(bind.path for bind in binds))
        for parent in path.parents
        if parent not in (Path("/"), Path(_PRIVATE_TMP))
        and not any(parent.is_relative_to(p) for p in provided)
    }
    return sorted(needed, key=lambda path: (len(path.parts), str(path)))


def _outermost(paths: Sequence[Path]) -> tuple[Path, ...]:
    """``paths`` without duplicates and without paths inside another of them, in order."""
    kept: list[Path] = []
    for path in paths:
        if any(path.is_relative_to(other) for other in kept):
            continue
        kept = [other for other in kept if not other.is_relative_to(path)]
        kept.append(path)
    return tuple(kept)
