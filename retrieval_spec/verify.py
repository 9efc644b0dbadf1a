"""The model verifier: the only code that runs the target model (the :class:`~retrieval_spec.verifier.Verifier`
the loop is handed when it is given a transformers model).

One forward scores every row's :class:`~retrieval_spec.tree.DraftTree` (and look-ahead :class:`Branch`) on
top of the rows' key/value cache with tree attention — a 4-D additive mask plus one position id per node — and
:class:`Sampler` turns the logits into each node's target token (argmax, or an inverse-CDF draw after the
processors). That is the one host boundary: a step's results cross to numpy in a single transfer. Acceptance
itself (:mod:`retrieval_spec.acceptance`) and the cache's bookkeeping (:mod:`retrieval_spec.kv_cache`) follow.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterator

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from . import costs
from .config import GenerationConfig
from .errors import UnsupportedModelError
from .families import AttentionLayout, attention_layout
from .kv_cache import TreeCache
from .linear_forms import FewRowLinear
from .sizing import CostCurve
from .tree import DraftTree, ancestor_mask
from .verifier import PhaseTimer, RowDraft, RowResult


GQA_SWITCH = "TRANSFORMERS_SDPA_FORCE_GQA"  # read by transformers' SDPA attention at every call

# From this many tokens of context a branching first tree is verified in a forward of its own after the prompt's
# causal one: a mask over every token of the prompt costs more than that forward. Measured on the 2-core AMD EPYC
# (an 8-node tree, best of three): SmolLM2-135M 0.84 s in one forward against 0.90 split at 512 tokens, 1.87 against
# 1.77 at 1,024, 4.80 against 3.86 at 2,048; Qwen2.5-0.5B 2.76 against 2.87 at 512, 5.01 both at 1,024, 13.4
# against 11.9 at 2,048.
SPLIT_PREFILL_AT = 1024


@contextlib.contextmanager
def grouped_attention(device: torch.device, queries: int) -> Iterator[None]:
    """Inside, a CPU forward of ``queries`` > 1 tokens per row runs SDPA on the key/value heads (``enable_gqa``)
    instead of copying every cached key and value once per query head (transformers' ``repeat_kv``, its choice
    whenever a mask is given, which it must be for several new tokens). The same arithmetic (equal logits), minus
    a copy of the whole cache per layer and step: on SmolLM2 (3 key/value heads for 9) at 1,200 cached tokens a
    2-node step took 55 ms with the copy and 45 without, a plain one-token step 44. Not on CUDA, where SDPA falls
    back to its math kernel for a masked grouped call; nor for one token, which transformers already runs on
    the key/value heads (``enable_gqa`` without a mask, its query folded onto them with one). The switch is
    transformers' own environment variable, set for the call and restored after it."""
    if device.type != "cpu" or queries < 2 or GQA_SWITCH in os.environ:
        yield
        return
    os.environ[GQA_SWITCH] = "1"
    try:
        yield
    finally:
        os.environ.pop(GQA_SWITCH, None)


class Sampler:
    """How the target chooses a token at a node: its processed logits' argmax, or a draw from them.

    The processors are transformers' own, in ``generate()``'s order: repetition penalty (each node counting
    its own prefix: the row's context and the node's ancestors), then, when sampling, temperature, top-k,
    top-p and min-p. A draw is by inverse CDF with the uniform the row gives the node's output position.
    """

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0) -> None:
        self.greedy = temperature == 0
        self.repetition_penalty = repetition_penalty
        warpers = []
        if not self.greedy:
            if temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(temperature))
            if top_k > 0:
                warpers.append(TopKLogitsWarper(top_k))
            if top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p))
            if min_p > 0:
                warpers.append(MinPLogitsWarper(min_p))
        self.warpers = LogitsProcessorList(warpers)

    @classmethod
    def from_config(cls, config: GenerationConfig) -> Sampler:
        """The sampler a :class:`~retrieval_spec.config.GenerationConfig` asks for."""
        return cls(config.temperature, config.top_k, config.top_p, config.min_p, config.repetition_penalty)

    @property
    def plain_argmax(self) -> bool:
        """Whether the node tokens are the raw logits' argmax (no processor changes the choice)."""
        return self.greedy and self.repetition_penalty == 1.0

    def choose(self, logits: torch.Tensor, row: RowDraft) -> torch.Tensor:
        """(n, vocab) logits of the row's tree nodes -> (n,) the target's token after each node."""
        scores = logits.float()
        if self.repetition_penalty != 1.0:
            scores = self._penalize(scores, row)
        if self.greedy:
            return scores.argmax(dim=-1)
        probs = torch.softmax(self.warpers(None, scores), dim=-1)
        cdf = torch.cumsum(probs.double(), dim=-1)
        uniforms = torch.as_tensor(row.uniforms, dtype=torch.float64, device=cdf.device)
        drawn = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True)[:, 0]
        return drawn.clamp_(max=cdf.shape[-1] - 1)

    def _penalize(self, scores: torch.Tensor, row: RowDraft) -> torch.Tensor:
        """transformers' repetition penalty with every node's own prefix: context plus ancestors."""
        n, vocab = scores.shape
        seen = torch.zeros(vocab, dtype=torch.bool, device=scores.device)
        seen[torch.as_tensor(row.context, dtype=torch.long, device=scores.device)] = True
        seen = seen.repeat(n, 1)
        ancestors = ancestor_mask(row.tree.parents)  # (n, n): a node's path includes itself
        node, along = np.nonzero(ancestors)
        seen[torch.as_tensor(node, device=scores.device),
             torch.as_tensor(row.tree.tokens[along].astype(np.int64), device=scores.device)] = True
        penalized = torch.where(scores < 0, scores * self.repetition_penalty, scores / self.repetition_penalty)
        return torch.where(seen, penalized, scores)


class ModelVerifier:
    """Holds a transformers model and its rows' cache; one forward verifies a tree (and a branch) per row.

    Implements :class:`~retrieval_spec.verifier.Verifier`. Besides, :meth:`reset` and :meth:`rollback` let the
    cost probe (``costs.py``) time forwards without a batch.

    Args:
        model: a causal LM of a supported family (:func:`~retrieval_spec.families.attention_layout`); an
            unverified family is checked against plain forwards first (:meth:`self_check`).
        linear_forms: on a CPU, run few-row linear layers in the faster form (:mod:`retrieval_spec.linear_forms`).
    """

    def __init__(self, model: PreTrainedModel, linear_forms: bool = True) -> None:
        self.model = model
        self.layout: AttentionLayout = attention_layout(model)
        self.device, self.dtype = model.device, model.dtype
        self.vocab_size = int(model.config.get_text_config(decoder=True).vocab_size)
        eos = model.generation_config.eos_token_id
        self.eos_token_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
        self.context_limit = self.layout.context_limit
        self.cache = TreeCache()
        self.forms = FewRowLinear(model, enabled=linear_forms and self.device.type == "cpu")
        self._sampler, self._top_k = Sampler(), 0
        if not self.layout.verified:
            self.self_check()

    @torch.inference_mode()
    def start(self, rows: list[RowDraft], config: GenerationConfig, top_k: int, timer: PhaseTimer) -> list[RowResult]:
        """Start B rows with their first step folded into the prefill: one forward per distinct prompt and tree.

        Each row's ``context`` is its whole prompt and its tree grows from the prompt's last token (no branch).
        The forward runs the prompt's other tokens causally and the tree's nodes under tree attention after
        them; those tokens are cached, the nodes wait for :meth:`commit` as after :meth:`verify`. So a reply of
        N tokens costs at most N forwards, as in ``generate()``, not a prefill plus N steps, and a first draft
        rides on the prefill (a prompt of :data:`SPLIT_PREFILL_AT` tokens or more whose first tree branches takes
        one forward more, :meth:`_prefill_one`). Rows that share a prompt and a tree share its forward (each draws
        its own tokens).
        """
        self._sampler, self._top_k = Sampler.from_config(config), top_k
        logits = self._prefill([row.context for row in rows], [row.tree for row in rows])
        results = self._results(logits, rows)
        timer.lap("forward")
        return results

    @torch.inference_mode()
    def reset(self, prompts: list[np.ndarray]) -> None:
        """Start B rows without a first step: cache every prompt token but the last (each row's first root), so
        that :meth:`verify` can score any tree from there (the cost probe, the self-check), greedily."""
        self._sampler, self._top_k = Sampler(), 0
        self._prefill([np.asarray(p[:-1], dtype=np.int32) for p in prompts], None)

    def _prefill(self, sequences: list[np.ndarray], trees: list[DraftTree] | None) -> torch.Tensor | None:
        """Prefill each distinct sequence (and tree) once, alone, and load the rows' cache.

        Without ``trees`` every token is context. With them each sequence ends at its row's root: the tokens
        before it are context and the tree's nodes are appended (``TreeCache.load_rows``).

        Returns:
            with ``trees``, (B, T, vocab) logits of every row's nodes (T: the largest tree; a smaller tree's
            extra rows are zeros), else None.
        """
        keys = [np.asarray(s, dtype=np.int32).tobytes() + (b"" if trees is None else
                                                            trees[b].tokens.tobytes() + trees[b].parents.tobytes())
                for b, s in enumerate(sequences)]
        distinct: dict[bytes, int] = {}
        rows = [distinct.setdefault(key, len(distinct)) for key in keys]
        firsts = [rows.index(i) for i in range(len(distinct))]
        prefixes = [self._prefill_one(np.asarray(sequences[b], dtype=np.int64), None if trees is None else trees[b])
                    for b in firsts]
        self.cache.load_rows([p[0] for p in prefixes], [p[1] for p in prefixes], rows, [p[2] for p in prefixes])
        if trees is None:
            return None
        most = max(len(tree) for tree in trees)
        return torch.cat([torch.nn.functional.pad(prefixes[r][3], (0, 0, 0, most - prefixes[r][3].shape[1]))
                          for r in rows])

    def _prefill_one(self, sequence: np.ndarray, tree: DraftTree | None) -> tuple[DynamicCache | None, int, int, Any]:
        """One sequence's forward over an empty cache: (its cache or None when empty, tokens cached, of them the
        tree's nodes, the nodes' (1, n, vocab) logits or None). A tree that is a chain (the root alone, most
        often) extends the sequence under the model's own causal (and sliding-window) mask. Any other gets the
        mask :meth:`_attention` builds: over the whole sequence in the same forward when the context is shorter
        than :data:`SPLIT_PREFILL_AT`, else over the tree alone in a second forward after the context's causal one
        (a mask over every token of a long prompt costs more than that forward)."""
        ids = sequence if tree is None else np.concatenate([sequence[:-1], tree.tokens])
        if len(ids) == 0:
            return None, 0, 0, None
        cache, context = DynamicCache(), len(sequence) - 1
        if tree is None or _is_chain(tree.parents):
            logits = self._cached_forward(ids, cache, None, None, 1 if tree is None else len(tree))
        elif context >= SPLIT_PREFILL_AT:
            self._cached_forward(ids[:context], cache, None, None, 1)
            positions, mask = self._attention(np.array([context]), context, tree.depths[None],
                                              ancestor_mask(tree.parents)[None])
            logits = self._cached_forward(tree.tokens, cache, positions, mask, len(tree))
        else:
            visible = np.zeros((len(ids), len(ids)), dtype=bool)
            visible[:context, :context] = np.tri(context, dtype=bool)
            visible[context:, :context] = True
            visible[context:, context:] = ancestor_mask(tree.parents)
            offsets = np.concatenate([np.arange(context), context + tree.depths])
            positions, mask = self._attention(np.zeros(1, dtype=np.int64), 0, offsets[None], visible[None])
            logits = self._cached_forward(ids, cache, positions, mask, len(tree))
        return cache, len(ids), 0 if tree is None else len(tree), None if tree is None else logits

    def _cached_forward(self, ids: np.ndarray, cache: DynamicCache, positions: torch.Tensor | None, mask: Any,
                        keep: int) -> torch.Tensor:
        """(1, keep, vocab) logits of the last ``keep`` of ``ids`` run after ``cache`` (which they extend), under
        the given positions and mask (None: the model's own)."""
        extra = {} if mask is None else {"position_ids": positions, "attention_mask": mask}
        with grouped_attention(self.device, len(ids)):
            out = self.model(input_ids=torch.as_tensor(ids[None].astype(np.int64), device=self.device),
                             past_key_values=cache, use_cache=True, logits_to_keep=keep, **extra)
        return out.logits

    @torch.inference_mode()
    def verify(self, rows: list[RowDraft], run: int, timer: PhaseTimer) -> list[RowResult]:
        """Run every row's tree and branch in one forward of ``run`` nodes per row; the appended slots wait for
        :meth:`commit`. Nodes past a row's own are inert (no real node sees them): some sizes are faster than
        smaller ones on a machine (``CostCurve.padded_size``)."""
        inputs = self._step_inputs(rows, run)
        timer.lap("mask")
        results = self._results(self._logits(*inputs), rows)
        timer.lap("forward")
        return results

    @torch.inference_mode()
    def _logits(self, tokens: torch.Tensor, positions: torch.Tensor, mask: Any) -> torch.Tensor:
        """(B, T, vocab) logits of one forward over (B, T) nodes appended to the rows' cache."""
        with self.forms.applied(tokens.numel()), grouped_attention(self.device, tokens.shape[1]):
            out = self.model(input_ids=tokens, position_ids=positions, attention_mask=mask,
                             past_key_values=self.cache.cache, use_cache=True)
        return out.logits

    def _results(self, logits: torch.Tensor, rows: list[RowDraft]) -> list[RowResult]:
        """(B, T, vocab) logits of the rows' nodes -> per row its node tokens, top tokens and branch tokens, in one
        transfer of (B, T, 1 + [1] + k) integers: the chosen token, the argmax where a branch needs it, the top k."""
        best = logits.argmax(dim=-1)  # (B, T): branch tokens, and tree tokens when no processor changes them
        chosen = best
        if not self._sampler.plain_argmax:
            chosen = best.clone()
            for b, row in enumerate(rows):
                chosen[b, : len(row.tree)] = self._sampler.choose(logits[b, : len(row.tree)], row)
        branching = any(row.branch is not None for row in rows)
        parts = [chosen[..., None]] + ([best[..., None]] if branching else [])
        if self._top_k:
            parts.append(logits.topk(self._top_k, dim=-1).indices)
        host = (torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]).cpu().numpy().astype(np.int32)
        top = 1 + branching
        results = []
        for b, row in enumerate(rows):
            n, m = len(row.tree), 0 if row.branch is None else len(row.branch)
            results.append(RowResult(node_tokens=host[b, :n, 0], top_nodes=np.arange(n, dtype=np.int64),
                                     top_tokens=host[b, :n, top:],
                                     branch_tokens=host[b, n : n + m, 1] if m else np.zeros(0, np.int32)))
        return results

    def commit(self, accepted: list[np.ndarray]) -> None:
        """Keep each row's accepted nodes after its context (``TreeCache.commit``)."""
        self.cache.commit(accepted)

    def rollback(self) -> None:
        """Forget the last forward's nodes (a cost probe's)."""
        self.cache.rollback()

    def keep_rows(self, rows: np.ndarray) -> None:
        """Keep only these rows of the batch, in this order."""
        self.cache.keep_rows(rows)

    def fits(self, row: int, depth: int) -> bool:
        """Whether a node ``depth`` positions after row ``row``'s root has a position the model can embed."""
        limit = self.layout.max_positions
        return limit is None or int(self.cache.lengths[row]) + depth < limit

    def cost_prior(self, batch: int) -> CostCurve:
        """The cost of verifying k nodes in each of ``batch`` rows: stored for this machine, else probed now."""
        return costs.cached_cost_curve(self, costs.CostProbe.fitting(self.layout.max_positions, batch))

    def store_costs(self, batch: int, curve: CostCurve) -> None:
        """Store a learned curve as this machine's (``costs.store_cost_curve``)."""
        costs.store_cost_curve(self, costs.CostProbe.fitting(self.layout.max_positions, batch), curve)

    def _step_inputs(self, rows: list[RowDraft], run: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Input ids (B, T), position ids (B, T) and the attention mask of every row's nodes, padded to
        T = max(run, largest row) nodes per row.

        One row whose nodes form a chain (the root alone, most often: a plain step) needs no mask of ours: its
        cache holds its context alone, so the model's own causal (and sliding-window) masking is the tree's,
        padding nodes after the chain see it but are seen by none of it, and a one-token step runs with no mask
        at all, as in ``generate()``.
        """
        batch, num = len(rows), max(run, max(row.num_nodes for row in rows))
        if batch == 1 and rows[0].branch is None and _is_chain(rows[0].tree.parents):
            tree, length = rows[0].tree, int(self.cache.lengths[0])
            tokens = np.full((1, num), tree.tokens[0], dtype=np.int64)
            tokens[0, : len(tree)] = tree.tokens
            positions = np.full((1, num), length, dtype=np.int64)  # padding at the root's: inside any table
            positions[0, : len(tree)] += np.arange(len(tree))
            return (torch.as_tensor(tokens, device=self.device), torch.as_tensor(positions, device=self.device),
                    None)
        tokens = np.zeros((batch, num), dtype=np.int64)
        offsets = np.zeros((batch, num), dtype=np.int64)  # position after the root's
        visible = np.zeros((batch, num, num), dtype=bool)  # among the step's nodes
        visible[:] = np.eye(num, dtype=bool)  # inert padding nodes see the context and themselves
        for b, row in enumerate(rows):
            n = len(row.tree)
            tokens[b] = row.tree.tokens[0]
            tokens[b, :n] = row.tree.tokens
            offsets[b, :n] = row.tree.depths
            visible[b, :n, :n] = ancestor_mask(row.tree.parents)
            if row.branch is not None:
                m = len(row.branch)
                tokens[b, n : n + m] = row.branch.tokens
                offsets[b, n : n + m] = row.branch.offsets
                visible[b, n : n + m, 0] = True  # the root
                visible[b, n : n + m, n : n + m] = row.branch.visible
        positions, mask = self._attention(self.cache.lengths, self.cache.width, offsets, visible)
        return torch.as_tensor(tokens, device=self.device), positions, mask

    def _attention(self, lengths: np.ndarray, width: int, offsets: np.ndarray,
                   visible: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | dict[str, torch.Tensor]]:
        """Position ids and the ``attention_mask`` argument of T nodes per row appended after the rows' cache.

        Args:
            lengths: (B,) cached context of each row (slots ``[0, lengths[b])`` of ``width``).
            width: cached slots per row.
            offsets: (B, T) each node's position after its row's context.
            visible: (B, T, T) which nodes each node sees (itself and its ancestors).

        Returns:
            (B, T) positions, and one additive mask (B, 1, T, width + T), or one per layer type.
        """
        device, num = self.device, offsets.shape[1]
        positions = torch.as_tensor(lengths[:, None] + offsets, device=device)
        slot = torch.arange(width, device=device)
        context = (slot[None, None, :] < torch.as_tensor(lengths, device=device)[:, None, None]).expand(-1, num, -1)
        tree = torch.as_tensor(visible, device=device)
        masks = {"full_attention": self._additive(torch.cat([context, tree], dim=-1))}
        window = self.layout.sliding_window
        if window is not None:
            offsets_t = torch.as_tensor(offsets, device=device)
            near_context = positions[:, :, None] - slot[None, None, :] < window
            near_nodes = offsets_t[:, :, None] - offsets_t[:, None, :] < window
            sliding = torch.cat([context & near_context, tree & near_nodes], dim=-1)
            masks["sliding_attention"] = self._additive(sliding)
        if self.layout.per_layer_type:
            return positions, masks
        return positions, masks["sliding_attention" if window is not None else "full_attention"]

    def _additive(self, visible: torch.Tensor) -> torch.Tensor:
        """(B, q, k) bool visibility -> (B, 1, q, k) additive mask: 0 where visible, the dtype's minimum elsewhere."""
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        return mask[:, None]

    @torch.inference_mode()
    def self_check(self) -> None:
        """Refuse a model whose tree forward differs from plain forwards (run once for unverified families).

        A short random prompt, then a tree with two branches, one two deep, verified after the prompt and in its
        prefill: each node's logits must equal those of a plain forward over its own sequence, up to the dtype's
        precision.

        Raises:
            UnsupportedModelError: naming the model and the largest difference seen.
        """
        name = f"{type(self.model).__name__} (model_type {self.layout.model_type!r})"
        try:
            worst = self._largest_tree_difference()
        except Exception as error:  # noqa: BLE001 - any failure of an unverified family under a tree mask refuses it
            raise UnsupportedModelError(f"{name} fails under a tree mask ({type(error).__name__}: {error}); "
                                        "it is not supported") from None
        finally:
            self.cache = TreeCache()
        tolerance = 1e-3 if self.dtype == torch.float32 else 5e-2
        if not math.isfinite(worst) or worst > tolerance:
            raise UnsupportedModelError(f"{name} computes different logits under a tree mask than plain decoding "
                                        f"(relative difference {worst:.2g}); it is not supported")

    def _largest_tree_difference(self) -> float:
        """Largest difference, relative to the logits' scale, between a small tree's logits and plain forwards':
        the tree verified after a cached prompt, and the same tree in the prompt's prefill."""
        rng = np.random.default_rng(0)
        prompt = rng.integers(0, self.vocab_size, 12).astype(np.int32)
        tree = DraftTree(tokens=np.append(prompt[-1:], rng.integers(0, self.vocab_size, 3)).astype(np.int32),
                         parents=np.array([-1, 0, 0, 2], dtype=np.int32),
                         scores=np.ones(4, dtype=np.float32), sources=np.zeros(4, dtype=np.uint8))
        self.reset([prompt])
        after_prompt = self._logits(*self._step_inputs([RowDraft(tree, None, prompt)], 0))[0].float()
        in_prefill = self._prefill([prompt], [tree])[0].float()
        worst = 0.0
        for node in range(len(tree)):
            path = [node]
            while tree.parents[path[-1]] > 0:
                path.append(int(tree.parents[path[-1]]))
            sequence = np.concatenate([prompt, tree.tokens[path[::-1]] if node else []]).astype(np.int64)
            plain = self.model(input_ids=torch.as_tensor(sequence[None], device=self.device)).logits[0, -1].float()
            scale = max(float(plain.abs().max()), 1.0)
            for logits in (after_prompt, in_prefill):
                worst = max(worst, float((logits[node] - plain).abs().max()) / scale)
        return worst


def _is_chain(parents: np.ndarray) -> bool:
    """Whether a tree is a single path from its root (every node the child of the one before it)."""
    return bool(np.array_equal(parents, np.arange(-1, len(parents) - 1)))
