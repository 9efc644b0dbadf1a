"""Online calibration of draft nodes into acceptance probabilities, knowing each node's context.

Drafters score nodes with rough estimates. What sizes the tree is the probability that the target accepts a
node when its parent was accepted, and that depends on more than the source: inside a long verbatim copy nearly
every next token is accepted, a chance bigram is a coin toss, deep nodes fare worse than shallow ones, and a row
whose last step accepted its whole path is probably still copying. :class:`AcceptanceModel` learns these rates
online from every verified step, per context cell

    source × the drafter's own conditional estimate × matched length × depth × last step accepted whole path
    × how often this source's candidates were right so far in this request × whether another drafter
    proposes a different token in the node's place,

with backoff: each cell's rate is smoothed towards the rate of the coarser cell that drops its last feature, so
a cell seen rarely borrows from its parents and a cell seen often speaks for itself. Old evidence decays, so the
rates follow the text being decoded. A node's score is the product of the learned rates along its path. The
features, rates, counts and the rescoring are compiled per-node passes (``compiled.py``); tuned on the replay of stored
plain outputs (``benchmarks/simulate.py``).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .compiled import array, boolean, f32, f64, i32, i64, kernel, u8, view, void
from .tree import NUM_SOURCES, DraftTree, Forest, Source

MATCH_EDGES = np.array([1, 2, 3, 4, 6, 9, 16, 32])  # matched length buckets: 0, 1, 2, 3, 4-5, 6-8, 9-15, 16-31, 32+
DEPTH_EDGES = np.array([2, 3, 4, 5, 7, 10, 17])  # depth buckets: 1, 2, 3, 4, 5-6, 7-9, 10-16, 17+
RECENT_EDGES = np.array([0.15])  # the request's record of a source: none yet, below 0.15, 0.15 and up
_RECENT_EDGES = RECENT_EDGES.tolist()


@dataclass(frozen=True)
class CalibrationConfig:
    """How fast the acceptance model trusts and forgets evidence.

    Attributes:
        estimate_buckets: bins of the drafter's own conditional estimate in [0, 1].
        prior_weight: pseudo-trials with which a cell starts at its parent cell's rate (the coarsest cell at
            the drafter's own estimate).
        decay: every count is multiplied by this at each update, so evidence older than about
            ``1 / (1 - decay)`` updates fades.
    """

    estimate_buckets: int = 5
    prior_weight: float = 4.0
    decay: float = 0.999

    @property
    def shape(self) -> tuple[int, ...]:
        """Cells per feature, coarsest first: source, estimate, matched length, depth, last step whole, recent
        success of the source in the request, contested (:func:`contested`)."""
        return (NUM_SOURCES, self.estimate_buckets, len(MATCH_EDGES) + 1, len(DEPTH_EDGES) + 1, 2,
                len(RECENT_EDGES) + 2, 2)


class AcceptanceModel:
    """Decayed hit and trial counts per context cell at every level of the backoff, and the rates they give."""

    def __init__(self, config: CalibrationConfig = CalibrationConfig()) -> None:
        self.config = config
        self._shape = np.array(config.shape, dtype=np.int64)
        self._sizes = np.cumprod(self._shape)  # cells per level
        self._offsets = np.concatenate([[0], np.cumsum(self._sizes)[:-1]])  # where each level starts
        # Counts of every level in one flat array, kept divided by ``_scale``, the product of every decay so far:
        # an update multiplies one number instead of every cell, and adds 1 / _scale where it counts.
        self._hits = np.zeros(int(self._sizes.sum()))
        self._trials = np.zeros(int(self._sizes.sum()))
        self._scale = 1.0

    @property
    def hits(self) -> list[np.ndarray]:
        """Per level of the backoff, coarsest first, the decayed hits of every cell."""
        return self._levels(self._hits)

    @property
    def trials(self) -> list[np.ndarray]:
        """Per level of the backoff, coarsest first, the decayed trials of every cell."""
        return self._levels(self._trials)

    def _levels(self, flat: np.ndarray) -> list[np.ndarray]:
        return [flat[o : o + n] * self._scale for o, n in zip(self._offsets, self._sizes)]

    def features(self, forest: Forest, whole_last_step: np.ndarray, recent: np.ndarray) -> np.ndarray:
        """(N, 7) int64 cell of every node of the forest along each feature (the roots' rows are unused).

        Args:
            forest: every row's drafts as proposed (scores are the drafters' own estimates).
            whole_last_step: (rows,) bool, the row's previous step accepted every node of the path it took.
            recent: (rows, sources) int64, the row's :meth:`RecentSuccess.buckets` (zeros: no evidence yet).
        """
        return _features(forest.scores, forest.parents, forest.sources, forest.matches, forest.depths, forest.rows,
                         np.asarray(whole_last_step, dtype=np.bool_), np.asarray(recent, dtype=np.int64),
                         self.config.estimate_buckets, MATCH_EDGES, DEPTH_EDGES)

    def rates(self, features: np.ndarray) -> np.ndarray:
        """(n,) learned probability that each node is accepted when its parent is.

        Level by level, coarsest first, ``rate = (hits + weight * rate) / (trials + weight)`` starting from the
        drafter's own estimate (the middle of its bucket), in one compiled pass.
        """
        return _learned_rates(np.asarray(features, dtype=np.int64), self._hits, self._trials, self._scale,
                              self._shape, self._offsets, self.config.prior_weight, self.config.estimate_buckets)

    def rescore(self, forest: Forest, features: np.ndarray) -> np.ndarray:
        """(N,) float32: every node's learned probability of accepting its whole path (roots: 1).

        Siblings exclude each other (the target emits one token after their parent), so they are taken in
        order of their learned rates, and a sibling's rate counts only where every better one failed: its
        path probability is its parent's times ``rate * prod(1 - rate of each better sibling)``. The rates are
        learned that way too (:meth:`update` is told only of nodes no better sibling beat), so a recycled
        alternative beside a reliable copy is priced at what it adds. Siblings keep this order (best first),
        which is the order :func:`~retrieval_spec.tree.best_first` gives them. One compiled pass over the forest.
        """
        return _sibling_path_scores(forest.parents, self.rates(features))

    def update(self, features: np.ndarray, tested: np.ndarray, hits: np.ndarray, steps: int = 1) -> None:
        """Count outcomes of nodes whose parent was accepted, from ``steps`` rows' steps at once (older evidence
        decays once per step).

        Args:
            features: (n, 7) from :meth:`features`.
            tested: (n,) bool, nodes whose parent was accepted and that no better-ranked sibling beat (their own
                fate is known, and it is the one :meth:`rescore` prices).
            hits: (n,) bool, nodes that were (or, unverified, would have been) accepted; a subset of ``tested``.
        """
        self._scale *= self.config.decay ** steps
        if self._scale < 1e-150:  # fold the scale back into the counts before it underflows
            self._hits *= self._scale
            self._trials *= self._scale
            self._scale = 1.0
        if not tested.any():
            return
        _count(np.asarray(features, dtype=np.int64), np.asarray(tested, dtype=np.bool_),
               np.asarray(hits, dtype=np.bool_), self._hits, self._trials, self._shape, self._offsets,
               1.0 / self._scale)

    def summary(self) -> dict:
        """Per source seen: decayed trials and acceptance rate, overall, by matched length and by depth (JSON)."""
        shape, hits, trials = self.config.shape, self.hits, self.trials
        by_match = (hits[2].reshape(shape[:3]).sum(1), trials[2].reshape(shape[:3]).sum(1))
        by_depth = (hits[3].reshape(shape[:4]).sum((1, 2)), trials[3].reshape(shape[:4]).sum((1, 2)))
        match_labels = _bucket_labels(MATCH_EDGES, zero="none")
        depth_labels = _bucket_labels(DEPTH_EDGES, first=1)
        out = {}
        for source in np.flatnonzero(trials[0] >= 1):
            out[Source(int(source)).name.lower()] = {
                "trials": round(float(trials[0][source]), 1),
                "rate": round(float(hits[0][source] / trials[0][source]), 3),
                "by_matched_length": _rates(by_match[0][source], by_match[1][source], match_labels),
                "by_depth": _rates(by_depth[0][source], by_depth[1][source], depth_labels),
            }
        return out


@kernel(array(boolean), view(i32), view(u8))
def contested(parents, sources):
    """(N,) bool: whether a node's siblings include another source's, i.e. the drafters disagree about the token
    after its parent (recycling's next-next candidates count as a source of their own beside its remembered
    successors: that is how the A/B in ``RecyclingConfig.next_next`` measured them). Where a copy and a recycled
    guess disagree, the copy tends to win in copy-heavy text; the rates of either alone cannot say so. A/B on the
    real model (Spec-Bench's later prompts, one process): auto 1.26x -> 1.27x ``generate()``, translation 1.66x ->
    1.80x, extraction 2.75 -> 2.88 tokens per step; long documents' tune split 2.06x -> 2.04x (questions up,
    summaries down: within the runs' spread).

    >>> f = Forest.of([DraftTree.trusted(np.array([5, 1, 2, 3], np.int32), np.array([-1, 0, 0, 1], np.int32),
    ...                                  np.ones(4, np.float32), np.array([0, 1, 4, 1], np.uint8))] * 2)
    >>> contested(f.parents, f.sources).tolist()
    [False, True, True, False, False, True, True, False]
    """
    n = len(parents)
    first = np.full(n, -1, dtype=np.int64)  # the source of each node's first child
    mixed = np.zeros(n, dtype=np.bool_)
    for node in range(n):
        parent = parents[node]
        if parent >= 0:
            if first[parent] < 0:
                first[parent] = sources[node]
            elif first[parent] != sources[node]:
                mixed[parent] = True
    out = np.zeros(n, dtype=np.bool_)
    for node in range(n):
        if parents[node] >= 0:
            out[node] = mixed[parents[node]]
    return out


@kernel(array(i64, 2), view(f32), view(i32), view(u8), view(i32), view(i32), view(i64), view(boolean), view(i64, 2),
        i64, view(i64), view(i64))
def _features(scores, parents, sources, matches, depths, rows, whole, recent, buckets, match_edges,
              depth_edges):
    """:meth:`AcceptanceModel.features` of a forest's arrays, one pass per node."""
    out = np.zeros((len(scores), 7), dtype=np.int64)
    mixed = contested(parents, sources)
    for node in range(len(scores)):
        parent = parents[node]
        conditional = 0.0
        if parent >= 0 and scores[parent] > 0:
            conditional = np.float64(scores[node] / scores[parent])  # a float32 quotient, as numpy's divide gives
        out[node, 0] = sources[node]
        out[node, 1] = np.int64(min(conditional * buckets, buckets - 1))  # truncated: the floor of a non-negative
        out[node, 2] = np.searchsorted(match_edges, matches[node], side="right")
        out[node, 3] = np.searchsorted(depth_edges, depths[node], side="right")
        out[node, 4] = whole[rows[node]]
        out[node, 5] = recent[rows[node], sources[node]]
        out[node, 6] = mixed[node]
    return out


@kernel(array(f64), view(i64, 2), view(f64), view(f64), f64, view(i64), view(i64), f64, i64)
def _learned_rates(features, hits, trials, scale, shape, offsets, weight, buckets):
    """:meth:`AcceptanceModel.rates`: per node, the backoff's levels coarsest first. A node's cell at level ``l`` is
    ``offsets[l]`` plus its first ``l + 1`` features read as a mixed-radix number (digit ``j`` in base
    ``shape[j]``)."""
    out = np.empty(len(features), dtype=np.float64)
    for node in range(len(features)):
        rate = (features[node, 1] + 0.5) / buckets
        digits = 0
        for level in range(len(offsets)):
            digits = digits * shape[level] + features[node, level]
            cell = offsets[level] + digits
            rate = (hits[cell] * scale + weight * rate) / (trials[cell] * scale + weight)
        out[node] = rate
    return out


@kernel(void, view(i64, 2), view(boolean), view(boolean), array(f64), array(f64), view(i64), view(i64), f64)
def _count(features, tested, hits, hit_counts, trial_counts, shape, offsets, amount):
    """:meth:`AcceptanceModel.update`'s counting: ``amount`` more trials (and hits) in every level's cell (as in
    :func:`_learned_rates`) of each tested node."""
    for node in range(len(features)):
        if not tested[node]:
            continue
        digits = 0
        for level in range(len(offsets)):
            digits = digits * shape[level] + features[node, level]
            cell = offsets[level] + digits
            trial_counts[cell] += amount
            if hits[node]:
                hit_counts[cell] += amount


@kernel(array(f32), view(i32), view(f64))
def _sibling_path_scores(parents, rates):
    """:meth:`AcceptanceModel.rescore` over a forest's ``parents`` (topological, -1 at roots) and its nodes' rates."""
    n = len(parents)
    first = np.full(n, -1, dtype=np.int32)  # each node's children as a linked list, in index order
    last = np.full(n, -1, dtype=np.int32)
    following = np.full(n, -1, dtype=np.int32)
    for node in range(n):
        parent = parents[node]
        if parent >= 0:
            if first[parent] < 0:
                first[parent] = node
            else:
                following[last[parent]] = node
            last[parent] = node
    local = np.ones(n, dtype=np.float64)
    group = np.empty(n, dtype=np.int32)
    for parent in range(n):
        size, child = 0, first[parent]
        while child >= 0:  # insertion sort by rate, best first (ties: lower index, as listed)
            at = size
            while at > 0 and rates[group[at - 1]] < rates[child]:
                group[at] = group[at - 1]
                at -= 1
            group[at] = child
            size += 1
            child = following[child]
        failed = 1.0  # every better sibling failed
        for j in range(size):
            child = group[j]
            local[child] = failed * rates[child]
            failed *= 1.0 - min(rates[child], 1.0 - 1e-12)
    scores = np.empty(n, dtype=np.float32)
    for node in range(n):  # parents come first: each path product is complete before its children's
        if parents[node] >= 0:
            local[node] *= local[parents[node]]
        scores[node] = local[node]
    return scores


class RecentSuccess:
    """How often one request's candidates from each source were right so far: decayed hits over decayed trials.

    Creative text defeats copies that long technical text rewards; the global cells cannot tell the two apart,
    this request's own record can. Only candidates whose fate is known count (``AcceptanceModel.update``'s
    ``tested``), verified or not, so the record keeps up while the cost cut drafts nothing.

    Args:
        decay: per update (a step whose candidates were scored), so evidence older than about
            ``1 / (1 - decay)`` such steps fades.
        min_trials: decayed trials below which a source has no record yet (bucket 0).

    Tuned on the replay (``benchmarks/simulate.py``, 46 held-out SmolLM2 records, two measured CPU curves):
    auto's predicted speedup on stem 0.98x → 1.01x and 1.00x → 1.04x, overall +0.01; faster decays and finer
    buckets split the cells too thinly and lost up to 0.03 overall.
    """

    def __init__(self, decay: float = 0.99, min_trials: float = 5.0) -> None:
        self.decay, self.min_trials = decay, min_trials
        self.hits = [0.0] * NUM_SOURCES  # Python floats: eight numbers a step cost less than numpy calls
        self.trials = [0.0] * NUM_SOURCES

    def update(self, trials: Sequence[int], hits: Sequence[int]) -> None:
        """One step's outcomes: (sources,) how many candidates of each source had their fate known, and how many of
        them were right."""
        self.trials = [old * self.decay + new for old, new in zip(self.trials, trials)]
        self.hits = [old * self.decay + new for old, new in zip(self.hits, hits)]

    def buckets(self) -> list[int]:
        """(sources,) bucket of each source: 0 without a record, else 1 + its rate's bucket."""
        return [1 + bisect.bisect_right(_RECENT_EDGES, hits / trials) if trials >= self.min_trials and trials > 0 else 0
                for hits, trials in zip(self.hits, self.trials)]


def _rates(hits: np.ndarray, trials: np.ndarray, labels: list[str]) -> dict[str, float]:
    """Acceptance rate per labelled bucket with at least one (decayed) trial."""
    return {label: round(float(h / n), 3) for label, h, n in zip(labels, hits, trials) if n >= 1}


def _bucket_labels(edges: np.ndarray, zero: str | None = None, first: int = 0) -> list[str]:
    """Names of the buckets ``np.digitize(x, edges)`` makes: "0" or ``zero``, "1", "4-5", "32+"..."""
    bounds = [first, *edges.tolist()]
    labels = [zero] if zero is not None else []
    for low, high in zip(bounds[int(zero is not None):], bounds[1 + int(zero is not None):]):
        labels.append(str(low) if high == low + 1 else f"{low}-{high - 1}")
    return labels + [f"{bounds[-1]}+"]
