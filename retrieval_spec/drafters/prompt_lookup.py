"""Prompt lookup (PLD) and reference copying (LLMA): draft by copying what followed earlier occurrences.

The searchable text is the reference documents, the prompt and the output so far, separated so that no
copied span runs from one into the next. An index from every n-gram (``min_ngram <= n <= max_ngram``) to
the positions that follow it is built once per request and extended by the accepted tokens of each step,
so a step costs a few dictionary lookups however long the text is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .base import DraftTree, Source, StepFeedback, trie_from_continuations

SEPARATOR = -1  # never a token id: ends a copied span at a document boundary


@dataclass(frozen=True)
class PromptLookupConfig:
    """Matching and drafting limits.

    Attributes:
        max_ngram: longest context suffix looked up.
        min_ngram: shortest context suffix looked up.
        max_matches: most occurrences whose continuations enter the trie (the most recent first).
        depth: longest continuation copied from one occurrence.
    """

    max_ngram: int = 4
    min_ngram: int = 1
    max_matches: int = 8
    depth: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError("PromptLookupConfig needs 1 <= min_ngram <= max_ngram")
        if self.max_matches < 1 or self.depth < 1:
            raise ValueError("PromptLookupConfig.max_matches and depth must be positive")


# Rough chance that copying is right, by match length (first token) and for every further token; the
# decoder recalibrates these online (calibration.py), so they only need the right order.
FIRST_TOKEN_PRIOR = {1: 0.15, 2: 0.35, 3: 0.5, 4: 0.6}
NEXT_TOKEN_PRIOR = 0.8


class PromptLookupDrafter:
    """Copies continuations of the context's suffix from the prompt, reference documents and output."""

    source = Source.PROMPT
    top_k = 0

    def __init__(self, config: PromptLookupConfig = PromptLookupConfig()) -> None:
        self.config = config
        self._text = np.zeros(0, dtype=np.int32)
        self._length = 0
        self._index: dict[tuple[int, ...], list[int]] = {}

    def start(self, prompt: np.ndarray, references: Sequence[np.ndarray] = ()) -> None:
        self._text = np.zeros(max(1024, 2 * (len(prompt) + sum(len(r) + 1 for r in references))), dtype=np.int32)
        self._length = 0
        self._index = {}
        for reference in references:
            self._append(np.asarray(reference, dtype=np.int32))
            self._append(np.array([SEPARATOR], dtype=np.int32))
        self._append(np.asarray(prompt, dtype=np.int32))

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        root = int(context[-1])
        if budget <= 0:
            return DraftTree.empty(root)
        cfg = self.config
        seen: set[int] = set()
        starts, lengths = [], []
        for n in range(min(cfg.max_ngram, len(context)), cfg.min_ngram - 1, -1):
            for start in reversed(self._index.get(tuple(context[-n:].tolist()), ())):
                if start < self._length and start not in seen:
                    seen.add(start)
                    starts.append(start)
                    lengths.append(n)
                    if len(starts) == cfg.max_matches:
                        break
            if len(starts) == cfg.max_matches:
                break
        if not starts:
            return DraftTree.empty(root)
        continuations = []
        for start in starts:
            span = self._text[start : min(start + cfg.depth, self._length)]
            cut = np.flatnonzero(span == SEPARATOR)
            continuations.append(span[: cut[0]] if len(cut) else span)
        longest = lengths[0]
        weights = np.array([2.0**n for n in lengths])
        depth_probs = np.full(cfg.depth, NEXT_TOKEN_PRIOR)
        depth_probs[0] = FIRST_TOKEN_PRIOR.get(longest, FIRST_TOKEN_PRIOR[max(FIRST_TOKEN_PRIOR)])
        keep = [i for i, c in enumerate(continuations) if len(c)]
        return trie_from_continuations(
            root, [continuations[i] for i in keep], weights[keep], depth_probs, self.source, budget
        )

    def observe(self, feedback: StepFeedback) -> None:
        self._append(feedback.new_tokens)

    def _append(self, tokens: np.ndarray) -> None:
        """Extend the searchable text and index every n-gram that now ends inside it."""
        old, new = self._length, self._length + len(tokens)
        if new > len(self._text):
            grown = np.zeros(2 * new, dtype=np.int32)
            grown[:old] = self._text[:old]
            self._text = grown
        self._text[old:new] = tokens
        self._length = new
        text = self._text
        for end in range(old + 1, new + 1):
            for n in range(self.config.min_ngram, self.config.max_ngram + 1):
                if end - n < 0:
                    break
                gram = text[end - n : end]
                if SEPARATOR in gram:
                    break
                self._index.setdefault(tuple(gram.tolist()), []).append(end)
