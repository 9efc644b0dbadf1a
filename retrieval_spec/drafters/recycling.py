"""Token Recycling: draft from the target's own earlier top-k predictions (Luo et al., arXiv 2408.08696).

Every verification computes the target's distribution at every tree node. The table keeps, for each token,
the k tokens the target ranked highest the last time it saw that token at a node, and a bounded second table does
the same for pairs of tokens (the token and the one before it), which predicts better where it knows the pair;
drafting expands the newest token through them, most likely node first, within a fixed shape. No model, no
extra forward pass: the table is (vocab, k) int32 — 1.5 MB for a 49k vocabulary at k = 8 — and the pairs at
most ``max_pairs`` rows of k.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
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
        max_pairs: token pairs remembered (least recently written forgotten first).
    """

    k: int = 8
    shape: tuple[int, ...] = (8, 3, 2, 2, 1, 1, 1, 1)
    rank_probs: tuple[float, ...] = (0.55, 0.15, 0.07, 0.04, 0.03, 0.02, 0.02, 0.02)
    max_pairs: int = 1 << 18

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
        self.pairs: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()  # (before, token) -> top-k after both
        self._before_root: dict[RequestId, int] = {}  # per request: the token before its last proposal's root

    def finish(self, request: RequestId) -> None:
        self._before_root.pop(request, None)

    def successors(self, before: int, token: int) -> np.ndarray | None:
        """(k,) the target's most likely tokens after ``token`` (preceded by ``before``, -1 if unknown), or None."""
        row = self.pairs.get((before, token))
        if row is not None:
            return row
        return self.table[token] if self.known[token] else None

    def propose(self, request: RequestId, context: np.ndarray, budget: int) -> DraftTree:
        root = int(context[-1])
        before = int(context[-2]) if len(context) > 1 else -1
        self._before_root[request] = before
        if budget <= 0 or self.successors(before, root) is None:
            return DraftTree.empty(root)
        probs = self.config.rank_probs
        tokens, parents, scores, node_depth = [root], [-1], [1.0], [0]
        frontier: list[tuple[float, int, int, int]] = []  # (-score, order, parent, token): most likely first
        order = itertools.count()

        def expand(node: int) -> None:
            depth, token = node_depth[node], tokens[node]
            row = self.successors(tokens[parents[node]] if node else before, token)
            if depth >= len(self.config.shape) or row is None:
                return
            seen = set()
            for rank, child in enumerate(row[: self.config.shape[depth]].tolist()):
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
        """Overwrite the rows of every node whose top-k the verifier reported (``feedback.top_nodes``), and of its
        pair with its parent's token (the root's: the token before it), with the target's top-k there."""
        top = feedback.top_tokens
        if top.shape[1] < self.config.k or not len(top):
            return
        tree, nodes = feedback.tree, feedback.top_nodes
        rows = top[:, : self.config.k]
        tokens = tree.tokens[nodes]
        self.table[tokens] = rows
        self.known[tokens] = True
        before = self._before_root.get(request, -1)
        parents = tree.parents[nodes]
        befores = np.where(parents >= 0, tree.tokens[np.maximum(parents, 0)], before).tolist()
        for pair, row in zip(zip(befores, tokens.tolist()), rows):
            self.pairs[pair] = row
            self.pairs.move_to_end(pair)
        while len(self.pairs) > self.config.max_pairs:
            self.pairs.popitem(last=False)

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
