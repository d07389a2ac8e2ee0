"""RFC 6962 / RFC 9162 Merkle tree math: tree heads, inclusion and consistency proofs.

Pure functions over 32-byte SHA-256 hashes; no I/O. Checked against the published
Certificate Transparency reference vectors (tests/test_merkle.py).

Contract:

* ``leaf_hash(d) = SHA-256(0x00 || d)``, ``node_hash(l, r) = SHA-256(0x01 || l || r)``;
  the tree hash of ``n`` leaves splits at the largest power of two ``k < n``
  (RFC 9162 §2.1.1); the empty tree hashes to ``SHA-256("")``.
* Proofs are generated exactly as RFC 9162 §2.1.3.1 (``PATH``) and §2.1.4.1
  (``PROOF``/``SUBPROOF``) define them, ordered from the leaf side to the root side.
* ``verify_inclusion`` and ``verify_consistency`` implement the verification
  algorithms of RFC 9162 §2.1.3.2 and §2.1.4.2. They return ``False`` — never raise —
  for any malformed input (wrong sizes, wrong hash lengths, wrong proof length).
* ``MerkleTree`` keeps the hash of every complete (power-of-two, aligned) subtree, so
  the root at any size and any proof cost O(log n) hashes once the tree is built
  (building it costs n - 1 hashes).
* Building hashes whole levels at a time (``hash_leaf_inputs``, ``MerkleTree(...)``): the
  loops run inside ``map``, not in Python bytecode, so a hash costs what hashlib costs.
* ``ChunkedTree`` gives the same tree heads from chunks of ``2**k`` leaves hashed apart (in
  other processes, say) and joined; its docstring says why that is the same tree. It takes
  leaf hashes in bulk (``extend_hashes``) and computes a chunk's heads with the compiled
  helper of ``ledger.rfc6962_native`` when it is built (``hashlib`` otherwise: same heads).
"""

from __future__ import annotations

import hashlib
import struct
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from functools import lru_cache
from itertools import repeat

from ledger import rfc6962_native

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"

_sha256 = hashlib.sha256
_digest = type(hashlib.sha256()).digest


def leaf_hash(entry_bytes: bytes) -> bytes:
    """RFC 6962 leaf hash: SHA-256(0x00 || entry)."""
    return _sha256(LEAF_PREFIX + entry_bytes).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash: SHA-256(0x01 || left || right)."""
    return _sha256(NODE_PREFIX + left + right).digest()


def hash_leaf_inputs(leaf_inputs: Iterable[bytes]) -> list[bytes]:
    """``SHA-256(x)`` of each ``x``, where each ``x`` is ``LEAF_PREFIX || entry``.

    The caller supplies the prefixed bytes so that a reader which can lay them out in bulk
    (``ledger.audit_export``) pays no copy per entry; ``leaf_hash`` is the one-entry form.
    """
    return list(map(_digest, map(_sha256, leaf_inputs)))


def _parent_level(level: list[bytes]) -> list[bytes]:
    """``node_hash`` of each adjacent pair of ``level``; an odd last hash has no parent here."""
    pairs = zip(repeat(NODE_PREFIX), level[0::2], level[1::2], strict=False)
    return list(map(_digest, map(_sha256, map(b"".join, pairs))))


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleTree:
    """An append-only RFC 6962 tree over leaf hashes, with every complete subtree cached.

    ``_levels[h][i]`` is the hash of the complete subtree of ``2**h`` leaves starting at
    leaf ``i * 2**h``; incomplete right-edge subtrees are never stored, so appending
    never invalidates a cached hash.
    """

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        leaves = list(leaf_hashes)
        if any(map(HASH_SIZE.__ne__, map(len, leaves))):
            raise ValueError("leaf hashes must be 32 bytes")
        self._build(leaves)

    @classmethod
    def of_leaf_inputs(cls, leaf_inputs: Iterable[bytes]) -> MerkleTree:
        """The tree over ``hash_leaf_inputs(leaf_inputs)`` (digests, so their length is not
        checked again)."""
        tree = cls.__new__(cls)
        tree._build(hash_leaf_inputs(leaf_inputs))
        return tree

    @classmethod
    def of_concatenated(cls, leaf_hashes: bytes | bytearray) -> MerkleTree:
        """The tree over 32-byte leaf hashes given concatenated (a length that is not a
        multiple of 32 is refused)."""
        count, rest = divmod(len(leaf_hashes), HASH_SIZE)
        if rest:
            raise ValueError("leaf hashes must be 32 bytes")
        tree = cls.__new__(cls)
        tree._build(list(_hashes_format(count).unpack(leaf_hashes)))
        return tree

    def _build(self, leaves: list[bytes]) -> None:
        self._levels: list[list[bytes]] = [leaves]
        level = leaves
        while len(level) >= 2:
            level = _parent_level(level)
            self._levels.append(level)

    @property
    def size(self) -> int:
        return len(self._levels[0])

    def leaf(self, index: int) -> bytes:
        return self._levels[0][index]

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash; O(log n) amortised O(1) hashes."""
        if len(leaf) != HASH_SIZE:
            raise ValueError("leaf hashes must be 32 bytes")
        self._levels[0].append(leaf)
        height = 0
        while len(self._levels[height]) % 2 == 0:
            level = self._levels[height]
            if height + 1 == len(self._levels):
                self._levels.append([])
            self._levels[height + 1].append(node_hash(level[-2], level[-1]))
            height += 1

    def root(self, size: int | None = None) -> bytes:
        """Tree head of the first ``size`` leaves (default: all)."""
        size = self.size if size is None else size
        self._check_size(size)
        return EMPTY_ROOT if size == 0 else self._subtree(0, size)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """RFC 9162 PATH(index, D[0:size]); requires ``0 <= index < size <= self.size``."""
        self._check_size(size)
        if not 0 <= index < size:
            raise ValueError(f"leaf index {index} is outside a tree of size {size}")
        proof: list[bytes] = []
        lo, hi = 0, size
        while hi - lo > 1:
            k = _split(hi - lo)
            if index < lo + k:
                proof.append(self._subtree(lo + k, hi))
                hi = lo + k
            else:
                proof.append(self._subtree(lo, lo + k))
                lo += k
        proof.reverse()  # collected root-side first; RFC order is leaf-side first
        return proof

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """RFC 9162 PROOF(old_size, D[0:new_size]); empty when ``old_size`` is 0 or equal."""
        self._check_size(new_size)
        if not 0 <= old_size <= new_size:
            raise ValueError(f"old size {old_size} must be between 0 and new size {new_size}")
        if old_size in (0, new_size):
            return []
        proof: list[bytes] = []
        lo, hi, m, complete = 0, new_size, old_size, True
        while m != hi - lo:
            k = _split(hi - lo)
            if m <= k:
                proof.append(self._subtree(lo + k, hi))
                hi = lo + k
            else:
                proof.append(self._subtree(lo, lo + k))
                lo, m, complete = lo + k, m - k, False
        if not complete:
            proof.append(self._subtree(lo, hi))
        proof.reverse()
        return proof

    def _subtree(self, lo: int, hi: int) -> bytes:
        """MTH(D[lo:hi]) from cached complete subtrees; O(log n) hashes."""
        width = hi - lo
        if width & (width - 1) == 0 and lo % width == 0:
            return self._levels[width.bit_length() - 1][lo // width]
        k = _split(width)
        return node_hash(self._subtree(lo, lo + k), self._subtree(lo + k, hi))

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= self.size:
            raise ValueError(f"tree size {size} is outside 0..{self.size}")


class ChunkedTree:
    """Tree heads of a run of leaves hashed a chunk of ``width = 2**k`` leaves at a time, so
    that runs hashed apart can be joined.

    Why it is the same tree: ``MTH(D[0:n])`` equals the tree head of the list of its chunks'
    heads ``MTH(D[0:w]), MTH(D[w:2w]), ..., MTH(D[jw:n])``, the last chunk possibly shorter.
    RFC 9162 splits ``n`` leaves at the largest power of two ``p < n``; for ``n > w`` that
    ``p`` is ``w`` times the largest power of two below the number of chunks, a chunk
    boundary, so both trees split alike until a range lies within one chunk. Hence a run
    starting at a chunk boundary is hashed without the leaves before it, and joining runs
    costs one hash per chunk.

    The head at a size inside an already hashed chunk needs the head of that chunk's leaves
    before it, so such sizes are named when the run starts (``sizes``); sizes on a chunk
    boundary, and any size in the chunk still being filled, need not be.
    """

    def __init__(self, width: int, first: int = 0, sizes: Iterable[int] = ()) -> None:
        if width < 1 or width & (width - 1) or first % width:
            raise ValueError("chunks are a power of two leaves wide, and a run starts at a "
                             "chunk boundary")
        self._width, self._first = width, first
        self._sizes = sorted(set(sizes))
        self._heads: list[bytes] = []  # one per full chunk from leaf `first` on
        self._heads_before: dict[int, bytes] = {}  # size -> head of its chunk's leaves before it
        self._filling = bytearray()  # leaf hashes of the chunk not yet full, concatenated
        self._cache: tuple[MerkleTree, MerkleTree] | None = None

    @property
    def first(self) -> int:
        """Index of the run's first leaf."""
        return self._first

    @property
    def size(self) -> int:
        """Index one past the run's last leaf."""
        return self._first + len(self._heads) * self._width + len(self._filling) // HASH_SIZE

    def extend(self, leaf_inputs: Iterable[bytes]) -> None:
        """Append leaves, each given as ``LEAF_PREFIX || entry``; each chunk they fill is
        hashed and only its head kept."""
        self.extend_hashes(b"".join(hash_leaf_inputs(leaf_inputs)))

    def extend_hashes(self, leaf_hashes: bytes) -> None:
        """Append leaves given as their hashes, 32 bytes each, concatenated."""
        if len(leaf_hashes) % HASH_SIZE:
            raise ValueError("leaf hashes are 32 bytes each")
        self._cache = None
        self._filling += leaf_hashes
        chunk_bytes = self._width * HASH_SIZE
        while len(self._filling) >= chunk_bytes:
            start = self._first + len(self._heads) * self._width
            chunk = bytes(self._filling[:chunk_bytes])
            del self._filling[:chunk_bytes]
            sizes = self._sizes_within(start, start + self._width)
            *inside, head = _tree_heads(chunk, [size - start for size in sizes] + [self._width])
            self._heads_before.update(zip(sizes, inside, strict=True))
            self._heads.append(head)

    def join(self, following: ChunkedTree) -> None:
        """Append the run ``following``, which starts where this one ends."""
        if following.size == following.first:
            return
        if following.first != self.size or following._width != self._width:
            raise ValueError(f"a run from leaf {following.first} cannot follow one ending at "
                             f"{self.size}, or one in chunks of another width")
        self._cache = None
        self._heads += following._heads
        self._heads_before.update(following._heads_before)
        self._filling = bytearray(following._filling)
        self._sizes = sorted({*self._sizes, *following._sizes})

    def root(self, size: int | None = None) -> bytes:
        """Tree head of leaves ``0 .. size - 1`` (default: all); the run must start at leaf 0.

        O(log n) hashes once the chunks' heads are in a tree (n / width hashes, once).
        """
        size = self.size if size is None else size
        if self._first != 0 or not 0 <= size <= self.size:
            raise ValueError(f"tree size {size} is outside {self._first}..{self.size}, or the "
                             "run does not start at leaf 0")
        heads, filling = self._trees()
        full, rest = divmod(size, self._width)
        if rest == 0:
            return heads.root(full)
        if full == heads.size:
            last = filling.root(rest)
        elif size in self._heads_before:
            last = self._heads_before[size]
        else:
            raise ValueError(f"tree size {size} ends inside a chunk hashed without it")
        # MTH(heads[:full] + [last]): the perfect subtrees of `full`, folded from the right.
        while full:
            width = full & -full
            full -= width
            last = node_hash(heads._subtree(full, full + width), last)
        return last

    def _sizes_within(self, start: int, stop: int) -> list[int]:
        return self._sizes[bisect_right(self._sizes, start):bisect_left(self._sizes, stop)]

    def _trees(self) -> tuple[MerkleTree, MerkleTree]:
        if self._cache is None:
            self._cache = (MerkleTree(self._heads), MerkleTree.of_concatenated(self._filling))
        return self._cache


def _tree_heads(leaf_hashes: bytes, sizes: list[int]) -> list[bytes]:
    """The tree head of the first ``size`` of the concatenated leaf hashes, for each size
    (each at least 1): with the compiled helper if it is built, else with ``hashlib``."""
    if rfc6962_native.available():
        return [rfc6962_native.tree_head(leaf_hashes[:size * HASH_SIZE]) for size in sizes]
    tree = MerkleTree.of_concatenated(leaf_hashes)
    return [tree.root(size) for size in sizes]


@lru_cache(maxsize=16)
def _hashes_format(count: int) -> struct.Struct:
    """Splits ``count`` concatenated hashes into a tuple of them in one C call."""
    return struct.Struct(f"{HASH_SIZE}s" * count)


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """RFC 6962 Merkle tree hash of a list of leaf hashes (empty tree = SHA-256(''))."""
    return MerkleTree(leaves).root()


def inclusion_proof(leaves: Sequence[bytes], index: int, size: int) -> list[bytes]:
    """Inclusion proof for leaf ``index`` in the tree of the first ``size`` leaves."""
    return MerkleTree(leaves[:size]).inclusion_proof(index, size)


def consistency_proof(leaves: Sequence[bytes], old_size: int, new_size: int) -> list[bytes]:
    """Consistency proof from the tree of ``old_size`` leaves to that of ``new_size``."""
    return MerkleTree(leaves[:new_size]).consistency_proof(old_size, new_size)


def _well_formed(*hashes: bytes) -> bool:
    return all(isinstance(h, bytes) and len(h) == HASH_SIZE for h in hashes)


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """RFC 9162 §2.1.3.2: does ``proof`` show leaf hash ``leaf`` at ``index`` under ``root``?"""
    if not 0 <= index < size or not _well_formed(leaf, root, *proof):
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == root


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 §2.1.4.2: is the tree ``old_root`` (old_size) a prefix of ``new_root``?

    Edge cases outside the RFC's ``0 < old < new``: equal sizes need an empty proof and
    equal roots; the empty tree (``old_root`` = SHA-256("")) is a prefix of every tree.
    """
    if not 0 <= old_size <= new_size or not _well_formed(old_root, new_root, *proof):
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and fr == old_root and sr == new_root
