"""``fedgate audit``: export, verify offline, show, prove and checkpoint the audit log
(``DESCRIPTION`` is what ``fedgate audit --help`` says)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from gateway.cli.common import open_node
from gateway.cli.terminal import escape_controls
from gateway.cli.usage import add_command, examples

# Imports inside the commands, not at the top: `fedgate --help` and the researcher commands
# run on a light install without the node extra (SQLModel), which these commands need.

DESCRIPTION = """\
Export, verify offline, show, prove and checkpoint the tamper-evident audit log.

`audit verify` needs only an export and the node's public key: run it on any machine.
The other commands act on the deployment (-d DIR). Exit codes: 0 success,
1 verification failed or the node refused to sign, 2 usage or file errors."""


def _usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. under taskset or a container's
    cpuset), not the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from ledger import keys  # here, not at the top: `fedgate --help` skips cryptography
    from ledger.audit_verify import verify_export_file

    public_key = keys.load_public_key(Path(args.node_key))
    known = [Path(path).read_text(encoding="utf-8") for path in args.checkpoint]
    report = verify_export_file(Path(args.export), public_key, known,  # mapped, not read
                                workers=args.workers)
    if args.json:
        latest, problem = report.latest, report.problem
        print(json.dumps({
            "ok": report.ok, "entries": report.entries, "checkpoints": report.checkpoints,
            "verified_size": report.verified_size, "root": report.root,
            "latest_checkpoint": None if latest is None else {
                "size": latest.size, "root": latest.root.hex(), "origin": latest.origin,
                "timestamp": latest.timestamp},
            "problem": None if problem is None else {
                "reason": problem.reason, "message": problem.message,
                "first_index": problem.first_index, "last_index": problem.last_index},
        }, indent=2, sort_keys=True, ensure_ascii=False))
    else:
        print(report.summary())
    return 0 if report.ok else 1


def cmd_audit_export(args: argparse.Namespace) -> int:
    from gateway.node.audit import export_node_audit
    from ledger.audit_export import read_export

    node = open_node(args)
    export, warning = export_node_audit(node)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(export)
    tmp.replace(out)
    reader = read_export(export)  # counts entry lines without decoding them
    written = {"out": str(out), "entries": reader.count_entries(),
               "checkpoints": len(reader.checkpoints), "sha256": hashlib.sha256(export).hexdigest(),
               "warning": warning}
    if args.json:
        print(json.dumps(written, indent=2, sort_keys=True, ensure_ascii=False))
        return 1 if warning else 0
    print(f"wrote the audit log to {out}: entries: {written['entries']}, signed "
          f"checkpoints: {written['checkpoints']}, sha256: {written['sha256']}")
    print(f"verify offline: fedgate audit verify {out} --node-key {node.deployment.node_public_key}")
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
        return 1
    return 0


def cmd_audit_show(args: argparse.Namespace) -> int:
    from ledger.audit import read_entries

    node = open_node(args)
    with node.session() as s:
        entries = read_entries(s, args.start, args.end)
    if args.json:
        print(json.dumps(entries, indent=2, sort_keys=True, ensure_ascii=False))
        return 0
    for entry in entries:
        rest = "  ".join(f"{k}={_short(v)}" for k, v in sorted(entry.items())
                         if k not in ("seq", "timestamp", "action"))
        print(f"{entry['seq']:>6}  {entry['timestamp']}  {entry['action']:<8} {rest}")
    return 0


def cmd_audit_proof(args: argparse.Namespace) -> int:
    from gateway.node.audit import inclusion_proof_for
    from ledger.audit import AuditLogCorrupted

    try:
        proof = inclusion_proof_for(open_node(args), args.index, args.size)
    except AuditLogCorrupted as exc:
        return _refused(exc)
    print(json.dumps(proof, indent=2, ensure_ascii=False))
    return 0


def cmd_audit_checkpoint(args: argparse.Namespace) -> int:
    from gateway.node.audit import publish_node_checkpoint
    from ledger.audit import AuditLogCorrupted

    try:
        checkpoint = publish_node_checkpoint(open_node(args))
    except AuditLogCorrupted as exc:
        return _refused(exc)
    sys.stdout.write(checkpoint.text)
    return 0


def _refused(exc: Exception) -> int:
    print(f"fedgate: the stored audit log is inconsistent: {exc}; export it and run "
          "`fedgate audit verify` on the export to locate the problem", file=sys.stderr)
    return 1


def _positive(text: str) -> int:
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def _short(value: Any) -> str:
    """A field on one line: control characters (newlines too) escaped, at most 60 characters."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)
    text = escape_controls(text)
    return text if len(text) <= 60 else text[:57] + "..."


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``audit`` and its actions to the ``fedgate`` command parser."""
    group = add_command(commands, "audit", help="export, verify and inspect the tamper-evident "
                        "audit log", description=DESCRIPTION,
                        examples=examples(
                            "fedgate -d ./node audit export --out audit.json",
                            "fedgate audit verify audit.json --node-key node.pub",
                            "fedgate -d ./node audit show --from 0 --to 20",
                            "fedgate -d ./node audit proof --index 7",
                            "fedgate -d ./node audit checkpoint > checkpoint-$(date +%F).txt"))
    sub = group.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = add_command(sub, "verify", help="verify an export offline against the node public key",
                    description="Recompute every entry hash, the Merkle tree and each signed "
                                "checkpoint of an export; report the first problem. Exit 0 "
                                "when it verifies, 1 when it does not.",
                    examples=examples(
                        "fedgate audit verify audit.json --node-key node.pub",
                        "fedgate audit verify audit.json --node-key node.pub "
                        "--checkpoint checkpoint-2026-05-01.txt --json"))
    p.add_argument("export", help="file written by `fedgate audit export` or GET /v1/audit/export")
    p.add_argument("--node-key", required=True, help="the node's public key (node.pub)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="FILE",
                   help="a checkpoint saved earlier (repeatable); detects a log cut back "
                        "to before it")
    p.add_argument("--workers", type=_positive, default=min(2, _usable_cpus()),
                   metavar="N", help="processes that hash a large export (default: 2, or 1 "
                                     "where this process may use one CPU); the report is the "
                                     "same")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_audit_verify)

    p = add_command(sub, "export", help="sign a checkpoint now and write the whole log to a file",
                    examples=examples("fedgate -d ./node audit export --out audit.json",
                                      "fedgate -d ./node audit export --out audit.json --json"))
    p.add_argument("--out", required=True, help="output file (JSON)")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(func=cmd_audit_export)

    p = add_command(sub, "show", help="print entries (seq FROM to TO-1)",
                    examples=examples("fedgate -d ./node audit show --from 0 --to 20",
                                      "fedgate -d ./node audit show --from 100 --json"))
    p.add_argument("--from", dest="start", type=int, default=0, metavar="N",
                   help="first entry (default 0)")
    p.add_argument("--to", dest="end", type=int, default=None, metavar="M",
                   help="stop before this entry (default: the end of the log)")
    p.add_argument("--json", action="store_true", help="print the entries as JSON")
    p.set_defaults(func=cmd_audit_show)

    p = add_command(sub, "proof", help="inclusion proof of entry N (JSON)",
                    examples=examples("fedgate -d ./node audit proof --index 7",
                                      "fedgate -d ./node audit proof --index 7 --size 120"))
    p.add_argument("--index", type=int, required=True, metavar="N", help="the entry to prove")
    p.add_argument("--size", type=int, default=None, metavar="M",
                   help="tree size (default: the latest checkpoint, signed now if the log grew)")
    p.set_defaults(func=cmd_audit_proof)

    p = add_command(sub, "checkpoint", help="sign a checkpoint of the log now and print it",
                    description="Sign a checkpoint of the log now and print it (signed-note "
                                "text): keep it, and pass it to `audit verify --checkpoint` later.",
                    examples=examples(
                        "fedgate -d ./node audit checkpoint > checkpoint-$(date +%F).txt"))
    p.set_defaults(func=cmd_audit_checkpoint)
