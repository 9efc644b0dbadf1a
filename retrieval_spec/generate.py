"""The decoding loop, for any number of rows: draft → verify → accept → commit → observe, until every row ends.

A single sequence is a batch of one. Each row has its own tree, positions, accepted length and cache length,
so its output is exactly what it would be alone: greedy rows equal plain greedy decoding, and a sampled row is
a function of its own seed, distributed as plain sampling (:mod:`retrieval_spec.acceptance`). Rows of one
prompt (self-consistency, best-of-N) are prefilled once and draft from each other's text.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .acceptance import accept
from .costs import CostProbe, cached_cost_curve, store_cost_curve
from .drafters.base import Drafter
from .drafters.cross_path import CrossPathDrafter
from .config import GenerationConfig, Seed
from .errors import InputError
from .fusion import TreeFuser
from .sizing import CostCurve, CostModel, SpeedGuard, best_batch_size
from .tree import Branch, DraftTree, Source, StepFeedback, depths
from .verify import RowDraft, Sampler, Verifier

@dataclass
class GenerationStats:
    """Counters of one row. Times are wall-clock milliseconds; a batch's rows share its forwards and wall time."""

    new_tokens: int = 0
    steps: int = 0
    drafted_nodes: int = 0
    draft_ms: float = 0.0
    verify_ms: float = 0.0
    observe_ms: float = 0.0  # part of draft_ms: drafters learning from the step (recycling table update, top-k)
    prefill_ms: float = 0.0  # the first step: the prompt's forward, which also verifies the first tree
    total_ms: float = 0.0
    seed: Seed | None = None  # the sampler's seed (None when greedy): pass it back to reproduce the row
    paused_steps: int = 0  # steps decoded plainly because drafting had stopped paying (SpeedGuard)
    tokens_per_step: dict[int, int] = field(default_factory=dict)  # histogram: tokens gained in a step -> steps
    accepted_by_source: dict[str, int] = field(default_factory=dict)  # drafted tokens accepted, per source
    drafted_by_source: dict[str, int] = field(default_factory=dict)  # drafted nodes verified, per source

    @property
    def mean_accepted(self) -> float:
        """Mean tokens gained per verification step (1.0 is plain decoding)."""
        return self.new_tokens / max(self.steps, 1)

    @property
    def tokens_per_second(self) -> float:
        return 1e3 * self.new_tokens / max(self.total_ms, 1e-9)

    def count_step(self, tree: DraftTree, accepted: np.ndarray, new_tokens: np.ndarray, draft_ms: float,
                   verify_ms: float) -> None:
        """Add one verification step."""
        self.steps += 1
        self.new_tokens += len(new_tokens)
        self.drafted_nodes += len(tree) - 1
        self.draft_ms += draft_ms
        self.verify_ms += verify_ms
        self.tokens_per_step[len(new_tokens)] = self.tokens_per_step.get(len(new_tokens), 0) + 1
        for node in accepted[1 : len(new_tokens)]:
            name = Source(int(tree.sources[node])).name.lower()
            self.accepted_by_source[name] = self.accepted_by_source.get(name, 0) + 1
        for source, count in zip(*np.unique(tree.sources[1:], return_counts=True)):
            name = Source(int(source)).name.lower()
            self.drafted_by_source[name] = self.drafted_by_source.get(name, 0) + int(count)

    def to_dict(self) -> dict:
        return {
            "new_tokens": self.new_tokens,
            "steps": self.steps,
            "mean_accepted": round(self.mean_accepted, 4),
            "tokens_per_second": round(self.tokens_per_second, 3),
            "drafted_nodes": self.drafted_nodes,
            "draft_ms_per_step": round(self.draft_ms / max(self.steps, 1), 4),
            "verify_ms_per_step": round(self.verify_ms / max(self.steps, 1), 4),
            "observe_ms_per_step": round(self.observe_ms / max(self.steps, 1), 4),
            "prefill_ms": round(self.prefill_ms, 3),
            "total_ms": round(self.total_ms, 3),
            **({"seed": list(self.seed) if isinstance(self.seed, tuple) else self.seed} if self.seed is not None
               else {}),
            "paused_steps": self.paused_steps,
            "tokens_per_step": {str(k): v for k, v in sorted(self.tokens_per_step.items())},
            "accepted_by_source": dict(sorted(self.accepted_by_source.items())),
            "drafted_by_source": dict(sorted(self.drafted_by_source.items())),
        }


@dataclass(frozen=True)
class GenerationResult:
    """Output of one row: the new tokens (prompt excluded), their text, and counters."""

    tokens: np.ndarray
    text: str
    stats: GenerationStats


@dataclass(frozen=True)
class BatchResult:
    """The rows of one batch, in input order, and the batch's own counters."""

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


class SpeculativeGenerator:
    """Lossless speculative decoding of one Hugging Face causal LM with any set of drafters, for any batch.

    Args:
        model: a causal LM of a supported family (``retrieval_spec.families``).
        tokenizer: its tokenizer (text prompts, stop strings, decoding the output).
        drafters: sources of draft trees, each serving every row; none means plain decoding through the same
            loop. What they learn (acceptance rates, tables, pools) carries over from call to call.
        cost_curve: a fixed cost of verifying k nodes per row (tests, forced benchmarks). When omitted the cost is
            probed once per batch size (and cached on disk), then learned from every real step (``CostModel``;
            the corrected curve is cached for the next run), and each row drafts only while drafting pays
            (``SpeedGuard``).
        cross_path: rows that share a prompt also draft from each other's output (``CrossPathDrafter``).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        drafters: Sequence[Drafter] = (),
        cost_curve: CostCurve | None = None,
        cross_path: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.verifier = Verifier(model)
        vocab_size = int(model.config.get_text_config(decoder=True).vocab_size)
        sources = list(drafters) + ([CrossPathDrafter()] if drafters and cross_path else [])
        self.fuser = TreeFuser(sources, cost_curve or CostCurve.flat(1), vocab_size)
        self.top_k = max((drafter.top_k for drafter in sources), default=0)
        self._cost_curve = cost_curve
        self._costs: dict[int, CostModel] = {}  # per batch size, when self-tuning
        self._requests = itertools.count()

    def encode(self, prompt: str) -> np.ndarray:
        """Token ids of a prompt as given (no special tokens added: chat templates carry their own)."""
        return encode(self.tokenizer, prompt)

    def generate(
        self,
        prompt: str | np.ndarray,
        config: GenerationConfig = GenerationConfig(),
        references: Sequence[str | np.ndarray] = (),
        on_tokens: Callable[[int, np.ndarray], None] | None = None,
    ) -> GenerationResult:
        """Decode a continuation of one prompt (a batch of one; see :meth:`generate_batch`)."""
        return self.generate_batch([prompt], config, references, on_tokens=on_tokens).rows[0]

    def generate_batch(
        self,
        prompts: Sequence[str | np.ndarray],
        config: GenerationConfig = GenerationConfig(),
        references: Sequence[str | np.ndarray] = (),
        seeds: Sequence[Seed] | None = None,
        on_tokens: Callable[[int, np.ndarray], None] | None = None,
    ) -> BatchResult:
        """Decode one continuation per prompt, together.

        For N samples of one prompt pass it N times (with ``temperature > 0``: greedy rows would be equal).

        Args:
            prompts: texts (tokenized without added special tokens) or (p,) token ids.
            config: limits and sampling.
            references: documents every row may copy from (retrieved passages, the article to summarise).
            seeds: one sampler seed per row. By default row ``b`` of several takes ``(config.seed, b)`` and a
                single row ``config.seed``; without ``config.seed`` each row draws fresh entropy.
            on_tokens: called after every step with (row index, the tokens it gained), for streaming.

        Raises:
            InputError: an empty prompt, or one too long for the model's context.
        """
        ids = [encode(self.tokenizer, p) for p in prompts]
        if not ids:
            return BatchResult(rows=[], forwards=0, total_ms=0.0)
        for prompt_ids in ids:
            check_fits(self.verifier.layout.context_limit, len(prompt_ids), config.max_new_tokens)
        reference_ids = [encode(self.tokenizer, r) for r in references if len(r)]
        if seeds is not None and len(seeds) != len(ids):
            raise InputError(f"{len(seeds)} seeds for {len(ids)} prompts")
        costs = self._cost_model(len(ids))  # probed before the clock starts; None: a fixed curve
        self.fuser.cost_curve = self._cost_curve or (costs.curve() if costs else CostCurve.flat(1))
        sampler = Sampler.from_config(config)
        ends = _Ends(eos_token_ids(self.model, config),
                     StopStrings(self.tokenizer, config.stop_strings) if config.stop_strings else None)
        rows = [_Row(b, next(self._requests), prompt, config, None if sampler.greedy else _row_seed(config, seeds, b,
                len(ids))) for b, prompt in enumerate(ids)]
        started = time.perf_counter()
        for row in rows:
            self.fuser.start(row.request, row.prompt, reference_ids)
        alive, forwards, prefill_ms = list(rows), 0, 0.0
        try:
            while alive:
                first = forwards == 0  # the prefill, which also verifies the first tree
                whole_batch = len(alive) == len(rows)  # only such a step times the batch's curve, so only it explores
                step = self._step(alive, config.tree_budget, sampler, costs if whole_batch else None, ends, first)
                forwards += 1
                if first:
                    prefill_ms = (time.perf_counter() - started) * 1e3
                for row, outcome in zip(alive, step.rows):  # 5. observe: extend, teach the drafters, count, stream
                    observe_started = time.perf_counter()
                    row.append(outcome.new_tokens)
                    self.fuser.observe(row.request, outcome.feedback)
                    observe_ms = (time.perf_counter() - observe_started) * 1e3
                    row.stats.observe_ms += observe_ms
                    row.stats.count_step(outcome.feedback.tree, outcome.feedback.accepted_nodes, outcome.new_tokens,
                                         step.draft_ms / len(alive) + observe_ms, 0.0 if first else step.verify_ms)
                    if on_tokens is not None:
                        on_tokens(row.index, outcome.new_tokens)
                if costs is not None and not first:  # 6. tune: the step's cost, and whether drafting paid per row
                    self._tune(costs, step, alive, whole_batch)
                alive = [row for row, outcome in zip(alive, step.rows) if not outcome.done]
        finally:
            for row in rows:
                self.fuser.finish(row.request)
        if costs is not None and costs.observed.any():
            store_cost_curve(self.model, CostProbe(batch=len(ids)), costs.curve())
        total_ms = (time.perf_counter() - started) * 1e3
        results = []
        for row in rows:
            row.stats.total_ms, row.stats.prefill_ms = total_ms, prefill_ms
            text = self.tokenizer.decode(row.output, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            results.append(GenerationResult(tokens=row.output.copy(), text=text, stats=row.stats))
        return BatchResult(rows=results, forwards=forwards, total_ms=total_ms)

    def _step(self, alive: list[_Row], budget: int, sampler: Sampler, explorer: CostModel | None, ends: _Ends,
              first: bool) -> _Step:
        """Draft, verify, accept and commit one step of every alive row; the ``first`` is the prefill's forward.
        ``explorer``: the cost model that may pick a size to time instead of the drafted one (None: no exploring)."""
        started = time.perf_counter()
        drafts, run = self._draft(alive, budget, explorer, first)
        drafted = time.perf_counter()
        # 2. Verify every row's tree in one forward (the first: in the prefill's).
        results = (self.verifier.start(drafts, sampler, self.top_k) if first
                   else self.verifier.verify(drafts, sampler, self.top_k, run))
        forward_ms = (time.perf_counter() - drafted) * 1e3
        # 3. Accept the longest agreeing path, cut at EOS, a stop string or the token limit.
        outcomes = []
        for row, draft, result in zip(alive, drafts, results):
            accepted, new_tokens = accept(draft.tree, result.node_tokens)
            new_tokens, done = row.cut(new_tokens, ends)
            feedback = StepFeedback(tree=draft.tree, accepted_nodes=accepted, new_tokens=new_tokens,
                                    top_tokens=result.top_tokens, branch_tokens=result.branch_tokens)
            outcomes.append(_Outcome(new_tokens, done, feedback))
        # 4. Commit the accepted entries of the rows that go on.
        going = [i for i, outcome in enumerate(outcomes) if not outcome.done]
        if going:
            self.verifier.commit([outcome.feedback.accepted_nodes for outcome in outcomes])
            if len(going) < len(alive):
                self.verifier.keep_rows(np.array(going))
        finished = time.perf_counter()
        return _Step(outcomes, run, draft_ms=(drafted - started) * 1e3, forward_ms=forward_ms,
                     verify_ms=(finished - drafted) * 1e3, started=started)

    def _draft(self, alive: list[_Row], budget: int, explorer: CostModel | None,
               first: bool) -> tuple[list[RowDraft], int]:
        """1. Draft: every row's candidates, cut to one size for the batch (every row pays for the largest); the
        drafts and the nodes per row the forward will run. The ``first`` step's trees ride on the prefill: sized
        on the same curve (a prefill's extra rows cost less: the cut is cautious there), no branch, no
        exploration."""
        for row in alive:
            row.stats.paused_steps += not row.guard.drafting
        ranked = [self.fuser.rank(r.request, r.context, budget if r.guard.drafting else 0, r.remaining - 1)
                  for r in alive]
        branches = [None if first else self._branch(i, r) for i, r in enumerate(alive)]
        fixed = 1 + max((len(b) for b in branches if b is not None), default=0)
        size = best_batch_size([t.scores[1:] for t in ranked], self.fuser.cost_curve, fixed)
        drafts = [RowDraft(t.head(1 + size), b, r.context, r.node_uniforms(t.head(1 + size)))
                  for t, b, r in zip(ranked, branches, alive)]
        needed = max(len(d.tree) + (0 if d.branch is None else len(d.branch)) for d in drafts)
        run = self.fuser.cost_curve.padded_size(needed)
        if not first and explorer is not None and (explored := explorer.explore(run, needed)) != run:
            if explored == 1:  # measure a plain step
                drafts = [RowDraft(d.tree.head(1), None, d.context, None if d.uniforms is None else d.uniforms[:1])
                          for d in drafts]
            run = explored
        return drafts, run

    def _tune(self, costs: CostModel, step: _Step, alive: list[_Row], whole_batch: bool) -> None:
        """Learn the step's forward cost (the curve is the whole batch's), and let each row's guard judge whether
        its drafting paid: its tokens in the step's wall time, against a plain step's time."""
        if whole_batch:
            costs.observe(step.run, step.forward_ms)
            self.fuser.cost_curve = costs.curve()
        wall_ms = (time.perf_counter() - step.started) * 1e3
        if whole_batch and step.run == 1:  # verified no draft: without its drafting, what a plain step costs
            costs.observe_plain_step(wall_ms - step.draft_ms)
        plain_step_ms = costs.plain_step_ms(self.fuser.cost_curve.ms[0] + wall_ms - step.draft_ms - step.forward_ms)
        for row, outcome in zip(alive, step.rows):
            row.guard.record(len(outcome.new_tokens), wall_ms, plain_step_ms)

    def _branch(self, index: int, row: _Row) -> Branch | None:
        """The row's look-ahead branch this step, when one pays and every node has a position the model can embed."""
        branch = self.fuser.branch(row.request, row.context)
        if branch is None or not self.verifier.fits(index, int(branch.offsets.max(initial=0))):
            return None
        return branch

    def tuning_report(self) -> dict:
        """What the generator learned, as JSON: per batch size the cost curve now used (ms per node count, and how
        many steps measured each size), and per source its acceptance rates by matched length and by depth."""
        return {
            "cost_curves": {str(batch): {"sizes": model.prior.sizes.tolist(),
                                         "ms": [round(float(ms), 3) for ms in model.curve().ms],
                                         "probed_ms": [round(float(ms), 3) for ms in model.prior.ms],
                                         "observed_steps": model.steps.tolist()}
                            for batch, model in self._costs.items()},
            "acceptance": self.fuser.acceptance.summary(),
        }

    def _cost_model(self, batch: int) -> CostModel | None:
        """The learned cost of this batch size (probed the first time), or None when the curve is fixed."""
        if self._cost_curve is not None or not self.fuser.drafters:
            return None
        if batch not in self._costs:
            self._costs[batch] = CostModel(cached_cost_curve(self.model, CostProbe(batch=batch)))
        return self._costs[batch]


@dataclass(frozen=True)
class _Ends:
    """What ends a row: an EOS token, or a stop string (the token limit is the row's own)."""

    eos: frozenset[int]
    stop_strings: StopStrings | None


@dataclass(frozen=True)
class _Outcome:
    """One row's step: the tokens it gained (cut), whether it is done, and what the drafters learn from it."""

    new_tokens: np.ndarray
    done: bool
    feedback: StepFeedback


@dataclass(frozen=True)
class _Step:
    """One step of the batch: per row outcomes (alive rows' order), the nodes per row the forward ran, and times:
    drafting, the forward alone, and verification (forward, acceptance and commit), in ms since ``started``."""

    rows: list[_Outcome]
    run: int
    draft_ms: float
    forward_ms: float
    verify_ms: float
    started: float


class _Row:
    """One row's state during a batch: its context buffer, sampler uniforms and counters."""

    def __init__(self, index: int, request: int, prompt: np.ndarray, config: GenerationConfig,
                 seed: Seed | None) -> None:
        self.index, self.request, self.prompt = index, request, prompt
        self.buffer = np.zeros(len(prompt) + config.max_new_tokens, dtype=np.int32)
        self.buffer[: len(prompt)] = prompt
        self.length = len(prompt)
        self.uniforms = None if seed is None else np.random.default_rng(seed).random(config.max_new_tokens)
        self.stats = GenerationStats(seed=seed)
        self.guard = SpeedGuard()

    @property
    def context(self) -> np.ndarray:
        return self.buffer[: self.length]

    @property
    def output(self) -> np.ndarray:
        return self.buffer[len(self.prompt) : self.length]

    @property
    def remaining(self) -> int:
        """Tokens the row may still gain."""
        return len(self.buffer) - self.length

    def node_uniforms(self, tree: DraftTree) -> np.ndarray | None:
        """(n,) the uniform of the output position each node's chosen token would fill (sampling only)."""
        if self.uniforms is None:
            return None
        return self.uniforms[len(self.output) + depths(tree.parents)]

    def cut(self, new_tokens: np.ndarray, ends: _Ends) -> tuple[np.ndarray, bool]:
        """Trim a step's tokens at EOS, the token limit or a stop string; say whether the row is done."""
        stops = ends.stop_strings
        for i, token in enumerate(new_tokens.tolist()):
            if token in ends.eos or i + 1 == self.remaining:
                return new_tokens[: i + 1], True
            if stops is not None and stops.hit(np.concatenate([self.output[-stops.window :], new_tokens[: i + 1]])):
                return new_tokens[: i + 1], True
        return new_tokens, False

    def append(self, new_tokens: np.ndarray) -> None:
        self.buffer[self.length : self.length + len(new_tokens)] = new_tokens
        self.length += len(new_tokens)


class StopStrings:
    """Whether an output has just completed a stop string: a function of the output alone, so a step that gains
    many tokens stops exactly where steps of one token would.

    The text checked is the decoding of the output's last ``len(stop) + 8`` tokens (every token decodes to at
    least one character, so the window holds any occurrence that ends in the newest token).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop_strings: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.window = max(len(s) for s in self.stop_strings) + 8

    def hit(self, output: np.ndarray) -> bool:
        """Whether the text of ``output``'s last :attr:`window` tokens holds a stop string."""
        tail = output[-self.window :]
        text = self.tokenizer.decode(tail, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return any(stop in text for stop in self.stop_strings)


def _row_seed(config: GenerationConfig, seeds: Sequence[Seed] | None, index: int, batch: int) -> Seed:
    if seeds is not None:
        return seeds[index]
    if config.seed is None:
        return int(np.random.SeedSequence().entropy)
    if batch == 1:
        return config.seed
    return (*(config.seed if isinstance(config.seed, tuple) else (config.seed,)), index)


def encode(tokenizer: PreTrainedTokenizerBase, prompt: str | np.ndarray) -> np.ndarray:
    """(p,) int32 token ids of a text prompt as given (no special tokens added: chat templates carry their own),
    or of ids passed through; InputError when empty."""
    ids = (
        np.asarray(tokenizer(prompt, add_special_tokens=False)["input_ids"], dtype=np.int32)
        if isinstance(prompt, str)
        else np.asarray(prompt, dtype=np.int32)
    )
    if len(ids) == 0:
        raise InputError("the prompt is empty")
    return ids


def eos_token_ids(model: PreTrainedModel, config: GenerationConfig) -> frozenset[int]:
    """The tokens that end a row: the config's, else the model's generation config's."""
    eos = config.eos_token_ids if config.eos_token_ids is not None else model.generation_config.eos_token_id
    return frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)


def check_fits(context_limit: int | None, prompt_len: int, max_new_tokens: int) -> None:
    """Raise InputError when the prompt plus ``max_new_tokens`` exceeds the model's context (``AttentionLayout``)."""
    limit = context_limit
    if limit is not None and prompt_len + max_new_tokens > limit:
        raise InputError(
            f"prompt of {prompt_len} tokens plus max_new_tokens={max_new_tokens} exceeds the "
            f"model's context of {limit} tokens"
        )
