"""The drafter protocol: what every source of drafts answers, request by request.

A drafter proposes continuations of a request's context as a :class:`~retrieval_spec.tree.DraftTree`: a trie
of token ids rooted at the newest context token (the one whose keys are not cached yet). It never sees the
model; after each verification it is told what was accepted. One drafter serves every request of a batch (and
of a vLLM server): state that belongs to one request is keyed by its ``request`` id and dropped by
:meth:`Drafter.finish`; what the drafter learns across requests (a recycling table, an n-gram pool, earlier
outputs) is shared by all of them.

Lifecycle of one request, in call order::

    drafter.start(request, prompt, references)        # once, before the first step
    tree = drafter.propose(request, context, budget)  # every step; DraftTree.empty(root) when nothing matches
    drafter.observe(request, feedback)                # every step, after acceptance
    drafter.finish(request)                           # once: the request ended (or was abandoned)

Optional capabilities are declared here, with the defaults a drafter that lacks them inherits:

- ``top_k > 0``: the drafter wants the target's ``top_k`` most likely tokens at every verified node
  (``StepFeedback.top_tokens``).
- :meth:`Drafter.branch`: extra nodes to run in the verification forward beside the tree (Lookahead's window).
- ``state_file``: the drafter saves what it learned with :meth:`Drafter.save` and reads it back with
  :meth:`Drafter.load` (``generate --state-dir``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Hashable, Sequence

import numpy as np

from ..tree import Branch, DraftTree, Source, StepFeedback

RequestId = Hashable


class Drafter:
    """A source of draft continuations. Numpy, with compiled per-node loops (``compiled.py``); a drafter never
    imports torch.

    Attributes:
        source: the :class:`Source` recorded on every node it proposes.
        top_k: how many of the target's most likely tokens per verified node it wants in feedback (0: none).
        state_file: the file name of its saved state inside a state directory, or None when it keeps none.
    """

    source: Source
    top_k: int = 0
    state_file: str | None = None

    def start(self, request: RequestId, prompt: np.ndarray, references: Sequence[np.ndarray] = ()) -> None:
        """Begin ``request``: ``prompt`` ((p,) int32 token ids) and reference documents it may copy from."""

    def propose(self, request: RequestId, context: np.ndarray, budget: int) -> DraftTree:
        """At most ``budget`` nodes beyond the root continuing ``context`` ((c,) int32: prompt + output so far)."""
        raise NotImplementedError

    def observe(self, request: RequestId, feedback: StepFeedback) -> None:
        """Learn from one verified step of ``request``; ``feedback.new_tokens`` extend its context."""

    def finish(self, request: RequestId) -> None:
        """``request`` ended: forget what was kept for it alone (what it taught the drafter stays)."""

    def branch(self, request: RequestId, context: np.ndarray) -> Branch | None:
        """Look-ahead nodes to verify beside this step's tree (see :class:`Branch`), or None."""
        return None

    def save(self, directory: Path, tokenizer_sha256: str) -> None:
        """Write what the drafter learned to ``directory / state_file`` (only when ``state_file`` is set)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no state")

    def load(self, directory: Path, tokenizer_sha256: str, vocab_size: int) -> None:
        """Replace what the drafter learned by ``directory / state_file``, saved for the same tokenizer.

        Raises:
            DatastoreFormatError: an unreadable or damaged file, or one holding a token id outside
                ``[0, vocab_size)``.
            TokenizerMismatchError: saved for another tokenizer.
        """
        raise NotImplementedError(f"{type(self).__name__} keeps no state")

