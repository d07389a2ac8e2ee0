"""Tamper evidence end to end: a real log on SQLite and PostgreSQL, real checkpoints
signed by the node key, an export, and an attacker with write access to the database.
Each tampering is caught by ``verify_export`` and ``fedgate audit verify`` with a message
naming the first bad entry; the node refuses to sign over a tampered log."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.engine import Engine
from sqlmodel import Session, select, update

from gateway.cli import main as fedgate
from ledger import keys
from ledger.audit import AuditLogCorrupted, append_entry, publish_checkpoint
from ledger.audit_export import export_audit
from ledger.audit_verify import verify_export
from ledger.canonical import canonical_json
from ledger.checkpoints import sign_checkpoint, sign_note
from ledger.db import create_schema, make_engine, session
from ledger.merkle import leaf_hash
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


# --- the command line ---------------------------------------------------------------------

@pytest.mark.parametrize("name", [None, *TAMPERINGS])
def test_audit_verify_command_exits_1_printing_the_first_problem(
    log: Log, name: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if name is not None:
        TAMPERINGS[name][0](log)
    export, node_pub = tmp_path / "audit.json", tmp_path / "node"
    export.write_bytes(log.export())
    keys.write_key_pair(log.node_key, node_pub)
    status = fedgate(["audit", "verify", str(export), "--node-key", f"{node_pub}.pub"])
    out = capsys.readouterr().out
    if name is None:
        assert status == 0 and out.startswith("OK: 12 entries")
    else:
        assert status == 1
        assert out.startswith(f"FAILED [{TAMPERINGS[name][1]}]: ")
        assert TAMPERINGS[name][3] in out
