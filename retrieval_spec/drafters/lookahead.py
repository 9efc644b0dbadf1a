"""Lookahead decoding (Fu et al., ICML 2024): a Jacobi window run in the verification forward fills an n-gram
pool; the pool drafts the n-grams that start with the newest token.

The window holds ``ngram - 1`` levels of ``window`` guessed tokens. Level ``l``, column ``i`` sits ``i + l + 1``
positions after the root and attends to level 0's columns ``0..i`` and to its own column's lower levels: a
consecutive guessed sequence. Each step the target's argmax at the top level becomes the new top level (the
window's Jacobi iteration), and every column yields an n-gram: its ``ngram - 1`` level tokens plus that argmax.
Positions stay relative to the root whatever was accepted, as in the paper. Each request has its own window;
the pool keeps the ``guesses`` newest n-grams per first token, is shared by every request, is bounded (least
recently refreshed first token evicted first), and can be saved next to a datastore.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DatastoreFormatError
from ..tree import Branch, DraftTree, Source, StepFeedback, trie_from_continuations
from .base import Drafter, RequestId
from .state import read_state, write_state

FORMAT_VERSION = 1
FILE = "lookahead_pool.npz"
FIRST_TOKEN_PRIOR = 0.3  # rough; recalibrated online like every source
NEXT_TOKEN_PRIOR = 0.6


@dataclass(frozen=True)
class LookaheadConfig:
    """Lookahead's W, N and G, and the pool's bound.

    Attributes:
        window: W, columns of the Jacobi window; 0 runs no window (the pool then drafts what it holds).
        ngram: N, tokens per pooled n-gram (the window has N - 1 levels).
        guesses: G, n-grams kept (and drafted) per first token.
        max_keys: first tokens kept in the pool.
    """

    window: int = 4
    ngram: int = 4
    guesses: int = 4
    max_keys: int = 200_000

    def __post_init__(self) -> None:
        if self.window < 0 or self.ngram < 2 or self.guesses < 1 or self.max_keys < 1:
            raise ValueError("LookaheadConfig needs window >= 0, ngram >= 2, guesses >= 1, max_keys >= 1")


class LookaheadDrafter(Drafter):
    """The Jacobi windows (run through :meth:`branch`, one per request) and the n-gram pool they fill."""

    source = Source.POOL
    state_file = FILE

    def __init__(self, config: LookaheadConfig = LookaheadConfig(), seed: int = 0) -> None:
        self.config = config
        self.pool: OrderedDict[int, list[tuple[int, ...]]] = OrderedDict()  # oldest refreshed first
        self.windows: dict[RequestId, np.ndarray] = {}  # per request: (ngram - 1, window) level tokens
        self._rng = np.random.default_rng(seed)
        levels, window = config.ngram - 1, config.window
        level, column = np.divmod(np.arange(levels * window), max(window, 1))
        self._offsets = (column + level + 1).astype(np.int32)
        lower_or_same_column = (column[None, :] == column[:, None]) & (level[None, :] <= level[:, None])
        level_zero_before = (level[None, :] == 0) & (column[None, :] <= column[:, None])
        self._visible = lower_or_same_column | level_zero_before

    def start(self, request: RequestId, prompt: np.ndarray, references: Sequence[np.ndarray] = ()) -> None:
        """Seed the request's window with tokens drawn from its prompt (the pool persists across requests)."""
        shape = (self.config.ngram - 1, self.config.window)
        self.windows[request] = self._rng.choice(np.asarray(prompt, dtype=np.int32), size=shape).astype(np.int32)

    def finish(self, request: RequestId) -> None:
        self.windows.pop(request, None)

    def branch(self, request: RequestId, context: np.ndarray) -> Branch | None:
        if self.config.window == 0:
            return None
        return Branch(tokens=self.windows[request].ravel().copy(), offsets=self._offsets, visible=self._visible)

    def propose(self, request: RequestId, context: np.ndarray, budget: int) -> DraftTree:
        root = int(context[-1])
        grams = self.pool.get(root)
        if budget <= 0 or not grams:
            return DraftTree.empty(root)
        continuations = [np.array(g, dtype=np.int32) for g in reversed(grams)]  # newest first
        depth_probs = np.full(self.config.ngram - 1, NEXT_TOKEN_PRIOR)
        depth_probs[0] = FIRST_TOKEN_PRIOR
        weights = np.linspace(2.0, 1.0, len(continuations))
        return trie_from_continuations(root, continuations, weights, depth_probs, self.source, budget)

    def observe(self, request: RequestId, feedback: StepFeedback) -> None:
        """Advance the request's window one Jacobi iteration and pool the n-grams of its columns.

        A step whose branch did not run (it did not pay, or did not fit the context) leaves the window as is.
        """
        levels = self.windows[request]
        produced = feedback.branch_tokens
        if self.config.window == 0 or len(produced) != levels.size:
            return
        top = produced.reshape(levels.shape)[-1]
        grams = np.vstack([levels, top[None]])  # (N, W): column i is one n-gram
        for column in grams.T.tolist():
            self.add(column[0], tuple(column[1:]))
        self.windows[request] = np.vstack([levels[1:], top[None]])

    def add(self, first: int, continuation: tuple[int, ...]) -> None:
        """Pool one n-gram: ``first`` then ``continuation`` (N - 1 tokens); the newest G per first token stay."""
        grams = self.pool.pop(first, [])
        if continuation in grams:
            grams.remove(continuation)
        grams.append(continuation)
        self.pool[first] = grams[-self.config.guesses :]
        if len(self.pool) > self.config.max_keys:
            self.pool.popitem(last=False)

    def save(self, directory: Path, tokenizer_sha256: str) -> None:
        """Write the pool atomically to ``directory/lookahead_pool.npz`` (e.g. a datastore's directory)."""
        width = self.config.ngram - 1
        keys = np.array(list(self.pool), dtype=np.int32)
        grams = np.full((len(keys), self.config.guesses, width), -1, dtype=np.int32)
        for row, key in enumerate(self.pool):
            for j, gram in enumerate(self.pool[key]):
                grams[row, j] = gram
        write_state(directory / FILE, {"keys": keys, "grams": grams}, FORMAT_VERSION, tokenizer_sha256,
                    ngram=self.config.ngram)

    def load(self, directory: Path, tokenizer_sha256: str, vocab_size: int) -> None:
        """Replace the pool by one saved with :meth:`save` for the same tokenizer and n-gram size.

        Raises:
            DatastoreFormatError: unreadable file, other format version or n-gram size.
            TokenizerMismatchError: saved for another tokenizer.
        """
        arrays, meta = read_state(directory / FILE, FORMAT_VERSION, tokenizer_sha256, vocab_size=vocab_size,
                                  shapes={"keys": ("keys",), "grams": ("keys", "guesses", self.config.ngram - 1)},
                                  limits={"keys": self.config.max_keys, "guesses": self.config.guesses})
        if meta.get("ngram") != self.config.ngram:
            raise DatastoreFormatError(
                f"{directory / FILE}: n-gram size {meta.get('ngram')}, expected {self.config.ngram}")
        self.pool = OrderedDict()
        for key, grams in zip(arrays["keys"].tolist(), arrays["grams"]):
            for gram in grams.tolist():
                if gram[0] >= 0:
                    self.add(key, tuple(gram))
