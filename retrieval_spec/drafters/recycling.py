"""Token Recycling: draft from the target's own earlier top-k predictions (Luo et al., arXiv 2408.08696).

Every verification computes the target's distribution at every tree node. The table keeps, for each token,
the k tokens the target ranked highest the last time it saw that token at a node, and a bounded second table does
the same for pairs of tokens (the token and the one before it), which predicts better where it knows the pair;
drafting expands the newest token through them, most likely node first, within a fixed shape. No model, no
extra forward pass: the table is (vocab, k) int32 — 1.5 MB for a 49k vocabulary at k = 8 — and the pairs a
direct-mapped table of ``pair_slots`` rows of k (20 MB with its keys at the default). The walk is compiled: a
step's tree of 64 nodes costs microseconds, not the tenth of a millisecond a Python loop over its nodes took.
"""

from __future__ import annotations

import functools
import heapq
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..compiled import array, boolean, f32, i32, i64, kernel, returns, u8, view, void
from ..tree import DraftTree, Source, StepFeedback, hash_slot
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
        pair_slots: rows of the pairs table, a power of two. The table is direct-mapped (each pair has one slot,
            by a hash): a pair written into a slot another pair held makes it forget that one. On Spec-Bench's
            recorded outputs (``simulate.py``, auto, flat 64-node curve) the same tokens per step as a
            least-recently-written dictionary of 2**18 pairs.
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
    pair_slots: int = 1 << 19
    next_next: bool = True

    def __post_init__(self) -> None:
        if self.k < 1 or len(self.rank_probs) < self.k or any(w > self.k for w in self.shape):
            raise ValueError("RecyclingConfig needs k >= 1, a rank prob per rank, and shape widths <= k")
        if self.pair_slots < 1 or self.pair_slots & (self.pair_slots - 1):
            raise ValueError("RecyclingConfig.pair_slots must be a power of two")


class RecyclingDrafter(Drafter):
    """Drafts by walking the target's recorded top-k successors of each token; one table for every request."""

    source = Source.RECYCLE
    state_file = "recycling.npz"

    def __init__(self, vocab_size: int, config: RecyclingConfig = RecyclingConfig()) -> None:
        self.config = config
        self.top_k = config.k
        self.table = np.zeros((vocab_size, config.k), dtype=np.int32)
        self.known = np.zeros(vocab_size, dtype=bool)  # rows that hold real predictions
        # The pairs table: per slot the pair's key (:func:`pair_key`; 0: empty) and the top-k after both tokens.
        self.pair_keys = np.zeros(config.pair_slots, dtype=np.int64)
        self.pair_rows = np.zeros((config.pair_slots, config.k), dtype=np.int32)
        self._before_root: dict[RequestId, int] = {}  # per request: the token before its last proposal's root
        # Per request: the target's (k,) top tokens where it chose the newest token, and that token (next_next).
        self._next_next: dict[RequestId, tuple[np.ndarray, int]] = {}
        self._shape = shape_order(config.shape, config.rank_probs)

    def finish(self, request: RequestId) -> None:
        self._before_root.pop(request, None)
        self._next_next.pop(request, None)

    def successors(self, before: int, token: int) -> np.ndarray | None:
        """(k,) the target's most likely tokens after ``token`` (preceded by ``before``, -1 if unknown), or None."""
        found = _lookup(self.pair_keys, self.known, before, token)
        return self.pair_rows[found] if found >= 0 else self.table[token] if found == _TOKEN_ROW else None

    def propose(self, request: RequestId, context: np.ndarray, budget: int) -> DraftTree:
        """The shape's nodes most likely first (:func:`shape_order`), each filled with its rank in its parent's
        successors; a node whose parent has none, or that repeats a sibling, is left out with its subtree. The
        root's candidate children (:func:`_root_row`) also take the step's other top tokens (``next_next``)."""
        root = int(context[-1])
        before = int(context[-2]) if len(context) > 1 else -1
        self._before_root[request] = before
        if budget <= 0:
            return DraftTree.empty(root)
        tokens, parents, scores, sources, depths = _walk(
            before, root, self.table, self.known, self.pair_keys, self.pair_rows, *self._shape, budget,
            *(self._next_next.get(request, _NO_EXTRA) if self.config.next_next else _NO_EXTRA), int(self.source))
        if len(tokens) == 1:
            return DraftTree.empty(root)
        return DraftTree.trusted(tokens, parents, scores, sources, depths=depths)

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
                self._next_next[request] = (top[at, : self.config.k], int(feedback.new_tokens[-1]))
        _learn_rows(self.table, self.known, self.pair_keys, self.pair_rows, tree.tokens, tree.parents,
                    np.asarray(nodes, dtype=np.int64), top, self.config.k, self._before_root.get(request, -1))

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


_TOKEN_ROW, _NO_ROW = -1, -2  # what _lookup answers when the pair is not in the pairs table
_NEXT_NEXT = int(Source.NEXT_NEXT)  # a plain int inside the compiled walk
_NO_EXTRA = (np.zeros(0, dtype=np.int32), -1)  # no top tokens where the root was chosen


@kernel(i64, i64, i64)
def pair_key(before: int, token: int) -> int:
    """The pairs table's key of a token and the one before it (-1 if none): positive (0 marks an empty slot), distinct
    per pair."""
    return ((np.int64(before) + 2) << 32) | (np.int64(token) & 0xFFFFFFFF)


@kernel(i64, view(i64), view(boolean), i64, i64)
def _lookup(keys, known, before, token):
    """Where the successors of ``token`` after ``before`` are: the pair's slot in the pairs table (``keys``), else
    :data:`_TOKEN_ROW` (the token's own row, known) or :data:`_NO_ROW` (none, or a token outside the table)."""
    key = pair_key(before, token)
    slot = hash_slot(key, len(keys))
    if keys[slot] == key:
        return slot
    return _TOKEN_ROW if 0 <= token < len(known) and known[token] else _NO_ROW


@kernel(boolean, array(i32), i64, i64, view(i32, 2), view(boolean), view(i64), view(i32, 2))
def _successors_into(out, before, token, table, known, keys, rows):
    """Write the successors of ``token`` after ``before`` into ``out`` ((k,)): its pair's row in the pairs table
    (``keys``, ``rows``), else its token's row when known; False, ``out`` untouched, when it has none."""
    found = _lookup(keys, known, before, token)
    if found >= 0:
        out[:] = rows[found]
    elif found == _TOKEN_ROW:
        out[:] = table[token]
    return found != _NO_ROW


@kernel(void, array(i32, 2), array(boolean), array(i64), array(i32, 2), view(i32), view(i32), view(i64), view(i32, 2),
        i64, i64)
def _learn_rows(table, known, keys, rows, tokens, parents, nodes, top, k, before):
    """:meth:`RecyclingDrafter.observe`'s writes: for each of ``nodes`` (in order: a token or pair written twice
    keeps its last row), the first ``k`` of its ``top`` row into its token's row and into its pair's slot (the pair
    of its parent's token, or ``before`` for the root, and its own)."""
    for i in range(len(nodes)):
        node = nodes[i]
        token = tokens[node]
        table[token] = top[i, :k]
        known[token] = True
        key = pair_key(tokens[parents[node]] if parents[node] >= 0 else before, token)
        slot = hash_slot(key, len(keys))
        keys[slot] = key
        rows[slot] = top[i, :k]


@kernel(i64, array(i32), i64, i64, i64)
def _add_once(turns, count, candidate, k):
    """Append ``candidate`` to the first ``count`` of ``turns`` unless it is there or ``k`` are; the new count."""
    if count == k:
        return count
    for j in range(count):
        if turns[j] == candidate:
            return count
    turns[count] = candidate
    return count + 1


@kernel(returns(array(i32), array(i32)), i64, i64, view(i32, 2), view(boolean), view(i64), view(i32, 2), view(i32),
        i64)
def _root_row(before, root, table, known, keys, rows, top, chosen):
    """(k,) the root's candidate children by rank, or none (an empty array): its remembered successors
    (:func:`_lookup`), and where the step chose the root (``chosen``) among top tokens ``top`` (empty: unknown) the
    remembered first, then the other remembered successors and the other top tokens taking turns, each once
    (repeats of the first fill the row: the walk skips them); and, sorted, the tokens of the row that only the top
    tokens offered."""
    k = table.shape[1]
    remembered = np.empty(k, dtype=np.int32)
    if not _successors_into(remembered, before, root, table, known, keys, rows):
        remembered = remembered[:0]
    extra = top[top != chosen]
    if len(extra) == 0:
        return remembered, np.empty(0, dtype=np.int32)
    turns = np.empty(k, dtype=np.int32)
    count = 0
    for i in range(max(len(remembered), len(extra) + 1)):
        if i < len(remembered):
            count = _add_once(turns, count, remembered[i], k)
        if 1 <= i <= len(extra):
            count = _add_once(turns, count, extra[i - 1], k)
    turns[count:] = turns[0]
    offered = np.empty(count, dtype=np.int32)
    only = 0
    for j in range(count):
        if not np.any(remembered == turns[j]):
            offered[only] = turns[j]
            only += 1
    return turns, np.sort(offered[:only])


@kernel(returns(array(i32), array(i32), array(f32), array(u8), array(i32)), i64, i64, view(i32, 2), view(boolean),
        view(i64), view(i32, 2), view(i64), view(f32), view(i64), view(i32), i64, view(i32), i64, u8)
def _walk(before, root, table, known, keys, rows, ranks, slot_scores, slot_parents, slot_depths, budget, top, chosen,
          source):
    """The drafted tree: the shape's slots in order (most likely first), each placed as the token of its rank in its
    parent's successors unless its parent was not placed, has none, or an earlier rank holds the same token; until
    ``budget`` nodes are placed. The successors of the root: :func:`_root_row`; of another node:
    :func:`_successors_into` (none for a token outside the table). Returns the tree's tokens, parents, scores (the
    slots'), sources (``source``, but the root's children that only the top tokens where the root was chosen,
    ``top``, offered are :data:`Source.NEXT_NEXT`) and depths; the root alone when it has no successors."""
    k = table.shape[1]
    first, next_next = _root_row(before, root, table, known, keys, rows, top, chosen)
    budget = min(budget, len(ranks) - 1) if len(first) else 0  # no more nodes than the shape has
    node_of = np.full(len(ranks), -1, dtype=np.int32)
    node_of[0] = 0
    tokens = np.empty(budget + 1, dtype=np.int32)
    parents = np.empty(budget + 1, dtype=np.int32)
    slots = np.zeros(budget + 1, dtype=np.int64)
    successors = np.empty((budget + 1, k), dtype=np.int32)
    state = np.zeros(budget + 1, dtype=np.int8)  # 0: successors not looked up yet, 1: found, -1: none
    tokens[0], parents[0] = root, -1
    if len(first):
        successors[0] = first
    state[0] = 1
    count = 1
    for slot in range(1, len(ranks)):
        if count > budget:
            break
        parent = node_of[slot_parents[slot]]
        if parent < 0:
            continue
        if state[parent] == 0:
            above = tokens[parents[parent]] if parent > 0 else before
            found = _successors_into(successors[parent], above, tokens[parent], table, known, keys, rows)
            state[parent] = 1 if found else -1
        if state[parent] < 0:
            continue
        rank = ranks[slot]
        child = successors[parent, rank]
        repeat = False
        for earlier in range(rank):
            if successors[parent, earlier] == child:
                repeat = True
                break
        if repeat:
            continue
        tokens[count], parents[count], slots[count] = child, parent, slot
        node_of[slot] = count
        count += 1
    scores = np.empty(count, dtype=np.float32)
    sources = np.full(count, source, dtype=np.uint8)
    depths = np.empty(count, dtype=np.int32)
    sources[0] = 0  # Source.ROOT
    for node in range(count):
        scores[node], depths[node] = slot_scores[slots[node]], slot_depths[slots[node]]
        if parents[node] == 0 and len(next_next) > 0:
            at = np.searchsorted(next_next, tokens[node])
            if at < len(next_next) and next_next[at] == tokens[node]:
                sources[node] = _NEXT_NEXT
    return tokens[:count], parents[:count], scores, sources, depths


@functools.cache
def shape_order(shape: tuple[int, ...], rank_probs: tuple[float, ...]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every node of the full tree of ``shape`` (``shape[d]`` children under each node at depth ``d``), most likely
    first (the product of the ranks' probabilities along its path; ties: the order a frontier expansion meets
    them), so every node comes after its parent: per node (n,) int64 its rank among its siblings, (n,) float32 its
    score, (n,) int64 its parent's position (-1 for the root) and (n,) int32 its depth. Drafting walks a head of
    this order, skipping the subtrees it cannot fill."""
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
    return (np.array(ranks, dtype=np.int64), np.array(scores, dtype=np.float32), np.array(parents, dtype=np.int64),
            np.array(depth, dtype=np.int32))
