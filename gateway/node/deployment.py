"""A node's deployment directory: layout, configuration and ``fedgate init``.

Layout::

    DIR/fedgate.toml        configuration (below)
    DIR/node.key, node.pub  the node's Ed25519 key pair (signs releases)
    DIR/split.key           secret HMAC key that assigns users to evaluation
    DIR/fedgate.db          SQLite ledger (unless FEDGATE_DATABASE_URL is set)
    DIR/policies/           Casbin model.conf and policy.csv written by the owner
    DIR/datasets/NAME/      per-user shards (engine.datastore layout)
    DIR/models/             uploaded model artifacts, by digest
    DIR/jobs/ID/            one working directory per job
    DIR/logs/               owner-local logs (engine stderr); never served
"""

from __future__ import annotations

import os
import secrets
import shutil
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

from engine.sandbox import (
    DEFAULT_LIMITS,
    SANDBOX_ID,
    SANDBOX_MODES,
    ResourceLimits,
    SandboxMode,
    SandboxSettings,
    WorkerAddress,
)
from gateway.node.origin import Origin
from gateway.policy.rows import POLICY_TEMPLATES
from ledger import keys
from ledger.db import create_schema, database_url, make_engine
from ledger.mechanism import MechanismParameterInvalid, validate_evaluation_mechanism
from ledger.names import check_name
from ledger.pricing import PriceList

CONFIG_TEMPLATE = """\
# fedgate node configuration (written by `fedgate init`).
[node]
# The data owner's name; it is the Casbin domain of every rule in policies/policy.csv.
owner = "{owner}"

[gateway]
host = "127.0.0.1"
port = 8620
# The scheme://host[:port] researchers reach this node at. Every request's signature names it,
# so a request signed for another node is refused here. Absent: the address a request arrived
# on (the listening socket), right when researchers use this host and port directly. Set it
# behind a reverse proxy or when researchers use a DNS name (docs/security.md).
# public_origin = "https://node.example"
# RFC 9421 signatures: maximum validity (seconds) and tolerated clock skew.
signature_window_seconds = 300
clock_skew_seconds = 5
# Request body limits (bytes): model uploads and everything else.
max_model_bytes = 67108864
max_request_bytes = 1048576
# At most this many model uploads are read at once; more wait for a slot (each may hold up to
# max_model_bytes in memory). Requests are authenticated before any body is read.
max_concurrent_uploads = 4
# `fedgate serve`: connections beyond this are answered 503; a connection whose request
# headers have not all arrived this many seconds after it opened (or after its previous
# response) is closed.
max_connections = 256
header_timeout_seconds = 10

[engine]
# Wall-clock limit for one job.
job_timeout_seconds = 3600
# How each job is contained (docs/sandbox.md). "bwrap": a bubblewrap sandbox — own pid and
# network namespaces (loopback only), a read-only view of just what the job needs, a seccomp
# filter, an unprivileged uid, the limits below. "none": a plain process group with a private
# network namespace, for development only; every job then logs a warning.
sandbox = "bwrap"
# Host uid/gid jobs run as when the gateway runs as root; best one that nothing else uses.
sandbox_uid = 65534
sandbox_gid = 65534
# DP evaluation on held-out users: noise multiplier and per-user loss clip.
evaluation_noise_multiplier = 10.0
evaluation_loss_clip = 5.0
# TFF remote workers ("host:port" of worker_binary on hosts you operate), e.g.
# ["10.0.0.5:8000", "10.0.0.6:8000"]. Empty: TFF's local runtime inside each job's sandbox.
# Remote workers receive the sampled users' data over unauthenticated gRPC: list only hosts in
# this node's trust domain, on a private network (docs/sandbox.md, "Remote workers").
remote_workers = []
# At most this many jobs run at once; further admitted jobs wait, started round robin across
# researchers (docs/billing.md). Absent (older configurations): every admitted job starts at once.
max_concurrent_jobs = 2
# At most this many admitted, unfinished jobs per researcher (held for review, queued or
# running); one more is refused with 429 quota-exceeded. Policy quotas may be stricter.
max_jobs_per_researcher = 8

[engine.limits]
# Per process of a job (TFF's worker_binary has its own), except `processes`: all tasks,
# threads included, of the sandbox uid. A small job on a 2-core node peaked at 2.7 GiB (runner)
# and 1.9 GiB (worker) of address space and 83 tasks; thread counts grow with the cores.
cpu_seconds = {limits.cpu_seconds}
address_space_bytes = {limits.address_space_bytes}
open_files = {limits.open_files}
processes = {limits.processes}
file_size_bytes = {limits.file_size_bytes}
# Size of the job's private /tmp and /dev/shm (memory-backed).
tmp_bytes = {limits.tmp_bytes}
# Memory a job may be expected to use (estimated from its public parameters: model, per-user
# cap, batch, clients per round; docs/performance.md). Larger jobs are refused at admission
# with the largest clients_per_round that fits, and again by the engine before it reads data.
memory_bytes = {limits.memory_bytes}

# [billing]
# Charge researchers for the compute their jobs use (docs/billing.md). Uncomment to enable:
# every settled job is then priced and a `bill` audit entry records the charge.
# currency = "EUR"
# per_cpu_hour = 0.05      # per CPU-hour billed (the job's reservation once it reads user data)
# per_job = 0.10           # per job that ran in the engine
# per_epsilon = 1.00       # optional: per unit of ε committed

[review]
# A job the policy holds for owner review (require_review) that is neither approved nor denied
# within this many hours expires and its reserved budget is refunded (docs/review-and-rehearsal.md).
expiry_hours = 72
"""


@dataclass(frozen=True)
class NodeConfig:
    owner: str
    host: str
    port: int
    signature_window_seconds: int
    clock_skew_seconds: int
    max_model_bytes: int
    max_request_bytes: int
    job_timeout_seconds: float
    sandbox: SandboxMode
    evaluation_noise_multiplier: float
    evaluation_loss_clip: float
    sandbox_uid: int = SANDBOX_ID
    sandbox_gid: int = SANDBOX_ID
    sandbox_limits: ResourceLimits = DEFAULT_LIMITS
    review_expiry_hours: float = 72.0
    public_origin: Origin | None = None  # None: the address each request arrived on
    max_concurrent_uploads: int = 4
    max_connections: int = 256
    header_timeout_seconds: float = 10.0
    remote_workers: tuple[WorkerAddress, ...] = ()
    billing: PriceList | None = None  # None: jobs are metered but not charged
    max_concurrent_jobs: int | None = None  # None: every admitted job starts at once
    max_jobs_per_researcher: int | None = None  # None: only policy quotas bound it

    @property
    def sandbox_settings(self) -> SandboxSettings:
        """How the engine contains each job (``sandbox`` is the mode recorded in audit entries)."""
        return SandboxSettings(mode=self.sandbox, limits=self.sandbox_limits,
                               host_uid=self.sandbox_uid, host_gid=self.sandbox_gid,
                               remote_workers=self.remote_workers)

    @property
    def engine_audit_fields(self) -> dict[str, object]:
        """How jobs run, recorded in every admit, deny and release entry: the sandbox mode and,
        when configured, the remote workers that receive sampled users' examples."""
        fields: dict[str, object] = {"sandbox": self.sandbox}
        if self.remote_workers:
            fields["remote_workers"] = [str(worker) for worker in self.remote_workers]
        return fields


@dataclass(frozen=True)
class Deployment:
    """Paths of one deployment directory."""

    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "fedgate.toml"

    @property
    def node_private_key(self) -> Path:
        return self.root / "node.key"

    @property
    def node_public_key(self) -> Path:
        return self.root / "node.pub"

    @property
    def split_key(self) -> Path:
        return self.root / "split.key"

    @property
    def policy_model(self) -> Path:
        return self.root / "policies" / "model.conf"

    @property
    def policy_file(self) -> Path:
        return self.root / "policies" / "policy.csv"

    @property
    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    @property
    def engine_log(self) -> Path:
        return self.root / "logs" / "engine.log"

    def load_config(self) -> NodeConfig:
        if not self.config_path.exists():
            raise FileNotFoundError(
                f"{self.root} is not a fedgate deployment (no fedgate.toml); run `fedgate init`"
            )
        data = tomllib.loads(self.config_path.read_text())
        node, gw, engine = data["node"], data["gateway"], data["engine"]
        return NodeConfig(
            owner=str(node["owner"]),
            host=str(gw["host"]),
            port=int(gw["port"]),
            signature_window_seconds=int(gw["signature_window_seconds"]),
            clock_skew_seconds=int(gw["clock_skew_seconds"]),
            max_model_bytes=int(gw["max_model_bytes"]),
            max_request_bytes=int(gw["max_request_bytes"]),
            **_transport(gw),
            job_timeout_seconds=float(engine["job_timeout_seconds"]),
            sandbox=_sandbox_mode(engine["sandbox"]),
            **_evaluation_mechanism(engine),
            sandbox_uid=int(engine.get("sandbox_uid", SANDBOX_ID)),
            sandbox_gid=int(engine.get("sandbox_gid", SANDBOX_ID)),
            sandbox_limits=_sandbox_limits(engine.get("limits", {})),
            review_expiry_hours=float(data.get("review", {}).get("expiry_hours", 72.0)),
            remote_workers=_remote_workers(engine.get("remote_workers", [])),
            billing=PriceList.from_table(data["billing"]) if "billing" in data else None,
            max_concurrent_jobs=_whole_number(engine, "max_concurrent_jobs"),
            max_jobs_per_researcher=_whole_number(engine, "max_jobs_per_researcher"),
        )


def _evaluation_mechanism(engine: dict[str, Any]) -> dict[str, float]:
    """``[engine] evaluation_noise_multiplier`` and ``evaluation_loss_clip``, in the admissible
    ranges (``ledger.mechanism``: the noise multiplier charged for DP evaluation is > 0)."""
    z, clip = engine["evaluation_noise_multiplier"], engine["evaluation_loss_clip"]
    try:
        validate_evaluation_mechanism(noise_multiplier=z, loss_clip=clip)
    except MechanismParameterInvalid as error:
        raise ValueError(f"[engine] {error.message} (it is what DP evaluation is charged "
                         "for)") from None
    return {"evaluation_noise_multiplier": float(z), "evaluation_loss_clip": float(clip)}


def _whole_number(engine: dict[str, Any], key: str) -> int | None:
    """``[engine] key`` (a job-count cap): a whole number ≥ 1; absent means no limit."""
    value = engine.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"[engine] {key} must be a whole number ≥ 1")
    return value


def _sandbox_mode(value: object) -> SandboxMode:
    """``[engine] sandbox``; "process" (the walking skeleton's name for a bare process group) is
    read as "none"."""
    for mode in SANDBOX_MODES:
        if value == mode or (value, mode) == ("process", "none"):
            return mode
    raise ValueError(f"[engine] sandbox must be one of {', '.join(SANDBOX_MODES)}, not {value!r}")


def _remote_workers(value: object) -> tuple[WorkerAddress, ...]:
    """``[engine] remote_workers``: a list of "host:port"; absent (older deployments) or empty
    means TFF's local runtime."""
    if not isinstance(value, list):
        raise ValueError('[engine] remote_workers must be a list of "host:port" strings')
    workers = tuple(WorkerAddress.parse(item) for item in value)
    if len(set(workers)) != len(workers):
        raise ValueError("[engine] remote_workers lists a worker twice")
    return workers


def _sandbox_limits(table: dict[str, Any]) -> ResourceLimits:
    """``[engine.limits]``; absent keys (deployments older than the sandbox) keep defaults;
    values must be positive integers."""
    unknown = set(table) - {field.name for field in dataclass_fields(ResourceLimits)}
    if unknown:
        raise ValueError(f"[engine.limits] has unknown key {sorted(unknown)[0]!r}")
    return ResourceLimits(**{**asdict(DEFAULT_LIMITS), **table})


@contextmanager
def owner_only_files() -> Iterator[None]:
    """Inside, new files are created 0600 and directories 0700 (umask 077), whatever the
    caller's umask: the node's keys, ledger and datasets are the node user's alone.

    The umask is per process: use it in single-threaded commands (``fedgate init``,
    ``dataset import``), not in the gateway's threads.
    """
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def let_sandbox_read(tree: Path, config: NodeConfig) -> None:
    """Let the jobs that bind ``tree`` (a dataset directory) read it, and nobody else.

    A root gateway runs each job as ``sandbox_uid``/``sandbox_gid`` (``engine.sandbox_launch``
    refuses a job whose dataset that uid cannot read), so the tree joins the sandbox gid with
    group read (directories 0750, files 0640); the deployment directory around it stays 0700,
    so on the host only the job's bind reaches it. A non-root gateway's jobs keep its uid (a
    user namespace) and ``sandbox = "none"`` runs them as the gateway: nothing to grant.
    """
    if os.geteuid() != 0 or config.sandbox == "none":
        return
    for path in (tree, *tree.rglob("*")):
        os.chown(path, -1, config.sandbox_gid, follow_symlinks=False)
        path.chmod(0o750 if path.is_dir() else 0o640)


def _transport(gw: dict[str, Any]) -> dict[str, Any]:
    """``[gateway]`` public_origin, max_concurrent_uploads, max_connections and
    header_timeout_seconds; absent keys (older deployments) keep their defaults."""
    settings: dict[str, Any] = {}
    if "public_origin" in gw:
        try:
            settings["public_origin"] = Origin.parse(str(gw["public_origin"]))
        except ValueError as error:
            raise ValueError(f"[gateway] public_origin: {error}") from None
    for name in ("max_concurrent_uploads", "max_connections"):
        if name in gw:
            value = gw[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"[gateway] {name} must be a whole number ≥ 1")
            settings[name] = value
    if "header_timeout_seconds" in gw:
        timeout = gw["header_timeout_seconds"]
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ValueError("[gateway] header_timeout_seconds must be a number of seconds > 0")
        settings["header_timeout_seconds"] = float(timeout)
    return settings


def init_deployment(root: Path, *, owner: str = "owner") -> Deployment:
    """Create a new deployment directory, readable by its creator only (0700 directories,
    0600 files, the SQLite ledger included); refuses to touch an existing one."""
    check_name(owner, "owner name")
    deployment = Deployment(root.resolve())
    if deployment.config_path.exists():
        raise FileExistsError(f"{root} already holds a fedgate deployment")
    with owner_only_files():
        deployment.root.mkdir(parents=True, exist_ok=True)
        deployment.root.chmod(0o700)  # it may have existed, empty, with the caller's umask
        for directory in ("policies", "datasets", "models", "jobs", "logs"):
            (deployment.root / directory).mkdir(mode=0o700, exist_ok=True)
        deployment.config_path.write_text(CONFIG_TEMPLATE.format(owner=owner,
                                                                 limits=DEFAULT_LIMITS))
        keys.write_key_pair(keys.generate_private_key(), deployment.root / "node")
        deployment.split_key.write_bytes(secrets.token_bytes(32))
        shutil.copyfile(POLICY_TEMPLATES / "model.conf", deployment.policy_model)
        template = (POLICY_TEMPLATES / "default_policy.csv").read_text()
        deployment.policy_file.write_text(template.replace("{owner}", owner))
        engine = make_engine(database_url(deployment.root))
        create_schema(engine)
        engine.dispose()
    return deployment
