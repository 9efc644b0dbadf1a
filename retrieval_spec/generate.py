"""The decoding loop: draft → tree → verify → accept → compact → observe, until EOS or the token limit.

Greedy decoding (``temperature == 0``) accepts the longest path the target's argmax agrees with; sampling
accepts with the lossless rule of :func:`retrieval_spec.verify.sample_accept`. Either way the output is
distributed exactly as plain decoding of the same model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .costs import cached_cost_curve
from .drafters.base import Drafter, DraftTree, Source, StepFeedback
from .errors import InputError
from .fusion import TreeFuser
from .tree import CostCurve
from .verify import Sampler, TreeVerifier, accept


NO_TOP = np.zeros((0, 0), dtype=np.int32)  # top_tokens when no drafter asks for the target's top-k


@dataclass(frozen=True)
class GenerationConfig:
    """What to generate and how large a tree may grow.

    Attributes:
        max_new_tokens: stop after this many new tokens.
        tree_budget: most drafted nodes verified in one step; the cost curve usually picks fewer.
        stop_strings: stop once the decoded output contains one of these (the token completing it is kept).
        temperature: 0 decodes greedily; above 0 samples (losslessly) from the processed distribution.
        top_k: keep the k most likely tokens before sampling (0: all), as ``generate(top_k=...)``.
        top_p: keep the smallest set of tokens with this much probability (1.0: all), as ``generate(top_p=...)``.
        seed: seed of the sampler; the same seed, prompt and drafters give the same output.
    """

    max_new_tokens: int = 128
    tree_budget: int = 64  # upper bound only: best_size() picks the verified size from the cost curve
    stop_strings: tuple[str, ...] = ()
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise InputError("need temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.tree_budget < 0:
            raise InputError(f"tree_budget must be >= 0, got {self.tree_budget}")


@dataclass
class GenerationStats:
    """Counters of one generation. Times are wall-clock milliseconds."""

    new_tokens: int = 0
    steps: int = 0
    drafted_nodes: int = 0
    draft_ms: float = 0.0
    verify_ms: float = 0.0
    observe_ms: float = 0.0  # part of draft_ms: drafters learning from the step (recycling table update, top-k)
    prefill_ms: float = 0.0
    total_ms: float = 0.0
    tokens_per_step: dict[int, int] = field(default_factory=dict)  # histogram: tokens gained in a step -> steps
    accepted_by_source: dict[str, int] = field(default_factory=dict)  # drafted tokens accepted, per source

    @property
    def mean_accepted(self) -> float:
        """Mean tokens gained per verification step (1.0 is plain decoding)."""
        return self.new_tokens / max(self.steps, 1)

    @property
    def tokens_per_second(self) -> float:
        return 1e3 * self.new_tokens / max(self.total_ms, 1e-9)

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
            "tokens_per_step": {str(k): v for k, v in sorted(self.tokens_per_step.items())},
            "accepted_by_source": dict(sorted(self.accepted_by_source.items())),
        }


@dataclass(frozen=True)
class GenerationResult:
    """Output of one request: the new tokens (prompt excluded), their text, and counters."""

    tokens: np.ndarray
    text: str
    stats: GenerationStats


class SpeculativeGenerator:
    """Lossless speculative decoding of one Hugging Face causal LM with any set of drafters.

    Args:
        model: a causal LM (any ``transformers`` model that accepts a 4-D float ``attention_mask``).
        tokenizer: its tokenizer (for text prompts, stop strings and decoding the output).
        drafters: sources of draft trees; none means plain decoding through the same loop.
        cost_curve: cost of verifying k nodes on this machine; measured (and cached on disk) when omitted.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        drafters: Sequence[Drafter] = (),
        cost_curve: CostCurve | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        if cost_curve is None:
            cost_curve = cached_cost_curve(model) if drafters else CostCurve(np.array([1]), np.array([1.0]))
        self.fuser = TreeFuser(drafters, cost_curve)
        self.top_k = max((drafter.top_k for drafter in drafters), default=0)
        self.verifier = TreeVerifier(model)
        self.eos_token_ids = eos_token_ids(model)

    def encode(self, prompt: str) -> np.ndarray:
        """Token ids of a prompt as given (no special tokens added: chat templates carry their own)."""
        return encode(self.tokenizer, prompt)

    def generate(
        self,
        prompt: str | np.ndarray,
        config: GenerationConfig = GenerationConfig(),
        references: Sequence[str | np.ndarray] = (),
    ) -> GenerationResult:
        """Decode a continuation of ``prompt``.

        Args:
            prompt: text (tokenized without added special tokens) or (p,) token ids.
            config: limits.
            references: documents the output may copy from (retrieved passages, the article to summarise).

        Raises:
            InputError: empty prompt, or prompt plus ``max_new_tokens`` beyond the model's context.
        """
        prompt_ids = encode(self.tokenizer, prompt)
        check_fits(self.model, len(prompt_ids), config.max_new_tokens)
        reference_ids = [encode(self.tokenizer, r) for r in references if len(r)]
        sampler = Sampler(config) if config.temperature > 0 else None
        stats = GenerationStats()
        started = time.perf_counter()
        context = np.zeros(len(prompt_ids) + config.max_new_tokens, dtype=np.int32)
        context[: len(prompt_ids)] = prompt_ids
        length = len(prompt_ids)
        self.verifier.reset(prompt_ids)
        self.fuser.start(prompt_ids, reference_ids)
        stats.prefill_ms = (time.perf_counter() - started) * 1e3
        done = False
        while not done:
            t0 = time.perf_counter()
            remaining = len(context) - length
            tree = self.fuser.propose(context[:length], config.tree_budget, max_depth=remaining - 1)
            t1 = time.perf_counter()
            branch = self.fuser.branch
            size = len(tree) + (0 if branch is None else len(branch))
            logits = self.verifier.logits(tree, pad_to=self.fuser.cost_curve.padded_size(size), branch=branch)
            branch_tokens = logits[len(tree) :].argmax(dim=-1).numpy().astype(np.int32)
            logits = logits[: len(tree)]
            accepted, new_tokens = accept(tree, logits, sampler, length - len(prompt_ids))
            new_tokens, done = cut_at_stop(
                new_tokens, context[len(prompt_ids) : length], remaining, config, self.eos_token_ids, self.tokenizer
            )
            if not done:
                self.verifier.commit(accepted)
            t2 = time.perf_counter()
            context[length : length + len(new_tokens)] = new_tokens
            length += len(new_tokens)
            t3 = time.perf_counter()
            top = logits.topk(self.top_k, dim=-1).indices.numpy().astype(np.int32) if self.top_k else NO_TOP
            self.fuser.observe(StepFeedback(tree=tree, accepted_nodes=accepted, new_tokens=new_tokens, top_tokens=top,
                                            branch_tokens=branch_tokens))
            t4 = time.perf_counter()
            stats.observe_ms += (t4 - t3) * 1e3
            count_step(stats, tree, accepted, new_tokens, (t1 - t0) + (t4 - t2), t2 - t1)
        stats.total_ms = (time.perf_counter() - started) * 1e3
        output = context[len(prompt_ids) : length].copy()
        text = self.tokenizer.decode(output, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return GenerationResult(tokens=output, text=text, stats=stats)



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


def eos_token_ids(model: PreTrainedModel) -> frozenset[int]:
    """The tokens that end a generation, from the model's generation config."""
    eos = model.generation_config.eos_token_id
    return frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)


def check_fits(model: PreTrainedModel, prompt_len: int, max_new_tokens: int) -> None:
    """Raise InputError when the prompt plus ``max_new_tokens`` exceeds the model's context."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and prompt_len + max_new_tokens > limit:
        raise InputError(
            f"prompt of {prompt_len} tokens plus max_new_tokens={max_new_tokens} exceeds the "
            f"model's context of {limit} tokens"
        )


def cut_at_stop(
    new_tokens: np.ndarray,
    output: np.ndarray,
    remaining: int,
    config: GenerationConfig,
    eos_token_ids: frozenset[int],
    tokenizer: PreTrainedTokenizerBase,
) -> tuple[np.ndarray, bool]:
    """Trim a step's tokens at EOS, the token limit or a stop string; say whether decoding is done.

    Args:
        new_tokens: the tokens the step gained.
        output: the output before this step.
        remaining: how many tokens the output may still gain.
    """
    for i, token in enumerate(new_tokens.tolist()):
        if token in eos_token_ids or i + 1 == remaining or _hits_stop(output, new_tokens[: i + 1], config, tokenizer):
            return new_tokens[: i + 1], True
    return new_tokens, False


def _hits_stop(output: np.ndarray, tail: np.ndarray, config: GenerationConfig, tokenizer) -> bool:
    if not config.stop_strings:
        return False
    window = np.concatenate([output[-16:], tail])
    text = tokenizer.decode(window, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return any(stop in text for stop in config.stop_strings)


def count_step(
    stats: GenerationStats,
    tree: DraftTree,
    accepted: np.ndarray,
    new_tokens: np.ndarray,
    draft_seconds: float,
    verify_seconds: float,
) -> None:
    """Add one verification step to ``stats``."""
    stats.steps += 1
    stats.new_tokens += len(new_tokens)
    stats.drafted_nodes += len(tree) - 1
    stats.draft_ms += draft_seconds * 1e3
    stats.verify_ms += verify_seconds * 1e3
    stats.tokens_per_step[len(new_tokens)] = stats.tokens_per_step.get(len(new_tokens), 0) + 1
    for node in accepted[1 : len(new_tokens)]:
        name = Source(int(tree.sources[node])).name.lower()
        stats.accepted_by_source[name] = stats.accepted_by_source.get(name, 0) + 1
