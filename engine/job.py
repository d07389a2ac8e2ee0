"""The job directory contract between the gateway, the launcher and the engine runner.

``JOB_DIR/job.json`` is written by the gateway (:class:`JobSpec`); the runner creates
``JOB_DIR/data_access`` right before it first reads user data and ``JOB_DIR/release.json``
when it succeeds. Progress travels as JSON lines on a dedicated pipe and has exactly four
shapes; none carries data-dependent values (``round`` counts rounds, not clients)::

    {"event": "data_access"}
    {"event": "round", "round": i, "rounds": T}
    {"event": "evaluation"}
    {"event": "done"}

Stdlib only: the gateway imports this module.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DATA_ACCESS_EVENT",
    "DATA_ACCESS_MARKER",
    "DONE_EVENT",
    "EVALUATION_EVENT",
    "JOB_FILE",
    "PROGRESS_FD_ENV",
    "RELEASE_FILE",
    "EvaluationSpec",
    "JobSpec",
    "JobSpecInvalid",
    "format_event",
    "parse_event",
    "round_event",
]

JOB_FILE = "job.json"
DATA_ACCESS_MARKER = "data_access"
RELEASE_FILE = "release.json"
PROGRESS_FD_ENV = "FEDGATE_PROGRESS_FD"

_MAX_LINE = 4096


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
class JobSpec:
    """One DP-FedAvg job as the gateway admitted (and accounted) it.

    Privacy-relevant fields: each round samples every training user independently with
    probability ``sampling_rate``; each sampled user's model delta is clipped to L2 norm
    ``clip``; Gaussian noise with std ``noise_multiplier * clip`` is added to the sum, which is
    divided by the constant ``expected_clients_per_round`` (= sampling_rate × training users).
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
                noise_multiplier=ev.number("noise_multiplier", minimum=0.0),
                loss_clip=ev.number("loss_clip", minimum=0.0, exclusive=True),
            )
            ev.done()
        spec = cls(
            job_id=job_id,
            dataset_dir=fields.absolute_path("dataset_dir"),
            model_path=fields.absolute_path("model_path"),
            rounds=fields.integer("rounds", 1, 100_000),
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
            server_momentum=fields.number("server_momentum", minimum=0.0, maximum=0.999),
            local_epochs=fields.integer("local_epochs", 1, 1000),
            batch_size=fields.integer("batch_size", 1, 1_000_000),
            evaluation=evaluation,
        )
        fields.done()
        return spec

    @classmethod
    def load(cls, job_dir: Path) -> JobSpec:
        try:
            data = json.loads((job_dir / JOB_FILE).read_bytes(), parse_constant=_no_constant)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise JobSpecInvalid(f"cannot read {JOB_FILE} ({error.__class__.__name__})") \
                from error
        return cls.from_json(data)


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
        if type(i) is int and type(total) is int and 1 <= i <= total <= 100_000:
            return round_event(i, total)
    return None


def _reject_constant(name: str) -> None:
    raise ValueError(name)
