"""RFC 6962 / RFC 9162 Merkle proofs: the published Certificate Transparency vectors
(as in transparency-dev/merkle proof/verify_test.go and CT's merkle_tree_test.cc), and
properties over random trees: every honest proof verifies, any altered byte fails."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import audit
from ledger.merkle import (
    EMPTY_ROOT,
    LEAF_PREFIX,
    ChunkedTree,
    MerkleTree,
    consistency_proof,
    hash_leaf_inputs,
    inclusion_proof,
    leaf_hash,
    merkle_root,
    node_hash,
    verify_consistency,
    verify_inclusion,
)
from tests.test_audit import CT_LEAVES, CT_ROOTS

LEAVES = [leaf_hash(bytes.fromhex(x)) for x in CT_LEAVES]
ROOTS = [bytes.fromhex(r) for r in CT_ROOTS]  # ROOTS[n] = root of the first n leaves

# (leaf index, tree size, proof) — 0-based leaf indices.
INCLUSION_VECTORS = [
    (0, 1, []),
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (1, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]

# (old size, new size, proof)
CONSISTENCY_VECTORS = [
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
    (6, 7, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]

SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")


def reference_root(leaves: list[bytes]) -> bytes:
    """RFC 6962 §2.1 MTH, written literally (the specification, not the implementation)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return node_hash(reference_root(leaves[:k]), reference_root(leaves[k:]))


def flip(data: bytes, position: int) -> bytes:
    return data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1:]


def test_audit_module_keeps_exporting_the_hash_functions() -> None:
    assert (audit.leaf_hash, audit.node_hash, audit.merkle_root) == (leaf_hash, node_hash, merkle_root)


def test_leaves_hashed_in_bulk_are_the_reference_leaf_hashes() -> None:
    assert hash_leaf_inputs(LEAF_PREFIX + bytes.fromhex(x) for x in CT_LEAVES) == LEAVES


def test_roots_match_the_reference_tree_heads_for_every_prefix() -> None:
    tree = MerkleTree(LEAVES)
    for size, expected in enumerate(ROOTS):
        assert tree.root(size) == expected == merkle_root(LEAVES[:size])
    assert merkle_root([]) == EMPTY_ROOT


@pytest.mark.parametrize("width", [1, 2, 4, 16])
def test_a_tree_hashed_in_chunks_has_the_reference_tree_heads(width: int) -> None:
    tree = ChunkedTree(width, sizes=range(len(CT_LEAVES) + 1))
    tree.extend(LEAF_PREFIX + bytes.fromhex(x) for x in CT_LEAVES)
    assert [tree.root(size) for size in range(len(ROOTS))] == ROOTS


@pytest.mark.parametrize(("index", "size", "expected"), INCLUSION_VECTORS)
def test_inclusion_proofs_match_the_published_vectors(index: int, size: int, expected: list[str]) -> None:
    proof = inclusion_proof(LEAVES, index, size)
    assert [p.hex() for p in proof] == expected
    assert verify_inclusion(LEAVES[index], index, size, proof, ROOTS[size])


@pytest.mark.parametrize(("index", "size", "expected"), INCLUSION_VECTORS[1:])
def test_corrupted_reference_inclusion_proofs_are_rejected(index: int, size: int,
                                                           expected: list[str]) -> None:
    proof = [bytes.fromhex(p) for p in expected]
    leaf, root = LEAVES[index], ROOTS[size]
    probes = [
        (leaf, index - 1, size, proof, root), (leaf, index + 1, size, proof, root),
        (leaf, index ^ 2, size, proof, root), (leaf, index, size * 2, proof, root),
        (leaf, index, size // 2, proof, root), (b"WrongLeaf", index, size, proof, root),
        (leaf, index, size, proof, EMPTY_ROOT), (leaf, index, size, proof, SOME_HASH),
        (leaf, index, size, [*proof, b""], root), (leaf, index, size, [*proof, root], root),
        (leaf, index, size, [b"", *proof], root), (leaf, index, size, [root, *proof], root),
        (leaf, index, size, proof[:-1], root),
        (leaf, index, size, [proof[0], SOME_HASH, *proof[1:]], root),
    ]
    probes += [(leaf, index, size, [*proof[:i], flip(proof[i], 0), *proof[i + 1:]], root)
               for i in range(len(proof))]
    for probe in probes:
        assert not verify_inclusion(*probe), probe


@pytest.mark.parametrize(("old", "new", "expected"), CONSISTENCY_VECTORS)
def test_consistency_proofs_match_the_published_vectors(old: int, new: int, expected: list[str]) -> None:
    proof = consistency_proof(LEAVES, old, new)
    assert [p.hex() for p in proof] == expected
    assert verify_consistency(old, new, ROOTS[old], ROOTS[new], proof)


@pytest.mark.parametrize(("old", "new", "expected"), CONSISTENCY_VECTORS[1:])
def test_corrupted_reference_consistency_proofs_are_rejected(old: int, new: int,
                                                             expected: list[str]) -> None:
    proof = [bytes.fromhex(p) for p in expected]
    r1, r2 = ROOTS[old], ROOTS[new]
    probes = [
        (old - 1, new, r1, r2, proof), (old + 1, new, r1, r2, proof),
        (old ^ 2, new, r1, r2, proof), (old, new * 2, r1, r2, proof),
        (old, new // 2, r1, r2, proof), (old, new, b"WrongRoot", r2, proof),
        (old, new, r1, b"WrongRoot", proof), (old, new, r2, r1, proof), (old, new, r1, r2, []),
        (old, new, r1, r2, [*proof, b""]), (old, new, r1, r2, [*proof, r1]),
        (old, new, r1, r2, [*proof, r2]), (old, new, r1, r2, [b"", *proof]),
        (old, new, r1, r2, [r1, *proof]), (old, new, r1, r2, [r2, *proof]),
        (old, new, r1, r2, [proof[0], *proof]), (old, new, r1, r2, proof[:-1]),
    ]
    probes += [(old, new, r1, r2, [*proof[:i], flip(proof[i], 0), *proof[i + 1:]])
               for i in range(len(proof))]
    for probe in probes:
        assert not verify_consistency(*probe), probe


def test_consistency_edge_cases_follow_the_definitions() -> None:
    root = ROOTS[5]
    assert verify_consistency(0, 5, EMPTY_ROOT, root, [])  # the empty tree prefixes every tree
    assert not verify_consistency(0, 5, SOME_HASH, root, [])
    assert not verify_consistency(5, 5, root, ROOTS[4], [])
    assert not verify_consistency(5, 5, root, root, [EMPTY_ROOT])
    assert not verify_consistency(5, 4, root, ROOTS[4], [])
    assert not verify_inclusion(LEAVES[0], 0, 0, [], EMPTY_ROOT)


# --- properties over random trees --------------------------------------------------------

@st.composite
def trees(draw: st.DrawFn) -> list[bytes]:
    """1..70 distinct leaf hashes."""
    size = draw(st.integers(min_value=1, max_value=70))
    salt = draw(st.binary(max_size=8))
    return [leaf_hash(salt + i.to_bytes(2, "big")) for i in range(size)]


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=69))
def test_incremental_tree_matches_the_literal_specification(size: int) -> None:
    leaves = [leaf_hash(i.to_bytes(2, "big")) for i in range(size)]
    grown = MerkleTree()
    for leaf in leaves:
        grown.append(leaf)
    for n in range(size + 1):
        assert grown.root(n) == MerkleTree(leaves).root(n) == reference_root(leaves[:n])


@settings(max_examples=80, deadline=None)
@given(trees(), st.data())
def test_every_inclusion_proof_verifies_and_any_altered_byte_fails(leaves: list[bytes],
                                                                   data: st.DataObject) -> None:
    tree = MerkleTree(leaves)
    size = data.draw(st.integers(min_value=1, max_value=tree.size), label="size")
    index = data.draw(st.integers(min_value=0, max_value=size - 1), label="index")
    proof, root, leaf = tree.inclusion_proof(index, size), tree.root(size), tree.leaf(index)
    assert verify_inclusion(leaf, index, size, proof, root)
    byte = data.draw(st.integers(min_value=0, max_value=31), label="byte")
    assert not verify_inclusion(flip(leaf, byte), index, size, proof, root)
    assert not verify_inclusion(leaf, index, size, proof, flip(root, byte))
    for i in range(len(proof)):
        assert not verify_inclusion(leaf, index, size, [*proof[:i], flip(proof[i], byte),
                                                        *proof[i + 1:]], root)
    for other in {index - 1, index + 1} - {-1, size}:
        assert not verify_inclusion(leaf, other, size, proof, root)


@settings(max_examples=80, deadline=None)
@given(trees(), st.data())
def test_every_consistency_proof_verifies_and_any_altered_byte_fails(leaves: list[bytes],
                                                                     data: st.DataObject) -> None:
    tree = MerkleTree(leaves)
    new = data.draw(st.integers(min_value=1, max_value=tree.size), label="new")
    old = data.draw(st.integers(min_value=1, max_value=new), label="old")
    proof, old_root, new_root = tree.consistency_proof(old, new), tree.root(old), tree.root(new)
    assert verify_consistency(old, new, old_root, new_root, proof)
    byte = data.draw(st.integers(min_value=0, max_value=31), label="byte")
    assert not verify_consistency(old, new, flip(old_root, byte), new_root, proof)
    assert not verify_consistency(old, new, old_root, flip(new_root, byte), proof)
    for i in range(len(proof)):
        assert not verify_consistency(old, new, old_root, new_root,
                                      [*proof[:i], flip(proof[i], byte), *proof[i + 1:]])


def test_roots_and_proofs_of_a_built_tree_cost_logarithmic_hashes(monkeypatch) -> None:
    from ledger import merkle

    tree = MerkleTree(leaf_hash(i.to_bytes(4, "big")) for i in range(100_000))
    hashes = 0

    def counting_node_hash(left: bytes, right: bytes) -> bytes:
        nonlocal hashes
        hashes += 1
        return node_hash(left, right)

    monkeypatch.setattr(merkle, "node_hash", counting_node_hash)
    root = tree.root(99_999)
    inclusion = tree.inclusion_proof(12_345, 99_999)
    consistency = tree.consistency_proof(65_537, 99_999)
    assert hashes <= 3 * 17  # three right-edge subtrees of at most log2(100k) < 17 hashes each
    monkeypatch.undo()
    assert verify_inclusion(tree.leaf(12_345), 12_345, 99_999, inclusion, root)
    assert verify_consistency(65_537, 99_999, tree.root(65_537), root, consistency)


@settings(max_examples=150, deadline=None)
@given(st.integers(min_value=0, max_value=70), st.integers(min_value=0, max_value=4), st.data())
def test_runs_of_whole_chunks_hashed_apart_and_joined_give_every_tree_head(
    size: int, log2_width: int, data: st.DataObject
) -> None:
    width = 1 << log2_width
    inputs = [LEAF_PREFIX + i.to_bytes(2, "big") for i in range(size)]
    boundaries = range(width, size, width)  # where a run may start
    starts = sorted(data.draw(st.sets(st.sampled_from(boundaries)) if boundaries else st.just(set()),
                              label="starts") | {0})
    sizes = data.draw(st.lists(st.integers(min_value=0, max_value=size)), label="sizes")
    runs = []
    for first, stop in zip(starts, [*starts[1:], size], strict=True):
        run = ChunkedTree(width, first, sizes)
        for batch in (inputs[first:stop][:3], inputs[first:stop][3:]):  # extended in pieces
            run.extend(batch)
        runs.append(run)
    tree = runs[0]
    for run in runs[1:]:
        tree.join(run)
    reference = MerkleTree.of_leaf_inputs(inputs)
    assert tree.size == size and tree.root() == reference.root()
    for named in sizes:
        assert tree.root(named) == reference.root(named)
    for unnamed in set(range(size + 1)) - set(sizes):
        if unnamed % width == 0 or unnamed > size - size % width:
            assert tree.root(unnamed) == reference.root(unnamed)
        else:  # inside a chunk hashed without it
            with pytest.raises(ValueError, match="ends inside a chunk"):
                tree.root(unnamed)


def test_a_run_starts_at_a_chunk_boundary_and_joins_only_where_the_previous_one_ends() -> None:
    with pytest.raises(ValueError, match="chunk boundary"):
        ChunkedTree(4, first=2)
    with pytest.raises(ValueError, match="chunk boundary"):
        ChunkedTree(3)
    for following in (ChunkedTree(4, first=4), ChunkedTree(2, first=8)):
        head = ChunkedTree(4)
        head.extend([LEAF_PREFIX + bytes([i]) for i in range(8)])
        following.extend([LEAF_PREFIX])
        with pytest.raises(ValueError, match="cannot follow"):
            head.join(following)
    with pytest.raises(ValueError, match="does not start at leaf 0"):
        ChunkedTree(4, first=4).root()
