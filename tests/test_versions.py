"""Version counters (``ledger.versions``): a registry change counts in its own transaction,
and a cache answers only a reader at the version it was filled at."""

from __future__ import annotations

import pytest

from ledger import keys
from ledger.db import create_schema, make_engine, session
from ledger.registry import add_principal, revoke_principal
from ledger.versions import REGISTRY, VersionedCache, bump_version, read_version_now


def _registry_version(engine) -> int | None:  # type: ignore[no-untyped-def]
    return read_version_now(engine, REGISTRY)


def test_every_registry_change_counts_and_a_rolled_back_one_does_not(db_url: str) -> None:
    engine = make_engine(db_url)
    create_schema(engine)
    assert _registry_version(engine) == 0
    public = keys.generate_private_key().public_key()
    with session(engine) as s, s.begin():
        add_principal(s, name="alice", role="researcher", key_id=keys.key_id(public),
                      public_key_b64=keys.public_key_b64(public), group="researchers",
                      actor="owner")
    assert _registry_version(engine) == 1
    with pytest.raises(RuntimeError), session(engine) as s, s.begin():
        revoke_principal(s, name_or_key_id="alice", actor="owner")
        raise RuntimeError("the transaction fails after the revocation")
    assert _registry_version(engine) == 1
    with session(engine) as s, s.begin():
        revoke_principal(s, name_or_key_id="alice", actor="owner")
    assert _registry_version(engine) == 2
    engine.dispose()


def test_a_counter_without_a_row_is_created_by_its_first_change_and_read_as_unknown(
    db_url: str,
) -> None:
    engine = make_engine(db_url)
    create_schema(engine)
    assert read_version_now(engine, "elsewhere") is None
    with session(engine) as s, s.begin():
        bump_version(s, "elsewhere")
    assert read_version_now(engine, "elsewhere") == 1
    engine.dispose()


def test_the_cache_answers_only_at_its_version_and_never_goes_back() -> None:
    cache: VersionedCache[str, str] = VersionedCache()
    cache.put(3, "k", "at 3")
    assert cache.get(3, "k") == "at 3"
    assert cache.get(4, "k") is None and cache.get(2, "k") is None
    cache.put(2, "k", "at 2")  # an older reader's value does not replace a newer one
    assert cache.get(3, "k") == "at 3"
    cache.put(4, "other", "at 4")  # a newer version drops everything older
    assert cache.get(3, "k") is None and cache.get(4, "other") == "at 4"
    cache.put(None, "k", "unknown version")  # no counter: nothing is cached
    assert cache.get(None, "k") is None
