"""Test-only probe run *inside* the engine sandbox as ``python -I -c <this source> ACTION ARGS…
JOB_DIR`` (standard library only: researcher artifacts cannot carry code, so this stands in for
code that escaped the model validation).

Each action tries something a malicious job would, and records what happened in
``JOB_DIR/probe.json`` — the one place the sandbox may write — as ``{name: outcome}``, where an
outcome is ``"ok"`` or the errno name / exception type that stopped it.
"""

import ctypes
import errno
import json
import os
import signal
import socket
import sys
import time

JOB_DIR = sys.argv[-1]
ACTION = sys.argv[1]
ARGS = sys.argv[2:-1]
results = {}


def attempt(name, operation):
    try:
        operation()
    except OSError as error:
        results[name] = errno.errorcode.get(error.errno, str(error.errno))
    except Exception as error:
        results[name] = type(error).__name__
    else:
        results[name] = "ok"


def save():
    with open(os.path.join(JOB_DIR, "probe.json"), "w") as f:
        json.dump(results, f)


def write(path):
    with open(path, "w") as f:
        f.write("escaped")


def read(path):
    with open(path, "rb") as f:
        f.read(1)


def identity():
    with open("/proc/self/status") as f:
        status = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
    with open("/proc/self/net/dev") as f:
        interfaces = sorted(line.split(":", 1)[0].strip() for line in f.readlines()[2:])
    results.update(
        uid=os.getuid(), euid=os.geteuid(), gid=os.getgid(), groups=os.getgroups(),
        status={key: status[key].strip() for key in
                ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")},
        interfaces=interfaces, environment=sorted(os.environ), root=sorted(os.listdir("/")),
        hostname=socket.gethostname(), pid=os.getpid(),
    )
    for path in ARGS:  # directories whose visible entries the test checks
        attempt(f"list {path}", lambda path=path: results.__setitem__(
            f"entries {path}", sorted(os.listdir(path))))


def write_outside():
    for path in ARGS:
        attempt(path, lambda path=path: write(path))


def read_secrets():
    for path in ARGS:
        attempt(path, lambda path=path: read(path))


def network():
    port = int(ARGS[0])
    for host in ARGS[1:]:
        attempt(f"connect {host}:{port}",
                lambda host=host: socket.create_connection((host, port), timeout=2).close())
    for name in ("AF_NETLINK", "AF_PACKET", "AF_VSOCK", "AF_ALG"):
        family = getattr(socket, name, None)
        if family is not None:
            attempt(name, lambda family=family: socket.socket(family, socket.SOCK_RAW).close())
    # gRPC between the runner and its worker: loopback inside the sandbox must work.
    def loopback():
        with socket.socket(socket.AF_INET6) as server:
            server.bind(("::", 0))
            server.listen()
            socket.create_connection(("127.0.0.1", server.getsockname()[1]), timeout=2).close()

    attempt("own loopback", loopback)


def syscalls():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    def call(number, *args):
        def operation():
            if libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args)) == -1:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code))
        return operation

    clone_newuser, sigchld = 0x10000000, 17
    for name, operation in {
        "ptrace": call(101, 0, 0, 0, 0),  # PTRACE_TRACEME
        "unshare": call(272, clone_newuser),
        "setns": call(308, 0, 0),
        "mount": call(165, 0, 0, 0, 0, 0),
        "umount2": call(166, 0, 0),
        "bpf": call(321, 0, 0, 0),
        "keyctl": call(250, 0, 0, 0, 0, 0),
        "add_key": call(248, 0, 0, 0, 0, 0),
        "kexec_load": call(246, 0, 0, 0, 0),
        "perf_event_open": call(298, 0, 0, 0, 0, 0),
        "io_uring_setup": call(425, 1, 0),
        "userfaultfd": call(323, 0),
        "clone(CLONE_NEWUSER)": call(56, clone_newuser | sigchld, 0, 0, 0, 0),
        "clone3": call(435, 0, 0),
    }.items():
        attempt(name, operation)


def allocate():
    chunks, chunk = [], 64 << 20
    try:
        while True:
            chunks.append(bytearray(chunk))
    except MemoryError:
        results["allocated_bytes"] = len(chunks) * chunk
        results["stopped_by"] = "MemoryError"


def spin():
    while True:
        pass


def fork_bomb():
    forks = 0
    try:
        while True:
            if os.fork() == 0:
                signal.pause()
                os._exit(0)
            forks += 1
    except OSError as error:
        results["forks"] = forks
        results["stopped_by"] = errno.errorcode[error.errno]
    save()
    os._exit(0)  # leave the children running: the sandbox must end them


def survivor():
    marker = ARGS[0]
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            os.execv("/usr/bin/sleep", ["sleep", marker])
        os._exit(0)
    time.sleep(0.5)
    results["daemon"] = "started"


globals()[ACTION]()
save()
