"""Cross-path drafting for multi-sample inference (arXiv 2503.05330): N samples of one prompt draft from
each other's text.

Samples of one prompt (self-consistency, best-of-N) say much the same things in different orders, so the
context's suffix in one path is often followed, in another path, by what this path is about to say.
:class:`SiblingPaths` holds one n-gram index per path, each extended by its own path's accepted tokens;
path ``i``'s :class:`CrossPathDrafter` looks its suffix up in every other path and copies what followed.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import DraftTree, Source, StepFeedback
from .ngram_index import NgramIndex
from .prompt_lookup import PromptLookupConfig, copied_spans_trie


class SiblingPaths:
    """The outputs of ``num_paths`` paths decoded together, each as an :class:`NgramIndex`."""

    def __init__(self, num_paths: int, config: PromptLookupConfig = PromptLookupConfig()) -> None:
        if num_paths < 1:
            raise ValueError("SiblingPaths needs at least one path")
        self.config = config
        self.paths = [NgramIndex(config.min_ngram, config.max_ngram) for _ in range(num_paths)]

    def drafters(self) -> list[CrossPathDrafter]:
        """One drafter per path, in path order."""
        return [CrossPathDrafter(self, i) for i in range(len(self.paths))]


class CrossPathDrafter:
    """Drafts path ``path`` from the other paths' outputs; its :meth:`observe` extends its own path."""

    source = Source.SIBLING
    top_k = 0

    def __init__(self, siblings: SiblingPaths, path: int) -> None:
        self.siblings = siblings
        self.path = path

    def start(self, prompt: np.ndarray, references: Sequence[np.ndarray] = ()) -> None:
        """Empty this path's text: every path starts with the request (the prompt itself is PLD's)."""
        cfg = self.siblings.config
        self.siblings.paths[self.path] = NgramIndex(cfg.min_ngram, cfg.max_ngram)

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        root = int(context[-1])
        cfg = self.siblings.config
        if budget <= 0:
            return DraftTree.empty(root)
        found = []  # (match length, path, start)
        for i, other in enumerate(self.siblings.paths):
            if i != self.path and other.length:
                starts, lengths = other.matches(context, cfg.max_matches)
                found.extend((n, i, start) for start, n in zip(starts, lengths))
        found.sort(key=lambda m: -m[0])  # stable: per length, paths in order, most recent first within a path
        found = found[: cfg.max_matches]
        continuations = [self.siblings.paths[i].span(start, cfg.depth) for _, i, start in found]
        return copied_spans_trie(root, continuations, [n for n, _, _ in found], cfg.depth, self.source, budget)

    def observe(self, feedback: StepFeedback) -> None:
        self.siblings.paths[self.path].append(feedback.new_tokens)
