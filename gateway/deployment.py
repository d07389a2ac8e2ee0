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

import secrets
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path

from gateway import keys

POLICY_TEMPLATES = Path(__file__).resolve().parent.parent / "policies"

CONFIG_TEMPLATE = """\
# fedgate node configuration (written by `fedgate init`).
[node]
# The data owner's name; it is the Casbin domain of every rule in policies/policy.csv.
owner = "{owner}"

[gateway]
host = "127.0.0.1"
port = 8620
# RFC 9421 signatures: maximum validity (seconds) and tolerated clock skew.
signature_window_seconds = 300
clock_skew_seconds = 5
# Request body limits (bytes): model uploads and everything else.
max_model_bytes = 67108864
max_request_bytes = 1048576

[engine]
# Wall-clock limit for one job.
job_timeout_seconds = 3600
# "process": each job runs in its own process group (bubblewrap sandbox: issue 8).
sandbox = "process"
# DP evaluation on held-out users: noise multiplier and per-user loss clip.
evaluation_noise_multiplier = 10.0
evaluation_loss_clip = 5.0
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
    sandbox: str
    evaluation_noise_multiplier: float
    evaluation_loss_clip: float


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
            job_timeout_seconds=float(engine["job_timeout_seconds"]),
            sandbox=str(engine["sandbox"]),
            evaluation_noise_multiplier=float(engine["evaluation_noise_multiplier"]),
            evaluation_loss_clip=float(engine["evaluation_loss_clip"]),
        )


def init_deployment(root: Path, *, owner: str = "owner") -> Deployment:
    """Create a new deployment directory; refuses to touch an existing one."""
    from ledger.db import create_schema, database_url, make_engine

    deployment = Deployment(root.resolve())
    if deployment.config_path.exists():
        raise FileExistsError(f"{root} already holds a fedgate deployment")
    for directory in ("policies", "datasets", "models", "jobs", "logs"):
        (deployment.root / directory).mkdir(parents=True, exist_ok=True)
    deployment.config_path.write_text(CONFIG_TEMPLATE.format(owner=owner))
    keys.write_key_pair(keys.generate_private_key(), deployment.root / "node")
    deployment.split_key.write_bytes(secrets.token_bytes(32))
    deployment.split_key.chmod(0o600)
    shutil.copyfile(POLICY_TEMPLATES / "model.conf", deployment.policy_model)
    template = (POLICY_TEMPLATES / "default_policy.csv").read_text()
    deployment.policy_file.write_text(template.replace("{owner}", owner))
    engine = make_engine(database_url(deployment.root))
    create_schema(engine)
    engine.dispose()
    return deployment
