"""The node document: which key a node signs with, signed by that key.

A researcher's tools verify every release against the node public key the owner gave them
(``node.pub``). With the wrong file, that check fails only after the job ran and its ε was
charged. The node document lets the client find the mistake before it submits anything:
``GET /v1/node`` returns ``{"node": {...}, "signature": ...}`` where ``node`` is a
:class:`NodeDocument` (the node's key id, its raw public key and the owner's name) and
``signature`` is Ed25519 by the node key over its canonical JSON, exactly as a release
manifest is signed (``gateway.protocol.release``).

:func:`sign_node_document` (the node, ``gateway.api.app``) and :func:`verify_node_document`
(the SDK, before a submit) live side by side. Verification is against the key the client
trusts, never against the key the document presents: a document signed by another key is
refused as :class:`NodeKeyMismatch`, naming both key ids and what to fix. The document holds
no private data (the owner's name and a public key). Pure: the standard library,
``cryptography``, ``ledger.canonical`` and ``ledger.keys``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ledger import keys
from ledger.canonical import canonical_json

__all__ = ["NodeDocument", "NodeDocumentInvalid", "NodeKeyMismatch", "sign_node_document",
           "verify_node_document"]


class NodeDocumentInvalid(Exception):
    """The node's answer is not a node document signed by the key it names."""


class NodeKeyMismatch(NodeDocumentInvalid):
    """The node signs with another key than the node public key the client was given: every
    release it makes would be refused, so nothing should be submitted to it."""

    def __init__(self, *, node_key_id: str, expected_key_id: str, owner: str) -> None:
        super().__init__(
            f"the node at this URL signs with key {node_key_id} (owner {owner!r}), but your "
            f"node public key is {expected_key_id}: its releases would be refused, so nothing "
            f"was submitted. Ask the data owner for their node.pub (on the node: "
            f"NODE_DIR/node.pub, key id {node_key_id}) and point --node-key/FEDGATE_NODE_KEY "
            "at it, or check --url/FEDGATE_URL")
        self.node_key_id = node_key_id
        self.expected_key_id = expected_key_id
        self.owner = owner


@dataclass(frozen=True)
class NodeDocument:
    """What a node says about itself: the key id and raw public key (base64) it signs
    releases and checkpoints with, and its owner (the Casbin domain)."""

    node_key_id: str
    public_key: str
    owner: str

    @classmethod
    def for_key(cls, node_key: Ed25519PublicKey, owner: str) -> NodeDocument:
        return cls(node_key_id=keys.key_id(node_key), public_key=keys.public_key_b64(node_key),
                   owner=owner)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: object) -> NodeDocument:
        """Exactly these fields, all strings; the public key decodes and has the key id."""
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, Mapping) or set(data) != names:
            raise NodeDocumentInvalid(f"not a node document (expected the fields {sorted(names)})")
        if not all(isinstance(data[name], str) for name in names):
            raise NodeDocumentInvalid("a node document's fields are strings")
        document = cls(**{name: data[name] for name in names})
        try:
            presented = keys.public_key_from_b64(document.public_key)
        except (ValueError, binascii.Error) as exc:
            raise NodeDocumentInvalid(f"the node document's public key is malformed: {exc}") from None
        if keys.key_id(presented) != document.node_key_id:
            raise NodeDocumentInvalid("the node document's key id is not its public key's")
        return document


def sign_node_document(document: NodeDocument, node_key: Ed25519PrivateKey) -> dict[str, Any]:
    """``{"node", "signature"}``: ``document`` signed by ``node_key``, whose key it must name."""
    if document.node_key_id != keys.key_id(node_key.public_key()):
        raise ValueError("the node document must name the key that signs it")
    body = document.to_json()
    signature = node_key.sign(canonical_json(body))
    return {"node": body, "signature": base64.b64encode(signature).decode("ascii")}


def verify_node_document(signed: object, expected: Ed25519PublicKey) -> NodeDocument:
    """The node document in ``signed`` if the key the client trusts (``expected``) signed it.

    Raises :class:`NodeKeyMismatch` when the document names another key (the client was given
    the wrong ``node.pub``, or talks to the wrong node), and :class:`NodeDocumentInvalid` when
    the answer is malformed or its signature does not verify under ``expected``.
    """
    if not isinstance(signed, Mapping) or set(signed) != {"node", "signature"}:
        raise NodeDocumentInvalid("not a signed node document ({node, signature})")
    document = NodeDocument.from_json(signed["node"])
    expected_key_id = keys.key_id(expected)
    if document.node_key_id != expected_key_id:
        raise NodeKeyMismatch(node_key_id=document.node_key_id, expected_key_id=expected_key_id,
                              owner=document.owner)
    try:
        raw = base64.b64decode(signed["signature"], validate=True)
        expected.verify(raw, canonical_json(signed["node"]))
    except (ValueError, TypeError, binascii.Error, InvalidSignature):
        raise NodeDocumentInvalid(
            f"the node document names your node key {expected_key_id} but its signature does "
            "not verify under it: this is not that node, or the answer was altered") from None
    return document
