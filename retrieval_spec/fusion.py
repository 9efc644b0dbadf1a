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
from .drafters.base import Branch, Drafter, DraftTree, StepFeedback
from .tree import CostCurve, best_first, best_size, merge


# Lookahead's window pays off only where extra rows in a forward are nearly free (a GPU). Measured on the 2-core
# CPU (benchmarks/spec_bench.py --methods lookahead --branch-overhead 10): its 12 rows make a step 71 ms instead
# of 38, for 1.48 tokens/step from the pool: 0.69x of plain decoding. W=2, N=3: 0.74x.
MAX_BRANCH_OVERHEAD = 0.25


class TreeFuser:
    """Owns the drafters of one generator and the acceptance statistics they share.

    Lifecycle per request: :meth:`start`, then per step :meth:`propose` and :meth:`observe`.
    """

    def __init__(
        self,
        drafters: Sequence[Drafter],
        cost_curve: CostCurve,
        acceptance: AcceptanceModel | None = None,
        max_branch_overhead: float = MAX_BRANCH_OVERHEAD,
    ):
        """``max_branch_overhead``: a drafter's look-ahead branch runs only when it makes a bare step at most
        this much dearer on the measured cost curve (it pays later, through the pool, if at all)."""
        self.drafters = list(drafters)
        self.max_branch_overhead = max_branch_overhead
        self.cost_curve = cost_curve
        self.acceptance = acceptance or AcceptanceModel()
        self._ranked = DraftTree.empty(0)  # last step's candidates, best first; the verified tree is its head
        self._features = np.array([-1])
        self.branch: Branch | None = None  # the step's look-ahead nodes, run beside the tree (see Branch)

    def start(self, prompt: np.ndarray, references: Sequence[np.ndarray] = ()) -> None:
        for drafter in self.drafters:
            drafter.start(prompt, references)

    def propose(self, context: np.ndarray, budget: int, max_depth: int | None = None) -> DraftTree:
        """The tree to verify after ``context``: at most ``budget`` drafted nodes, often fewer, maybe none.

        ``max_depth`` drops nodes that could only be accepted beyond the token limit.
        """
        ranked = self.rank(context, budget, max_depth)
        return ranked.head(1 + best_size(ranked.scores[1:], self.cost_curve, fixed=self.fixed_nodes))

    def rank(self, context: np.ndarray, budget: int, max_depth: int | None = None) -> DraftTree:
        """Every candidate after ``context`` (at most ``budget``), best first, rescored as acceptance probabilities.

        The tree to verify is a head of it (:meth:`propose` cuts it for one sequence; a batch cuts every row's
        at a common size). Also picks this step's look-ahead branch, if any.
        """
        root = int(context[-1])
        self._ranked, self._features = DraftTree.empty(root), np.array([-1])
        self.branch = None
        if budget <= 0 or not self.drafters:
            return self._ranked
        branches = [b for d in self.drafters if hasattr(d, "branch") and (b := d.branch(context)) is not None]
        if branches and self.cost_curve.relative(1 + len(branches[0])) <= 1 + self.max_branch_overhead:
            self.branch = branches[0]
        if max_depth == 0:
            return self._ranked
        raw = merge([drafter.propose(context, budget) for drafter in self.drafters])
        if len(raw) == 1:
            return self._ranked
        features = self.acceptance.features(raw)
        self._ranked, keep = best_first(self.acceptance.rescore(raw, features), budget, max_depth)
        self._features = features[keep]
        return self._ranked

    @property
    def fixed_nodes(self) -> int:
        """Nodes verified this step whatever the tree's size: the root and the look-ahead branch."""
        return 1 + (0 if self.branch is None else len(self.branch))

    def observe(self, feedback: StepFeedback) -> None:
        """Learn acceptance rates from the step and pass it on to every drafter.

        The verified tree is the head of the ranked candidates, so candidates left out by the cost cut are
        scored too: a candidate whose parent was accepted would have been accepted iff it carries the token
        emitted after that parent. Learning therefore never starves when the cut drafts nothing.
        """
        ranked = self._ranked
        if len(ranked) > 1:
            accepted = feedback.accepted_nodes[: len(feedback.new_tokens)]
            on_path = np.zeros(len(ranked), dtype=bool)
            on_path[accepted] = True
            emitted = np.full(len(ranked), -1, dtype=np.int64)  # the token emitted after each accepted node
            emitted[accepted] = feedback.new_tokens[: len(accepted)]
            parents = np.maximum(ranked.parents, 0)
            tested = on_path[parents]
            tested[0] = False
            hits = tested & (ranked.tokens == emitted[parents])
            self.acceptance.update(self._features, tested, hits)
        for drafter in self.drafters:
            drafter.observe(feedback)
