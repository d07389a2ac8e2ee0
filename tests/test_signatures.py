"""RFC 9421 verification: the published Ed25519 vector, and each refusal with its own
problem type."""

from __future__ import annotations

import base64
import datetime as dt
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from http_message_signatures import HTTPMessageVerifier, InvalidSignature, algorithms

from gateway.api.signatures import _HeaderView, _RequestView, _SingleKeyResolver, verify_request
from gateway.node.identity import RegisteredKey
from gateway.protocol.problems import Problem
from gateway.sdk.request_signing import signature_headers
from ledger import keys

# RFC 9421 Appendix B.1.4 test-key-ed25519 (public part) and B.2.6 request and signature.
RFC_PUBLIC_KEY_X = "JrQLj5P_89iXES9-vFgrIy29clF9CC_oPPsw3c5D0bs"
RFC_B26_HEADERS = [
    ("Host", "example.com"),
    ("Date", "Tue, 20 Apr 2021 02:07:55 GMT"),
    ("Content-Type", "application/json"),
    ("Content-Digest", "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNye"
                       "aldVLvRwEmTHWXvJwew==:"),
    ("Content-Length", "18"),
    ("Signature-Input", 'sig-b26=("date" "@method" "@path" "@authority" "content-type" '
                        '"content-length");created=1618884473;keyid="test-key-ed25519"'),
    ("Signature", "sig-b26=:wqcAqbmYJ2ji2glfAMaRy4gruYYnx2nEFN2HN6jrnDnQCK1u02Gb04v9EDgwUPiu4A0w6vuQ"
                  "v5lIp5WPpBKRCw==:"),
]

URL = "http://node.example/v1/jobs"
BODY = b'{"dataset":"demo"}'


def _rfc_public_key() -> Ed25519PublicKey:
    raw = base64.urlsafe_b64decode(RFC_PUBLIC_KEY_X + "=" * (-len(RFC_PUBLIC_KEY_X) % 4))
    return Ed25519PublicKey.from_public_bytes(raw)


def test_rfc9421_b26_ed25519_vector_verifies_with_the_wire_format_we_use() -> None:
    key = RegisteredKey("test-key-ed25519", "rfc", "researcher", _rfc_public_key(), False)
    verifier = HTTPMessageVerifier(signature_algorithm=algorithms.ED25519,
                                   key_resolver=_SingleKeyResolver(key))
    message = _RequestView("POST", "https://example.com/foo?param=Value&Pet=dog",
                           _HeaderView(RFC_B26_HEADERS))
    results = verifier.verify(message, max_age=None)
    assert results[0].parameters["keyid"] == "test-key-ed25519"
    tampered = [(k, v.replace("18", "19")) if k == "Content-Length" else (k, v)
                for k, v in RFC_B26_HEADERS]
    with pytest.raises(InvalidSignature):
        verifier.verify(_RequestView("POST", "https://example.com/foo", _HeaderView(tampered)),
                        max_age=None)


@pytest.fixture
def alice():  # type: ignore[no-untyped-def]
    private_key = keys.generate_private_key()
    registered = RegisteredKey(keys.key_id(private_key.public_key()), "alice", "researcher",
                               private_key.public_key(), False)
    return private_key, registered


def _verify(headers: dict[str, str], registered: RegisteredKey, *, method: str = "POST",
            url: str = URL, body: bytes = BODY, now: float | None = None):  # type: ignore[no-untyped-def]
    return verify_request(method=method, url=url, headers=list(headers.items()), body=body,
                          lookup_key=lambda k: registered if k == registered.key_id else None,
                          now=time.time() if now is None else now)


def _signed(private_key, **overrides):  # type: ignore[no-untyped-def]
    args = {"private_key": private_key, "method": "POST", "url": URL, "body": BODY,
            "content_type": "application/json", **overrides}
    return signature_headers(**args)


def _slug(call) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(Problem) as info:
        call()
    return info.value.slug


def test_valid_request_is_accepted(alice) -> None:  # type: ignore[no-untyped-def]
    private_key, registered = alice
    verified = _verify(_signed(private_key), registered)
    assert verified.principal == "alice" and verified.nonce


def test_each_defect_is_refused_with_its_own_problem_type(alice) -> None:  # type: ignore[no-untyped-def]
    private_key, registered = alice
    good = _signed(private_key)
    no_digest = {k: v for k, v in good.items() if k != "Content-Digest"}
    old = _signed(private_key, now=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=900))
    future = _signed(private_key, now=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=120))
    other = keys.generate_private_key()
    cases = {
        "signature-missing": lambda: _verify({"Content-Type": "application/json"}, registered),
        "revoked-key": lambda: _verify(good, RegisteredKey(registered.key_id, "alice",
                                                           "researcher", registered.public_key,
                                                           True)),
        "signature-invalid": lambda: _verify(_signed(other, key_id=registered.key_id), registered),
        "digest-mismatch": lambda: _verify(good, registered, body=BODY + b" "),
        "digest-missing": lambda: _verify(no_digest, registered),
        "signature-expired": lambda: _verify(old, registered),
        "signature-from-future": lambda: _verify(future, registered),
    }
    assert {expected: _slug(call) for expected, call in cases.items()} == {
        expected: expected for expected in cases
    }
    assert _slug(lambda: _verify(good, registered, url=URL + "?x=1")) == "signature-invalid"
    assert _slug(lambda: _verify(good, registered, method="PUT")) == "signature-invalid"


def test_expired_nonces_are_pruned_and_live_ones_kept(db_url: str) -> None:
    from ledger.db import create_schema, make_engine, session
    from ledger.registry import prune_nonces, remember_nonce

    engine = make_engine(db_url)
    create_schema(engine)
    now = time.time()
    with session(engine) as s, s.begin():
        assert remember_nonce(s, key_id="k-1", nonce="old", expires_at=now - 1)
        assert remember_nonce(s, key_id="k-1", nonce="live", expires_at=now + 300)
        assert not remember_nonce(s, key_id="k-1", nonce="live", expires_at=now + 300)
        assert prune_nonces(s, now) == 1
        assert not remember_nonce(s, key_id="k-1", nonce="live", expires_at=now + 300)
    engine.dispose()


def test_unknown_key_and_forged_signature_are_indistinguishable(alice) -> None:  # type: ignore[no-untyped-def]
    """An outsider probing key ids learns nothing: an unregistered key id, a registered one
    with a signature by another key, and a revoked one with a signature by another key give the
    same problem, type and detail alike."""
    _, registered = alice
    stranger = keys.generate_private_key()
    revoked = RegisteredKey(registered.key_id, "alice", "researcher", registered.public_key, True)

    def refusal(headers: dict[str, str], key: RegisteredKey) -> tuple[str, str]:
        with pytest.raises(Problem) as info:
            _verify(headers, key)
        return info.value.slug, info.value.detail

    forged = _signed(stranger, key_id=registered.key_id)
    outcomes = {refusal(_signed(stranger), registered), refusal(forged, registered),
                refusal(forged, revoked)}
    assert len(outcomes) == 1 and next(iter(outcomes))[0] == "signature-invalid"


def test_oversized_nonce_is_refused_before_it_is_stored(alice) -> None:  # type: ignore[no-untyped-def]
    private_key, registered = alice
    assert _slug(lambda: _verify(_signed(private_key, nonce="n" * 15_000),
                                 registered)) == "signature-malformed"
    assert _slug(lambda: _verify(_signed(private_key, nonce="n" * 65),
                                 registered)) == "signature-malformed"
    assert _verify(_signed(private_key, nonce="n" * 64), registered).nonce == "n" * 64


def test_oversized_signature_headers_are_refused(alice) -> None:  # type: ignore[no-untyped-def]
    private_key, registered = alice
    headers = _signed(private_key)
    padded = {**headers, "Signature-Input": headers["Signature-Input"] + ", pad=" + "a" * 5000}
    assert _slug(lambda: _verify(padded, registered)) == "signature-malformed"


def test_headers_verify_before_the_body_is_read(alice) -> None:  # type: ignore[no-untyped-def]
    """The signature, with the digest it covers, verifies from the headers alone; the body is
    checked later against that digest."""
    import hashlib

    from gateway.api.signatures import verify_body_digest, verify_signature

    private_key, registered = alice
    verified = verify_signature(method="POST", url=URL, headers=list(_signed(private_key).items()),
                                declares_body=True,
                                lookup_key=lambda k: registered if k == registered.key_id else None,
                                now=time.time())
    verify_body_digest(verified, hashlib.sha256(BODY).digest(), len(BODY))
    assert _slug(lambda: verify_body_digest(verified, hashlib.sha256(b"x").digest(), 1)) == \
        "digest-mismatch"
