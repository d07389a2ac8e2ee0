"""The running node: deployment, configuration, ledger engine, node key and policy.

``Node`` is the one object the gateway's handlers and the CLI share; it owns no
request state. The policy engine is rebuilt when the policy files or the key registry
change (a rebuild that fails validation keeps the previous engine; both are audited); keys
are cached while the registry's version is unchanged (``ledger.versions``).
"""

from __future__ import annotations

import logging
import threading
from functools import cached_property
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.engine import Engine
from sqlmodel import Session

from gateway.node.deployment import Deployment, NodeConfig
from gateway.node.identity import RegisteredKey
from gateway.policy.decisions import PolicyEngine
from gateway.policy.ledger_inputs import registry_memberships
from ledger import keys
from ledger.audit import append_entry
from ledger.db import create_schema, database_url, make_engine, make_read_engine, session
from ledger.fixed_sql import Statement, query_now
from ledger.group_commit import GroupCommitter
from ledger.versions import REGISTRY, VersionedCache, read_version_now

log = logging.getLogger("fedgate.node")


_KEY_ROW = Statement("SELECT name, role, public_key, status FROM principal WHERE key_id = ?")


class Node:
    def __init__(self, root: Path, *, db_url: str | None = None) -> None:
        self.deployment = Deployment(root.resolve())
        self.config: NodeConfig = self.deployment.load_config()
        url = db_url or database_url(self.deployment.root)
        self.engine: Engine = make_engine(url)
        create_schema(self.engine)
        self.read_engine: Engine = make_read_engine(url, self.engine)
        self.writer = GroupCommitter(self.engine)
        self._policy: PolicyEngine | None = None
        self._policy_stamp: tuple[object, ...] | None = None
        self._keys: VersionedCache[str, RegisteredKey] = VersionedCache()

    @cached_property
    def node_key(self) -> Ed25519PrivateKey:
        return keys.load_private_key(self.deployment.node_private_key)

    @cached_property
    def node_key_id(self) -> str:
        return keys.key_id(self.node_key.public_key())

    def session(self) -> Session:
        return session(self.engine)

    def read_session(self) -> Session:
        """A session for reads that change nothing (``ledger.db.make_read_engine``): it sees
        the last commit and never waits for, or holds up, a writer. Writing through it fails."""
        return session(self.read_engine)

    def dispose(self) -> None:
        """Stop the group-commit writer and close the ledger's connections (both engines)."""
        self.writer.close()
        self.engine.dispose()
        self.read_engine.dispose()

    def lookup_key(self, key_id: str) -> RegisteredKey | None:
        """The registered key ``key_id`` as the last commit has it, from the key cache while
        the registry's version (``ledger.versions``, read first, alone) is the one it was
        cached at; from the registry otherwise, read after the counter. Unknown ids are not
        cached."""
        version = read_version_now(self.read_engine, REGISTRY)
        cached = self._keys.get(version, key_id)
        if cached is not None:
            return cached
        # After the counter, in a later transaction: at least as new as it.
        rows = query_now(self.read_engine, _KEY_ROW, (key_id,))
        if not rows:
            return None
        name, role, public_key, status = rows[0]
        key = RegisteredKey(key_id=key_id, principal=name, role=role,
                            public_key=keys.public_key_from_b64(public_key),
                            revoked=status != "active")
        self._keys.put(version, key_id, key)
        return key

    # Serialises rebuilds, so one change is built and audited once.
    _policy_lock = threading.Lock()

    def policy(self) -> PolicyEngine:
        """The current policy engine, rebuilt when its inputs change.

        Inputs: the model and policy files (mtime, size, inode) and the key registry's
        version (``ledger.versions``: every registry change counts; a database without the
        counter rebuilds every time). A rebuild to a new version swaps the engine atomically and
        appends a ``policy`` audit entry (``reloaded``); a rebuild that fails validation
        keeps the previous engine, logs why and appends ``rejected`` with the reason, once
        per change. With no previous engine (the first build) a failure raises.
        """
        d = self.deployment
        registry = read_version_now(self.read_engine, REGISTRY)
        try:
            files = tuple((st.st_mtime_ns, st.st_size, st.st_ino)
                          for st in (d.policy_model.stat(), d.policy_file.stat()))
        except OSError:
            files = ()  # a missing file fails the rebuild below, which keeps the old engine
        stamp = (*files, registry)
        if self._policy is not None and registry is not None and stamp == self._policy_stamp:
            return self._policy
        with self._policy_lock:
            previous = self._policy
            if previous is not None and registry is not None and stamp == self._policy_stamp:
                return previous
            try:
                with self.read_session() as s:
                    memberships = registry_memberships(s, self.config.owner)
                engine = PolicyEngine.from_files(d.policy_model, d.policy_file, memberships)
            except (ValueError, OSError) as exc:  # PolicyInvalid, undecodable or missing files
                if previous is None:
                    raise
                log.error("policy reload failed; keeping policy %s: %s", previous.version, exc)
                with self.session() as s, s.begin():
                    append_entry(s, action="policy", actor="gateway", decision="rejected",
                                 policy_version=previous.version, reason=str(exc))
            else:
                if previous is None or engine.version != previous.version:
                    self._policy = engine
                if previous is not None and engine.version != previous.version:
                    log.info("policy reloaded: %s (was %s)", engine.version, previous.version)
                    with self.session() as s, s.begin():
                        append_entry(s, action="policy", actor="gateway", decision="reloaded",
                                     policy_version=engine.version,
                                     previous_version=previous.version)
            self._policy_stamp = stamp
        assert self._policy is not None
        return self._policy
