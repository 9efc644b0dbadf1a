"""Fusing every drafter's proposal into the one tree that is verified this step.

Each step and request: every drafter proposes a trie; the tries are merged; nodes carrying a token the model
does not have are dropped; node scores are replaced by learned acceptance probabilities
(:class:`~retrieval_spec.calibration.AcceptanceModel`); and the best nodes are kept best-first. The verified tree
is a head of these ranked candidates, cut by the sizer (:class:`~retrieval_spec.sizing.Sizer`) — to zero
drafted nodes when nothing is likely to be accepted. Numpy, and one compiled pass over the step's outcomes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np

from .calibration import AcceptanceModel, RecentSuccess
from .compiled import array, boolean, compile_all, i32, i64, kernel, returns, u8, view
from .drafters.base import Drafter, RequestId
from .tree import NUM_SOURCES, Branch, DraftTree, Forest, StepFeedback, best_first, merge, within_vocabulary


class TreeFuser:
    """Owns the drafters of one generator and the acceptance statistics they share, for every request.

    Lifecycle per request: :meth:`start`; per step :meth:`rank` and :meth:`observe` (for every row of the batch at
    once) and :meth:`branch`; then :meth:`finish`.

    Args:
        drafters: the sources fused; each serves every request.
        vocab_size: the model's vocabulary: drafted tokens outside ``[0, vocab_size)`` are dropped.
        acceptance: the acceptance model to learn into (a fresh one by default).
    """

    def __init__(self, drafters: Sequence[Drafter], vocab_size: int, acceptance: AcceptanceModel | None = None):
        compile_all()  # the kernels of every step, before the first one (a no-op once done in this process)
        self.drafters = list(drafters)
        self.vocab_size = vocab_size
        self.acceptance = acceptance or AcceptanceModel()
        # The request's candidates ranked at its last step and their features; absent when it ranked none.
        self._ranked: dict[RequestId, tuple[DraftTree, np.ndarray]] = {}
        self._whole: dict[RequestId, bool] = {}  # the request's last step accepted every node of its path
        self._recent: dict[RequestId, RecentSuccess] = {}
        # The last step's rows in order, their ranked forest and its features, when every row ranked candidates:
        # what :meth:`observe` learns from when it is told of exactly those rows, as the generator's loop does.
        self._step: tuple[list[RequestId], Forest, np.ndarray] | None = None

    def start(self, request: RequestId, prompt: np.ndarray, references: Sequence[np.ndarray] = ()) -> None:
        for drafter in self.drafters:
            drafter.start(request, prompt, references)

    def finish(self, request: RequestId) -> None:
        self._ranked.pop(request, None)
        self._whole.pop(request, None)
        self._recent.pop(request, None)
        for drafter in self.drafters:
            drafter.finish(request)

    def rank(self, requests: Sequence[RequestId], contexts: Sequence[np.ndarray], budgets: Sequence[int],
             max_depths: Sequence[int]) -> list[DraftTree]:
        """Per row, every candidate after its context (at most its budget), best first, rescored as acceptance
        probabilities; the calibration runs once for the whole batch.

        The tree each row verifies is a head of its candidates, cut by the sizer. A row's ``max_depth`` drops
        nodes that could only be accepted beyond its token limit; a budget or ``max_depth`` of 0 ranks nothing.
        """
        ranked = [DraftTree.empty(int(context[-1])) for context in contexts]  # rows with candidates: replaced below
        self._step = None
        raws, rows = [], []
        for i, (request, context, budget, max_depth) in enumerate(zip(requests, contexts, budgets, max_depths)):
            self._ranked.pop(request, None)
            if budget <= 0 or max_depth <= 0 or not self.drafters:
                continue
            raw = self.candidates(request, context, budget)
            if len(raw) > 1:
                raws.append(raw)
                rows.append(i)
        if not rows:
            return ranked
        forest = Forest.of(raws)
        recent = np.zeros((len(rows), NUM_SOURCES), dtype=np.int64)
        for j, i in enumerate(rows):
            if requests[i] in self._recent:
                recent[j] = self._recent[requests[i]].buckets()
        whole = np.array([self._whole.get(requests[i], False) for i in rows])
        features = self.acceptance.features(forest, whole, recent)
        forest = replace(forest, scores=self.acceptance.rescore(forest, features))
        trees, keep, kept = best_first(forest, np.array([budgets[i] for i in rows]),
                                       np.array([max_depths[i] for i in rows]))
        kept_features = features[keep]
        start = 0
        for i, tree in zip(rows, trees):
            ranked[i] = tree
            if len(tree) > 1:
                self._ranked[requests[i]] = (tree, kept_features[start : start + len(tree)])
            start += len(tree)
        if all(len(tree) > 1 for tree in trees):
            self._step = ([requests[i] for i in rows], kept, kept_features)
        return ranked

    def candidates(self, request: RequestId, context: np.ndarray, budget: int) -> DraftTree:
        """Every drafter's proposal after ``context`` (at most ``budget`` nodes each) merged into one trie, nodes
        carrying a token outside the vocabulary dropped: what :meth:`rank` rescores and cuts to the budget."""
        return within_vocabulary(merge([d.propose(request, context, budget) for d in self.drafters]), self.vocab_size)

    def branch(self, request: RequestId, context: np.ndarray) -> Branch | None:
        """The request's look-ahead branch for this step: the first a drafter offers, or None."""
        for drafter in self.drafters:
            branch = drafter.branch(request, context)
            if branch is not None:
                return branch
        return None

    def observe(self, requests: Sequence[RequestId], feedbacks: Sequence[StepFeedback]) -> None:
        """Learn acceptance rates from one step of every row, then pass each row's step on to every drafter.

        The verified tree is the head of the ranked candidates, so candidates left out by the cost cut are
        scored too: a candidate whose parent was accepted would have been accepted iff it carries the token
        emitted after that parent. Learning therefore never starves when the cut drafts nothing. A candidate
        ranked below the sibling that won is not counted (``AcceptanceModel.rescore``).
        """
        learned = []
        for request, feedback in zip(requests, feedbacks):
            verified = feedback.tree
            if len(verified) > 1:
                last = feedback.accepted_nodes[-1]
                self._whole[request] = bool(last > 0 and not np.any(verified.parents == last))
            if request in self._ranked:
                learned.append((request, feedback, *self._ranked[request]))
        if learned:
            self._learn(learned)
        self._step = None
        for request, feedback in zip(requests, feedbacks):
            for drafter in self.drafters:
                drafter.observe(request, feedback)

    def _learn(self, learned: list[tuple[RequestId, StepFeedback, DraftTree, np.ndarray]]) -> None:
        """Count every ranked candidate whose fate the step told (its parent was accepted), for the whole batch."""
        step = self._step
        if step is not None and step[0] == [request for request, *_ in learned]:
            _, forest, features = step  # the rows the step ranked, as it ranked them
        else:
            forest = Forest.of([ranked for _, _, ranked, _ in learned])
            features = np.concatenate([row_features for *_, row_features in learned])
        accepted = [f.accepted_nodes[: len(f.new_tokens)] for _, f, _, _ in learned]
        path = np.concatenate([a + start for a, start in zip(accepted, forest.starts.tolist())]).astype(np.int64)
        emitted = np.concatenate([f.new_tokens[: len(a)] for (_, f, _, _), a in zip(learned, accepted)])
        tested, hits, trials, won = _outcomes(forest.parents, forest.tokens, forest.sources, forest.rows, path,
                                              emitted.astype(np.int64), len(learned))
        self.acceptance.update(features, tested, hits, len(learned))
        for (request, *_), row_trials, row_won in zip(learned, trials.tolist(), won.tolist()):
            self._recent.setdefault(request, RecentSuccess()).update(row_trials, row_won)


@kernel(returns(array(boolean), array(boolean), array(i64, 2), array(i64, 2)), view(i32), view(i32), view(u8),
        view(i64), view(i64), view(i64), i64)
def _outcomes(parents, tokens, sources, rows, path, emitted, num_rows):
    """Which candidates of a forest of ranked trees had their fate told by the step, and which were right: a node
    is tested when its parent was accepted (``path``, forest indices, with ``emitted`` the token emitted after
    each) and no sibling ranked above it (lower index) was right; it is a hit when it carries that token. Also per
    row and source the tested and the hits."""
    n = len(tokens)
    after = np.full(n, -1, dtype=np.int64)  # the token emitted after each accepted node; -1 elsewhere
    for j in range(len(path)):
        after[path[j]] = emitted[j]
    tested = np.zeros(n, dtype=np.bool_)
    hits = np.zeros(n, dtype=np.bool_)
    winner = np.full(n, n, dtype=np.int64)  # per accepted node, its child that was right
    for node in range(n):
        parent = parents[node]
        if parent >= 0 and after[parent] >= 0:
            tested[node] = True
            if tokens[node] == after[parent]:
                hits[node] = True
                winner[parent] = node
    trials = np.zeros((num_rows, NUM_SOURCES), dtype=np.int64)
    won = np.zeros((num_rows, NUM_SOURCES), dtype=np.int64)
    for node in range(n):
        if tested[node]:
            if node > winner[parents[node]]:  # ranked below the sibling that won: it never had its chance
                tested[node] = False
                continue
            trials[rows[node], sources[node]] += 1
            won[rows[node], sources[node]] += hits[node]
    return tested, hits, trials, won
