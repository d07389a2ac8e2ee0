"""Property tests: arbitrary input to the signature and digest parsers and to job-parameter
validation yields only clean refusals (``Problem``), never another exception."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.signatures import verify_request
from gateway.node.admission import JobRequest
from gateway.node.identity import RegisteredKey
from gateway.protocol.problems import Problem
from gateway.sdk.request_signing import signature_headers
from ledger import keys

KEY = keys.generate_private_key()
REGISTERED = RegisteredKey(keys.key_id(KEY.public_key()), "alice", "researcher",
                           KEY.public_key(), False)
URL = "http://node.example/v1/estimate"
BODY = b'{"dataset":"demo"}'
GOOD = signature_headers(private_key=KEY, method="POST", url=URL, body=BODY,
                         content_type="application/json")
header_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=300)


def _outcome(headers: dict[str, str], body: bytes = BODY) -> str:
    try:
        verify_request(method="POST", url=URL, headers=list(headers.items()), body=body,
                       lookup_key=lambda k: REGISTERED if k == REGISTERED.key_id else None,
                       now=time.time())
    except Problem as problem:
        assert problem.status == 401
        return problem.slug
    return "accepted"


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(["Signature-Input", "Signature", "Content-Digest", "Content-Type"]),
       value=header_text)
def test_any_single_corrupted_header_is_refused_cleanly(name: str, value: str) -> None:
    headers = {**GOOD, name: value}
    outcome = _outcome(headers)
    if value != GOOD.get(name):
        assert outcome != "accepted" or (name == "Content-Type" and value == "application/json")


@settings(max_examples=200, deadline=None)
@given(headers=st.dictionaries(st.sampled_from(["Signature-Input", "Signature",
                                                "Content-Digest", "Content-Type", "X-Other"]),
                               header_text, max_size=5),
       body=st.binary(max_size=200))
def test_arbitrary_headers_and_bodies_never_crash_the_verifier(headers: dict[str, str],
                                                               body: bytes) -> None:
    assert _outcome(headers, body) != "accepted"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10),
                                                                      children, max_size=3),
    max_leaves=10,
)
FIELDS = ["dataset", "model_digest", "rounds", "clients_per_round", "noise_multiplier", "clip",
          "client_learning_rate", "server_learning_rate", "server_momentum", "local_epochs",
          "batch_size", "evaluate", "idempotency_key", "unknown"]


@settings(max_examples=300, deadline=None)
@given(data=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8) | json_values)
def test_job_parameter_validation_refuses_garbage_with_invalid_request(data: object) -> None:
    try:
        JobRequest.from_json(data)
    except Problem as problem:
        assert problem.slug == "invalid-request"


def test_a_model_digest_cannot_name_a_path() -> None:
    import pytest

    base = {"dataset": "demo", "rounds": 1, "clients_per_round": 1, "noise_multiplier": 1.0,
            "clip": 1.0}
    sneaky = "sha256:" + "../../node.key".ljust(64, "a")
    with pytest.raises(Problem) as refused:
        JobRequest.from_json({**base, "model_digest": sneaky})
    assert refused.value.extra["field"] == "model_digest"
