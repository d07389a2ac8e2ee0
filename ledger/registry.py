"""Key registry (researchers, officers) and the replay-nonce store, in the ledger DB.

Every change to the registry is audited in the same transaction, and counted there by the
``REGISTRY`` version (``ledger.versions``). Revocation takes effect on the next request:
the gateway reads that version per request and caches keys only while it is unchanged.

A principal is a name with one or more keys of one role. Names are unique (up to case) across
roles and never name a group, and groups never name a principal (``add_principal``): the
policy matches principals and groups in one column, so a collision would hand one the other's
grants.
"""

from __future__ import annotations

import time
from collections.abc import Collection

from sqlalchemy import delete, func
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session as OrmSession
from sqlmodel import Session, select

from ledger.audit import append_entry
from ledger.fixed_sql import Statement, execute
from ledger.models import Principal, SeenNonce
from ledger.names import NameInvalid, check_name, check_principal_name, name_key
from ledger.versions import REGISTRY, bump_version

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
    policy_groups: Collection[str] = (),
) -> Principal:
    """Register a new principal ``name`` with its first public key, in ``group``.

    Principals and groups share the policy's subject column, so they are kept apart here:
    ``name`` must follow ``ledger.names``, be new (no principal of any role or status has it,
    whatever its case: a second key of the same person is ``add_key``) and not name a group
    (a role group, a registry group or one of ``policy_groups``, the groups the policy file
    declares); ``group`` must not be a principal's name, nor the other role's group.
    Raises ``NameInvalid`` or ``ValueError`` saying what to do instead.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    check_principal_name(name)
    existing = _named(session, name)
    if existing:
        raise ValueError(f"{existing[0].role} {existing[0].name!r} is already registered; a "
                         f"second key of the same person: `fedgate {existing[0].role} add-key "
                         f"{existing[0].name} --public-key FILE`; another person needs another name")
    groups = {name_key(g) for g in (*_registry_groups(session), *policy_groups)}
    if name_key(name) in groups:
        raise NameInvalid(f"{name!r} is a group: a principal of that name would get the "
                          "group's grants; choose a personal name")
    check_name(group, "group name")
    if name_key(group) == name_key(name) or _named(session, group):
        raise NameInvalid(f"group {group!r} is a principal's name: its members would get "
                          "that principal's grants; choose another group name")
    other = {f"{r}s" for r in ROLES} - {f"{role}s"}
    if name_key(group) in other:
        raise NameInvalid(f"group {group!r} is the role group of {group[:-1]} keys; a "
                          f"{role} cannot join it")
    return _insert_key(session, name=name, role=role, key_id=key_id,
                       public_key_b64=public_key_b64, group=group, actor=actor)


def add_key(session: Session, *, name: str, role: str, key_id: str, public_key_b64: str,
            actor: str) -> Principal:
    """Give the registered ``role`` ``name`` one more active key (a second device): the
    owner states it is the same person. The key joins the principal's group."""
    current = [p for p in _named(session, name) if p.name == name and p.role == role]
    if not current:
        raise ValueError(f"no {role} named {name!r}; register one with `fedgate {role} add`")
    newest = max(current, key=lambda p: p.created_at)
    return _insert_key(session, name=name, role=role, key_id=key_id,
                       public_key_b64=public_key_b64, group=newest.group, actor=actor)


def _named(session: Session, name: str) -> list[Principal]:
    """Every key (any role, any status) of a principal whose name is ``name`` up to case."""
    statement = select(Principal).where(func.lower(Principal.name) == name_key(name))
    return list(session.exec(statement).all())  # reviewed: ORM query, not exec


def _registry_groups(session: Session) -> set[str]:
    """The groups principals are registered in (any status: a revoked key's group is still
    a group the policy may name)."""
    statement = select(Principal.group).where(Principal.group != "").distinct()
    return set(session.exec(statement).all())  # reviewed: ORM query, not exec


def _insert_key(session: Session, *, name: str, role: str, key_id: str, public_key_b64: str,
                group: str, actor: str) -> Principal:
    """Store one active key of ``name``; raises ValueError if the key id exists."""
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
    bump_version(session, REGISTRY)
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
    bump_version(session, REGISTRY)
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
    return _insert_key(session, name=name, role=role, key_id=key_id,
                       public_key_b64=public_key_b64, group=group, actor=actor)


def list_principals(session: Session) -> list[Principal]:
    statement = select(Principal).order_by(Principal.name)
    return list(session.exec(statement).all())  # reviewed: ORM query, not exec


_REMEMBER_NONCE = Statement("INSERT INTO seennonce (key_id, nonce, expires_at) VALUES (?, ?, ?) "
                            "ON CONFLICT (key_id, nonce) DO NOTHING")


def remember_nonce(session: OrmSession | Connection, *, key_id: str, nonce: str,
                   expires_at: float) -> bool:
    """Record a nonce in the caller's transaction; False if this key already used it (a replay).

    The UNIQUE(key_id, nonce) constraint makes this atomic across gateway processes; the
    insert does nothing on that conflict (``ON CONFLICT DO NOTHING``, on SQLite and
    PostgreSQL), so a refused nonce leaves the rest of the caller's transaction as it was.
    The caller answers only after its transaction commits (the gateway: ``ledger.group_commit``).
    """
    return execute(session, _REMEMBER_NONCE, (key_id, nonce, expires_at)).rowcount == 1


def prune_nonces(session: OrmSession, now: float) -> int:
    """Delete, in the caller's transaction, nonces whose signatures can no longer verify;
    returns how many."""
    result = session.execute(delete(SeenNonce).where(SeenNonce.expires_at < now))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
