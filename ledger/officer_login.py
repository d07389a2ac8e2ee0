"""Officer dashboard logins: one-time tokens issued by the owner, traded for sessions.

Browsers cannot sign RFC 9421 requests, so the data owner issues a login token on the
node (``fedgate officer token NAME``) and hands it to the officer out of band; the
officer's browser trades it once for an opaque session cookie. Invariants:

* Tokens and session values are 256-bit random secrets stored only as SHA-256 digests,
  so a copy of the database logs nobody in.
* Tokens are issued only for an **active officer** key. A token is single-use: the
  exchange marks it used in the transaction that creates the session (under a row
  lock), so two concurrent exchanges cannot both succeed. A leaked, used login link is
  worthless.
* A session ends when its token would have expired, when it is ended (logout), and is
  honoured only while its key is still an active officer key: revoking or rotating the
  officer's key ends it at the next request. Authorisation (policy ``read-audit``) is
  checked by the gateway on every request, not here.
* Every issuance and every exchange is audited (action ``token``) with the token's id,
  never the token. Failed exchanges are not audited (anyone can attempt one), only
  refused.

All functions run in the caller's transaction.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import delete
from sqlmodel import Session, select

from ledger.audit import append_entry
from ledger.models import DashboardSession, DashboardToken, Principal

TOKEN_PREFIX = "fgt_"  # noqa: S105 -- a public marker that makes leaked tokens recognisable
MAX_TOKEN_HOURS = 7 * 24.0


class LoginRefused(Exception):
    """The token is unknown, expired or used, or its officer is no longer active."""


@dataclass(frozen=True)
class IssuedToken:
    """A freshly issued token: ``token`` is shown once and never stored."""

    token: str
    token_id: str
    officer: str
    key_id: str
    expires_at: float


@dataclass(frozen=True)
class OfficerLogin:
    """Who a dashboard session acts for, and until when."""

    officer: str
    key_id: str
    expires_at: float


def secret_digest(secret: str) -> str:
    """The stored form of a token or session value: hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def active_officer(session: Session, key_id: str) -> Principal | None:
    """The principal of ``key_id`` if it is an active officer key, else None."""
    row = session.get(Principal, key_id)
    return row if row is not None and row.role == "officer" and row.status == "active" else None


def issue_login_token(session: Session, *, officer: str, hours: float, actor: str,
                      now: float) -> IssuedToken:
    """Issue a single-use login token for the active officer ``officer``, valid ``hours``.

    Raises ValueError if no active officer has that name (a researcher never gets one)
    or ``hours`` is not in (0, MAX_TOKEN_HOURS].
    """
    if not 0 < hours <= MAX_TOKEN_HOURS:
        raise ValueError(f"hours must be in (0, {MAX_TOKEN_HOURS:g}], got {hours:g}")
    principal = session.exec(  # reviewed: ORM query, not exec
        select(Principal)
        .where(Principal.name == officer, Principal.role == "officer", Principal.status == "active")
        .order_by(Principal.created_at.desc())  # type: ignore[attr-defined]
    ).first()
    if principal is None:
        raise ValueError(f"no active officer named {officer!r} (add one with `fedgate officer add`)")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    issued = IssuedToken(token=token, token_id="tok-" + secrets.token_hex(8), officer=principal.name,
                         key_id=principal.key_id, expires_at=now + hours * 3600.0)
    append_entry(session, action="token", decision="issued", actor=actor, token_id=issued.token_id,
                 key_id=issued.key_id, principal=issued.officer, expires=_rfc3339(issued.expires_at))
    session.add(DashboardToken(id=issued.token_id, token_hash=secret_digest(token),
                               key_id=issued.key_id, created_at=now, expires_at=issued.expires_at))
    session.flush()
    return issued


def exchange_login_token(session: Session, token: str, *, now: float) -> tuple[str, OfficerLogin]:
    """Trade a valid token for a new session; returns the session value and its login.

    Raises ``LoginRefused`` (one message for every cause, so a guesser learns nothing)
    if the token is unknown, expired or already used, or its officer is not active.
    """
    row = session.exec(  # reviewed: ORM query, not exec
        select(DashboardToken).where(DashboardToken.token_hash == secret_digest(token)).with_for_update()
    ).first()
    if row is None or row.exchanged_at is not None or row.expires_at <= now:
        raise LoginRefused("the login token is unknown, expired or already used")
    principal = active_officer(session, row.key_id)
    if principal is None:
        raise LoginRefused("the login token is unknown, expired or already used")
    row.exchanged_at = now
    session.add(row)
    value = secrets.token_urlsafe(32)
    session.add(DashboardSession(session_hash=secret_digest(value), key_id=row.key_id,
                                 token_id=row.id, created_at=now, expires_at=row.expires_at))
    append_entry(session, action="token", decision="exchanged", actor=row.key_id, token_id=row.id,
                 key_id=row.key_id, principal=principal.name)
    session.execute(delete(DashboardSession).where(DashboardSession.expires_at <= now))  # type: ignore[arg-type]
    session.flush()
    return value, OfficerLogin(officer=principal.name, key_id=row.key_id, expires_at=row.expires_at)


def session_login(session: Session, value: str, *, now: float) -> OfficerLogin | None:
    """The login a session value stands for, if it is unexpired and its officer still active."""
    row = session.get(DashboardSession, secret_digest(value))
    if row is None or row.expires_at <= now:
        return None
    principal = active_officer(session, row.key_id)
    if principal is None:
        return None
    return OfficerLogin(officer=principal.name, key_id=row.key_id, expires_at=row.expires_at)


def end_session(session: Session, value: str) -> None:
    """Forget a session (logout); a no-op for an unknown value."""
    session.execute(delete(DashboardSession).where(  # type: ignore[arg-type]
        DashboardSession.session_hash == secret_digest(value)))


def _rfc3339(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
