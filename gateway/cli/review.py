"""`fedgate review`: the data owner's queue of jobs the policy holds for review.

A job held by a `require_review` policy row waits in `pending_review` with its budget
reserved. Approve it and the running gateway starts it within a second; deny it (or let it
expire, `[review] expiry_hours`) and its reservation is refunded. The researcher sees the
state and your reason; every step is in the audit log. See docs/review-and-rehearsal.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from gateway.cli.common import open_node
from gateway.cli.usage import add_command, examples

# Imports inside the commands, not at the top: `fedgate --help` and the researcher commands
# run on a light install without the node extra (SQLModel, Casbin, Starlette, TensorFlow),
# and each command loads only what it needs.

ACTOR = "owner-cli"


def _expire(node) -> list[str]:  # type: ignore[no-untyped-def]
    """Apply the deadlines first, so the owner never acts on an overdue review."""
    from gateway.node.review import expire_overdue_reviews

    return expire_overdue_reviews(node, actor=ACTOR)


def cmd_review_list(args: argparse.Namespace) -> int:
    from gateway.node.review import pending_reviews

    node = open_node(args)
    expired = _expire(node)
    rows = pending_reviews(node)
    if args.json:
        print(json.dumps({"pending": rows, "expired_now": expired}, indent=2, ensure_ascii=False))
        return 0
    for job_id in expired:
        print(f"expired: {job_id} (no decision in time; its reservation was refunded)")
    for row in rows:
        print(f"{row['job_id']}  {row['researcher']} on {row['dataset']}  ε {row['epsilon']:.3f} "
              f"(δ {row['delta']:g})  expires {row['expires_at']}")
        print(f"    {row['required_because']}")
    if not rows:
        print("no jobs wait for review")
    return 0


def _human_details(details: dict[str, Any]) -> str:
    model = details["model"]
    if "problem" in model:
        architecture = f"REJECTED for this dataset: {model['problem']}"
    else:
        architecture = (f"{model['family']}, {model['parameters']:,} parameters, input "
                        f"{model['input_shape']} → {model['output_units']} "
                        f"({model['output_activation']}); layers {', '.join(model['layers'])}")
    review = details["review"]
    lines = [
        f"job {details['job_id']} ({details['state']}) by {details['researcher']} "
        f"(key {details['researcher_key_id']}) on {details['dataset']}",
        f"  review:      {review['state']}, expires {review['expires_at']}"
        + (f"; {review['reason']} ({review['decided_by']})" if review["reason"] else ""),
        f"  why:         {review['required_because']}",
        f"  cost:        ε {details['epsilon']:.4f} at δ {details['delta']:g} (RDP), budget "
        f"{details['budget']}",
        f"  model:       {details['model_digest']}",
        f"               {architecture}",
        "  parameters:  " + ", ".join(f"{k}={v}" for k, v in sorted(details["parameters"].items())
                                      if k not in ("dataset", "model_digest")),
        f"  policy:      {details['policy_explanation']}",
        f"               version {details['policy_version']}",
    ]
    return "\n".join(lines)


def cmd_review_show(args: argparse.Namespace) -> int:
    from gateway.node.review import review_details

    node = open_node(args)
    _expire(node)
    details = review_details(node, args.job_id)
    print(json.dumps(details, indent=2, ensure_ascii=False) if args.json else _human_details(details))
    return 0


def cmd_review_decide(args: argparse.Namespace) -> int:
    from gateway.node.review import runnable_problem
    from ledger.review import approve_review, deny_review

    node = open_node(args)
    decide = approve_review if args.review_command == "approve" else deny_review
    if args.review_command == "approve":
        problem = runnable_problem(node, args.job_id)
        if problem is not None:
            print(f"fedgate: cannot approve {args.job_id}: {problem}; deny it instead",
                  file=sys.stderr)
            return 1
    with node.session() as s, s.begin():
        review = decide(s, args.job_id, reason=args.reason, actor=ACTOR)
    if review.state == "expired":
        print(f"fedgate: the review of {args.job_id} had expired; the job was not started and its "
              "reservation was refunded", file=sys.stderr)
        return 1
    if review.state == "approved":
        print(f"approved {args.job_id}; the running gateway starts it within a second")
    else:
        print(f"denied {args.job_id}; its reservation was refunded and the researcher sees your "
              "reason")
    return 0


Command = Callable[[argparse.Namespace], int]


def _run(command: Command) -> Command:
    """Report a review step that does not apply (wrong state, no review) as exit status 1."""

    def run(args: argparse.Namespace) -> int:
        from ledger.review import ReviewError

        try:
            return int(command(args))
        except ReviewError as exc:
            print(f"fedgate: {exc}", file=sys.stderr)
            return 1

    return run


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``fedgate review list|show|approve|deny`` to the top-level subcommands."""
    group = add_command(
        commands, "review", help="approve or deny jobs the policy holds for review (owner)",
        description=__doc__,
        examples=examples(
            "fedgate -d ./node review list",
            "fedgate -d ./node review show job-0123456789abcdef",
            'fedgate -d ./node review approve job-0123456789abcdef --reason "small linear model"',
            'fedgate -d ./node review deny job-0123456789abcdef --reason "use z >= 1.2 here"'))
    sub = group.add_subparsers(dest="review_command", required=True, metavar="ACTION")

    p = add_command(sub, "list", help="jobs waiting for review (expires overdue ones first)",
                    examples=examples("fedgate -d ./node review list",
                                      "fedgate -d ./node review list --json"))
    p.add_argument("--json", action="store_true", help="print the queue as JSON")
    p.set_defaults(func=_run(cmd_review_list))

    p = add_command(sub, "show", help="model, parameters, projected ε and policy explanation of "
                    "one job",
                    examples=examples("fedgate -d ./node review show job-0123456789abcdef",
                                      "fedgate -d ./node review show job-0123456789abcdef --json"))
    p.add_argument("job_id", help="the held job (`fedgate review list`)")
    p.add_argument("--json", action="store_true", help="print the details as JSON")
    p.set_defaults(func=_run(cmd_review_show))

    for action, effect, reason in (
            ("approve", "the gateway starts it; its reservation is kept", "small linear model"),
            ("deny", "it fails and its reservation is refunded", "use z >= 1.2 here")):
        p = add_command(sub, action, help=f"{action} a pending job: {effect}",
                        examples=examples(f"fedgate -d ./node review {action} "
                                          f'job-0123456789abcdef --reason "{reason}"'))
        p.add_argument("job_id", help="the held job (`fedgate review list`)")
        p.add_argument("--reason", required=True, help="shown to the researcher and audited")
        p.set_defaults(func=_run(cmd_review_decide))
