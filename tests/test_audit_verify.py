"""Tamper evidence end to end: a real log on SQLite and PostgreSQL, real checkpoints
signed by the node key, an export, and an attacker with write access to the database.
Each tampering is caught by ``verify_export`` and ``fedgate audit verify`` with a message
naming the first bad entry; the node refuses to sign over a tampered log.

The verifier's fast path trusts the bytes a signed root covers and re-encodes only the
rest; the tests after the specification attack exactly that (unsigned entries, the export's
layout, roots other than the latest, what JSON readers would see)."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.engine import Engine
from sqlmodel import Session, select, update

from gateway.cli import main as fedgate
from ledger import audit_export, audit_verify, keys, rfc6962_native
from ledger.audit import (
    AuditLogCorrupted,
    append_entry,
    checkpoint_texts,
    publish_checkpoint,
    read_entry_rows,
)
from ledger.audit_export import export_audit
from ledger.audit_verify import verify_export, verify_export_file
from ledger.canonical import canonical_json
from ledger.checkpoints import sign_checkpoint, sign_note
from ledger.db import create_schema, make_engine, session
from ledger.merkle import LEAF_PREFIX, MerkleTree, hash_leaf_inputs, leaf_hash
from ledger.models import AuditCheckpoint, AuditEntry, AuditHead

LOG_SIZE = 12
CHECKPOINT_EVERY = 3  # checkpoints at sizes 3, 6, 9, 12


@dataclass
class Log:
    engine: Engine
    node_key: Ed25519PrivateKey

    @property
    def key_id(self) -> str:
        return keys.key_id(self.node_key.public_key())

    def session(self) -> Session:
        return session(self.engine)

    def export(self) -> bytes:
        with self.session() as s:
            return export_audit(s, node_key_id=self.key_id)

    def verify(self, export: bytes | None = None, known: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
        return verify_export(self.export() if export is None else export,
                             self.node_key.public_key(), known)

    def append(self, n: int) -> None:
        with self.session() as s, s.begin():
            append_entry(s, action="admit", actor="k-researcher", dataset="demo", job_id=f"job-{n}",
                         epsilon=round(0.1 * (n + 1), 3), decision="allow")

    def checkpoint(self) -> str:
        with self.session() as s, s.begin():
            return publish_checkpoint(s, self.node_key, self.key_id).text


def build_log(db_url: str, size: int = LOG_SIZE, every: int = CHECKPOINT_EVERY) -> Log:
    engine = make_engine(db_url)
    create_schema(engine)
    log = Log(engine, keys.generate_private_key())
    for n in range(size):
        log.append(n)
        if (n + 1) % every == 0:
            log.checkpoint()
    return log


@pytest.fixture
def log(db_url: str) -> Iterator[Log]:
    built = build_log(db_url)
    yield built
    built.engine.dispose()


# --- what an attacker with database access does ------------------------------------------

def _rewrite(s: Session, seq: int, text: str) -> None:
    row = s.get(AuditEntry, seq)
    assert row is not None
    row.entry, row.leaf_hash = text, leaf_hash(text.encode()).hex()  # a careful attacker
    s.add(row)


def edit_entry(log: Log, seq: int = 7) -> None:
    with log.session() as s, s.begin():
        row = s.get(AuditEntry, seq)
        assert row is not None and '"epsilon":0.8' in row.entry
        _rewrite(s, seq, row.entry.replace('"epsilon":0.8', '"epsilon":0.08'))


def hand_edit_entry(log: Log, seq: int = 7) -> None:
    with log.session() as s, s.begin():
        row = s.get(AuditEntry, seq)
        assert row is not None
        _rewrite(s, seq, row.entry.replace('"epsilon":0.8', '"epsilon": 0.08'))


def delete_entry(log: Log, seq: int = 4) -> None:
    with log.session() as s, s.begin():
        s.delete(s.get(AuditEntry, seq))


def swap_entries(log: Log, first: int = 3, second: int = 5) -> None:
    with log.session() as s, s.begin():
        a, b = s.get(AuditEntry, first), s.get(AuditEntry, second)
        assert a is not None and b is not None
        text_a, text_b = a.entry, b.entry
        _rewrite(s, first, text_b)
        _rewrite(s, second, text_a)


def insert_entry(log: Log, seq: int = 5) -> None:
    """Insert a fabricated entry at ``seq``, moving later entries up by one."""
    with log.session() as s, s.begin():
        s.exec(update(AuditEntry).where(AuditEntry.seq >= seq).values(seq=AuditEntry.seq + 1000))
        s.exec(update(AuditEntry).where(AuditEntry.seq >= 1000).values(seq=AuditEntry.seq - 999))
        fake = canonical_json({"action": "refund", "actor": "k-researcher", "dataset": "demo",
                               "job_id": "job-4", "seq": seq,
                               "timestamp": "2026-11-25T10:42:00.000000Z"}).decode()
        s.add(AuditEntry(seq=seq, entry=fake, leaf_hash=leaf_hash(fake.encode()).hex()))
        head = s.get(AuditHead, 1)
        assert head is not None
        head.size += 1
        s.add(head)


def truncate_tail(log: Log, keep: int = 9) -> None:
    with log.session() as s, s.begin():
        for row in s.exec(select(AuditEntry).where(AuditEntry.seq >= keep)).all():
            s.delete(row)
        head = s.get(AuditHead, 1)
        assert head is not None
        head.size = keep
        s.add(head)


def resign_checkpoint(log: Log, size: int = 6) -> None:
    """Replace a checkpoint by one with the node's origin but the attacker's signature."""
    with log.session() as s, s.begin():
        row = s.get(AuditCheckpoint, size)
        assert row is not None
        body = row.text.split("\n\n")[0] + "\n"
        row.text = sign_note(keys.generate_private_key(), log.key_id, body)
        s.add(row)


def checkpoint_of_attacker(log: Log, size: int = 6) -> None:
    """Replace a checkpoint by a complete one signed by the attacker as its own origin."""
    attacker = keys.generate_private_key()
    with log.session() as s, s.begin():
        row = s.get(AuditCheckpoint, size)
        assert row is not None
        original = row.text.split("\n")
        row.text = sign_checkpoint(attacker, keys.key_id(attacker.public_key()), size,
                                   leaf_hash(b"forged root"), original[3])
        s.add(row)


TAMPERINGS: dict[str, tuple[Callable[[Log], None], str, int | None, str]] = {
    # name: (tamper, reason, first bad entry, words the message must contain)
    "edited entry": (edit_entry, "modified-entries", 6, "entries 6–8 do not match the checkpoint "
                     "signed for size 9"),
    "hand-edited entry": (hand_edit_entry, "malformed-entry", 7, "entry 7 is not a canonical JSON "
                          "object"),
    "deleted entry": (delete_entry, "missing-entry", 4, "entry 4 is missing (deleted)"),
    "inserted entry": (insert_entry, "modified-entries", 3, "entries 3–5 do not match the "
                       "checkpoint signed for size 6"),
    "swapped entries": (swap_entries, "reordered-entries", 3, "position 3 holds entry 5"),
    "truncated tail": (truncate_tail, "truncated", 9, "entries 9–11 were removed"),
    "re-signed checkpoint": (resign_checkpoint, "bad-checkpoint", None, "(for size 6) is not a "
                             "valid checkpoint of this node"),
    "attacker's checkpoint": (checkpoint_of_attacker, "bad-checkpoint", None, "it is not signed "
                              "by node key"),
}


# --- the specification --------------------------------------------------------------------

def test_untampered_export_verifies(log: Log) -> None:
    report = log.verify()
    assert report.ok, report.summary()
    assert (report.entries, report.checkpoints, report.verified_size) == (12, 4, 12)
    assert report.summary().startswith("OK: 12 entries and 4 signed checkpoints verified")


@pytest.mark.parametrize("name", list(TAMPERINGS))
def test_tampering_is_detected_naming_the_first_bad_entry(log: Log, name: str) -> None:
    tamper, reason, first_index, words = TAMPERINGS[name]
    tamper(log)
    report = log.verify()
    assert not report.ok
    assert report.problem is not None
    assert report.problem.reason == reason, report.problem.message
    assert report.problem.first_index == first_index
    assert words in report.problem.message


@pytest.mark.parametrize("name", ["edited entry", "deleted entry", "inserted entry",
                                  "swapped entries", "truncated tail"])
def test_node_refuses_to_sign_a_checkpoint_over_a_tampered_log(log: Log, name: str) -> None:
    TAMPERINGS[name][0](log)
    log.append(99)
    with pytest.raises(AuditLogCorrupted, match="refusing to sign"):
        log.checkpoint()


def test_node_refuses_to_sign_a_new_entry_that_is_not_numbered_by_its_position(log: Log) -> None:
    log.append(12)
    with log.session() as s, s.begin():
        row = s.get(AuditEntry, 12)
        assert row is not None
        _rewrite(s, 12, row.entry.replace('"seq":12', '"seq":2'))
    with pytest.raises(AuditLogCorrupted, match="entry 12 is not a canonical entry numbered 12"):
        log.checkpoint()


def test_an_edit_is_pinpointed_exactly_when_every_entry_was_checkpointed(db_url: str) -> None:
    log = build_log(db_url, size=9, every=1)
    edit_entry(log, 7)
    problem = log.verify().problem
    log.engine.dispose()
    assert problem is not None
    assert (problem.first_index, problem.last_index) == (7, 7)
    assert problem.message.startswith("entry 7 was modified or replaced")


def test_a_log_cut_back_with_its_checkpoints_is_caught_by_a_saved_checkpoint(log: Log) -> None:
    saved = log.checkpoint()  # an officer fetched the checkpoint for size 12 earlier
    truncate_tail(log, keep=9)
    with log.session() as s, s.begin():
        for row in s.exec(select(AuditCheckpoint).where(AuditCheckpoint.size > 9)).all():
            s.delete(row)
    assert log.verify().ok  # indistinguishable from a shorter log, without outside evidence
    problem = log.verify(known=(saved,)).problem
    assert problem is not None and problem.reason == "truncated" and problem.first_index == 9


def test_two_roots_signed_for_one_size_are_reported_as_a_split_view(log: Log) -> None:
    other_history = sign_checkpoint(log.node_key, log.key_id, 12, leaf_hash(b"fork"),
                                    "2026-11-25T10:42:00Z")
    problem = log.verify(known=(other_history,)).problem
    assert problem is not None and problem.reason == "split-view"


def test_entries_after_the_latest_checkpoint_verify_but_are_reported_as_unsigned(log: Log) -> None:
    log.append(12)
    report = log.verify()
    assert report.ok
    assert (report.entries, report.verified_size) == (13, 12)
    assert "(12) newer than the latest checkpoint not yet signed" in report.summary()


def test_export_of_another_node_or_without_checkpoints_does_not_verify(db_url: str, log: Log) -> None:
    stranger = keys.generate_private_key()
    problem = verify_export(log.export(), stranger.public_key()).problem
    assert problem is not None and problem.reason == "wrong-node-key"
    with log.session() as s, s.begin():
        for row in s.exec(select(AuditCheckpoint)).all():
            s.delete(row)
    problem = log.verify().problem
    assert problem is not None and problem.reason == "no-checkpoint"
    problem = log.verify(b"not json").problem
    assert problem is not None and problem.reason == "malformed-export"


def test_publishing_is_idempotent_per_size(log: Log) -> None:
    first, second = log.checkpoint(), log.checkpoint()
    assert first == second
    with log.session() as s:
        assert len(s.exec(select(AuditCheckpoint)).all()) == 4


def test_a_publisher_that_loses_the_race_returns_the_stored_checkpoint(log: Log) -> None:
    log.append(12)
    with log.session() as loser, loser.begin():
        real_get = loser.get
        # The loser looked before the winner stored its checkpoint for size 13 ...
        loser.get = lambda model, key, **kw: None if model is AuditCheckpoint else real_get(  # type: ignore[method-assign]
            model, key, **kw)
        winner = log.checkpoint()  # ... and the winner commits first.
        assert publish_checkpoint(loser, log.node_key, log.key_id).text == winner
    with log.session() as s:
        assert [c.size for c in s.exec(select(AuditCheckpoint)).all()] == [3, 6, 9, 12, 13]


# --- what the fast path must still catch -------------------------------------------------

def append_unsigned(log: Log, count: int = 3) -> None:
    """Entries 12.. with no checkpoint over them: no signed root vouches for their bytes."""
    for n in range(LOG_SIZE, LOG_SIZE + count):
        log.append(n)


def duplicate_entry(log: Log, seq: int = 12, at: int = 13) -> None:
    """Insert a copy of entry ``seq`` at position ``at``, moving later entries up by one."""
    with log.session() as s, s.begin():
        row = s.get(AuditEntry, seq)
        assert row is not None
        copy = row.entry
        s.exec(update(AuditEntry).where(AuditEntry.seq >= at).values(seq=AuditEntry.seq + 1000))
        s.exec(update(AuditEntry).where(AuditEntry.seq >= 1000).values(seq=AuditEntry.seq - 999))
        s.add(AuditEntry(seq=at, entry=copy, leaf_hash=leaf_hash(copy.encode()).hex()))


def rewrite_entry(log: Log, seq: int, edit: Callable[[str], str]) -> None:
    with log.session() as s, s.begin():
        row = s.get(AuditEntry, seq)
        assert row is not None
        _rewrite(s, seq, edit(row.entry))


def legacy_export(log: Log) -> bytes:
    """The same log in export format 1 (entries as JSON strings), as earlier nodes wrote it."""
    with log.session() as s:
        entries = [row.entry for row in read_entry_rows(s)]
        checkpoints = checkpoint_texts(s)
    document = {"format": "fedgate-audit-export/1", "node_key_id": log.key_id,
                "exported_at": "2026-11-25T10:42:00.123456Z", "entries": entries,
                "checkpoints": checkpoints}
    return (json.dumps(document, indent=1, ensure_ascii=False) + "\n").encode()


def with_entry_lines(export: bytes, edit: Callable[[bytes], bytes]) -> bytes:
    head, body = export.split(b'"entries": [\n', 1)
    return head + b'"entries": [\n' + edit(body.removesuffix(b" ]\n}\n")) + b" ]\n}\n"


# Edits that keep an entry's meaning for a JSON reader (or for some JSON readers) but not
# its bytes; entry 7 and 13 both hold "epsilon" and "dataset":"demo".
RE_ENCODINGS: dict[str, Callable[[str], str]] = {
    "space after a colon": lambda text: text.replace('"dataset":', '"dataset": '),
    "number written differently": lambda text: re.sub(r'"epsilon":([0-9.]+)', r'"epsilon":\g<1>0', text),
    "key given twice": lambda text: text[:-1] + ',"epsilon":0.01}',
    "character escaped": lambda text: text.replace('"demo"', '"d\\u0065mo"'),
}


@pytest.mark.parametrize("seq", [7, 13], ids=["signed", "unsigned"])
@pytest.mark.parametrize("name", list(RE_ENCODINGS))
def test_an_entry_re_encoded_without_changing_its_meaning_is_caught_signed_or_not(
    log: Log, name: str, seq: int
) -> None:
    append_unsigned(log)
    rewrite_entry(log, seq, RE_ENCODINGS[name])
    problem = log.verify().problem
    assert problem is not None and problem.reason == "malformed-entry", problem
    assert (problem.first_index, problem.message) == (
        seq, f"entry {seq} is not a canonical JSON object: its text was edited after the node "
        "wrote it")


UNSIGNED_TAMPERINGS: dict[str, tuple[Callable[[Log], None], str, int, str]] = {
    "deleted": (lambda log: delete_entry(log, 13), "missing-entry", 13, "entry 13 is missing"),
    "swapped": (lambda log: swap_entries(log, 12, 14), "reordered-entries", 12,
                "position 12 holds entry 14, and entry 12 comes later, at position 14"),
    "duplicated": (duplicate_entry, "inserted-entry", 13, "position 13 holds a second entry "
                   "numbered 12"),
}


@pytest.mark.parametrize("name", list(UNSIGNED_TAMPERINGS))
def test_unsigned_entries_deleted_swapped_or_duplicated_after_the_latest_checkpoint_are_caught(
    log: Log, name: str
) -> None:
    tamper, reason, first_index, words = UNSIGNED_TAMPERINGS[name]
    append_unsigned(log)
    tamper(log)
    problem = log.verify().problem
    assert problem is not None and problem.reason == reason, problem
    assert problem.first_index == first_index and words in problem.message


def test_a_rewritten_and_re_signed_history_is_caught_by_a_checkpoint_saved_before(log: Log) -> None:
    with log.session() as s:
        saved = s.get(AuditCheckpoint, 6)
        assert saved is not None
    rewrite_entry(log, 4, lambda text: text.replace('"epsilon":0.5', '"epsilon":0.05'))
    with log.session() as s, s.begin():  # ... and the node signs the rewritten log anew
        for row in s.exec(select(AuditCheckpoint).where(AuditCheckpoint.size >= 6)).all():
            s.delete(row)
    log.checkpoint()
    assert log.verify().ok  # the export's own checkpoints agree with the rewritten log
    problem = log.verify(known=(saved.text,)).problem
    assert problem is not None and problem.reason == "modified-entries"
    assert problem.first_index == 3
    assert "entries 3–5 do not match the checkpoint signed for size 6" in problem.message


def test_a_second_entries_list_that_json_readers_would_read_instead_is_refused(log: Log) -> None:
    forged = canonical_json({"action": "admit", "actor": "k-researcher", "dataset": "demo",
                             "seq": 0, "timestamp": "2026-11-25T10:42:00.000000Z"})
    attacked = log.export().removesuffix(b" ]\n}\n") + (
        b' ],\n "entries": [\n\t' + forged + b"\n ]\n}\n")
    assert json.loads(attacked)["entries"] == [json.loads(forged)]  # what a JSON reader sees
    problem = log.verify(attacked).problem
    assert problem is not None and problem.reason == "malformed-entry"
    assert problem.first_index == LOG_SIZE - 1  # no longer the last line, yet without a comma


def test_an_export_whose_header_names_a_second_node_is_refused(log: Log) -> None:
    export = log.export()
    line = f' "node_key_id": "{log.key_id}",\n'.encode()
    attacked = export.replace(line, line + b' "node_key_id": "k-0123456789abcdef",\n', 1)
    assert json.loads(attacked)["node_key_id"] == "k-0123456789abcdef"
    problem = log.verify(attacked).problem
    assert problem is not None and problem.reason == "malformed-export"
    assert "key 'node_key_id' appears twice" in problem.message


NOT_JSON: dict[str, Callable[[bytes], bytes]] = {
    # Each keeps every entry's bytes where a careless reader would look for them.
    "NUL bytes for the TABs": lambda lines: lines.replace(b"\t", b"\x00"),
    "spaces for the commas": lambda lines: lines.replace(b",\n", b" \n"),
    "a comma after the last entry": lambda lines: lines.removesuffix(b"\n") + b",\n",
}


@pytest.mark.parametrize("name", list(NOT_JSON))
def test_an_export_that_is_not_json_is_refused_though_each_entry_is_intact(log: Log, name: str) -> None:
    attacked = with_entry_lines(log.export(), NOT_JSON[name])
    with pytest.raises(ValueError):
        json.loads(attacked)
    problem = log.verify(attacked).problem
    assert problem is not None and problem.reason == "malformed-entry"


def test_an_entry_rewritten_to_break_out_of_its_line_is_exported_as_a_string_and_reported(
    log: Log,
) -> None:
    breakout = '{"seq":4}\n ]\n}\n'  # would close the export early if written verbatim
    rewrite_entry(log, 4, lambda _: breakout)
    export = log.export()
    entries = json.loads(export)["entries"]
    assert len(entries) == LOG_SIZE and entries[4] == breakout
    problem = log.verify(export).problem
    assert problem is not None and problem.reason == "malformed-entry" and problem.first_index == 4


@pytest.mark.parametrize("name", [None, *TAMPERINGS])
def test_a_format_1_export_gets_the_report_its_format_2_export_gets(log: Log, name: str | None) -> None:
    if name is not None:
        TAMPERINGS[name][0](log)
    assert log.verify(legacy_export(log)) == log.verify()


def test_a_format_1_entry_holding_an_unpaired_surrogate_is_reported_not_a_crash(log: Log) -> None:
    document = json.loads(legacy_export(log))
    document["entries"][7] = document["entries"][7].replace("demo", "\ud800")
    problem = log.verify(json.dumps(document).encode()).problem
    assert problem is not None and problem.reason == "malformed-entry" and problem.first_index == 7


def test_a_format_2_export_reformatted_by_a_json_tool_is_refused(log: Log) -> None:
    reformatted = json.dumps(json.loads(log.export()), indent=2).encode()
    problem = log.verify(reformatted).problem
    assert problem is not None and problem.reason == "malformed-export"
    assert "reformatted" in problem.message


@pytest.mark.parametrize("block_bytes", [1, 600, 1 << 20])
@pytest.mark.parametrize("name", [None, *TAMPERINGS])
def test_findings_do_not_depend_on_where_the_reader_cuts_its_blocks(
    log: Log, name: str | None, block_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if name is not None:
        TAMPERINGS[name][0](log)
    expected = log.verify()
    monkeypatch.setattr(audit_export, "_BLOCK_BYTES", block_bytes)
    assert log.verify() == expected


def test_any_run_of_entries_reads_as_that_slice_of_the_leaf_inputs(
    log: Log, monkeypatch: pytest.MonkeyPatch
) -> None:
    export = log.export()
    every = [leaf_input for batch in audit_export.read_export(export).leaf_input_batches()
             for leaf_input in batch]
    for block_bytes in (1, 600, 1 << 20):
        monkeypatch.setattr(audit_export, "_BLOCK_BYTES", block_bytes)
        for reader in (audit_export.read_export(export), audit_export.read_export(legacy_export(log))):
            for first in range(LOG_SIZE + 1):
                for stop in [*range(first, LOG_SIZE + 2), None]:
                    run = [leaf_input for batch in reader.leaf_input_batches(first, stop)
                           for leaf_input in batch]
                    assert run == every[first:stop], (block_bytes, first, stop)


def test_any_run_of_entries_hashes_as_that_slice_of_the_leaf_inputs_with_or_without_the_helper(
    log: Log, monkeypatch: pytest.MonkeyPatch
) -> None:
    export = log.export()
    every = hash_leaf_inputs(leaf_input for batch in audit_export.read_export(export)
                             .leaf_input_batches() for leaf_input in batch)
    for block_bytes in (1, 600, 1 << 20):
        monkeypatch.setattr(audit_export, "_BLOCK_BYTES", block_bytes)
        for compiled in {rfc6962_native.available(), False}:
            with contextlib.nullcontext() if compiled else rfc6962_native.disabled():
                reader = audit_export.read_export(export)
                for first in range(LOG_SIZE + 1):
                    for stop in [*range(first, LOG_SIZE + 2), None]:
                        run = b"".join(reader.leaf_hash_batches(first, stop))
                        assert run == b"".join(every[first:stop]), (block_bytes, first, stop)


@pytest.mark.skipif(not rfc6962_native.available(), reason="the compiled helper is not built")
@pytest.mark.parametrize("block_bytes", [1, 600, 1 << 20])
@pytest.mark.parametrize("name", [None, *TAMPERINGS, "unsigned entries"])
def test_the_compiled_helper_and_hashlib_give_the_same_report(
    log: Log, name: str | None, block_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if name == "unsigned entries":
        append_unsigned(log)
    elif name is not None:
        TAMPERINGS[name][0](log)
    monkeypatch.setattr(audit_export, "_BLOCK_BYTES", block_bytes)
    compiled = log.verify()
    with rfc6962_native.disabled():
        assert log.verify() == compiled


# --- hashing runs of the export in several processes --------------------------------------

@pytest.fixture
def small_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 2 entries, and processes for an export of any size: the 12 signed entries
    split at 6 for 2 processes, at 4 and 8 for 3."""
    monkeypatch.setattr(audit_verify, "_CHUNK_LEAVES", 2)
    monkeypatch.setattr(audit_verify, "PARALLEL_MIN_ENTRIES", 0)
    assert audit_verify._run_starts(LOG_SIZE, 2) == [0, 6]
    assert audit_verify._run_starts(LOG_SIZE, 3) == [0, 4, 8]


def _unsigned_then(tamper: Callable[[Log], None]) -> Callable[[Log], None]:
    return lambda log: (append_unsigned(log), tamper(log))[-1]


PROCESS_CASES = {**{name: case[0] for name, case in TAMPERINGS.items()},
                 **{f"unsigned {name}": _unsigned_then(case[0])
                    for name, case in UNSIGNED_TAMPERINGS.items()},
                 "unsigned entries": append_unsigned}


@pytest.mark.parametrize("block_bytes", [1, 600])
@pytest.mark.parametrize("name", [None, *PROCESS_CASES])
def test_several_processes_report_exactly_what_one_process_reports(
    log: Log, name: str | None, block_bytes: int, small_runs: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if name is not None:
        PROCESS_CASES[name](log)
    monkeypatch.setattr(audit_export, "_BLOCK_BYTES", block_bytes)
    export = log.export()
    alone = verify_export(export, log.node_key.public_key())
    for workers in (2, 3):
        assert verify_export(export, log.node_key.public_key(), workers=workers) == alone
    assert alone.ok == (name in (None, "unsigned entries"))
    if alone.ok:  # the root every process count agrees on is the node's own
        with log.session() as s:
            stored = [bytes.fromhex(row.leaf_hash) for row in read_entry_rows(s)]
        assert alone.root == MerkleTree(stored).root().hex()


def test_an_honest_export_is_vouched_for_by_the_processes_without_the_entry_by_entry_pass(
    log: Log, small_runs: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = log.verify()
    monkeypatch.setattr(audit_verify, "_entry_by_entry", None)  # calling it would fail
    assert verify_export(log.export(), log.node_key.public_key(), workers=3) == expected


def test_each_job_but_the_first_runs_in_a_forked_process_and_a_failed_one_gives_none() -> None:
    here = os.getpid()
    assert audit_verify._in_processes([os.getpid]) == [here]
    first, second, third = audit_verify._in_processes([os.getpid, os.getpid, os.getpid])
    assert first == here and len({here, second, third}) == 3
    assert audit_verify._in_processes([lambda: "here", lambda: os._exit(3)]) == ["here", None]


def test_a_file_verifies_mapped_into_memory_as_it_does_read_into_it(log: Log, tmp_path: Path) -> None:
    edit_entry(log)
    path = tmp_path / "audit.json"
    path.write_bytes(log.export())
    assert verify_export_file(path, log.node_key.public_key()) == log.verify(path.read_bytes())
    path.write_bytes(b"")
    problem = verify_export_file(path, log.node_key.public_key()).problem
    assert problem is not None and problem.reason == "malformed-export"


def test_the_entry_lines_are_the_leaf_inputs_the_node_hashed(log: Log) -> None:
    reader = audit_export.read_export(log.export())
    with log.session() as s:
        stored = [bytes.fromhex(row.leaf_hash) for row in read_entry_rows(s)]
    inputs = [leaf_input for batch in reader.leaf_input_batches() for leaf_input in batch]
    assert hash_leaf_inputs(inputs) == stored
    assert [LEAF_PREFIX + text for text in reader.entry_texts()] == inputs


# --- the command line ---------------------------------------------------------------------

def _exported(log: Log, tampering: str | None, tmp_path: Path) -> tuple[Path, Path]:
    """The log exported to a file after ``tampering`` (None: honest), and the node key pair's
    path (the public key is at ``<path>.pub``)."""
    if tampering is not None:
        TAMPERINGS[tampering][0](log)
    export, node_pub = tmp_path / "audit.json", tmp_path / "node"
    export.write_bytes(log.export())
    keys.write_key_pair(log.node_key, node_pub)
    return export, node_pub


@pytest.mark.parametrize("name", [None, *TAMPERINGS])
def test_audit_verify_command_exits_1_printing_the_first_problem(
    log: Log, name: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export, node_pub = _exported(log, name, tmp_path)
    status = fedgate(["audit", "verify", str(export), "--node-key", f"{node_pub}.pub"])
    out = capsys.readouterr().out
    if name is None:
        assert status == 0 and out.startswith("OK: 12 entries")
    else:
        assert status == 1
        assert out.startswith(f"FAILED [{TAMPERINGS[name][1]}]: ")
        assert TAMPERINGS[name][3] in out


@pytest.mark.parametrize("name", [None, "edited entry"])
def test_audit_verify_command_prints_the_same_report_with_any_number_of_workers(
    log: Log, name: str | None, small_runs: None, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    export, node_pub = _exported(log, name, tmp_path)
    printed = []
    for workers in ("1", "2", "3"):
        status = fedgate(["audit", "verify", str(export), "--node-key", f"{node_pub}.pub",
                          "--workers", workers, "--json"])
        printed.append((status, capsys.readouterr().out))
    assert printed[0][0] == (0 if name is None else 1)
    assert printed == [printed[0]] * 3


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
def test_audit_verify_uses_one_process_where_this_process_may_use_one_cpu() -> None:
    """Under taskset or a one-CPU cpuset the machine may still have many CPUs: a second
    process would only take turns with the first."""
    import subprocess
    import sys

    probe = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
             "from gateway.cli import build_parser; "
             "print(build_parser().parse_args(['audit', 'verify', 'x', '--node-key', 'k'])"
             ".workers)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent).stdout
    assert out.strip() == "1"
