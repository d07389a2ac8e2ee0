"""`fedgate officer token NAME`: a one-time sign-in for the officer dashboard (owner).

Prints a login URL to hand to the officer through a channel you trust. The token signs
in once; the session it opens lasts until the token's expiry (--hours, default 8),
sign-out, or the revocation or rotation of the officer's key. Only its SHA-256 is
stored, and the issuance is audited (action `token`). See docs/compliance.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from urllib.parse import quote

from gateway.cli.common import open_node
from gateway.cli.usage import add_command, examples

# Imports inside the commands, not at the top: `fedgate --help` and the researcher commands
# run on a light install without the node extra (SQLModel, Casbin, Starlette, TensorFlow),
# and each command loads only what it needs.


def cmd_officer_token(args: argparse.Namespace) -> int:
    from ledger.officer_login import issue_login_token

    node = open_node(args)
    with node.session() as s, s.begin():
        issued = issue_login_token(s, officer=args.name, hours=args.hours, actor="owner-cli",
                                   now=time.time())
    base = (args.url or f"http://{node.config.host}:{node.config.port}").rstrip("/")
    login_url = f"{base}/dashboard/login?token={quote(issued.token, safe='')}"
    expires = dt.datetime.fromtimestamp(issued.expires_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    if args.json:
        print(json.dumps({"officer": issued.officer, "key_id": issued.key_id,
                          "token_id": issued.token_id, "token": issued.token,
                          "expires_at": issued.expires_at, "login_url": login_url}, indent=2))
        return 0
    print(f"dashboard login for officer {issued.officer} (key {issued.key_id}, token "
          f"{issued.token_id}); signs in once, session ends {expires}:")
    print(f"  {login_url}")
    print(f"or paste the token at {base}/dashboard/login: {issued.token}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``token`` to the ``officer`` command (which ``gateway.cli`` defines first)."""
    officer = commands.choices["officer"]
    actions = next(a for a in officer._actions if isinstance(a, argparse._SubParsersAction))
    p = add_command(actions, "token", help="issue a one-time sign-in link for the officer "
                    "dashboard", description=__doc__,
                    examples=examples("fedgate -d ./node officer token olivia",
                                      "fedgate -d ./node officer token olivia --hours 2 "
                                      "--url https://node.example:8620"))
    p.add_argument("name", help="the officer's name (`fedgate officer list`)")
    p.add_argument("--hours", type=float, default=8.0,
                   help="how long the token and the session it opens last (default 8, at most 168)")
    p.add_argument("--url", default=None, help="the gateway's address as the officer's browser "
                   "reaches it (default: http://HOST:PORT from the node config)")
    p.add_argument("--json", action="store_true", help="print the token and URL as JSON")
    p.set_defaults(func=cmd_officer_token)
