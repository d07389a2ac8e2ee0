"""Key registry (researchers, officers) and the replay-nonce store, in the ledger DB.

Every change to the registry is audited in the same transaction. Revocation takes
effect on the next request because the gateway looks keys up per request.
"""

from __future__ import annotations

import time

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as OrmSession
from sqlmodel import Session, select

from ledger.audit import append_entry
from ledger.models import Principal, SeenNonce

ROLES = ("researcher", "officer")


def add_principal(
    session: Session,
    *,
    name: str,
    role: str,
    key_id: str,
    public_key_b64: str,
    group: str,
    actor: str,
) -> Principal:
    """Register a public key for ``name``; raises ValueError if the key id exists."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    if session.get(Principal, key_id) is not None:
        raise ValueError(f"key {key_id} is already registered")
    principal = Principal(
        key_id=key_id,
        name=name,
        role=role,
        group=group,
        public_key=public_key_b64,
        status="active",
        created_at=time.time(),
    )
    append_entry(
        session, action="key", actor=actor, decision="added", key_id=key_id, principal=name,
        role=role, group=group,
    )
    session.add(principal)
    session.flush()
    return principal


def revoke_principal(session: Session, *, name_or_key_id: str, actor: str) -> list[Principal]:
    """Revoke every active key of a principal (or one key by id); returns them."""
    rows = session.exec(  # reviewed: ORM query, not exec
        select(Principal).where(
            (Principal.name == name_or_key_id) | (Principal.key_id == name_or_key_id),
            Principal.status == "active",
        )
    ).all()
    if not rows:
        raise ValueError(f"no active key for {name_or_key_id!r}")
    for row in rows:
        append_entry(
            session, action="key", actor=actor, decision="revoked", key_id=row.key_id,
            principal=row.name, role=row.role,
        )
        row.status = "revoked"
        row.revoked_at = time.time()
        session.add(row)
    session.flush()
    return list(rows)


def rotate_principal(
    session: Session, *, name: str, role: str, key_id: str, public_key_b64: str, actor: str
) -> Principal:
    """Replace every active key of ``name`` by a new one, atomically (one transaction).

    The principal keeps its role and group; requests signed with the old keys are refused
    from the next request on.
    """
    current = session.exec(  # reviewed: ORM query, not exec
        select(Principal).where(Principal.name == name, Principal.role == role,
                                Principal.status == "active")
    ).all()
    if not current:
        raise ValueError(f"no active {role} named {name!r} to rotate")
    group = current[0].group
    revoke_principal(session, name_or_key_id=name, actor=actor)
    return add_principal(session, name=name, role=role, key_id=key_id,
                         public_key_b64=public_key_b64, group=group, actor=actor)


def list_principals(session: Session) -> list[Principal]:
    statement = select(Principal).order_by(Principal.name)
    return list(session.exec(statement).all())  # reviewed: ORM query, not exec


def remember_nonce(session: OrmSession, *, key_id: str, nonce: str, expires_at: float) -> bool:
    """Record a nonce; False if this key already used it (a replay).

    Runs in its own transaction; the UNIQUE(key_id, nonce) constraint makes this atomic
    across gateway processes.
    """
    try:
        with session.begin():
            session.add(SeenNonce(key_id=key_id, nonce=nonce, expires_at=expires_at))
    except IntegrityError:
        return False
    return True


def prune_nonces(session: OrmSession, now: float) -> int:
    """Delete nonces whose signatures can no longer verify; returns how many."""
    with session.begin():
        result = session.execute(delete(SeenNonce).where(SeenNonce.expires_at < now))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
