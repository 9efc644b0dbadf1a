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

from ..datastore.reader import Datastore
from ..tree import DraftTree, Source
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
    """The ``budget`` most frequent nodes of the trie of ``continuations`` ((k, depth) int32, -1 padded), after a
    match of ``matched`` tokens.

    Sorting the rows makes every trie node a run of consecutive rows at its depth, so nodes are counted
    without a Python loop. A parent is at least as frequent as its child and shallower, so ranking nodes by
    (count descending, depth) keeps every chosen node's parent and lists parents first.
    """
    num_rows, depth = continuations.shape
    rows = continuations[np.lexsort(continuations.T[::-1])]
    opens = np.ones((num_rows, depth), dtype=bool)  # row r starts a node at depth d: its prefix differs from r-1's
    opens[1:] = np.logical_or.accumulate(rows[1:] != rows[:-1], axis=1)
    # Read depth by depth: each depth begins with a node at row 0, so a node's count is the gap to the next.
    flat_opens = opens.T.ravel()
    starts = np.flatnonzero(flat_opens)  # (num_nodes,) flat index depth * num_rows + row of each node
    num_nodes = len(starts)
    counts = np.append(starts[1:], depth * num_rows) - starts
    tokens = rows.T.ravel()[starts]
    node_depth = starts // num_rows
    node_of = np.cumsum(flat_opens) - 1  # the node that each (depth, row) belongs to
    # A node's parent holds the same row one depth up; depth-0 nodes point at slot num_nodes, the root.
    parents = np.where(node_depth > 0, node_of[starts - num_rows], num_nodes)
    candidates = np.flatnonzero(tokens >= 0)  # -1: the document ended before this depth
    chosen = candidates[np.lexsort((node_depth[candidates], -counts[candidates]))[:budget]]
    if len(chosen) == 0:
        return DraftTree.empty(root)
    tree_index = np.zeros(num_nodes + 1, dtype=np.int32)
    tree_index[chosen] = np.arange(1, len(chosen) + 1)
    return DraftTree(
        tokens=np.concatenate(([root], tokens[chosen])).astype(np.int32),
        parents=np.concatenate(([-1], tree_index[parents[chosen]])).astype(np.int32),
        scores=np.concatenate(([1.0], counts[chosen] * (match_prior(matched) / num_rows))).astype(np.float32),
        sources=np.array([Source.ROOT] + [Source.CORPUS] * len(chosen), dtype=np.uint8),
        matches=np.concatenate(([0], np.full(len(chosen), matched))).astype(np.int32),
    )
