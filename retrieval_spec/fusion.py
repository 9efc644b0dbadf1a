"""Fusing every drafter's proposal into the one tree that is verified this step.

Each step and request: every drafter proposes a trie; the tries are merged; nodes carrying a token the model
does not have are dropped; node scores are replaced by learned acceptance probabilities
(:class:`~retrieval_spec.calibration.AcceptanceModel`); and the best nodes are kept best-first. The verified tree
is a head of these ranked candidates, cut by the sizer (:class:`~retrieval_spec.sizing.Sizer`) — to zero
drafted nodes when nothing is likely to be accepted. Pure numpy.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .calibration import AcceptanceModel, RecentSuccess
from .drafters.base import Drafter, RequestId
from .tree import Branch, DraftTree, StepFeedback, best_first, merge, within_vocabulary


class TreeFuser:
    """Owns the drafters of one generator and the acceptance statistics they share, for every request.

    Lifecycle per request: :meth:`start`; per step :meth:`rank`, :meth:`branch`, :meth:`observe`; then
    :meth:`finish`.

    Args:
        drafters: the sources fused; each serves every request.
        vocab_size: the model's vocabulary: drafted tokens outside ``[0, vocab_size)`` are dropped.
        acceptance: the acceptance model to learn into (a fresh one by default).
    """

    def __init__(self, drafters: Sequence[Drafter], vocab_size: int, acceptance: AcceptanceModel | None = None):
        self.drafters = list(drafters)
        self.vocab_size = vocab_size
        self.acceptance = acceptance or AcceptanceModel()
        # The request's candidates ranked at its last step and their features; absent when it ranked none.
        self._ranked: dict[RequestId, tuple[DraftTree, np.ndarray]] = {}
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

    def rank(self, request: RequestId, context: np.ndarray, budget: int, max_depth: int | None = None) -> DraftTree:
        """Every candidate after ``context`` (at most ``budget``), best first, rescored as acceptance probabilities.

        The tree to verify is a head of it, cut by the sizer. ``max_depth`` drops nodes that could only be accepted
        beyond the token limit.
        """
        empty = DraftTree.empty(int(context[-1]))
        self._ranked.pop(request, None)
        if budget <= 0 or not self.drafters or max_depth == 0:
            return empty
        raw = within_vocabulary(merge([d.propose(request, context, budget) for d in self.drafters]), self.vocab_size)
        if len(raw) == 1:
            return empty
        features = self.acceptance.features(raw, self._whole.get(request, False), self._recent.get(request))
        ranked, keep = best_first(self.acceptance.rescore(raw, features), budget, max_depth)
        if len(ranked) > 1:
            self._ranked[request] = (ranked, features[keep])
        return ranked

    def branch(self, request: RequestId, context: np.ndarray) -> Branch | None:
        """The request's look-ahead branch for this step: the first a drafter offers, or None."""
        for drafter in self.drafters:
            branch = drafter.branch(request, context)
            if branch is not None:
                return branch
        return None

    def observe(self, request: RequestId, feedback: StepFeedback) -> None:
        """Learn acceptance rates from the step and pass it on to every drafter.

        The verified tree is the head of the ranked candidates, so candidates left out by the cost cut are
        scored too: a candidate whose parent was accepted would have been accepted iff it carries the token
        emitted after that parent. Learning therefore never starves when the cut drafts nothing. A candidate
        ranked below the sibling that won is not counted (``AcceptanceModel.rescore``).
        """
        verified = feedback.tree
        if len(verified) > 1:
            last = feedback.accepted_nodes[-1]
            self._whole[request] = bool(last > 0 and not np.any(verified.parents == last))
        if request in self._ranked:
            ranked, features = self._ranked[request]
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
