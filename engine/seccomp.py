"""The seccomp filter of the engine sandbox: a deny list, compiled to BPF for ``bwrap --seccomp``.

The policy is data (:data:`DENIED_SYSCALLS`, :data:`ALLOWED_SOCKET_FAMILIES`, ...) so it can be
read and tested without libseccomp; :func:`compile_filter` turns it into the classic-BPF
program bwrap installs right before it executes the runner. The filter is inherited by every
process of the job (TFF's ``worker_binary`` included) and cannot be removed from inside.

Invariants of the compiled program:

* only the native architecture's system call table is accepted; a call through another ABI
  (``int 0x80``, x32) kills the process, so the deny list cannot be bypassed that way;
* every call in :data:`DENIED_SYSCALLS` fails with ``EPERM``; nothing else is denied by name;
* ``socket()`` succeeds only for the families in :data:`ALLOWED_SOCKET_FAMILIES` (loopback
  gRPC between the runner and its worker needs AF_INET/AF_INET6; AF_UNIX for socketpair and
  local IPC) and fails with ``EAFNOSUPPORT`` otherwise — including family values with high bits
  set, which the kernel would truncate;
* ``clone()`` with any namespace flag fails with ``EPERM``; ``clone3()`` fails with ``ENOSYS``
  (its flags live in memory a filter cannot read) so that the C library falls back to
  ``clone()``, where the flags are checked.

It is a deny list, measured against what the runner and the worker use (``strace -f`` of a full
job: no netlink, no namespaces, no mounts — see docs/sandbox.md); an allow list is a known gap.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping

__all__ = [
    "ALLOWED_SOCKET_FAMILIES",
    "CLONE_NAMESPACE_FLAGS",
    "DENIED_SYSCALLS",
    "SeccompUnavailable",
    "compile_filter",
]

DENIED_SYSCALLS: Mapping[str, str] = {
    # Inspecting or steering other processes (also blocked by the private pid namespace).
    "ptrace": "debug or modify another process",
    "process_vm_readv": "read another process's memory",
    "process_vm_writev": "write another process's memory",
    "kcmp": "compare kernel objects of other processes",
    "pidfd_getfd": "steal a file descriptor from another process",
    # Changing the file system view or the namespaces bwrap set up.
    "mount": "mount file systems",
    "umount2": "unmount the sandbox's binds",
    "pivot_root": "change the root",
    "chroot": "change the root",
    "move_mount": "new mount API",
    "open_tree": "new mount API",
    "fsopen": "new mount API",
    "fsconfig": "new mount API",
    "fsmount": "new mount API",
    "fspick": "new mount API",
    "mount_setattr": "make read-only binds writable",
    "unshare": "create namespaces beyond bwrap's",
    "setns": "join other namespaces",
    # Kernel attack surface a training job never needs.
    "bpf": "load eBPF programs",
    "perf_event_open": "performance counters (side channels, kernel bugs)",
    "userfaultfd": "page-fault handling (a common exploit primitive)",
    "io_uring_setup": "io_uring (operations bypass seccomp)",
    "io_uring_enter": "io_uring (operations bypass seccomp)",
    "io_uring_register": "io_uring (operations bypass seccomp)",
    "keyctl": "kernel keyrings (not namespaced)",
    "add_key": "kernel keyrings (not namespaced)",
    "request_key": "kernel keyrings (not namespaced)",
    "open_by_handle_at": "open files by handle, bypassing the mount view",
    "name_to_handle_at": "file handles for open_by_handle_at",
    "fanotify_init": "watch file system events",
    # Host administration.
    "kexec_load": "replace the kernel",
    "kexec_file_load": "replace the kernel",
    "reboot": "reboot the host",
    "init_module": "load kernel modules",
    "finit_module": "load kernel modules",
    "delete_module": "unload kernel modules",
    "swapon": "manage swap",
    "swapoff": "manage swap",
    "syslog": "read the kernel log",
    "acct": "process accounting",
    "quotactl": "disk quotas",
    "quotactl_fd": "disk quotas",
    "iopl": "raw I/O port access",
    "ioperm": "raw I/O port access",
    "settimeofday": "set the clock",
    "clock_settime": "set the clock",
    "clock_adjtime": "set the clock",
    "adjtimex": "set the clock",
    "sethostname": "rename the host",
    "setdomainname": "rename the host",
    "vhangup": "hang up the terminal",
    "uselib": "obsolete loader call",
    "lookup_dcookie": "obsolete profiling call",
    "nfsservctl": "obsolete NFS call",
}
"""Denied system calls (→ ``EPERM``), each with the capability it would give the job."""

ALLOWED_SOCKET_FAMILIES: Mapping[int, str] = {
    1: "AF_UNIX",
    2: "AF_INET",
    10: "AF_INET6",
}
"""The only socket families the job may create. Inside the sandbox's network namespace
AF_INET/AF_INET6 reach loopback only; AF_NETLINK, AF_PACKET, AF_VSOCK, AF_ALG, … are refused."""

CLONE_NAMESPACE_FLAGS: Mapping[str, int] = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
"""``clone()`` flags that create namespaces; any of them makes ``clone()`` fail."""

_FAMILY_LIMIT = 64  # above every AF_* value (AF_MAX is 46 in Linux 6.x)


class SeccompUnavailable(RuntimeError):
    """The filter cannot be built here (no libseccomp, or it does not know a system call)."""


def compile_filter() -> bytes:
    """The policy above as a BPF program for the native architecture (``bwrap --seccomp``).

    Needs libseccomp (through ``pyseccomp``); raises :class:`SeccompUnavailable` rather than
    return a weaker filter, e.g. when the library does not know one of the denied calls.
    """
    try:
        import pyseccomp as seccomp
    except (ImportError, RuntimeError, OSError) as error:  # RuntimeError: no libseccomp.so
        raise SeccompUnavailable(f"pyseccomp/libseccomp not usable: {error}") from error

    try:
        rules = seccomp.SyscallFilter(seccomp.ALLOW)
        rules.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
        for name in DENIED_SYSCALLS:
            rules.add_rule(seccomp.ERRNO(errno.EPERM), name)
        refuse_family = seccomp.ERRNO(errno.EAFNOSUPPORT)
        for family in range(_FAMILY_LIMIT):
            if family not in ALLOWED_SOCKET_FAMILIES:
                rules.add_rule(refuse_family, "socket", seccomp.Arg(0, seccomp.EQ, family))
        rules.add_rule(refuse_family, "socket", seccomp.Arg(0, seccomp.GE, _FAMILY_LIMIT))
        for flag in CLONE_NAMESPACE_FLAGS.values():
            rules.add_rule(seccomp.ERRNO(errno.EPERM), "clone",
                           seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
        rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
        with os.fdopen(os.memfd_create("fedgate-seccomp"), "w+b") as program:
            rules.export_bpf(program)
            program.seek(0)
            return program.read()
    except (OSError, ValueError, RuntimeError) as error:
        raise SeccompUnavailable(f"cannot compile the seccomp filter: {error}") from error
