"""Offline verification of an audit export against the node's public key (pure, but for
the worker processes the caller may allow, see the last paragraph).

Trust model: the verifier trusts only the node public key the officer supplies (and any
checkpoints the officer saved earlier). Everything else in the export is recomputed:
leaf hashes from the exact entry bytes, the RFC 6962 tree, each checkpoint's root at its
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

Two passes, one result. The fast pass hashes each entry's bytes where they lie in the file
and compares the tree with every signed root (roots of one tree are consistent with each
other, so check 4 needs no proofs); it decodes only the entries no signed root covers. For
the covered ones check 3 holds without decoding: a matching root means their bytes are
exactly the bytes the node signed (SHA-256 collision resistance; the tree has the size the
node signed, so no leaf can pass for an interior node), and the node signs only canonical
entries numbered by their position (``ledger.audit.publish_checkpoint`` checks each new
entry before signing). The layout checks of ``ledger.audit_export`` make those bytes the
file's whole meaning: a JSON reader sees nothing else. At any doubt the fast pass gives up,
and the entry-by-entry pass runs the checks above to find and word the first problem,
decoding the entries from the last checkpoint whose root matches on (by the same argument,
those before it cannot hold one).

Hashing. The fast pass hashes runs of whole chunks of entries into one
``ledger.merkle.ChunkedTree`` (the same RFC 6962 tree, by the argument in its docstring),
with the compiled helper of ``ledger.rfc6962_native`` where it is built: one call hashes a
block of entry lines, another a chunk's tree, so no Python runs per entry or per node.
Without it, ``hashlib`` hashes the same bytes to the same hashes, two calls per entry.

Processes. With ``workers > 1`` and a large export, each run but the first is hashed in a
forked process, which finds its first entry by counting the lines before it; the runs' chunk heads
are then joined and compared with the signed roots as above. A process reports nothing
but hashes (or that it gave up), so the report is the same; if any process gives up or
dies, the entry-by-entry pass (one process) decides. Why processes: hashing is all the work.
With the helper one process reaches about two fifths of the speed of raw SHA-256 over the
same bytes and two processes about three fifths; with ``hashlib``, whose every call costs a
fixed overhead beyond SHA-256 itself (about 0.4 µs on the benchmark machine, two calls per
entry), one process stays below a fifth (docs/performance.md).
"""

from __future__ import annotations

import mmap
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import islice
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ledger.audit_export import ExportBytes, ExportMalformed, ExportReader, read_export
from ledger.canonical import entry_object
from ledger.checkpoints import Checkpoint, CheckpointInvalid, parse_and_verify_checkpoint
from ledger.keys import key_id as derive_key_id
from ledger.merkle import LEAF_PREFIX, ChunkedTree, MerkleTree, verify_consistency

# Fewer signed entries are hashed in one process: it takes under 0.2 s, and a fork (~20 ms
# with a large export in memory) would eat a good part of what a second process saves.
PARALLEL_MIN_ENTRIES = 1 << 17
_CHUNK_LEAVES = 1 << 12  # the unit of work of a process; runs start at multiples of it
_COUNT_COST = 0.15  # counting an entry's line, measured against hashing it (for balance only)
_CAN_FORK = "fork" in multiprocessing.get_all_start_methods()
_T = TypeVar("_T")


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
    export_bytes: ExportBytes, node_public_key: Ed25519PublicKey,
    known_checkpoints: Sequence[str] = (), *, workers: int = 1,
) -> VerificationReport:
    """Verify an export; ``known_checkpoints`` are checkpoint texts saved earlier.

    ``workers > 1`` lets the fast pass hash an export of at least ``PARALLEL_MIN_ENTRIES``
    signed entries in that many processes, forked (where the platform can fork): only for a
    caller that runs no other threads, such as the command line. The report is the same.
    """
    try:
        export = read_export(export_bytes)
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
    report = _vouched_by_signed_roots(export, checkpoints, workers)
    return report if report is not None else _entry_by_entry(export, checkpoints)


def verify_export_file(
    path: Path, node_public_key: Ed25519PublicKey, known_checkpoints: Sequence[str] = (), *,
    workers: int = 1,
) -> VerificationReport:
    """``verify_export`` of a file, mapped into memory rather than read into it."""
    with path.open("rb") as file:
        if path.stat().st_size == 0:
            return verify_export(b"", node_public_key, known_checkpoints)
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return verify_export(data, node_public_key, known_checkpoints, workers=workers)


def _vouched_by_signed_roots(
    export: ExportReader, checkpoints: list[Checkpoint], workers: int
) -> VerificationReport | None:
    """The report of an export every signed root matches, or None to look entry by entry.

    Hashes the entries as they lie in the file, in runs of whole chunks (one run per
    process) joined into one ``ChunkedTree``; checks the form and number of an entry only
    where no signed root covers it (see the module docstring for why that suffices).
    """
    signed = checkpoints[-1].size
    sizes = [checkpoint.size for checkpoint in checkpoints]
    starts = _run_starts(signed, workers)
    runs = _in_processes([partial(_hashed_run, export, first, stop, signed, sizes)
                          for first, stop in zip(starts, [*starts[1:], None], strict=True)])
    hashed = [run for run in runs if run is not None]
    if len(hashed) < len(runs):
        return None
    tree = hashed[0]
    for run in hashed[1:]:
        tree.join(run)
    if signed > tree.size:
        return None
    if any(tree.root(checkpoint.size) != checkpoint.root for checkpoint in checkpoints):
        return None
    return _verified(tree.size, tree.root(), checkpoints)


def _run_starts(signed: int, workers: int) -> list[int]:
    """The first entry of each process's run: chunk boundaries that share the work on the
    signed entries evenly (any entries after them go to the last run).

    A process reaches its run by counting the lines before it, at ``_COUNT_COST`` of the
    cost of hashing them, so later runs are shorter: run ``i`` starts near
    ``signed * (1 - q**i) / (1 - q**workers)`` with ``q = 1 - _COUNT_COST``, where each
    process has the same work (counting plus hashing).
    """
    if workers < 2 or signed < PARALLEL_MIN_ENTRIES or not _CAN_FORK:
        return [0]
    q, chunks = 1 - _COUNT_COST, signed / _CHUNK_LEAVES
    return sorted({round(chunks * (1 - q**n) / (1 - q**workers)) * _CHUNK_LEAVES
                   for n in range(workers)})


def _hashed_run(
    export: ExportReader, first: int, stop: int | None, signed: int, sizes: list[int]
) -> ChunkedTree | None:
    """Entries ``first .. stop - 1`` hashed, or None if the fast pass must give up: they are
    not in the layout, or one that no signed root covers is not numbered by its position."""
    tree = ChunkedTree(_CHUNK_LEAVES, first, sizes)
    try:
        for hashes in export.leaf_hash_batches(first, stop):
            tree.extend_hashes(hashes)
        index = max(first, signed)  # entries from here on: no signed root covers them
        for batch in export.leaf_input_batches(index, stop) if tree.size > index else ():
            if not all(map(_is_entry_numbered, batch, range(index, index + len(batch)))):
                return None
            index += len(batch)
    except ExportMalformed:
        return None
    return tree


def _in_processes(jobs: list[Callable[[], _T]]) -> list[_T | None]:
    """The jobs' results: the first job runs here, each other one in a forked process (its
    result is None if that process ends without one)."""
    if len(jobs) == 1:
        return [jobs[0]()]
    context = multiprocessing.get_context("fork")
    children = []
    try:
        for job in jobs[1:]:
            receiver, sender = context.Pipe(duplex=False)
            child = context.Process(target=_send_result, args=(sender, job), daemon=True)
            child.start()
            sender.close()
            children.append((child, receiver))
        results: list[_T | None] = [jobs[0]()]
        for _, receiver in children:
            try:
                results.append(receiver.recv())
            except EOFError:
                results.append(None)
    finally:
        for child, receiver in children:
            receiver.close()
            child.kill()  # not to wait for one still hashing when this process failed
            child.join()
    return results


def _send_result(sender: Connection, job: Callable[[], Any]) -> None:
    sender.send(job())


def _is_entry_numbered(leaf_input: bytes, index: int) -> bool:
    """Is ``leaf_input`` the leaf prefix and a canonical entry with ``"seq": index``?"""
    prefix, text = leaf_input[:len(LEAF_PREFIX)], leaf_input[len(LEAF_PREFIX):]
    return prefix == LEAF_PREFIX and _seq(_entry_value(text)) == index


def _entry_by_entry(export: ExportReader, checkpoints: list[Checkpoint]) -> VerificationReport:
    """Every check of the module docstring, reading each entry exactly: the first problem.

    Entries before the first contradicted checkpoint's predecessor match a signed root, so
    (as in the fast pass) only the entries after them are decoded.
    """
    tree = MerkleTree.of_leaf_inputs(LEAF_PREFIX + text for text in export.entry_texts())
    size = tree.size
    within = [c for c in checkpoints if c.size <= size]
    mismatch = _first_root_mismatch(tree, within)
    suspect = mismatch[1] if mismatch else range(within[-1].size if within else 0, size)
    structural = _first_malformed_entry(export.entry_texts(), suspect)
    if structural is not None:
        return _failed(structural, export, size)
    if mismatch is not None:
        return _failed(mismatch[0], export, size)
    if checkpoints[-1].size > size:
        latest = checkpoints[-1]
        return _failed(Finding(
            "truncated", f"the export holds {size} entries, but the node signed a checkpoint for "
            f"size {latest.size} at {latest.timestamp}: entries {_span(size, latest.size - 1)} "
            "were removed from the end of the log", size, latest.size - 1), export, size)
    return _verified(tree.size, tree.root(), checkpoints)


def _verified(entries: int, root: bytes, checkpoints: list[Checkpoint]) -> VerificationReport:
    return VerificationReport(ok=True, entries=entries, checkpoints=len(checkpoints),
                              verified_size=checkpoints[-1].size, root=root.hex(),
                              latest=checkpoints[-1], problem=None)


def _verified_checkpoints(
    export: ExportReader, public_key: Ed25519PublicKey, known: Sequence[str]
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


def _first_malformed_entry(texts: Iterator[bytes], suspect: range) -> Finding | None:
    """The first ``suspect`` entry that is not canonical JSON numbered by its position.

    Decodes one entry at a time, and past the range only to tell a reordered entry from a
    deleted one.
    """
    for index, text in enumerate(islice(texts, suspect.start, suspect.stop), suspect.start):
        value = _entry_value(text)
        if value is None:
            return Finding("malformed-entry", f"entry {index} is not a canonical JSON object: its "
                           "text was edited after the node wrote it", index, index)
        seq = _seq(value)
        if seq is None:
            return Finding("malformed-entry", f"entry {index} has no valid \"seq\" number",
                           index, index)
        if seq < index:
            return Finding("inserted-entry", f"position {index} holds a second entry numbered "
                           f"{seq}: an entry was inserted or duplicated", index, index)
        if seq > index:
            later = next((position for position, text in enumerate(texts, index + 1)
                          if _seq(_entry_value(text)) == index), None)
            if later is not None:
                return Finding("reordered-entries", f"entries are out of order: position {index} "
                               f"holds entry {seq}, and entry {index} comes later, at position "
                               f"{later}", index, index)
            removed = f", so entries {_span(index, seq - 1)} were removed" if seq - 1 > index else ""
            return Finding("missing-entry", f"entry {index} is missing (deleted): position {index} "
                           f"holds entry {seq}{removed}", index, seq - 1)
    return None


def _entry_value(text: bytes) -> dict[str, Any] | None:
    """The object an entry's bytes encode, if they are its canonical JSON; else None."""
    try:
        return entry_object(text.decode("utf-8"))
    except UnicodeDecodeError:
        return None


def _seq(value: dict[str, Any] | None) -> int | None:
    seq = value.get("seq") if value is not None else None
    return seq if type(seq) is int else None


def _first_root_mismatch(
    tree: MerkleTree, checkpoints: list[Checkpoint]
) -> tuple[Finding, range] | None:
    """The first checkpoint (within the export) the recomputed tree contradicts.

    Returns the finding and the suspect entries: from the previous checkpoint's size to this
    one's.
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
            return Finding("modified-entries", message, low, high), range(low, checkpoint.size)
        previous = checkpoint
    return None


def _count(n: int, singular: str, plural: str) -> str:
    return f"{n} {singular if n == 1 else plural}"


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}–{last}"


def _failed(problem: Finding, export: ExportReader | None = None,
            entries: int | None = None) -> VerificationReport:
    """A failed report; ``entries`` is counted from the export when not known yet."""
    if export is not None and entries is None:
        entries = export.count_entries()
    return VerificationReport(ok=False, entries=entries or 0,
                              checkpoints=len(export.checkpoints) if export else 0,
                              verified_size=0, root="", latest=None, problem=problem)
