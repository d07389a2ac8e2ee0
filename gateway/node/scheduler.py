"""Fair start order of admitted jobs when the node runs at most ``[engine] max_concurrent_jobs``.

Contract:

* Admitted jobs (state ``queued``) beyond the node's capacity wait in a ``FairQueue``; when a
  slot frees, the next job is that of the waiting researcher served least recently (never
  served first, then in order of arrival), and each researcher's own jobs start in the order
  they were admitted. A researcher who floods the queue thus delays others by at most one job
  per turn (round robin).
* The queue orders starts only: it never admits, refuses or charges. A waiting job's budget and
  CPU are reserved since admission (``gateway.node.admission``), so waiting changes no privacy or
  quota accounting.
* The queue lives in the gateway process. After a restart, jobs that were waiting are settled
  like every interrupted job (``gateway.node.jobs.recover_interrupted_jobs``: refunded, since they
  never read data).
"""

from __future__ import annotations

import itertools
from collections import deque

__all__ = ["FairQueue"]


class FairQueue:
    """Waiting job ids per researcher, served round robin (module contract). Pure."""

    def __init__(self) -> None:
        self._waiting: dict[str, deque[str]] = {}
        self._last_served: dict[str, int] = {}
        self._arrival: dict[str, int] = {}
        self._clock = itertools.count()

    def __len__(self) -> int:
        return sum(len(jobs) for jobs in self._waiting.values())

    def __contains__(self, job_id: object) -> bool:
        return any(job_id in jobs for jobs in self._waiting.values())

    def push(self, researcher: str, job_id: str) -> None:
        """Add ``job_id`` behind ``researcher``'s other waiting jobs."""
        self._arrival.setdefault(researcher, next(self._clock))
        self._waiting.setdefault(researcher, deque()).append(job_id)

    def served(self, researcher: str) -> None:
        """Record that one of ``researcher``'s jobs started (also one that never waited)."""
        self._arrival.setdefault(researcher, next(self._clock))
        self._last_served[researcher] = next(self._clock)

    def pop(self) -> str | None:
        """The next job to start, or ``None`` when nothing waits."""
        researcher = self._next_researcher(self._waiting, self._last_served)
        if researcher is None:
            return None
        job_id = self._waiting[researcher].popleft()
        if not self._waiting[researcher]:
            del self._waiting[researcher]
        self.served(researcher)
        return job_id

    def remove(self, job_id: str) -> bool:
        """Drop a waiting job (cancelled); whether it was waiting."""
        for researcher, jobs in self._waiting.items():
            if job_id in jobs:
                jobs.remove(job_id)
                if not jobs:
                    del self._waiting[researcher]
                return True
        return False

    def order(self) -> list[str]:
        """Every waiting job in the order ``pop`` would start them."""
        waiting = {name: deque(jobs) for name, jobs in self._waiting.items()}
        last = dict(self._last_served)
        tick = itertools.count(max(last.values(), default=0) + 1)
        started = []
        while (researcher := self._next_researcher(waiting, last)) is not None:
            started.append(waiting[researcher].popleft())
            if not waiting[researcher]:
                del waiting[researcher]
            last[researcher] = next(tick)
        return started

    def position(self, job_id: str) -> int | None:
        """1 for the job that starts next, 2 after it, …; ``None`` if ``job_id`` is not waiting."""
        order = self.order()
        return order.index(job_id) + 1 if job_id in order else None

    def _next_researcher(self, waiting: dict[str, deque[str]], last: dict[str, int]) -> str | None:
        if not waiting:
            return None
        return min(waiting, key=lambda name: (last.get(name, -1), self._arrival[name]))
