"""Federation, pure parts: node lists, aggregation of node releases, the composition identity
behind the up-front admission, and the signed federation manifest (no nodes, no TFF)."""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.federation.core import (
    FEDERATION_FORMAT,
    Aggregation,
    FederationManifestInvalid,
    NodeListInvalid,
    aggregate,
    contribution,
    federation_cost_rounds,
    local_job_parameters,
    model_digest,
    parse_nodes_toml,
    sign_federation_manifest,
    verify_federation_manifest,
)
from ledger import accounting, keys
from ledger.canonical import canonical_json

NODES_TOML = """
[[node]]
name = "clinic-a"
url = "http://127.0.0.1:8621"
node_key = "a/node.pub"
dataset = "demo"

[[node]]
name = "clinic-b"
url = "https://b.example.org/fedgate"
node_key = "/etc/fedgate/b.pub"
dataset = "notes"
clients_per_round = 40
"""


def test_nodes_toml_resolves_keys_relative_to_the_file_and_keeps_overrides() -> None:
    a, b = parse_nodes_toml(NODES_TOML, Path("/work/fed"))
    assert (a.name, a.url, a.node_key, a.dataset, dict(a.overrides)) == (
        "clinic-a", "http://127.0.0.1:8621", Path("/work/fed/a/node.pub"), "demo", {})
    assert b.node_key == Path("/etc/fedgate/b.pub") and dict(b.overrides) == {"clients_per_round": 40}


@pytest.mark.parametrize("text, message", [
    ("", "one or more [[node]]"),
    ('[[node]]\nname = "a"\nurl = "http://x"\nnode_key = "k"\n', "dataset"),
    ('[[node]]\nname = "a"\nurl = "ftp://x"\nnode_key = "k"\ndataset = "d"\n', "url"),
    ('[[node]]\nname = "a"\nurl = "http://x"\nnode_key = "k"\ndataset = "d"\nnoise = 1\n',
     "unknown fields noise"),
    ('[[node]]\nname = "a"\nurl = "http://x"\nnode_key = "k"\ndataset = "d"\n'
     '[[node]]\nname = "a"\nurl = "http://y"\nnode_key = "k"\ndataset = "d"\n', "unique"),
    ('[[node]]\nname = "a"\nurl = "http://x"\nnode_key = "k"\ndataset = "d"\n'
     'clients_per_round = -1\n', "clients_per_round"),
])
def test_a_malformed_nodes_file_is_refused_with_the_field(text: str, message: str) -> None:
    with pytest.raises(NodeListInvalid, match=message.replace("[", r"\[")):
        parse_nodes_toml(text, Path("."))


def test_local_jobs_never_run_dp_evaluation_and_refuse_unknown_parameters() -> None:
    job = {"rounds": 5, "clients_per_round": 50, "noise_multiplier": 1.0, "clip": 1.0}
    assert local_job_parameters(job, {"clients_per_round": 20}) == {
        **job, "clients_per_round": 20, "evaluate": False}
    with pytest.raises(ValueError, match="evaluate"):
        local_job_parameters({**job, "evaluate": True})
    with pytest.raises(ValueError, match="missing job parameters: clip"):
        local_job_parameters({k: v for k, v in job.items() if k != "clip"})


def test_k_training_jobs_of_t_rounds_cost_what_one_job_of_k_t_rounds_costs() -> None:
    """The identity the up-front admission estimate relies on (RDP adds under composition)."""
    q, z, outer, local = 0.05, 0.9, 4, 7
    one_job = accounting.JobCost.for_job(sampling_rate=q, noise_multiplier=z, rounds=local,
                                         evaluation_noise_multiplier=None).rdp()
    composed = [outer * r for r in one_job]
    whole = accounting.JobCost.for_job(
        sampling_rate=q, noise_multiplier=z,
        rounds=federation_cost_rounds(outer_rounds=outer, local_rounds=local),
        evaluation_noise_multiplier=None).rdp()
    assert composed == pytest.approx(whole, rel=1e-12)
    # With DP evaluation in every job the identity fails, which is why federations skip it.
    with_eval = accounting.JobCost.for_job(sampling_rate=q, noise_multiplier=z, rounds=local,
                                           evaluation_noise_multiplier=0.5).rdp()
    assert [outer * r for r in with_eval] != pytest.approx(whole, rel=1e-6)


def test_the_filter_admits_exactly_as_many_outer_rounds_as_the_estimate_says() -> None:
    budget = accounting.filter_budget(epsilon_total=3.0, delta=1e-5)
    cost = accounting.JobCost.for_job(sampling_rate=0.1, noise_multiplier=1.0, rounds=10,
                                      evaluation_noise_multiplier=None).rdp()
    fit = accounting.jobs_that_fit(spent=accounting.zero(), cost=cost, budget=budget)
    spent = accounting.zero()
    for _ in range(fit):
        assert accounting.admits(spent=spent, cost=cost, budget=budget)
        spent = accounting.add(spent, cost)
    assert not accounting.admits(spent=spent, cost=cost, budget=budget)


def test_aggregation_is_the_weighted_mean_of_node_models_by_default() -> None:
    g = [np.zeros((2, 2), np.float32), np.ones(2, np.float32)]
    a = [np.full((2, 2), 2.0, np.float32), np.full(2, 3.0, np.float32)]
    b = [np.full((2, 2), 4.0, np.float32), np.full(2, -1.0, np.float32)]
    weights = Aggregation("users").node_weights([300, 100])
    assert weights == [0.75, 0.25]
    out = aggregate(g, [a, b], weights)
    assert out[0].dtype == np.float32
    np.testing.assert_allclose(out[0], 2.5)
    np.testing.assert_allclose(out[1], 2.0)
    half = aggregate(g, [a, b], Aggregation("mean").node_weights([300, 100]),
                     server_learning_rate=0.5)
    np.testing.assert_allclose(half[0], 1.5)  # g + 0.5 * (mean − g)


def test_aggregation_weights_use_public_counts_and_never_drop_a_small_node() -> None:
    assert Aggregation("users").node_weights([0, 100]) == pytest.approx([1 / 101, 100 / 101])
    assert Aggregation("mean").node_weights([0, 100]) == [0.5, 0.5]
    with pytest.raises(ValueError):
        Aggregation("median")


def test_aggregation_refuses_mismatched_shapes_and_non_finite_results() -> None:
    g = [np.zeros(3, np.float32)]
    with pytest.raises(ValueError, match="shapes"):
        aggregate(g, [[np.zeros(4, np.float32)]], [1.0])
    with pytest.raises(ValueError, match="finite"):
        aggregate(g, [[np.full(3, np.inf, np.float32)]], [1.0])


# --- the signed manifest ------------------------------------------------------------------

NODE_KEYS = {name: keys.generate_private_key() for name in ("a", "b", "c")}


def _release(node: str, job_id: str, model: str, epsilon: float) -> dict[str, Any]:
    key = NODE_KEYS[node]
    manifest = {"job_id": job_id, "dataset": "demo", "model_digest": model, "epsilon": epsilon,
                "delta": 1e-5, "weights_digest": "sha256:" + job_id[-1] * 64,
                "node_key_id": keys.key_id(key.public_key()), "parameters": {"rounds": 3}}
    return {"manifest": manifest,
            "signature": base64.b64encode(key.sign(canonical_json(manifest))).decode()}


def _federation(coordinator: Any) -> dict[str, Any]:
    m0, m1, m2 = (model_digest({"weights": [i]}) for i in range(3))
    rounds = [
        {"round": 1, "model_digest": m0, "dropped": [], "aggregate_model_digest": m1,
         "contributions": [contribution("a", _release("a", "job-a1", m0, 0.5)),
                           contribution("b", _release("b", "job-b1", m0, 0.7))]},
        {"round": 2, "model_digest": m1, "dropped": [], "aggregate_model_digest": m2,
         "contributions": [contribution("a", _release("a", "job-a2", m1, 0.5)),
                           contribution("b", _release("b", "job-b2", m1, 0.7))]},
    ]
    nodes = [{"name": n, "dataset": "demo", "admitted": n != "c",
              "node_key_id": keys.key_id(NODE_KEYS[n].public_key()),
              "contributions": 0 if n == "c" else 2} for n in ("a", "b", "c")]
    manifest = {"format": FEDERATION_FORMAT, "federation_id": "fed-test",
                "coordinator_key_id": keys.key_id(coordinator.public_key()),
                "status": "completed", "parameters": {"outer_rounds": 2}, "nodes": nodes,
                "initial_model_digest": m0, "rounds": rounds, "final_model_digest": m2}
    return sign_federation_manifest(manifest, coordinator)


def _node_public_keys() -> dict[str, Any]:
    return {n: k.public_key() for n, k in NODE_KEYS.items()}


def test_a_federation_manifest_verifies_with_the_coordinator_and_node_keys() -> None:
    coordinator = keys.generate_private_key()
    document = _federation(coordinator)
    manifest = verify_federation_manifest(document, coordinator.public_key(), _node_public_keys())
    assert manifest["final_model_digest"] == document["manifest"]["rounds"][-1]["aggregate_model_digest"]


def test_a_tampered_federation_manifest_does_not_verify() -> None:
    coordinator = keys.generate_private_key()
    document = _federation(coordinator)
    document["manifest"]["rounds"][0]["contributions"][0]["epsilon"] = 0.01
    with pytest.raises(FederationManifestInvalid, match="signature"):
        verify_federation_manifest(document, coordinator.public_key())


def test_a_manifest_signed_by_another_key_does_not_verify() -> None:
    document = _federation(keys.generate_private_key())
    with pytest.raises(FederationManifestInvalid, match="signature"):
        verify_federation_manifest(document, keys.generate_private_key().public_key())


def _resigned(coordinator: Any, change: Any) -> dict[str, Any]:
    """A manifest altered and re-signed by the coordinator itself: its own signature holds,
    so only the consistency checks can catch the lie."""
    manifest = copy.deepcopy(_federation(coordinator)["manifest"])
    change(manifest)
    return sign_federation_manifest(manifest, coordinator)


def _understate_epsilon(m: dict[str, Any]) -> None:
    m["rounds"][0]["contributions"][1]["epsilon"] = 0.01


def _forge_release(m: dict[str, Any]) -> None:
    item = m["rounds"][1]["contributions"][0]
    item["release_manifest"]["epsilon"] = item["epsilon"] = 0.01
    item["release_manifest_digest"] = contribution("a", {
        "manifest": item["release_manifest"], "signature": item["release_signature"]})[
        "release_manifest_digest"]


def _break_chain(m: dict[str, Any]) -> None:
    m["rounds"][1]["model_digest"] = m["initial_model_digest"]


def _swap_final(m: dict[str, Any]) -> None:
    m["final_model_digest"] = m["initial_model_digest"]


def _credit_denied_node(m: dict[str, Any]) -> None:
    m["rounds"][0]["contributions"][0]["node"] = "c"


def _drop_round(m: dict[str, Any]) -> None:
    m["rounds"].pop()
    m["final_model_digest"] = m["rounds"][-1]["aggregate_model_digest"]


@pytest.mark.parametrize("change, message", [
    (_understate_epsilon, "release says epsilon"),
    (_forge_release, "release signature does not verify"),
    (_break_chain, "did not start from the previous"),
    (_swap_final, "final_model_digest"),
    (_credit_denied_node, "not admitted"),
    (_drop_round, "every outer round"),
])
def test_a_resigned_but_inconsistent_manifest_does_not_verify(change: Any, message: str) -> None:
    coordinator = keys.generate_private_key()
    document = _resigned(coordinator, change)
    with pytest.raises(FederationManifestInvalid, match=message):
        verify_federation_manifest(document, coordinator.public_key(), _node_public_keys())


def test_node_signatures_are_checked_only_against_the_keys_the_verifier_trusts() -> None:
    coordinator = keys.generate_private_key()
    document = _federation(coordinator)
    wrong = {**_node_public_keys(), "b": keys.generate_private_key().public_key()}
    with pytest.raises(FederationManifestInvalid, match="not the one that signed"):
        verify_federation_manifest(document, coordinator.public_key(), wrong)
    with pytest.raises(FederationManifestInvalid, match="no public key given for node a"):
        verify_federation_manifest(document, coordinator.public_key(), {})


# --- docs/federation.md stays true to the code -------------------------------------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "federation.md"


def _fences(language: str) -> list[str]:
    import re

    return [m["body"] for m in re.finditer(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$",
                                           DOC.read_text(), re.M | re.S)
            if m["info"].strip().split(" ")[0] == language]


def test_the_federation_guide_nodes_file_parses() -> None:
    (text,) = _fences("toml")
    nodes = parse_nodes_toml(text, Path("/alice"))
    assert [n.name for n in nodes] == ["hospital-a", "hospital-b", "hospital-c"]
    assert nodes[1].overrides == {"clients_per_round": 40}


def test_every_fedgate_command_in_the_federation_guide_parses() -> None:
    import shlex

    from gateway.cli import build_parser

    script = "\n".join(_fences("sh")).replace("\\\n", " ")
    commands = [line.strip() for line in script.splitlines() if line.strip().startswith("fedgate ")]
    assert len(commands) >= 10
    for command in commands:
        words = shlex.split(command)
        cut = next((i for i, w in enumerate(words) if w in {"&", "||", "&&", "|"}
                    or w.startswith(">") or (w[0].isdigit() and ">" in w)), len(words))
        build_parser().parse_args(words[1:cut])  # exits (fails the test) on a bad option


def test_the_federation_guide_names_only_modules_that_exist() -> None:
    import re

    repo = DOC.parent.parent
    modules = set(re.findall(r"\b((?:gateway|engine|ledger|tests)/(?:[a-z_]+/)*[a-z_]+\.py)\b",
                              DOC.read_text()))
    assert len(modules) >= 5 and not [m for m in sorted(modules) if not (repo / m).exists()]
