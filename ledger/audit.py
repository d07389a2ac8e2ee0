"""Append-only audit log with RFC 6962 leaf hashing, and its signed checkpoints.

Contract:

* ``append_entry`` must run inside the caller's write transaction, *before* the decision
  it records takes effect: the entry commits atomically with the budget change it
  describes, or neither happens.
* Entries are canonical JSON (``ledger.canonical``); each stores its RFC 6962 leaf hash
  ``SHA-256(0x00 || entry)``; ``merkle_root`` computes the RFC 6962 tree head
  (interior nodes ``SHA-256(0x01 || left || right)``).
* Entries hold ids, digests, parameters and decisions only — never data values.
* ``publish_checkpoint`` signs the tree head of the current log with the node key (the gateway
  signs over a read snapshot, ``sign_current_tree``, and only stores under the write lock). It
  never signs a tree that is inconsistent with the latest stored checkpoint, or whose
  entries do not hash to their stored leaf hashes: tampering with the stored log is
  refused (``AuditLogCorrupted``), not laundered into a new signature.
* Entries are immutable once committed, so a tree built from the first ``n`` entries
  stays valid: readers may cache it.
"""

from __future__ import annotations

import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import func
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from ledger.canonical import canonical_json, entry_object
from ledger.checkpoints import (
    Checkpoint,
    CheckpointInvalid,
    parse_and_verify_checkpoint,
    sign_checkpoint,
)
from ledger.fixed_sql import Statement, execute
from ledger.merkle import MerkleTree, leaf_hash, merkle_root, node_hash
from ledger.models import AuditCheckpoint, AuditEntry, AuditHead
from ledger.timestamps import utc_timestamp

__all__ = [
    "AUDIT_ACTIONS",
    "AuditLogCorrupted",
    "append_entry",
    "audit_size",
    "audit_tree",
    "checkpoint_texts",
    "entry_object",
    "latest_checkpoint_text",
    "leaf_hash",
    "merkle_root",
    "node_hash",
    "publish_checkpoint",
    "read_entries",
    "read_entry_rows",
    "sign_current_tree",
    "store_checkpoint",
]

AUDIT_ACTIONS = frozenset(
    {
        "admit",  # a job was admitted and its budget reserved
        "deny",  # a request was refused (policy, budget, validation)
        "charge",  # a reservation was committed
        "bill",  # a job's metered compute was priced and charged (gateway.node.billing; money, not ε)
        "refund",  # a reservation was released (failure before data access)
        "release",  # DP outputs of a job were released
        "review",  # owner review of a held job: requested, approved, denied, expired, withdrawn
        "fetch",  # a released result was fetched (counted by output policies)
        "key",  # the key registry changed
        "dataset",  # a dataset was registered or its budget set
        "policy",  # an owner policy was accepted, reloaded, or rejected (old policy kept)
        "token",  # an officer dashboard login token was issued or exchanged for a session
    }
)


_NEXT_SEQ = Statement("UPDATE audithead SET size = size + 1 WHERE id = 1 RETURNING size")
_FIRST_HEAD = Statement("INSERT INTO audithead (id, size) VALUES (1, 1)")
_INSERT_ENTRY = Statement("INSERT INTO auditentry (seq, entry, leaf_hash) VALUES (?, ?, ?)")
_LOCK_HEAD = Statement("SELECT id FROM audithead WHERE id = 1", lock=True)


def lock_head(on: Session | Connection) -> None:
    """Take the audit head's row lock for the caller's transaction (``SELECT … FOR UPDATE``
    on PostgreSQL; nothing on SQLite, whose ``BEGIN IMMEDIATE`` holds the database)."""
    execute(on, _LOCK_HEAD).fetchall()


def append_entry(session: Session | Connection, *, action: str, **fields: Any) -> int:
    """Append one audit entry in the caller's transaction; return its sequence number.

    Takes the next number by incrementing the audit head row (``UPDATE ... RETURNING``,
    which row-locks it on PostgreSQL), so concurrent appenders get dense, gap-free numbers.
    Written as fixed statements on the session's connection (``ledger.fixed_sql``), never as
    ORM objects: the head is read and written only here, so no session holds a copy of it
    that could go stale.
    """
    if action not in AUDIT_ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    if "seq" in fields or "timestamp" in fields:
        raise ValueError("seq and timestamp of an audit entry are set by append_entry")
    head = execute(session, _NEXT_SEQ).fetchone()
    if head is None:  # the first entry of a log whose head row is not written yet
        execute(session, _FIRST_HEAD)
        seq = 0
    else:
        seq = int(head[0]) - 1
    body = {"seq": seq, "timestamp": utc_timestamp(), "action": action, **fields}
    encoded = canonical_json(body)
    execute(session, _INSERT_ENTRY, (seq, encoded.decode("utf-8"), leaf_hash(encoded).hex()))
    return seq


def read_entries(session: Session, start: int = 0, end: int | None = None) -> list[dict[str, Any]]:
    """Decoded entries with ``start <= seq < end``, in order."""
    return [json.loads(row.entry) for row in read_entry_rows(session, start, end)]


def read_entry_rows(session: Session, start: int = 0, end: int | None = None) -> list[AuditEntry]:
    """Stored entries (exact canonical text and leaf hash) with ``start <= seq < end``."""
    query = select(AuditEntry).where(AuditEntry.seq >= start)
    if end is not None:
        query = query.where(AuditEntry.seq < end)
    return list(session.exec(query.order_by(AuditEntry.seq)).all())  # reviewed: ORM query, not exec


class AuditLogCorrupted(Exception):
    """The stored log contradicts itself or a checkpoint the node signed earlier."""


def audit_size(session: Session) -> int:
    """Number of entries in the log, as seen by this transaction."""
    statement = select(AuditHead.size).where(AuditHead.id == 1)
    size = session.exec(statement).first()  # reviewed: ORM query, not exec
    return size or 0


def audit_tree(session: Session, size: int) -> MerkleTree:
    """The Merkle tree of the first ``size`` entries, from their stored leaf hashes."""
    hashes = session.exec(  # reviewed: ORM query, not exec
        select(AuditEntry.leaf_hash).where(AuditEntry.seq < size).order_by(AuditEntry.seq)
    ).all()
    if len(hashes) != size:
        raise AuditLogCorrupted(f"the log should hold {size} entries but {len(hashes)} are stored")
    return MerkleTree(bytes.fromhex(h) for h in hashes)


def checkpoint_texts(session: Session) -> list[str]:
    """Every stored checkpoint text, by increasing tree size."""
    statement = select(AuditCheckpoint.text).order_by(AuditCheckpoint.size)
    return list(session.exec(statement).all())  # reviewed: ORM query, not exec


def latest_checkpoint_text(session: Session) -> str | None:
    return session.exec(  # reviewed: ORM query, not exec
        select(AuditCheckpoint.text).order_by(AuditCheckpoint.size.desc()).limit(1)  # type: ignore[attr-defined]
    ).first()


def publish_checkpoint(session: Session, node_key: Ed25519PrivateKey, key_id: str) -> Checkpoint:
    """Sign and store a checkpoint of the log at its current size; idempotent per size.

    Runs in the caller's transaction: :func:`sign_current_tree`, then :func:`store_checkpoint`.
    On any mismatch it raises ``AuditLogCorrupted`` and signs nothing.
    """
    return store_checkpoint(session, sign_current_tree(session, node_key, key_id),
                            node_key.public_key())


def sign_current_tree(session: Session, node_key: Ed25519PrivateKey, key_id: str) -> str:
    """The signed checkpoint text of the log as ``session`` sees it (the stored one if that
    size is signed already); stores nothing, so it may run in a read-only snapshot and keep
    its O(log size) work out of the write lock.

    Before signing it recomputes every leaf hash from the entry text and checks the tree
    against the latest earlier checkpoint; on any mismatch it raises ``AuditLogCorrupted``.
    """
    public_key = node_key.public_key()
    size = audit_size(session)
    existing = session.get(AuditCheckpoint, size)
    if existing is not None:
        return _stored_checkpoint(existing.text, public_key).text
    newest = session.exec(select(func.max(AuditCheckpoint.size))).one()  # reviewed: ORM query, not exec
    if newest is not None and newest > size:
        raise AuditLogCorrupted(f"the log holds {size} entries but the node signed a checkpoint "
                                f"at size {newest}: entries were removed; refusing to sign")
    previous_text = latest_checkpoint_text(session)
    previous = _stored_checkpoint(previous_text, public_key) if previous_text else None
    tree = _recomputed_tree(session, size, new_from=previous.size if previous else 0)
    if previous is not None and tree.root(previous.size) != previous.root:
        raise AuditLogCorrupted(
            f"entries 0..{previous.size - 1} no longer match the checkpoint signed at "
            f"{previous.timestamp}; refusing to sign over a modified log")
    return sign_checkpoint(node_key, key_id, size, tree.root(), utc_timestamp())


def store_checkpoint(session: Session, text: str, public_key: Ed25519PublicKey) -> Checkpoint:
    """Store a checkpoint text from :func:`sign_current_tree` in the caller's transaction and
    return the stored checkpoint of its size (a concurrent publisher's, if it stored one first).

    Entries never change, so a checkpoint signed over a snapshot of the first n entries stays
    true however many entries or checkpoints were added since."""
    checkpoint = parse_and_verify_checkpoint(text, public_key)
    try:
        with session.begin_nested():
            session.add(AuditCheckpoint(size=checkpoint.size, text=text))
    except IntegrityError:  # this size is stored already
        statement = select(AuditCheckpoint.text).where(AuditCheckpoint.size == checkpoint.size)
        text = session.exec(statement).one()  # reviewed: ORM query, not exec
    return parse_and_verify_checkpoint(text, public_key)


def _stored_checkpoint(text: str, public_key: Ed25519PublicKey) -> Checkpoint:
    try:
        return parse_and_verify_checkpoint(text, public_key)
    except CheckpointInvalid as exc:
        raise AuditLogCorrupted(f"a stored checkpoint is not valid ({exc}); refusing to sign") from None


def _recomputed_tree(session: Session, size: int, *, new_from: int) -> MerkleTree:
    """The tree of the first ``size`` entries, hashing each entry's text afresh.

    Entries from ``new_from`` on (not yet covered by a checkpoint) must also be canonical
    and numbered by their position; older ones are covered by the previous root.
    """
    rows = session.exec(  # reviewed: ORM query, not exec
        select(AuditEntry.seq, AuditEntry.entry, AuditEntry.leaf_hash)
        .where(AuditEntry.seq < size)
        .order_by(AuditEntry.seq)
    ).all()
    leaves = []
    for position, (seq, entry, stored) in enumerate(rows):
        digest = leaf_hash(entry.encode("utf-8"))
        if seq != position or digest.hex() != stored:
            raise AuditLogCorrupted(f"stored entry {position} does not match its leaf hash or "
                                    "position; refusing to sign")
        if position >= new_from:
            value = entry_object(entry)
            number = value.get("seq") if value is not None else None
            if type(number) is not int or number != position:
                raise AuditLogCorrupted(f"stored entry {position} is not a canonical entry "
                                        f"numbered {position}; refusing to sign")
        leaves.append(digest)
    if len(leaves) != size:
        raise AuditLogCorrupted(f"the log should hold {size} entries but {len(leaves)} are stored; "
                                "refusing to sign")
    return MerkleTree(leaves)
