"""``fedgate federate`` and ``fedgate verify-federation``: one model across several nodes.

The coordinator is you: a signed client of every node (your key must be registered on each).
Exit codes: 0 the federation completed (or the manifest verifies), 1 it stopped part-way (or
the manifest does not verify), 2 usage or file errors, 3 too few nodes admitted it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

# The coordinator, numpy and httpx are imported inside the two commands: `fedgate --help` builds
# this parser and should not pay for them.

FEDERATE_DESCRIPTION = """\
Train one model across several fedgate nodes, each under its own owner's policy and budget.

Each of the K outer rounds runs an ordinary fedgate job on every participating node: T
local rounds of DP-FedAvg on that node's users, with that node's clipping, noise, policy
and privacy ledger (no DP evaluation). Each node releases only its DP weights, signed by
its node key; you verify them and average them into the next global model.

Before round 1 every node is asked (free estimates) whether all K jobs fit its budget and
what they cost there; the first real submission applies its policy. Nodes that refuse are
excluded with the reason, shown in the admission table. The federation runs if at least
--min-nodes nodes admitted it. A node that fails later is dropped with --allow-dropout;
otherwise the federation stops. Each node's ledger charges exactly the jobs it ran.

The result: the final model (--out, keras-json-v1) and a federation manifest signed by
your key (--manifest) listing every node's signed release; check it with
`fedgate verify-federation`.
"""

FEDERATE_EXAMPLES = """\
nodes.toml (one [[node]] table per node; node_key paths are relative to the file):
  [[node]]
  name = "hospital-a"
  url = "http://127.0.0.1:8621"
  node_key = "keys/hospital-a.pub"     # the node's public key, from its owner
  dataset = "demo"
  clients_per_round = 60               # optional: this node only

examples:
  fedgate federate --nodes nodes.toml --model model.json --outer-rounds 3 \\
      --rounds 5 --clients-per-round 60 --noise-multiplier 1.0 --clip 1.0 \\
      --min-nodes 2 --allow-dropout --key alice.key --out global.json \\
      --manifest federation.json
  fedgate verify-federation federation.json --coordinator-key alice.pub --nodes nodes.toml
"""


def _key_path(args: argparse.Namespace) -> Path:
    key = args.key or os.environ.get("FEDGATE_KEY")
    if not key:
        raise ValueError("set --key or FEDGATE_KEY (your private key) to sign requests")
    return Path(key)


def _job(args: argparse.Namespace) -> dict[str, Any]:
    names = ("rounds", "clients_per_round", "noise_multiplier", "clip", "client_learning_rate",
             "server_learning_rate", "server_momentum", "local_epochs", "batch_size")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _number(value: float | None, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def admission_table(admissions: list[Any]) -> str:
    """The admission table: node, admitted?, the federation's ε there, and why not."""
    rows = [("node", "admitted", "ε per outer round", "ε all rounds (composed)", "δ", "why not")]
    for a in admissions:
        if a.admitted:
            rows.append((a.node, "yes", _number(a.epsilon_per_round),
                         _number(a.epsilon_federation), _number(a.delta, "g"), ""))
        else:
            rows.append((a.node, "no", "-", "-", "-", f"{a.problem_type}: {a.reason}"))
    return _table(rows)


def charges_table(outcomes: list[Any]) -> str:
    """What each node's own ledger charged for this federation."""
    rows = [("node", "rounds contributed", "jobs charged", "ε charged", "δ", "dropped")]
    for o in outcomes:
        if not o.admitted:
            rows.append((o.node, "0", "0", "0", "-", "not admitted"))
            continue
        dropped = f"round {o.dropped_at_round}: {o.drop_reason}" if o.dropped_at_round else ""
        rows.append((o.node, str(o.contributions), str(o.charged_jobs),
                     _number(o.epsilon_charged), _number(o.delta, "g"), dropped))
    return _table(rows)


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False))
                     + "  " + row[-1] for row in rows)


def _summary(result: Any, args: argparse.Namespace) -> dict[str, Any]:
    return {"status": result.status, "federation_id": result.manifest["federation_id"],
            "final_model_digest": result.manifest["final_model_digest"],
            "admissions": [asdict(a) for a in result.admissions],
            "outcomes": [asdict(o) for o in result.outcomes],
            "out": args.out, "manifest": args.manifest}


def _write_outputs(result: Any, args: argparse.Namespace) -> None:
    if args.out:
        Path(args.out).write_text(json.dumps(result.artifact))
    if args.manifest:
        Path(args.manifest).write_text(json.dumps(result.document, indent=2, sort_keys=True))


def _report(result: Any, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(_summary(result, args), indent=2, sort_keys=True))
        return
    print(f"federation {result.manifest['federation_id']}: {result.status}")
    print("admission:")
    print(admission_table(result.admissions))
    print("charged by each node's own ledger (its jobs composed; nothing else):")
    print(charges_table(result.outcomes))
    print(f"final model {result.manifest['final_model_digest']}"
          + (f" written to {args.out}" if args.out else ""))
    if args.manifest:
        print(f"federation manifest signed by your key: {args.manifest}")


def cmd_federate(args: argparse.Namespace) -> int:
    from engine.artifact import parse_artifact
    from gateway.federation.coordinator import FederationRefused, FederationStopped, federate
    from gateway.federation.core import Aggregation, parse_nodes_toml

    nodes_path = Path(args.nodes)
    nodes = parse_nodes_toml(nodes_path.read_text(encoding="utf-8"), nodes_path.parent)
    artifact = parse_artifact(Path(args.model).read_bytes())

    def progress(message: str) -> None:
        if not args.json:
            print(message, file=sys.stderr, flush=True)

    try:
        result = federate(nodes, artifact, key=_key_path(args), outer_rounds=args.outer_rounds,
                          job=_job(args), min_nodes=args.min_nodes,
                          allow_dropout=args.allow_dropout,
                          aggregation=Aggregation(args.aggregation, args.aggregation_rate),
                          progress=progress)
    except FederationRefused as refused:
        if args.json:
            print(json.dumps({"status": "refused", "reason": str(refused),
                              "admissions": [asdict(a) for a in refused.admissions]},
                             indent=2, sort_keys=True))
        else:
            print("admission:")
            print(admission_table(refused.admissions))
        print(f"fedgate: federation refused: {refused}", file=sys.stderr)
        return 3
    except FederationStopped as stopped:
        assert stopped.result is not None
        _write_outputs(stopped.result, args)
        _report(stopped.result, args)
        print(f"fedgate: {stopped}", file=sys.stderr)
        return 1
    _write_outputs(result, args)
    _report(result, args)
    return 0


def cmd_verify_federation(args: argparse.Namespace) -> int:
    from gateway.federation.core import (
        FederationManifestInvalid,
        parse_nodes_toml,
        verify_federation_manifest,
    )
    from ledger import keys

    document = json.loads(Path(args.manifest).read_text(encoding="utf-8"))
    coordinator = keys.load_public_key(Path(args.coordinator_key))
    node_keys = None
    if args.nodes:
        nodes_path = Path(args.nodes)
        node_keys = {n.name: keys.load_public_key(n.node_key)
                     for n in parse_nodes_toml(nodes_path.read_text(encoding="utf-8"),
                                               nodes_path.parent)}
    try:
        manifest = verify_federation_manifest(document, coordinator, node_keys)
    except FederationManifestInvalid as exc:
        print(json.dumps({"ok": False, "problem": str(exc)}, indent=2) if args.json
              else f"FAILED: {exc}")
        return 1
    contributions = sum(len(r["contributions"]) for r in manifest["rounds"])
    if args.json:
        print(json.dumps({"ok": True, "federation_id": manifest["federation_id"],
                          "status": manifest["status"], "rounds": len(manifest["rounds"]),
                          "node_releases": contributions,
                          "node_signatures_checked": node_keys is not None,
                          "final_model_digest": manifest["final_model_digest"]}, indent=2))
        return 0
    print(f"OK: federation {manifest['federation_id']} ({manifest['status']}), "
          f"{len(manifest['rounds'])} rounds, {contributions} node releases"
          + (" with node signatures verified" if node_keys is not None else
             " (node signatures not checked: pass --nodes)")
          + f"; final model {manifest['final_model_digest']}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``federate`` and ``verify-federation`` to the top-level parser."""
    formatter = argparse.RawDescriptionHelpFormatter
    p = commands.add_parser("federate", help="train one model across several nodes "
                            "(cross-silo; each node's own policy and budget apply)",
                            description=FEDERATE_DESCRIPTION, epilog=FEDERATE_EXAMPLES,
                            formatter_class=formatter)
    p.add_argument("--nodes", required=True, help="nodes.toml: the nodes, their keys, datasets")
    p.add_argument("--model", required=True, help="initial model, keras-json-v1 "
                   "(fedgate model from-keras makes one)")
    p.add_argument("--outer-rounds", type=int, required=True,
                   help="K: rounds of aggregation across nodes (one job per node each)")
    p.add_argument("--rounds", type=int, required=True,
                   help="T: local DP-FedAvg rounds of each node's job per outer round")
    p.add_argument("--clients-per-round", type=float, required=True,
                   help="expected users sampled per local round (Poisson); nodes.toml may "
                        "override it per node")
    p.add_argument("--noise-multiplier", type=float, required=True,
                   help="z: Gaussian noise std / clip, added by each node to its users' sum")
    p.add_argument("--clip", type=float, required=True, help="per-user L2 clip of updates")
    p.add_argument("--client-learning-rate", type=float,
                   help="users' local SGD step (default: each node's job default)")
    p.add_argument("--server-learning-rate", type=float, help="each node's own server step")
    p.add_argument("--server-momentum", type=float,
                   help="each node's server momentum (default: the job default)")
    p.add_argument("--local-epochs", type=int,
                   help="passes over a user's capped examples per round (default: job default)")
    p.add_argument("--batch-size", type=int,
                   help="local batch size (default: the job default)")
    p.add_argument("--min-nodes", type=int, default=1,
                   help="fail unless this many nodes admit it and stay (default 1)")
    p.add_argument("--allow-dropout", action="store_true",
                   help="continue without a node that fails mid-federation")
    p.add_argument("--aggregation", choices=("users", "mean"), default="users",
                   help="weigh node models by public rounded user counts (default) or equally")
    p.add_argument("--aggregation-rate", type=float, default=1.0,
                   help="coordinator's step towards the nodes' average (default 1: the average)")
    p.add_argument("--key", help="your private key file (or FEDGATE_KEY)")
    p.add_argument("--out", help="write the final model (keras-json-v1) here")
    p.add_argument("--manifest", help="write the signed federation manifest here")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_federate)

    p = commands.add_parser("verify-federation", help="verify a signed federation manifest",
                            description="Check the coordinator's signature, the chain of rounds "
                            "and, with --nodes, every node's signature on its release.",
                            epilog=FEDERATE_EXAMPLES, formatter_class=formatter)
    p.add_argument("manifest", help="federation manifest JSON (fedgate federate --manifest)")
    p.add_argument("--coordinator-key", required=True, help="the coordinator's public key")
    p.add_argument("--nodes", help="nodes.toml naming each node's public key")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    p.set_defaults(func=cmd_verify_federation)
