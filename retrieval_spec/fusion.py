"""Fusing every drafter's proposal into the one tree that is verified this step.

Each step: every drafter proposes a trie; the tries are merged; node scores are replaced by learned
acceptance probabilities (:class:`~retrieval_spec.calibration.AcceptanceModel`); the best nodes are kept
best-first; and the tree is cut to the size that maximises expected tokens per unit of measured verification
cost (:func:`~retrieval_spec.tree.best_size`) — zero drafted nodes when nothing is likely to be accepted.
Pure numpy, so the same code runs in the decoder and in the model-free replay of ``benchmarks/simulate.py``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .calibration import AcceptanceModel
from .drafters.base import Drafter, DraftTree, StepFeedback
from .tree import CostCurve, best_first, best_size, merge


class TreeFuser:
    """Owns the drafters of one generator and the acceptance statistics they share.

    Lifecycle per request: :meth:`start`, then per step :meth:`propose` and :meth:`observe`.
    """

    def __init__(self, drafters: Sequence[Drafter], cost_curve: CostCurve, acceptance: AcceptanceModel | None = None):
        self.drafters = list(drafters)
        self.cost_curve = cost_curve
        self.acceptance = acceptance or AcceptanceModel()
        self._features = np.array([-1])

    def start(self, prompt: np.ndarray, references: Sequence[np.ndarray] = ()) -> None:
        for drafter in self.drafters:
            drafter.start(prompt, references)

    def propose(self, context: np.ndarray, budget: int, max_depth: int | None = None) -> DraftTree:
        """The tree to verify after ``context``: at most ``budget`` drafted nodes, often fewer, maybe none.

        ``max_depth`` drops nodes that could only be accepted beyond the token limit.
        """
        root = int(context[-1])
        self._features = np.array([-1])
        if budget <= 0 or max_depth == 0 or not self.drafters:
            return DraftTree.empty(root)
        raw = merge([drafter.propose(context, budget) for drafter in self.drafters])
        if len(raw) == 1:
            return raw
        features = self.acceptance.features(raw)
        ranked, keep = best_first(self.acceptance.rescore(raw, features), budget, max_depth)
        size = 1 + best_size(ranked.scores[1:], self.cost_curve)
        self._features = features[keep[:size]]
        return DraftTree(
            tokens=ranked.tokens[:size],
            parents=ranked.parents[:size],
            scores=ranked.scores[:size],
            sources=ranked.sources[:size],
        )

    def observe(self, feedback: StepFeedback) -> None:
        """Update acceptance statistics for the last proposed tree and pass the step on to every drafter."""
        if len(feedback.tree) > 1:
            self.acceptance.update(self._features, feedback.tree.parents, feedback.accepted_nodes)
        for drafter in self.drafters:
            drafter.observe(feedback)
