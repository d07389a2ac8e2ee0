"""How the ``fedgate`` command explains itself.

Every subcommand is added through ``add_command``: a description and worked examples, shown
by ``fedgate COMMAND --help`` (``tests/test_cli_usage.py`` walks the whole tree and checks that
each subcommand has examples and each option a help text). ``FedgateParser`` answers a mistyped
subcommand with the closest one ("did you mean ...?") and a group typed without its action
(``fedgate dataset``, or bare ``fedgate``) with that group's help, on stderr with exit code 2
like every other usage error.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NoReturn

__all__ = ["FedgateFormatter", "FedgateParser", "add_command", "examples", "fedgate_version"]


def fedgate_version() -> str:
    """The installed distribution's version (``0+unknown`` in a checkout that is not installed)."""
    try:
        return version("fedgate")
    except PackageNotFoundError:
        return "0+unknown"


def examples(*lines: str) -> str:
    """An ``examples:`` epilog; each line is a command as typed (a trailing comment allowed)."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


class FedgateFormatter(argparse.HelpFormatter):
    """Prose paragraphs wrapped to the terminal; a paragraph with indented lines (examples,
    option lists) kept exactly as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(
            paragraph if any(line[:1].isspace() for line in paragraph.splitlines())
            else super(FedgateFormatter, self)._fill_text(paragraph, width, indent)
            for paragraph in text.split("\n\n"))


class FedgateParser(argparse.ArgumentParser):
    """``argparse`` with two kindnesses: "did you mean" for a mistyped subcommand or choice,
    and the group's help when its subcommand is missing."""

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        # argparse's own check (the one place a choice is refused), with the closest choice.
        if action.choices is not None and value not in action.choices:
            choices = [str(choice) for choice in action.choices]
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise argparse.ArgumentError(
                action, f"invalid choice: {value!r}{hint} (choose from {', '.join(choices)})")

    def error(self, message: str) -> NoReturn:
        missing = message.removeprefix("the following arguments are required: ")
        if missing != message and missing.split(", ")[0] in ("COMMAND", "ACTION"):
            self.print_help(sys.stderr)
            self.exit(2, f"\n{self.prog}: error: {message}\n")
        super().error(message)


def add_command(commands: argparse._SubParsersAction, name: str, *,  # type: ignore[type-arg]
                help: str, examples: str,
                description: str | None = None) -> argparse.ArgumentParser:
    """Add subcommand ``name``: ``help`` is its line in the parent's list, ``description``
    (default: ``help``) heads its own ``--help``, ``examples`` (from ``examples()``) ends it."""
    return commands.add_parser(name, help=help, description=description or help,
                               epilog=examples,
                               formatter_class=FedgateFormatter)
