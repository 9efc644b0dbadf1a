"""REST (He et al. 2024): draft what followed the longest suffix of the context in a corpus datastore.

Per step: find the longest context suffix (``max_match`` down to ``min_match`` tokens) that occurs in the
datastore; take up to ``max_occurrences`` of its occurrences, evenly spread; read the ``depth`` tokens that
follow each, stopping at the end of its document; count them into a trie and keep the ``budget`` most
frequent nodes. Unlike REST, no fixed token is proposed when nothing matches, and matches never run across
documents.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..compiled import array, f32, f64, i32, i64, kernel, returns, view
from ..datastore.reader import Datastore
from ..tree import DraftTree, Source, node_key, node_slot, node_table
from .base import Drafter, RequestId


def match_prior(length: int) -> float:
    """Rough chance that the target follows a corpus continuation after a ``length``-token match.

    0.3 after one token, rising by 0.1 a token to 0.8 from six on; the decoder calibrates scores online, so
    only the order matters here.
    """
    return min(0.8, 0.2 + 0.1 * length)


class RestDrafter(Drafter):
    """Drafts from a :class:`~retrieval_spec.datastore.reader.Datastore`.

    Within a request it remembers the last match: the next match can be at most as much longer as the
    context has grown (a longer one would have matched before), so the lookup starts from that bound.
    """

    source = Source.CORPUS

    def __init__(
        self,
        datastore: Datastore,
        *,
        max_match: int = 16,  # starting values, to be tuned with benchmarks/simulate.py
        min_match: int = 1,
        max_occurrences: int = 256,
        depth: int = 8,
    ) -> None:
        """
        Args:
            datastore: an open datastore built with the model's tokenizer.
            max_match: longest context suffix looked up, in tokens.
            min_match: shortest suffix worth drafting from; shorter matches give an empty tree.
            max_occurrences: occurrences whose continuations are counted.
            depth: tokens read after each occurrence: the deepest a node can be.
        """
        if not 1 <= min_match <= max_match:
            raise ValueError(f"need 1 <= min_match <= max_match, got {min_match} and {max_match}")
        self.datastore = datastore
        self.max_match = max_match
        self.min_match = min_match
        self.max_occurrences = max_occurrences
        self.depth = depth
        self._previous: dict[RequestId, tuple[int, int]] = {}  # per request: (context length, bound on its match)

    def start(self, request: RequestId, prompt: np.ndarray, references: Sequence[np.ndarray] = ()) -> None:
        self._previous.pop(request, None)

    def finish(self, request: RequestId) -> None:
        self._previous.pop(request, None)

    def propose(self, request: RequestId, context: np.ndarray, budget: int) -> DraftTree:
        """At most ``budget`` nodes continuing ``context`` ((c,) int32, c >= 1), most frequent branches first.

        A node's score is the share of the sampled occurrences whose continuation passes through it, times
        :func:`match_prior` of the match length.
        """
        root = int(context[-1])
        if budget <= 0 or self.depth <= 0:
            return DraftTree.empty(root)
        max_len = self.max_match
        previous = self._previous.get(request)
        if previous is not None and len(context) >= previous[0]:
            max_len = min(max_len, previous[1] + len(context) - previous[0])
        match = self.datastore.longest_match(context, max_len, self.min_match)
        # With no match, the true longest may still be up to min_match - 1 tokens.
        self._previous[request] = (len(context), match.length or self.min_match - 1)
        if match.length == 0:
            return DraftTree.empty(root)
        starts = self.datastore.positions(match, self.max_occurrences) + match.length
        continuations = self.datastore.continuations(starts, self.depth)
        return _most_frequent_trie(root, continuations, budget, match.length)


def _most_frequent_trie(root: int, continuations: np.ndarray, budget: int, matched: int) -> DraftTree:
    """The ``budget`` most frequent nodes of the trie of ``continuations`` ((k, depth) int32, each row cut at its
    first negative token: -1 where its document ended), after a match of ``matched`` tokens: by count, then the
    shallower, then the prefix that sorts first. A parent is at least as frequent as its child and shallower, so
    every chosen node's parent is chosen, before it. A node's score is the share of the rows through it times
    :func:`match_prior` (``matched``). One compiled call (:func:`_frequent_trie`)."""
    tokens, parents, scores, depths = _frequent_trie(root, continuations, budget,
                                                     match_prior(matched) / len(continuations))
    if len(tokens) == 1:
        return DraftTree.empty(root)
    sources = np.full(len(tokens), Source.CORPUS, dtype=np.uint8)
    sources[0] = Source.ROOT
    matches = np.full(len(tokens), matched, dtype=np.int32)
    matches[0] = 0
    return DraftTree.trusted(tokens, parents, scores, sources, matches, depths)


@kernel(returns(array(i32), array(i32), array(f32), array(i32)), i64, view(i32, 2), i64, f64)
def _frequent_trie(root, continuations, budget, share):
    """:func:`_most_frequent_trie`'s tree: tokens, parents, scores (count times ``share``) and depths. The rows are
    counted into a trie through a :func:`~retrieval_spec.tree.node_table`; each depth's nodes are ranked by
    their prefix (the parent's rank, then the token), and the nodes are chosen by (count descending, depth, that
    rank)."""
    num_rows, depth = continuations.shape
    most = num_rows * depth
    keys, values = node_table(most)
    token_of = np.empty(most, dtype=np.int64)
    parent_of = np.empty(most, dtype=np.int64)  # -1: the root
    depth_of = np.empty(most, dtype=np.int64)
    count = np.zeros(most, dtype=np.int64)
    n = 0
    for row in range(num_rows):
        parent = -1
        for d in range(depth):
            token = continuations[row, d]
            if token < 0:
                break
            key = node_key(parent + 1, token)  # the root is -1 here
            slot = node_slot(keys, key)
            if keys[slot] == -1:
                keys[slot], values[slot] = key, n
                token_of[n], parent_of[n], depth_of[n] = token, parent, d
                n += 1
            node = values[slot]
            count[node] += 1
            parent = node
    rank = np.zeros(n, dtype=np.int64)  # a node's place among its depth's nodes, by prefix
    for d in range(depth):
        members = np.flatnonzero(depth_of[:n] == d)
        order = np.empty(len(members), dtype=np.int64)
        for j in range(len(members)):
            node = members[j]
            order[j] = ((rank[parent_of[node]] if parent_of[node] >= 0 else 0) << 32) | token_of[node]
        ranked = members[np.argsort(order)]
        for j in range(len(ranked)):
            rank[ranked[j]] = j
    priority = np.empty(n, dtype=np.int64)
    for node in range(n):
        priority[node] = ((num_rows - count[node]) * depth + depth_of[node]) * (n + 1) + rank[node]
    chosen = np.argsort(priority)[: max(min(budget, n), 0)]
    m = len(chosen) + 1
    tokens = np.empty(m, dtype=np.int32)
    parents = np.empty(m, dtype=np.int32)
    scores = np.empty(m, dtype=np.float32)
    depths = np.empty(m, dtype=np.int32)
    tokens[0], parents[0], scores[0], depths[0] = root, -1, 1.0, 0
    index = np.zeros(n, dtype=np.int32)  # each chosen node's place in the tree
    for j in range(len(chosen)):
        node = chosen[j]
        index[node] = j + 1
        tokens[j + 1] = token_of[node]
        parents[j + 1] = index[parent_of[node]] if parent_of[node] >= 0 else 0
        scores[j + 1] = np.float32(np.float64(count[node]) * share)
        depths[j + 1] = depth_of[node] + 1
    return tokens, parents, scores, depths
