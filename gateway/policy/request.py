"""The facts of one request that constraints compare (``RequestContext``), and how the owner's
tools state them as ``NAME=VALUE`` text."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.policy.values import (
    parse_count,
    parse_integer,
    parse_known_model_families,
    parse_model_family,
    parse_number,
    parse_positive,
    parse_size,
    parse_whole,
)

# What a request asks to do: the actions policy rows name (a light import: the CLI's help lists
# them without loading Casbin).
ACTIONS = ("estimate", "train", "evaluate", "read-audit", "admin")


@dataclass(frozen=True)
class RequestContext:
    """The facts of one request that constraints compare; ``None`` = not stated.

    ``now`` is timezone-aware. ``epsilon`` is the job's projected ε at the dataset's δ.
    ``researcher_epsilon_spent(window)`` is the sum of ε of the requester's jobs on the
    dataset whose budget is reserved or committed and that were created within ``window``
    before ``now``. ``researcher_committed_jobs`` counts the requester's jobs on the dataset
    whose budget is committed (jobs that ran); ``dataset_model_families`` are the model
    families of every committed job on the dataset.
    """

    now: dt.datetime
    rounds: int | None = None
    noise_multiplier: float | None = None
    clients_per_round: float | None = None
    epsilon: float | None = None
    model_family: str | None = None
    model_bytes: int | None = None
    model_parameters: int | None = None
    researcher_epsilon_spent: Callable[[dt.timedelta], float] | None = None
    researcher_committed_jobs: int | None = None
    dataset_model_families: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.now.tzinfo is None:
            raise ValueError("RequestContext.now must be timezone-aware")


def _constant_spent(text: str) -> Callable[[dt.timedelta], float]:
    spent = parse_number(text)
    return lambda window: spent


# name -> parser, for ``--param NAME=VALUE`` and expectation tables.
REQUEST_PARAMETERS: Mapping[str, Callable[[str], Any]] = {
    "rounds": parse_integer,
    "noise_multiplier": parse_positive,
    "clients_per_round": parse_positive,
    "epsilon": parse_number,
    "researcher_epsilon_spent": _constant_spent,
    "model_family": parse_model_family,
    "model_bytes": parse_size,
    "model_parameters": parse_count,
    "researcher_committed_jobs": parse_whole,
    "dataset_model_families": parse_known_model_families,
}


def context_from_params(params: Mapping[str, str], now: dt.datetime) -> RequestContext:
    """A context from ``NAME=VALUE`` text; raises ValueError naming a bad or unknown one."""
    facts: dict[str, Any] = {}
    for name, text in params.items():
        if name not in REQUEST_PARAMETERS:
            raise ValueError(f"unknown parameter {name!r} (known: {', '.join(REQUEST_PARAMETERS)})")
        try:
            facts[name] = REQUEST_PARAMETERS[name](text.strip())
        except ValueError as exc:
            raise ValueError(f"parameter {name}: {exc}") from None
    return RequestContext(now=now, **facts)
