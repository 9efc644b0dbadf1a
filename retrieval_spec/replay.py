"""The engine without a model: a verifier that answers from recorded plain greedy outputs, and a clock that
charges the cost curve.

For greedy decoding the tokens a tree gains are fixed by the plain output: the target's token after a node on
the recorded path is the next recorded token, and acceptance only ever descends along that path. So
:class:`ReplayVerifier`, handed to the real :class:`~retrieval_spec.generate.SpeculativeGenerator` with a
:class:`CostClock`, runs the whole engine — drafters, fusion, calibration, sizing, padding, exploration, the
speed guard — in seconds, and what it predicts is what the engine does with the same cost curve
(``benchmarks/simulate.py``; ``tests/test_replay.py`` holds it to a real run). Pure numpy.

What a replay cannot know: the target's top tokens away from the recorded path (it reports them on the path
only, ``RowResult.top_nodes``), and a look-ahead branch's tokens (none are reported: Lookahead's window stays
as it is). Greedy decoding without a repetition penalty only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .config import GenerationConfig
from .errors import InputError
from .sizing import CostCurve
from .verifier import PhaseTimer, RowDraft, RowResult


@dataclass(frozen=True)
class Recording:
    """One prompt's plain greedy output as the target produced it.

    Attributes:
        prompt: (p,) int32 token ids.
        output: (m,) int32 the greedy continuation (ending at EOS, or at the token limit it was recorded with).
        top: (m, k) int32 the target's k most likely tokens after ``prompt`` + ``output[:i]``, most likely first
            (k may be 0).
    """

    prompt: np.ndarray
    output: np.ndarray
    top: np.ndarray

    def __post_init__(self) -> None:
        if self.prompt.ndim != 1 or not len(self.prompt) or self.output.ndim != 1:
            raise ValueError("Recording needs a non-empty (p,) prompt and an (m,) output")
        if self.top.ndim != 2 or len(self.top) != len(self.output):
            raise ValueError("Recording.top must be (len(output), k)")

    @staticmethod
    def read_jsonl(path: Path) -> list[tuple[dict, Recording]]:
        """The recordings of ``benchmarks/record_plain.py`` or a benchmark's ``--record`` (lines with prompt,
        output, top and metadata: the category, and ``references``, lists of token ids the decode may copy from)."""
        rows = []
        for line in Path(path).read_text().splitlines():
            record = json.loads(line)
            top = np.asarray(record.get("top") or np.zeros((len(record["output"]), 0)), dtype=np.int32)
            rows.append((record, Recording(np.asarray(record["prompt"], dtype=np.int32),
                                           np.asarray(record["output"], dtype=np.int32), top.reshape(
                                               len(record["output"]), -1))))
        return rows


class CostClock:
    """Seconds that pass only when the replay charges a forward, by what the cost curve says it costs (drafting
    and bookkeeping take no time on it). Hand the same clock to the verifier and to the generator."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds

    def advance(self, ms: float) -> None:
        self.seconds += ms / 1e3


class ReplayVerifier:
    """A :class:`~retrieval_spec.verifier.Verifier` that answers from recordings instead of running a model.

    A row is recognised by its prompt (the ``context`` it starts with); its position is how much of the recording
    its context already holds. Each forward advances ``clock`` by the curve's cost of the nodes per row it runs.

    Args:
        recordings: the outputs rows may ask for, one per distinct prompt.
        cost: what a forward of k nodes per row costs (ms), at every batch size.
        clock: the clock to charge (None: none is charged).
        vocab_size: the recorded model's vocabulary.
        prior: the curve the sizer starts learning from (default ``cost``; a wrong one tests the learning).
        eos_token_ids: the tokens that end a row unless the config names others.
    """

    def __init__(self, recordings: Sequence[Recording], cost: CostCurve, clock: CostClock | None, vocab_size: int,
                 prior: CostCurve | None = None, eos_token_ids: frozenset[int] = frozenset()) -> None:
        self.recordings = {r.prompt.tobytes(): r for r in recordings}
        self.cost, self.clock, self.prior = cost, clock, prior or cost
        self.vocab_size, self.eos_token_ids = vocab_size, frozenset(eos_token_ids)
        self.context_limit: int | None = None
        self._rows: list[Recording] = []
        self._top_k = 0

    def start(self, rows: Sequence[RowDraft], config: GenerationConfig, top_k: int,
              timer: PhaseTimer) -> list[RowResult]:
        if config.temperature > 0 or config.repetition_penalty != 1.0:
            raise InputError("a replay knows plain greedy outputs only: temperature 0, no repetition penalty")
        eos = self.eos_token_ids if config.eos_token_ids is None else frozenset(config.eos_token_ids)
        self._rows = [self._recording(row.context, config.max_new_tokens, eos) for row in rows]
        self._top_k = top_k
        return self._forward(rows, max(row.num_nodes for row in rows), timer)

    def verify(self, rows: Sequence[RowDraft], run: int, timer: PhaseTimer) -> list[RowResult]:
        return self._forward(rows, run, timer)

    def _forward(self, rows: Sequence[RowDraft], run: int, timer: PhaseTimer) -> list[RowResult]:
        """What a forward of ``run`` nodes per row answers, charged to the clock."""
        timer.lap("mask")
        if self.clock is not None:
            self.clock.advance(float(np.interp(run, self.cost.sizes, self.cost.ms)))
        results = [self._answer(recording, row) for recording, row in zip(self._rows, rows)]
        timer.lap("forward")
        return results

    def commit(self, accepted: Sequence[np.ndarray]) -> None:
        """Nothing to keep: a row's position is read from its context."""

    def keep_rows(self, rows: np.ndarray) -> None:
        self._rows = [self._rows[i] for i in rows]

    def fits(self, row: int, depth: int) -> bool:
        return True

    def cost_prior(self, batch: int) -> CostCurve:
        return self.prior

    def store_costs(self, batch: int, curve: CostCurve) -> None:
        """A replay stores nothing."""

    def _recording(self, prompt: np.ndarray, max_new_tokens: int, eos: frozenset[int]) -> Recording:
        recording = self.recordings.get(np.asarray(prompt, dtype=np.int32).tobytes())
        if recording is None:
            raise InputError(f"no recording of a prompt of {len(prompt)} tokens ({prompt[:8].tolist()}...)")
        ended = len(recording.output) and int(recording.output[-1]) in eos
        if len(recording.output) < max_new_tokens and not ended:
            raise InputError(f"a recording of {len(recording.output)} tokens cannot replay max_new_tokens="
                             f"{max_new_tokens}: record at least as many")
        return recording

    def _answer(self, recording: Recording, row: RowDraft) -> RowResult:
        """The target's tokens after every node: the next recorded token on the recorded path; elsewhere the
        recorded token at the same depth, which acceptance never reads (it descends along the path only)."""
        tree, output = row.tree, recording.output
        position = len(row.context) - len(recording.prompt)  # output tokens the context holds
        depth = tree.depths
        filled = position + depth - 1  # the output index a node's own token would fill (the root: already in)
        matches = (filled < len(output)) & (tree.tokens == output[np.clip(filled, 0, len(output) - 1)])
        on_path = np.ones(len(tree), dtype=bool)
        for node in range(1, len(tree)):
            on_path[node] = on_path[tree.parents[node]] and matches[node]
        after = np.minimum(position + depth, len(output) - 1)  # the output index of the token after a node
        top_nodes = np.flatnonzero(on_path & (position + depth < len(output))).astype(np.int64)
        k = min(self._top_k, recording.top.shape[1])
        return RowResult(node_tokens=output[after].astype(np.int32), top_nodes=top_nodes,
                         top_tokens=recording.top[after[top_nodes], :k].astype(np.int32).reshape(len(top_nodes), k),
                         branch_tokens=np.zeros(0, dtype=np.int32))
