"""Token Recycling: draft from the target's own earlier top-k predictions (Luo et al., arXiv 2408.08696).

Every verification computes the target's distribution at every tree node. The table keeps, for each token,
the k tokens the target ranked highest the last time it saw that token at a node, and a bounded second table does
the same for pairs of tokens (the token and the one before it), which predicts better where it knows the pair;
drafting expands the newest token through them, most likely node first, within a fixed shape. No model, no
extra forward pass: the table is (vocab, k) int32 — 1.5 MB for a 49k vocabulary at k = 8 — and the pairs at
most ``max_pairs`` rows of k.
"""

from __future__ import annotations

import functools
import heapq
from collections import OrderedDict
from dataclasses import dataclass
from itertools import zip_longest
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
            the nodes worth their cost, so the shape is an upper bound, not the verified tree: it matters where
            nodes are cheap. A/B on a flat 64-node curve (the real model, Spec-Bench's later prompts): 2.58
            tokens per step against 2.50 for ``(8, 3, 2, 2, 1, 1, 1, 1)``, though not on the measured split (2.70
            against 2.72 before, across runs); on the CPU's curve no change.
        rank_probs: rough chance that the target picks the token of each rank; recalibrated online.
        max_pairs: token pairs remembered (least recently written forgotten first).
        next_next: the root's children also come from the target's other top tokens at the node that chose the
            root (LogitSpec, arXiv 2507.01449: the token after next is often among them), taking turns with the
            root's remembered successors after its first; they are nodes of their own source
            (``Source.NEXT_NEXT``), so the calibration prices them apart. On the recorded outputs of Spec-Bench's
            later prompts the first of them is the next token 5.0% of the time (the remembered successors by rank:
            27.3%, 6.3%, 3.1%), and they lift the share of next tokens among the root's candidates from 43% to 50%.
            A/B on the real model in one process (``auto`` with and without, those prompts): on a flat 64-node curve
            2.46 -> 2.78 tokens per step (12 of 13 categories up); on the CPU's curve 1.26x -> 1.27x ``generate()``.
            Taking turns from the second rank without their own source cost 3% on the CPU's curve.
    """

    k: int = 8
    shape: tuple[int, ...] = (8, 4, 3, 2, 2, 2, 1, 1, 1, 1)
    rank_probs: tuple[float, ...] = (0.55, 0.15, 0.07, 0.04, 0.03, 0.02, 0.02, 0.02)
    max_pairs: int = 1 << 18
    next_next: bool = True

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
        # Per request: the target's other top tokens where it chose the newest token (config.next_next).
        self._next_next: dict[RequestId, list[int]] = {}

    def finish(self, request: RequestId) -> None:
        self._before_root.pop(request, None)
        self._next_next.pop(request, None)

    def successors(self, before: int, token: int) -> np.ndarray | None:
        """(k,) the target's most likely tokens after ``token`` (preceded by ``before``, -1 if unknown), or None."""
        row = self.pairs.get((before, token))
        if row is not None:
            return row
        return self.table[token] if self.known[token] else None

    def propose(self, request: RequestId, context: np.ndarray, budget: int) -> DraftTree:
        """Walk the shape's nodes most likely first (:func:`shape_order`), filling each with its rank in its
        parent's successors; a node whose parent has none, or that repeats a sibling, is left out with its
        subtree."""
        root = int(context[-1])
        before = int(context[-2]) if len(context) > 1 else -1
        self._before_root[request] = before
        first, next_next = self._root_row(request, before, root)
        if budget <= 0 or first is None:
            return DraftTree.empty(root)
        ranks, slot_scores, slot_children = shape_order(self.config.shape, self.config.rank_probs)
        frontier = [(slot, 0) for slot in slot_children[0]]  # (shape node, its parent's tree node): a heap
        rows: dict[int, list[int] | None] = {0: first.tolist()}  # tree node -> its successors
        tokens, parents, scores, depths, sources = [root], [-1], [1.0], [0], [Source.ROOT]
        while frontier and len(tokens) <= budget:
            slot, parent = heapq.heappop(frontier)
            if parent not in rows:
                found = self.successors(tokens[parents[parent]] if parent else before, tokens[parent])
                rows[parent] = None if found is None else found.tolist()
            row, rank = rows[parent], ranks[slot]
            # Siblings come in rank order, each placed unless it repeats an earlier one (warm-started rows may
            # repeat their last token): a repeat of any earlier rank is a repeat of a placed sibling.
            if row is None or row[rank] in row[:rank]:
                continue
            child, node = row[rank], len(tokens)
            tokens.append(child)
            parents.append(parent)
            scores.append(slot_scores[slot])
            depths.append(depths[parent] + 1)
            sources.append(Source.NEXT_NEXT if parent == 0 and child in next_next else self.source)
            for below in slot_children[slot]:
                heapq.heappush(frontier, (below, node))
        return DraftTree.trusted(np.array(tokens, dtype=np.int32), np.array(parents, dtype=np.int32),
                                 np.array(scores, dtype=np.float32), np.array(sources, dtype=np.uint8),
                                 depths=np.array(depths, dtype=np.int32))

    def _root_row(self, request: RequestId, before: int, root: int) -> tuple[np.ndarray | None, frozenset[int]]:
        """(k,) the root's candidate children by rank: its remembered most likely successor, then its other
        remembered successors and (``next_next``) the other top tokens of the step that chose it, taking turns, each
        once (repeats of the first fill the row: the walk skips them), or None when there are none; and the tokens
        of the row that only the step's top tokens offered."""
        row = self.successors(before, root)
        extra = self._next_next.get(request) if self.config.next_next else None
        if not extra:
            return row, frozenset()
        remembered = [] if row is None else row.tolist()
        turns = remembered[:1] + [t for pair in zip_longest(remembered[1:], extra) for t in pair if t is not None]
        merged = list(dict.fromkeys(turns))[: self.config.k]
        return (np.array(merged + merged[:1] * (self.config.k - len(merged)), dtype=np.int32),
                frozenset(merged) - frozenset(remembered))

    def observe(self, request: RequestId, feedback: StepFeedback) -> None:
        """Overwrite the rows of every node whose top-k the verifier reported (``feedback.top_nodes``), and of its
        pair with its parent's token (the root's: the token before it), with the target's top-k there; keep the
        top-k where the step's last token was chosen, less that token (``next_next``)."""
        top = feedback.top_tokens
        self._next_next.pop(request, None)
        if top.shape[1] < self.config.k or not len(top):
            return
        tree, nodes = feedback.tree, feedback.top_nodes
        if len(feedback.new_tokens):
            chose = feedback.accepted_nodes[len(feedback.new_tokens) - 1]  # where the last new token was chosen
            at = int(np.searchsorted(nodes, chose))
            if at < len(nodes) and nodes[at] == chose:
                last = int(feedback.new_tokens[-1])
                self._next_next[request] = [t for t in top[at, : self.config.k].tolist() if t != last]
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


@functools.cache
def shape_order(shape: tuple[int, ...], rank_probs: tuple[float, ...]
                ) -> tuple[list[int], list[float], list[tuple[int, ...]]]:
    """Every node of the full tree of ``shape`` (``shape[d]`` children under each node at depth ``d``), most likely
    first (the product of the ranks' probabilities along its path; ties: the order a frontier expansion meets
    them): per node its rank among its siblings, its score and its children's positions in this order (in rank
    order). Drafting walks a head of this order, most likely node first, skipping the subtrees it cannot fill."""
    parents, ranks, scores, depth = [-1], [0], [1.0], [0]
    frontier = [(-rank_probs[rank], rank, 0, rank) for rank in range(shape[0])]  # (-score, tie, parent, rank)
    heapq.heapify(frontier)
    tie = len(frontier)
    while frontier:
        negative, _, parent, rank = heapq.heappop(frontier)
        parents.append(parent)
        ranks.append(rank)
        scores.append(-negative)
        depth.append(depth[parent] + 1)
        if depth[-1] < len(shape):
            for child_rank in range(shape[depth[-1]]):
                heapq.heappush(frontier, (negative * rank_probs[child_rank], tie, len(parents) - 1, child_rank))
                tie += 1
    children: list[list[int]] = [[] for _ in parents]
    for node, parent in enumerate(parents[1:], 1):
        children[parent].append(node)
    return ranks, scores, [tuple(c) for c in children]
