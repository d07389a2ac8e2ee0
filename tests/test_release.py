"""The release gate and the client's verification: only DP outputs leave, and a release
whose signature, manifest or weights were tampered with is refused by the client."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from engine.artifact import encode_array
from gateway.client import ReleaseVerificationFailed, verify_release
from gateway.node.release import ReleaseRefused, build_release, gate_engine_output
from ledger import keys
from ledger.models import Job

FIXTURES = Path(__file__).parent / "fixtures"
UPLOADED = json.loads((FIXTURES / "logreg-20x5.json").read_text())["weights"]
NODE_KEY = keys.generate_private_key()


def _release() -> dict:
    job = Job(id="job-1", dataset="demo", researcher_key_id="k-1", researcher="alice",
              request_digest="sha256:r", model_digest="sha256:m", spec='{"rounds":3}', cost="{}",
              cost_rdp="[]", epsilon=1.5, delta=1e-5, state="running", budget_state="reserved",
              rounds=3, policy_version="sha256:p", created_at=0.0, updated_at=0.0)
    weights, metrics = gate_engine_output({"weights": UPLOADED, "metrics": {"accuracy": 0.5}},
                                          UPLOADED)
    return build_release(job=job, weights=weights, metrics=metrics, node_key=NODE_KEY,
                         node_key_id=keys.key_id(NODE_KEY.public_key()))


def test_an_untampered_release_verifies() -> None:
    release = verify_release(_release(), NODE_KEY.public_key())
    assert release.epsilon == 1.5 and release.metrics == {"accuracy": 0.5}


@pytest.mark.parametrize("tamper", [
    lambda r: r["manifest"].__setitem__("epsilon", 0.1),
    lambda r: r["manifest"]["metrics"].__setitem__("accuracy", 0.99),
    lambda r: r.__setitem__("weights", [encode_array(__import__("numpy").ones((20, 5), "float32")),
                                        r["weights"][1]]),
    lambda r: r.__setitem__("signature", r["signature"][:-4] + "AAA="),
])
def test_a_tampered_release_is_refused_by_the_client(tamper) -> None:  # type: ignore[no-untyped-def]
    release = copy.deepcopy(_release())
    tamper(release)
    with pytest.raises(ReleaseVerificationFailed):
        verify_release(release, NODE_KEY.public_key())


def test_a_release_signed_by_another_key_is_refused() -> None:
    with pytest.raises(ReleaseVerificationFailed):
        verify_release(_release(), keys.generate_private_key().public_key())


@pytest.mark.parametrize("change", [
    lambda m: m.__setitem__("train_loss", 0.1),        # a field a release manifest has not
    lambda m: m.pop("accountant"),                     # a field it must have
    lambda m: m.__setitem__("epsilon", "1.5"),         # a wrong type
])
def test_a_correctly_signed_manifest_of_another_shape_is_refused(change) -> None:  # type: ignore[no-untyped-def]
    """The typed ReleaseManifest (gateway.protocol.release): the node signs exactly its fields,
    and a recipient accepts nothing else, even under a valid signature."""
    import base64

    from ledger.canonical import canonical_json

    release = copy.deepcopy(_release())
    change(release["manifest"])
    release["signature"] = base64.b64encode(
        NODE_KEY.sign(canonical_json(release["manifest"]))).decode()
    with pytest.raises(ReleaseVerificationFailed, match="manifest"):
        verify_release(release, NODE_KEY.public_key())


def test_the_node_cannot_sign_a_manifest_for_other_weights() -> None:
    from gateway.protocol.release import ReleaseManifest, sign_release

    release = _release()
    manifest = ReleaseManifest.from_json(release["manifest"])
    with pytest.raises(ValueError, match="weights_digest"):
        sign_release(manifest, release["weights"][:1], NODE_KEY)


@pytest.mark.parametrize("output", [
    {"weights": UPLOADED, "metrics": {"accuracy": 0.5}, "train_loss": 0.1},
    {"weights": UPLOADED, "metrics": {"num_examples": 120.0}},
    {"weights": UPLOADED, "metrics": {"accuracy": float("nan")}},
    {"weights": UPLOADED[:1], "metrics": {}},
])
def test_the_release_gate_refuses_anything_but_dp_weights_and_dp_metrics(output: dict) -> None:
    with pytest.raises(ReleaseRefused):
        gate_engine_output(output, UPLOADED)
