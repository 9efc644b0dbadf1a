"""Drafting from earlier outputs (SuffixDecoding-style, arXiv 2411.04975): repeated traffic — agent loops,
RAG over the same documents, templated answers — says again what it said before.

The output of every finished request is appended to one :class:`NgramIndex` that lives across requests (a
separator between requests, so no copy runs from one into the next); drafting copies what followed the
context's suffix in those earlier outputs (the running request's own output is prompt lookup's). The history
is bounded: past ``max_tokens`` only the newest half is kept. It can be saved next to a datastore and loaded in
the next process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .base import DraftTree, Source, StepFeedback
from .ngram_index import SEPARATOR, NgramIndex
from .prompt_lookup import PromptLookupConfig, copied_spans_trie
from .state import read_state, write_state

FORMAT_VERSION = 1
FILE = "output_history.npz"


@dataclass(frozen=True)
class HistoryConfig:
    """Matching limits (as prompt lookup's) and the bound on remembered tokens."""

    matching: PromptLookupConfig = PromptLookupConfig(min_ngram=2)
    max_tokens: int = 1_000_000

    def __post_init__(self) -> None:
        if self.max_tokens < 2:
            raise ValueError("HistoryConfig.max_tokens must be at least 2")


class OutputHistoryDrafter:
    """Copies continuations of the context's suffix from the outputs of earlier requests (not the running one's)."""

    source = Source.HISTORY
    top_k = 0
    state_file = FILE

    def __init__(self, config: HistoryConfig = HistoryConfig()) -> None:
        self.config = config
        self.history = self._index(np.zeros(0, dtype=np.int32))
        self._current: list[np.ndarray] = []  # the running request's output, remembered when it ends

    def start(self, prompt: np.ndarray, references: Sequence[np.ndarray] = ()) -> None:
        """Remember the previous request's output."""
        self._flush()

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        root = int(context[-1])
        cfg = self.config.matching
        if budget <= 0 or not self.history.length:
            return DraftTree.empty(root)
        starts, lengths = self.history.matches(context, cfg.max_matches)
        continuations = [self.history.span(start, cfg.depth) for start in starts]
        return copied_spans_trie(root, continuations, lengths, cfg.depth, self.source, budget)

    def observe(self, feedback: StepFeedback) -> None:
        self._current.append(feedback.new_tokens)

    def save(self, path: Path, tokenizer_fingerprint: str) -> None:
        """Write the remembered outputs (the last request's included) atomically to ``path/output_history.npz``."""
        self._flush()
        text = self.history.text[: self.history.length]
        write_state(path / FILE, {"text": text}, FORMAT_VERSION, tokenizer_fingerprint)

    def load(self, path: Path, tokenizer_fingerprint: str) -> None:
        """Replace the history by one saved with :meth:`save` for the same tokenizer (see ``read_state``)."""
        arrays, _ = read_state(path / FILE, FORMAT_VERSION, tokenizer_fingerprint)
        self.history = self._index(arrays.get("text", np.zeros(0, dtype=np.int32)).astype(np.int32))

    def _flush(self) -> None:
        if not self._current:
            return
        tokens = np.concatenate([*self._current, [SEPARATOR]]).astype(np.int32)[-self.config.max_tokens :]
        self._current = []
        if self.history.length + len(tokens) > self.config.max_tokens:  # keep the newest half
            keep = max(0, min(self.history.length, self.config.max_tokens // 2 - len(tokens)))
            self.history = self._index(self.history.text[self.history.length - keep : self.history.length])
        self.history.append(tokens)

    def _index(self, text: np.ndarray) -> NgramIndex:
        cfg = self.config.matching
        index = NgramIndex(cfg.min_ngram, cfg.max_ngram, max(1024, 2 * len(text)))
        index.append(text)
        return index
