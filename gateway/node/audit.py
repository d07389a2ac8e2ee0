"""A node's audit-log operations, shared by the officer endpoints, the dashboard and
``fedgate audit``, and the check that a principal may read the log (``read-audit``).

Each function opens its own transaction on the node's ledger. Proofs default to the
latest signed checkpoint (publishing one first if the log grew), so every proof handed
out can be checked against a root the node signed. Out-of-range requests raise
``AuditRequestInvalid`` with a message that says what is allowed.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from gateway.node.node import Node
from gateway.policy.rows import AUDIT_OBJECT
from gateway.protocol.problems import Problem
from ledger.audit import (
    AuditLogCorrupted,
    append_entry,
    audit_size,
    audit_tree,
    publish_checkpoint,
    read_entry_rows,
    sign_current_tree,
    store_checkpoint,
)
from ledger.audit_export import export_audit
from ledger.checkpoints import Checkpoint
from ledger.models import AuditCheckpoint, AuditEntry

log = logging.getLogger("fedgate.audit")

MAX_ENTRIES_PER_PAGE = 1000


class AuditRequestInvalid(ValueError):
    """A range or index outside the log."""


def publish_node_checkpoint(node: Node) -> Checkpoint:
    """Sign a checkpoint of the log now (a no-op returning the latest if nothing changed).

    Raises ``AuditLogCorrupted`` if the stored log contradicts an earlier checkpoint.
    """
    with node.read_session() as s:  # the O(log size) rehash holds no write lock
        text = sign_current_tree(s, node.node_key, node.node_key_id)
    with node.session() as s, s.begin():
        return store_checkpoint(s, text, node.node_key.public_key())


def export_node_audit(node: Node) -> tuple[bytes, str | None]:
    """An export covering the whole log, and a warning if no new checkpoint could be signed.

    A checkpoint of the current size is published first, in the same transaction, so an
    honest export is fully vouched for. If the node refuses to sign because the stored
    log was tampered with, the export is still produced (it is the evidence).
    """
    warning = None
    with node.session() as s, s.begin():
        try:
            publish_checkpoint(s, node.node_key, node.node_key_id)
        except AuditLogCorrupted as exc:
            log.error("audit log corrupted: %s", exc)
            warning = f"no new checkpoint was signed: {exc}"
        return export_audit(s, node_key_id=node.node_key_id), warning


def entries_page(node: Node, start: int = 0, end: int | None = None) -> dict[str, Any]:
    """Entries ``start <= seq < end`` (at most ``MAX_ENTRIES_PER_PAGE``), as stored."""
    with node.session() as s:
        size = audit_size(s)
        if not 0 <= start <= size:
            raise AuditRequestInvalid(f"start must be in 0..{size} (the log has {size} entries)")
        end = min(size, start + MAX_ENTRIES_PER_PAGE) if end is None else min(end, size)
        if end < start:
            raise AuditRequestInvalid(f"end must not be below start ({start})")
        if end - start > MAX_ENTRIES_PER_PAGE:
            raise AuditRequestInvalid(f"ask for at most {MAX_ENTRIES_PER_PAGE} entries at a time")
        rows = read_entry_rows(s, start, end)
    return {
        "size": size,
        "start": start,
        "end": end,
        "entries": [{"seq": r.seq, "leaf_hash": r.leaf_hash, "entry": json.loads(r.entry)}
                    for r in rows],
    }


def inclusion_proof_for(node: Node, index: int, size: int | None = None) -> dict[str, Any]:
    """Proof that entry ``index`` is in the tree of ``size`` (default: latest checkpoint)."""
    if size is None:
        size = publish_node_checkpoint(node).size
    with node.session() as s:
        _check_size(size, audit_size(s))
        if not 0 <= index < size:
            raise AuditRequestInvalid(f"index must be in 0..{size - 1} for a tree of size {size}")
        tree = audit_tree(s, size)
        entry = s.get(AuditEntry, index)
        checkpoint = s.get(AuditCheckpoint, size)
    assert entry is not None  # audit_tree checked that entries 0..size-1 exist
    return {
        "index": index,
        "size": size,
        "entry": entry.entry,
        "leaf_hash": tree.leaf(index).hex(),
        "proof": [h.hex() for h in tree.inclusion_proof(index, size)],
        "root": tree.root(size).hex(),
        "checkpoint": checkpoint.text if checkpoint else None,
    }


def consistency_proof_for(node: Node, old: int, new: int | None = None) -> dict[str, Any]:
    """Proof that the tree of ``old`` is a prefix of that of ``new`` (default: latest)."""
    if new is None:
        new = publish_node_checkpoint(node).size
    with node.session() as s:
        _check_size(new, audit_size(s))
        if not 0 <= old <= new:
            raise AuditRequestInvalid(f"old must be in 0..{new}")
        tree = audit_tree(s, new)
        old_checkpoint = s.get(AuditCheckpoint, old)
        new_checkpoint = s.get(AuditCheckpoint, new)
    return {
        "old": old,
        "new": new,
        "old_root": tree.root(old).hex(),
        "new_root": tree.root(new).hex(),
        "proof": [h.hex() for h in tree.consistency_proof(old, new)],
        "old_checkpoint": old_checkpoint.text if old_checkpoint else None,
        "new_checkpoint": new_checkpoint.text if new_checkpoint else None,
    }


def _check_size(size: int, current: int) -> None:
    if not 0 <= size <= current:
        raise AuditRequestInvalid(f"tree size must be in 0..{current} (the log has {current} entries)")


def authorise_audit_reader(node: Node, *, subject: str, key_id: str) -> None:
    """Raise ``policy-denied`` (and audit the refusal) unless the policy allows ``subject``
    to ``read-audit``. Blocking: call it off the event loop."""
    decision = node.policy().decide(subject=subject, domain=node.config.owner,
                                    dataset=AUDIT_OBJECT, action="read-audit")
    if not decision.allowed:
        with node.session() as s, s.begin():
            append_entry(s, action="deny", decision="deny", reason="policy-denied",
                         explanation=decision.explanation, actor=key_id, principal=subject,
                         request_action="read-audit", policy_version=decision.policy_version,
                         rule=list(decision.rule or []))
        raise Problem("policy-denied", decision.explanation)
