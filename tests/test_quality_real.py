"""Semantic behaviour with the real packaged model (all-MiniLM-L6-v2): what the fake encoder
cannot show. A small KB of ten alert kinds, three past occurrences each on different hosts."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.deja import Deja
from api.schemas import EventIn, ResolutionIn, Verdict
from embeddings import SentenceTransformerEncoder

pytestmark = pytest.mark.slow

PROJECT_PACKAGES = ("kb", "embeddings", "novelty", "api", "handoff")

KINDS: list[tuple[str, str, str, str]] = [
    ("disk", "Disk usage at {n}% on {h} volume /var/lib/data",
     "Clean up old log files and expand the volume", "storage"),
    ("cpu", "High CPU load on {h}: load average {n}", "Restart the runaway worker process",
     "compute"),
    ("replication", "PostgreSQL replication lag {n} seconds on replica {h}",
     "Resync the replica from the primary", "db"),
    ("tls", "TLS certificate for {h} expires in {n} days", "Renew the certificate with certbot",
     "edge"),
    ("kafka", "Kafka consumer group lag {n} messages on topic orders at {h}",
     "Scale out the consumer deployment", "queue"),
    ("oom", "Out of memory: killed process {n} (java) on {h}",
     "Raise the JVM heap limit and restart", "compute"),
    ("nginx", "Nginx upstream returned HTTP 502 for {h}", "Restart the upstream application pods",
     "edge"),
    ("dns", "DNS resolution failed for {h} after {n} retries",
     "Flush the resolver cache and check CoreDNS", "network"),
    ("redis", "Redis memory fragmentation ratio {n} on {h}",
     "Trigger active defragmentation on Redis", "cache"),
    ("backup", "Backup job failed for {h}: snapshot timeout after {n} minutes",
     "Re-run the backup with a longer timeout", "storage"),
]
KB_HOSTS = ["web-1.eu-west", "db-4.us-east", "cache-2.ap-south"]
NEW_HOST = "api-7.eu-west"
UNRELATED = "Payment provider webhook signature mismatch"


def test_real_model_loads_without_warnings(
        real_encoder_loaded: tuple[SentenceTransformerEncoder, list[warnings.WarningMessage]],
) -> None:
    """pyproject.toml makes warnings errors, except deprecations raised by third-party code."""
    _, caught = real_encoder_loaded
    ours = [f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}" for w in caught
            if not issubclass(w.category, PendingDeprecationWarning | ResourceWarning)
            and not (issubclass(w.category, DeprecationWarning)
                     and not any(f"/{p}/" in w.filename for p in PROJECT_PACKAGES))]
    assert ours == []


@pytest.fixture(scope="module")
def deja(real_encoder: SentenceTransformerEncoder) -> Iterator[Deja]:
    d = Deja.open(None, encoder=real_encoder)
    d.ingest([EventIn(id=f"{kind}-{j}", title=title.format(h=host, n=17 + 13 * j + k),
                      service=service, severity="warning", resolution=ResolutionIn(action=action),
                      outcome="resolved")
              for k, (kind, title, action, service) in enumerate(KINDS)
              for j, host in enumerate(KB_HOSTS)])
    try:
        yield d
    finally:
        d.close()


def _check(deja: Deja, title: str, service: str | None = None) -> Verdict:
    return deja.check([EventIn(title=title, service=service)], dry_run=True)[0]


@pytest.mark.parametrize(("kind", "title", "action", "service"), KINDS, ids=[k[0] for k in KINDS])
def test_a_new_variant_of_a_known_kind_is_familiar(deja: Deja, kind: str, title: str,
                                                   action: str, service: str) -> None:
    v = _check(deja, title.format(h=NEW_HOST, n=999), service)
    assert v.neighbors[0].id.startswith(f"{kind}-"), [n.id for n in v.neighbors]
    assert not v.novelty.is_novel, (v.novelty.score, v.novelty.threshold)
    assert v.decision != "escalate"
    assert v.resolution is not None and v.resolution.action == action


@pytest.mark.parametrize("service", [None, "edge"])
def test_an_unrelated_event_is_novel(deja: Deja, service: str | None) -> None:
    v = _check(deja, UNRELATED, service)
    assert v.novelty.is_novel
    assert v.decision == "escalate"
    assert v.resolution is None


def test_novelty_ranks_unrelated_events_above_every_known_variant(deja: Deja) -> None:
    known = [_check(deja, t.format(h=NEW_HOST, n=5), s).novelty.score for _, t, _, s in KINDS]
    unrelated = [_check(deja, t).novelty.score for t in (
        UNRELATED, "Quarterly sales report exported to the finance share",
        "Employee badge reader at building 3 rejected a valid card")]
    assert min(unrelated) > max(known), (known, unrelated)


@pytest.fixture(scope="module")
def started_only(real_encoder: SentenceTransformerEncoder, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Deja]:
    d = Deja.open(Path(tmp_path_factory.mktemp("vm")), encoder=real_encoder)
    d.ingest([EventIn(title=t) for t in (
        "VM web-1021 Started on hypervisor hv-3", "VM db-88 Started on hypervisor hv-12",
        "VM cache-7 Started on hypervisor hv-1", "VM batch-5 Started on hypervisor hv-9")])
    try:
        yield d
    finally:
        d.close()


def test_a_look_alike_of_another_kind_sits_further_than_a_fresh_occurrence(
        started_only: Deja) -> None:
    started = _check(started_only, "VM analytics-3310 Started on hypervisor hv-44")
    paused = _check(started_only, "VM analytics-3310 Paused on hypervisor hv-44")
    assert started.neighbors[0].similarity < 1.0  # not an exact fingerprint: a real comparison
    assert paused.neighbors[0].similarity < started.neighbors[0].similarity
    assert paused.novelty.score > started.novelty.score
