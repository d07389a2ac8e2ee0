"""How ``Job.wait`` shows a job's progress: a bar where a person watches, plain lines elsewhere.

In a terminal (or Jupyter) a tqdm bar of rounds i/T with the ε spent so far and the phase; when
the output is a pipe, a file or a CI log, one plain line each time the job's round or phase
changes, never carriage-return redraws. Phases: ``waiting for review`` / ``approved`` (held by
the owner's policy), ``queued``, ``engine starting`` (the engine process is loading before
round 1), ``running``, and the end: ``succeeded``, ``failed`` or ``cancelled`` (the
researcher's own cancel, ``gateway.protocol.job_states``).

Everything shown comes from the node's status, which depends only on public quantities:
the ε so far is computed from the job's public parameters and the number of rounds done.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, TextIO

from gateway.protocol.job_states import shown_state
from ledger.states import JobState

__all__ = ["EPSILON_SO_FAR", "ProgressBar", "ProgressLines", "describe_progress",
           "progress_display", "progress_phase", "progress_postfix"]

EPSILON_SO_FAR = ("ε so far: the privacy loss of the rounds done, computed by the node from the "
                  "job's public parameters; it reaches the job's ε at the last round, and a job "
                  "stopped after it began reading data is charged its whole ε")
"""The one-line explanation printed before a job's progress."""

_PHASES = {JobState.PENDING_REVIEW: "waiting for review",
           JobState.APPROVED: "approved, waiting to start"}


def progress_phase(status: Mapping[str, Any]) -> str:
    """What the job is doing, in words: ``engine starting`` while a running job has done no
    round yet, ``cancelled`` for the researcher's own cancel, the queue position if any."""
    state = shown_state(status)
    if state == JobState.RUNNING and not status.get("round"):
        return "engine starting"
    if state == JobState.QUEUED and "queue_position" in status:
        return f"queued (position {status['queue_position']})"
    return _PHASES.get(state, state)


def progress_postfix(status: Mapping[str, Any]) -> str:
    """The text after the progress bar: ε spent so far of the job's ε, and the phase."""
    spent = status.get("progress", {}).get("epsilon_so_far")
    so_far = "" if spent is None else f"ε {spent:.3g}/{status['epsilon']:.3g}, "
    return f"{so_far}{progress_phase(status)}"


def describe_progress(status: Mapping[str, Any]) -> str:
    """One plain line: the job, its round, the ε so far and the phase."""
    spent = status.get("progress", {}).get("epsilon_so_far")
    so_far = "" if spent is None else f", ε so far {spent:.3g} of {status['epsilon']:.3g}"
    return (f"{status['job_id']}: round {status.get('round', 0)}/{status.get('rounds', '?')}"
            f"{so_far}, {progress_phase(status)}")


class ProgressLines:
    """One line per change of round or phase (for pipes, files and CI logs)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._last = ""

    def update(self, status: Mapping[str, Any]) -> None:
        line = describe_progress(status)
        if line != self._last:
            print(line, file=self.stream, flush=True)
            self._last = line

    def close(self) -> None:
        pass


class ProgressBar:
    """A tqdm bar (text in a terminal, a widget in Jupyter) of rounds, ε so far and phase."""

    def __init__(self, job_id: str, rounds: int, stream: TextIO) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=rounds, desc=job_id, unit="round", file=stream)

    def update(self, status: Mapping[str, Any]) -> None:
        self._bar.set_postfix_str(progress_postfix(status), refresh=False)  # before update():
        self._bar.update(status["round"] - self._bar.n)                    # it redraws
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def progress_display(job_id: str, rounds: int, *,
                     stream: TextIO | None = None) -> ProgressBar | ProgressLines:
    """A bar if ``stream`` (default stderr) is a terminal or runs in Jupyter, else plain
    lines; either way after the one-line explanation of the ε so far."""
    stream = stream if stream is not None else sys.stderr
    print(EPSILON_SO_FAR, file=stream, flush=True)
    interactive = "ipykernel" in sys.modules or _isatty(stream)
    return ProgressBar(job_id, rounds, stream) if interactive else ProgressLines(stream)


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or minimal stream
        return False
