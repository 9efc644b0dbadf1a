"""The verifier seam: what the decoding loop asks of whatever scores its drafts.

The loop (:mod:`retrieval_spec.generate`) never touches a model. It hands every step's drafts to a
:class:`Verifier` and gets back, per row, the target's token after every node. Two implementations:
:class:`~retrieval_spec.verify.ModelVerifier` runs a transformers model over its key/value cache, and
:class:`~retrieval_spec.replay.ReplayVerifier` answers from recorded plain greedy outputs, without a model, so
that the engine itself replays in seconds. Pure numpy.

Terminology, per row and step:
    tree: the :class:`~retrieval_spec.tree.DraftTree` verified; node 0 (the root) is the newest context token.
    node tokens: the target's token after every node (argmax, or a draw when sampling; ``acceptance``).
    top tokens: the target's k most likely next tokens at some of the nodes (raw logits), for drafters that
        learn from them (Token Recycling); ``top_nodes`` says which.
    run: nodes per row the forward runs; at least every row's tree plus branch, more when padding pays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from .config import GenerationConfig
from .sizing import CostCurve
from .tree import Branch, DraftTree


@dataclass(frozen=True)
class RowDraft:
    """One row's share of a verification step.

    Attributes:
        tree: the draft tree, n nodes, root first.
        branch: m look-ahead nodes verified beside it (never accepted), or None.
        context: (c,) int32 the row's prompt and output so far, root last.
        uniforms: (n,) float64 the uniform of each node's output position (sampling), or None (greedy).
    """

    tree: DraftTree
    branch: Branch | None
    context: np.ndarray
    uniforms: np.ndarray | None = None

    @property
    def num_nodes(self) -> int:
        """Nodes the row needs in the forward: its tree and its branch."""
        return len(self.tree) + (0 if self.branch is None else len(self.branch))


@dataclass(frozen=True)
class RowResult:
    """What one row's verification yields, on the host.

    Attributes:
        node_tokens: (n,) int32 the target's token after every tree node.
        top_nodes: (j,) int64 increasing tree nodes whose top tokens are known (all n for a model; the nodes
            on the recorded path for a replay).
        top_tokens: (j, k) int32 the target's k most likely next tokens at each of ``top_nodes``, most likely
            first (k = 0 when nobody asked).
        branch_tokens: (m,) int32 the target's argmax at every branch node (empty when none ran or is known).
    """

    node_tokens: np.ndarray
    top_nodes: np.ndarray
    top_tokens: np.ndarray
    branch_tokens: np.ndarray

    def __post_init__(self) -> None:
        if self.top_tokens.ndim != 2 or len(self.top_tokens) != len(self.top_nodes):
            raise ValueError("RowResult.top_tokens must be (len(top_nodes), k)")


class PhaseTimer:
    """Milliseconds spent in each phase of the steps it times, read from one clock.

    :meth:`lap` charges the time since the previous lap (or :meth:`restart`) to a phase; phases add up to the
    steps' wall time.

    Args:
        clock: seconds, monotonic (``time.perf_counter``, or a replay's cost clock).
    """

    def __init__(self, clock) -> None:
        self.clock = clock
        self.ms: dict[str, float] = {}
        self._last = clock()

    def restart(self) -> None:
        """Forget the time since the last lap (it belongs to no phase timed here)."""
        self._last = self.clock()

    def lap(self, phase: str) -> float:
        """Charge the time since the last lap to ``phase``; return it in ms."""
        now = self.clock()
        ms = (now - self._last) * 1e3
        self._last = now
        self.ms[phase] = self.ms.get(phase, 0.0) + ms
        return ms

    def total(self, *phases: str) -> float:
        """Milliseconds charged to these phases (all of them when none is named)."""
        return sum(ms for phase, ms in self.ms.items() if not phases or phase in phases)


@runtime_checkable
class Verifier(Protocol):
    """What the loop runs against. Per batch: :meth:`start`, then :meth:`verify` and :meth:`commit` in turn;
    :meth:`keep_rows` drops finished rows. Rows are addressed by their index in the current batch.

    Attributes:
        vocab_size: tokens the target has; drafts outside ``[0, vocab_size)`` never reach it.
        eos_token_ids: the tokens that end a row unless the config names others.
        context_limit: most tokens a row may hold, prompt and output together (None: no limit).
    """

    vocab_size: int
    eos_token_ids: frozenset[int]
    context_limit: int | None

    def start(self, rows: Sequence[RowDraft], config: GenerationConfig, top_k: int,
              timer: PhaseTimer) -> list[RowResult]:
        """Start a batch: every row's ``context`` is its prompt, and its first tree (rooted at the prompt's last
        token, no branch) is verified with the prompt; the tree's slots await :meth:`commit`. ``config`` says how
        the target chooses tokens for the whole batch, ``top_k`` how many top tokens to return per node."""

    def verify(self, rows: Sequence[RowDraft], run: int, timer: PhaseTimer) -> list[RowResult]:
        """Verify every row's tree and branch in one forward of ``run`` nodes per row (``run`` at least each
        row's ``num_nodes``; extra nodes are inert padding). Charges its time to ``timer``'s ``mask`` and
        ``forward`` phases."""

    def commit(self, accepted: Sequence[np.ndarray]) -> None:
        """Keep each row's accepted nodes ((m_b,) increasing, root first) after its context; drop the rest."""

    def keep_rows(self, rows: np.ndarray) -> None:
        """Keep only these rows of the batch, in this order."""

    def fits(self, row: int, depth: int) -> bool:
        """Whether a node ``depth`` positions after row ``row``'s root has a position the target can embed."""

    def cost_prior(self, batch: int) -> CostCurve:
        """What verifying 1, 2, ... nodes in each of ``batch`` rows costs before any step is timed (the sizer
        learns from there)."""

    def store_costs(self, batch: int, curve: CostCurve) -> None:
        """Keep what the sizer learned for the next process (or nowhere)."""
