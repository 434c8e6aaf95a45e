"""Canonical text, masking of volatile tokens, fingerprints and lexical tokens.

Masking replaces values that change from one occurrence of an event to the next (ids, numbers,
addresses, hashes, timestamps, pod suffixes) with placeholders, so that two occurrences of the same
kind of event share one *fingerprint*. What carries meaning is kept: words, HTTP status codes, short
digits glued to a word (``eth0``, ``ssh2``, ``IPv4``).

The masked text is also what gets embedded, for the knowledge base and for queries alike, so a cache
hit on a fingerprint returns exactly the vector the model would have produced.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["canonical_text", "fingerprint", "lexical_tokens", "mask", "normalize"]

# Only the head of a long description is embedded: the model truncates at 256 word pieces anyway,
# the title and first lines carry what an event is, and embedding cost grows with length;
# and masking a 20 kB text on every check would be wasted work.
MAX_CANONICAL_CHARS = 512

_MASKS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"),
     "<UUID>"),
    (re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"), "<EMAIL>"),
    (re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?::\d{1,5})?(?![\w.])"), "<IP>"),
    (re.compile(r"\b(?:[0-9a-fA-F]{2}[:-]){5}[0-9a-fA-F]{2}\b"), "<MAC>"),
    # Web-server log timestamps, before IPv6: "12:34:56" would otherwise read as hex groups.
    (re.compile(r"\b\d{1,2}/(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)/\d{4}"
                r"(?::\d{2}:\d{2}:\d{2})?(?:\s?[+-]\d{4})?", re.IGNORECASE), "<TS>"),
    # IPv6: eight groups, or compressed with "::" (at least one hex group beside it).
    (re.compile(r"(?<![\w:])(?:[0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}(?![\w:])"), "<IP>"),
    (re.compile(r"(?<![\w:])(?:[0-9a-fA-F]{1,4}(?::[0-9a-fA-F]{1,4})*)?::"
                r"(?:[0-9a-fA-F]{1,4}(?::[0-9a-fA-F]{1,4})*)?(?![\w:])"), "<IP>"),
    # ISO-8601 and syslog-ish timestamps, dates and clock times.
    (re.compile(
        r"\b\d{4}-\d{2}-\d{2}(?:[T ]\d{1,2}:\d{2}(?::\d{2})?(?:[.,]\d+)?)?"
        r"(?:Z|[+-]\d{2}:?\d{2})?(?![\w-])"), "<TS>"),
    (re.compile(r"\b(?:\d{4}([/.])\d{1,2}\1\d{1,2}|\d{1,2}([/.])\d{1,2}\2\d{4})\b"), "<TS>"),
    (re.compile(r"\b\d{1,2}:\d{2}:\d{2}(?:[.,]\d+)?\b"), "<TS>"),
    # Kubernetes pod names: <deployment>-<replicaset hash>-<5 chars> or <name>-<5 chars>; the random
    # alphabet has no vowels, which keeps real words like "-cache" out.
    (re.compile(r"(?<=[a-z0-9])-[bcdfghjklmnpqrstvwxz2456789]{6,10}-[bcdfghjklmnpqrstvwxz2456789]{5}"
                r"(?![\w-])"), "-<POD>"),
    (re.compile(r"(?<=[a-z0-9])-(?=[bcdfghjklmnpqrstvwxz]*[2456789])"
                r"[bcdfghjklmnpqrstvwxz2456789]{5}(?![\w-])"), "-<POD>"),
    # Host names: dotted names with at least two dots and a digit (node-02.us-west-2.internal);
    # one-dot names keep their shape and lose only their digits below.
    (re.compile(r"(?<![\w.-])(?=[\w.-]*\d)[a-zA-Z][a-zA-Z0-9-]*(?:\.[a-zA-Z0-9-]+)+\.[a-zA-Z][a-zA-Z-]*"
                r"(?![\w-])"), "<HOST>"),
    # ...and one-dot names with a numbered label (db-28.prod, cache-3.us-east), and cloud
    # instance names (ip-10-0-3-17), so a fleet's naming styles mask alike.
    (re.compile(r"(?<![\w.-])[a-zA-Z][a-zA-Z0-9]*-\d+\.[a-zA-Z][a-zA-Z-]+(?![\w.-])"), "<HOST>"),
    (re.compile(r"(?<![\w.-])ip-\d{1,3}-\d{1,3}-\d{1,3}-\d{1,3}(?![\w-])"), "<HOST>"),
    (re.compile(r"\b0[xX][0-9a-fA-F]+\b"), "<HEX>"),
    # Hashes and hex ids: long hex runs that contain at least one digit and one letter a-f.
    (re.compile(r"\b(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{6,}\b"), "<HEX>"),
]

# Per rule of _MASKS: whether every match contains a digit, and strings one of which every match
# contains. Read off the patterns; tests/test_normalize.py checks the masking against the rules
# applied without guards.
_GUARDS: list[tuple[bool, tuple[str, ...]]] = [
    (False, ("-",)),  # UUID
    (False, ("@",)),  # e-mail
    (True, (".",)),  # IPv4
    (False, (":", "-")),  # MAC
    (True, ("/",)),  # web-server timestamp
    (False, (":",)),  # IPv6, eight groups
    (False, ("::",)),  # IPv6, compressed
    (True, ("-",)),  # ISO-8601
    (True, ("/", ".")),  # dates with / or .
    (True, (":",)),  # clock times
    (False, ("-",)),  # pod, deployment
    (True, ("-",)),  # pod, bare
    (True, (".",)),  # host, two dots
    (True, ("-",)),  # host, one dot and a numbered label
    (True, ("ip-",)),  # cloud instance names
    (True, ("0x", "0X")),  # 0x hex
    (True, ()),  # hashes and hex ids
]
_DIGIT = re.compile(r"\d")

# An HTTP status code is kept when something nearby says it is one.
_HTTP_CODE = re.compile(
    r"(?i)(?:\bhttp(?:/(?:\d(?:\.\d)?|<NUM>(?:\.<NUM>)?))?|\bstatus(?:[ _]?code)?|\bcode"
    r"|\bresponse|\breturned|\berror)"
    r"[\s:=#(\[]*([1-5]\d\d)\b")
# A standalone number (with optional sign, decimals, unit suffix such as 91.3% or 250ms).
_NUMBER = re.compile(r"(?<![\w<])[-+]?\d+(?:[.,]\d+)*(?=%|[a-zA-Z]{1,3}\b|\b)")
# A digit run inside a word: masked when it follows a separator or is two digits or longer, so that
# node-7 and user123 lose their value while eth0 and ssh2 keep their meaning.
_INNER_DIGITS = re.compile(r"(?<=[_\-./:=#])\d+|\d{2,}")
_WS = re.compile(r"\s+")
_TOKEN = re.compile(r"<[A-Z]+>|[A-Za-z0-9_]+")
# Digits of a kept HTTP code are swapped for private-use characters while numbers are masked, so
# the number rules cannot see them, then swapped back.
_SHIELD = str.maketrans({str(d): chr(0xE000 + d) for d in range(10)})
_UNSHIELD = str.maketrans({chr(0xE000 + d): str(d) for d in range(10)})


def _shield_code(match: re.Match[str]) -> str:
    head = match.group(0)[: match.start(1) - match.start()]
    return head + match.group(1).translate(_SHIELD)


def mask(text: str) -> str:
    """Replace volatile tokens with placeholders and collapse whitespace.

    Deterministic and idempotent: ``mask(mask(t)) == mask(t)``.
    """
    out = _mask_once(text)
    # A mask can expose a number the rules did not see in context ("2x10G" → "2x<NUM>G"):
    # masking to a fixed point keeps fingerprints stable under re-masking.
    for _ in range(3):
        again = _mask_once(out)
        if again == out:
            break
        out = again
    return out


def _mask_once(text: str) -> str:
    # Rules are skipped when the text lacks what every match of theirs contains (see _GUARDS):
    # the result is the same, and a second pass over masked text, mostly free of digits, then
    # costs a few scans instead of twenty.
    # Masking never adds a digit (placeholders have none), so one look serves the whole pass.
    digits = _DIGIT.search(text) is not None
    out = text
    for (pattern, placeholder), (needs_digit, needs_any) in zip(_MASKS, _GUARDS, strict=True):
        if needs_digit and not digits:
            continue
        if needs_any and not any(c in out for c in needs_any):
            continue
        out = pattern.sub(placeholder, out)
    if digits:
        out = _HTTP_CODE.sub(_shield_code, out)
        out = _NUMBER.sub("<NUM>", out)
        out = _INNER_DIGITS.sub("<NUM>", out)
    # Unconditional: a text may carry the shield's private-use characters itself.
    out = out.translate(_UNSHIELD)
    return _WS.sub(" ", out).strip()


def canonical_text(event: Mapping[str, Any]) -> str:
    """The one text an event is known by: its title, then the head of its description."""
    title = str(event.get("title") or "").strip()
    body = str(event.get("text") or "").strip()
    text = f"{title}\n{body}" if body else title
    return text[:MAX_CANONICAL_CHARS]


def normalize(event: Mapping[str, Any]) -> str:
    """Canonical text, masked: what is embedded and fingerprinted."""
    return mask(canonical_text(event))


def fingerprint(masked: str) -> str:
    """A stable 128-bit hex digest of masked text (case-insensitive)."""
    return hashlib.blake2b(masked.lower().encode("utf-8"), digest_size=16).hexdigest()


def lexical_tokens(masked: str) -> frozenset[str]:
    """Lower-cased word tokens of masked text, placeholders included, for lexical overlap."""
    return frozenset(t.lower() for t in _TOKEN.findall(masked))
