"""The compiled RFC 6962 helper hashes exactly what ledger.merkle's hashlib code hashes.

Where the helper is not built these tests are skipped, except on CI (``CI`` set, as
``.ci/run`` does), where ``make test`` builds it: there a missing helper fails the run.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from ledger import rfc6962_native
from ledger.audit_export import _leaf_inputs
from ledger.merkle import ChunkedTree, MerkleTree, hash_leaf_inputs

if not rfc6962_native.available():
    if os.environ.get("CI"):
        pytest.fail(f"the compiled helper {rfc6962_native.LIBRARY} is not built (make env)",
                    pytrace=False)
    pytest.skip("the compiled RFC 6962 helper is not built (make env)", allow_module_level=True)


def python_line_hashes(block: bytes, last: bool) -> bytes:
    return b"".join(hash_leaf_inputs(_leaf_inputs(block, last)))


EDGE_BLOCKS = [
    b"\n",
    b",\n",
    b"\x00{}\n",
    b"\x00{},\n",
    b"\x00{\"a\":1},\n\x00{\"b\":2}\n",
    b"\x00{},\n\n,\n\x00x,,\n",
    b"no comma\nnor here\n",
    b"\x00" + b"x" * 5000 + b",\n" + b"\x00y,\n",
]


@pytest.mark.parametrize("last", [False, True])
@pytest.mark.parametrize("block", EDGE_BLOCKS)
def test_line_hashes_drop_exactly_the_endings_the_python_reader_drops(block: bytes,
                                                                     last: bool) -> None:
    assert rfc6962_native.line_hashes(block, last) == python_line_hashes(block, last)


def test_line_hashes_of_random_blocks_match() -> None:
    rng = random.Random(6962)
    alphabet = b"\x00\n,{}\"a1 "
    for _ in range(300):
        block = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 200))) + b"\n"
        for last in (False, True):
            assert rfc6962_native.line_hashes(block, last) == python_line_hashes(block, last)


def test_an_empty_block_has_no_lines_and_a_block_must_end_its_last_line() -> None:
    assert rfc6962_native.line_hashes(b"", True) == b""
    with pytest.raises(ValueError, match="must end with a line break"):
        rfc6962_native.line_hashes(b"\x00{},\n\x00{}", False)


@pytest.mark.parametrize("size", [*range(1, 70), 127, 128, 129, 1000, 4095, 4096, 4097])
def test_tree_head_is_the_rfc_6962_head_at_every_size(size: int) -> None:
    leaves = [hashlib.sha256(n.to_bytes(4, "big")).digest() for n in range(size)]
    assert rfc6962_native.tree_head(b"".join(leaves)) == MerkleTree(leaves).root()


def test_tree_head_refuses_no_leaves_and_a_partial_hash() -> None:
    for bad in (b"", bytes(33), bytes(63)):
        with pytest.raises(ValueError, match="32-byte hashes"):
            rfc6962_native.tree_head(bad)


@pytest.mark.parametrize("width", [1, 2, 8])
def test_a_chunked_tree_gives_the_same_heads_with_and_without_the_helper(width: int) -> None:
    inputs = [b"\x00" + str(n).encode() for n in range(37)]
    sizes = range(len(inputs) + 1)

    def heads() -> list[bytes]:
        tree = ChunkedTree(width, sizes=sizes)
        tree.extend_hashes(b"".join(hash_leaf_inputs(inputs[:20])))
        tree.extend(inputs[20:])
        return [tree.root(size) for size in sizes]

    compiled = heads()
    with rfc6962_native.disabled():
        assert not rfc6962_native.available()
        assert heads() == compiled
    assert compiled == [MerkleTree.of_leaf_inputs(inputs[:size]).root() for size in sizes]


def test_a_helper_file_that_cannot_be_loaded_means_hashlib_not_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "_rfc6962.so"
    broken.write_bytes(b"not a shared library")
    assert rfc6962_native._load(broken) is None
    assert rfc6962_native._load(tmp_path / "missing.so") is None
    assert rfc6962_native._load(rfc6962_native.LIBRARY) is not None
    monkeypatch.setattr(rfc6962_native, "ABI", rfc6962_native.ABI + 1)  # a stale build
    assert rfc6962_native._load(rfc6962_native.LIBRARY) is None
