"""The audit log: RFC 6962 hashing checked against the published reference vectors,
dense append-only numbering, canonical entries."""

from __future__ import annotations

import json

from sqlmodel import select

from ledger.audit import append_entry, leaf_hash, merkle_root, read_entries
from ledger.db import create_schema, make_engine, session
from ledger.models import AuditEntry

# Certificate Transparency / RFC 6962 reference data: leaves and tree heads for sizes 0..8.
CT_LEAVES = ["", "00", "10", "2021", "3031", "40414243", "5051525354555657",
             "606162636465666768696a6b6c6d6e6f"]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def test_merkle_root_matches_rfc6962_reference_tree_heads() -> None:
    leaves = [leaf_hash(bytes.fromhex(x)) for x in CT_LEAVES]
    for size, expected in enumerate(CT_ROOTS):
        assert merkle_root(leaves[:size]).hex() == expected


def test_entries_are_numbered_densely_and_hashed_canonically(db_url: str) -> None:
    engine = make_engine(db_url)
    create_schema(engine)
    with session(engine) as s, s.begin():
        first = append_entry(s, action="deny", actor="k-1", reason="policy-denied")
        second = append_entry(s, action="admit", actor="k-2", epsilon=0.5)
    with session(engine) as s:
        entries = read_entries(s)
        rows = s.exec(select(AuditEntry).order_by(AuditEntry.seq)).all()
    engine.dispose()
    assert (first, second) == (0, 1)
    assert [e["action"] for e in entries] == ["deny", "admit"]
    for row in rows:
        canonical = json.dumps(json.loads(row.entry), sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False).encode()
        assert row.entry.encode() == canonical
        assert row.leaf_hash == leaf_hash(canonical).hex()


def test_a_checkpoint_is_signed_over_a_snapshot_while_a_writer_holds_the_lock(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The gateway's periodic checkpoint rehashes the log in a read snapshot, so admissions
    never wait behind it: it signs the committed prefix while a write transaction is open,
    and storing it later is still true after the log has grown."""
    from ledger import keys
    from ledger.audit import audit_tree, sign_current_tree, store_checkpoint
    from ledger.db import make_read_engine

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = make_engine(url)
    create_schema(engine)
    reads = make_read_engine(url, engine)
    node_key = keys.generate_private_key()
    key_id = keys.key_id(node_key.public_key())
    with session(engine) as s, s.begin():
        for i in range(3):
            append_entry(s, action="key", actor=f"k-{i}")
    with session(engine) as writer, writer.begin():
        append_entry(writer, action="key", actor="in-flight")  # holds SQLite's write lock
        with reads.connect() as connection:
            connection.exec_driver_sql("PRAGMA busy_timeout=0")  # waiting would fail
            with session(connection) as snapshot:  # type: ignore[arg-type]
                text = sign_current_tree(snapshot, node_key, key_id)
    with session(engine) as s, s.begin():
        checkpoint = store_checkpoint(s, text, node_key.public_key())
    with session(engine) as s:
        assert checkpoint.size == 3
        assert checkpoint.root == audit_tree(s, 4).root(3)
    reads.dispose()
    engine.dispose()
