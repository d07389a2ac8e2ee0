"""The job directory contract between the gateway, the launcher and the engine runner.

``JOB_DIR/job.json`` is written by the gateway (:class:`JobSpec`); the runner creates
``JOB_DIR/data_access`` right before it first reads user data and ``JOB_DIR/release.json``
when it succeeds. Progress travels as JSON lines on a dedicated pipe and has exactly four
shapes; none carries data-dependent values (``round`` counts rounds, not clients)::

    {"event": "data_access"}
    {"event": "round", "round": i, "rounds": T}
    {"event": "evaluation"}
    {"event": "done"}

The gateway imports this module: it needs no TensorFlow (only ``ledger.mechanism``, the
parameter ranges both sides enforce, and ``ledger.accounting`` for the charged event).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ledger.ranges import (
    CLIENT_OPTIMIZERS,
    CLIP_STRATEGIES,
    HYPERPARAMETER_RANGES,
    OPTIMIZER_HYPERPARAMETERS,
    RANGES,
    SERVER_OPTIMIZERS,
)

__all__ = [
    "ADAPTIVE_FIELDS",
    "CLIENT_OPTIMIZERS",
    "DATA_ACCESS_EVENT",
    "DATA_ACCESS_MARKER",
    "DONE_EVENT",
    "EVALUATION_EVENT",
    "JOB_FILE",
    "OPTIMIZER_FIELDS",
    "OPTIMIZER_HYPERPARAMETERS",
    "PROGRESS_FD_ENV",
    "RELEASE_FILE",
    "SERVER_OPTIMIZERS",
    "EvaluationSpec",
    "JobSpec",
    "JobSpecInvalid",
    "OptimizerChoice",
    "OptimizerInvalid",
    "format_event",
    "optimizer_hyperparameters",
    "parse_event",
    "round_event",
]

JOB_FILE = "job.json"
DATA_ACCESS_MARKER = "data_access"
RELEASE_FILE = "release.json"
PROGRESS_FD_ENV = "FEDGATE_PROGRESS_FD"

_MAX_LINE = 4096
_MAX_ROUNDS = int(RANGES["rounds"].high)


# ---------------------------------------------------------------------------------------------
# Optimizers: a closed choice from tff.learning.optimizers, by name; the names, defaults and
# ranges are ``ledger.ranges``' (CLIENT_OPTIMIZERS, SERVER_OPTIMIZERS, OPTIMIZER_HYPERPARAMETERS,
# HYPERPARAMETER_RANGES), which also says why neither optimizer changes ε.

OPTIMIZER_FIELDS: tuple[str, ...] = (
    "client_optimizer", "client_momentum", "server_optimizer", "server_momentum",
    "server_beta_1", "server_beta_2", "server_epsilon", "server_initial_preconditioner_value",
)
"""Job fields that choose and tune the optimizers (the learning rates are separate fields)."""


@dataclass(frozen=True, kw_only=True)
class OptimizerChoice:
    """The optimizer fields a job request (``gateway.node.admission.JobRequest``) and a job
    file (:class:`JobSpec`) share, with the defaults fedgate always trained with: client
    "sgd" without momentum, server "sgdm" (``server_momentum`` is each class's own field: the
    request defaults it, the job file requires it). Hyperparameters an optimizer does not take
    are None. Keyword-only, so the subclasses keep their required fields; none of these
    changes ε (clipping comes before the noise, the server step after it)."""

    client_optimizer: str = "sgd"
    client_momentum: float = 0.0
    server_optimizer: str = "sgdm"
    server_beta_1: float | None = None
    server_beta_2: float | None = None
    server_epsilon: float | None = None
    server_initial_preconditioner_value: float | None = None


class OptimizerInvalid(ValueError):
    """An optimizer name outside the closed choice, or a hyperparameter out of range or not
    taken by the chosen optimizer; ``field`` is the job field, ``allowed`` the valid names."""

    def __init__(self, field: str, reason: str, allowed: tuple[str, ...] = ()) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason
        self.allowed = allowed


def optimizer_hyperparameters(side: str, name: object,
                              given: Mapping[str, object]) -> dict[str, float]:
    """The chosen ``side`` ("client" or "server") optimizer's hyperparameters, defaults filled in.

    ``given`` maps hyperparameter names (``momentum``, ``beta_1`` …, without the side prefix)
    to the values asked for, None meaning unset. A value for a hyperparameter the optimizer
    does not take is refused (a momentum of 0 counts as unset: it is the field's default).
    Values must be finite numbers in range. Pure; raises :class:`OptimizerInvalid`.
    """
    allowed = CLIENT_OPTIMIZERS if side == "client" else SERVER_OPTIMIZERS
    if not isinstance(name, str) or name not in allowed:
        raise OptimizerInvalid(f"{side}_optimizer",
                               f"{side}_optimizer must be one of {', '.join(allowed)}", allowed)
    resolved = dict(OPTIMIZER_HYPERPARAMETERS[name])
    for key, value in given.items():
        field = f"{side}_{key}"
        if value is None:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise OptimizerInvalid(field, f"{field} must be a finite number")
        if key not in resolved:
            if key == "momentum" and value == 0:
                continue
            takes = ", ".join(f"{side}_{k}" for k in resolved) or "no hyperparameters"
            raise OptimizerInvalid(field, f"{field} does not apply to {side}_optimizer {name!r} "
                                          f"(it takes {takes} besides the learning rate)")
        allowed_range = HYPERPARAMETER_RANGES[key]
        if not allowed_range.contains(value):
            raise OptimizerInvalid(field, f"{field} must be in {allowed_range.interval()}")
        resolved[key] = float(value)
    return resolved


class JobSpecInvalid(ValueError):
    """job.json is malformed or out of range; ``reason`` names the field."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class EvaluationSpec:
    """DP evaluation: Gaussian noise multiplier on per-user sums, and the loss clip L."""

    noise_multiplier: float
    loss_clip: float


@dataclass(frozen=True)
class JobSpec(OptimizerChoice):
    """One DP-FedAvg job as the gateway admitted (and accounted) it.

    Privacy-relevant fields: each round samples every training user independently with
    probability ``sampling_rate``; each sampled user trains on at most
    ``max_examples_per_user`` of their examples (a fresh uniform subset each round when they have
    more: the owner's cap on one user's local work); the model delta is clipped to L2 norm
    ``clip``; Gaussian noise with std :meth:`noise_stddev` (≥ ``noise_multiplier × clip`` in the
    float32 that runs) is added to the sum, which is divided by the public constant
    ``expected_clients_per_round`` (= sampling_rate × N̂, the dataset's public user count; never
    the exact count). ``charged_cost`` is the DP event the ledger charged; the runner refuses to
    read data unless :meth:`executed_cost` equals it (:meth:`check_charged`). Every parameter is
    validated by ``ledger.mechanism`` (the gateway's validator too).

    The optimizers (``client_optimizer`` for local training, ``server_optimizer`` on the noised
    aggregate; see :data:`OPTIMIZER_HYPERPARAMETERS`) do not change ε. Hyperparameters an
    optimizer does not take are None (momentum 0). The optimizer fields are optional in
    job.json, defaulting to client "sgd" and server "sgdm" (the only choice before there was
    one), so earlier job files keep their meaning.
    """

    job_id: str
    dataset_dir: Path
    model_path: Path
    rounds: int
    sampling_rate: float
    expected_clients_per_round: float
    noise_multiplier: float
    clip: float
    client_learning_rate: float
    server_learning_rate: float
    server_momentum: float
    local_epochs: int
    batch_size: int
    evaluation: EvaluationSpec | None
    max_examples_per_user: int | None = None
    charged_cost: dict[str, Any] | None = None
    clip_strategy: str = "fixed"
    """``fixed`` (C every round) or ``adaptive`` (``ledger.mechanism.AdaptiveClipping``: C is the
    initial clip and moves toward the target quantile of update norms; ``noise_multiplier`` is
    the effective multiplier of the update and clipped-count queries together)."""
    clipped_count_stddev: float | None = None
    target_unclipped_quantile: float | None = None
    clip_learning_rate: float | None = None
    memory_limit_bytes: int | None = None
    """The node's per-job memory limit: the runner refuses, before reading data, a job whose
    estimate (``engine.memory.job_memory``) exceeds it. None: not checked (older job files)."""

    def noise_stddev(self) -> float:
        """σ of the Gaussian noise on the sum, as the float32 value TF runs with
        (``ledger.mechanism.noise_stddev``: ≥ noise_multiplier × float32(clip))."""
        from ledger.mechanism import noise_stddev

        return noise_stddev(clip=self.clip, noise_multiplier=self.noise_multiplier)

    def adaptive_clipping(self) -> Any:
        """The validated ``ledger.mechanism.AdaptiveClipping`` of an adaptive job (z_Δ, the
        float32 multiplier and clip bounds the engine runs with); None for a fixed clip."""
        from ledger import mechanism

        if self.clip_strategy == "fixed":
            return None
        return mechanism.validate_adaptive_clipping(
            clip=self.clip, noise_multiplier=self.noise_multiplier,
            clipped_count_stddev=self.clipped_count_stddev,
            target_unclipped_quantile=self.target_unclipped_quantile,
            clip_learning_rate=self.clip_learning_rate)

    def executed_cost(self) -> Any:
        """The DP event of what this spec runs (``ledger.accounting.JobCost``), rebuilt from
        its own parameters: q, z, T, the clipped-count noise σ_b of adaptive clipping and the
        evaluation's noise multiplier."""
        from ledger.accounting import JobCost

        return JobCost.for_job(
            sampling_rate=self.sampling_rate, noise_multiplier=self.noise_multiplier,
            rounds=self.rounds,
            evaluation_noise_multiplier=(None if self.evaluation is None
                                         else self.evaluation.noise_multiplier),
            clipped_count_stddev=(self.clipped_count_stddev
                                  if self.clip_strategy == "adaptive" else None))

    def check_charged(self) -> None:
        """Refuse to run unless what runs is exactly what was charged.

        ``charged_cost`` is the cost the gateway's ledger reserved (``Job.cost``); the event this
        spec executes must equal it field for field (same q, z, T and evaluation noise), else
        :class:`JobSpecInvalid` — before any data is read, so the job is refunded.
        """
        from ledger.accounting import JobCost

        if self.charged_cost is None:
            raise JobSpecInvalid("job.json has no charged_cost: nothing says what was charged")
        try:
            charged = JobCost.from_json(self.charged_cost)
        except ValueError as error:
            raise JobSpecInvalid(f"charged_cost is not a valid job cost ({error})") from None
        if self.executed_cost() != charged:
            raise JobSpecInvalid("the parameters in job.json differ from the charged DP event; "
                                 "refusing to run a mechanism that was not charged")

    def optimizer(self, side: str) -> tuple[str, float, dict[str, float]]:
        """(name, learning rate, other hyperparameters) of the ``side`` optimizer, as
        ``tff.learning.optimizers.build_<name>`` takes them (sgd is sgdm without momentum)."""
        name = self.client_optimizer if side == "client" else self.server_optimizer
        rate = self.client_learning_rate if side == "client" else self.server_learning_rate
        given = {key: getattr(self, f"{side}_{key}", None)
                 for key in HYPERPARAMETER_RANGES}
        return name, rate, optimizer_hyperparameters(side, name, given)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["dataset_dir"] = str(self.dataset_dir)
        data["model_path"] = str(self.model_path)
        return data

    @classmethod
    def from_json(cls, data: object) -> JobSpec:
        """Parse strictly: exact field set, exact types, finite values within range."""
        fields = _Fields(data, "job.json")
        job_id = fields.string("job_id")
        if not 1 <= len(job_id) <= 128:
            raise JobSpecInvalid("job_id must be 1 to 128 characters")
        evaluation_data = fields.take("evaluation")
        evaluation = None
        if evaluation_data is not None:
            ev = _Fields(evaluation_data, "evaluation")
            evaluation = EvaluationSpec(
                noise_multiplier=ev.number("noise_multiplier", minimum=0.0, exclusive=True),
                loss_clip=ev.number("loss_clip", minimum=0.0, exclusive=True),
            )
            ev.done()
        spec = cls(
            job_id=job_id,
            dataset_dir=fields.absolute_path("dataset_dir"),
            model_path=fields.absolute_path("model_path"),
            rounds=fields.integer("rounds", 1, _MAX_ROUNDS),
            sampling_rate=fields.number("sampling_rate", minimum=0.0, exclusive=True,
                                        maximum=1.0),
            expected_clients_per_round=fields.number("expected_clients_per_round",
                                                     minimum=0.0, exclusive=True),
            noise_multiplier=fields.number("noise_multiplier", minimum=0.0),
            clip=fields.number("clip", minimum=0.0, exclusive=True),
            client_learning_rate=fields.number("client_learning_rate", minimum=0.0,
                                               exclusive=True),
            server_learning_rate=fields.number("server_learning_rate", minimum=0.0,
                                               exclusive=True),
            server_momentum=(server_momentum := fields.number("server_momentum", minimum=0.0,
                                                              maximum=0.999)),
            local_epochs=fields.integer("local_epochs", 1, 1_000_000),
            batch_size=fields.integer("batch_size", 1, 1_000_000_000),
            evaluation=evaluation,
            **_optimizer_fields(fields, server_momentum=server_momentum),
            max_examples_per_user=fields.optional("max_examples_per_user"),
            charged_cost=fields.optional("charged_cost"),
            **_clipping_fields(fields),
            memory_limit_bytes=fields.optional("memory_limit_bytes"),
        )
        fields.done()
        spec.validate_mechanism()
        return spec

    def validate_mechanism(self) -> None:
        """Every DP and training parameter within the admissible float32 ranges
        (``ledger.mechanism``, the validator the gateway uses too); raises JobSpecInvalid."""
        from ledger import mechanism

        try:
            mechanism.validate_training_mechanism(
                clip=self.clip, noise_multiplier=self.noise_multiplier, rounds=self.rounds,
                local_epochs=self.local_epochs, batch_size=self.batch_size,
                client_learning_rate=self.client_learning_rate,
                server_learning_rate=self.server_learning_rate)
            if self.evaluation is not None:
                mechanism.validate_evaluation_mechanism(
                    noise_multiplier=self.evaluation.noise_multiplier,
                    loss_clip=self.evaluation.loss_clip)
            if self.max_examples_per_user is not None:
                mechanism.check_in_range("max_examples_per_user", self.max_examples_per_user)
            self.adaptive_clipping()
        except mechanism.MechanismParameterInvalid as error:
            raise JobSpecInvalid(f"{error.message} (admissible: {error.admissible})") from None
        if self.charged_cost is not None and not isinstance(self.charged_cost, dict):
            raise JobSpecInvalid("charged_cost must be a JSON object")
        limit = self.memory_limit_bytes
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)
                                  or limit < 1):
            raise JobSpecInvalid("memory_limit_bytes must be a positive integer")

    def check_memory(self, summary: Any) -> Any:
        """The job's memory estimate (``engine.memory.job_memory``) for the validated model
        ``summary``; raises :class:`JobSpecInvalid` — before any data is read, so the job is
        refunded — when it exceeds ``memory_limit_bytes``."""
        from engine.memory import job_memory, model_inputs

        estimate = job_memory(**model_inputs(summary, cap=self.max_examples_per_user or 1,
                                             local_epochs=self.local_epochs,
                                             batch_size=self.batch_size),
                              clients_per_round=self.expected_clients_per_round)
        if self.memory_limit_bytes is not None and estimate.bytes > self.memory_limit_bytes:
            raise JobSpecInvalid(
                f"the job's memory estimate {estimate.bytes} bytes exceeds the node's limit "
                f"{self.memory_limit_bytes}; refusing before reading data")
        return estimate

    @classmethod
    def load(cls, job_dir: Path) -> JobSpec:
        try:
            data = json.loads((job_dir / JOB_FILE).read_bytes(), parse_constant=_no_constant)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise JobSpecInvalid(f"cannot read {JOB_FILE} ({error.__class__.__name__})") \
                from error
        return cls.from_json(data)


ADAPTIVE_FIELDS = ("clipped_count_stddev", "target_unclipped_quantile", "clip_learning_rate")
"""job.json's (and a job request's) adaptive-clipping fields besides ``clip_strategy``."""


def _clipping_fields(fields: _Fields) -> dict[str, Any]:
    """The optional clipping fields of job.json: absent means a fixed clip (earlier job files);
    ``adaptive`` needs all three of its parameters, ``fixed`` none of them."""
    strategy = fields.optional("clip_strategy")
    strategy = "fixed" if strategy is None else strategy
    if strategy not in CLIP_STRATEGIES:
        raise JobSpecInvalid(f"clip_strategy must be one of {', '.join(CLIP_STRATEGIES)}")
    values = {name: fields.optional(name) for name in ADAPTIVE_FIELDS}
    given = [name for name, value in values.items() if value is not None]
    if strategy == "fixed" and given:
        raise JobSpecInvalid(f"{', '.join(given)} apply to clip_strategy adaptive only")
    if strategy == "adaptive" and len(given) != len(ADAPTIVE_FIELDS):
        raise JobSpecInvalid(f"clip_strategy adaptive needs {', '.join(ADAPTIVE_FIELDS)}")
    return {"clip_strategy": strategy, **values}


def _optimizer_fields(fields: _Fields, server_momentum: float) -> dict[str, Any]:
    """The optional optimizer fields of job.json, validated and resolved (defaults filled)."""
    chosen: dict[str, Any] = {}
    for side, default in (("client", "sgd"), ("server", "sgdm")):
        name = fields.optional(f"{side}_optimizer")
        name = default if name is None else name
        given = {key: fields.optional(f"{side}_{key}") for key in HYPERPARAMETER_RANGES
                 if f"{side}_{key}" in OPTIMIZER_FIELDS and f"{side}_{key}" != "server_momentum"}
        if side == "server":
            given["momentum"] = server_momentum
        try:
            resolved = optimizer_hyperparameters(side, name, given)
        except OptimizerInvalid as error:
            raise JobSpecInvalid(error.reason) from None
        chosen[f"{side}_optimizer"] = name
        for key in given:
            if key == "momentum":
                if side == "client":
                    chosen["client_momentum"] = resolved.get("momentum", 0.0)
            else:
                chosen[f"{side}_{key}"] = resolved.get(key)
    return chosen


def _no_constant(name: str) -> None:
    raise JobSpecInvalid(f"{JOB_FILE} contains {name}")


class _Fields:
    def __init__(self, data: object, what: str) -> None:
        if not isinstance(data, dict):
            raise JobSpecInvalid(f"{what} must be a JSON object")
        self._data = dict(data)
        self._what = what

    def take(self, key: str) -> Any:
        if key not in self._data:
            raise JobSpecInvalid(f"{self._what} is missing {key!r}")
        return self._data.pop(key)

    def optional(self, key: str) -> Any:
        """The value of an optional field; None if absent or null."""
        return self._data.pop(key, None)

    def done(self) -> None:
        if self._data:
            raise JobSpecInvalid(f"{self._what} has unexpected field {sorted(self._data)[0]!r}")

    def string(self, key: str) -> str:
        value = self.take(key)
        if not isinstance(value, str):
            raise JobSpecInvalid(f"{key} must be a string")
        return value

    def absolute_path(self, key: str) -> Path:
        value = self.string(key)
        if not value.startswith("/") or "\x00" in value:
            raise JobSpecInvalid(f"{key} must be an absolute path")
        return Path(value)

    def integer(self, key: str, minimum: int, maximum: int) -> int:
        value = self.take(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise JobSpecInvalid(f"{key} must be an integer")
        if not minimum <= value <= maximum:
            raise JobSpecInvalid(f"{key} must be in [{minimum}, {maximum}]")
        return value

    def number(self, key: str, *, minimum: float, exclusive: bool = False,
               maximum: float = math.inf) -> float:
        value = self.take(key)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise JobSpecInvalid(f"{key} must be a number")
        value = float(value)
        low_ok = value > minimum if exclusive else value >= minimum
        if not (math.isfinite(value) and low_ok and value <= maximum):
            bound = f"{'>' if exclusive else '≥'} {minimum:g}"
            if math.isfinite(maximum):
                bound += f" and ≤ {maximum:g}"
            raise JobSpecInvalid(f"{key} must be finite and {bound}")
        return value


# ---------------------------------------------------------------------------------------------
# Progress events

DATA_ACCESS_EVENT = {"event": "data_access"}
EVALUATION_EVENT = {"event": "evaluation"}
DONE_EVENT = {"event": "done"}


def round_event(round_number: int, rounds: int) -> dict[str, Any]:
    return {"event": "round", "round": round_number, "rounds": rounds}


def format_event(event: dict[str, Any]) -> bytes:
    """One progress line; refuses anything :func:`parse_event` would not accept."""
    line = json.dumps(event, separators=(",", ":")).encode() + b"\n"
    if parse_event(line) != event:
        raise ValueError(f"not a progress event: {event!r}")
    return line


def parse_event(line: bytes) -> dict[str, Any] | None:
    """The event on one progress line, or None if the line is not exactly a known shape."""
    if len(line) > _MAX_LINE:
        return None
    try:
        value = json.loads(line, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(value, dict):
        return None
    if value in (DATA_ACCESS_EVENT, EVALUATION_EVENT, DONE_EVENT):
        return {"event": value["event"]}
    if value.keys() == {"event", "round", "rounds"} and value["event"] == "round":
        i, total = value["round"], value["rounds"]
        # `type(...) is int`: JSON true/false parse to bools, which are not counts.
        if type(i) is int and type(total) is int and 1 <= i <= total <= _MAX_ROUNDS:
            return round_event(i, total)
    return None


def _reject_constant(name: str) -> None:
    raise ValueError(name)
