"""Signed checkpoints: the signed-note wire format checked against the Go
golang.org/x/mod/sumdb/note known-answer vector; any altered character, another key, or
a malformed body is refused."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger import keys
from ledger.checkpoints import (
    CheckpointInvalid,
    note_key_hash,
    parse_and_verify_checkpoint,
    sign_checkpoint,
    sign_note,
)
from ledger.merkle import leaf_hash

# golang.org/x/mod/sumdb/note example: signer key (after the 0x01 algorithm byte, the
# 32-byte Ed25519 seed), verifier key, text and the resulting signed note.
GO_SIGNER_KEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VERIFIER_KEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = ("If you think cryptography is the answer to your problem,\n"
           "then you don't know what your problem is.\n")
GO_NOTE = GO_TEXT + ("\n— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZ"
                     "SNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n")

ROOT = leaf_hash(b"root")
TIMESTAMP = "2026-11-25T10:42:00.123456Z"


def go_signer() -> Ed25519PrivateKey:
    encoded = base64.b64decode(GO_SIGNER_KEY.split("+", 4)[4])
    assert encoded[0] == 1  # Ed25519
    return Ed25519PrivateKey.from_private_bytes(encoded[1:])


@pytest.fixture(scope="module")
def node_key() -> Ed25519PrivateKey:
    return keys.generate_private_key()


def checkpoint_text(key: Ed25519PrivateKey, size: int = 42) -> str:
    return sign_checkpoint(key, keys.key_id(key.public_key()), size, ROOT, TIMESTAMP)


def test_note_signature_matches_the_go_sumdb_note_vector() -> None:
    signer = go_signer()
    name, key_hash, verifier = GO_VERIFIER_KEY.split("+")
    assert note_key_hash(name, signer.public_key()).hex() == key_hash
    assert base64.b64decode(verifier) == b"\x01" + keys.raw_public_bytes(signer.public_key())
    assert sign_note(signer, "PeterNeumann", GO_TEXT) == GO_NOTE


def test_checkpoint_text_is_origin_size_root_timestamp_then_signature(node_key) -> None:
    key_id = keys.key_id(node_key.public_key())
    text = checkpoint_text(node_key)
    body, signature = text.split("\n\n")
    assert body.split("\n") == [key_id, "42", base64.b64encode(ROOT).decode(), TIMESTAMP]
    assert signature.startswith(f"— {key_id} ") and signature.endswith("\n")
    checkpoint = parse_and_verify_checkpoint(text, node_key.public_key())
    assert (checkpoint.origin, checkpoint.size, checkpoint.root, checkpoint.timestamp) == (
        key_id, 42, ROOT, TIMESTAMP)


def test_any_altered_character_is_refused(node_key) -> None:
    text = checkpoint_text(node_key)
    for position, char in enumerate(text):
        altered = text[:position] + ("A" if char != "A" else "B") + text[position + 1:]
        with pytest.raises(CheckpointInvalid):
            parse_and_verify_checkpoint(altered, node_key.public_key())


def test_checkpoint_resigned_by_another_key_under_the_node_origin_is_refused(node_key) -> None:
    forger = keys.generate_private_key()
    key_id = keys.key_id(node_key.public_key())
    body = checkpoint_text(node_key).split("\n\n")[0] + "\n"
    forged = sign_note(forger, key_id, body)
    with pytest.raises(CheckpointInvalid, match=f"not signed by node key {key_id}"):
        parse_and_verify_checkpoint(forged, node_key.public_key())


def test_checkpoint_of_another_node_is_refused(node_key) -> None:
    other = keys.generate_private_key()
    with pytest.raises(CheckpointInvalid, match="not signed by node key"):
        parse_and_verify_checkpoint(checkpoint_text(other), node_key.public_key())


def test_signatures_by_other_keys_are_ignored_as_cosignatures(node_key) -> None:
    witness = keys.generate_private_key()
    text = checkpoint_text(node_key)
    body = text.split("\n\n")[0] + "\n"
    cosigned = text + sign_note(witness, "witness.example", body).split("\n\n")[1]
    assert parse_and_verify_checkpoint(cosigned, node_key.public_key()).size == 42


@pytest.mark.parametrize("body_lines", [
    ["{origin}", "042", "{root}", TIMESTAMP],
    ["{origin}", "-1", "{root}", TIMESTAMP],
    ["{origin}", "42", "{root}", "2026-11-25 10:42:00"],
    ["{origin}", "42", "{root}", "2026-13-45T10:42:00Z"],
    ["{origin}", "42", base64.b64encode(b"short").decode(), TIMESTAMP],
    ["{origin}", "42", "{root}"],
    ["{origin}", "42", "{root}", TIMESTAMP, "extension"],
    ["k-someoneelse", "42", "{root}", TIMESTAMP],
])
def test_malformed_but_validly_signed_bodies_are_refused(node_key, body_lines: list[str]) -> None:
    key_id = keys.key_id(node_key.public_key())
    body = "\n".join(body_lines).format(origin=key_id, root=base64.b64encode(ROOT).decode()) + "\n"
    with pytest.raises(CheckpointInvalid):
        parse_and_verify_checkpoint(sign_note(node_key, key_id, body), node_key.public_key())


def test_signing_with_a_key_id_of_another_key_is_a_programming_error(node_key) -> None:
    with pytest.raises(ValueError, match="does not belong"):
        sign_checkpoint(node_key, "k-0000000000000000", 1, ROOT, TIMESTAMP)
