"""Novelty: the FAISS index, the calibrated kNN scorer and the decision policy.

Novelty always means *higher = more novel*: a score of 0 is an exact repeat of a known incident,
a score near 1 is unlike anything in the knowledge base.
"""

from novelty.index import IndexManifest, IndexUnusable, VectorIndex
from novelty.policy import Decision, Policy, TrackRecord, parse_policy, resolution_key
from novelty.scorer import Item, Neighbour, NoveltyResult, NoveltyScorer, Query

__all__ = [
    "Decision",
    "IndexManifest",
    "IndexUnusable",
    "Item",
    "Neighbour",
    "NoveltyResult",
    "NoveltyScorer",
    "Policy",
    "Query",
    "TrackRecord",
    "VectorIndex",
    "parse_policy",
    "resolution_key",
]
