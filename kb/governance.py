"""KB tables of governance: hashed API keys, versioned policies and the append-only audit log.
Mixed into :class:`kb.Store`."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import duckdb

__all__ = ["ROLES", "ApiKey", "AuditEntry", "GovernanceStore", "PolicyRecord", "hash_key"]

#: Roles in increasing order of power; each includes the ones before it.
ROLES = ("viewer", "operator", "approver", "admin")

_KEY_PREFIX = "deja_"


def hash_key(key: str) -> str:
    """Keys are stored as their SHA-256: a leaked KB does not leak usable keys."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    name: str
    role: str
    created_at: datetime
    created_by: str | None
    revoked_at: datetime | None


@dataclass(frozen=True)
class PolicyRecord:
    version: int
    body: dict[str, Any]
    state: str
    origin: str
    note: str | None
    proposed_by: str
    proposed_at: datetime
    activated_by: str | None
    activated_at: datetime | None


@dataclass(frozen=True)
class AuditEntry:
    audit_id: int
    at: datetime
    actor: str
    role: str
    action: str
    target: str | None
    detail: dict[str, Any] | None


_POLICY_COLS = ("version, body, state, origin, note, proposed_by, proposed_at, activated_by, "
                "activated_at")


def _policy(row: tuple[Any, ...]) -> PolicyRecord:
    values = list(row)
    values[1] = json.loads(values[1]) if isinstance(values[1], str) else values[1]
    return PolicyRecord(*values)


class GovernanceStore:
    """Keys, policies and audit; relies on the host class's cursor and transaction."""

    if TYPE_CHECKING:  # provided by kb.Store, which mixes this class in
        def _cur(self) -> duckdb.DuckDBPyConnection: ...

        def transaction(self) -> AbstractContextManager[duckdb.DuckDBPyConnection]: ...

    # -- keys -----------------------------------------------------------------------------------
    def create_key(self, name: str, role: str, created_by: str | None = None) -> tuple[str, str]:
        """A new random key for ``role``; returns ``(key_id, key)``. Only the hash is stored,
        so the key itself is shown this once."""
        if role not in ROLES:
            raise ValueError(f"role: must be one of {', '.join(ROLES)}")
        key = _KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "key-" + secrets.token_hex(6)
        with self.transaction() as cur:
            cur.execute("INSERT INTO api_keys (key_id, name, role, key_hash, created_by) "
                        "VALUES (?, ?, ?, ?, ?)", [key_id, name, role, hash_key(key), created_by])
        return key_id, key

    def authenticate(self, key: str) -> ApiKey | None:
        """The active key matching ``key``, compared in constant time on its hash."""
        digest = hash_key(key)
        row = self._cur().execute(
            "SELECT key_id, name, role, created_at, created_by, revoked_at, key_hash "
            "FROM api_keys WHERE key_hash = ?", [digest]).fetchone()
        if row is None or not hmac.compare_digest(row[6], digest) or row[5] is not None:
            return None
        return ApiKey(*row[:6])

    def list_keys(self) -> list[ApiKey]:
        rows = self._cur().execute(
            "SELECT key_id, name, role, created_at, created_by, revoked_at FROM api_keys "
            "ORDER BY created_at").fetchall()
        return [ApiKey(*r) for r in rows]

    def revoke_key(self, key_id: str) -> bool:
        with self.transaction() as cur:
            row = cur.execute("SELECT revoked_at FROM api_keys WHERE key_id = ?",
                              [key_id]).fetchone()
            if row is None or row[0] is not None:
                return False
            cur.execute("UPDATE api_keys SET revoked_at = ? WHERE key_id = ?",
                        [datetime.now(UTC), key_id])
        return True

    def count_keys(self) -> int:
        row = self._cur().execute("SELECT count(*) FROM api_keys").fetchone()
        return int(row[0]) if row else 0

    # -- policies -------------------------------------------------------------------------------
    def add_policy(self, body: dict[str, Any], *, state: str, origin: str, proposed_by: str,
                   note: str | None = None) -> int:
        """Store the next policy version; returns its number."""
        with self.transaction() as cur:
            row = cur.execute("SELECT coalesce(max(version), 0) FROM policies").fetchone()
            version = int(row[0]) + 1 if row else 1
            now = datetime.now(UTC)
            cur.execute(
                f"INSERT INTO policies ({_POLICY_COLS}) VALUES (?, ?::JSON, ?, ?, ?, ?, ?, ?, ?)",
                [version, json.dumps({**body, "version": version}), state, origin, note,
                 proposed_by, now, proposed_by if state == "active" else None,
                 now if state == "active" else None])
        return version

    def get_policy(self, version: int) -> PolicyRecord | None:
        row = self._cur().execute(f"SELECT {_POLICY_COLS} FROM policies WHERE version = ?",
                                  [version]).fetchone()
        return _policy(row) if row else None

    def active_policy(self) -> PolicyRecord | None:
        row = self._cur().execute(
            f"SELECT {_POLICY_COLS} FROM policies WHERE state = 'active'").fetchone()
        return _policy(row) if row else None

    def list_policies(self) -> list[PolicyRecord]:
        rows = self._cur().execute(
            f"SELECT {_POLICY_COLS} FROM policies ORDER BY version DESC").fetchall()
        return [_policy(r) for r in rows]

    def activate_policy(self, version: int, by: str) -> None:
        """Make ``version`` the one active policy; the previous one is retired, both unchanged."""
        with self.transaction() as cur:
            cur.execute("UPDATE policies SET state = 'retired' WHERE state = 'active'")
            cur.execute("UPDATE policies SET state = 'active', activated_by = ?, "
                        "activated_at = ? WHERE version = ?", [by, datetime.now(UTC), version])

    # -- audit ------------------------------------------------------------------------------------
    def audit(self, actor: str, role: str, action: str, target: str | None = None,
              detail: dict[str, Any] | None = None) -> None:
        """Append one entry; callers never put keys, tokens or webhook URLs in ``detail``."""
        with self.transaction() as cur:
            cur.execute("INSERT INTO audit (actor, role, action, target, detail) "
                        "VALUES (?, ?, ?, ?, ?::JSON)",
                        [actor, role, action, target,
                         json.dumps(detail) if detail is not None else None])

    def audit_log(self, limit: int = 100, action: str | None = None) -> list[AuditEntry]:
        query = ("SELECT audit_id, logged_at, actor, role, action, target, detail FROM audit")
        params: list[Any] = []
        if action is not None:
            query += " WHERE action = ?"
            params.append(action)
        query += " ORDER BY audit_id DESC LIMIT ?"
        params.append(limit)
        rows = self._cur().execute(query, params).fetchall()
        return [AuditEntry(r[0], r[1], r[2], r[3], r[4], r[5],
                           json.loads(r[6]) if isinstance(r[6], str) else r[6]) for r in rows]
