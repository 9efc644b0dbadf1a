"""Drafting from earlier outputs (SuffixDecoding-style, arXiv 2411.04975): repeated traffic — agent loops,
RAG over the same documents, templated answers — says again what it said before.

The output of every finished request is appended to one :class:`NgramIndex` shared by all requests (a
separator between outputs, so no copy runs from one into the next); drafting copies what followed the context's
suffix in those earlier outputs (a running request's own output is prompt lookup's). Only accepted tokens enter
it, when their request finishes. The history is bounded: past ``max_tokens`` only the newest half is kept. It can
be saved next to a datastore and loaded in the next process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..tree import DraftTree, Source, StepFeedback
from .base import Drafter, RequestId
from .ngram_index import SEPARATOR, NgramIndex
from .prompt_lookup import PromptLookupConfig, copied_trie
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


class OutputHistoryDrafter(Drafter):
    """Copies continuations of the context's suffix from the outputs of finished requests."""

    source = Source.HISTORY
    state_file = FILE

    def __init__(self, config: HistoryConfig = HistoryConfig()) -> None:
        self.config = config
        self.history = self._index(np.zeros(0, dtype=np.int32))
        self._running: dict[RequestId, list[np.ndarray]] = {}  # per request: its output so far

    def start(self, request: RequestId, prompt: np.ndarray, references=()) -> None:
        self._running[request] = []

    def propose(self, request: RequestId, context: np.ndarray, budget: int) -> DraftTree:
        root = int(context[-1])
        cfg = self.config.matching
        if budget <= 0 or not self.history.length:
            return DraftTree.empty(root)
        return copied_trie(root, self.history, context, cfg, self.source, budget)[0]

    def observe(self, request: RequestId, feedback: StepFeedback) -> None:
        self._running[request].append(feedback.new_tokens)

    def finish(self, request: RequestId) -> None:
        """Remember the request's output (nothing when it produced none)."""
        output = self._running.pop(request, [])
        if not output:
            return
        tokens = np.concatenate([*output, [SEPARATOR]]).astype(np.int32)[-self.config.max_tokens :]
        if self.history.length + len(tokens) > self.config.max_tokens:  # keep the newest half
            keep = max(0, min(self.history.length, self.config.max_tokens // 2 - len(tokens)))
            self.history = self._index(self.history.text[self.history.length - keep : self.history.length])
        self.history.append(tokens)

    def save(self, directory: Path, tokenizer_sha256: str) -> None:
        """Write the outputs of finished requests atomically to ``directory/output_history.npz``."""
        text = self.history.text[: self.history.length]
        write_state(directory / FILE, {"text": text}, FORMAT_VERSION, tokenizer_sha256)

    def load(self, directory: Path, tokenizer_sha256: str, vocab_size: int) -> None:
        """Replace the history by one saved with :meth:`save` for the same tokenizer (see ``read_state``); one of
        more than ``config.max_tokens`` tokens is refused before it is read."""
        arrays, _ = read_state(directory / FILE, FORMAT_VERSION, tokenizer_sha256, shapes={"text": ("tokens",)},
                               limits={"tokens": self.config.max_tokens}, vocab_size=vocab_size)
        self.history = self._index(arrays["text"].astype(np.int32))

    def _index(self, text: np.ndarray) -> NgramIndex:
        cfg = self.config.matching
        index = NgramIndex(cfg.min_ngram, cfg.max_ngram, max(1024, 2 * len(text)))
        index.append(text)
        return index
