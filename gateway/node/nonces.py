"""A signed request's nonce, recorded once in the ledger: a replay is refused, even after a
restart (``ledger.registry.remember_nonce``, UNIQUE per key).

Contract:

* A request's answer leaves only after its nonce is committed; a nonce found already
  recorded turns the answer into ``replayed-nonce``, whatever the route decided.
* The signature middleware records the nonce before the route runs, in a ledger write of its
  own, except for a route that writes its decision anyway (``POST /v1/jobs``). There the
  nonce is a :class:`PendingNonce`, and the route records it in its decision's write
  (:meth:`PendingNonce.run`): in the same savepoint as the reservation and its audit entries,
  or as the refusal's ``deny`` entry, so a replay and the decision it would repeat are decided
  atomically in one trip to the ledger writer. A replayed request therefore reaches the
  route, but the route's effects and its answer are rolled back and replaced by the refusal.
* Whatever the route did not record (it raised before its write, its write failed), the
  middleware records alone before the answer leaves (:meth:`PendingNonce.ensure_recorded`).
* A replay of a request this process already recorded is refused before the route runs
  (:class:`RecentNonces`), so replaying a captured request costs the gateway no admission
  work; the ledger's UNIQUE row stays the authority (other processes, a forgotten entry).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from sqlalchemy.engine import Connection
from sqlmodel import Session

from gateway.node.identity import VerifiedRequest
from gateway.protocol.problems import Problem
from ledger.group_commit import GroupCommitter
from ledger.registry import remember_nonce

T = TypeVar("T")


def replayed_nonce() -> Problem:
    return Problem("replayed-nonce", "this request was already accepted once; sign a new "
                                     "request (the client does this on every call)")


def record_nonce(session: Session | Connection, verified: VerifiedRequest) -> None:
    """Record ``verified``'s nonce in the caller's write transaction; raises the
    ``replayed-nonce`` problem if this key used it before."""
    if not remember_nonce(session, key_id=verified.key_id, nonce=verified.nonce,
                          expires_at=verified.nonce_expires_at):
        raise replayed_nonce()


class PendingNonce:
    """The nonce of a verified request that its route records with its decision."""

    def __init__(self, verified: VerifiedRequest) -> None:
        self.verified = verified
        self.recorded = False  # True once a write that recorded it has committed

    def run(self, writer: GroupCommitter, work: Callable[[Any], T], *,
            datasets: Iterable[str] = (), on_connection: bool = False) -> T:
        """``writer.run(work)`` (``writer.run_on_connection`` if ``on_connection``), recording
        the nonce first in the same savepoint unless it is recorded already. If ``work``
        raises, its savepoint, and the nonce with it, is rolled back: the nonce stays pending."""
        def recorded_then(session: Session | Connection) -> T:
            if not self.recorded:
                record_nonce(session, self.verified)
            return work(session)

        run = writer.run_on_connection if on_connection else writer.run
        result = run(recorded_then, datasets=datasets)
        self.recorded = True
        return result

    def ensure_recorded(self, writer: GroupCommitter) -> None:
        """Record the nonce alone if no decision recorded it; raises ``replayed-nonce``."""
        if not self.recorded:
            self.run(writer, lambda session: None)


def run_recording(nonce: PendingNonce | None, writer: GroupCommitter,
                  work: Callable[[Any], T], *, datasets: Iterable[str] = (),
                  on_connection: bool = False) -> T:
    """:meth:`PendingNonce.run`, or plain ``writer.run`` (``run_on_connection``) when there
    is no pending nonce (the middleware recorded it, or the caller is not an HTTP request)."""
    if nonce is None:
        run = writer.run_on_connection if on_connection else writer.run
        return run(work, datasets=datasets)
    return nonce.run(writer, work, datasets=datasets, on_connection=on_connection)


class RecentNonces:
    """The nonces this process has seen committed, until their signatures expire: a filter in
    front of the ledger that only ever refuses a nonce that *is* recorded (it may forget one:
    at most ``capacity`` are kept, the oldest dropped first). Used from the event loop only."""

    def __init__(self, capacity: int = 65_536) -> None:
        self.capacity = capacity
        self._expiry: dict[tuple[str, str], float] = {}

    def seen(self, verified: VerifiedRequest) -> bool:
        return (verified.key_id, verified.nonce) in self._expiry

    def add(self, verified: VerifiedRequest) -> None:
        if len(self._expiry) >= self.capacity:
            now = time.time()
            self._expiry = {k: t for k, t in self._expiry.items() if t > now}
            while len(self._expiry) >= self.capacity:  # dicts keep insertion order
                del self._expiry[next(iter(self._expiry))]
        self._expiry[(verified.key_id, verified.nonce)] = verified.nonce_expires_at
