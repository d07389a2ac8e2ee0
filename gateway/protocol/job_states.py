"""A job's states as a researcher sees them in ``GET /v1/jobs/{id}``, and how to name its end.

``state`` is a ``ledger.states.JobState``: ``pending_review``, ``approved`` (held for the
owner's review, budget reserved), ``queued``, ``running``, ``succeeded`` or ``failed``. A job
the researcher cancelled ends ``failed`` with the failure :data:`RESEARCHER_CANCELLED`;
:func:`shown_state` calls it ``cancelled`` so that nobody reads their own cancel as a
failure. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ledger.states import ENDED_JOB_STATES, RESEARCHER_CANCELLED, JobState

__all__ = ["ENDED_STATES", "RESEARCHER_CANCELLED", "shown_state"]

ENDED_STATES = ENDED_JOB_STATES


def shown_state(status: Mapping[str, Any]) -> str:
    """The state to show a person: ``cancelled`` for a researcher's own cancel, else ``state``."""
    if status.get("state") == JobState.FAILED and status.get("failure") == RESEARCHER_CANCELLED:
        return "cancelled"
    return str(status.get("state", "unknown"))
