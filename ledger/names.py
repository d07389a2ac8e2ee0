"""Names of principals, groups, datasets and owner domains: one grammar, checked at every entry.

A *name* is 1 to 64 ASCII characters: letters, digits, ``.``, ``_`` and ``-``, starting with a
letter or a digit, never containing ``..``. So a name is always a single, ordinary path
component (never ``.``, ``..``, absolute, or with a separator), a single policy-file cell (no
comma, ``*``, ``#``, space or newline) and a single command-line word (no leading ``-``).

Names are compared exactly (Casbin is case-sensitive), but two names that differ only in case
are the same name for uniqueness (``name_key``): ``Alice`` cannot be registered next to
``alice``, nor ``Demo`` imported next to ``demo`` (one directory on a case-insensitive disk).

Reserved names: the role groups ``researchers`` and ``officers`` (the default policy grants
through them, with or without members) are never principal names, and ``audit`` (the object
``read-audit`` rules name) is never a dataset name.

Every entry point checks here: ``fedgate init --owner``, ``researcher|officer add`` and
``--group``, ``dataset import``, the ledger's registries, policy rows, and the gateway's
requests (through the policy engine, which refuses any request naming an invalid name).
"""

from __future__ import annotations

import re

MAX_NAME_LENGTH = 64
ROLE_GROUPS = frozenset({"researchers", "officers"})
RESERVED_DATASET_NAMES = frozenset({"audit"})
GRAMMAR = ("1-64 letters, digits, '.', '_' or '-', starting with a letter or digit, "
           "without '..'")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class NameInvalid(ValueError):
    """A name outside the grammar, or a reserved one; the message says which and why."""


def is_name(text: object) -> bool:
    """Whether ``text`` is a name (module grammar)."""
    return isinstance(text, str) and _NAME.fullmatch(text) is not None and ".." not in text


def is_name_pattern(text: object) -> bool:
    """A policy row's dataset: a name, or the beginning of one followed by ``*`` (``*`` alone
    matches every name)."""
    if not isinstance(text, str) or not text.endswith("*"):
        return is_name(text)
    prefix = text[:-1]
    return prefix == "" or (len(prefix) < MAX_NAME_LENGTH and is_name(prefix))


def name_key(name: str) -> str:
    """What two names must not share to be told apart: the name without case."""
    return name.lower()


def check_name(text: object, what: str) -> str:
    """``text`` if it is a name, else ``NameInvalid`` naming ``what`` (e.g. "dataset name")."""
    if isinstance(text, str) and is_name(text):
        return text
    raise NameInvalid(f"{what} {text!r} is not a valid name: use {GRAMMAR}")


def check_principal_name(text: object) -> str:
    """A researcher's or officer's name: a name that is not a role group."""
    name = check_name(text, "principal name")
    if name_key(name) in ROLE_GROUPS:
        raise NameInvalid(f"{name!r} is reserved: it names the role group the default policy "
                          "grants through; choose a personal name")
    return name


def check_dataset_name(text: object) -> str:
    """A dataset's name: a name that is not the audit log's object name."""
    name = check_name(text, "dataset name")
    if name_key(name) in RESERVED_DATASET_NAMES:
        raise NameInvalid(f"{name!r} is reserved: policy rows use it for the audit log")
    return name
