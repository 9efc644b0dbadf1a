"""Prompt lookup (PLD) and reference copying (LLMA): draft by copying what followed earlier occurrences.

The searchable text is the reference documents, the prompt and the output so far, separated so that no
copied span runs from one into the next, in an :class:`~retrieval_spec.drafters.ngram_index.NgramIndex`
built once per request and extended by the accepted tokens of each step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..compiled import array, f32, f64, i32, i64, kernel, returns, u8, view
from ..tree import DraftTree, Source, StepFeedback, merge, trie_arrays
from .base import Drafter, RequestId
from .ngram_index import SEPARATOR, NgramIndex, copy_arrays


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
        resync_window: after a copy of at least ``min_copy`` matched tokens breaks (an edit: a renamed word, an
            inserted type hint or docstring), the newest token is looked up this far past the break in the copied
            text, and what follows it is proposed: the copy picks up right after the edit, before an n-gram match
            long enough to trust forms again. 0: off.
        resync_age: tokens after the break during which it is tried.
        min_copy: tokens a copy must have run (matched, then accepted) to be worth picking up after it breaks.

    Resync tuned on the replay (``benchmarks/simulate.py``, SmolLM2's plain outputs, the measured 2-core curve):
    on 12 code edits of the tune split, predicted speedup pld 2.97x -> 3.03x and auto 2.94x -> 3.03x; on 16
    Spec-Bench prompts outside those measured, unchanged (1.21-1.22x). Windows of 12 to 48 tokens made no
    difference; a ``min_copy`` of 6 lost 0.01 on Spec-Bench.
    """

    max_ngram: int = 4
    min_ngram: int = 1
    max_matches: int = 8
    depth: int = 32
    longest: int = 64
    resync_window: int = 24
    resync_age: int = 12
    min_copy: int = 10

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError("PromptLookupConfig needs 1 <= min_ngram <= max_ngram")
        if self.max_matches < 1 or self.depth < 1:
            raise ValueError("PromptLookupConfig.max_matches and depth must be positive")


# Rough chance that copying is right, by match length (first token) and for every further token; the
# decoder recalibrates these online (calibration.py), so they only need the right order.
FIRST_TOKEN_PRIOR = {1: 0.15, 2: 0.35, 3: 0.5, 4: 0.6}
NEXT_TOKEN_PRIOR = 0.8
RESYNC_PRIOR = 0.45  # a copy picked up after an edit: its own calibration cell (estimate bucket), not a 1-gram's


class PromptLookupDrafter(Drafter):
    """Copies continuations of the context's suffix from the request's prompt, reference documents and output."""

    source = Source.PROMPT

    def __init__(self, config: PromptLookupConfig = PromptLookupConfig()) -> None:
        self.config = config
        self._texts: dict[RequestId, NgramIndex] = {}  # per request: references, prompt and output so far
        # Per request: where the text continued after the last step's best copy, and how long that copy had run.
        self._follow: dict[RequestId, tuple[int, int]] = {}
        self._breaks: dict[RequestId, tuple[int, int]] = {}  # where a long copy broke, and tokens emitted since

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
        tree, starts, lengths = copied_trie(root, text, context, self.config, self.source, budget)
        self._follow.pop(request, None)
        if len(starts) and (lengths[0] > 1 or request not in self._breaks):
            self._follow[request] = (int(starts[0]), int(lengths[0]))
        elif request in self._breaks:
            found = starts.tolist()
            resumed = [at for at in self._resync(text, root, *self._breaks[request]) if at not in found]
            spans = [span for span in (text.span(at, self.config.depth) for at in resumed) if len(span)]
            if spans:
                probs = [RESYNC_PRIOR * NEXT_TOKEN_PRIOR ** np.arange(len(span)) for span in spans]
                tree = merge([tree, DraftTree.from_paths(root, spans, probs, self.source)]).head(budget + 1)
                self._follow[request] = (resumed[0], self.config.min_copy)
        return tree

    def observe(self, request: RequestId, feedback: StepFeedback) -> None:
        text, new = self._texts[request], feedback.new_tokens
        follow = self._follow.pop(request, None)
        if follow is not None:  # the copy followed last step: did the new tokens go on with it?
            start, matched = follow
            expected = text.text[start : min(start + len(new), text.length)].tolist()  # a few tokens: lists
            agreed = next((i for i, (a, b) in enumerate(zip(expected, new.tolist())) if a != b), len(expected))
            if agreed == len(new):
                self._breaks.pop(request, None)
            elif matched + agreed >= self.config.min_copy:
                self._breaks[request] = (start + agreed, len(new) - agreed)
        elif request in self._breaks:
            at, age = self._breaks[request]
            if age + len(new) > self.config.resync_age:
                del self._breaks[request]
            else:
                self._breaks[request] = (at, age + len(new))
        text.append(new)

    def finish(self, request: RequestId) -> None:
        self._texts.pop(request, None)
        self._follow.pop(request, None)
        self._breaks.pop(request, None)

    def _resync(self, text: NgramIndex, root: int, broke_at: int, age: int) -> list[int]:
        """Where the copy that broke at ``broke_at``, ``age`` tokens ago, may go on after ``root``, most likely
        first: after the first ``root`` within ``resync_window`` tokens of the break (the edit ended with a token
        the text has), and ``age`` tokens past the break (the edit replaced as many tokens as it wrote). Neither
        runs past a separator or the end of the text."""
        window = text.text[broke_at : min(broke_at + self.config.resync_window, text.length)]
        cut = np.flatnonzero(window == SEPARATOR)
        window = window[: cut[0]] if len(cut) else window
        found = np.flatnonzero(window[:-1] == root)
        places = [broke_at + int(found[0]) + 1] if len(found) else []
        if age < len(window) and broke_at + age not in places:
            places.append(broke_at + age)
        return places


def copied_spans_trie(root: int, tokens: np.ndarray, sizes: np.ndarray, lengths: np.ndarray, depth: int,
                      source: Source, budget: int) -> DraftTree:
    """The trie of spans copied after matches of the context's suffix, weighted ``2 ** match length``.

    Args:
        tokens, sizes: the copied spans laid end to end (:meth:`NgramIndex.copies`), longest match first; empty
            spans count for nothing, and each is cut to ``depth``.
        lengths: (len(sizes),) int64, the matched suffix length behind each span (recorded as the nodes'
            ``matches``), non-increasing.
        depth: the longest span drafted.
        budget: nodes beyond the root (none when ``budget <= 0``).
    """
    return DraftTree.trusted(*_span_trie(root, tokens, sizes, lengths, depth, _FIRST_TOKEN_PRIORS, NEXT_TOKEN_PRIOR,
                                         budget, int(source)))


def copied_trie(root: int, index: NgramIndex, context: np.ndarray, config: PromptLookupConfig, source: Source,
                budget: int) -> tuple[DraftTree, np.ndarray, np.ndarray]:
    """:func:`copied_spans_trie` of ``index.copies(context, ...)`` with ``config``'s limits, in one compiled call;
    also the copies' ``starts`` and ``lengths``."""
    *tree, starts, lengths = _copied_trie(root, index.text, index.length, *index.chains, index.min_ngram,
                                          np.asarray(context, dtype=np.int32), config.max_matches, config.longest,
                                          config.depth, _FIRST_TOKEN_PRIORS, NEXT_TOKEN_PRIOR, budget, int(source))
    return DraftTree.trusted(*tree), starts, lengths


# FIRST_TOKEN_PRIOR by match length, the longest's for longer ones (and for 0)
_FIRST_TOKEN_PRIORS = np.array([FIRST_TOKEN_PRIOR.get(n, FIRST_TOKEN_PRIOR[max(FIRST_TOKEN_PRIOR)])
                                for n in range(max(FIRST_TOKEN_PRIOR) + 1)])
_FIRST_TOKEN_PRIORS.flags.writeable = False


@kernel(returns(array(i32), array(i32), array(f32), array(u8), array(i32), array(i32)), i64, view(i32), view(i64),
        view(i64), i64, view(f64), f64, i64, u8)
def _span_trie(root, tokens, sizes, lengths, depth, first_priors, next_prior, budget, source):
    """:func:`copied_spans_trie`'s arrays: the non-empty spans weighted ``2 ** min(length, 64)``; copying goes on
    to depth 1 with the first match's prior (``first_priors``, by length), and on each further token with
    ``next_prior``."""
    kept = 0
    for j in range(len(sizes)):
        kept += sizes[j] > 0
    kept_sizes = np.empty(kept, dtype=np.int64)
    weights = np.empty(kept, dtype=np.float64)
    matches = np.empty(kept, dtype=np.int32)
    k = 0
    for j in range(len(sizes)):
        if sizes[j] > 0:
            kept_sizes[k], weights[k], matches[k] = sizes[j], 2.0 ** min(lengths[j], 64), lengths[j]
            k += 1
    probs = np.full(max(depth, 0), next_prior)
    if kept and depth > 0:
        probs[0] = first_priors[min(lengths[0], len(first_priors) - 1)]
    return trie_arrays(root, tokens, kept_sizes, weights, probs, matches, budget if kept else 0, source)


@kernel(returns(array(i32), array(i32), array(f32), array(u8), array(i32), array(i32), array(i64), array(i64)),
        i64, view(i32), i64, view(i32, 2), view(i32, 2), i64, i64, view(i32), i64, i64, i64, view(f64), f64, i64, u8)
def _copied_trie(root, text, length, heads, previous, seed, min_ngram, context, max_matches, longest, depth,
                 first_priors, next_prior, budget, source):
    """:func:`copied_trie`: the tree's arrays, then the copies' starts and lengths."""
    starts, lengths, tokens, sizes = copy_arrays(text, length, heads, previous, seed, min_ngram, context,
                                                 max_matches, longest, depth)
    tree_tokens, parents, scores, sources, matches, depths = _span_trie(root, tokens, sizes, lengths, depth,
                                                                        first_priors, next_prior, budget, source)
    return tree_tokens, parents, scores, sources, matches, depths, starts, lengths
