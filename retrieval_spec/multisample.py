"""Multi-sample decoding: N sequences in one batched forward per step, each with its own token tree.

For self-consistency and best-of-N, N samples of one prompt are decoded together and draft from each
other's text (:mod:`retrieval_spec.drafters.cross_path`) besides every other source. Rows keep their own
trees, position ids, accepted lengths and cache lengths (:class:`~retrieval_spec.verify.BatchTreeVerifier`),
so each row's output is exactly what it would be alone: greedy rows equal plain greedy decoding, and sampled
row ``b`` is a function of its seed ``config.seed + b`` only, distributed as plain sampling.
Distinct prompts may be batched too (greedy batch decoding).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .calibration import AcceptanceModel
from .costs import CostProbe, cached_cost_curve
from .drafters.base import Drafter, StepFeedback
from .drafters.cross_path import SiblingPaths
from .fusion import TreeFuser
from .generate import (
    NO_TOP,
    GenerationConfig,
    GenerationResult,
    GenerationStats,
    check_fits,
    count_step,
    cut_at_stop,
    encode,
    eos_token_ids,
)
from .tree import CostCurve, best_batch_size
from .verify import BatchTreeVerifier, Sampler, accept


@dataclass(frozen=True)
class BatchResult:
    """The rows of one batch, in input order, and the batch's own counters.

    Each row's ``stats`` count its own steps, tokens and draft time; its ``verify_ms`` is the time of the
    batched forwards it took part in, and ``total_ms`` is the batch's wall time.
    """

    rows: list[GenerationResult]
    forwards: int
    total_ms: float

    @property
    def tokens_per_second(self) -> float:
        """Tokens of all rows per second of wall time."""
        return 1e3 * sum(len(r.tokens) for r in self.rows) / max(self.total_ms, 1e-9)

    @property
    def mean_accepted(self) -> float:
        """Tokens per row per verification step, over all rows (1.0 is plain decoding)."""
        return sum(r.stats.new_tokens for r in self.rows) / max(sum(r.stats.steps for r in self.rows), 1)

    def to_dict(self) -> dict:
        return {
            "texts": [r.text for r in self.rows],
            "tokens": [r.tokens.tolist() for r in self.rows],
            "stats": {
                "rows": len(self.rows),
                "forwards": self.forwards,
                "total_ms": round(self.total_ms, 3),
                "tokens_per_second": round(self.tokens_per_second, 3),
                "mean_accepted": round(self.mean_accepted, 4),
                "per_row": [r.stats.to_dict() for r in self.rows],
            },
        }


class MultiSampleGenerator:
    """Decodes a batch of rows together with one model, lossless per row.

    Args:
        model: a causal LM that accepts a 4-D float ``attention_mask`` and per-row ``position_ids``.
        tokenizer: its tokenizer.
        drafters: makes one row's drafters (e.g. ``lambda: make_drafters("pld")``); called once per row the
            first time a batch that large is decoded, and the drafters are kept for later batches.
        cross_path: add the cross-path drafter (rows draft from each other's outputs).
        cost_curve: cost of verifying k nodes per row at the batch size used; measured per batch size (and
            cached on disk) when omitted.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        drafters: Callable[[], Sequence[Drafter]] = list,
        cross_path: bool = True,
        cost_curve: CostCurve | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.make_drafters = drafters
        self.cross_path = cross_path
        self.cost_curve = cost_curve
        self.acceptance = AcceptanceModel()  # shared by every row: N times the evidence per step
        self.verifier = BatchTreeVerifier(model)
        self.eos_token_ids = eos_token_ids(model)
        self._row_drafters: list[list[Drafter]] = []
        self._curves: dict[int, CostCurve] = {}

    def generate(
        self,
        prompts: Sequence[str | np.ndarray],
        config: GenerationConfig = GenerationConfig(),
        references: Sequence[str | np.ndarray] = (),
    ) -> BatchResult:
        """Decode one continuation per prompt; sampled row ``b`` uses seed ``config.seed + b`` (0 when unset).

        For N samples of one prompt pass it N times (with ``temperature > 0``: greedy rows would be equal).

        Raises:
            InputError: an empty prompt, or one too long for the model's context.
        """
        ids = [encode(self.tokenizer, p) for p in prompts]
        if not ids:
            return BatchResult(rows=[], forwards=0, total_ms=0.0)
        for prompt_ids in ids:
            check_fits(self.model, len(prompt_ids), config.max_new_tokens)
        reference_ids = [encode(self.tokenizer, r) for r in references if len(r)]
        batch = len(ids)
        fusers = self._fusers(batch)  # may measure this batch size's cost curve first: not part of the timing
        started = time.perf_counter()
        seed = config.seed or 0
        samplers = [Sampler(replace(config, seed=seed + b)) for b in range(batch)] if config.temperature > 0 else None
        stats = [GenerationStats() for _ in range(batch)]
        contexts = [np.concatenate([p, np.zeros(config.max_new_tokens, dtype=np.int32)]) for p in ids]
        lengths = [len(p) for p in ids]
        self.verifier.reset(ids)
        for b, fuser in enumerate(fusers):
            fuser.start(ids[b], reference_ids)
        top_k = max((d.top_k for fuser in fusers for d in fuser.drafters), default=0)
        alive = list(range(batch))  # rows still decoding, in cache order
        forwards = 0
        while alive:
            t0 = time.perf_counter()
            ranked = [
                fusers[b].rank(contexts[b][: lengths[b]], config.tree_budget, len(contexts[b]) - lengths[b] - 1)
                for b in alive
            ]
            curve = fusers[alive[0]].cost_curve  # every row pays for the largest tree: one size for all
            size = 1 + best_batch_size([r.scores[1:] for r in ranked], curve)
            trees = [r.head(size) for r in ranked]
            t1 = time.perf_counter()
            logits = self.verifier.logits(trees, pad_to=curve.padded_size(max(len(t) for t in trees)))
            steps, finished = [], []
            for b, tree, row_logits in zip(alive, trees, logits):
                output = contexts[b][len(ids[b]) : lengths[b]]
                accepted, new_tokens = accept(tree, row_logits, None if samplers is None else samplers[b], len(output))
                remaining = len(contexts[b]) - lengths[b]
                new_tokens, done = cut_at_stop(
                    new_tokens, output, remaining, config, self.eos_token_ids, self.tokenizer
                )
                steps.append((accepted, new_tokens))
                finished.append(done)
            self.verifier.commit([accepted for accepted, _ in steps])
            forwards += 1
            t2 = time.perf_counter()
            for b, tree, row_logits, (accepted, new_tokens) in zip(alive, trees, logits, steps):
                t3 = time.perf_counter()
                contexts[b][lengths[b] : lengths[b] + len(new_tokens)] = new_tokens
                lengths[b] += len(new_tokens)
                top = row_logits.topk(top_k, dim=-1).indices.numpy().astype(np.int32) if top_k else NO_TOP
                fusers[b].observe(
                    StepFeedback(tree=tree, accepted_nodes=accepted, new_tokens=new_tokens, top_tokens=top)
                )
                observe = time.perf_counter() - t3
                stats[b].observe_ms += observe * 1e3
                count_step(stats[b], tree, accepted, new_tokens, (t1 - t0) / len(alive) + observe, t2 - t1)
            if any(finished):
                keep = [j for j, done in enumerate(finished) if not done]
                alive = [alive[j] for j in keep]
                if alive:
                    self.verifier.keep_rows(np.array(keep))
        total_ms = (time.perf_counter() - started) * 1e3
        rows = []
        for b in range(batch):
            stats[b].total_ms = total_ms
            output = contexts[b][len(ids[b]) : lengths[b]].copy()
            text = self.tokenizer.decode(output, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            rows.append(GenerationResult(tokens=output, text=text, stats=stats[b]))
        return BatchResult(rows=rows, forwards=forwards, total_ms=total_ms)

    def _fusers(self, batch: int) -> list[TreeFuser]:
        """One fuser per row: its own drafters, a cross-path view of the batch, the shared acceptance model."""
        while len(self._row_drafters) < batch:
            self._row_drafters.append(list(self.make_drafters()))
        drafters = [list(self._row_drafters[b]) for b in range(batch)]
        if self.cross_path and batch > 1:
            for row, sibling in zip(drafters, SiblingPaths(batch).drafters()):
                row.append(sibling)
        curve = self._curve(batch) if any(drafters) else CostCurve(np.array([1]), np.array([1.0]))
        # The batched verifier runs no look-ahead branch: never plan for one.
        return [TreeFuser(row, curve, self.acceptance, max_branch_overhead=-math.inf) for row in drafters]

    def _curve(self, batch: int) -> CostCurve:
        if self.cost_curve is not None:
            return self.cost_curve
        if batch not in self._curves:
            self._curves[batch] = cached_cost_curve(self.model, CostProbe(batch=batch))
        return self._curves[batch]
