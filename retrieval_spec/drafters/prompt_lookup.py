"""Prompt lookup (PLD) and reference copying (LLMA): draft by copying what followed earlier occurrences.

The searchable text is the reference documents, the prompt and the output so far, separated so that no
copied span runs from one into the next, in an :class:`~retrieval_spec.drafters.ngram_index.NgramIndex`
built once per request and extended by the accepted tokens of each step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .base import DraftTree, Source, StepFeedback, trie_from_continuations
from .ngram_index import SEPARATOR, NgramIndex


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
        self._text = NgramIndex(config.min_ngram, config.max_ngram)

    def start(self, prompt: np.ndarray, references: Sequence[np.ndarray] = ()) -> None:
        capacity = 2 * (len(prompt) + sum(len(r) + 1 for r in references))
        self._text = NgramIndex(self.config.min_ngram, self.config.max_ngram, max(1024, capacity))
        for reference in references:
            self._text.append(np.asarray(reference, dtype=np.int32))
            self._text.append(np.array([SEPARATOR], dtype=np.int32))
        self._text.append(np.asarray(prompt, dtype=np.int32))

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        root = int(context[-1])
        if budget <= 0:
            return DraftTree.empty(root)
        starts, lengths = self._text.matches(context, self.config.max_matches)
        continuations = [self._text.span(start, self.config.depth) for start in starts]
        return copied_spans_trie(root, continuations, lengths, self.config.depth, self.source, budget)

    def observe(self, feedback: StepFeedback) -> None:
        self._text.append(feedback.new_tokens)


def copied_spans_trie(
    root: int, continuations: list[np.ndarray], lengths: list[int], depth: int, source: Source, budget: int
) -> DraftTree:
    """The trie of spans copied after matches of the context's suffix, weighted ``2 ** match length``.

    Args:
        continuations: the copied spans, longest match first (``lengths`` non-increasing).
        lengths: the matched suffix length behind each span.
        depth: the longest span.
    """
    keep = [i for i, c in enumerate(continuations) if len(c)]
    if not keep:
        return DraftTree.empty(root)
    weights = np.array([2.0 ** lengths[i] for i in keep])
    depth_probs = np.full(depth, NEXT_TOKEN_PRIOR)
    depth_probs[0] = FIRST_TOKEN_PRIOR.get(lengths[0], FIRST_TOKEN_PRIOR[max(FIRST_TOKEN_PRIOR)])
    return trie_from_continuations(root, [continuations[i] for i in keep], weights, depth_probs, source, budget)
