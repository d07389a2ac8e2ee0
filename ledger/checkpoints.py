"""Signed checkpoints of the audit log, as C2SP signed-note / tlog-checkpoint text.

A checkpoint is the node's signed statement "the audit log had ``size`` entries and
RFC 6962 root ``root`` at ``timestamp``". Its text is::

    k-0123456789abcdef                             origin: the node key id
    42                                             tree size, decimal, no leading zeros
    3q2+7w...=                                     root hash, standard base64 (32 bytes)
    2026-11-25T10:42:00.123456Z                    timestamp, RFC 3339 UTC (extension line)
                                                   blank line
    — k-0123456789abcdef <base64(key hash || sig)> signature line

The key name is the origin; the 4-byte key hash is
``SHA-256(key name || 0x0A || 0x01 || raw Ed25519 public key)[:4]`` and the Ed25519
signature covers the note text including its final newline (c2sp.org/signed-note).
Any signed-note tool that knows the node's verifier key can check a fedgate checkpoint.

Contract: ``parse_and_verify_checkpoint`` returns a ``Checkpoint`` only if the text is
byte-for-byte well formed, its origin is the given key's id, and a signature by that
key verifies; on any defect it raises ``CheckpointInvalid`` naming it. Signatures by
other keys (e.g. witness cosignatures) are ignored, as the signed-note spec requires.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ledger.keys import key_id as derive_key_id
from ledger.keys import raw_public_bytes
from ledger.merkle import HASH_SIZE

SIGNATURE_PREFIX = "— "  # em dash, space
ED25519_SIGNATURE_TYPE = b"\x01"
MAX_SIGNATURES = 16
_KEY_NAME = re.compile(r"^[^\s+]+$")
_SIZE = re.compile(r"^(0|[1-9][0-9]*)$")
_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")


class CheckpointInvalid(ValueError):
    """A checkpoint text is malformed or not signed by the expected key."""


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: the node's signed tree head at ``size``."""

    origin: str
    size: int
    root: bytes
    timestamp: str
    text: str


def note_key_hash(key_name: str, public_key: Ed25519PublicKey) -> bytes:
    """The 4-byte signed-note key hash of an Ed25519 key under ``key_name``."""
    material = key_name.encode("utf-8") + b"\n" + ED25519_SIGNATURE_TYPE + raw_public_bytes(public_key)
    return hashlib.sha256(material).digest()[:4]


def sign_note(private_key: Ed25519PrivateKey, key_name: str, text: str) -> str:
    """Sign a note text (ending in a newline) and return the complete signed note."""
    if not _KEY_NAME.match(key_name):
        raise ValueError(f"key name {key_name!r} must be non-empty without spaces or '+'")
    if not text.endswith("\n") or "\n\n" in text:
        raise ValueError("note text must end with a newline and contain no blank line")
    signature = private_key.sign(text.encode("utf-8"))
    blob = base64.b64encode(note_key_hash(key_name, private_key.public_key()) + signature)
    return f"{text}\n{SIGNATURE_PREFIX}{key_name} {blob.decode('ascii')}\n"


def checkpoint_body(origin: str, size: int, root: bytes, timestamp: str) -> str:
    """The note text of a checkpoint (validated the same way the parser checks it)."""
    if size < 0 or len(root) != HASH_SIZE or not _TIMESTAMP.match(timestamp):
        raise ValueError("checkpoint needs size >= 0, a 32-byte root and an RFC 3339 UTC timestamp")
    return f"{origin}\n{size}\n{base64.b64encode(root).decode('ascii')}\n{timestamp}\n"


def sign_checkpoint(
    private_key: Ed25519PrivateKey, key_id: str, size: int, root: bytes, timestamp: str
) -> str:
    """Signed checkpoint text for the tree head (``size``, ``root``) at ``timestamp``.

    ``key_id`` must be the id of ``private_key``: it is both the origin and the key name.
    """
    if key_id != derive_key_id(private_key.public_key()):
        raise ValueError(f"key id {key_id} does not belong to the signing key")
    return sign_note(private_key, key_id, checkpoint_body(key_id, size, root, timestamp))


def parse_and_verify_checkpoint(text: str, public_key: Ed25519PublicKey) -> Checkpoint:
    """Parse checkpoint ``text`` and verify it was signed by ``public_key``; see module doc."""
    expected_origin = derive_key_id(public_key)
    body, signature_lines = _split_note(text)
    _verify_signatures(body, signature_lines, expected_origin, public_key)
    lines = body[:-1].split("\n")
    if len(lines) != 4:
        raise CheckpointInvalid(f"checkpoint text has {len(lines)} lines; expected origin, size, "
                                "root and timestamp")
    origin, size_text, root_text, timestamp = lines
    if origin != expected_origin:
        raise CheckpointInvalid(f"checkpoint origin {origin!r} is not this node ({expected_origin})")
    if not _SIZE.match(size_text):
        raise CheckpointInvalid(f"tree size {size_text!r} is not a decimal number")
    root = _strict_b64(root_text, "root hash")
    if len(root) != HASH_SIZE:
        raise CheckpointInvalid(f"root hash has {len(root)} bytes, not {HASH_SIZE}")
    if not _TIMESTAMP.match(timestamp):
        raise CheckpointInvalid(f"timestamp {timestamp!r} is not RFC 3339 UTC")
    try:
        dt.datetime.fromisoformat(timestamp)
    except ValueError:
        raise CheckpointInvalid(f"timestamp {timestamp!r} is not a valid date and time") from None
    return Checkpoint(origin=origin, size=int(size_text), root=root, timestamp=timestamp, text=text)


def _split_note(text: str) -> tuple[str, list[str]]:
    """Split a signed note into its text (with final newline) and its signature lines."""
    if not isinstance(text, str) or not text.endswith("\n"):
        raise CheckpointInvalid("checkpoint must be text ending in a newline")
    if any(ord(c) < 0x20 and c != "\n" for c in text):
        raise CheckpointInvalid("checkpoint contains control characters")
    separator = text.rfind("\n\n")
    if separator < 0:
        raise CheckpointInvalid("checkpoint has no blank line before its signatures")
    lines = text[separator + 2:-1].split("\n")
    if not 1 <= len(lines) <= MAX_SIGNATURES:
        raise CheckpointInvalid(f"checkpoint must carry 1 to {MAX_SIGNATURES} signatures")
    return text[:separator + 1], lines


def _verify_signatures(
    body: str, lines: list[str], key_name: str, public_key: Ed25519PublicKey
) -> None:
    key_hash = note_key_hash(key_name, public_key)
    seen: list[str] = []
    verified = False
    for line in lines:
        if not line.startswith(SIGNATURE_PREFIX):
            raise CheckpointInvalid(f"signature line {line[:40]!r} does not start with '— '")
        name, _, encoded = line[len(SIGNATURE_PREFIX):].partition(" ")
        if not _KEY_NAME.match(name) or not encoded or " " in encoded:
            raise CheckpointInvalid(f"signature line {line[:40]!r} is malformed")
        blob = _strict_b64(encoded, "signature")
        if len(blob) < 5:
            raise CheckpointInvalid("signature is too short")
        seen.append(f"{name} (key hash {blob[:4].hex()})")
        if name != key_name or blob[:4] != key_hash:
            continue  # another key's signature (e.g. a witness): not ours to judge
        try:
            public_key.verify(blob[4:], body.encode("utf-8"))
        except InvalidSignature:
            raise CheckpointInvalid(f"its signature by node key {key_name} does not verify: the "
                                    "text was altered or the signature forged") from None
        verified = True
    if not verified:
        raise CheckpointInvalid(f"it is not signed by node key {key_name} (key hash "
                                f"{key_hash.hex()}); its signatures are by: {', '.join(seen)}")


def _strict_b64(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CheckpointInvalid(f"{what} is not valid base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise CheckpointInvalid(f"{what} is not canonical base64")
    return raw
