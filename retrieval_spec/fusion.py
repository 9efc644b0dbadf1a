"""Fusing every drafter's proposal into the one tree that is verified this step.

Each step and request: every drafter proposes a trie; the tries are merged; nodes carrying a token the model
does not have are dropped; node scores are replaced by learned acceptance probabilities
(:class:`~retrieval_spec.calibration.AcceptanceModel`); the best nodes are kept best-first; and the tree is cut
to the size that maximises expected tokens per unit of measured verification cost
(:func:`~retrieval_spec.sizing.best_size`) — zero drafted nodes when nothing is likely to be accepted.
Pure numpy, so the same code runs in the decoder and in the model-free replay of ``benchmarks/simulate.py``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .calibration import AcceptanceModel, RecentSuccess
from .drafters.base import Drafter, RequestId
from .sizing import CostCurve, best_size
from .tree import Branch, DraftTree, StepFeedback, best_first, merge, within_vocabulary

# Lookahead's window pays off only where extra rows in a forward are nearly free (a GPU). Measured on the 2-core
# CPU (benchmarks/spec_bench.py --methods lookahead --branch-overhead 10): its 12 rows make a step 71 ms instead
# of 38, for 1.48 tokens/step from the pool: 0.69x of plain decoding. W=2, N=3: 0.74x.
MAX_BRANCH_OVERHEAD = 0.25


class TreeFuser:
    """Owns the drafters of one generator and the acceptance statistics they share, for every request.

    Lifecycle per request: :meth:`start`; per step :meth:`rank` (or :meth:`propose`), :meth:`branch`,
    :meth:`observe`; then :meth:`finish`.
    """

    def __init__(
        self,
        drafters: Sequence[Drafter],
        cost_curve: CostCurve,
        vocab_size: int,
        acceptance: AcceptanceModel | None = None,
        max_branch_overhead: float = MAX_BRANCH_OVERHEAD,
    ):
        """
        Args:
            drafters: the sources fused; each serves every request.
            cost_curve: the measured cost of verifying k nodes per row (at the batch size decoded).
            vocab_size: the model's vocabulary: drafted tokens outside ``[0, vocab_size)`` are dropped.
            max_branch_overhead: a drafter's look-ahead branch runs only when it makes a bare step at most this
                much dearer on the measured cost curve (it pays later, through the pool, if at all).
        """
        self.drafters = list(drafters)
        self.cost_curve = cost_curve
        self.vocab_size = vocab_size
        self.acceptance = acceptance or AcceptanceModel()
        self.max_branch_overhead = max_branch_overhead
        self._ranked: dict[RequestId, tuple[DraftTree, np.ndarray]] = {}  # last step's candidates and features
        self._whole: dict[RequestId, bool] = {}  # the request's last step accepted every node of its path
        self._recent: dict[RequestId, RecentSuccess] = {}

    def start(self, request: RequestId, prompt: np.ndarray, references: Sequence[np.ndarray] = ()) -> None:
        for drafter in self.drafters:
            drafter.start(request, prompt, references)

    def finish(self, request: RequestId) -> None:
        self._ranked.pop(request, None)
        self._whole.pop(request, None)
        self._recent.pop(request, None)
        for drafter in self.drafters:
            drafter.finish(request)

    def propose(self, request: RequestId, context: np.ndarray, budget: int, max_depth: int | None = None,
                fixed: int = 1) -> DraftTree:
        """The tree to verify after ``context``: at most ``budget`` drafted nodes, often fewer, maybe none.

        ``max_depth`` drops nodes that could only be accepted beyond the token limit; ``fixed`` counts the nodes
        verified whatever the tree (the root, plus a look-ahead branch).
        """
        ranked = self.rank(request, context, budget, max_depth)
        return ranked.head(1 + best_size(ranked.scores[1:], self.cost_curve, fixed=fixed))

    def rank(self, request: RequestId, context: np.ndarray, budget: int, max_depth: int | None = None) -> DraftTree:
        """Every candidate after ``context`` (at most ``budget``), best first, rescored as acceptance probabilities.

        The tree to verify is a head of it (:meth:`propose` cuts it for one sequence; a batch cuts every row's
        at a common size).
        """
        root = int(context[-1])
        empty = DraftTree.empty(root)
        self._ranked[request] = (empty, np.array([-1]))
        if budget <= 0 or not self.drafters or max_depth == 0:
            return empty
        raw = within_vocabulary(merge([d.propose(request, context, budget) for d in self.drafters]), self.vocab_size)
        if len(raw) == 1:
            return empty
        features = self.acceptance.features(raw, self._whole.get(request, False), self._recent.get(request))
        ranked, keep = best_first(self.acceptance.rescore(raw, features), budget, max_depth)
        self._ranked[request] = (ranked, features[keep])
        return ranked

    def branch(self, request: RequestId, context: np.ndarray) -> Branch | None:
        """The request's look-ahead branch for this step, when a drafter has one and it is nearly free to run."""
        for drafter in self.drafters:
            branch = drafter.branch(request, context)
            if branch is not None:
                pays = self.cost_curve.relative(1 + len(branch)) <= 1 + self.max_branch_overhead
                return branch if pays else None
        return None

    def observe(self, request: RequestId, feedback: StepFeedback) -> None:
        """Learn acceptance rates from the step and pass it on to every drafter.

        The verified tree is the head of the ranked candidates, so candidates left out by the cost cut are
        scored too: a candidate whose parent was accepted would have been accepted iff it carries the token
        emitted after that parent. Learning therefore never starves when the cut drafts nothing. A candidate
        ranked below the sibling that won is not counted (``AcceptanceModel.rescore``).
        """
        ranked, features = self._ranked.get(request, (None, None))
        verified = feedback.tree
        if verified is not None and len(verified) > 1:
            last = feedback.accepted_nodes[-1]
            self._whole[request] = bool(last > 0 and not np.any(verified.parents == last))
        if ranked is not None and len(ranked) > 1:
            accepted = feedback.accepted_nodes[: len(feedback.new_tokens)]
            on_path = np.zeros(len(ranked), dtype=bool)
            on_path[accepted] = True
            emitted = np.full(len(ranked), -1, dtype=np.int64)  # the token emitted after each accepted node
            emitted[accepted] = feedback.new_tokens[: len(accepted)]
            parents = np.maximum(ranked.parents, 0)
            tested = on_path[parents]
            tested[0] = False
            hits = tested & (ranked.tokens == emitted[parents])
            # Siblings are ranked best first (lower index); one ranked below the hit never had its chance.
            hit_child = np.full(len(ranked), len(ranked))
            hit_child[parents[hits]] = np.flatnonzero(hits)
            tested &= np.arange(len(ranked)) <= hit_child[parents]
            self.acceptance.update(features, tested, hits)
            self._recent.setdefault(request, RecentSuccess()).update(ranked.sources, tested, hits)
        for drafter in self.drafters:
            drafter.observe(request, feedback)
