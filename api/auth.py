"""Who is calling: bearer keys, roles, and the principal every mutation is audited under."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from kb import ROLES, DejaError, Store, hash_key

__all__ = ["SYSTEM", "Authenticator", "Forbidden", "Principal", "Unauthorized"]


class Unauthorized(DejaError):
    """No valid bearer key (HTTP 401)."""


class Forbidden(DejaError):
    """The key's role is too low for this route (HTTP 403)."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller (or Deja itself, for work nobody asked for)."""

    actor: str
    role: str
    key_id: str | None = None

    def has(self, role: str) -> bool:
        """Roles include the ones below them: viewer < operator < approver < admin."""
        return ROLES.index(self.role) >= ROLES.index(role)


SYSTEM = Principal(actor="deja", role="admin")


class Authenticator:
    """Maps bearer keys to principals, caching by key hash; revocation clears the cache."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._cache: dict[str, Principal] = {}
        self._lock = threading.Lock()

    def cached(self, key: str) -> Principal | None:
        """The principal of a key seen before and not revoked since; no KB query (None when
        it must be looked up with :meth:`principal`)."""
        with self._lock:
            return self._cache.get(hash_key(key))

    def principal(self, key: str) -> Principal | None:
        digest = hash_key(key)
        with self._lock:
            hit = self._cache.get(digest)
        if hit is not None:
            return hit
        found = self.store.authenticate(key)
        if found is None:
            return None
        p = Principal(actor=found.name, role=found.role, key_id=found.key_id)
        with self._lock:
            self._cache[digest] = p
        return p

    def forget(self) -> None:
        with self._lock:
            self._cache.clear()
