"""Audit log cost: appends, checkpoints, proofs, export and offline verification.

Measured on SQLite (WAL, synchronous=FULL) with a log of realistic entries (an admission
record of ~400 bytes): the append transaction at an empty log and at the full log
(target: flat), publishing a checkpoint and serving an inclusion proof (both read every
leaf hash: O(n) reads, O(log n) proof hashes), exporting, and verifying the export
offline. Verification is compared with raw SHA-256 over the same bytes, the floor for
any verifier that rehashes every entry.
"""

from __future__ import annotations

import hashlib
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ledger import keys
from ledger.audit import append_entry, audit_tree, publish_checkpoint
from ledger.audit_export import decode_export, export_audit
from ledger.audit_verify import verify_export
from ledger.db import create_schema, make_engine, session
from ledger.merkle import MerkleTree, leaf_hash

LOG_SIZE = 100_000
BATCH = 2_000


def _admission(s: Any, n: int) -> None:
    append_entry(s, action="admit", decision="allow", actor="k-3f2a9c1d5e7b8a60",
                 principal="alice", dataset="clinic-notes", job_id=f"job-{n:012d}",
                 request_digest="sha256:" + hashlib.sha256(str(n).encode()).hexdigest(),
                 epsilon=0.731, delta=1e-6, policy_version="sha256:" + "ab" * 32)


def _timed(function: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def _append_ms(engine: Any, repeats: int = 200) -> float:
    times = []
    for n in range(repeats):
        start = time.perf_counter()
        with session(engine) as s, s.begin():
            _admission(s, n)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(size: int = LOG_SIZE) -> dict[str, float]:
    node_key = keys.generate_private_key()
    key_id = keys.key_id(node_key.public_key())
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{Path(tmp) / 'bench.db'}")
        create_schema(engine)
        append_empty_ms = _append_ms(engine)
        for first in range(0, size - 400, BATCH):
            with session(engine) as s, s.begin():
                for n in range(first, min(first + BATCH, size - 400)):
                    _admission(s, n)

        def publish() -> None:
            with session(engine) as s, s.begin():
                publish_checkpoint(s, node_key, key_id)

        first_checkpoint_s, _ = _timed(publish)
        append_full_ms = _append_ms(engine)

        def prove() -> list[bytes]:
            with session(engine) as s:
                return audit_tree(s, size).inclusion_proof(size // 3, size)

        def export() -> bytes:
            with session(engine) as s:
                return export_audit(s, node_key_id=key_id)

        checkpoint_s, _ = _timed(publish)
        proof_s, _ = _timed(prove)
        export_s, data = _timed(export)
        engine.dispose()
    verify_s, report = _timed(lambda: verify_export(data, node_key.public_key()))
    assert report.ok, report.summary()
    entries = [text.encode() for text in decode_export(data).entries]
    blob = b"".join(entries)
    sha_s, _ = _timed(lambda: hashlib.sha256(blob).digest())
    tree_s, _ = _timed(lambda: MerkleTree(leaf_hash(e) for e in entries).root())
    return {
        "size": size, "append_empty_ms": append_empty_ms, "append_full_ms": append_full_ms,
        "first_checkpoint_s": first_checkpoint_s, "checkpoint_s": checkpoint_s,
        "proof_s": proof_s, "export_s": export_s,
        "export_mb": len(data) / 1e6, "verify_s": verify_s, "tree_s": tree_s,
        "entries_mb": len(blob) / 1e6, "sha_s": sha_s,
    }


def run() -> str:
    r = measure()
    size = r["size"]
    return "\n".join([
        "## Audit log",
        "",
        f"`python -m bench.run audit` — a log of {size:,} admission entries "
        f"({r['entries_mb'] / size * 1e6:.0f} bytes each), SQLite WAL, synchronous=FULL.",
        "",
        "| operation | time | rate |",
        "| --- | ---: | ---: |",
        f"| append (own transaction), empty log | {r['append_empty_ms']:.2f} ms | "
        f"{1e3 / r['append_empty_ms']:,.0f} entries/s |",
        f"| append (own transaction), {size:,}-entry log | {r['append_full_ms']:.2f} ms | "
        f"{r['append_full_ms'] / r['append_empty_ms']:.2f}× the empty log |",
        f"| first checkpoint (rehash and check every entry, sign) | {r['first_checkpoint_s']:.2f} s | "
        f"{size / r['first_checkpoint_s']:,.0f} entries/s |",
        f"| next checkpoint, 200 entries later (rehash all, check the 200 new) | "
        f"{r['checkpoint_s']:.2f} s | {size / r['checkpoint_s']:,.0f} entries/s |",
        f"| inclusion proof (load leaf hashes, build tree) | {r['proof_s']:.2f} s | |",
        f"| export ({r['export_mb']:.1f} MB) | {r['export_s']:.2f} s | "
        f"{size / r['export_s']:,.0f} entries/s |",
        f"| verify export offline | {r['verify_s']:.2f} s | {size / r['verify_s']:,.0f} entries/s, "
        f"{r['entries_mb'] / r['verify_s']:.0f} MB/s |",
        f"| of which: leaf hashes + tree | {r['tree_s']:.2f} s | "
        f"{size / r['tree_s']:,.0f} entries/s |",
        f"| raw SHA-256 over the same entry bytes | {r['sha_s'] * 1e3:.0f} ms | "
        f"{r['entries_mb'] / r['sha_s']:,.0f} MB/s |",
    ]) + "\n"


if __name__ == "__main__":
    print(run())
