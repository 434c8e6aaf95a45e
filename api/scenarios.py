"""Realistic alert incidents generated from the Prometheus alert catalogue.

The catalogue is the community *awesome-prometheus-alerts* collection (CC BY 4.0, packaged unchanged
as ``api/data/rules.yml``, see ``api/data/README.md``). From it this module builds:

- ``load_catalogue``: every rule as an :class:`AlertRule` (about 1,150 rules in about 90 services);
- ``render_event``: one firing of a rule as an Event dict in the shape API.md defines, with the
  variation real alerts have (hosts, pods, IPs, ports, values, timestamps, title formats) while
  the alert name and description stay recognisable; optionally with the rule's resolution and an
  outcome;
- ``make_scenario``: a seeded known/novel benchmark in which whole catalogue services are held out,
  with the ground truth in parallel lists rather than in the events;
- ``demo_kb`` / ``demo_checks`` / ``demo_expected``: a small demo knowledge base and a handful of
  checks that between them produce all three decisions (replay, review, escalate).

Everything is a pure function of its inputs (the rule and a ``random.Random``, or a seed): the same
seed gives the same events, byte for byte, on every machine and Python run.
"""

from __future__ import annotations

import functools
import math
import random
import re
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DEFAULT_CATALOGUE",
    "SEVERITIES",
    "AlertRule",
    "Scenario",
    "alert_name",
    "demo_checks",
    "demo_expected",
    "demo_kb",
    "load_catalogue",
    "make_scenario",
    "normalize_severity",
    "render_event",
    "resolution_for",
    "service_slug",
]

DEFAULT_CATALOGUE = Path(__file__).parent / "data" / "rules.yml"
SEVERITIES = ("critical", "error", "warning", "info")

# Catalogue severities are mostly critical/warning/info, but forks and hand-edited copies use the
# pager vocabularies too; everything maps onto the four levels the Event schema accepts.
_SEVERITY_ALIASES = {
    "critical": "critical", "crit": "critical", "page": "critical", "emergency": "critical",
    "emerg": "critical", "alert": "critical", "fatal": "critical", "high": "critical",
    "p1": "critical", "sev1": "critical",
    "error": "error", "err": "error", "major": "error", "p2": "error", "sev2": "error",
    "warning": "warning", "warn": "warning", "minor": "warning", "medium": "warning",
    "p3": "warning", "sev3": "warning",
    "info": "info", "informational": "info", "notice": "info", "low": "info", "none": "info",
    "debug": "info", "p4": "info", "p5": "info", "sev4": "info",
}


# --------------------------------------------------------------------------------------------
# The catalogue


@dataclass(frozen=True)
class AlertRule:
    """One alert rule of the catalogue.

    ``group`` and ``service`` are the catalogue's names (``"Databases"``, ``"PostgreSQL"``),
    ``exporter`` the exporter's name (or its slug when the catalogue gives none), ``severity`` one
    of :data:`SEVERITIES`, ``duration`` the rule's ``for`` clause (``""`` when it has none).
    """

    group: str
    service: str
    exporter: str
    name: str
    description: str
    query: str
    severity: str
    duration: str = ""

    @property
    def key(self) -> str:
        """The rule's identity in scenarios: ``f"{service}/{name}"`` (unique in the catalogue)."""
        return f"{self.service}/{self.name}"


def normalize_severity(value: object) -> str:
    """Map a catalogue severity onto critical|error|warning|info; unknown values become warning.

    Warning is the fallback because it is what an unlabelled alert most often means, and it neither
    pages anyone (critical) nor hides the event (info).
    """
    text = str(value or "").strip().lower()
    return _SEVERITY_ALIASES.get(text, "warning")


def load_catalogue(path: Path | None = None) -> list[AlertRule]:
    """All rules of the catalogue at ``path`` (default: the packaged ``api/data/rules.yml``).

    Rules come in catalogue order. Services or exporters without rules are skipped. Returns a new
    list on each call; the parsed file is cached per (path, size, mtime), so repeated calls are
    cheap and an edited file is read again.
    """
    p = Path(path) if path is not None else DEFAULT_CATALOGUE
    st = p.stat()
    return list(_load_cached(str(p.resolve()), st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, size: int, mtime_ns: int) -> tuple[AlertRule, ...]:
    # size and mtime are part of the key only so that a changed file misses the cache.
    del size, mtime_ns
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml is ~10x faster when present
    with open(path, encoding="utf-8") as fh:
        doc = yaml.load(fh, Loader=loader)  # a safe loader either way
    if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list):
        raise ValueError(f"{path}: not an alert catalogue (no top-level 'groups' list)")
    rules: list[AlertRule] = []
    for group in doc["groups"]:
        for service in group.get("services") or []:
            for exporter in service.get("exporters") or []:
                exporter_name = str(exporter.get("name") or exporter.get("slug") or "exporter")
                for rule in exporter.get("rules") or []:
                    rules.append(
                        AlertRule(
                            group=str(group.get("name", "")),
                            service=str(service.get("name", "")),
                            exporter=exporter_name,
                            name=str(rule["name"]).strip(),
                            description=str(rule.get("description") or "").strip(),
                            query=str(rule.get("query") or "").strip(),
                            severity=normalize_severity(rule.get("severity")),
                            duration=str(rule.get("for") or ""),
                        )
                    )
    return tuple(rules)


# --------------------------------------------------------------------------------------------
# Names derived from a rule


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# Catalogue service names are display names; these become the names teams give the service in
# their own inventories. Everything else is the plain slug ("PostgreSQL" -> "postgresql").
_SERVICE_SLUGS = {
    "Prometheus self-monitoring": "prometheus",
    "Host and hardware": "node",
    "S.M.A.R.T Device Monitoring": "smartctl",
    "Docker containers": "docker",
    "Proxmox VE": "proxmox",
    "SQL Server": "mssql",
    "Oracle Database": "oracledb",
    "Apache Flink": "flink",
    "Apache Spark": "spark",
    "SSL/TLS": "tls-certificates",
    "Hashicorp Vault": "vault",
    "AWS CloudWatch": "cloudwatch",
    "Google Cloud Stackdriver": "stackdriver",
    "Grafana Tempo": "tempo",
    "Grafana Mimir": "mimir",
    "Grafana Alloy": "alloy",
    "OpenTelemetry Collector": "otel-collector",
}

# How resolutions name the component, a bare noun ("the {component} service"); display names such
# as "Host and hardware" would read oddly in an instruction.
_COMPONENT_NAMES = {
    "Prometheus self-monitoring": "Prometheus",
    "Host and hardware": "node",
    "S.M.A.R.T Device Monitoring": "disk",
    "Docker containers": "container",
    "SSL/TLS": "TLS",
    "Process Exporter": "process",
    "Systemd": "systemd unit",
}


def service_slug(service: str) -> str:
    """The service name an inventory would use for a catalogue service (``"PostgreSQL"`` ->
    ``"postgresql"``); distinct catalogue services get distinct slugs."""
    return _SERVICE_SLUGS.get(service) or _slug(service) or "service"


def alert_name(rule: AlertRule) -> str:
    """The Prometheus ``alertname`` of a rule, CamelCase as the catalogue's generated rules spell it
    (``"Postgresql too many connections"`` -> ``"PostgresqlTooManyConnections"``)."""
    words = re.findall(r"[A-Za-z0-9]+", rule.name)
    return "".join(w[:1].upper() + w[1:] for w in words) or "Alert"


def _job(rule: AlertRule) -> str:
    """The scrape job: the exporter's own name, or the service's when the exporter is built in."""
    low = rule.exporter.lower()
    if any(w in low for w in ("embedded", "built-in", "client", "plugin", "reporter", "exporter)")):
        return service_slug(rule.service)
    name = re.sub(r"\(.*?\)", "", rule.exporter).strip().rsplit("/", 1)[-1]
    return _slug(name.replace("_", "-")) or service_slug(rule.service)


def _stable(text: str) -> int:
    # zlib.crc32 rather than hash(): str hashes are salted per process, and ports, apps and
    # resolutions must be the same on every run.
    return zlib.crc32(text.encode("utf-8"))


# Well-known exporter ports, so instances look like the real scrape targets; others get a stable
# port in the exporter range.
_PORTS = {
    "node": 9100, "postgres": 9187, "mysqld": 9104, "redis": 9121, "mongodb": 9216,
    "elasticsearch": 9114, "blackbox": 9115, "rabbitmq": 15692, "kafka": 9308, "haproxy": 8405,
    "nginx": 9113, "memcached": 9150, "windows": 9182, "cadvisor": 8080, "process": 9256,
    "systemd": 9558, "consul": 9107, "pgbouncer": 9127, "apache": 9117, "ipmi": 9290,
    "smartctl": 9633, "kube-state-metrics": 8080, "prometheus": 9090, "etcd": 2379,
    "coredns": 9153, "jenkins": 8080, "traefik": 8082, "envoy": 9901, "zookeeper": 9141,
}


def _port(rule: AlertRule) -> int:
    job = _job(rule)
    for hint, port in _PORTS.items():
        if hint in job:
            return port
    return 9100 + _stable(job) % 800


# --------------------------------------------------------------------------------------------
# Resolutions: deterministic per rule


@dataclass(frozen=True)
class _Playbook:
    keywords: tuple[str, ...]  # regexes, matched from a word start in the lower-cased text
    action: str
    rollback: str
    automatable: bool

    def matches(self, text: str) -> bool:
        # Anchored at a word start so that "lag" does not fire inside "flag" nor "ups" in "groups".
        return any(re.search(r"\b" + k, text) for k in self.keywords)


# Ordered: the first playbook whose keyword occurs in the rule's name (then description) wins, so
# the specific causes (certificates, disks) come before the generic ones (down, errors).
_PLAYBOOKS: tuple[_Playbook, ...] = (
    _Playbook((r"certificat", r"cert\b", r"ssl", r"tls", r"expir"),
              "Renew the certificate served by the {component} endpoint and reload it without "
              "downtime; verify the new expiry date with openssl s_client",
              "Reinstall the previous certificate bundle from the secrets backup and reload", True),
    _Playbook((r"disk", r"filesystem", r"space\b", r"inode", r"volume\b", r"storage", r"bloat",
               r"wal\b"),
              "Free space on the {component} data volume (rotate and compress logs, prune expired "
              "data) and grow the volume by 20% if usage stays above 85%",
              "Restore pruned files from the last snapshot; volume growth needs no rollback", True),
    _Playbook((r"memory", r"oom", r"heap", r"swap", r"maxmemory", r"gc\b"),
              "Capture a heap profile, then restart the {component} process on the affected "
              "instance and raise its memory limit by 25%",
              "Set the memory limit back to its previous value and redeploy", True),
    _Playbook((r"cpu", r"load average", r"high load", r"throttl", r"context switch", r"saturat"),
              "Scale the {component} deployment out by one replica and shift traffic away from the "
              "hot instance",
              "Scale back in to the previous replica count once load is normal", True),
    _Playbook((r"clock", r"time offset", r"ntp\b", r"skew", r"drift"),
              "Step the clock with chronyc makestep on the affected host and restart the time "
              "sync service; check the upstream NTP servers",
              "None needed: clock stepping is not reverted", True),
    _Playbook((r"replicat", r"replica\b", r"lag\b", r"lagging", r"out of sync", r"behind"),
              "Re-sync the lagging {component} replica from the primary and check network "
              "throughput between the two",
              "Promote the old replica set back and discard the rebuilt copy", False),
    _Playbook((r"leader", r"quorum", r"split", r"election", r"raft\b"),
              "Confirm quorum, then force a leader election in the {component} cluster and "
              "restart the isolated member",
              "Restart the previous leader so that it rejoins; no data change to roll back", False),
    _Playbook((r"restart", r"flapping", r"crash ?loop", r"oomkill"),
              "Read the crash logs, fix the configuration and redeploy the {component} service "
              "from the last known-good release",
              "Redeploy the release that was running before the fix", False),
    _Playbook((r"connection", r"clients", r"sessions"),
              "Recycle idle client connections in the {component} pool and raise the connection "
              "limit by 20%",
              "Restore the previous connection limit and restart the pooler", True),
    _Playbook((r"queue", r"backlog", r"pending", r"stuck", r"consumer", r"unacked", r"messages"),
              "Scale up the {component} consumers to drain the backlog and requeue dead-lettered "
              "messages",
              "Scale the consumers back to the previous count", True),
    _Playbook((r"latency", r"slow", r"response time", r"duration", r"timeout", r"timed out"),
              "Drain the slow {component} instance from the load balancer, restart it and check "
              "the latest deploy for regressions",
              "Put the instance back into rotation", False),
    _Playbook((r"temperature", r"fan\b", r"power", r"battery", r"hardware", r"smart\b", r"psu\b",
               r"ups\b"),
              "Drain the affected host, open a hardware ticket with the datacenter and schedule a "
              "replacement of the failing component",
              "Uncordon the host once the hardware is replaced", False),
    _Playbook((r"down\b", r"missing", r"absent", r"unreachable", r"not running", r"dead\b",
               r"unavailable", r"not ready", r"not healthy", r"unhealthy", r"offline"),
              "Restart the {component} service on the affected host and confirm that its target "
              "is scraped again",
              "None needed: a restart leaves no state to revert", True),
    _Playbook((r"error", r"fail", r"5xx", r"reject", r"denied", r"invalid", r"corrupt"),
              "Roll back the latest {component} deploy and replay the failed requests from the "
              "retry queue",
              "Re-apply the rolled-back deploy once a fix is merged", False),
)

# The generic answer when no playbook matches: still an action specific to the component.
_DEFAULT_PLAYBOOK = _Playbook(
    (),
    "Follow the {component} runbook: identify the affected instance and restart the {component} "
    "service there",
    "None needed: a restart leaves no state to revert",
    True,
)

# The *other* plausible fix, used by the demo to give a rule a conflicting history.
_ALTERNATE_PLAYBOOK = _Playbook(
    (),
    "Fail the {component} service over to the standby instance and rebuild the affected node "
    "from its last backup",
    "Fail back to the original instance once it is rebuilt",
    False,
)


def _component(rule: AlertRule) -> str:
    if "exporter" in rule.name.lower():
        return _job(rule).replace("-", " ")
    return _COMPONENT_NAMES.get(rule.service, rule.service)


def _playbook(rule: AlertRule) -> _Playbook:
    for haystack in (rule.name.lower(), rule.description.lower()):
        for book in _PLAYBOOKS:
            if book.matches(haystack):
                return book
    return _DEFAULT_PLAYBOOK


def _resolution(rule: AlertRule, book: _Playbook) -> dict[str, Any]:
    component = _component(rule)
    action = book.action.format(component=component)
    # The alert name makes the action rule-specific: two rules of one service that share a playbook
    # must still count as different resolutions when neighbours are compared.
    action = f"{action[:1].upper()}{action[1:]}, then confirm that {alert_name(rule)} clears."
    return {
        "action": action,
        "runbook": f"https://runbooks.example.com/{_slug(rule.name)}",
        "rollback": book.rollback,
        "automatable": book.automatable,
    }


def resolution_for(rule: AlertRule) -> dict[str, Any]:
    """The resolution recorded for incidents of ``rule``: ``{"action", "runbook", "rollback",
    "automatable"}``.

    A pure function of the rule: every incident of one rule carries the same resolution, so that
    neighbours of the same rule agree, and different rules get different action texts.
    """
    return _resolution(rule, _playbook(rule))


# --------------------------------------------------------------------------------------------
# Rendering one firing


_POD_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # Kubernetes' suffix alphabet: no vowels, no 0/1/3
_APPS = ("checkout", "payments", "orders", "billing", "search", "catalog", "auth", "inventory",
         "shipping", "ledger")
_NAMESPACES = ("prod", "production", "monitoring", "platform", "data", "default", "apps")
_REGIONS = ("eu-west-1", "eu-central-1", "us-east-1", "us-west-2", "ap-southeast-1")
_CLUSTERS = ("prod-eu-1", "prod-us-1", "prod-us-2", "staging-eu-1", "prod-ap-1")
_ENVS = ("prod", "production", "prd")
_HOST_ROLES = {"Databases": "db", "Message brokers": "mq", "Storage": "stor",
               "Proxies, load balancers and service meshes": "lb", "Orchestrators": "k8s-worker"}
_URLS = ("https://api.example.com/healthz", "https://www.example.com/", "https://auth.example.com",
         "https://status.example.com/ping", "https://shop.example.com/api/v2/health")
_WORDS = ("orders", "users", "events", "sessions", "invoices", "payments", "metrics", "audit",
          "carts", "items")
# Services whose targets are URLs (probes) rather than host:port scrape endpoints.
_URL_TARGETS = {"Blackbox", "SSL/TLS", "SpeedTest"}
# Application-facing services are usually run per application, so inventories prefix the app.
_PREFIXED_GROUPS = {"Databases", "Message brokers", "Runtimes",
                    "Proxies, load balancers and service meshes"}

_START = datetime(2025, 1, 6, tzinfo=UTC)
_SPAN_SECONDS = 300 * 24 * 3600


def _rand_str(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_POD_ALPHABET) for _ in range(n))


def _host(rng: random.Random, rule: AlertRule) -> str:
    role = _HOST_ROLES.get(rule.group, "node")
    pick = rng.randrange(5)
    if pick == 0:
        return f"ip-10-{rng.randrange(256)}-{rng.randrange(256)}-{rng.randrange(1, 255)}"
    if pick == 1:
        return f"{role}-{rng.randrange(1, 40)}.prod"
    if pick == 2:
        return f"{role}-{rng.randrange(1, 40):02d}.{rng.choice(_REGIONS)}.internal"
    if pick == 3:
        return f"{service_slug(rule.service)}-{rng.randrange(0, 6)}.{rng.choice(_ENVS)}.example.net"
    return _ip(rng)


def _ip(rng: random.Random) -> str:
    return f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


def _label_value(
    name: str, rng: random.Random, base: dict[str, str], slug: str, context: str
) -> str:
    """A plausible value for a label a description refers to but the base labels lack.

    ``context`` (the lower-cased rule name) tells a network device from a disk.
    """
    low = name.lower()
    if low in ("node", "hostname", "server", "master_host", "peer", "to"):
        return base["instance"].split(":", 1)[0].split("//")[-1].split("/", 1)[0]
    if low in ("interface", "ifdescr") or (
        low == "device" and re.search(r"network|interface|transmit|receive|bond|link", context)
    ):
        return rng.choice(("eth0", "eth1", "ens5", "bond0", "enp3s0"))
    if low == "device":
        return rng.choice(("sda", "sdb", "nvme0n1", "nvme1n1", "xvda", "md0"))
    if low in ("mountpoint",):
        return rng.choice(("/", "/var/lib/data", "/var/log", "/data", "/srv"))
    if low == "envoy_cluster_name":
        return f"{rng.choice(_APPS)}_upstream"
    if "cluster" in low:
        return rng.choice(_CLUSTERS)
    if low == "reason":
        return rng.choice(("out-of-order-chunks", "corrupted-index", "timeout", "not-found"))
    if low in ("region",):
        return rng.choice(_REGIONS)
    if low in ("zone",):
        return rng.choice(_REGIONS) + rng.choice("abc")
    if low in ("env",):
        return rng.choice(_ENVS)
    if low in ("ip", "ipv4", "endpoint", "exported_endpoint"):
        return _ip(rng)
    if low == "master_port":
        return str(rng.choice((5432, 6379, 3306, 9092)))
    if low in ("base_url", "url", "target"):
        return rng.choice(_URLS)
    if low in ("route",):
        return rng.choice(("/api/v1/orders", "/api/v1/users/{id}", "/checkout", "/graphql"))
    if low in ("method", "verb"):
        return rng.choice(("GET", "POST", "PUT", "LIST", "WATCH"))
    if low in ("partition", "shard", "replica", "executor_id", "return_code"):
        return str(rng.randrange(0, 32))
    if low in ("id", "instance_id", "peer_id", "component_id", "service_id", "subscriptionid",
               "project_id", "public_key"):
        return f"{rng.getrandbits(48):012x}"
    if low in ("user",):
        return rng.choice(("svc_app", "replicator", "reporting", "etl"))
    if low in ("database", "datname", "relname", "collection", "index", "idxname", "indexrelname",
               "tablespace", "queue", "queue_name", "topic", "consumergroup"):
        word = rng.choice(_WORDS)
        return {"idxname": f"{word}_pkey", "indexrelname": f"{word}_created_at_idx",
                "topic": f"{word}.v1", "queue": f"{word}.created", "queue_name": f"{word}.created",
                "consumergroup": f"{word}-consumer"}.get(low, word)
    if low in ("deployment", "statefulset", "daemonset", "replicaset", "cronjob", "container",
               "horizontalpodautoscaler", "poddisruptionbudget", "service", "service_name",
               "application_name", "job_name", "task_name", "name", "backend", "proxy", "upstream",
               "groupname", "pool", "pool_name", "receiver", "collector", "processor"):
        return f"{rng.choice(_APPS)}-{slug}"
    if low in ("persistentvolumeclaim", "persistentvolume"):
        return f"data-{slug}-{rng.randrange(0, 3)}"
    return f"{low.replace('_', '-')}-{rng.randrange(1, 25)}"


_THRESHOLD = re.compile(r"(>=|<=|==|!=|>|<)\s*(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)(?![\w.])")


def _value(rng: random.Random, rule: AlertRule) -> float:
    """A value that makes the rule fire: on the violating side of the query's first threshold.

    The first comparison is the alert condition in almost every catalogue query; later ones are
    guards such as ``and on(instance) x > 0``.
    """
    m = _THRESHOLD.search(rule.query)
    if m is None:
        return 1.0 if "absent" in rule.query else round(rng.uniform(1, 100), 2)
    op, t = m.group(1), float(m.group(2))
    integral = (t.is_integer() and abs(t) >= 1) or t == 0
    if op == "==":
        return t
    if op == "!=":
        return t + rng.choice((1, 2, 3))
    if op in (">", ">="):
        v = rng.uniform(1, 40) if t == 0 else t + abs(t) * rng.uniform(0.02, 0.6)
    else:
        v = -rng.uniform(1, 10) if t == 0 else t * rng.uniform(0.2, 0.97)
    if integral and abs(v) >= 10:
        return float(round(v))
    return round(v, 4 if abs(t) < 1 and t != 0 else 2)


def _humanize(v: float, base: int = 1000) -> str:
    """Prometheus' ``humanize`` (SI prefixes) and ``humanize1024`` (binary prefixes)."""
    if v == 0 or not math.isfinite(v):
        return f"{v:.4g}"
    if base == 1024:
        prefixes = ["", "ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
        i = 0
        while abs(v) >= 1024 and i < len(prefixes) - 1:
            v /= 1024
            i += 1
        return f"{v:.4g}{prefixes[i]}"
    if abs(v) >= 1:
        big = ["", "k", "M", "G", "T", "P", "E"]
        i = 0
        while abs(v) >= 1000 and i < len(big) - 1:
            v /= 1000
            i += 1
        return f"{v:.4g}{big[i]}"
    small = ["", "m", "u", "n", "p", "f", "a"]
    i = 0
    while abs(v) < 1 and i < len(small) - 1:
        v *= 1000
        i += 1
    return f"{v:.4g}{small[i]}"


def _humanize_duration(v: float) -> str:
    """Prometheus' ``humanizeDuration``: ``1d 2h 3m 4s``, or milliseconds below one second."""
    if abs(v) < 1:
        return f"{v * 1000:.4g}ms"
    total = round(v)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if total >= size:
            parts.append(f"{total // size}{unit}")
            total %= size
    parts.append(f"{total}s")
    return " ".join(parts)


def _raw(v: float) -> str:
    # What {{ $value }} prints: Go's shortest float, integers without a fraction.
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


_TEMPLATE = re.compile(r"\{\{\s*(.*?)\s*\}\}")
_PRINTF = re.compile(r'printf\s+"([^"]*)"')


def _expand(
    text: str, value: float, labels: dict[str, str], rng: random.Random, rule: AlertRule
) -> str:
    """Expand the Go templates of a rule description the way Alertmanager would show them.

    Labels a description names but the event lacks are invented and added to ``labels``, because a
    real alert carries every label its annotations use.
    """

    def repl(m: re.Match[str]) -> str:
        expr = m.group(1)
        lab = re.search(r"\$labels\.(\w+)", expr)
        if lab is not None:
            name = lab.group(1)
            if name not in labels:
                labels[name] = _label_value(
                    name, rng, labels, service_slug(rule.service), rule.name.lower()
                )
            return labels[name]
        if "$value" in expr:
            if "humanizePercentage" in expr:
                return f"{value * 100:.4g}%"
            if "humanizeDuration" in expr:
                return _humanize_duration(value)
            if "humanize1024" in expr:
                return _humanize(value, 1024)
            if "humanize" in expr:
                return _humanize(value)
            fmt = _PRINTF.search(expr)
            if fmt is not None:
                try:
                    return fmt.group(1) % value
                except (TypeError, ValueError):
                    return _raw(value)
            return _raw(value)
        return ""

    return _TEMPLATE.sub(repl, text)


def _is_percent(rule: AlertRule) -> bool:
    q = rule.query.replace(" ", "")
    return "*100" in q or "100*" in q or "%" in rule.name


def _value_text(value: float, rule: AlertRule) -> str:
    shown = _raw(value)
    return f"{shown}%" if _is_percent(rule) else shown


def _rfc3339(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _rendered_service(rule: AlertRule, rng: random.Random) -> str:
    slug = service_slug(rule.service)
    if rule.group in _PREFIXED_GROUPS and rng.random() < 0.5:
        return f"{rng.choice(_APPS)}-{slug}"
    return slug


def render_event(rule: AlertRule, rng: random.Random, *, with_resolution: bool) -> dict[str, Any]:
    """One firing of ``rule`` as an Event dict (API.md): ``id``, ``title``, ``text``, ``service``,
    ``severity``, ``source="prometheus"``, ``labels`` and ``occurred_at`` (RFC3339, UTC).

    Hosts, pods, IPs, ports, values, durations and timestamps vary with ``rng``; the title/text
    layout is fixed per rule, as an alerting pipeline's template is; the alert name and
    description stay recognisable in every render. The result depends only on the rule and
    the state of ``rng``. With ``with_resolution`` the event also carries
    ``resolution`` (:func:`resolution_for`, identical for every render of the rule) and ``outcome``
    (``"resolved"``, or ``"failed"`` about one time in twelve). Fits API.md's limits: id <= 128,
    title <= 2000 and text <= 20000 characters.
    """
    name = alert_name(rule)
    job = _job(rule)
    if rule.service in _URL_TARGETS:
        instance = rng.choice(_URLS)
    else:
        instance = f"{_host(rng, rule)}:{_port(rule)}"
    service = _rendered_service(rule, rng)
    labels: dict[str, str] = {
        "alertname": name,
        "severity": rule.severity,
        "instance": instance,
        "job": job,
        "namespace": rng.choice(_NAMESPACES),
    }
    if rng.random() < 0.6:
        # Application services run as Deployments (<name>-<replicaset hash>-<suffix>); host-level
        # exporters as DaemonSets (<name>-<suffix>).
        if rule.group in _PREFIXED_GROUPS:
            rs = _rand_str(rng, rng.choice((9, 10)))
            labels["pod"] = f"{service}-{rs}-{_rand_str(rng, 5)}"
        else:
            labels["pod"] = f"{job}-{_rand_str(rng, 5)}"
    if rng.random() < 0.4:
        labels["cluster"] = rng.choice(_CLUSTERS)
    value = _value(rng, rule)
    description = _expand(rule.description, value, labels, rng, rule)
    occurred = _START + timedelta(seconds=rng.randrange(_SPAN_SECONDS))
    firing_for = timedelta(seconds=rng.randrange(60, 3 * 3600))
    host = instance.split(":", 1)[0] if rule.service not in _URL_TARGETS else instance

    # The layout is the alerting pipeline's template: fixed per rule (one Alertmanager config
    # renders a given alert the same way every time); only values, hosts and labels vary.
    layout = random.Random(_stable(f"layout/{rule.group}/{rule.service}/{rule.name}"))
    title_style = layout.randrange(5)
    if title_style == 0:
        title = f"[FIRING:{rng.choice((1, 1, 1, 2, 3))}] {name} ({instance} {job} {rule.severity})"
    elif title_style == 1:
        title = f"{rule.name} on {host}"
    elif title_style == 2:
        title = f"{name}: {description}"
    elif title_style == 3:
        title = f"[{rule.severity.upper()}] {rule.name} - {host}"
    else:
        title = rule.name

    lines: list[str] = []
    lines.append(layout.choice(("", "Summary: ", "Description: ", "")) + description)
    value_style = layout.randrange(4)
    if value_style == 0:
        lines.append(f"Current value: {_value_text(value, rule)}")
    elif value_style == 1:
        lines.append(f"VALUE = {_raw(value)}")
    elif value_style == 2:
        lines.append(f"{rule.name.lower()}: observed {_value_text(value, rule)} on {host}")
    if layout.random() < 0.5:
        inner = " ".join(f"{k}:{v}" for k, v in sorted(labels.items()))
        lines.append(f"LABELS = map[{inner}]")
    if layout.random() < 0.6:
        since = _rfc3339(occurred - firing_for)
        lines.append(f"Firing since {since} (for {_humanize_duration(firing_for.total_seconds())})")
    if rule.duration and layout.random() < 0.3:
        lines.append(f"Pending period: {rule.duration}")
    if layout.random() < 0.3:
        lines.append(f"Expression: {rule.query}")

    event: dict[str, Any] = {
        # An Alertmanager-style fingerprint: 64 random bits, unique in practice.
        "id": f"prom-{rng.getrandbits(64):016x}",
        "title": title[:2000],
        "text": "\n".join(line for line in lines if line)[:20000],
        "service": service,
        "severity": rule.severity,
        "source": "prometheus",
        "labels": labels,
        "occurred_at": _rfc3339(occurred),
    }
    if with_resolution:
        event["resolution"] = resolution_for(rule)
        event["outcome"] = "failed" if rng.random() < 1 / 12 else "resolved"
    return event


# --------------------------------------------------------------------------------------------
# Known / novel scenarios


@dataclass
class Scenario:
    """A seeded known/novel benchmark built from the catalogue.

    ``kb``: past incidents (with resolution and outcome) of the known services. ``known``: fresh
    firings of rules the KB holds; ``novel``: firings of rules from services the KB has never seen.
    Query events carry no resolution, no outcome and no ground truth; the truth is in the parallel
    lists ``kb_rules`` / ``known_rules`` / ``novel_rules`` (rule keys ``f"{service}/{name}"``,
    aligned index by index), and ``novel_services`` names the held-out catalogue services.
    """

    kb: list[dict[str, Any]]
    known: list[dict[str, Any]]
    novel: list[dict[str, Any]]
    seed: int
    kb_rules: list[str] = field(default_factory=list)
    known_rules: list[str] = field(default_factory=list)
    novel_rules: list[str] = field(default_factory=list)
    novel_services: list[str] = field(default_factory=list)


def _unique_id(event: dict[str, Any], seen: set[str]) -> None:
    # 64-bit random ids practically never collide, but a scenario promises unique ids outright.
    base = str(event["id"])
    candidate, n = base, 1
    while candidate in seen:
        candidate = f"{base}-{n}"
        n += 1
    event["id"] = candidate
    seen.add(candidate)


def _shuffled(
    rng: random.Random, events: list[dict[str, Any]], keys: list[str]
) -> tuple[list[dict[str, Any]], list[str]]:
    # Shuffled together so that nothing about the order (rule blocks, known first) hints at truth.
    order = list(range(len(events)))
    rng.shuffle(order)
    return [events[i] for i in order], [keys[i] for i in order]


def make_scenario(
    seed: int = 0,
    *,
    holdout_fraction: float = 0.3,
    kb_per_rule: int = 3,
    queries_per_rule: int = 2,
    max_rules: int | None = None,
) -> Scenario:
    """A known/novel scenario: whole catalogue services are held out as novel.

    ``round(holdout_fraction * services)`` services (at least one, and at least one stays known),
    chosen with ``seed``, are *novel*; all other services are *known*. The KB holds ``kb_per_rule``
    rendered incidents with resolutions of every known rule; ``known`` holds ``queries_per_rule``
    fresh renders (other values, no resolution or outcome) of every known rule, ``novel`` as many
    renders of every held-out rule. ``max_rules`` first restricts the catalogue to a seeded sample
    of that many rules. Each list is shuffled; ids are unique across the whole scenario. Same
    arguments, same scenario.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError("holdout_fraction must be in (0, 1)")
    if kb_per_rule < 1 or queries_per_rule < 1:
        raise ValueError("kb_per_rule and queries_per_rule must be >= 1")
    rng = random.Random(seed)
    rules = load_catalogue()
    if max_rules is not None:
        if max_rules < 2:
            raise ValueError("max_rules must be >= 2")
        if max_rules < len(rules):
            picked = sorted(rng.sample(range(len(rules)), max_rules))
            rules = [rules[i] for i in picked]
    services = list(dict.fromkeys(r.service for r in rules))
    if len(services) < 2:
        raise ValueError("the sampled catalogue needs at least two services to hold one out")
    n_hold = min(max(1, round(holdout_fraction * len(services))), len(services) - 1)
    held = set(rng.sample(services, n_hold))
    known_rules = [r for r in rules if r.service not in held]
    novel_rules = [r for r in rules if r.service in held]

    seen: set[str] = set()

    def renders(
        rs: list[AlertRule], per_rule: int, with_resolution: bool
    ) -> tuple[list[dict[str, Any]], list[str]]:
        events: list[dict[str, Any]] = []
        keys: list[str] = []
        for rule in rs:
            for _ in range(per_rule):
                event = render_event(rule, rng, with_resolution=with_resolution)
                _unique_id(event, seen)
                events.append(event)
                keys.append(rule.key)
        return _shuffled(rng, events, keys)

    kb, kb_keys = renders(known_rules, kb_per_rule, True)
    known, known_keys = renders(known_rules, queries_per_rule, False)
    novel, novel_keys = renders(novel_rules, queries_per_rule, False)
    return Scenario(
        kb=kb,
        known=known,
        novel=novel,
        seed=seed,
        kb_rules=kb_keys,
        known_rules=known_keys,
        novel_rules=novel_keys,
        novel_services=[s for s in services if s in held],
    )


# --------------------------------------------------------------------------------------------
# The demo knowledge base

# Services most operators recognise, so the demo reads familiar.
_DEMO_SERVICES = (
    "Host and hardware", "Docker containers", "Blackbox", "MySQL", "PostgreSQL", "Redis",
    "MongoDB", "Elasticsearch", "RabbitMQ", "Kafka", "Nginx", "HaProxy", "Kubernetes", "Etcd",
    "CoreDNS", "SSL/TLS", "JVM", "Systemd",
)
_DEMO_RULES = 90  # x 5 incidents = 450 KB events: quick to embed, rich enough to be realistic
_DEMO_PER_RULE = 5
_DEMO_CONFLICTING = 5
_DEMO_FAILING = 5

# Written by hand, not from the catalogue: nothing in the demo KB resembles them.
_NOVEL_DEMO_EVENTS: tuple[dict[str, Any], ...] = (
    {
        "title": "Payment provider webhook signature mismatch for merchant 4411",
        "text": "Webhook deliveries to /v1/webhooks/payments fail HMAC signature verification "
                "since 09:12 UTC; 1,284 events rejected in 15 minutes. The provider rotated its "
                "signing secret at 09:10 according to their status page.",
        "service": "payments-gateway",
        "severity": "critical",
        "source": "payments-gateway",
        "labels": {"merchant_id": "4411", "endpoint": "/v1/webhooks/payments", "team": "payments"},
        "occurred_at": "2025-11-03T09:14:07Z",
    },
    {
        "title": "Feature flag 'new-checkout-flow' evaluates differently across regions",
        "text": "eu-west-1 serves variant B to 100% of users while us-east-1 serves variant A; the "
                "flag store replicas report ruleset versions 182 and 179. Conversion in eu-west-1 "
                "dropped 6% in the last hour.",
        "service": "feature-flags",
        "severity": "warning",
        "source": "flagd",
        "labels": {"flag": "new-checkout-flow", "team": "growth"},
        "occurred_at": "2025-11-03T11:42:55Z",
    },
    {
        "title": "Nightly invoice export produced 0 rows for tenant acme-eu",
        "text": "The billing export job exited 0 but wrote an empty CSV to "
                "s3://billing-exports/2025-11-02/acme-eu.csv; the previous 30 runs averaged 12,400 "
                "rows. Downstream reconciliation will flag every open invoice as missing.",
        "service": "billing-export",
        "severity": "error",
        "source": "airflow",
        "labels": {"tenant": "acme-eu", "dag": "invoice_export_nightly", "team": "billing"},
        "occurred_at": "2025-11-03T02:31:10Z",
    },
)


@dataclass(frozen=True)
class _DemoPlan:
    consistent: tuple[AlertRule, ...]
    conflicting: tuple[AlertRule, ...]
    failing: tuple[AlertRule, ...]


def _demo_plan(seed: int) -> _DemoPlan:
    rng = random.Random(f"deja-demo-plan-{seed}")
    pool = [r for r in load_catalogue() if r.service in _DEMO_SERVICES]
    chosen = rng.sample(pool, min(_DEMO_RULES, len(pool)))
    # The replay examples must be warning/info rules: policies send critical events to review.
    calm = [r for r in chosen if r.severity in ("warning", "info")]
    rest = [r for r in chosen if r not in calm[:3]]
    conflicting = tuple(rest[:_DEMO_CONFLICTING])
    failing = tuple(rest[_DEMO_CONFLICTING:_DEMO_CONFLICTING + _DEMO_FAILING])
    special = set(conflicting) | set(failing)
    # Replay candidates first, so demo_checks can take the first three.
    replayable = calm[:3]
    consistent = (*replayable, *(r for r in chosen if r not in special and r not in replayable))
    return _DemoPlan(consistent=consistent, conflicting=conflicting, failing=failing)


def demo_kb(seed: int = 0) -> list[dict[str, Any]]:
    """A demo knowledge base of about 450 incidents (5 per rule, ids ``demo-kb-NNNN``).

    Most rules have one consistent resolution and only good outcomes (checks of them replay); five
    rules have incidents with two different resolutions (checks review: neighbours disagree); five
    rules have a mostly failed history (checks review: poor track record). Same seed, same KB.
    """
    plan = _demo_plan(seed)
    rng = random.Random(f"deja-demo-kb-{seed}")
    events: list[dict[str, Any]] = []
    for rule in plan.consistent:
        for _ in range(_DEMO_PER_RULE):
            e = render_event(rule, rng, with_resolution=True)
            e["outcome"] = "resolved"
            events.append(e)
    for rule in plan.conflicting:
        for i in range(_DEMO_PER_RULE):
            e = render_event(rule, rng, with_resolution=True)
            if i % 2 == 1:
                e["resolution"] = _resolution(rule, _ALTERNATE_PLAYBOOK)
            e["outcome"] = "resolved"
            events.append(e)
    for rule in plan.failing:
        for i in range(_DEMO_PER_RULE):
            e = render_event(rule, rng, with_resolution=True)
            e["outcome"] = "resolved" if i == 0 else "failed"
            events.append(e)
    rng.shuffle(events)
    for i, e in enumerate(events):
        e["id"] = f"demo-kb-{i:04d}"
    return events


def demo_checks(seed: int = 0) -> list[dict[str, Any]]:
    """Nine demo check events, in the order of :func:`demo_expected`.

    Three fresh firings of consistent rules (expect replay), two of conflicting rules and one of a
    rule with a failed history (expect review), and three hand-written events unlike anything in the
    catalogue (expect escalate). Ids are ``demo-check-N``; no resolution or outcome.
    """
    plan = _demo_plan(seed)
    rng = random.Random(f"deja-demo-checks-{seed}")
    rules = [*plan.consistent[:3], *plan.conflicting[:2], *plan.failing[:1]]
    events = [render_event(r, rng, with_resolution=False) for r in rules]
    events += [{**e, "labels": dict(e["labels"])} for e in _NOVEL_DEMO_EVENTS]
    for i, e in enumerate(events, 1):
        e["id"] = f"demo-check-{i}"
    return events


def demo_expected(seed: int = 0) -> list[str]:
    """The decision each :func:`demo_checks` event is built to get, aligned index by index."""
    del seed  # the layout of the demo checks does not depend on the seed
    return ["replay"] * 3 + ["review"] * 3 + ["escalate"] * len(_NOVEL_DEMO_EVENTS)
