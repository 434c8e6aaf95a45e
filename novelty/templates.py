"""Unsupervised event kinds: a small Drain-style template miner over masked token sequences.

Calibration needs to know which knowledge-base items have kin (another item of the same kind)
without seeing labels. Drain (He et al., ICWS 2017) groups log lines by length and leading token,
then joins a line to the most similar template when more than half of the positions agree. Short
lines therefore only join when they agree on all but a minority of their words, which keeps
look-alikes such as "VM Started" / "VM Paused" apart.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["TemplateMiner", "constants", "contradiction", "merge", "same_words", "words"]

_WILD = "<*>"


class TemplateMiner:
    """Assigns each token sequence to a template (kind); ids are dense ints from 0.

    ``similarity``: a sequence joins a template when the share of equal positions exceeds it.
    Higher splits kinds more finely (fewer false kin, more singletons).
    """

    def __init__(self, similarity: float = 0.5) -> None:
        self.similarity = similarity
        self._buckets: dict[tuple[int, str], list[tuple[int, list[str]]]] = {}
        self.sizes: list[int] = []
        #: Per kind, its template: constant tokens, and ``<*>`` where members differ.
        self.templates: list[list[str]] = []

    def add(self, tokens: list[str]) -> int:
        """Return the kind id of ``tokens``, creating a template or generalising one."""
        head = tokens[0] if tokens and not tokens[0].startswith("<") else _WILD
        bucket = self._buckets.setdefault((len(tokens), head), [])
        best, best_sim = -1, -1.0
        for pos, (_, template) in enumerate(bucket):
            if not tokens:
                best, best_sim = pos, 1.0
                break
            same = sum(1 for a, b in zip(template, tokens, strict=True) if a in (b, _WILD))
            sim = same / len(tokens)
            if sim > best_sim:
                best, best_sim = pos, sim
        if best >= 0 and (best_sim > self.similarity or not tokens):
            kind, template = bucket[best]
            merged = [a if a == b else _WILD for a, b in zip(template, tokens, strict=True)]
            bucket[best] = (kind, merged)
            self.templates[kind] = merged
            self.sizes[kind] += 1
            return kind
        kind = len(self.sizes)
        self.sizes.append(1)
        bucket.append((kind, list(tokens)))
        self.templates.append(list(tokens))
        return kind


def merge(sequences: list[list[str]]) -> list[str]:
    """The template of equal-length sequences: their common tokens, ``<*>`` elsewhere."""
    first = sequences[0]
    return [tok if all(s[i] == tok for s in sequences[1:]) else _WILD
            for i, tok in enumerate(first)]


def contradiction(tokens: list[str], template: list[str]) -> float:
    """Share of a template's positions whose constant token ``tokens`` contradicts.

    Look-alike events differ from a known kind in a word the kind never varies ("Acquiring" vs
    "Releasing suspend blocker …"); fresh members differ only where it does (``<*>``). When the
    lengths differ, positions cannot be compared: the share of the template's constant words
    that the event lacks, plus the difference in length, is used instead; whether such a
    difference makes another problem depends on the source, and the scorer learns that per
    service (:meth:`novelty.scorer.NoveltyScorer.fit`).
    """
    if not template:
        return 0.0 if not tokens else 1.0
    if len(tokens) != len(template):
        present = set(tokens)
        missing = sum(1 for t in template if t != _WILD and t not in present)
        # The difference in length is itself structure the kind does not have.
        extra = abs(len(tokens) - len(template))
        return min(1.0, (missing + extra) / max(len(template), len(tokens)))
    return sum(1 for t, q in zip(template, tokens, strict=True) if t not in (_WILD, q)) \
        / len(template)


def same_words(tokens: frozenset[str], constants: frozenset[str], example: frozenset[str]
               ) -> bool:
    """Whether an event of another length uses exactly the words (:func:`words`) of a kind:
    its template's ``constants`` (:func:`constants`) plus those of ``example`` (a member,
    standing for the words its ``<*>`` took). Then only a list grew or shrank
    (``delete blk_<NUM> blk_<NUM> …``); a field more or less (``… rhost=<IP> user=root``) is
    another structure.
    """
    return tokens == example | constants


def constants(template: list[str]) -> frozenset[str]:
    """The words of a template's constant positions."""
    return words(t for t in template if t != _WILD)


def words(tokens: Iterable[str]) -> frozenset[str]:
    """The tokens that carry no masked value."""
    return frozenset(t for t in tokens if "<" not in t)
