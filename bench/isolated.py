"""Run a benchmark's TFF measurements in a child process of its own.

The child enters a loopback-only network namespace first (TFF's ``worker_binary`` listens on
all interfaces without authentication) and is killed with its whole process group when it
ends, ``worker_binary`` included, so no worker outlives the benchmark or holds a pipe open.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parent.parent


def run_isolated(module: str, function: str, config: dict[str, Any],
                 timeout_s: float) -> dict[str, Any]:
    """``module.function(config)`` in an isolated child; returns its JSON result."""
    entry = ("import json, os, sys; from engine.netns import isolate_network; isolate_network(); "
             f"from {module} import {function} as measure; "
             "open(sys.argv[2], 'w').write(json.dumps(measure(json.loads(sys.argv[1])))); "
             "os._exit(0)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        child = subprocess.Popen([sys.executable, "-c", entry, json.dumps(config), str(out)],
                                 cwd=REPOSITORY, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        try:
            child.wait(timeout=timeout_s)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        if child.returncode != 0:
            raise RuntimeError(f"{module}.{function} failed with status {child.returncode}")
        return json.loads(out.read_text())
