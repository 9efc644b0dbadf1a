"""What every drafter returns and the protocol it follows.

A drafter proposes continuations of the current context as a :class:`DraftTree`: a trie of token ids rooted
at the newest context token (the one whose keys are not cached yet). It never sees the model; after each
verification it is told what was accepted through :meth:`Drafter.observe`.

Lifecycle of one request, in call order::

    drafter.start(prompt, references)        # once, before the first step
    tree = drafter.propose(context, budget)  # every step; DraftTree.empty(root) when nothing matches
    drafter.observe(feedback)                # every step, after acceptance
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np


class Source(enum.IntEnum):
    """Which drafter proposed a node; stored per node in ``DraftTree.sources``."""

    ROOT = 0
    PROMPT = 1  # PLD / LLMA: prompt, reference documents, output so far
    CORPUS = 2  # REST: suffix array over a datastore
    POOL = 3  # Lookahead n-gram pool
    RECYCLE = 4  # the model's own earlier top-k predictions
    SIBLING = 5  # other samples of the same prompt
    HISTORY = 6  # outputs of earlier requests


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
    """

    tokens: np.ndarray
    parents: np.ndarray
    scores: np.ndarray
    sources: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if n == 0:
            raise ValueError("a DraftTree has at least its root")
        for name, dtype in (("tokens", np.int32), ("parents", np.int32), ("scores", np.float32), ("sources", np.uint8)):
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

    def __len__(self) -> int:
        return len(self.tokens)

    def head(self, n: int) -> DraftTree:
        """The first ``n`` nodes (all when fewer): a tree, since parents always come before their children."""
        return DraftTree(
            tokens=self.tokens[:n], parents=self.parents[:n], scores=self.scores[:n], sources=self.sources[:n]
        )

    @staticmethod
    def empty(root: int) -> DraftTree:
        """The tree with the root alone: nothing to propose."""
        return DraftTree(
            tokens=np.array([root], dtype=np.int32),
            parents=np.array([-1], dtype=np.int32),
            scores=np.array([1.0], dtype=np.float32),
            sources=np.array([Source.ROOT], dtype=np.uint8),
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
        return DraftTree(
            tokens=np.array(tokens, dtype=np.int32),
            parents=parents_array,
            scores=scores_array,
            sources=np.array([Source.ROOT] + [source] * (len(tokens) - 1), dtype=np.uint8),
        )


def trie_from_continuations(
    root: int,
    continuations: Sequence[np.ndarray],
    weights: np.ndarray,
    depth_probs: np.ndarray,
    source: Source,
    max_nodes: int,
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
    """
    if not continuations or max_nodes <= 0:
        return DraftTree.empty(root)
    total = float(np.sum(weights))
    reach = np.cumprod(depth_probs)
    tokens, parents, mass = [root], [-1], [total]
    children: dict[tuple[int, int], int] = {}
    for i in np.argsort(-np.asarray(weights), kind="stable"):
        node = 0
        for token in continuations[i][: len(depth_probs)].tolist():
            child = children.get((node, token))
            if child is None:
                if len(tokens) > max_nodes:
                    break
                child = children[(node, token)] = len(tokens)
                tokens.append(token)
                parents.append(node)
                mass.append(0.0)
            mass[child] += float(weights[i])
            node = child
    parents_array = np.array(parents, dtype=np.int32)
    scores = np.array(mass, dtype=np.float64) / total
    scores[1:] *= reach[depths_of(parents_array)[1:] - 1]
    return DraftTree(
        tokens=np.array(tokens, dtype=np.int32),
        parents=parents_array,
        scores=np.minimum(scores, 1.0).astype(np.float32),
        sources=np.array([Source.ROOT] + [source] * (len(tokens) - 1), dtype=np.uint8),
    )


def depths_of(parents: np.ndarray) -> np.ndarray:
    """(n,) int32 depth of every node of a topological parent array (root = 0)."""
    out = np.zeros(len(parents), dtype=np.int32)
    for i in range(1, len(parents)):
        out[i] = out[parents[i]] + 1
    return out


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
        new_tokens: (m,) int32 tokens appended to the context this step: the accepted drafted tokens followed
            by the bonus token sampled at the last accepted node. Already cut at EOS / max_new_tokens.
        top_tokens: (n, k) int32, the target's k most likely next tokens at every tree node, most likely first
            (k is the largest ``Drafter.top_k`` of the decoder's drafters, possibly 0).
        branch_tokens: (m,) int32, the target's argmax at every node of the step's :class:`Branch` (empty when
            no drafter ran one).
    """

    tree: DraftTree
    accepted_nodes: np.ndarray
    new_tokens: np.ndarray
    top_tokens: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int32))
    branch_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))


class Drafter(Protocol):
    """A source of draft continuations. Pure numpy: a drafter never imports torch.

    ``top_k`` says how many of the target's most likely tokens per verified node the drafter wants in
    ``StepFeedback.top_tokens`` (0: none; the decoder computes the largest ``top_k`` asked for).

    A drafter may also define ``branch(context) -> Branch | None``: extra nodes to run in the same forward
    (at most one drafter per decoder does; the Lookahead drafter).
    """

    source: Source
    top_k: int

    def start(self, prompt: np.ndarray, references: Sequence[np.ndarray] = ()) -> None:
        """Begin a request: ``prompt`` (int32 token ids) and optional reference documents to copy from."""

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        """Return at most ``budget`` nodes beyond the root continuing ``context`` (prompt + output so far)."""

    def observe(self, feedback: StepFeedback) -> None:
        """Learn from one verified step; ``feedback.new_tokens`` extend the context."""
