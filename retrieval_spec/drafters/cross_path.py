"""Cross-path drafting for multi-sample inference (arXiv 2503.05330): samples of one prompt draft from each
other's text.

Samples of one prompt (self-consistency, best-of-N) say much the same things in different orders, so the
context's suffix in one path is often followed, in another path, by what this path is about to say. The
drafter keeps each request's output as an :class:`NgramIndex`; requests that started from the same prompt are
siblings, and a request looks its suffix up in its siblings' outputs and copies what followed. A finished
request's output stays available to its siblings until the last of them finishes. Requests with a prompt of
their own have no siblings and get nothing from it.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from ..tree import DraftTree, Source, StepFeedback
from .base import Drafter, RequestId
from .ngram_index import NgramIndex
from .prompt_lookup import PromptLookupConfig, copied_spans_trie


class CrossPathDrafter(Drafter):
    """Drafts each request from the outputs of the running requests that share its prompt."""

    source = Source.SIBLING

    def __init__(self, config: PromptLookupConfig = PromptLookupConfig()) -> None:
        self.config = config
        self._paths: dict[RequestId, NgramIndex] = {}  # per request of a running group: its indexed output
        # Per request: output not indexed yet. A request alone with its prompt keeps its tokens here, and they are
        # indexed (in one piece) only when a sibling looks them up: most requests never have one.
        self._unindexed: dict[RequestId, list[np.ndarray]] = {}
        self._prompt_of: dict[RequestId, bytes] = {}
        self._requests_of: dict[bytes, list[RequestId]] = {}  # prompt digest -> its requests, in start order
        self._running: dict[bytes, set[RequestId]] = {}  # prompt digest -> its requests not finished yet

    def start(self, request: RequestId, prompt: np.ndarray, references: Sequence[np.ndarray] = ()) -> None:
        key = hashlib.sha1(np.asarray(prompt, dtype=np.int32).tobytes()).digest()
        self._paths[request] = NgramIndex(self.config.min_ngram, self.config.max_ngram)
        self._unindexed[request] = []
        self._prompt_of[request] = key
        self._requests_of.setdefault(key, []).append(request)
        self._running.setdefault(key, set()).add(request)

    def propose(self, request: RequestId, context: np.ndarray, budget: int) -> DraftTree:
        root = int(context[-1])
        cfg = self.config
        if budget <= 0:
            return DraftTree.empty(root)
        found = []  # (match length, sibling rank, span)
        for rank, sibling in enumerate(self._requests_of[self._prompt_of[request]]):
            if sibling == request:
                continue
            other = self._indexed(sibling)
            if other.length:
                _, lengths, tokens, sizes = other.copies(context, cfg.max_matches, cfg.longest, cfg.depth)
                found.extend(zip(lengths.tolist(), [rank] * len(lengths), np.split(tokens, np.cumsum(sizes)[:-1])))
        if not found:
            return DraftTree.empty(root)
        found.sort(key=lambda m: -m[0])  # stable: per length, siblings in order, most recent first within one
        found = found[: cfg.max_matches]
        return copied_spans_trie(root, np.concatenate([span for *_, span in found]),
                                 np.array([len(span) for *_, span in found], dtype=np.int64),
                                 np.array([n for n, *_ in found], dtype=np.int64), cfg.depth, self.source, budget)

    def observe(self, request: RequestId, feedback: StepFeedback) -> None:
        if len(self._requests_of[self._prompt_of[request]]) > 1:
            self._indexed(request).append(feedback.new_tokens)
        else:
            self._unindexed[request].append(feedback.new_tokens)

    def _indexed(self, request: RequestId) -> NgramIndex:
        """The request's output index, with every token it has produced so far."""
        pending = self._unindexed[request]
        if pending:
            self._paths[request].append(np.concatenate(pending))
            pending.clear()
        return self._paths[request]

    def finish(self, request: RequestId) -> None:
        """The request's output stays for its siblings; the group is forgotten when its last request finishes."""
        key = self._prompt_of.get(request)
        if key is None:
            return
        self._running[key].discard(request)
        if not self._running[key]:
            del self._running[key]
            for member in self._requests_of.pop(key):
                del self._paths[member], self._prompt_of[member], self._unindexed[member]
