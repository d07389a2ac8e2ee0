"""RFC 9421 verification: the published Ed25519 vector over the signature base the gateway
builds, the same verdicts as the http-message-signatures library (which the SDK signs with)
on requests signed and then altered in each way that matters, and each refusal with its own
problem type."""

from __future__ import annotations

import base64
import datetime as dt
import time
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from http_message_signatures import (
    HTTPMessageSigner,
    HTTPMessageVerifier,
    HTTPSignatureKeyResolver,
    algorithms,
)
from http_message_signatures.exceptions import HTTPMessageSignaturesException

from gateway.api.signatures import (
    _field_lines,
    _parse_dictionary,
    _Signature,
    _signature_base,
    verify_request,
    verify_signature,
)
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


def test_rfc9421_b26_ed25519_vector_verifies_over_the_signature_base_we_build() -> None:
    fields = _field_lines(RFC_B26_HEADERS)
    covered, params = _parse_dictionary(fields["signature-input"][0])["sig-b26"]
    signed = _Signature(tuple(name for name, _ in covered), dict(params),
                        _parse_dictionary(fields["signature"][0])["sig-b26"][0])
    url = "https://example.com/foo?param=Value&Pet=dog"
    base = _signature_base(signed, method="POST", url=url, fields=fields)
    assert base.decode().splitlines()[:4] == [
        '"date": Tue, 20 Apr 2021 02:07:55 GMT', '"@method": POST', '"@path": /foo',
        '"@authority": example.com']
    _rfc_public_key().verify(signed.signature, base)  # raises if it does not verify
    tampered = _field_lines([(k, v.replace("18", "19")) if k == "Content-Length" else (k, v)
                             for k, v in RFC_B26_HEADERS])
    with pytest.raises(InvalidSignature):
        _rfc_public_key().verify(signed.signature, _signature_base(
            signed, method="POST", url=url, fields=tampered))


class _Message:
    """A request as the library signs and verifies it."""

    def __init__(self, method: str, url: str, headers: list[tuple[str, str]]) -> None:
        self.method, self.url, self.headers = method, url, _Headers(headers)


class _Headers:
    """Header field lines in wire order, in the shape the library reads."""

    def __init__(self, lines: list[tuple[str, str]]) -> None:
        self.lines = list(lines)

    def items(self) -> list[tuple[str, str]]:
        return list(self.lines)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(dict.fromkeys(name for name, _ in self.lines))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(k.lower() == name.lower() for k, _ in self.lines)

    def __getitem__(self, name: str) -> str:
        values = [v for k, v in self.lines if k.lower() == name.lower()]
        if not values:
            raise KeyError(name)
        return ", ".join(values)

    def __setitem__(self, name: str, value: str) -> None:
        self.lines = [(k, v) for k, v in self.lines if k.lower() != name.lower()] + [(name, value)]

    def __delitem__(self, name: str) -> None:
        self.lines = [(k, v) for k, v in self.lines if k.lower() != name.lower()]

    def get(self, name: str, default: str | None = None) -> str | None:
        try:
            return self[name]
        except KeyError:
            return default


class _Keys(HTTPSignatureKeyResolver):
    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self.private_key = private_key

    def resolve_public_key(self, key_id: str) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def resolve_private_key(self, key_id: str) -> Ed25519PrivateKey:
        return self.private_key


SIGNED_URL = "https://node.example:443/v1/jobs?page=2"


def _library_signed(private_key: Ed25519PrivateKey, components: tuple[str, ...],
                    lines: list[tuple[str, str]], *, method: str = "POST",
                    url: str = SIGNED_URL) -> _Message:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    message = _Message(method, url, lines)
    HTTPMessageSigner(signature_algorithm=algorithms.ED25519, key_resolver=_Keys(private_key)).sign(
        message, key_id="k1", created=now, expires=now + dt.timedelta(seconds=60),
        nonce="n-1", label="fedgate", tag="fedgate", covered_component_ids=components)
    return message


def _verdicts(private_key: Ed25519PrivateKey, message: _Message) -> tuple[bool, bool]:
    """(the library accepts, the gateway accepts) the signed ``message``."""
    try:
        HTTPMessageVerifier(signature_algorithm=algorithms.ED25519,
                            key_resolver=_Keys(private_key)).verify(
            message, max_age=None, expect_tag="fedgate",
            require_components=("@method", "@target-uri"))
        library = True
    except HTTPMessageSignaturesException:
        library = False
    registered = RegisteredKey("k1", "alice", "researcher", private_key.public_key(), False)
    try:
        verify_signature(method=message.method, url=message.url, headers=message.headers.items(),
                         declares_body=False, lookup_key=lambda k: registered, now=time.time())
        ours = True
    except Problem:
        ours = False
    return library, ours


BASE_LINES = [("Content-Type", "application/json"), ("X-Trace", "a"), ("X-Trace", "b\t c")]
ALTERATIONS: dict[str, tuple[tuple[str, ...], Callable[[_Message], Any]]] = {
    "as signed": (("@method", "@target-uri"), lambda m: None),
    "as signed, every derived component and headers": (
        ("@method", "@target-uri", "@authority", "@scheme", "@request-target", "@path",
         "@query", "content-type", "x-trace"), lambda m: None),
    "method changed": (("@method", "@target-uri"), lambda m: setattr(m, "method", "PUT")),
    "query changed": (("@method", "@target-uri"),
                      lambda m: setattr(m, "url", SIGNED_URL.replace("=2", "=3"))),
    "default port left out (@authority is the same, @target-uri is not)": (
        ("@method", "@authority", "@target-uri"),
        lambda m: setattr(m, "url", SIGNED_URL.replace(":443", ""))),
    "covered header changed": (("@method", "@target-uri", "content-type"),
                               lambda m: m.headers.__setitem__("Content-Type", "text/plain")),
    "covered header removed": (("@method", "@target-uri", "content-type"),
                               lambda m: m.headers.__delitem__("Content-Type")),
    "a field line of a covered header dropped": (
        ("@method", "@target-uri", "x-trace"),
        lambda m: setattr(m.headers, "lines", m.headers.lines[:-1])),
    "covered header folded (obs-fold) and padded": (
        ("@method", "@target-uri", "content-type"),
        lambda m: m.headers.__setitem__("Content-Type", "  application/json\r\n ")),
    "uncovered header changed": (("@method", "@target-uri"),
                                 lambda m: m.headers.__setitem__("X-Trace", "z")),
    "a parameter changed": (("@method", "@target-uri"), lambda m: m.headers.__setitem__(
        "Signature-Input", m.headers["Signature-Input"].replace('nonce="n-1"', 'nonce="n-2"'))),
    "a parameter added": (("@method", "@target-uri"), lambda m: m.headers.__setitem__(
        "Signature-Input", m.headers["Signature-Input"] + ';extra="x"')),
    "labels differ between the two fields": (("@method", "@target-uri"), lambda m: m.headers.__setitem__(
        "Signature", m.headers["Signature"].replace("fedgate=", "other="))),
    "signature truncated": (("@method", "@target-uri"), lambda m: m.headers.__setitem__(
        "Signature", m.headers["Signature"][:20] + ":")),
    "required component not covered": (("@target-uri",), lambda m: None),
}


@pytest.mark.parametrize("alteration", ALTERATIONS)
def test_the_gateway_and_the_signing_library_agree_on_every_alteration(alteration: str) -> None:
    private_key = keys.generate_private_key()
    components, alter = ALTERATIONS[alteration]
    message = _library_signed(private_key, components, list(BASE_LINES))
    alter(message)
    library, ours = _verdicts(private_key, message)
    assert ours == library, f"library {library}, gateway {ours}"
    assert ours == alteration.startswith(("as signed", "uncovered", "covered header folded"))


def test_a_covered_component_with_parameters_is_refused_though_rfc_9421_defines_some() -> None:
    """No fedgate client sends component parameters (``;sf``, ``;key``, ``;bs``), so the gateway
    builds no signature base for them: refused, where the library would verify."""
    private_key = keys.generate_private_key()
    message = _library_signed(private_key, ("@method", "@target-uri", '"content-type";sf'),
                              list(BASE_LINES))
    assert _verdicts(private_key, message) == (True, False)


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
