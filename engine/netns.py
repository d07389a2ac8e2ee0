"""Give the engine process a private network namespace that has only loopback.

TFF's C++ ``worker_binary`` listens on ``[::]:<port>`` with no authentication, and its bind
address is not configurable (``--port`` is its only network flag). Inside a fresh network
namespace "all interfaces" means this namespace's loopback only, so nothing outside the job can
reach the worker, and the job itself has no network.

If the process is already in such a namespace (the engine sandbox: ``bwrap --unshare-net``)
nothing changes; there the seccomp filter would refuse ``unshare`` anyway, so a sandboxed job
that saw another interface could only refuse to run.
Otherwise it unshares one (directly as root, else through a user namespace). If neither works
the job must not run: :func:`isolate_network` raises.

Must be called while the process is still single-threaded (before importing numpy or
TensorFlow): namespaces are per thread, and only threads and children created afterwards
inherit the new one.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct

__all__ = ["NetworkIsolationError", "isolate_network", "only_loopback"]

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ_SIZE = 40


class NetworkIsolationError(RuntimeError):
    """The process could not be placed in a loopback-only network namespace."""


def only_loopback() -> bool:
    """True if this process's network namespace has no interface but ``lo``."""
    with open("/proc/self/net/dev") as f:
        names = {line.split(":", 1)[0].strip() for line in f.readlines()[2:]}
    return names == {"lo"}


def isolate_network() -> None:
    if not only_loopback():
        _unshare_network()
        if not only_loopback():
            raise NetworkIsolationError("a new network namespace still has other interfaces")
    _bring_loopback_up()


def _unshare_network() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET) == 0:
        return
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise NetworkIsolationError(f"unshare(CLONE_NEWNET) failed: {os.strerror(errno)}")
    # Map ourselves to root inside the user namespace: enough privilege to bring `lo` up,
    # none outside it.
    for path, text in (("/proc/self/setgroups", "deny"),
                       ("/proc/self/uid_map", f"0 {uid} 1"),
                       ("/proc/self/gid_map", f"0 {gid} 1")):
        with open(path, "w") as f:
            f.write(text)


def _bring_loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH", b"lo", 0).ljust(_IFREQ_SIZE, b"\0")
        flags = struct.unpack_from("16sH", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        if not flags & _IFF_UP:
            request = struct.pack("16sH", b"lo", flags | _IFF_UP).ljust(_IFREQ_SIZE, b"\0")
            try:
                fcntl.ioctl(sock, _SIOCSIFFLAGS, request)
            except OSError as error:
                raise NetworkIsolationError(f"cannot bring up loopback: {error}") from error
