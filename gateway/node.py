"""The running node: deployment, configuration, ledger engine, node key and policy.

``Node`` is the one object the gateway's handlers and the CLI share; it owns no
request state. The policy engine is rebuilt when the policy files or the key registry
change (a rebuild that fails validation keeps the previous engine).
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from gateway import keys
from gateway.deployment import Deployment, NodeConfig
from gateway.policy import PolicyEngine, PolicyInvalid
from gateway.signatures import RegisteredKey
from ledger.db import create_schema, database_url, make_engine, session
from ledger.models import Principal

log = logging.getLogger("fedgate.node")


class Node:
    def __init__(self, root: Path, *, db_url: str | None = None) -> None:
        self.deployment = Deployment(root.resolve())
        self.config: NodeConfig = self.deployment.load_config()
        self.engine: Engine = make_engine(db_url or database_url(self.deployment.root))
        create_schema(self.engine)
        self._policy: PolicyEngine | None = None
        self._policy_stamp: tuple[object, ...] | None = None

    @cached_property
    def node_key(self) -> Ed25519PrivateKey:
        return keys.load_private_key(self.deployment.node_private_key)

    @cached_property
    def node_key_id(self) -> str:
        return keys.key_id(self.node_key.public_key())

    def session(self) -> Session:
        return session(self.engine)

    def lookup_key(self, key_id: str) -> RegisteredKey | None:
        with self.session() as s:
            row = s.get(Principal, key_id)
        if row is None:
            return None
        return RegisteredKey(
            key_id=row.key_id,
            principal=row.name,
            role=row.role,
            public_key=keys.public_key_from_b64(row.public_key),
            revoked=row.status != "active",
        )

    def policy(self) -> PolicyEngine:
        """The current policy engine, rebuilt if its inputs changed."""
        d = self.deployment
        with self.session() as s:
            registry = s.exec(
                select(func.count(), func.max(Principal.created_at), func.max(Principal.revoked_at))
            ).one()
            memberships = [
                (p.name, p.group, self.config.owner)
                for p in s.exec(select(Principal).where(Principal.status == "active")).all()
                if p.group
            ]
        stamp = (d.policy_model.stat().st_mtime_ns, d.policy_file.stat().st_mtime_ns, *registry)
        if self._policy is None or stamp != self._policy_stamp:
            try:
                self._policy = PolicyEngine(d.policy_model, d.policy_file, memberships)
            except PolicyInvalid:
                if self._policy is None:
                    raise
                log.exception("policy reload failed; keeping policy %s", self._policy.version)
            self._policy_stamp = stamp
        return self._policy
