"""Online calibration of draft scores into acceptance probabilities.

Drafters score nodes with rough estimates (continuation counts times a prior). What matters for sizing the
tree is the probability that the target accepts a node, and that depends on the source, the text and the
model. :class:`AcceptanceModel` learns, per source and per bucket of the drafter's own conditional
estimate, how often a node was accepted when its parent was, and rescores every node as the product of
those learned rates along its path. Pure numpy.
"""

from __future__ import annotations

import numpy as np

from .tree import DraftTree, Source


class AcceptanceModel:
    """Beta-smoothed acceptance rates per (source, bucket of the drafter's conditional estimate).

    A node's conditional estimate is ``scores[i] / scores[parents[i]]``; it falls in one of
    ``num_buckets`` equal bins of [0, 1]. Until a bin has been tested, its rate is the bin's centre (the
    drafter's own guess), weighted as ``prior_weight`` pseudo-trials.
    """

    def __init__(self, num_buckets: int = 10, prior_weight: float = 4.0) -> None:
        self.num_buckets = num_buckets
        self.prior_weight = prior_weight
        num_features = (max(Source) + 1) * num_buckets
        centres = (np.arange(num_buckets) + 0.5) / num_buckets
        self.hits = np.tile(centres * prior_weight, max(Source) + 1)
        self.trials = np.full(num_features, prior_weight)

    def features(self, tree: DraftTree) -> np.ndarray:
        """(n,) int64 feature index of every node; -1 for the root."""
        parent_scores = tree.scores[np.maximum(tree.parents, 0)]
        conditional = np.divide(tree.scores, parent_scores, out=np.zeros(len(tree)), where=parent_scores > 0)
        bucket = np.minimum((conditional * self.num_buckets).astype(np.int64), self.num_buckets - 1)
        out = tree.sources.astype(np.int64) * self.num_buckets + bucket
        out[0] = -1
        return out

    def rescore(self, tree: DraftTree, features: np.ndarray) -> DraftTree:
        """The same tree with every score replaced by the learned probability of accepting its whole path."""
        rates = self.hits / self.trials
        scores = np.ones(len(tree), dtype=np.float32)
        for i in range(1, len(tree)):
            scores[i] = scores[tree.parents[i]] * rates[features[i]]
        return DraftTree(tokens=tree.tokens, parents=tree.parents, scores=scores, sources=tree.sources)

    def update(self, features: np.ndarray, tested: np.ndarray, hits: np.ndarray) -> None:
        """Count outcomes of nodes whose parent was accepted.

        Args:
            features: (n,) from :meth:`features`.
            tested: (n,) bool, nodes whose parent was accepted (their own fate is known).
            hits: (n,) bool, nodes that were (or, unverified, would have been) accepted; a subset of ``tested``.
        """
        np.add.at(self.trials, features[tested], 1.0)
        np.add.at(self.hits, features[hits & tested], 1.0)
