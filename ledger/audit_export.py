"""The audit export: everything an officer needs to verify the log offline.

Format ``fedgate-audit-export/2`` — one UTF-8 JSON document in a fixed layout, with each
entry's canonical JSON text verbatim on its own line (``⇥`` is one TAB byte)::

    {
     "format": "fedgate-audit-export/2",
     "node_key_id": "k-0123456789abcdef",
     "exported_at": "2026-11-25T10:42:00.123456Z",
     "checkpoints": [
      "k-0123456789abcdef\\n42\\n...",
      ...
     ],
     "entries": [
    ⇥{"action":"dataset",...,"seq":0,...},
    ⇥{"action":"admit",...,"seq":1,...}
     ]
    }

The lines up to ``"entries": [`` are exactly what ``json.dumps(indent=1)`` writes for the
other four fields; each entry line is a TAB, the entry, a comma (except on the last line)
and a newline; the file ends ``" ]\\n}\\n"``. JSON readers see the entries as objects
(``jq '.entries[] | select(.action == "deny")'``).

Why this layout: the verifier hashes each entry's bytes where they lie in the file. TAB is
the one whitespace byte canonical JSON never contains, so replacing every TAB of the
entries section by the RFC 6962 leaf prefix 0x00 and cutting at line ends yields every
leaf input without parsing a single entry (``ExportReader.leaf_input_batches``), or, with
the compiled helper of ``ledger.rfc6962_native``, every leaf hash in one call per block of
lines (``ExportReader.leaf_hash_batches``). The
checkpoints come first, so a reader knows what is signed before it reads the entries.

Invariants of an honest export: entry line ``i`` holds the exact canonical JSON text whose
RFC 6962 leaf hash is leaf ``i`` (its ``seq`` is ``i``); ``checkpoints`` are the signed
notes stored by the node, by increasing size. A stored entry that is not one line of JSON
(the database was tampered with) is written as a JSON string instead, so the export stays
valid JSON and keeps the evidence; the verifier reports it. Nothing in the export is
trusted by the verifier except what the node key signed (``ledger.audit_verify``).

Format ``fedgate-audit-export/1`` (entries as JSON strings, in any JSON layout) is still read.
"""

from __future__ import annotations

import io
import json
import mmap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import repeat
from typing import TYPE_CHECKING, Any, TypeVar

from ledger import rfc6962_native
from ledger.merkle import LEAF_PREFIX, hash_leaf_inputs
from ledger.timestamps import utc_timestamp

if TYPE_CHECKING:
    from sqlmodel import Session

EXPORT_FORMAT = "fedgate-audit-export/2"
LEGACY_FORMAT = "fedgate-audit-export/1"

ExportBytes = bytes | mmap.mmap  # what a reader needs: len, slicing and find

_LAYOUT_START = b'{\n "format": "' + EXPORT_FORMAT.encode() + b'",\n'
_ENTRIES_OPEN = b',\n "entries": [\n'
_END = b" ]\n}\n"
_INDENT = b"\t"
_BLOCK_BYTES = 1 << 20  # entries are read a block of whole lines at a time
_LEGACY_BATCH = 1 << 14


class ExportMalformed(ValueError):
    """The bytes are not a fedgate audit export."""


@dataclass(frozen=True)
class AuditExport:
    """What an export holds, as the node writes it."""

    node_key_id: str
    exported_at: str
    entries: list[str]
    checkpoints: list[str]


def export_audit(session: Session, *, node_key_id: str) -> bytes:
    """Export every entry and checkpoint, as one consistent snapshot of the log.

    Checkpoints are read before entries, so under concurrent appends the export may hold
    entries newer than its latest checkpoint, but never a checkpoint beyond its entries.
    """
    # Here, not at the top: the reading half of this module (what `fedgate audit verify`
    # needs on an officer's machine) loads no database library (tests/test_cli_imports.py).
    from sqlmodel import select

    from ledger.audit import checkpoint_texts
    from ledger.models import AuditEntry

    checkpoints = checkpoint_texts(session)
    statement = select(AuditEntry.entry).order_by(AuditEntry.seq)
    entries = list(session.exec(statement).all())  # reviewed: ORM query, not exec
    return encode_export(AuditExport(node_key_id=node_key_id, exported_at=utc_timestamp(),
                                     entries=entries, checkpoints=checkpoints))


def encode_export(export: AuditExport) -> bytes:
    """The export document in the layout of the module docstring."""
    head = _head(export.node_key_id, export.exported_at, export.checkpoints)
    lines = [_entry_line(text) for text in export.entries]
    body = "\t" + ",\n\t".join(lines) + "\n" if lines else ""
    return head + body.encode("utf-8") + _END


def _head(node_key_id: str, exported_at: str, checkpoints: list[str]) -> bytes:
    """Everything before the first entry line: ``json.dumps(indent=1)`` of the other fields."""
    fields = {"format": EXPORT_FORMAT, "node_key_id": node_key_id, "exported_at": exported_at,
              "checkpoints": checkpoints}
    text = json.dumps(fields, indent=1, ensure_ascii=False).removesuffix("\n}")
    return text.encode("utf-8") + _ENTRIES_OPEN


def _entry_line(text: str) -> str:
    """The stored entry verbatim if it is one line of JSON, else as a JSON string."""
    if "\n" not in text:
        try:
            json.loads(text, parse_constant=_not_json)
            return text
        except ValueError:
            pass
    return json.dumps(text, ensure_ascii=False)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


@dataclass(frozen=True)
class ExportReader:
    """A parsed export header and its entries, read on demand: a format 2 file a block of
    lines at a time, never as one object per entry (format 1 is decoded whole).

    ``leaf_input_batches`` is the fast reader: it checks no entry, so a caller may accept
    its leaf inputs only where they hash to a root the node signed, and must check every
    other entry itself. ``entry_texts`` reads each entry exactly, to locate a problem.
    """

    node_key_id: str
    exported_at: str
    checkpoints: list[str]
    _entries: _EntryLines | _LegacyEntries

    def leaf_input_batches(self, first: int = 0, stop: int | None = None) -> Iterator[list[bytes]]:
        """``LEAF_PREFIX || entry`` for entries ``first .. stop - 1`` (default: all) in order,
        in batches. The lines before ``first`` are counted, not split.

        Raises ``ExportMalformed`` when the bytes cannot be read this way; ``entry_texts``
        then tells which entry is at fault.
        """
        return self._entries.leaf_input_batches(first, stop)

    def leaf_hash_batches(self, first: int = 0, stop: int | None = None) -> Iterator[bytes]:
        """The RFC 6962 leaf hashes of entries ``first .. stop - 1``: ``SHA-256`` of each of
        ``leaf_input_batches``' leaf inputs, 32 bytes each, concatenated, in batches. Raises
        ``ExportMalformed`` as ``leaf_input_batches`` does."""
        if isinstance(self._entries, _EntryLines) and rfc6962_native.available():
            return self._entries.leaf_hash_batches(first, stop)
        return (b"".join(hash_leaf_inputs(batch))
                for batch in self._entries.leaf_input_batches(first, stop))

    def entry_texts(self) -> Iterator[bytes]:
        """Each entry's text in order; for a line out of the layout, the whole line (which
        is never canonical JSON: it ends with a newline)."""
        return self._entries.texts()

    def count_entries(self) -> int:
        """The number of entries (format 2: its entry lines, counted without decoding any)."""
        return self._entries.count()


def read_export(data: ExportBytes) -> ExportReader:
    """Parse an export's header; raises ``ExportMalformed`` with a reason.

    A version 2 export must be byte for byte in the node's layout up to its first entry and
    from its last one, and its header must not repeat a key (JSON readers disagree on which
    copy counts). Version 1 is parsed as JSON, again refusing repeated keys.
    """
    if data[:len(_LAYOUT_START)] == _LAYOUT_START:
        return _read_layout(data)
    return _read_legacy(data)


def _read_layout(data: ExportBytes) -> ExportReader:
    entries_at = data.find(_ENTRIES_OPEN)
    if entries_at < 0:
        raise ExportMalformed("no \"entries\" list where the layout puts it")
    header = _fields(_strict_json(data[:entries_at] + b"\n}"))
    start = entries_at + len(_ENTRIES_OPEN)
    if _head(header["node_key_id"], header["exported_at"], header["checkpoints"]) != data[:start]:
        raise ExportMalformed(f"its header is not in the {EXPORT_FORMAT} layout (was it reformatted?)")
    end = len(data) - len(_END)
    if end < start or data[end:] != _END:
        raise ExportMalformed("it does not end by closing the entries list: it was cut off or extended")
    if end > start and data[end - 1:end] != b"\n":
        raise ExportMalformed("its last entry line does not end with a line break")
    return ExportReader(_entries=_EntryLines(data, start, end), **header)


def _read_legacy(data: ExportBytes) -> ExportReader:
    document = _strict_json(data[:])
    if not isinstance(document, dict) or document.get("format") not in (EXPORT_FORMAT, LEGACY_FORMAT):
        raise ExportMalformed(f"not a {EXPORT_FORMAT} document")
    if document["format"] == EXPORT_FORMAT:
        raise ExportMalformed(f"a {EXPORT_FORMAT} file must keep the layout the node wrote "
                              "(one entry per line); this one was reformatted")
    header = _fields(document)
    entries = document.get("entries")
    if not isinstance(entries, list) or not all(isinstance(item, str) for item in entries):
        raise ExportMalformed("'entries' must be a list of strings")
    return ExportReader(_entries=_LegacyEntries(entries), **header)


def _strict_json(data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_object_without_repeated_keys)
    except ExportMalformed:
        raise
    except ValueError as exc:  # also invalid UTF-8
        raise ExportMalformed(f"not a JSON document: {exc}") from None


def _object_without_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        repeated = next(key for n, (key, _) in enumerate(pairs) if key in dict(pairs[:n]))
        raise ExportMalformed(f"key {repeated!r} appears twice in one object, so JSON readers "
                              "disagree on its value")
    return value


def _fields(document: Any) -> dict[str, Any]:
    """The header fields of a parsed export, type-checked."""
    if not isinstance(document, dict):
        raise ExportMalformed(f"not a {EXPORT_FORMAT} document")
    fields = {name: document.get(name) for name in ("node_key_id", "exported_at", "checkpoints")}
    for name in ("node_key_id", "exported_at"):
        if not isinstance(fields[name], str):
            raise ExportMalformed(f"'{name}' must be a string")
    checkpoints = fields["checkpoints"]
    if not isinstance(checkpoints, list) or not all(isinstance(item, str) for item in checkpoints):
        raise ExportMalformed("'checkpoints' must be a list of strings")
    return fields


class _EntryLines:
    """The entry lines of a version 2 export: ``data[start:end]``, each ending in a newline."""

    def __init__(self, data: ExportBytes, start: int, end: int) -> None:
        self._data, self._start, self._end = data, start, end

    def _blocks(self) -> Iterator[tuple[bytes, bool]]:
        """Blocks of whole lines, and whether each is the last."""
        position = self._start
        while position < self._end:
            newline = self._data.find(b"\n", position + _BLOCK_BYTES - 1, self._end)
            cut = self._end if newline < 0 else newline + 1
            yield self._data[position:cut], cut == self._end
            position = cut

    def _per_block(self, first: int, stop: int | None,
                   lines_of: Callable[[bytes, bool], _Lines]) -> Iterator[_Lines]:
        """``lines_of(block, last)`` sliced to entries ``first .. stop - 1``, for each block that
        holds some of them, where ``block`` has every TAB replaced by the leaf prefix and
        ``lines_of`` gives something per line of it (blocks before ``first`` are counted)."""
        index = 0  # of the block's first line
        for block, last in self._blocks():
            if stop is not None and index >= stop:
                return
            if index < first and index + (skipped := block.count(b"\n")) <= first:
                index += skipped
                continue
            # A NUL in the file would pass for a replaced TAB: the file would hash like a
            # valid export without being JSON.
            if LEAF_PREFIX in block:
                raise ExportMalformed("an entry line holds a NUL byte, which JSON does not allow")
            lines = lines_of(block.replace(_INDENT, LEAF_PREFIX), last)
            yield lines[max(first - index, 0):None if stop is None else stop - index]
            index += len(lines)

    def leaf_input_batches(self, first: int, stop: int | None) -> Iterator[list[bytes]]:
        return self._per_block(first, stop, _leaf_inputs)

    def leaf_hash_batches(self, first: int, stop: int | None) -> Iterator[bytes]:
        """``leaf_input_batches``' inputs hashed by the compiled helper, which cuts the
        lines and drops their endings as ``_leaf_inputs`` does."""
        return (hashes.data for hashes in self._per_block(first, stop, _LineHashes.of_block))

    def texts(self) -> Iterator[bytes]:
        for block, last in self._blocks():
            lines = io.BytesIO(block).readlines()
            for n, line in enumerate(lines):
                ending = b"\n" if last and n == len(lines) - 1 else b",\n"
                if line.startswith(_INDENT) and line.endswith(ending):
                    yield line[len(_INDENT):-len(ending)]
                else:
                    yield line

    def count(self) -> int:
        return sum(block.count(b"\n") for block, _ in self._blocks())


def _leaf_inputs(block: bytes, last: bool) -> list[bytes]:
    """Each line of ``block`` without its ``,\n``; if ``last``, its last line without its
    ``\n`` (the last entry has no comma)."""
    lines = io.BytesIO(block).readlines()
    inputs = list(map(bytes.removesuffix, lines, repeat(b",\n")))
    if last:
        inputs[-1] = lines[-1].removesuffix(b"\n")
    return inputs


@dataclass(frozen=True)
class _LineHashes:
    """The leaf hashes of a block's lines, 32 bytes each; its length and slices count lines."""

    data: bytes

    @classmethod
    def of_block(cls, block: bytes, last: bool) -> _LineHashes:
        return cls(rfc6962_native.line_hashes(block, last))

    def __len__(self) -> int:
        return len(self.data) // rfc6962_native.HASH_SIZE

    def __getitem__(self, lines: slice) -> _LineHashes:
        start, stop, _ = lines.indices(len(self))
        return _LineHashes(self.data[start * rfc6962_native.HASH_SIZE:
                                     stop * rfc6962_native.HASH_SIZE])


_Lines = TypeVar("_Lines", list[bytes], _LineHashes)


class _LegacyEntries:
    """The entries of a version 1 export: JSON strings, already decoded."""

    def __init__(self, entries: list[str]) -> None:
        # A lone surrogate (``"\\ud800"``) decodes but is no UTF-8: keep its bytes, so the
        # entry is reported as not canonical instead of stopping the verifier.
        self._texts = [text.encode("utf-8", "surrogatepass") for text in entries]

    def leaf_input_batches(self, first: int, stop: int | None) -> Iterator[list[bytes]]:
        texts = self._texts[first:stop]
        for start in range(0, len(texts), _LEGACY_BATCH):
            yield [LEAF_PREFIX + text for text in texts[start:start + _LEGACY_BATCH]]

    def texts(self) -> Iterator[bytes]:
        return iter(self._texts)

    def count(self) -> int:
        return len(self._texts)
