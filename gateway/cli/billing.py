"""`fedgate billing`: the data owner's view of what researchers' jobs cost (docs/billing.md).

A statement lists one researcher's charges of one month (UTC) — each cites its `bill` audit
entry — and totals them per currency; the totals equal the sum of those audit entries exactly.
It holds only data-independent quantities (CPU billed, rounds, expected client updates), so
it can be sent to the researcher. `usage` is for the owner alone: the measured CPU, wall time
and memory of each job and the exact client-update counts depend on the private data.
"""

from __future__ import annotations

import argparse
import json
import sys

from gateway.cli.common import open_node
from gateway.cli.terminal import format_table
from gateway.cli.usage import add_command, examples

# Imports inside the commands, not at the top: `fedgate --help` and the researcher commands
# run on a light install without the node extra (SQLModel, Casbin, Starlette, TensorFlow),
# and each command loads only what it needs.


def _month(text: str) -> str:
    from ledger.metering import month_bounds

    try:
        month_bounds(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a month such as 2026-11") from None
    return text


def cmd_statement(args: argparse.Namespace) -> int:
    from gateway.node.billing import statement, statement_csv

    node = open_node(args)
    with node.session() as s:
        document = statement(s, researcher=args.researcher, month=args.month)
    if args.format == "csv":
        sys.stdout.write(statement_csv(document))
    elif args.format == "json":
        print(json.dumps(document, indent=2, sort_keys=True))
    else:
        print(f"statement for {args.researcher}, {args.month} (UTC)")
        for line in document["lines"]:
            print(f"  {line['charged_at']}  {line['job_id']}  {line['dataset']}  "
                  f"{line['rounds_run']} rounds, CPU {line['cpu_seconds']} s "
                  f"({line['cpu_basis']})  "
                  f"{line['total']} {line['currency']}  (audit #{line['audit_seq']})")
        if not document["lines"]:
            print("  no charges")
        for currency, total in document["totals"].items():
            print(f"total: {total} {currency}")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    """Owner-local: every job metered in the month as measured, with the exact client-update
    counts. Never send this to a researcher (module docstring)."""
    from sqlmodel import select

    from ledger.metering import month_bounds
    from ledger.models import JobMeter

    node = open_node(args)
    start, end = month_bounds(args.month)
    with node.session() as s:
        rows = s.exec(select(JobMeter).where(  # reviewed: ORM query, not exec
            JobMeter.settled_at >= start, JobMeter.settled_at < end)  # type: ignore[operator]
            .order_by(JobMeter.settled_at)).all()
    data = [{key: getattr(row, key) for key in (
        "job_id", "researcher", "dataset", "outcome", "measured", "cpu_reserved_seconds",
        "cpu_seconds", "wall_seconds", "max_rss_bytes", "peak_tree_rss_bytes",
        "peak_memory_bytes", "rounds_run",
        "expected_client_updates", "client_updates", "bytes_released", "stopped")}
        for row in rows]
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    if not data:
        print("no jobs metered in that month")
        return 0
    print(format_table(data, ("job_id", "researcher", "dataset", "outcome", "cpu_seconds",
                              "wall_seconds", "peak_memory_bytes", "rounds_run",
                              "client_updates")))
    print("(--json has every measured field)")
    return 0


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    billing = add_command(commands, "billing", help="compute charges: statements and usage "
                          "(owner)", description=__doc__,
                          examples=examples(
                              "fedgate -d ./node billing statement --researcher alice "
                              "--month 2026-11",
                              "fedgate -d ./node billing usage --month 2026-11"))
    sub = billing.add_subparsers(dest="billing_command", required=True, metavar="ACTION")
    p = add_command(sub, "statement", help="one researcher's charges in one month",
                    examples=examples(
                        "fedgate -d ./node billing statement --researcher alice --month 2026-11",
                        "fedgate -d ./node billing statement --researcher alice --month 2026-11 "
                        "--format csv > alice.csv"))
    p.add_argument("--researcher", required=True, help="the researcher's name")
    p.add_argument("--month", required=True, type=_month, help="YYYY-MM (UTC)")
    p.add_argument("--format", choices=("text", "csv", "json"), default="text",
                   help="output format (default text)")
    p.set_defaults(func=cmd_statement)
    p = add_command(sub, "usage", help="every job metered in one month, as measured (owner only: "
                    "depends on the private data)",
                    examples=examples("fedgate -d ./node billing usage --month 2026-11",
                                      "fedgate -d ./node billing usage --month 2026-11 --json"))
    p.add_argument("--month", required=True, type=_month, help="YYYY-MM (UTC)")
    p.add_argument("--json", action="store_true", help="print every metered field as JSON")
    p.set_defaults(func=cmd_usage)
