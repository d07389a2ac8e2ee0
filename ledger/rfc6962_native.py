"""The compiled RFC 6962 hashing helper (``ledger/native/rfc6962.c``), when it is built.

Why: the offline audit verifier hashes every entry twice (its leaf and, on average, one
interior node), and a ``hashlib`` call costs a fixed overhead beyond SHA-256 itself, so the
verifier in Python runs below a fifth of the speed of raw SHA-256 over the same bytes. The
helper runs the same loops in C over OpenSSL's SHA-256 (docs/performance.md, "Audit log").

Contract (the tests compare both functions with ``ledger.merkle``'s hashlib code):

* ``line_hashes(block, last)``: SHA-256 of each line of ``block`` (every line ends with
  ``\\n``), where a line's input is the line without its final ``,\\n``; with ``last``, the
  block's last line without its final ``\\n`` instead (an export's last entry has no comma);
  any other line whole. Concatenated, 32 bytes a line.
* ``tree_head(hashes)``: the RFC 6962 tree head of the concatenated 32-byte leaf hashes.

The helper is optional: ``make env`` builds it (``ledger/native/_rfc6962.so``, not in the
repository), and without it, or with ``FEDGATE_PURE_PYTHON_HASHING=1``, ``available()`` is
false and ``ledger.merkle`` hashes with ``hashlib``. Results are the same either way.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

HASH_SIZE = 32
LIBRARY = Path(__file__).resolve().parent / "native" / "_rfc6962.so"
DISABLE_ENV = "FEDGATE_PURE_PYTHON_HASHING"
ABI = 1  # fedgate_rfc6962_abi() of the C file this module was written for

_ERRORS = {-1: "malformed input", -2: "output buffer too small", -3: "OpenSSL failed"}


def _load(path: Path = LIBRARY) -> ctypes.CDLL | None:
    """The helper at ``path``, or None where it is disabled, not built, cannot be loaded (a
    file built for another OpenSSL, say) or is of another version (a stale build): it is never
    worth failing for, as hashlib gives the same hashes (CI checks that the helper it built
    loads, tests/test_rfc6962_native.py)."""
    if os.environ.get(DISABLE_ENV) == "1" or not path.exists():
        return None
    try:
        library = ctypes.CDLL(str(path))  # CDLL: the GIL is released during each call
        functions = [(getattr(library, name), arguments) for name, arguments in _SIGNATURES]
        abi = library.fedgate_rfc6962_abi
    except (OSError, AttributeError):
        return None
    abi.argtypes, abi.restype = [], ctypes.c_int64
    if abi() != ABI:
        return None
    for function, arguments in functions:
        function.argtypes, function.restype = arguments, ctypes.c_int64
    return library


_SIGNATURES = (
    ("fedgate_count_lines", [ctypes.c_char_p, ctypes.c_int64]),
    ("fedgate_line_hashes", [ctypes.c_char_p, ctypes.c_int64, ctypes.c_int,
                             ctypes.c_void_p, ctypes.c_int64]),
    ("fedgate_tree_head", [ctypes.c_char_p, ctypes.c_int64, ctypes.c_void_p,
                           ctypes.c_int64, ctypes.c_char_p]),
)
_library = _load()


def _loaded() -> ctypes.CDLL:
    if _library is None:
        raise RuntimeError("the compiled RFC 6962 helper is not loaded (see available())")
    return _library


def available() -> bool:
    """Is the compiled helper loaded (built, and not disabled by the environment)?"""
    return _library is not None


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block, ``available()`` is false: for tests and benchmarks that compare the
    two paths in one process (not for use while other threads hash)."""
    global _library
    saved, _library = _library, None
    try:
        yield
    finally:
        _library = saved


def _check(result: int) -> int:
    if result < 0:
        raise RuntimeError(f"rfc6962 helper: {_ERRORS.get(result, result)}")
    return result


def line_hashes(block: bytes, last: bool) -> bytes:
    """SHA-256 of each line's input (see the module docstring), 32 bytes a line."""
    library = _loaded()
    if block and not block.endswith(b"\n"):
        raise ValueError("a block of lines must end with a line break")
    out = ctypes.create_string_buffer(HASH_SIZE * library.fedgate_count_lines(block, len(block)))
    lines = _check(library.fedgate_line_hashes(block, len(block), int(last), out, len(out)))
    return out.raw[:lines * HASH_SIZE]


def tree_head(hashes: bytes) -> bytes:
    """RFC 6962 tree head of one or more concatenated 32-byte leaf hashes."""
    library = _loaded()
    count, rest = divmod(len(hashes), HASH_SIZE)
    if count < 1 or rest:
        raise ValueError("leaf hashes are one or more 32-byte hashes, concatenated")
    scratch = ctypes.create_string_buffer(len(hashes))
    root = ctypes.create_string_buffer(HASH_SIZE)
    _check(library.fedgate_tree_head(bytes(hashes), count, scratch, len(scratch), root))
    return root.raw
