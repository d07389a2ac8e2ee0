"""What every owner command module shares: where the deployment is and how to open it.

The deployment directory is ``-d DIR``, else ``$FEDGATE_DEPLOYMENT``, else the current
directory. Opening it (:class:`gateway.node.node.Node`) needs the node extra, so it is imported when
a command runs, never when ``fedgate --help`` builds the parser on a researcher's light install.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.node.node import Node  # the node extra (SQLModel, Casbin): only when a command runs

__all__ = ["Fedgate", "deployment_dir", "open_node"]

Fedgate = Callable[[Sequence[str]], int]
"""The ``fedgate`` command as a function (``gateway.cli.main``): the demos receive it, so they
print and run the very commands a user types without importing the CLI that runs them."""


def deployment_dir(args: argparse.Namespace) -> Path:
    return Path(args.deployment or os.environ.get("FEDGATE_DEPLOYMENT") or ".")


def open_node(args: argparse.Namespace) -> Node:
    from gateway.node.node import Node  # the node extra (SQLModel, Casbin): only when a command runs

    return Node(deployment_dir(args))
