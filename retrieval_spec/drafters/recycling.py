"""Token Recycling: draft from the target's own earlier top-k predictions (Luo et al., arXiv 2408.08696).

Every verification computes the target's distribution at every tree node. The table keeps, for each token,
the k tokens the target ranked highest the last time it saw that token at a node; drafting expands the
newest token through the table breadth-first along a fixed shape. No model, no extra forward pass: the
table is (vocab, k) int32 — 1.5 MB for a 49k vocabulary at k = 8.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from pathlib import Path
import numpy as np

from ..tree import DraftTree, Source, StepFeedback
from .base import Drafter, RequestId
from .state import read_state, write_state

FORMAT_VERSION = 1


@dataclass(frozen=True)
class RecyclingConfig:
    """Table width and the drafted tree's shape.

    Attributes:
        k: tokens remembered per token.
        shape: most children a node at each depth may have (``shape[0]`` under the root); within it the tree
            grows most likely node first (products of ``rank_probs``) up to the budget. The decoder keeps only
            the nodes worth their cost, so the shape is an upper bound, not the verified tree.
        rank_probs: rough chance that the target picks the token of each rank; recalibrated online.
    """

    k: int = 8
    shape: tuple[int, ...] = (8, 3, 2, 2, 1, 1, 1, 1)
    rank_probs: tuple[float, ...] = (0.55, 0.15, 0.07, 0.04, 0.03, 0.02, 0.02, 0.02)

    def __post_init__(self) -> None:
        if self.k < 1 or len(self.rank_probs) < self.k or any(w > self.k for w in self.shape):
            raise ValueError("RecyclingConfig needs k >= 1, a rank prob per rank, and shape widths <= k")


class RecyclingDrafter(Drafter):
    """Drafts by walking the target's recorded top-k successors of each token; one table for every request."""

    source = Source.RECYCLE
    state_file = "recycling.npz"

    def __init__(self, vocab_size: int, config: RecyclingConfig = RecyclingConfig()) -> None:
        self.config = config
        self.top_k = config.k
        self.table = np.zeros((vocab_size, config.k), dtype=np.int32)
        self.known = np.zeros(vocab_size, dtype=bool)  # rows that hold real predictions

    def propose(self, request: RequestId, context: np.ndarray, budget: int) -> DraftTree:
        root = int(context[-1])
        if budget <= 0 or not self.known[root]:
            return DraftTree.empty(root)
        probs = self.config.rank_probs
        tokens, parents, scores, node_depth = [root], [-1], [1.0], [0]
        frontier: list[tuple[float, int, int, int]] = []  # (-score, order, parent, token): most likely first
        order = itertools.count()

        def expand(node: int) -> None:
            depth, token = node_depth[node], tokens[node]
            if depth >= len(self.config.shape) or not self.known[token]:
                return
            seen = set()
            for rank, child in enumerate(self.table[token, : self.config.shape[depth]].tolist()):
                if child not in seen:  # warm-started rows may repeat their last token
                    seen.add(child)
                    heapq.heappush(frontier, (-scores[node] * probs[rank], next(order), node, child))

        expand(0)
        while frontier and len(tokens) <= budget:
            negative, _, parent, token = heapq.heappop(frontier)
            tokens.append(token)
            parents.append(parent)
            scores.append(-negative)
            node_depth.append(node_depth[parent] + 1)
            expand(len(tokens) - 1)
        return DraftTree(
            tokens=np.array(tokens, dtype=np.int32),
            parents=np.array(parents, dtype=np.int32),
            scores=np.array(scores, dtype=np.float32),
            sources=np.array([Source.ROOT] + [self.source] * (len(tokens) - 1), dtype=np.uint8),
        )

    def observe(self, request: RequestId, feedback: StepFeedback) -> None:
        """Overwrite the rows of every verified node's token with the target's top-k there."""
        top = feedback.top_tokens
        if top.shape[1] < self.config.k:
            return
        nodes = feedback.tree.tokens
        self.table[nodes] = top[:, : self.config.k]
        self.known[nodes] = True

    def warm_start(self, successors: np.ndarray) -> None:
        """Fill the rows not learned yet from a corpus's most frequent next tokens (``Datastore.top_next_tokens``).

        Args:
            successors: (vocab, j) int32, most frequent first, -1 where a token has fewer successors. Rows with
                none stay unknown; -1 entries become repeats of the first token, which drafting skips.
        """
        rows = successors[:, : self.config.k]
        if rows.shape[1] < self.config.k:
            rows = np.concatenate([rows, np.full((len(rows), self.config.k - rows.shape[1]), -1, np.int32)], axis=1)
        fresh = ~self.known & (rows[:, 0] >= 0)
        filled = np.where(rows < 0, rows[:, :1], rows)
        self.table[fresh] = filled[fresh]
        self.known |= fresh

    def save(self, directory: Path, tokenizer_sha256: str) -> None:
        """Write the table atomically: ``directory`` gets ``recycling.npz`` with its metadata."""
        write_state(directory / self.state_file, {"table": self.table, "known": self.known}, FORMAT_VERSION,
                    tokenizer_sha256, k=self.config.k)

    def load(self, directory: Path, tokenizer_sha256: str, vocab_size: int) -> None:
        """Read a table saved by :meth:`save` for the same tokenizer.

        Raises:
            DatastoreFormatError: unreadable file, other format version or shape, ids outside the vocabulary.
            TokenizerMismatchError: saved for another tokenizer.
        """
        rows = len(self.table)
        arrays, _ = read_state(directory / self.state_file, FORMAT_VERSION, tokenizer_sha256,
                               shapes={"table": (rows, self.config.k), "known": (rows,)}, vocab_size=vocab_size)
        self.table, self.known = arrays["table"].astype(np.int32), arrays["known"].astype(bool)
