"""Cross-silo federation across fedgate nodes: node lists, aggregation and the signed manifest.

Pure values and functions; no I/O (the coordinator that talks to the nodes is
``gateway.federation.coordinator``). The privacy contract this module relies on, proved per node
in docs/federation.md:

* Every input to ``aggregate`` is a node's **release**: DP weights that the node's own engine
  produced with its own clipping and noise and that its own ledger charged. Aggregation,
  the server learning rate and the next round's model are post-processing of those releases,
  so they cost no privacy at any node.
* The aggregation weights come only from public values (the rounded user counts a node shows
  every researcher, or uniform), never from anything computed on user data.
* A federation manifest records, round by round, each node's signed release manifest (the
  node's own statement of the job, the model it started from and the ε it charged) and the
  digests that chain the rounds together; the coordinator signs it. It holds no weights and
  nothing per user.
"""

from __future__ import annotations

import base64
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.protocol.job_parameters import FEDERATED, REQUIRED
from gateway.protocol.release import (
    ReleaseVerificationFailed,
    manifest_digest,
    verify_manifest_signature,
)
from ledger import keys
from ledger.canonical import canonical_json, sha256_digest

if sys.version_info >= (3, 11):  # noqa: UP036 (the SDK installs on 3.10)
    import tomllib
else:  # a researcher's light install on Python 3.10 (pyproject: tomli there)
    import tomli as tomllib

FEDERATION_FORMAT = "fedgate-federation-v1"
AGGREGATION_RULES = ("users", "mean")
# Parameters of the local job each node runs per outer round (gateway.node.admission.JobRequest
# minus dataset, model, evaluation and idempotency key, which the coordinator sets).
LOCAL_JOB_FIELDS = FEDERATED
REQUIRED_JOB_FIELDS = tuple(name for name in REQUIRED if name in FEDERATED)
# What a node entry in nodes.toml may override for that node alone.
NODE_OVERRIDES = frozenset({"clients_per_round", "batch_size"})
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")



class NodeListInvalid(ValueError):
    """A nodes.toml file (or node list) is malformed; the message names the entry and field."""


class FederationManifestInvalid(ValueError):
    """A federation manifest does not verify; the message says which check failed."""


# --- the node list ----------------------------------------------------------------------


@dataclass(frozen=True)
class FederationNode:
    """One participating node as the coordinator knows it: where it is, which key signs its
    releases (given by its owner out of band) and which of its datasets to train on."""

    name: str
    url: str
    node_key: Path
    dataset: str
    overrides: Mapping[str, Any]


def parse_nodes_toml(text: str, base_dir: Path) -> tuple[FederationNode, ...]:
    """Parse a nodes.toml document; relative ``node_key`` paths are relative to ``base_dir``.

    ::

        [[node]]
        name = "clinic-a"                 # unique; used in tables and the manifest
        url = "http://127.0.0.1:8621"
        node_key = "clinic-a/node.pub"    # the node's public key, from its owner
        dataset = "demo"
        clients_per_round = 80            # optional: overrides the job's value here only
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise NodeListInvalid(f"nodes file is not valid TOML: {exc}") from None
    if set(data) != {"node"} or not isinstance(data["node"], list) or not data["node"]:
        raise NodeListInvalid("nodes file must hold one or more [[node]] tables and nothing else")
    nodes = []
    for index, entry in enumerate(data["node"], start=1):
        where = f"[[node]] #{index}"
        unknown = sorted(set(entry) - {"name", "url", "node_key", "dataset", *NODE_OVERRIDES})
        if unknown:
            raise NodeListInvalid(f"{where}: unknown fields {', '.join(unknown)}")
        for field in ("name", "url", "node_key", "dataset"):
            if not isinstance(entry.get(field), str) or not entry[field]:
                raise NodeListInvalid(f"{where}: {field} must be a non-empty string")
        if not _NODE_NAME.fullmatch(entry["name"]):
            raise NodeListInvalid(f"{where}: name must be 1-64 letters, digits, '.', '_' or '-'")
        if not re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", entry["url"]):
            raise NodeListInvalid(f"{where}: url must be an http(s) URL")
        overrides = {k: entry[k] for k in sorted(NODE_OVERRIDES & set(entry))}
        for name, value in overrides.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise NodeListInvalid(f"{where}: {name} must be a number > 0")
        key_path = Path(entry["node_key"])
        nodes.append(FederationNode(name=entry["name"], url=entry["url"],
                                    node_key=key_path if key_path.is_absolute() else base_dir / key_path,
                                    dataset=entry["dataset"], overrides=overrides))
    names = [n.name for n in nodes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise NodeListInvalid(f"node names must be unique; repeated: {', '.join(duplicates)}")
    return tuple(nodes)


def local_job_parameters(job: Mapping[str, Any],
                         overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The parameters of one node's job in one outer round, checked for shape only (the node
    validates values itself). DP evaluation is always off: see ``federation_cost_rounds``."""
    unknown = sorted(set(job) - LOCAL_JOB_FIELDS)
    if unknown:
        raise ValueError(f"not a federation job parameter: {', '.join(unknown)} (allowed: "
                         f"{', '.join(sorted(LOCAL_JOB_FIELDS))})")
    missing = [name for name in REQUIRED_JOB_FIELDS if name not in job]
    if missing:
        raise ValueError(f"missing job parameters: {', '.join(missing)}")
    return {**job, **(overrides or {}), "evaluate": False}


def federation_cost_rounds(*, outer_rounds: int, local_rounds: int) -> int:
    """The rounds of the single job whose cost equals a node's cost for the whole federation.

    Each outer round is a training-only job ``SelfComposed(PoissonSampled(q, Gaussian(z)), T)``
    with the same q and z, whose RDP at every order α is T·ρ₁(α); K of them compose (RDP adds)
    to K·T·ρ₁(α), exactly the RDP of one job of K·T rounds. So a node's ``/v1/estimate`` of a
    K·T-round job gives the federation's ε at that node. (With DP evaluation in every job the
    identity would fail: each job's cost is max(T·ρ₁, ρ_eval), so evaluation is left off.)
    """
    if outer_rounds < 1 or local_rounds < 1:
        raise ValueError("outer_rounds and local rounds must be ≥ 1")
    return outer_rounds * local_rounds


# --- aggregation ------------------------------------------------------------------------


@dataclass(frozen=True)
class Aggregation:
    """How the coordinator combines node releases into the next global model.

    ``rule``: ``users`` weighs each node by the training users it shows every researcher
    (rounded to 100; at least 1), ``mean`` weighs nodes equally. The next model is
    ``g + server_learning_rate · Σᵢ wᵢ (mᵢ − g)`` with Σ wᵢ = 1: with the default rate 1 it is
    the weighted mean of the node models (FedAvg over nodes).
    """

    rule: str = "users"
    server_learning_rate: float = 1.0

    def __post_init__(self) -> None:
        if self.rule not in AGGREGATION_RULES:
            raise ValueError(f"aggregation rule must be one of {', '.join(AGGREGATION_RULES)}")
        if not (math.isfinite(self.server_learning_rate) and 0 < self.server_learning_rate <= 10):
            raise ValueError("server_learning_rate must be in (0, 10]")

    def to_json(self) -> dict[str, Any]:
        weights = ("public training user count (rounded to 100)" if self.rule == "users"
                   else "uniform")
        return {"rule": self.rule, "weights": weights,
                "server_learning_rate": self.server_learning_rate,
                "formula": "g + server_learning_rate * sum_i w_i (m_i - g), sum_i w_i = 1"}

    def node_weights(self, users_rounded: Sequence[int]) -> list[float]:
        """Normalised weights for the contributing nodes (public inputs only)."""
        if not users_rounded:
            raise ValueError("nothing to aggregate")
        raw = ([float(max(int(u), 1)) for u in users_rounded] if self.rule == "users"
               else [1.0] * len(users_rounded))
        total = sum(raw)
        return [w / total for w in raw]


def aggregate(global_weights: Sequence[np.ndarray], node_models: Sequence[Sequence[np.ndarray]],
              weights: Sequence[float], *, server_learning_rate: float = 1.0) -> list[np.ndarray]:
    """The next global model from node releases (post-processing of DP outputs).

    Computed in float64 and returned in each array's original dtype. Raises ValueError if a
    node model's shapes differ from the global model's, or a result is not finite.
    """
    if len(node_models) != len(weights) or not node_models:
        raise ValueError("need one weight per node model, and at least one node model")
    shapes = [np.shape(w) for w in global_weights]
    for model in node_models:
        if [np.shape(w) for w in model] != shapes:
            raise ValueError("a node model's weight shapes differ from the global model's")
    result = []
    for index, base in enumerate(global_weights):
        g = np.asarray(base, dtype=np.float64)
        step = sum(w * (np.asarray(model[index], dtype=np.float64) - g)
                   for w, model in zip(weights, node_models, strict=True))
        updated = g + server_learning_rate * step
        if not np.isfinite(updated).all():
            raise ValueError("the aggregate is not finite")
        result.append(updated.astype(np.asarray(base).dtype))
    return result


def model_digest(artifact: Mapping[str, Any]) -> str:
    """The content address a node gives an uploaded artifact (SHA-256 of its canonical JSON,
    the bytes ``gateway.sdk.client.Client.upload_model`` sends)."""
    return sha256_digest(canonical_json(artifact))


# --- the signed federation manifest -----------------------------------------------------


def contribution(node: str, release_document: Mapping[str, Any]) -> dict[str, Any]:
    """A node's contribution to one round, as recorded in the federation manifest: the node's
    signed release manifest (no weights), its signature and its digest."""
    manifest = release_document["manifest"]
    return {
        "node": node,
        "job_id": manifest["job_id"],
        "node_key_id": manifest["node_key_id"],
        "epsilon": manifest["epsilon"],
        "delta": manifest["delta"],
        "weights_digest": manifest["weights_digest"],
        "release_manifest_digest": manifest_digest(manifest),
        "release_manifest": manifest,
        "release_signature": release_document["signature"],
    }


def sign_federation_manifest(manifest: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """``{"manifest", "signature"}``: Ed25519 by the coordinator over the canonical JSON."""
    signature = key.sign(canonical_json(manifest))
    return {"manifest": dict(manifest), "signature": base64.b64encode(signature).decode("ascii")}


def verify_federation_manifest(
    document: Mapping[str, Any], coordinator_key: Ed25519PublicKey,
    node_keys: Mapping[str, Ed25519PublicKey] | None = None,
) -> dict[str, Any]:
    """Check a signed federation manifest; return the manifest or raise
    ``FederationManifestInvalid`` naming the first failed check.

    Checked: the coordinator's signature and key id; the rounds are numbered 1..n and chained
    (round 1 starts from the initial model, round k+1 from round k's aggregate, the final
    model is the last aggregate); every contribution comes from an admitted node, embeds a
    node release manifest with the recorded digest, node key, job, ε and δ, and that release
    started from the round's model. With ``node_keys`` (node name → its public key), every
    embedded release must also carry that node's valid signature, and every admitted node
    that contributed must have a key given.
    """
    def fail(message: str) -> FederationManifestInvalid:
        return FederationManifestInvalid(message)

    try:
        manifest = document["manifest"]
        signature = base64.b64decode(document["signature"], validate=True)
        coordinator_key.verify(signature, canonical_json(manifest))
    except (KeyError, TypeError, ValueError, InvalidSignature):
        raise fail("the coordinator's signature does not verify") from None
    if manifest.get("format") != FEDERATION_FORMAT:
        raise fail(f"format is not {FEDERATION_FORMAT}")
    if manifest.get("coordinator_key_id") != keys.key_id(coordinator_key):
        raise fail("coordinator_key_id does not match the coordinator key")
    try:
        _check_chain(manifest, node_keys)
    except (KeyError, TypeError, AttributeError) as exc:
        raise fail(f"the manifest is missing a field or has a wrong type: {exc!r}") from None
    return dict(manifest)


def _check_chain(manifest: Mapping[str, Any], node_keys: Mapping[str, Ed25519PublicKey] | None) -> None:
    nodes = {n["name"]: n for n in manifest["nodes"]}
    if len(nodes) != len(manifest["nodes"]):
        raise FederationManifestInvalid("node names repeat")
    rounds = manifest["rounds"]
    status = manifest["status"]
    if status not in ("completed", "stopped"):
        raise FederationManifestInvalid(f"unknown status {status!r}")
    if status == "completed" and len(rounds) != manifest["parameters"]["outer_rounds"]:
        raise FederationManifestInvalid("a completed federation must list every outer round")
    current = manifest["initial_model_digest"]
    contributed: dict[str, int] = {}
    for position, record in enumerate(rounds, start=1):
        if record["round"] != position:
            raise FederationManifestInvalid(f"round {position} is numbered {record['round']}")
        if record["model_digest"] != current:
            raise FederationManifestInvalid(f"round {position} did not start from the previous "
                                            "round's aggregate")
        for item in record["contributions"]:
            _check_contribution(position, record, item, nodes, node_keys)
            contributed[item["node"]] = contributed.get(item["node"], 0) + 1
        aggregate_digest = record["aggregate_model_digest"]
        if aggregate_digest is None:
            if status != "stopped" or position != len(rounds):
                raise FederationManifestInvalid(f"round {position} has no aggregate, and only the "
                                                "last round of a stopped federation may lack one")
        else:
            if not record["contributions"]:
                raise FederationManifestInvalid(f"round {position} aggregates no contribution")
            current = aggregate_digest
    if manifest["final_model_digest"] != current:
        raise FederationManifestInvalid("final_model_digest is not the last round's aggregate")
    for name, node in nodes.items():
        if node["contributions"] != contributed.get(name, 0):
            raise FederationManifestInvalid(f"node {name} lists {node['contributions']} "
                                            f"contributions, the rounds hold {contributed.get(name, 0)}")


def _check_contribution(position: int, record: Mapping[str, Any], item: Mapping[str, Any],
                        nodes: Mapping[str, Any], node_keys: Mapping[str, Ed25519PublicKey] | None) -> None:
    name = item["node"]
    where = f"round {position}, node {name}"
    node = nodes.get(name)
    if node is None or not node["admitted"]:
        raise FederationManifestInvalid(f"{where}: contribution from a node that was not admitted")
    release = item["release_manifest"]
    if manifest_digest(release) != item["release_manifest_digest"]:
        raise FederationManifestInvalid(f"{where}: release manifest does not match its digest")
    recorded = {"job_id": item["job_id"], "node_key_id": item["node_key_id"],
                "epsilon": item["epsilon"], "delta": item["delta"],
                "weights_digest": item["weights_digest"], "model_digest": record["model_digest"],
                "dataset": node["dataset"]}
    if node["node_key_id"] != item["node_key_id"]:
        raise FederationManifestInvalid(f"{where}: node key differs from the node's entry")
    for field, value in recorded.items():
        if release.get(field) != value:
            raise FederationManifestInvalid(f"{where}: the node's release says {field} "
                                            f"{release.get(field)!r}, the manifest {value!r}")
    if node_keys is None:
        return
    public_key = node_keys.get(name)
    if public_key is None:
        raise FederationManifestInvalid(f"{where}: no public key given for node {name}")
    if keys.key_id(public_key) != item["node_key_id"]:
        raise FederationManifestInvalid(f"{where}: the given node key is not the one that "
                                        "signed the release")
    try:
        verify_manifest_signature(release, item["release_signature"], public_key)
    except ReleaseVerificationFailed:
        raise FederationManifestInvalid(f"{where}: the node's release signature does not "
                                        "verify") from None
