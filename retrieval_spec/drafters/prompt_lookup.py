"""Prompt lookup (PLD) and reference copying (LLMA): draft by copying what followed earlier occurrences.

The searchable text is the reference documents, the prompt and the output so far, separated so that no
copied span runs from one into the next, in an :class:`~retrieval_spec.drafters.ngram_index.NgramIndex`
built once per request and extended by the accepted tokens of each step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..tree import DraftTree, Source, StepFeedback, trie_from_continuations
from .base import Drafter, RequestId
from .ngram_index import SEPARATOR, NgramIndex


@dataclass(frozen=True)
class PromptLookupConfig:
    """Matching and drafting limits.

    Attributes:
        max_ngram: longest context suffix looked up in the n-gram index.
        min_ngram: shortest context suffix looked up.
        max_matches: most occurrences whose continuations enter the trie (the longest matches, most recent first).
        depth: longest continuation copied from one occurrence; how much of it is verified is decided by the
            learned acceptance of copies that long and that deep, and the cost curve.
        longest: matches are measured back up to this many tokens (``DraftTree.matches``): a long verbatim run
            is told apart from a chance n-gram.
    """

    max_ngram: int = 4
    min_ngram: int = 1
    max_matches: int = 8
    depth: int = 32
    longest: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError("PromptLookupConfig needs 1 <= min_ngram <= max_ngram")
        if self.max_matches < 1 or self.depth < 1:
            raise ValueError("PromptLookupConfig.max_matches and depth must be positive")


# Rough chance that copying is right, by match length (first token) and for every further token; the
# decoder recalibrates these online (calibration.py), so they only need the right order.
FIRST_TOKEN_PRIOR = {1: 0.15, 2: 0.35, 3: 0.5, 4: 0.6}
NEXT_TOKEN_PRIOR = 0.8


class PromptLookupDrafter(Drafter):
    """Copies continuations of the context's suffix from the request's prompt, reference documents and output."""

    source = Source.PROMPT

    def __init__(self, config: PromptLookupConfig = PromptLookupConfig()) -> None:
        self.config = config
        self._texts: dict[RequestId, NgramIndex] = {}  # per request: references, prompt and output so far

    def start(self, request: RequestId, prompt: np.ndarray, references: Sequence[np.ndarray] = ()) -> None:
        capacity = 2 * (len(prompt) + sum(len(r) + 1 for r in references))
        text = NgramIndex(self.config.min_ngram, self.config.max_ngram, max(1024, capacity))
        for reference in references:
            text.append(np.asarray(reference, dtype=np.int32))
            text.append(np.array([SEPARATOR], dtype=np.int32))
        text.append(np.asarray(prompt, dtype=np.int32))
        self._texts[request] = text

    def propose(self, request: RequestId, context: np.ndarray, budget: int) -> DraftTree:
        root = int(context[-1])
        text = self._texts[request]
        if budget <= 0:
            return DraftTree.empty(root)
        starts, lengths = text.matches(context, self.config.max_matches, self.config.longest)
        continuations = [text.span(start, self.config.depth) for start in starts]
        return copied_spans_trie(root, continuations, lengths, self.config.depth, self.source, budget)

    def observe(self, request: RequestId, feedback: StepFeedback) -> None:
        self._texts[request].append(feedback.new_tokens)

    def finish(self, request: RequestId) -> None:
        self._texts.pop(request, None)


def copied_spans_trie(
    root: int, continuations: list[np.ndarray], lengths: list[int], depth: int, source: Source, budget: int
) -> DraftTree:
    """The trie of spans copied after matches of the context's suffix, weighted ``2 ** match length``.

    Args:
        continuations: the copied spans, longest match first (``lengths`` non-increasing).
        lengths: the matched suffix length behind each span (recorded as the nodes' ``matches``).
        depth: the longest span.
    """
    keep = [i for i, c in enumerate(continuations) if len(c)]
    if not keep:
        return DraftTree.empty(root)
    weights = np.array([2.0 ** min(lengths[i], 64) for i in keep])
    depth_probs = np.full(depth, NEXT_TOKEN_PRIOR)
    depth_probs[0] = FIRST_TOKEN_PRIOR.get(lengths[0], FIRST_TOKEN_PRIOR[max(FIRST_TOKEN_PRIOR)])
    return trie_from_continuations(root, [continuations[i] for i in keep], weights, depth_probs, source, budget,
                                   matches=[lengths[i] for i in keep])
