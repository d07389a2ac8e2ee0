"""Offline verification of an audit export against the node's public key (pure).

Trust model: the verifier trusts only the node public key the officer supplies (and any
checkpoints the officer saved earlier). Everything else in the export is recomputed:
leaf hashes from the exact entry text, the RFC 6962 tree, each checkpoint's root at its
size, and consistency proofs between consecutive checkpoints.

Checks, in order; the report names the first problem found:

1. the document is a fedgate export made by the node whose key was supplied;
2. every checkpoint is signed by that key, and no two signed roots differ at one size;
3. entry ``i`` is a canonical JSON object with ``"seq": i`` — an exact index for a
   deleted, inserted, reordered or hand-edited (non-canonical) entry;
4. each checkpoint's signed root equals the recomputed root at its size, and each is
   consistent with the previous one (RFC 9162 §2.1.4). A modified entry that still
   looks well formed can only be located between two checkpoints: the report names the
   range, and entries before it are proven intact;
5. no checkpoint is larger than the export: a cut-off tail is reported from its first
   missing entry.

Entries after the latest checkpoint are structurally checked but not yet vouched for by
any signature; the report says how many.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ledger.audit import entry_object
from ledger.audit_export import AuditExport, ExportMalformed, decode_export
from ledger.checkpoints import Checkpoint, CheckpointInvalid, parse_and_verify_checkpoint
from ledger.keys import key_id as derive_key_id
from ledger.merkle import MerkleTree, leaf_hash, verify_consistency


@dataclass(frozen=True)
class Finding:
    """One verification failure.

    ``reason`` is a stable slug (see docs/compliance.md); ``first_index`` is the first
    entry that is bad or cannot be vouched for, ``last_index`` the end of the range
    when the failure can only be located between two checkpoints.
    """

    reason: str
    message: str
    first_index: int | None = None
    last_index: int | None = None


@dataclass(frozen=True)
class VerificationReport:
    ok: bool
    entries: int
    checkpoints: int
    verified_size: int  # entries 0 .. verified_size - 1 are vouched for by a signed checkpoint
    root: str  # hex RFC 6962 root over all exported entries
    latest: Checkpoint | None
    problem: Finding | None

    def summary(self) -> str:
        """A human summary: the first problem, or what was proven."""
        if self.problem is not None:
            return f"FAILED [{self.problem.reason}]: {self.problem.message}"
        assert self.latest is not None
        lines = [
            f"OK: {_count(self.entries, 'entry', 'entries')} and "
            f"{_count(self.checkpoints, 'signed checkpoint', 'signed checkpoints')} verified",
            f"  latest checkpoint: size {self.latest.size}, root {self.latest.root.hex()}, "
            f"signed by {self.latest.origin} at {self.latest.timestamp}",
        ]
        tail = self.entries - self.verified_size
        if tail:
            lines.append(f"  note: {_count(tail, 'entry', 'entries')} "
                         f"({_span(self.verified_size, self.entries - 1)}) newer than the latest "
                         "checkpoint not yet signed")
        return "\n".join(lines)


def verify_export(
    export_bytes: bytes, node_public_key: Ed25519PublicKey, known_checkpoints: Sequence[str] = ()
) -> VerificationReport:
    """Verify an export; ``known_checkpoints`` are checkpoint texts saved earlier."""
    try:
        export = decode_export(export_bytes)
    except ExportMalformed as exc:
        return _failed(Finding("malformed-export", f"the file is not a fedgate audit export: {exc}"))
    key_id = derive_key_id(node_public_key)
    if export.node_key_id != key_id:
        return _failed(Finding(
            "wrong-node-key", f"the export was made by node {export.node_key_id}, but the key "
            f"supplied is {key_id}; use the node.pub of the node that produced the export"),
            export)
    checkpoints, problem = _verified_checkpoints(export, node_public_key, known_checkpoints)
    if problem is not None:
        return _failed(problem, export)
    if not checkpoints:
        return _failed(Finding("no-checkpoint", "the export holds no signed checkpoint, so none "
                               "of its entries is vouched for by the node; publish one with "
                               "`fedgate audit checkpoint` and export again"), export)
    tree = MerkleTree(leaf_hash(text.encode("utf-8")) for text in export.entries)
    size = tree.size
    structural = _first_malformed_entry(export.entries)
    mismatch = _first_root_mismatch(tree, [c for c in checkpoints if c.size <= size])
    if structural is not None and (mismatch is None or structural.first_index < mismatch[1]):
        return _failed(structural, export)
    if mismatch is not None:
        return _failed(mismatch[0], export)
    if checkpoints[-1].size > size:
        latest = checkpoints[-1]
        return _failed(Finding(
            "truncated", f"the export holds {size} entries, but the node signed a checkpoint for "
            f"size {latest.size} at {latest.timestamp}: entries {_span(size, latest.size - 1)} "
            "were removed from the end of the log", size, latest.size - 1), export)
    return VerificationReport(ok=True, entries=size, checkpoints=len(checkpoints),
                              verified_size=checkpoints[-1].size, root=tree.root().hex(),
                              latest=checkpoints[-1], problem=None)


def _verified_checkpoints(
    export: AuditExport, public_key: Ed25519PublicKey, known: Sequence[str]
) -> tuple[list[Checkpoint], Finding | None]:
    """All checkpoints (exported and known), verified and by size; or the first bad one."""
    by_size: dict[int, Checkpoint] = {}
    sources = [(text, f"checkpoint {n + 1} of {len(export.checkpoints)} in the export")
               for n, text in enumerate(export.checkpoints)]
    sources += [(text, f"saved checkpoint {n + 1}") for n, text in enumerate(known)]
    for text, label in sources:
        try:
            checkpoint = parse_and_verify_checkpoint(text, public_key)
        except CheckpointInvalid as exc:
            claimed = text.split("\n", 2)[1] if text.count("\n") >= 2 else "?"
            return [], Finding("bad-checkpoint", f"{label} (for size {claimed}) is not a valid "
                               f"checkpoint of this node, so it was altered, forged or re-signed "
                               f"with another key: {exc}")
        other = by_size.setdefault(checkpoint.size, checkpoint)
        if other.root != checkpoint.root:
            return [], Finding("split-view", f"the node signed two different roots for size "
                               f"{checkpoint.size} ({other.timestamp} and {checkpoint.timestamp}): "
                               "the log was rewritten, or shown differently to different readers")
    return [by_size[s] for s in sorted(by_size)], None


def _first_malformed_entry(entries: list[str]) -> Finding | None:
    """The first entry that is not canonical JSON numbered by its position."""
    values = [entry_object(text) for text in entries]
    seqs = [_seq(value) for value in values]
    for index, (value, seq) in enumerate(zip(values, seqs, strict=True)):
        if value is None:
            return Finding("malformed-entry", f"entry {index} is not a canonical JSON object: its "
                           "text was edited after the node wrote it", index, index)
        if seq is None:
            return Finding("malformed-entry", f"entry {index} has no valid \"seq\" number",
                           index, index)
        if seq < index:
            return Finding("inserted-entry", f"position {index} holds a second entry numbered "
                           f"{seq}: an entry was inserted or duplicated", index, index)
        if seq > index and index in seqs[index + 1:]:
            return Finding("reordered-entries", f"entries are out of order: position {index} "
                           f"holds entry {seq}, and entry {index} comes later, at position "
                           f"{seqs.index(index, index + 1)}", index, index)
        if seq > index:
            removed = f", so entries {_span(index, seq - 1)} were removed" if seq - 1 > index else ""
            return Finding("missing-entry", f"entry {index} is missing (deleted): position {index} "
                           f"holds entry {seq}{removed}", index, seq - 1)
    return None


def _seq(value: dict[str, Any] | None) -> int | None:
    seq = value.get("seq") if value is not None else None
    return seq if type(seq) is int else None


def _first_root_mismatch(
    tree: MerkleTree, checkpoints: list[Checkpoint]
) -> tuple[Finding, int] | None:
    """The first checkpoint (within the export) the recomputed tree contradicts.

    Returns the finding and the checkpoint's size (the end of the suspect range).
    """
    previous: Checkpoint | None = None
    for checkpoint in checkpoints:
        low = previous.size if previous else 0
        proof = tree.consistency_proof(low, checkpoint.size)
        consistent = previous is None or verify_consistency(
            low, checkpoint.size, previous.root, checkpoint.root, proof)
        if tree.root(checkpoint.size) != checkpoint.root or not consistent:
            high = checkpoint.size - 1
            intact = (f"; entries {_span(0, low - 1)} are intact (they match the checkpoint for "
                      f"size {low})") if low else ""
            if low == high:
                message = (f"entry {low} was modified or replaced: it does not match the checkpoint "
                           f"signed for size {checkpoint.size} at {checkpoint.timestamp}{intact}")
            else:
                message = (f"entries {_span(low, high)} do not match the checkpoint signed for size "
                           f"{checkpoint.size} at {checkpoint.timestamp}: at least one of them was "
                           f"modified or replaced{intact}")
            return Finding("modified-entries", message, low, high), checkpoint.size
        previous = checkpoint
    return None


def _count(n: int, singular: str, plural: str) -> str:
    return f"{n} {singular if n == 1 else plural}"


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}–{last}"


def _failed(problem: Finding, export: AuditExport | None = None) -> VerificationReport:
    return VerificationReport(ok=False, entries=len(export.entries) if export else 0,
                              checkpoints=len(export.checkpoints) if export else 0,
                              verified_size=0, root="", latest=None, problem=problem)
