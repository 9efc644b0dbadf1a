"""Token trees: the draft every source produces, and the algebra that merges, ranks and lays it out.

Numpy, like every module of the core (``tree``, ``sizing``, ``acceptance``, ``calibration``, ``fusion``,
``drafters``, ``datastore``), with the per-node loops (tries, merges, the vocabulary check, the ancestor mask, the
best-first cut) compiled (``compiled.py``): nothing here knows the model or imports torch. The verifier turns these
arrays into tensors.

Layout contract (ANCHORS.md, detail 1): node 0 is the root, the newest token whose keys are not cached;
a node at depth ``d`` sits at position ``cached_len + d`` and attends to the whole cached prefix, its
ancestors and itself only.
"""

from __future__ import annotations

import enum
import functools
import itertools
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .compiled import array, boolean, f32, f64, i32, i64, kernel, returns, u8, view


class Source(enum.IntEnum):
    """Which drafter proposed a node; stored per node in ``DraftTree.sources``."""

    ROOT = 0
    PROMPT = 1  # PLD / LLMA: prompt, reference documents, output so far
    CORPUS = 2  # REST: suffix array over a datastore
    POOL = 3  # Lookahead n-gram pool
    RECYCLE = 4  # the model's own earlier top-k predictions
    SIBLING = 5  # other samples of the same prompt
    HISTORY = 6  # outputs of earlier requests
    NEXT_NEXT = 7  # the target's other top tokens where it chose the newest token (recycling's LogitSpec candidates)


NUM_SOURCES = len(Source)  # the values run 0 .. NUM_SOURCES - 1: a source indexes per-source arrays


@dataclass(frozen=True)
class DraftTree:
    """A token trie in topological order, as parallel arrays.

    Node 0 is the root: the newest context token, already known, not a guess. Every other node is a guessed
    token that follows its parent. Siblings never repeat a token (lossless sampling depends on it).

    Attributes:
        tokens: (n,) int32 token ids.
        parents: (n,) int32; ``parents[0] == -1`` and ``0 <= parents[i] < i`` for ``i > 0``.
        scores: (n,) float32 in [0, 1]: estimated probability that the target accepts the whole path from
            the root to the node; ``scores[0] == 1`` and a child never scores above its parent.
        sources: (n,) uint8 :class:`Source` of each node (``Source.ROOT`` for node 0).
        matches: (n,) int32 how many context tokens the copy a node continues matched (the longest among the
            copies through it; 0 for the root and for nodes that are no copy). Defaults to zeros.

    >>> t = DraftTree.from_paths(7, [np.array([1, 2]), np.array([3])], [np.array([.5, .4]), np.array([.3])],
    ...                          Source.PROMPT)
    >>> t.tokens.tolist(), t.parents.tolist(), depths(t.parents).tolist()
    ([7, 1, 2, 3], [-1, 0, 1, 0], [0, 1, 2, 1])
    """

    tokens: np.ndarray
    parents: np.ndarray
    scores: np.ndarray
    sources: np.ndarray
    matches: np.ndarray = None  # type: ignore[assignment]  (zeros when not given)

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if n == 0:
            raise ValueError("a DraftTree has at least its root")
        if self.matches is None:
            object.__setattr__(self, "matches", np.zeros(n, dtype=np.int32))
        for name, dtype in (("tokens", np.int32), ("parents", np.int32), ("scores", np.float32), ("sources", np.uint8),
                            ("matches", np.int32)):
            array = getattr(self, name)
            if array.shape != (n,) or array.dtype != dtype:
                raise ValueError(f"DraftTree.{name} must be ({n},) {np.dtype(dtype)}, got {array.shape} {array.dtype}")
        if self.parents[0] != -1 or self.scores[0] != 1.0:
            raise ValueError("node 0 must be the root: parents[0] == -1 and scores[0] == 1")
        if n > 1:
            parents = self.parents[1:]
            if np.any(parents < 0) or np.any(parents >= np.arange(1, n)):
                raise ValueError("DraftTree.parents must satisfy 0 <= parents[i] < i")
            if np.any(self.scores[1:] > self.scores[parents] + 1e-6) or np.any(self.scores < 0):
                raise ValueError("DraftTree.scores must lie in [0, 1] and never rise from parent to child")
            edges = parents.astype(np.int64) * (1 << 32) + self.tokens[1:].astype(np.int64)
            if len(np.unique(edges)) != n - 1:
                raise ValueError("DraftTree siblings must carry distinct tokens")

    @classmethod
    def trusted(cls, tokens: np.ndarray, parents: np.ndarray, scores: np.ndarray, sources: np.ndarray,
                matches: np.ndarray | None = None, depths: np.ndarray | None = None) -> DraftTree:
        """A tree from arrays that already satisfy every invariant, unchecked: for this module's own transforms of
        valid trees (a head, a selection, a merge, a rescoring), which keep them by construction. Drafters build
        theirs with the checked constructor. ``depths``: (n,) int32 when the caller knows them already."""
        tree = object.__new__(cls)
        tree.__dict__.update(tokens=tokens, parents=parents, scores=scores, sources=sources,
                             matches=np.zeros(len(tokens), np.int32) if matches is None else matches)
        if depths is not None:
            tree.__dict__["depths"] = depths  # the cached property's slot
        return tree

    def __len__(self) -> int:
        return len(self.tokens)

    @functools.cached_property
    def depths(self) -> np.ndarray:
        """(n,) int32 depth of every node (root = 0), computed once per tree."""
        return depths(self.parents)

    def head(self, n: int) -> DraftTree:
        """The first ``n`` nodes (all when fewer): a tree, since parents always come before their children."""
        if n >= len(self):
            return self
        return DraftTree.trusted(self.tokens[:n], self.parents[:n], self.scores[:n], self.sources[:n],
                                 self.matches[:n], self._known_depths(slice(n)))

    def _known_depths(self, nodes: slice | np.ndarray) -> np.ndarray | None:
        """The cached depths of ``nodes``, or None when they were never computed (a derived tree computes its own
        when asked)."""
        return self.__dict__["depths"][nodes] if "depths" in self.__dict__ else None

    def select(self, keep: np.ndarray) -> DraftTree:
        """The sub-tree of nodes ``keep`` ((k,) indices, root first, closed under ancestors, every parent before
        its children), re-indexed in that order."""
        new_index = np.full(len(self), -1, dtype=np.int32)
        new_index[keep] = np.arange(len(keep), dtype=np.int32)
        parents = self.parents[keep].copy()
        parents[1:] = new_index[parents[1:]]
        return DraftTree.trusted(self.tokens[keep], parents, self.scores[keep], self.sources[keep],
                                 self.matches[keep], self._known_depths(keep))

    @staticmethod
    @functools.lru_cache(maxsize=1 << 12)
    def empty(root: int) -> DraftTree:
        """The tree with the root alone: nothing to propose (one per root token, its arrays read-only)."""
        return DraftTree.trusted(_read_only(np.array([root], dtype=np.int32)), *_ROOT_ALONE, _ROOT_ALONE[3])

    @staticmethod
    def chain(tokens: np.ndarray, source: Source = Source.ROOT) -> DraftTree:
        """A single path: ``tokens[0]`` is the root, each next token the child of the previous one."""
        n = len(tokens)
        return DraftTree(
            tokens=np.asarray(tokens, dtype=np.int32),
            parents=np.arange(-1, n - 1, dtype=np.int32),
            scores=np.ones(n, dtype=np.float32),
            sources=np.array([Source.ROOT] + [source] * (n - 1), dtype=np.uint8),
        )

    @staticmethod
    def from_paths(root: int, paths: Sequence[np.ndarray], probs: Sequence[np.ndarray], source: Source) -> DraftTree:
        """Merge token paths that continue ``root`` into one trie.

        Args:
            root: the newest context token.
            paths: token sequences, each continuing ``root``.
            probs: per path, (len(path),) estimated probability of reaching each of its tokens (non-increasing).
                Where paths share a prefix node, the node keeps the highest estimate offered for it.

        A child's score is capped by its parent's so the result always validates.
        """
        tokens, parents, scores = [root], [-1], [1.0]
        children: dict[tuple[int, int], int] = {}
        for path, prob in zip(paths, probs):
            node = 0
            for token, p in zip(path.tolist(), prob.tolist()):
                key = (node, token)
                child = children.get(key)
                p = min(float(p), scores[node])
                if child is None:
                    child = len(tokens)
                    children[key] = child
                    tokens.append(token)
                    parents.append(node)
                    scores.append(p)
                elif p > scores[child]:
                    scores[child] = p
                node = child
        # Raising a node's score may leave a descendant above it; the cap keeps the invariant.
        scores_array = np.array(scores, dtype=np.float32)
        parents_array = np.array(parents, dtype=np.int32)
        for i in range(1, len(scores_array)):
            scores_array[i] = min(scores_array[i], scores_array[parents_array[i]])
        return DraftTree.trusted(np.array(tokens, dtype=np.int32), parents_array, scores_array,
                                 np.array([Source.ROOT] + [source] * (len(tokens) - 1), dtype=np.uint8))


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


# a step's feedback without top tokens or a branch (shared, read-only)
_NO_TOP_NODES = _read_only(np.zeros(0, dtype=np.int64))
_NO_TOP_TOKENS = _read_only(np.zeros((0, 0), dtype=np.int32))
_NO_BRANCH_TOKENS = _read_only(np.zeros(0, dtype=np.int32))

# parents, scores, sources and matches (and depths) of a tree that is its root alone
_ROOT_ALONE = (_read_only(np.array([-1], dtype=np.int32)), _read_only(np.array([1.0], dtype=np.float32)),
               _read_only(np.array([Source.ROOT], dtype=np.uint8)), _read_only(np.zeros(1, dtype=np.int32)))


def trie_from_continuations(
    root: int,
    continuations: Sequence[np.ndarray],
    weights: np.ndarray,
    depth_probs: np.ndarray,
    source: Source,
    max_nodes: int,
    matches: Sequence[int] | None = None,
) -> DraftTree:
    """Count weighted continuations into a trie and score each node as a probability of acceptance.

    A node's score is the share of the total weight whose continuation passes through it, times
    ``depth_probs[0] * ... * depth_probs[d - 1]`` for a node at depth ``d`` (how often copying goes on that
    far). Continuations are inserted heaviest first and no new node is created past ``max_nodes``.

    Args:
        root: the newest context token.
        continuations: token arrays, each continuing ``root``.
        weights: (len(continuations),) positive weights (match counts, match lengths...).
        depth_probs: (max_depth,) conditional probabilities in (0, 1]; continuations are cut to this length.
        source: the proposing drafter.
        max_nodes: node budget beyond the root.
        matches: (len(continuations),) the matched context length behind each continuation (``DraftTree.matches``).
    """
    if not continuations or max_nodes <= 0:
        return DraftTree.empty(root)
    tokens, parents, scores, sources, longest, depth = trie_arrays(
        root, np.concatenate(continuations).astype(np.int32, copy=False),
        np.array([len(c) for c in continuations], dtype=np.int64), np.asarray(weights, dtype=np.float64),
        np.asarray(depth_probs, dtype=np.float64),
        np.zeros(len(continuations), np.int32) if matches is None else np.asarray(matches, dtype=np.int32), max_nodes,
        int(source))
    return DraftTree.trusted(tokens, parents, scores, sources, longest, depth)


@kernel(returns(array(i32), array(i32), array(f32), array(u8), array(i32), array(i32)), i64, view(i32), view(i64),
        view(f64), view(f64), view(i32), i64, u8)
def trie_arrays(root, flat, lengths, weights, depth_probs, matches, max_nodes, source):
    """:func:`trie_from_continuations` of the continuations laid end to end (continuation ``i`` is the next
    ``lengths[i]`` tokens of ``flat``; each is cut to ``len(depth_probs)``), for kernels that build a trie. Returns
    the trie's tokens, parents, scores, sources, matches and depths (the root alone when ``max_nodes <= 0``). A
    node's children are a linked list (few per node)."""
    max_nodes = max(0, min(max_nodes, len(flat)))  # no more nodes than tokens given
    tokens = np.empty(max_nodes + 1, dtype=np.int32)
    parents = np.empty(max_nodes + 1, dtype=np.int32)
    mass = np.zeros(max_nodes + 1, dtype=np.float64)
    longest = np.zeros(max_nodes + 1, dtype=np.int32)
    depth = np.zeros(max_nodes + 1, dtype=np.int32)
    first_child = np.full(max_nodes + 1, -1, dtype=np.int32)
    next_sibling = np.full(max_nodes + 1, -1, dtype=np.int32)
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    for i in range(len(lengths)):
        starts[i + 1] = starts[i] + lengths[i]
    total = 0.0
    for i in range(len(weights)):
        total += weights[i]
    tokens[0], parents[0], mass[0] = root, -1, total
    count = 1
    for i in np.argsort(-weights, kind="mergesort"):  # stable: heaviest first, then in order
        node, weight, match = 0, weights[i], matches[i]
        end = min(starts[i + 1], starts[i] + len(depth_probs))
        for at in range(starts[i], end):
            token = flat[at]
            child = first_child[node]
            while child >= 0 and tokens[child] != token:
                child = next_sibling[child]
            if child < 0:  # the path leaves the trie here: the rest of it is new nodes, while the budget lasts
                for rest in range(at, end):
                    if count > max_nodes:
                        break
                    tokens[count], parents[count], mass[count] = flat[rest], node, weight
                    longest[count], depth[count] = match, depth[node] + 1
                    next_sibling[count], first_child[node] = first_child[node], count
                    node = count
                    count += 1
                break
            mass[child] += weight
            if match > longest[child]:
                longest[child] = match
            node = child
    reach = np.cumprod(depth_probs)  # reach[d - 1]: how often copying goes on to depth d
    scores = np.empty(count, dtype=np.float32)
    sources = np.full(count, source, dtype=np.uint8)
    scores[0], sources[0] = 1.0, 0  # the root: Source.ROOT
    for node in range(1, count):
        scores[node] = min(mass[node] / total * reach[depth[node] - 1], 1.0)
    return tokens[:count], parents[:count], scores, sources, longest[:count], depth[:count]


def depths(parents: np.ndarray) -> np.ndarray:
    """Depth of every node (root = 0).

    Args:
        parents: (n,) int32, topological (``parents[i] < i``).

    Returns:
        (n,) int32.

    >>> depths(np.array([-1, 0, 1], dtype=np.int32)).tolist()
    [0, 1, 2]
    """
    parent_of = parents.tolist()
    out = [0] * len(parent_of)
    for i in range(1, len(out)):  # parents come first
        out[i] = out[parent_of[i]] + 1
    return np.array(out, dtype=np.int32)


def ancestor_mask(parents: np.ndarray) -> np.ndarray:
    """Which nodes each node may attend to: itself and its ancestors.

    Args:
        parents: (n,) int32, topological.

    Returns:
        (n, n) bool; ``mask[i, j]`` is True iff ``j`` is ``i`` or an ancestor of ``i``.

    >>> ancestor_mask(np.array([-1, 0, 0], dtype=np.int32)).astype(int).tolist()
    [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    """
    return _ancestors(np.asarray(parents, dtype=np.int32))


@kernel(array(boolean, 2), view(i32))
def _ancestors(parents):
    """:func:`ancestor_mask`: each row its parent's (complete: parents come first) plus the node itself."""
    n = len(parents)
    mask = np.zeros((n, n), dtype=np.bool_)
    for node in range(n):
        parent = parents[node]
        if parent >= 0:
            mask[node, : parent + 1] = mask[parent, : parent + 1]
        mask[node, node] = True
    return mask


def merge(trees: Sequence[DraftTree]) -> DraftTree:
    """Union of tries that share a root token.

    A node's score is a path probability: its parent's times the drafter's conditional estimate of the node
    (``score / parent's score`` in its own trie). A node proposed twice keeps the higher conditional estimate,
    that drafter's source, and the longest match; the scores are then the products of the kept estimates along
    each path, so a node's estimate never changes with the drafter that won its parent (up to the float32 rounding
    of the scores).

    Raises:
        ValueError: the trees have different roots.
    """
    trees = [t for t in trees if len(t) > 1] or list(trees[:1])
    if len(trees) == 1:
        return trees[0]
    root = int(trees[0].tokens[0])
    if any(int(t.tokens[0]) != root for t in trees):
        raise ValueError("merged trees must share their root token")
    starts = np.array([0, *itertools.accumulate(len(t) for t in trees)], dtype=np.int64)
    tokens, parents, scores, sources, matches, depth = _merge(
        np.concatenate([t.tokens for t in trees]), np.concatenate([t.parents for t in trees]),
        np.concatenate([t.scores for t in trees]), np.concatenate([t.sources for t in trees]),
        np.concatenate([t.matches for t in trees]), starts)
    return DraftTree.trusted(tokens, parents, scores, sources, matches, depth)


@kernel(i64, i64, i64)
def hash_slot(key: int, slots: int) -> int:
    """The slot of ``key`` (any int64) in a table of ``slots`` slots, a power of two: Fibonacci hashing (the top bits
    of ``key`` times 2**64 over the golden ratio)."""
    shift = 64  # 64 - log2(slots)
    while slots > 1:
        slots >>= 1
        shift -= 1
    return np.int64((np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(shift)) if shift < 64 else 0


@kernel(returns(array(i64), array(i32)), i64)
def node_table(entries):
    """An empty open-addressing table of (parent, token) keys for up to ``entries`` nodes: ``keys`` (-1: an empty
    slot) and each key's node in ``values``, over a power of two of at least twice ``entries`` slots."""
    capacity = 2
    while capacity < 2 * entries:
        capacity *= 2
    return np.full(capacity, -1, dtype=np.int64), np.empty(capacity, dtype=np.int32)


@kernel(i64, i64, i64)
def node_key(parent, token):
    """The key of ``token`` under ``parent`` in a :func:`node_table` (distinct per pair for a parent in [0, 2**31)
    and any token, even a hostile one)."""
    return (np.int64(parent) << 32) | (np.int64(token) & 0xFFFFFFFF)


@kernel(i64, view(i64), i64)
def node_slot(keys, key):
    """The slot of :func:`node_table`'s ``keys`` that holds ``key``, or the empty one where it goes (linear
    probing)."""
    slot = hash_slot(key, len(keys))
    while keys[slot] != -1 and keys[slot] != key:
        slot = (slot + 1) & (len(keys) - 1)
    return slot


@kernel(returns(array(i32), array(i32), array(f32), array(u8), array(i32), array(i32)), view(i32), view(i32),
        view(f32), view(u8), view(i32), view(i64))
def _merge(tokens, parents, scores, sources, matches, starts):
    """:func:`merge` of the tries laid end to end (tree ``t`` is ``[starts[t], starts[t + 1])``, parents local to
    it). The first is taken whole (a trie already); each node of the others maps to the merged node of its
    parent's image and its token, found in an open-addressing table of (parent, token) keys."""
    total = len(tokens)
    keys, values = node_table(total)
    out_tokens = np.empty(total, dtype=np.int32)
    out_parents = np.empty(total, dtype=np.int32)
    estimates = np.empty(total, dtype=np.float64)  # each node's conditional estimate: score over parent's, <= 1
    out_sources = np.empty(total, dtype=np.uint8)
    out_matches = np.empty(total, dtype=np.int32)
    depth = np.empty(total, dtype=np.int32)
    mapped = np.empty(total, dtype=np.int32)  # per input node, its merged node
    count = 0
    for t in range(len(starts) - 1):
        first = starts[t]
        mapped[first] = 0
        for i in range(first, starts[t + 1]):
            if i == first:
                if t == 0:
                    out_tokens[0], out_parents[0], estimates[0] = tokens[i], -1, 1.0
                    out_sources[0], out_matches[0], depth[0] = sources[i], 0, 0
                    count = 1
                continue
            above = np.float64(scores[first + parents[i]])
            estimate = min(np.float64(scores[i]) / above, 1.0) if above > 0 else 0.0
            parent = mapped[first + parents[i]]
            key = node_key(parent, tokens[i])
            slot = node_slot(keys, key)
            if keys[slot] == -1:  # a new node
                keys[slot], values[slot] = key, count
                out_tokens[count], out_parents[count], estimates[count] = tokens[i], parent, estimate
                out_sources[count], out_matches[count], depth[count] = sources[i], matches[i], depth[parent] + 1
                mapped[i] = count
                count += 1
            else:  # proposed again: the longest match, the higher estimate and its source
                node = values[slot]
                out_matches[node] = max(out_matches[node], matches[i])
                if t > 0 and estimate > estimates[node]:
                    estimates[node], out_sources[node] = estimate, sources[i]
                mapped[i] = node
    out_scores = np.empty(count, dtype=np.float32)
    product = estimates[:count].copy()  # parents come first: each path product is complete before its children's
    out_scores[0] = 1.0
    for node in range(1, count):
        product[node] *= product[out_parents[node]]
        out_scores[node] = product[node]
    return (out_tokens[:count], out_parents[:count], out_scores, out_sources[:count], out_matches[:count],
            depth[:count])


def within_vocabulary(tree: DraftTree, vocab_size: int) -> DraftTree:
    """``tree`` without the nodes whose token is not in ``[0, vocab_size)``, and without their descendants.

    Drafts come from files (datastores, saved state) that a damaged or hostile file can fill with anything;
    a token the model does not have must never reach it. One compiled pass.

    >>> t = DraftTree.from_paths(1, [np.array([5, 2]), np.array([9, 3])], [np.ones(2), np.ones(2)], Source.CORPUS)
    >>> within_vocabulary(t, 8).tokens.tolist()
    [1, 5, 2]
    """
    if len(tree) == 1:
        return tree
    keep = _within(tree.tokens, tree.parents, vocab_size)
    return tree if len(keep) == len(tree) else tree.select(keep)


@kernel(array(i64), view(i32), view(i32), i64)
def _within(tokens, parents, vocab_size):
    """(k,) the nodes of :func:`within_vocabulary`'s result, in order."""
    bad = np.zeros(len(tokens), dtype=np.bool_)
    keep = np.empty(len(tokens), dtype=np.int64)
    size = 0
    for node in range(len(tokens)):
        bad[node] = node > 0 and (tokens[node] < 0 or tokens[node] >= vocab_size or bad[parents[node]])
        if not bad[node]:
            keep[size] = node
            size += 1
    return keep[:size]


def best_first(forest: Forest, max_nodes: np.ndarray, max_depth: np.ndarray
               ) -> tuple[list[DraftTree], np.ndarray, Forest]:
    """Per tree of ``forest``, keep the root and its ``max_nodes`` highest-scoring other nodes, closed under
    ancestors.

    Scores never rise from parent to child, so ordering a tree's nodes by score (ties: shallower, then lower index)
    puts every node after its ancestors: a head of that order is ancestor-closed, topological, and sorts the
    non-root nodes by non-increasing score. Each kept tree is re-indexed in that order. One compiled pass.

    Args:
        forest: the candidate trees.
        max_nodes: (rows,) how many non-root nodes to keep at most in each tree (>= 0).
        max_depth: (rows,) drop nodes deeper than this in each tree (>= 0).

    Returns:
        the kept trees; (k,) int64 the kept nodes' indices in ``forest`` (tree by tree, each in its kept order);
        and the kept trees as a forest (``Forest.of(trees)``, without building it again).
    """
    keep, parents, ends = _best_first(forest.scores, forest.depths, forest.parents, forest.starts,
                                      np.asarray(max_nodes, dtype=np.int64), np.asarray(max_depth, dtype=np.int64))
    tokens, scores = forest.tokens[keep], forest.scores[keep]
    sources, matches = forest.sources[keep], forest.matches[keep]
    depths = forest.depths[keep]
    forest_parents = parents.copy()
    rows, starts = _number_forest(forest_parents, ends)
    kept = Forest(tokens=tokens, parents=forest_parents, scores=scores, sources=sources, matches=matches,
                  depths=depths, rows=rows, starts=starts)
    ends = ends.tolist()
    trees = [DraftTree.trusted(tokens[a:b], parents[a:b], scores[a:b], sources[a:b], matches[a:b], depths[a:b])
             for a, b in zip([0, *ends[:-1]], ends)]
    return trees, keep, kept


@kernel(returns(array(i64), array(i32), array(i64)), view(f32), view(i32), view(i32), view(i64), view(i64), view(i64))
def _best_first(scores, depths, parents, starts, max_nodes, max_depth):
    """:func:`best_first` over a forest's arrays (tree ``t`` starts at ``starts[t]``; the trees lie end to end):
    the kept nodes (forest indices, tree by tree in kept order), their parents in the kept trees' numbering, and
    where each kept tree ends in the first array."""
    n = len(scores)
    keep = np.empty(n, dtype=np.int64)
    new_parents = np.empty(n, dtype=np.int32)
    new_index = np.full(n, -1, dtype=np.int32)
    ends = np.empty(len(starts), dtype=np.int64)
    size = 0
    for tree in range(len(starts)):
        first = starts[tree]
        last = starts[tree + 1] if tree + 1 < len(starts) else n
        size_of_tree = last - first
        deepest = 0
        for j in range(first, last):
            deepest = max(deepest, depths[j])
        at_depth = np.zeros(deepest + 2, dtype=np.int64)  # a counting sort by depth, stable: ties in index order
        for j in range(first, last):
            at_depth[depths[j] + 1] += 1
        for d in range(1, deepest + 2):
            at_depth[d] += at_depth[d - 1]
        by_depth = np.empty(size_of_tree, dtype=np.int64)
        for j in range(size_of_tree):
            by_depth[at_depth[depths[first + j]]] = j
            at_depth[depths[first + j]] += 1
        # By score, then depth, then index: a score in [0, 1] is a non-negative float32, whose bits order as
        # integers do, so one integer sort of (inverted score bits, place in depth order) ranks them.
        keys = np.empty(size_of_tree, dtype=np.int64)
        for j in range(size_of_tree):
            bits = max(np.int64(np.float32(scores[first + by_depth[j]]).view(np.int32)), 0)  # -0.0 as 0
            keys[j] = ((np.int64(0x7F800000) - bits) << 32) | j
        keys.sort()
        order = by_depth[keys & 0xFFFFFFFF]
        rank = 0
        for j in range(size_of_tree):
            node = first + order[j]
            if depths[node] > max_depth[tree]:
                continue
            if rank > max_nodes[tree]:
                break
            new_index[node] = rank
            keep[size] = node
            new_parents[size] = new_index[parents[node]] if parents[node] >= 0 else -1
            rank += 1
            size += 1
        ends[tree] = size
    return keep[:size], new_parents[:size], ends


@dataclass(frozen=True)
class Forest:
    """Several rows' trees laid end to end, so that per-node work on a batch is one array operation.

    Attributes:
        tokens, scores, sources, matches, depths: (N,) the trees' arrays, concatenated.
        parents: (N,) int32 parent of each node in the forest's numbering; -1 for every root. Each tree's nodes are
            contiguous and topological, so a parent always comes before its children.
        rows: (N,) int64 which tree each node belongs to.
        starts: (trees,) int64 where each tree's root sits.
    """

    tokens: np.ndarray
    parents: np.ndarray
    scores: np.ndarray
    sources: np.ndarray
    matches: np.ndarray
    depths: np.ndarray
    rows: np.ndarray
    starts: np.ndarray

    @staticmethod
    def of(trees: Sequence[DraftTree]) -> Forest:
        """The forest of ``trees`` (at least one), in their order."""
        if len(trees) == 1:
            tree = trees[0]
            return Forest(tokens=tree.tokens, parents=tree.parents, scores=tree.scores, sources=tree.sources,
                          matches=tree.matches, depths=tree.depths, rows=np.zeros(len(tree), dtype=np.int64),
                          starts=np.zeros(1, dtype=np.int64))
        tokens, parents, scores, sources, matches, depths = map(np.concatenate, zip(
            *[(t.tokens, t.parents, t.scores, t.sources, t.matches, t.depths) for t in trees]))
        ends = np.array(list(itertools.accumulate(len(t.tokens) for t in trees)), dtype=np.int64)
        rows, starts = _number_forest(parents, ends)
        return Forest(tokens=tokens, parents=parents, scores=scores, sources=sources, matches=matches, depths=depths,
                      rows=rows, starts=starts)


@kernel(returns(array(i64), array(i64)), array(i32), view(i64))
def _number_forest(parents, ends):
    """:meth:`Forest.of`'s numbering of trees laid end to end (tree ``t`` ends before ``ends[t]``): shift each
    tree's ``parents`` (in place) by where it starts, roots left at -1; return every node's tree and the starts."""
    rows = np.empty(len(parents), dtype=np.int64)
    starts = np.empty(len(ends), dtype=np.int64)
    start = 0
    for tree in range(len(ends)):
        starts[tree] = start
        for node in range(start, ends[tree]):
            rows[node] = tree
            if parents[node] >= 0:
                parents[node] += start
        start = ends[tree]
    return rows, starts


@dataclass(frozen=True)
class Branch:
    """Extra nodes run in the verification forward beside the tree and never accepted: a drafter's own
    look-ahead computation (Lookahead decoding's Jacobi window). The target's argmax at each comes back in
    ``StepFeedback.branch_tokens``.

    Every branch node attends to the whole context, the tree's root included, to the branch nodes
    ``visible`` allows, and to no drafted tree node, so the branch never changes the tree's logits.

    Attributes:
        tokens: (m,) int32.
        offsets: (m,) int32 >= 1, position of each node after the root's.
        visible: (m, m) bool, ``visible[i, j]``: node i attends to node j; the diagonal is True.
    """

    tokens: np.ndarray
    offsets: np.ndarray
    visible: np.ndarray

    def __post_init__(self) -> None:
        m = len(self.tokens)
        if self.offsets.shape != (m,) or self.visible.shape != (m, m):
            raise ValueError("Branch needs offsets of shape (m,) and visible of shape (m, m)")
        if m and (self.offsets.min() < 1 or not self.visible.diagonal().all()):
            raise ValueError("Branch offsets must be >= 1 and every node must see itself")

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class StepFeedback:
    """What one verification step tells the drafters.

    Attributes:
        tree: the tree that was verified.
        accepted_nodes: (m,) int32 node indices of the accepted path, starting with the root (0).
        new_tokens: (m',) int32 tokens appended to the context this step: the accepted drafted tokens followed
            by the bonus token chosen at the last accepted node, cut at EOS, a stop string or the token limit
            (so ``m' <= m``).
        top_nodes: (j,) int64 increasing tree nodes whose top tokens the verifier knows (every node for a model;
            the recorded path's for a replay).
        top_tokens: (j, k) int32, the target's k most likely next tokens at each of ``top_nodes``, most likely
            first (k is the largest ``Drafter.top_k`` asked for, possibly 0).
        branch_tokens: (b,) int32, the target's argmax at every node of the step's :class:`Branch` (empty when
            no branch ran).
    """

    tree: DraftTree
    accepted_nodes: np.ndarray
    new_tokens: np.ndarray
    top_nodes: np.ndarray = field(default_factory=lambda: _NO_TOP_NODES)
    top_tokens: np.ndarray = field(default_factory=lambda: _NO_TOP_TOKENS)
    branch_tokens: np.ndarray = field(default_factory=lambda: _NO_BRANCH_TOKENS)

    def __post_init__(self) -> None:
        if self.top_tokens.ndim != 2 or len(self.top_tokens) != len(self.top_nodes):
            raise ValueError("StepFeedback.top_tokens must be (len(top_nodes), k)")
