"""The decoding loop, for any number of rows: one step after another until every row ends.

A step (:meth:`SpeculativeGenerator._step`) drafts, sizes, verifies, accepts, cuts, commits and observes, and
returns what every row gained; the loop around it only counts, streams and stops. The loop is handed the
:class:`~retrieval_spec.verifier.Verifier` it runs against (a model's, or a replay of recorded outputs) and the
clock it reads, so the replay of ``benchmarks/simulate.py`` is this loop. Pure numpy: torch is imported only by
the model verifier.

A single sequence is a batch of one. Each row has its own tree, positions, accepted length and cache length,
so its output is exactly what it would be alone: greedy rows equal plain greedy decoding, and a sampled row is
a function of its own seed, distributed as plain sampling (:mod:`retrieval_spec.acceptance`). Rows of one
prompt (self-consistency, best-of-N) are prefilled once and draft from each other's text.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .acceptance import accept
from .config import GenerationConfig, Seed
from .datastore.manifest import as_token_ids
from .drafters.base import Drafter
from .drafters.cross_path import CrossPathDrafter
from .errors import InputError
from .fusion import TreeFuser
from .sizing import BatchSizing, CostCurve, Sizer
from .tree import NUM_SOURCES, Branch, DraftTree, Source, StepFeedback
from .verifier import PhaseTimer, RowDraft, RowResult, Verifier

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DRAFTING_PHASES = ("draft", "size", "observe")  # the drafters' and the sizer's work in a step
VERIFYING_PHASES = ("mask", "forward", "accept", "commit")  # the verifier's, and acceptance


@dataclass
class GenerationStats:
    """Counters of one row. Times are milliseconds of the generator's clock; a batch's rows share its steps, so
    each row counts every step it ran whole. The first step is the prompt's forward (``prefill_ms``); the phase
    times count the steps after it.

    Phases of a step: ``draft`` (the drafters rank candidates), ``size`` (the sizer cuts and pads), ``mask``
    (the verifier's inputs and masks), ``forward`` (the model, the sampler and the one transfer), ``accept``,
    ``commit`` (the cache keeps the accepted entries), ``observe`` (the drafters and the sizer learn).
    """

    step_tokens: list[int] = field(default_factory=list)  # tokens gained by each step, in order
    drafted_nodes: int = 0
    phase_ms: dict[str, float] = field(default_factory=dict)
    prefill_ms: float = 0.0  # the first step: the prompt's forward, which also verifies the first tree
    total_ms: float = 0.0
    seed: Seed | None = None  # the sampler's seed (None when greedy): pass it back to reproduce the row
    paused_steps: int = 0  # steps that verified only confident drafts because drafting had stopped paying (SpeedGuard)
    accepted_by_source: dict[str, int] = field(default_factory=dict)  # drafted tokens accepted, per source
    drafted_by_source: dict[str, int] = field(default_factory=dict)  # drafted nodes verified, per source

    @property
    def steps(self) -> int:
        return len(self.step_tokens)

    @property
    def new_tokens(self) -> int:
        return sum(self.step_tokens)

    @property
    def tokens_per_step(self) -> dict[int, int]:
        """Histogram: tokens gained in a step -> steps."""
        return dict(sorted(Counter(self.step_tokens).items()))

    @property
    def mean_accepted(self) -> float:
        """Mean tokens gained per verification step (1.0 is plain decoding)."""
        return self.new_tokens / max(self.steps, 1)

    @property
    def tokens_per_second(self) -> float:
        return 1e3 * self.new_tokens / max(self.total_ms, 1e-9)

    @property
    def draft_ms(self) -> float:
        """Drafting, sizing and observing: everything the drafters and the sizer spent."""
        return sum(self.phase_ms.get(phase, 0.0) for phase in DRAFTING_PHASES)

    @property
    def verify_ms(self) -> float:
        """Masks, forwards, acceptance and commits."""
        return sum(self.phase_ms.get(phase, 0.0) for phase in VERIFYING_PHASES)

    @property
    def observe_ms(self) -> float:
        return self.phase_ms.get("observe", 0.0)

    def count_step(self, feedback: StepFeedback, timer: PhaseTimer, first: bool) -> None:
        """Add one verification step: its tree, what it gained and (after the first) its phase times."""
        tree, new_tokens = feedback.tree, feedback.new_tokens
        self.step_tokens.append(len(new_tokens))
        self.drafted_nodes += len(tree) - 1
        if first:
            self.prefill_ms = timer.total()
        else:
            for phase, ms in timer.ms.items():
                self.phase_ms[phase] = self.phase_ms.get(phase, 0.0) + ms
        for node in feedback.accepted_nodes[1 : len(new_tokens)]:
            name = Source(int(tree.sources[node])).name.lower()
            self.accepted_by_source[name] = self.accepted_by_source.get(name, 0) + 1
        if len(tree) > 1:
            counts = np.bincount(tree.sources[1:], minlength=NUM_SOURCES).tolist()
            for source, count in enumerate(counts):
                if count:
                    name = Source(source).name.lower()
                    self.drafted_by_source[name] = self.drafted_by_source.get(name, 0) + count

    def to_dict(self) -> dict:
        steps = max(self.steps, 1)
        return {
            "new_tokens": self.new_tokens,
            "steps": self.steps,
            "mean_accepted": round(self.mean_accepted, 4),
            "tokens_per_second": round(self.tokens_per_second, 3),
            "drafted_nodes": self.drafted_nodes,
            "draft_ms_per_step": round(self.draft_ms / steps, 4),
            "verify_ms_per_step": round(self.verify_ms / steps, 4),
            "observe_ms_per_step": round(self.observe_ms / steps, 4),
            "phase_ms_per_step": {phase: round(ms / steps, 4) for phase, ms in self.phase_ms.items()},
            "prefill_ms": round(self.prefill_ms, 3),
            "total_ms": round(self.total_ms, 3),
            **({"seed": list(self.seed) if isinstance(self.seed, tuple) else self.seed} if self.seed is not None
               else {}),
            "paused_steps": self.paused_steps,
            "tokens_per_step": {str(k): v for k, v in self.tokens_per_step.items()},
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
    """Lossless speculative decoding against one verifier with any set of drafters, for any batch.

    Args:
        target: a transformers causal LM of a supported family (verified by
            :class:`~retrieval_spec.verify.ModelVerifier`), or any :class:`~retrieval_spec.verifier.Verifier`
            (:class:`~retrieval_spec.replay.ReplayVerifier`: recorded outputs, no model).
        tokenizer: text prompts, stop strings and the output's text; None when prompts are token ids (texts
            are then empty and stop strings refused).
        drafters: sources of draft trees, each serving every row; none means plain decoding through the same
            loop, sizer and verifier. What they learn (acceptance rates, tables, pools) carries over from call to
            call.
        cost_curve: a fixed cost of verifying k nodes per row (tests, forced benchmarks): nothing is learned and
            every row always drafts. When omitted the sizer starts each batch size from the verifier's prior
            (probed once and cached on disk for a model), learns from every real step, and each row drafts only
            while drafting pays (:class:`~retrieval_spec.sizing.Sizer`).
        cross_path: rows that share a prompt also draft from each other's output (``CrossPathDrafter``).
        clock: seconds, monotonic: what every time the loop measures is read from (a replay's cost clock).
    """

    def __init__(
        self,
        target: PreTrainedModel | Verifier,
        tokenizer: PreTrainedTokenizerBase | None = None,
        drafters: Sequence[Drafter] = (),
        cost_curve: CostCurve | None = None,
        cross_path: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not isinstance(target, Verifier):
            from .verify import ModelVerifier  # torch, for a model only

            target = ModelVerifier(target)
        self.verifier: Verifier = target
        self.tokenizer = tokenizer
        sources = list(drafters) + ([CrossPathDrafter()] if drafters and cross_path else [])
        self.fuser = TreeFuser(sources, self.verifier.vocab_size)
        self.sizer = Sizer(self.verifier, fixed=cost_curve)
        self.top_k = max((drafter.top_k for drafter in sources), default=0)
        self.clock = clock
        self._requests = itertools.count()

    def encode(self, prompt: str | np.ndarray) -> np.ndarray:
        """Token ids of a prompt as given (no special tokens added: chat templates carry their own)."""
        return encode(self.tokenizer, prompt, vocab_size=self.verifier.vocab_size)

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
            InputError: an empty prompt, one too long for the model's context, or stop strings without a tokenizer.
        """
        rows, ends, references_ids = self._rows(prompts, config, references, seeds)
        if not rows:
            return BatchResult(rows=[], forwards=0, total_ms=0.0)
        sizing = self.sizer.start(len(rows))  # a new batch size's cost curve is probed before the clock starts
        started, forwards = self.clock(), 0
        for row in rows:
            self.fuser.start(row.request, row.prompt, references_ids)
        alive = list(rows)
        try:
            while alive:
                outcomes, timer = self._step(alive, config, sizing, ends, first=forwards == 0)
                for row, outcome in zip(alive, outcomes):  # count, stream, stop
                    row.stats.count_step(outcome.feedback, timer, first=forwards == 0)
                    if on_tokens is not None:
                        on_tokens(row.index, outcome.feedback.new_tokens)
                alive = [row for row, outcome in zip(alive, outcomes) if not outcome.done]
                forwards += 1
        finally:
            for row in rows:
                self.fuser.finish(row.request)
            sizing.finish()
        total_ms = (self.clock() - started) * 1e3
        return BatchResult(rows=[row.result(self.tokenizer, total_ms) for row in rows], forwards=forwards,
                           total_ms=total_ms)

    def _rows(self, prompts: Sequence[str | np.ndarray], config: GenerationConfig,
              references: Sequence[str | np.ndarray], seeds: Sequence[Seed] | None
              ) -> tuple[list[_Row], _Ends, list[np.ndarray]]:
        """The batch's rows, what ends them and the references' ids, every input checked."""
        ids = encode_each(self.tokenizer, prompts, "prompt", self.verifier.vocab_size)
        for prompt_ids in ids:
            check_fits(self.verifier.context_limit, len(prompt_ids), config.max_new_tokens)
        if seeds is not None and len(seeds) != len(ids):
            raise InputError(f"{len(seeds)} seeds for {len(ids)} prompts")
        if config.stop_strings and self.tokenizer is None:
            raise InputError("stop strings need the model's tokenizer")
        eos = self.verifier.eos_token_ids if config.eos_token_ids is None else frozenset(config.eos_token_ids)
        ends = _Ends(eos, StopStrings(self.tokenizer, config.stop_strings) if config.stop_strings else None)
        greedy = config.temperature == 0
        rows = [_Row(b, next(self._requests), prompt, config,
                     None if greedy else _row_seed(config, seeds, b, len(ids))) for b, prompt in enumerate(ids)]
        return rows, ends, encode_each(self.tokenizer, references, "reference", self.verifier.vocab_size,
                                       skip_empty=True)

    def _step(self, alive: list[_Row], config: GenerationConfig, sizing: BatchSizing, ends: _Ends,
              first: bool) -> tuple[list[_Outcome], PhaseTimer]:
        """One step of every alive row; the ``first`` is the prompt's forward, which verifies the first trees.
        Returns each row's outcome (alive rows' order) and the step's phase times."""
        timer = PhaseTimer(self.clock)
        # 1. Draft: every row's ranked candidates and look-ahead branch (confident ones only where the guard paused).
        ranked, branches = self._draft(alive, config.tree_budget, sizing, first)
        timer.lap("draft")
        # 2. Size: one size for the batch (every row pays for the largest), padded, or a size to time.
        plan = sizing.plan([tree.scores[1:] for tree in ranked], [0 if b is None else len(b) for b in branches],
                           first)
        drafts = [_row_draft(row, tree.head(1 + plan.size), branch if plan.branches else None)
                  for row, tree, branch in zip(alive, ranked, branches)]
        timer.lap("size")
        # 3. Verify every row's tree in one forward (the first: the prompt's).
        results = (self.verifier.start(drafts, config, self.top_k, timer) if first
                   else self.verifier.verify(drafts, plan.run, timer))
        # 4. Accept the longest agreeing path; cut at EOS, a stop string or the token limit.
        outcomes = [_accepted(row, draft, result, ends) for row, draft, result in zip(alive, drafts, results)]
        timer.lap("accept")
        # 5. Commit the accepted entries of the rows that go on.
        going = [i for i, outcome in enumerate(outcomes) if not outcome.done]
        if going:
            self.verifier.commit([outcome.feedback.accepted_nodes for outcome in outcomes])
            if len(going) < len(alive):
                self.verifier.keep_rows(np.array(going))
        timer.lap("commit")
        # 6. Observe: the rows extend, the drafters and (from the step's times) the sizer learn.
        for row, outcome in zip(alive, outcomes):
            row.append(outcome.feedback.new_tokens)
        self.fuser.observe([row.request for row in alive], [outcome.feedback for outcome in outcomes])
        timer.lap("observe")
        sizing.learn(plan, timer, [len(o.feedback.new_tokens) for o in outcomes])
        timer.lap("observe")  # the sizer's learning, too
        return outcomes, timer

    def _draft(self, alive: list[_Row], budget: int, sizing: BatchSizing,
               first: bool) -> tuple[list[DraftTree], list[Branch | None]]:
        """Every row's ranked candidates and its look-ahead branch: only the confident candidates where the batch's
        guard paused drafting (``BatchSizing.floor``); no branch there, in the first step (the prompt's forward),
        where it does not pay, or where a node of it would lie beyond the positions the model can embed."""
        floor = sizing.floor
        ranked = self.fuser.rank([row.request for row in alive], [row.context for row in alive],
                                 [budget if np.isfinite(floor) else 0] * len(alive),
                                 [row.remaining - 1 for row in alive])
        branches = []
        for i, row in enumerate(alive):
            row.stats.paused_steps += floor > 0
            if floor > 0:  # scores are best first: the head of the candidates at least that likely
                ranked[i] = ranked[i].head(1 + int(np.count_nonzero(ranked[i].scores[1:] >= floor)))
            branch = None if first or floor > 0 else self.fuser.branch(row.request, row.context)
            if branch is not None and not (sizing.branch_pays(len(branch))
                                           and self.verifier.fits(i, int(branch.offsets.max(initial=0)))):
                branch = None
            branches.append(branch)
        return ranked, branches

    def tuning_report(self) -> dict:
        """What the generator learned, as JSON: per batch size the cost curve now used (ms per node count, and how
        many steps measured each size), and per source its acceptance rates by matched length and by depth."""
        return {"cost_curves": self.sizer.report(), "acceptance": self.fuser.acceptance.summary()}


def _row_draft(row: _Row, tree: DraftTree, branch: Branch | None) -> RowDraft:
    """A row's share of the step: its tree, branch, context and (sampling) the uniforms of its nodes' positions."""
    uniforms = None if row.uniforms is None else row.uniforms[len(row.output) + tree.depths]
    return RowDraft(tree, branch, row.context, uniforms)


def _accepted(row: _Row, draft: RowDraft, result: RowResult, ends: _Ends) -> _Outcome:
    """A row's outcome: the accepted path, its tokens cut at what ends the row, and what the drafters learn."""
    accepted, new_tokens = accept(draft.tree, result.node_tokens)
    new_tokens, done = row.cut(new_tokens, ends)
    feedback = StepFeedback(tree=draft.tree, accepted_nodes=accepted, new_tokens=new_tokens,
                            top_nodes=result.top_nodes, top_tokens=result.top_tokens,
                            branch_tokens=result.branch_tokens)
    return _Outcome(done, feedback)


@dataclass(frozen=True)
class _Ends:
    """What ends a row: an EOS token, or a stop string (the token limit is the row's own)."""

    eos: frozenset[int]
    stop_strings: StopStrings | None


@dataclass(frozen=True)
class _Outcome:
    """One row's step: whether it is done, and what it gained and the drafters learn (``feedback.new_tokens``)."""

    done: bool
    feedback: StepFeedback


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

    def result(self, tokenizer: Any, total_ms: float) -> GenerationResult:
        """The row's output, its text (empty without a tokenizer) and its counters."""
        self.stats.total_ms = total_ms
        text = "" if tokenizer is None else tokenizer.decode(self.output, skip_special_tokens=True,
                                                              clean_up_tokenization_spaces=False)
        return GenerationResult(tokens=self.output.copy(), text=text, stats=self.stats)


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


def encode(tokenizer: PreTrainedTokenizerBase | None, prompt: str | np.ndarray, what: str = "the prompt",
           vocab_size: int | None = None) -> np.ndarray:
    """(p,) int32 token ids of a text prompt as given (no special tokens added: chat templates carry their own),
    or of token ids passed through: a 1-D sequence of integers (below ``vocab_size`` when given).

    Raises:
        InputError: naming ``what``: empty, text without a tokenizer, ids of another shape or type (floats would
            be truncated), or outside the vocabulary.
    """
    if isinstance(prompt, str):
        if tokenizer is None:
            raise InputError(f"{what} is text, which needs the model's tokenizer; pass token ids")
        prompt = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = as_token_ids(prompt, vocab_size or 2**31, what)
    if len(ids) == 0:
        raise InputError(f"{what} is empty")
    return ids.astype(np.int32)


def encode_each(tokenizer: PreTrainedTokenizerBase | None, texts: Sequence[str | np.ndarray], what: str,
                vocab_size: int | None = None, skip_empty: bool = False) -> list[np.ndarray]:
    """:func:`encode` each of ``texts`` (a list or tuple; one text or array of ids is one), named ``what`` and its
    number in messages; with ``skip_empty``, empty ones are left out rather than refused."""
    if isinstance(texts, (str, np.ndarray)):
        texts = [texts]
    if not isinstance(texts, (list, tuple)):
        raise InputError(f"{what}s must be a list of texts or token-id arrays, got {type(texts).__name__}")
    return [encode(tokenizer, text, f"{what} {number}", vocab_size) for number, text in enumerate(texts)
            if not (skip_empty and isinstance(text, (str, list, tuple, np.ndarray)) and len(text) == 0)]


def check_fits(context_limit: int | None, prompt_len: int, max_new_tokens: int) -> None:
    """Raise InputError when the prompt plus ``max_new_tokens`` exceeds the model's context (``AttentionLayout``)."""
    limit = context_limit
    if limit is not None and prompt_len + max_new_tokens > limit:
        raise InputError(
            f"prompt of {prompt_len} tokens plus max_new_tokens={max_new_tokens} exceeds the "
            f"model's context of {limit} tokens"
        )
