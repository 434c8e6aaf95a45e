"""Numbered schema migrations, each applied once and recorded in ``schema_migrations``."""

from __future__ import annotations

from collections.abc import Callable

import duckdb

__all__ = ["MIGRATIONS", "migrate"]

Migration = Callable[[duckdb.DuckDBPyConnection], None]
MIGRATIONS: list[tuple[int, str, Migration]] = []


def migration(number: int, name: str) -> Callable[[Migration], Migration]:
    def register(fn: Migration) -> Migration:
        MIGRATIONS.append((number, name, fn))
        return fn

    return register


@migration(1, "core tables")
def _core(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("""
        CREATE SEQUENCE incident_seq START 1;
        CREATE TABLE incidents (
            kb_id BIGINT PRIMARY KEY DEFAULT nextval('incident_seq'),
            client_id VARCHAR UNIQUE,
            title VARCHAR NOT NULL,
            text VARCHAR,
            service VARCHAR,
            severity VARCHAR,
            source VARCHAR,
            labels JSON,
            occurred_at TIMESTAMPTZ,
            masked VARCHAR NOT NULL,
            fingerprint VARCHAR NOT NULL,
            resolution JSON,
            resolution_key VARCHAR,
            outcome VARCHAR,
            origin VARCHAR NOT NULL,
            decision_id VARCHAR,
            created_at TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        CREATE TABLE embeddings (
            fingerprint VARCHAR NOT NULL,
            model_id VARCHAR NOT NULL,
            vector FLOAT[] NOT NULL,
            created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            PRIMARY KEY (fingerprint, model_id)
        );
        CREATE TABLE decisions (
            decision_id VARCHAR PRIMARY KEY,
            created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            event JSON NOT NULL,
            fingerprint VARCHAR NOT NULL,
            service VARCHAR,
            severity VARCHAR,
            decision VARCHAR NOT NULL,
            score DOUBLE NOT NULL,
            is_novel BOOLEAN NOT NULL,
            threshold DOUBLE NOT NULL,
            confidence DOUBLE NOT NULL,
            components JSON NOT NULL,
            neighbor_ids JSON NOT NULL,
            neighbor_similarities JSON NOT NULL,
            reasons JSON NOT NULL,
            resolution JSON,
            policy_version INTEGER NOT NULL,
            model_id VARCHAR NOT NULL
        );
        CREATE TABLE feedback (
            feedback_id VARCHAR PRIMARY KEY,
            decision_id VARCHAR NOT NULL,
            correct BOOLEAN NOT NULL,
            novel BOOLEAN,
            resolution JSON,
            outcome VARCHAR,
            note VARCHAR,
            kb_id BIGINT,
            created_at TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        CREATE TABLE resolution_outcomes (
            resolution_key VARCHAR NOT NULL,
            outcome VARCHAR NOT NULL,
            source VARCHAR NOT NULL,
            ref VARCHAR,
            created_at TIMESTAMPTZ NOT NULL DEFAULT now()
        );
    """)


@migration(2, "handoff: escalations, grouped events, changes, deliveries, decision outcomes")
def _handoff(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("""
        CREATE TABLE escalations (
            escalation_id VARCHAR PRIMARY KEY,
            decision_id VARCHAR NOT NULL,
            kind VARCHAR NOT NULL,
            state VARCHAR NOT NULL,
            fingerprint VARCHAR NOT NULL,
            service VARCHAR,
            route JSON NOT NULL,
            due_at TIMESTAMPTZ NOT NULL,
            resolve_due_at TIMESTAMPTZ NOT NULL,
            events INTEGER NOT NULL DEFAULT 1,
            briefing JSON NOT NULL,
            suggested_resolution JSON,
            resolution JSON,
            policy_version INTEGER NOT NULL,
            created_at TIMESTAMPTZ NOT NULL,
            last_event_at TIMESTAMPTZ NOT NULL,
            acked_at TIMESTAMPTZ,
            acked_by VARCHAR,
            resolved_at TIMESTAMPTZ,
            resolved_by VARCHAR,
            breached_at TIMESTAMPTZ,
            breaches INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE escalation_events (
            escalation_id VARCHAR NOT NULL,
            decision_id VARCHAR NOT NULL,
            event JSON NOT NULL,
            joined_at TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE changes (
            change_id VARCHAR PRIMARY KEY,
            service VARCHAR NOT NULL,
            summary VARCHAR NOT NULL,
            changed_at TIMESTAMPTZ NOT NULL,
            author VARCHAR,
            ref VARCHAR,
            created_at TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        CREATE TABLE deliveries (
            escalation_id VARCHAR NOT NULL,
            target VARCHAR NOT NULL,
            format VARCHAR NOT NULL,
            attempt INTEGER NOT NULL,
            status VARCHAR NOT NULL,
            http_status INTEGER,
            error VARCHAR,
            attempted_at TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE decision_outcomes (
            decision_id VARCHAR NOT NULL,
            outcome VARCHAR NOT NULL,
            resolution_key VARCHAR,
            note VARCHAR,
            reported_at TIMESTAMPTZ NOT NULL DEFAULT now()
        );
    """)


@migration(3, "governance: api keys, versioned policies, audit log, decision evidence")
def _governance(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("""
        CREATE TABLE api_keys (
            key_id VARCHAR PRIMARY KEY,
            name VARCHAR NOT NULL,
            role VARCHAR NOT NULL,
            key_hash VARCHAR NOT NULL UNIQUE,
            created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            created_by VARCHAR,
            revoked_at TIMESTAMPTZ
        );
        CREATE TABLE policies (
            version INTEGER PRIMARY KEY,
            body JSON NOT NULL,
            state VARCHAR NOT NULL,
            origin VARCHAR NOT NULL,
            note VARCHAR,
            proposed_by VARCHAR NOT NULL,
            proposed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            activated_by VARCHAR,
            activated_at TIMESTAMPTZ
        );
        CREATE SEQUENCE audit_seq START 1;
        CREATE TABLE audit (
            audit_id BIGINT PRIMARY KEY DEFAULT nextval('audit_seq'),
            logged_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            actor VARCHAR NOT NULL,
            role VARCHAR NOT NULL,
            action VARCHAR NOT NULL,
            target VARCHAR,
            detail JSON
        );
        ALTER TABLE decisions ADD COLUMN evidence JSON;
        ALTER TABLE decisions ADD COLUMN actor VARCHAR;
    """)


@migration(4, "the check journal's applied sequence number")
def _journal(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("""
        CREATE TABLE journal_state (applied_seq BIGINT NOT NULL);
        INSERT INTO journal_state VALUES (0);
    """)


def migrate(con: duckdb.DuckDBPyConnection) -> list[int]:
    """Apply every migration not yet recorded, each in its own transaction; return those applied."""
    con.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
        version INTEGER PRIMARY KEY, name VARCHAR NOT NULL,
        applied_at TIMESTAMPTZ NOT NULL DEFAULT now())""")
    done = {row[0] for row in con.execute("SELECT version FROM schema_migrations").fetchall()}
    applied = []
    for number, name, fn in sorted(MIGRATIONS, key=lambda m: m[0]):
        if number in done:
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            fn(con)
            con.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)",
                        [number, name])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        applied.append(number)
    return applied
