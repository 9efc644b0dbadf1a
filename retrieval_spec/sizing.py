"""How many draft nodes to verify: expected tokens per step against the measured cost of verifying them.

Pure numpy. On a CPU one forward over 8 tokens costs about twice one decoding step; on a GPU nearly the same
as one. The curve is measured on the machine (``costs.py``), never assumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class CostCurve:
    """Measured cost of one verification forward as a function of the number of tree nodes (per row).

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

    @staticmethod
    def flat(max_size: int = 64) -> CostCurve:
        """Verification as cheap at ``max_size`` nodes as at one (a GPU-like curve; tests, forced benchmarks)."""
        sizes = np.unique([1, max_size])
        return CostCurve(sizes=sizes, ms=np.ones(len(sizes)))

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

    >>> cpu = CostCurve(sizes=np.array([1, 2, 8]), ms=np.array([40.0, 56, 80]))
    >>> best_size(np.array([0.9, 0.8, 0.1]), cpu), best_size(np.array([0.2, 0.1]), cpu)
    (2, 0)
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
