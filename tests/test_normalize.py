"""Masking of volatile tokens, canonical text and fingerprints (embeddings/normalize.py)."""

from __future__ import annotations

import importlib
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embeddings import canonical_text, fingerprint, lexical_tokens, mask, normalize
from embeddings.normalize import MAX_CANONICAL_CHARS


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # UUIDs
        ("request 550e8400-e29b-41d4-a716-446655440000 failed", "request <UUID> failed"),
        ("trace 123E4567-E89B-12D3-A456-426614174000", "trace <UUID>"),
        # IPv4, with and without port
        ("connect to 10.0.0.12 refused", "connect to <IP> refused"),
        ("connect to 10.0.0.12:5432 refused", "connect to <IP> refused"),
        ("peer 192.168.1.254:65535 reset", "peer <IP> reset"),
        # IPv6: full and compressed forms
        ("addr 2001:0db8:85a3:0000:0000:8a2e:0370:7334 down", "addr <IP> down"),
        ("addr 2001:db8:0:0:0:0:2:1 down", "addr <IP> down"),
        ("addr 2001:db8::1 down", "addr <IP> down"),
        ("addr fe80::1ff:fe23:4567:890a down", "addr <IP> down"),
        # MAC addresses
        ("nic 00:1a:2b:3c:4d:5e link down", "nic <MAC> link down"),
        ("nic 00-1A-2B-3C-4D-5E link down", "nic <MAC> link down"),
        # hex literals and hashes
        ("fault at 0xdeadbeef in kernel", "fault at <HEX> in kernel"),
        ("fault at 0X7FFF0010 in kernel", "fault at <HEX> in kernel"),
        ("commit 3f2a9c1b7e deployed", "commit <HEX> deployed"),
        ("md5 d41d8cd98f00b204e9800998ecf8427e mismatch", "md5 <HEX> mismatch"),
        ("digest e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855 bad",
         "digest <HEX> bad"),
        # ISO timestamps
        ("at 2024-03-01T12:34:56Z start", "at <TS> start"),
        ("at 2024-03-01T12:34:56.123+02:00 start", "at <TS> start"),
        ("at 2024-03-01 12:34:56 start", "at <TS> start"),
        # clock times
        ("at 12:34:56 start", "at <TS> start"),
        ("at 07:05:09.250 start", "at <TS> start"),
        # dates
        ("on 2024-03-01 backup", "on <TS> backup"),
        ("on 2024/03/01 backup", "on <TS> backup"),
        ("on 03/01/2024 backup", "on <TS> backup"),
        ("on 01.03.2024 backup", "on <TS> backup"),
        # web-server (common log format) timestamps: normalize.py has a pattern for them
        ("GET / [01/Mar/2024:12:34:56 +0000] slow", "GET / [<TS>] slow"),
        # long numbers, decimals and numbers with units
        ("wrote 1234567 bytes", "wrote <NUM> bytes"),
        ("ts 1700000000123 skew", "ts <NUM> skew"),
        ("disk 91.3% full", "disk <NUM>% full"),
        ("latency 250ms over budget", "latency <NUM>ms over budget"),
        # Kubernetes pod suffixes
        ("pod api-7f9c8d6b5-x2kqz crashed", "pod api-<POD> crashed"),
        ("pod payments-worker-5d8f7c9b4-qz2xw crashed", "pod payments-worker-<POD> crashed"),
        ("pod worker-x2kqz crashed", "pod worker-<POD> crashed"),
        # HTTP status codes are kept when context says so
        ("HTTP 503 from upstream", "HTTP 503 from upstream"),
        ("status code: 404", "status code: 404"),
        ("upstream returned 500", "upstream returned 500"),
        ("code=429 rate limited", "code=429 rate limited"),
        # short digits glued to words are kept; separated or longer runs are masked
        ("eth0 link down", "eth0 link down"),
        ("ssh2 auth failed", "ssh2 auth failed"),
        ("IPv4 route missing", "IPv4 route missing"),
        ("node-7 unreachable", "node-<NUM> unreachable"),
        ("user123 locked out", "user<NUM> locked out"),
        # real words with hyphens are not pod suffixes
        ("redis-cache evicting keys", "redis-cache evicting keys"),
        # whitespace collapses
        ("  disk \t full \n on   host  ", "disk full on host"),
    ],
)
def test_mask_cases(text: str, expected: str) -> None:
    assert mask(text) == expected


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("Disk full on 10.0.0.1:22", "Disk full on 172.16.4.200:8022"),
        ("Job 550e8400-e29b-41d4-a716-446655440000 failed",
         "Job 6ba7b810-9dad-11d1-80b4-00c04fd430c8 failed"),
        ("pod api-7f9c8d6b5-x2kqz OOMKilled at 2024-03-01T12:00:00Z",
         "pod api-6c4d9f8b7-m7lpw OOMKilled at 2025-11-30T23:59:59Z"),
        ("Replication lag 1234 seconds on node-3", "Replication lag 98 seconds on node-12"),
        ("Disk 91.5% full", "Disk 99% full"),
        ("crash at 0xdeadbeef", "crash at 0x00c0ffee"),
        ("nic 00:1a:2b:3c:4d:5e flapping", "nic aa:bb:cc:dd:ee:ff flapping"),
        ("Disk Full on host", "disk full ON HOST"),  # fingerprints ignore case
        ("neighbour fe80::1 unreachable", "neighbour fe80::2 unreachable"),
        ("neighbour 2001:db8::1 unreachable", "neighbour 2001:db9::42 unreachable"),
    ],
)
def test_same_kind_different_values_share_a_fingerprint(first: str, second: str) -> None:
    assert fingerprint(mask(first)) == fingerprint(mask(second))


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("VM Started on host-1", "VM Paused on host-1"),
        ("VM Started", "VM Paused"),
        ("HTTP 503 from upstream", "HTTP 504 from upstream"),
        ("eth0 link down", "eth1 link down"),
        ("Disk full on /var", "Disk full on /home"),
    ],
)
def test_different_kinds_get_different_fingerprints(first: str, second: str) -> None:
    assert fingerprint(mask(first)) != fingerprint(mask(second))


def test_fingerprint_is_a_stable_128_bit_hex_digest() -> None:
    fp = fingerprint("disk full on <IP>")
    assert re.fullmatch(r"[0-9a-f]{32}", fp)
    assert fp == fingerprint("disk full on <IP>")


def test_canonical_text_is_title_then_description_head() -> None:
    assert canonical_text({"title": " Disk full "}) == "Disk full"
    assert canonical_text({"title": "Disk full", "text": " on /var "}) == "Disk full\non /var"
    assert canonical_text({"title": "Disk full", "text": None}) == "Disk full"
    long = canonical_text({"title": "t", "text": "x" * 50_000})
    assert len(long) == MAX_CANONICAL_CHARS


def test_normalize_masks_title_and_text() -> None:
    assert normalize({"title": "Disk full on 10.0.0.1", "text": "at 12:00:01"}) == (
        "Disk full on <IP> at <TS>")


def test_lexical_tokens_lower_case_words_and_placeholders() -> None:
    assert lexical_tokens("Disk FULL on <IP>, eth0!") == frozenset(
        {"disk", "full", "on", "<ip>", "eth0"})


# Text that looks like operations logs: digits, hex letters and the separators the masks use.
_LOGGY = st.text(alphabet=st.sampled_from(list("0123456789abcdefxyzABCDEFGT:-./_%=# ")),
                 max_size=60)
_TEXTS = st.one_of(st.text(max_size=200), _LOGGY)


@settings(max_examples=400, deadline=None)
@given(_TEXTS)
def test_mask_is_idempotent(text: str) -> None:
    once = mask(text)
    assert mask(once) == once


@pytest.mark.parametrize("text", ["bond 2x10G link down", "raid 2x100GB degraded"])
def test_mask_is_idempotent_on_multiplied_units(text: str) -> None:
    """Found by the property above: a digit glued before a letter-and-digits word."""
    once = mask(text)
    assert mask(once) == once


@settings(max_examples=400, deadline=None)
@given(_TEXTS)
def test_mask_never_raises_and_returns_trimmed_text(text: str) -> None:
    out = mask(text)
    assert isinstance(out, str)
    assert out == out.strip()
    assert "  " not in out


@settings(max_examples=400, deadline=None)
@given(_TEXTS)
def test_mask_leaves_no_run_of_four_digits(text: str) -> None:
    assert re.search(r"\d{4,}", mask(text)) is None


# -- the guards of _mask_once change nothing ------------------------------------------------------

# The module (the package's ``normalize`` attribute is the function).
N = importlib.import_module("embeddings.normalize")


def _mask_unguarded(text: str) -> str:
    """:func:`mask` with every rule applied to every text, as the rules read."""
    def once(text: str) -> str:
        out: str = text
        for pattern, placeholder in N._MASKS:
            out = pattern.sub(placeholder, out)
        out = N._HTTP_CODE.sub(N._shield_code, out)
        out = N._NUMBER.sub("<NUM>", out)
        out = N._INNER_DIGITS.sub("<NUM>", out)
        out = out.translate(N._UNSHIELD)
        collapsed: str = N._WS.sub(" ", out)
        return collapsed.strip()

    out = once(text)
    for _ in range(3):
        again = once(out)
        if again == out:
            break
        out = again
    return out


def test_every_rule_has_a_guard() -> None:
    assert len(N._GUARDS) == len(N._MASKS)


# The guards' own characters, Unicode digits and the shield's private-use characters.
_GUARDED = st.lists(st.sampled_from(
    [*"0123456789abcdefxXipABCDEFGT:-./@_%= \n", "٣", "\ue001", "::", "ip-", "0x"]),
    max_size=60).map("".join)


@pytest.mark.parametrize("text", [
    # Each rule matching with as few of the guards' characters as it can have.
    "id abcdefab-abcd-abcd-abcd-abcdefabcdef", "mail ops@example.com", "mac aa-bb-cc-dd-ee-ff",
    "mac aa:bb:cc:dd:ee:ff", "v6 dead:beef:cafe:babe:dead:beef:cafe:babe", "v6 fe80::", "v6 ::",
    "pod api-bcdfghj-bcdfg", "pod api-bc2fg", "host db-7.prod", "ip-10-0-3-17 up", "ptr 0XFF",
    "seen 12/Mar/2024:10:00:00 +0000", "on 2024.03.12", "at 10:00:00", "hash deadbeef1",
    "status 503", "\ue001\ue002 shielded", "٣٤ arabic digits", "a.b.c-9.example",
])
def test_guarded_masking_equals_the_rules_on_each_rules_edge(text: str) -> None:
    assert mask(text) == _mask_unguarded(text)


@settings(max_examples=1500, deadline=None)
@given(st.one_of(_TEXTS, _GUARDED))
def test_guarded_masking_equals_the_rules_applied_everywhere(text: str) -> None:
    assert mask(text) == _mask_unguarded(text)


def test_guarded_masking_equals_the_rules_on_real_logs_and_alerts() -> None:
    from api.scenarios import load_catalogue, render_event
    from bench.loghub import discover_systems, load_system

    texts = [canonical_text(render_event(rule, random.Random(i), with_resolution=False))
             for i, rule in enumerate(load_catalogue())]
    for system in discover_systems():
        texts += [line.content for line in load_system(system)[:300]]
    assert len(texts) > 1000
    for text in texts:
        assert mask(text) == _mask_unguarded(text), text
