"""Token-tree algebra: merge drafts, pick the nodes worth verifying, and lay the tree out for attention.

Pure numpy. The verifier turns the arrays returned here into tensors; nothing here knows the model.

Layout contract (ANCHORS.md, detail 1): node 0 is the root, the newest token whose keys are not cached;
a node at depth ``d`` sits at position ``cached_len + d`` and attends to the whole cached prefix, its
ancestors and itself only.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .drafters.base import DraftTree, depths_of


def depths(parents: np.ndarray) -> np.ndarray:
    """Depth of every node (root = 0).

    Args:
        parents: (n,) int32, topological (``parents[i] < i``).

    Returns:
        (n,) int32.

    >>> depths(np.array([-1, 0, 1], dtype=np.int32)).tolist()
    [0, 1, 2]
    """
    return depths_of(parents)


def ancestor_mask(parents: np.ndarray) -> np.ndarray:
    """Which nodes each node may attend to: itself and its ancestors.

    Args:
        parents: (n,) int32, topological.

    Returns:
        (n, n) bool; ``mask[i, j]`` is True iff ``j`` is ``i`` or an ancestor of ``i``.

    >>> ancestor_mask(np.array([-1, 0, 0], dtype=np.int32)).astype(int).tolist()
    [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    """
    n = len(parents)
    mask = np.eye(n, dtype=bool)
    for i in range(1, n):
        mask[i] |= mask[parents[i]]
    return mask


def children_lists(parents: np.ndarray) -> list[list[int]]:
    """For every node, its children in index order."""
    out: list[list[int]] = [[] for _ in range(len(parents))]
    for i in range(1, len(parents)):
        out[parents[i]].append(i)
    return out


def merge(trees: Sequence[DraftTree]) -> DraftTree:
    """Union of tries that share a root token; a node proposed twice keeps its best score and that source.

    Raises:
        ValueError: the trees have different roots.
    """
    trees = [t for t in trees if len(t) > 1] or list(trees[:1])
    if len(trees) == 1:
        return trees[0]
    root = int(trees[0].tokens[0])
    if any(int(t.tokens[0]) != root for t in trees):
        raise ValueError("merged trees must share their root token")
    tokens, parents, scores, sources = [root], [-1], [1.0], [int(trees[0].sources[0])]
    index: dict[tuple[int, int], int] = {}
    for tree in trees:
        mapped = np.zeros(len(tree), dtype=np.int64)
        for i in range(1, len(tree)):
            key = (int(mapped[tree.parents[i]]), int(tree.tokens[i]))
            node = index.get(key)
            score = float(tree.scores[i])
            if node is None:
                node = len(tokens)
                index[key] = node
                tokens.append(key[1])
                parents.append(key[0])
                scores.append(min(score, scores[key[0]]))
                sources.append(int(tree.sources[i]))
            elif score > scores[node]:
                scores[node] = min(score, scores[key[0]])
                sources[node] = int(tree.sources[i])
            mapped[i] = node
    return DraftTree(
        tokens=np.array(tokens, dtype=np.int32),
        parents=np.array(parents, dtype=np.int32),
        scores=np.array(scores, dtype=np.float32),
        sources=np.array(sources, dtype=np.uint8),
    )


def best_first(tree: DraftTree, max_nodes: int, max_depth: int | None = None) -> tuple[DraftTree, np.ndarray]:
    """Keep the root and the ``max_nodes`` highest-scoring other nodes, closed under ancestors.

    Scores never rise from parent to child, so expanding a frontier best-first (ties: shallower, then
    lower index) yields an ancestor-closed set. The result is re-indexed in that expansion order, which
    is topological and sorts non-root nodes by non-increasing score.

    Args:
        tree: the candidate tree.
        max_nodes: how many non-root nodes to keep at most.
        max_depth: drop nodes deeper than this (None: no limit).

    Returns:
        the kept tree, and (k,) int64 the kept nodes' indices in ``tree``.
    """
    kids = children_lists(tree.parents)
    depth = depths(tree.parents)
    order = [0]
    frontier = [(-float(tree.scores[c]), int(depth[c]), c) for c in kids[0]]
    heapq.heapify(frontier)
    while frontier and len(order) <= max_nodes:
        _, d, node = heapq.heappop(frontier)
        if max_depth is not None and d > max_depth:
            continue
        order.append(node)
        for c in kids[node]:
            heapq.heappush(frontier, (-float(tree.scores[c]), int(depth[c]), c))
    keep = np.array(order, dtype=np.int64)
    new_index = np.full(len(tree), -1, dtype=np.int32)
    new_index[keep] = np.arange(len(keep), dtype=np.int32)
    parents = tree.parents[keep].copy()
    parents[1:] = new_index[parents[1:]]
    kept = DraftTree(tokens=tree.tokens[keep], parents=parents, scores=tree.scores[keep], sources=tree.sources[keep])
    return kept, keep


@dataclass(frozen=True)
class CostCurve:
    """Measured cost of one verification forward as a function of the number of tree nodes.

    Attributes:
        sizes: (m,) int, increasing node counts that were measured, starting at 1.
        ms: (m,) float, milliseconds per forward at each size.
    """

    sizes: np.ndarray
    ms: np.ndarray

    def __post_init__(self) -> None:
        if len(self.sizes) == 0 or self.sizes[0] != 1 or np.any(np.diff(self.sizes) <= 0):
            raise ValueError("CostCurve.sizes must start at 1 and increase")
        if self.ms.shape != self.sizes.shape or np.any(self.ms <= 0):
            raise ValueError("CostCurve.ms must be positive, one per size")

    def _envelope(self) -> np.ndarray:
        """(m,) cost of each measured size if it may be padded up to any larger measured size."""
        return np.minimum.accumulate(self.ms[::-1])[::-1]

    def padded_size(self, num_nodes: int) -> int:
        """The node count to actually run for ``num_nodes`` nodes: a larger measured size when that is cheaper.

        Matrix kernels are not monotone in the row count on CPUs (3 rows can cost more than 4), so the
        verifier pads a tree with inert nodes up to this size.
        """
        at_least = self.sizes >= num_nodes
        if not np.any(at_least):
            return int(num_nodes)
        candidates = np.flatnonzero(at_least)
        best = candidates[np.argmin(self.ms[candidates])]
        interpolated = np.interp(num_nodes, self.sizes, self.ms)
        return int(self.sizes[best]) if self.ms[best] < interpolated else int(num_nodes)

    def relative(self, num_nodes: np.ndarray) -> np.ndarray:
        """Cost of verifying ``num_nodes`` nodes (padded as :meth:`padded_size`) relative to one plain step."""
        interpolated = np.interp(num_nodes, self.sizes, self.ms)
        at_least = np.searchsorted(self.sizes, num_nodes, side="left")
        padded = np.append(self._envelope(), np.inf)[np.minimum(at_least, len(self.sizes))]
        return np.minimum(interpolated, padded) / self._envelope()[0]


def best_size(scores: np.ndarray, curve: CostCurve, fixed: int = 1) -> int:
    """How many of the best-first candidate nodes to verify to maximise expected tokens per unit of time.

    Verifying the root plus the first ``k`` candidates yields ``1 + sum(scores[:k])`` tokens in expectation
    (each node is accepted with the probability of its whole path, plus one bonus token) and costs
    ``curve.relative(k + fixed)``. ``k = 0`` is plain decoding.

    Args:
        scores: (m,) non-increasing estimated path probabilities of the candidates, best first.
        fixed: nodes verified whatever ``k`` is: the root, plus any look-ahead branch.

    Returns:
        k in ``[0, m]``.
    """
    return best_batch_size([scores], curve, fixed)


def best_batch_size(scores: Sequence[np.ndarray], curve: CostCurve, fixed: int = 1) -> int:
    """:func:`best_size` for a batch whose rows are all padded to one tree size: the k that maximises the
    expected tokens of all rows (a row with fewer candidates verifies all of them) per unit of the cost of
    ``k + fixed`` nodes per row (``curve`` measured at this batch size).

    Args:
        scores: per row, (m_b,) non-increasing estimated path probabilities of its candidates, best first.

    Returns:
        k in ``[0, max m_b]``.
    """
    most = max((len(s) for s in scores), default=0)
    k = np.arange(most + 1)
    expected = np.zeros(most + 1)
    for row in scores:
        gains = np.concatenate([[0.0], np.cumsum(row, dtype=np.float64)])
        expected += 1.0 + gains[np.minimum(k, len(row))]
    return int(np.argmax(expected / curve.relative(k + fixed)))
