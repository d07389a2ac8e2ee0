"""The audit export: everything an officer needs to verify the log offline.

Format ``fedgate-audit-export/1`` — one UTF-8 JSON document, one entry per line::

    {
     "format": "fedgate-audit-export/1",
     "node_key_id": "k-0123456789abcdef",
     "exported_at": "2026-11-25T10:42:00.123456Z",
     "entries": ["{\\"action\\":\\"dataset\\",...,\\"seq\\":0,...}", ...],
     "checkpoints": ["k-0123456789abcdef\\n42\\n...", ...]
    }

Invariants of an honest export: ``entries[i]`` is the exact canonical JSON text whose
RFC 6962 leaf hash is leaf ``i`` (its ``seq`` is ``i``); ``checkpoints`` are the signed
notes stored by the node, by increasing size. Nothing in it is trusted by the verifier
except what the node key signed (``ledger.audit_verify``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sqlmodel import Session, select

from ledger.audit import checkpoint_texts
from ledger.models import AuditEntry
from ledger.timestamps import utc_timestamp

EXPORT_FORMAT = "fedgate-audit-export/1"


class ExportMalformed(ValueError):
    """The bytes are not a fedgate audit export."""


@dataclass(frozen=True)
class AuditExport:
    node_key_id: str
    exported_at: str
    entries: list[str]
    checkpoints: list[str]


def export_audit(session: Session, *, node_key_id: str) -> bytes:
    """Export every entry and checkpoint, as one consistent snapshot of the log.

    Checkpoints are read before entries, so under concurrent appends the export may hold
    entries newer than its latest checkpoint, but never a checkpoint beyond its entries.
    """
    checkpoints = checkpoint_texts(session)
    statement = select(AuditEntry.entry).order_by(AuditEntry.seq)
    entries = list(session.exec(statement).all())  # reviewed: ORM query, not exec
    return encode_export(AuditExport(node_key_id=node_key_id, exported_at=utc_timestamp(),
                                     entries=entries, checkpoints=checkpoints))


def encode_export(export: AuditExport) -> bytes:
    document = {
        "format": EXPORT_FORMAT,
        "node_key_id": export.node_key_id,
        "exported_at": export.exported_at,
        "entries": export.entries,
        "checkpoints": export.checkpoints,
    }
    return (json.dumps(document, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def decode_export(data: bytes) -> AuditExport:
    """Parse an export; raises ``ExportMalformed`` with a reason."""
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ExportMalformed(f"not a JSON document: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
        raise ExportMalformed(f"not a {EXPORT_FORMAT} document")
    fields = {name: document.get(name) for name in ("node_key_id", "exported_at", "entries",
                                                     "checkpoints")}
    for name in ("node_key_id", "exported_at"):
        if not isinstance(fields[name], str):
            raise ExportMalformed(f"'{name}' must be a string")
    for name in ("entries", "checkpoints"):
        value = fields[name]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ExportMalformed(f"'{name}' must be a list of strings")
    return AuditExport(**fields)  # type: ignore[arg-type]
