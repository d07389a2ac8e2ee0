"""The job parameters a researcher sends: one table, from which everything else is generated.

:data:`PARAMETERS` names each parameter of a training request (``POST /v1/jobs``), an estimate
and a calibration, with its type, whether it is required, its default, its admissible range
(``ledger.ranges``, the table the gateway and the engine enforce in float32) or its closed
choice, and what it means. Generated from it, and compared with it by ``tests/
test_job_parameters.py``:

* the OpenAPI schemas of the request bodies (:func:`json_schema`, ``gateway.api.openapi``);
* the researcher CLI's options (:func:`add_cli_options`, ``gateway.cli.researcher``) and the
  parameters it sends (:func:`parameters_from_cli`);
* the fields a federation passes to each node (:data:`FEDERATED`, ``gateway.federation.core``);
* the reference page ``docs/job-parameters.md`` (:func:`markdown`; ``make openapi`` writes it);
* ``gateway.node.admission.JobRequest``'s fields, defaults and required set (checked by the test).

Pure: the standard library and ``ledger.ranges`` only (the researcher's light install has it).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

from ledger.ranges import (
    ADAPTIVE_DEFAULTS,
    CLIENT_OPTIMIZERS,
    CLIP_STRATEGIES,
    HYPERPARAMETER_RANGES,
    OPTIMIZER_HYPERPARAMETERS,
    RANGES,
    SERVER_OPTIMIZERS,
    ParameterRange,
)

__all__ = ["FEDERATED", "PARAMETERS", "REQUIRED", "JobParameter", "add_cli_options",
           "json_schema", "markdown", "parameters_from_cli"]


@dataclass(frozen=True)
class JobParameter:
    """One request field. ``default`` None with ``required`` False means "the chosen
    optimizer's default" (or unset); ``federated`` fields may be set per federation job."""

    name: str
    kind: type
    description: str
    required: bool = False
    default: object = None
    range: ParameterRange | None = None
    choices: tuple[str, ...] = ()
    federated: bool = True
    max_length: int | None = None
    cli_flag: str | None = None
    """The CLI option when it is not ``--`` + the name with dashes (a bool: the option that
    turns it off)."""

    @property
    def flag(self) -> str:
        if self.cli_flag is not None:
            return self.cli_flag
        return "--" + self.name.replace("_", "-")

    def schema(self) -> dict[str, Any]:
        """This parameter's JSON schema (OpenAPI 3.1)."""
        schema: dict[str, Any] = {"type": _JSON_TYPES[self.kind]}
        if self.range is not None:
            low = "minimum" if self.range.low_inclusive else "exclusiveMinimum"
            high = "maximum" if self.range.high_inclusive else "exclusiveMaximum"
            convert = int if self.range.integer else float
            schema[low] = convert(self.range.low)
            if math.isfinite(self.range.high):
                schema[high] = convert(self.range.high)
        if self.choices:
            schema["enum"] = list(self.choices)
        if self.max_length is not None:
            schema["maxLength"] = self.max_length
        if self.default is not None:
            schema["default"] = self.default
        schema["description"] = self.description
        return schema

    def admissible(self) -> str:
        """The admissible values in words: a range, a choice or the type."""
        if self.choices:
            return ", ".join(self.choices)
        if self.range is not None:
            return (self.range.describe() if math.isfinite(self.range.high)
                    else f"a number ≥ {self.range.low:g}")
        return {str: "a string", bool: "true or false"}.get(self.kind, self.kind.__name__)


def _optimizer_defaults(hyperparameter: str) -> str:
    """Which server optimizers take ``hyperparameter`` and their defaults, in words."""
    takers = [f"{name} {defaults[hyperparameter]:g}"
              for name, defaults in OPTIMIZER_HYPERPARAMETERS.items()
              if hyperparameter in defaults and name in SERVER_OPTIMIZERS]
    return "server optimizers " + ", ".join(takers) + " (their defaults)"


PARAMETERS: tuple[JobParameter, ...] = (
    JobParameter("dataset", str, "the dataset's name (`fedgate datasets`)", required=True,
                 federated=False, max_length=128),
    JobParameter("rounds", int, "training rounds T", required=True, range=RANGES["rounds"]),
    JobParameter("clients_per_round", float, "expected users sampled per round (Poisson) "
                 "against the dataset's public user count N̂: q = this / N̂", required=True,
                 range=ParameterRange(1.0, math.inf)),
    JobParameter("noise_multiplier", float, "Gaussian noise std / clip (z)", required=True,
                 range=RANGES["noise_multiplier"]),
    JobParameter("clip", float, "per-user L2 clip of a round's model update (C)",
                 required=True, range=RANGES["clip"]),
    JobParameter("client_optimizer", str, "local training optimizer; does not change ε",
                 default="sgd", choices=CLIENT_OPTIMIZERS),
    JobParameter("client_learning_rate", float, "local learning rate", default=0.1,
                 range=RANGES["client_learning_rate"]),
    JobParameter("client_momentum", float, "client optimizer sgdm only", default=0.0,
                 range=HYPERPARAMETER_RANGES["momentum"]),
    JobParameter("server_optimizer", str, "optimizer applied to the noised aggregate "
                 "(post-processing); does not change ε", default="sgdm",
                 choices=SERVER_OPTIMIZERS),
    JobParameter("server_learning_rate", float, "server learning rate", default=1.0,
                 range=RANGES["server_learning_rate"]),
    JobParameter("server_momentum", float, "server optimizer sgdm only", default=0.0,
                 range=HYPERPARAMETER_RANGES["momentum"]),
    JobParameter("server_beta_1", float, _optimizer_defaults("beta_1"),
                 range=HYPERPARAMETER_RANGES["beta_1"]),
    JobParameter("server_beta_2", float, _optimizer_defaults("beta_2"),
                 range=HYPERPARAMETER_RANGES["beta_2"]),
    JobParameter("server_epsilon", float, _optimizer_defaults("epsilon"),
                 range=HYPERPARAMETER_RANGES["epsilon"]),
    JobParameter("server_initial_preconditioner_value", float,
                 _optimizer_defaults("initial_preconditioner_value"),
                 range=HYPERPARAMETER_RANGES["initial_preconditioner_value"]),
    JobParameter("local_epochs", int, "passes over a user's examples per round", default=1,
                 range=RANGES["local_epochs"]),
    JobParameter("batch_size", int, "local batch size", default=16, range=RANGES["batch_size"]),
    JobParameter("clip_strategy", str, "fixed: the clip C every round; adaptive: C is the "
                 "initial clip and moves toward a quantile of the users' update norms (Andrew "
                 "et al. 2021); z stays the effective multiplier, so ε is unchanged",
                 default="fixed", choices=CLIP_STRATEGIES),
    JobParameter("clipped_count_stddev", float, "adaptive clip only: noise σ_b on the count of "
                 "unclipped users (> z/2; default 5 % of clients_per_round)",
                 range=RANGES["clipped_count_stddev"]),
    JobParameter("target_unclipped_quantile", float, "adaptive clip only: the fraction of users "
                 "whose update the clip should leave unclipped",
                 default=ADAPTIVE_DEFAULTS["target_unclipped_quantile"],
                 range=RANGES["target_unclipped_quantile"]),
    JobParameter("clip_learning_rate", float, "adaptive clip only: η of the geometric clip "
                 "update C ← C·exp(−η(unclipped fraction − target))",
                 default=ADAPTIVE_DEFAULTS["clip_learning_rate"],
                 range=RANGES["clip_learning_rate"]),
    JobParameter("evaluate", bool, "DP evaluation on held-out users after training (its own "
                 "noise, charged with the job)", default=True, federated=False,
                 cli_flag="--no-evaluation"),
)
"""Every job parameter, in the order the CLI's help and the reference page list them."""

REQUIRED: tuple[str, ...] = tuple(p.name for p in PARAMETERS if p.required)
FEDERATED: frozenset[str] = frozenset(p.name for p in PARAMETERS if p.federated)
"""The fields a federation job sets for every node (the dataset is each node's own; nodes do
not evaluate)."""

_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean"}


def json_schema() -> dict[str, dict[str, Any]]:
    """The ``properties`` of a request body: every parameter's schema."""
    return {p.name: p.schema() for p in PARAMETERS}


def add_cli_options(parser: argparse.ArgumentParser, *,
                    optional: tuple[str, ...] = ()) -> None:
    """The dataset as a positional argument and every other parameter as an option (a bool
    with default true as ``--no-NAME``); ``optional`` required parameters may be left out
    (calibrate solves for one of them)."""
    for p in PARAMETERS:
        description = p.description.replace("%", "%%")  # argparse %-formats help ("5 %")
        if p.name == "dataset":
            parser.add_argument("dataset", help=description)
        elif p.kind is bool:
            parser.add_argument(p.flag, dest=p.name, action="store_false", default=None,
                                help=f"skip the {description}")
        else:
            default = "" if p.default is None else f"; default {p.default}"
            parser.add_argument(p.flag, type=p.kind, choices=p.choices or None,
                                required=p.required and p.name not in optional,
                                help=f"{description} ({p.admissible()}{default})")


def parameters_from_cli(args: argparse.Namespace) -> dict[str, Any]:
    """The request's parameters from :func:`add_cli_options`' options: only those given (the
    node applies the defaults), never the dataset (it is the request's own field)."""
    return {p.name: getattr(args, p.name) for p in PARAMETERS
            if p.name != "dataset" and getattr(args, p.name, None) is not None}


def markdown() -> str:
    """``docs/job-parameters.md``."""
    lines = [
        "# Job parameters",
        "",
        "Generated from `gateway/protocol/job_parameters.py` (`make openapi`); the OpenAPI "
        "schemas ([openapi.json](openapi.json)), the researcher CLI's options and this page "
        "come from the same table, and `tests/test_job_parameters.py` checks that they agree. "
        "A request sends the parameters as JSON fields (`Client.train_model(model, dataset, "
        "rounds=…, …)`); the CLI takes them as options (`fedgate train DATASET --rounds …`).",
        "",
        "| parameter | CLI | required | default | admissible | meaning |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for p in PARAMETERS:
        flag = "DATASET" if p.name == "dataset" else p.flag
        shown = str(p.default).lower() if p.kind is bool else p.default
        default = "—" if p.default is None else f"`{shown}`"
        lines.append(f"| `{p.name}` | `{flag}` | {'yes' if p.required else 'no'} | {default} "
                     f"| {p.admissible()} | {p.description} |")
    lines += ["", "Neither optimizer changes ε: local training is clipped before the noise, "
              "and the server step transforms the noised aggregate. A hyperparameter the chosen "
              "optimizer does not take is refused (`invalid-request` naming the field).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(), end="")
