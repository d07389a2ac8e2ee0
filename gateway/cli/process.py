"""Run a gateway as a child process on a free loopback port (demo, tests, benchmarks).

The child runs in its own session so that stopping it (SIGINT, then SIGKILL) also stops
any engine process it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited during start-up (status {process.returncode})")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError("the gateway did not become healthy in time")


def start_gateway(node_dir: Path, *, log_path: Path, timeout: float = 60.0,
                  port: int | None = None) -> tuple[str, subprocess.Popen[bytes]]:
    """Start ``fedgate serve`` for ``node_dir`` and wait until it is healthy."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    with log_path.open("ab") as log:
        # A fixed argv of this interpreter, no shell: nothing untrusted reaches it.
        process = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "gateway.cli", "-d", str(node_dir), "serve", "--port",
             str(port), "--log-level", "warning"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        _wait_healthy(url, process, timeout)
    except BaseException:
        stop_gateway(process)
        raise
    return url, process


def stop_gateway(process: subprocess.Popen[bytes]) -> None:
    """SIGINT (graceful), then SIGKILL the gateway's whole session."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextlib.contextmanager
def running_gateway(node_dir: Path, *, log_path: Path, timeout: float = 60.0) -> Iterator[str]:
    """Start ``fedgate serve`` for ``node_dir``; yield its base URL; stop it on exit."""
    url, process = start_gateway(node_dir, log_path=log_path, timeout=timeout)
    try:
        yield url
    finally:
        stop_gateway(process)
