"""Verification: the only place that runs the target model.

One forward pass scores a whole :class:`DraftTree` on top of the KV cache with tree attention (a 4-D float
mask plus per-node position ids); acceptance picks the longest path the target agrees with; compaction keeps
exactly that path's keys and values in the cache.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .drafters.base import Branch, DraftTree
from .tree import ancestor_mask, children_lists, depths


def greedy_accept(tree: DraftTree, target_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Longest root path whose every token equals the target's choice at its parent, plus the bonus token.

    Args:
        tree: the verified tree.
        target_tokens: (n,) the target's next token at every node (argmax of its logits).

    Returns:
        accepted_nodes: (m,) int32 node indices of the accepted path, root first.
        new_tokens: (m,) int32 the accepted drafted tokens followed by the bonus token.

    >>> t = DraftTree.from_paths(7, [np.array([1, 2]), np.array([3])], [np.array([.5, .4]), np.array([.3])], 1)
    >>> [a.tolist() for a in greedy_accept(t, np.array([1, 9, 5, 5]))]
    [[0, 1], [1, 9]]
    """
    kids = children_lists(tree.parents)
    node, path = 0, [0]
    while True:
        want = target_tokens[node]
        nxt = next((c for c in kids[node] if tree.tokens[c] == want), None)
        if nxt is None:
            break
        node = nxt
        path.append(node)
    accepted = np.array(path, dtype=np.int32)
    new_tokens = np.append(tree.tokens[accepted[1:]], target_tokens[node]).astype(np.int32)
    return accepted, new_tokens


class Sampler:
    """The target's processed sampling distribution, with Hugging Face's own warpers in generate()'s order."""

    def __init__(self, config) -> None:
        """``config``: a GenerationConfig; one uniform per output position is drawn up front from its seed."""
        warpers = [TemperatureLogitsWarper(config.temperature)]
        if config.top_k > 0:
            warpers.append(TopKLogitsWarper(config.top_k))
        if config.top_p < 1.0:
            warpers.append(TopPLogitsWarper(config.top_p))
        self.warpers = LogitsProcessorList(warpers)
        self.uniforms = np.random.default_rng(config.seed).random(config.max_new_tokens)

    def probs(self, logits: torch.Tensor) -> np.ndarray:
        """(n, vocab) logits -> (n, vocab) float64 probabilities."""
        scores = self.warpers(None, logits.float())
        return torch.softmax(scores, dim=-1).double().numpy()


def sample_accept(tree: DraftTree, probs: np.ndarray, uniforms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lossless acceptance of a deterministic draft tree under sampling.

    At the current node (depth d) the target's token is drawn by inverse CDF with ``uniforms[d]``; if a child
    carries it, the walk descends and repeats, otherwise that token is the bonus and the step ends. Each
    emitted token therefore has exactly the target's distribution given its prefix (ANCHORS.md, detail 3).
    This is the same law as trying the children in turn, accepting child x with probability q(x) and
    removing it from the renormalised residual q on rejection: the chance that child x is emitted is p(x)
    either way, and a non-child x is emitted with probability p(x). Drawing by inverse CDF from one uniform
    per output position makes the output a function of the seed alone, whatever the drafts: seeded runs
    reproduce exactly, with any drafter or none.

    Args:
        tree: the verified tree; siblings carry distinct tokens (DraftTree guarantees it).
        probs: (n, vocab) the target's processed next-token distribution at every node.
        uniforms: (at least max depth + 1,) uniforms in [0, 1) of the output positions this step can fill.

    Returns:
        accepted_nodes and new_tokens, as :func:`greedy_accept`.
    """
    kids = children_lists(tree.parents)
    node, path = 0, [0]
    while True:
        cdf = np.cumsum(probs[node], dtype=np.float64)
        token = min(int(np.searchsorted(cdf, uniforms[len(path) - 1] * cdf[-1], side="right")), len(cdf) - 1)
        child = next((c for c in kids[node] if tree.tokens[c] == token), None)
        if child is None:
            break
        node = child
        path.append(node)
    accepted = np.array(path, dtype=np.int32)
    return accepted, np.append(tree.tokens[accepted[1:]], token).astype(np.int32)


def accept(
    tree: DraftTree, logits: torch.Tensor, sampler: Sampler | None, position: int
) -> tuple[np.ndarray, np.ndarray]:
    """The step's acceptance: :func:`greedy_accept` without a sampler, else :func:`sample_accept`.

    Args:
        tree: the verified tree.
        logits: (n, vocab) the target's logits at its nodes.
        sampler: the request's sampler, or None for greedy decoding.
        position: how many tokens the output already holds (the first uniform this step uses).
    """
    if sampler is None:
        return greedy_accept(tree, logits.argmax(dim=-1).numpy())
    return sample_accept(tree, sampler.probs(logits), sampler.uniforms[position:])


class TreeVerifier:
    """Holds the model and its KV cache for one sequence and verifies draft trees against it.

    State: ``cached_len`` tokens of the context have keys/values in ``cache``; the newest context token (the
    next tree's root) never has. Call :meth:`reset` per request, then alternate :meth:`logits` and
    :meth:`commit`.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.device = model.device
        self.dtype = model.dtype
        self.cache = DynamicCache(config=model.config)
        self.cached_len = 0
        self._prefilled = np.zeros(0, dtype=np.int32)  # the tokens the current cache was prefilled with

    @torch.inference_mode()
    def reset(self, prompt: np.ndarray) -> None:
        """Start a sequence: cache every prompt token but the last, which becomes the first root.

        When the prompt is the one prefilled last (samples of one prompt), the cache is cut back to that
        prefill instead of recomputed: the same tensors, so the same results bit for bit.
        """
        prefix = np.asarray(prompt[:-1], dtype=np.int32)
        if len(prefix) and np.array_equal(prefix, self._prefilled) and self.cached_len >= len(prefix):
            self.cached_len = len(prefix)
            self.rollback()
            return
        self.cache = DynamicCache(config=self.model.config)
        self.cached_len = 0
        self._prefilled = prefix.copy()
        if len(prefix):
            ids = torch.as_tensor(prefix[None], dtype=torch.long, device=self.device)
            self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
            self.cached_len = len(prefix)

    @torch.inference_mode()
    def logits(self, tree: DraftTree, pad_to: int = 0, branch: Branch | None = None) -> torch.Tensor:
        """Run the model over every node of ``tree`` (and of ``branch``) in one forward pass.

        The nodes' keys and values are appended to the cache (call :meth:`commit` next, which keeps only
        accepted tree nodes).

        Args:
            tree: n nodes, root first.
            pad_to: run this many rows when larger than n + m: the extra rows are inert (no real node attends to
                them) and exist only because some row counts are faster than smaller ones on this machine.
            branch: m look-ahead nodes after the tree's, seeing the context and each other as ``branch.visible``
                says; no tree node sees them.

        Returns:
            (n + m, vocab) float32 logits; row ``i`` predicts the token after node ``i`` (tree nodes first).
        """
        n, m = len(tree), 0 if branch is None else len(branch)
        rows = max(n + m, pad_to)
        tokens = np.full(rows, tree.tokens[0], dtype=np.int32)
        tokens[:n] = tree.tokens
        depth = np.zeros(rows, dtype=np.int32)
        depth[:n] = depths(tree.parents)
        if m:
            tokens[n : n + m] = branch.tokens
            depth[n : n + m] = branch.offsets
        ids = torch.as_tensor(tokens[None], dtype=torch.long, device=self.device)
        positions = torch.as_tensor(self.cached_len + depth[None], dtype=torch.long, device=self.device)
        kwargs = {}
        if rows > 1:
            start = self.cached_len
            visible = np.ones((rows, start + rows), dtype=bool)
            visible[:, start:] = np.eye(rows, dtype=bool)
            visible[:n, start : start + n] = ancestor_mask(tree.parents)
            if m:
                visible[n : n + m, start] = True  # the root
                visible[n : n + m, start + n : start + n + m] = branch.visible
            kwargs["attention_mask"] = additive_mask(visible[None], self.dtype, self.device)
        out = self.model(input_ids=ids, position_ids=positions, past_key_values=self.cache, use_cache=True, **kwargs)
        return out.logits[0, : n + m].float()

    @torch.inference_mode()
    def commit(self, accepted_nodes: np.ndarray) -> None:
        """Keep the cached prefix plus the accepted path's entries, in order, in every layer.

        Args:
            accepted_nodes: (m,) increasing node indices, root first, of the tree last passed to :meth:`logits`.
        """
        m = len(accepted_nodes)
        start = self.cached_len
        contiguous = bool(np.all(accepted_nodes == np.arange(m)))
        index = torch.as_tensor(start + accepted_nodes, dtype=torch.long, device=self.device)
        for layer in self.cache.layers:
            if not contiguous:
                layer.keys[:, :, start : start + m] = layer.keys.index_select(2, index)
                layer.values[:, :, start : start + m] = layer.values.index_select(2, index)
            layer.keys = layer.keys[:, :, : start + m]
            layer.values = layer.values[:, :, : start + m]
        self.cached_len = start + m

    def rollback(self) -> None:
        """Drop every cache entry beyond ``cached_len`` (what the last :meth:`logits` call appended)."""
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, : self.cached_len]
            layer.values = layer.values[:, :, : self.cached_len]


class BatchTreeVerifier:
    """Holds the model and one KV cache for B sequences decoded together; one forward verifies a tree per row.

    Rows keep their own lengths: the first ``lengths[b]`` cache slots of row ``b`` hold its context but the
    newest token (its next tree's root); later slots of a shorter row are stale and masked out, so each row
    computes exactly what it would alone. Call :meth:`reset` per batch, then alternate :meth:`logits` and
    :meth:`commit`; :meth:`keep_rows` drops finished rows.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.device = model.device
        self.dtype = model.dtype
        self.cache = DynamicCache(config=model.config)
        self.lengths = np.zeros(0, dtype=np.int64)
        self.width = 0  # cache slots per row (the longest row's length)

    @torch.inference_mode()
    def reset(self, prompts: list[np.ndarray]) -> None:
        """Start B sequences: cache every prompt token but the last. Identical prompts are prefilled once."""
        prefixes = [np.asarray(p[:-1], dtype=np.int32) for p in prompts]
        self.cache = DynamicCache(config=self.model.config)
        self.lengths = np.array([len(p) for p in prefixes], dtype=np.int64)
        self.width = int(self.lengths.max(initial=0))
        if self.width == 0:
            return
        same = all(np.array_equal(p, prefixes[0]) for p in prefixes)
        rows = prefixes[:1] if same else prefixes
        tokens = np.zeros((len(rows), self.width), dtype=np.int64)
        visible = np.zeros((len(rows), self.width, self.width), dtype=bool)
        causal = np.tril(np.ones((self.width, self.width), dtype=bool))
        for b, prefix in enumerate(rows):
            tokens[b, : len(prefix)] = prefix
            visible[b] = causal
            visible[b, :, len(prefix) :] = False
            visible[b, np.arange(len(prefix), self.width), np.arange(len(prefix), self.width)] = True  # inert rows
        positions = np.tile(np.arange(self.width), (len(rows), 1))
        self.model(
            input_ids=torch.as_tensor(tokens, device=self.device),
            position_ids=torch.as_tensor(positions, dtype=torch.long, device=self.device),
            attention_mask=additive_mask(visible, self.dtype, self.device),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        if same and len(prefixes) > 1:
            for layer in self.cache.layers:
                layer.keys = layer.keys.repeat(len(prefixes), 1, 1, 1)
                layer.values = layer.values.repeat(len(prefixes), 1, 1, 1)

    @torch.inference_mode()
    def logits(self, trees: list[DraftTree], pad_to: int = 0) -> list[torch.Tensor]:
        """Run the model over every node of every row's tree in one forward pass.

        Trees are padded with inert nodes to a common size ``T = max(pad_to, largest tree)``; the forward
        appends ``T`` slots per row to the cache (call :meth:`commit` next).

        Returns:
            per row ``b``, (len(trees[b]), vocab) float32 logits; row ``i`` predicts the token after node ``i``.
        """
        width, batch = self.width, len(trees)
        rows = max(pad_to, max(len(tree) for tree in trees))
        tokens = np.zeros((batch, rows), dtype=np.int64)
        positions = np.zeros((batch, rows), dtype=np.int64)
        visible = np.zeros((batch, rows, width + rows), dtype=bool)
        for b, tree in enumerate(trees):
            n = len(tree)
            tokens[b] = tree.tokens[0]
            tokens[b, :n] = tree.tokens
            positions[b] = self.lengths[b]
            positions[b, :n] += depths(tree.parents)
            visible[b, :, : self.lengths[b]] = True
            visible[b, :, width:] = np.eye(rows, dtype=bool)
            visible[b, :n, width : width + n] = ancestor_mask(tree.parents)
        out = self.model(
            input_ids=torch.as_tensor(tokens, device=self.device),
            position_ids=torch.as_tensor(positions, device=self.device),
            attention_mask=additive_mask(visible, self.dtype, self.device),
            past_key_values=self.cache,
            use_cache=True,
        )
        return [out.logits[b, : len(tree)].float() for b, tree in enumerate(trees)]

    @torch.inference_mode()
    def commit(self, accepted_nodes: list[np.ndarray]) -> None:
        """Per row, keep its cached context plus its accepted path's entries, in order, in every layer.

        Args:
            accepted_nodes: per row, (m_b,) increasing node indices, root first, of its last verified tree.
        """
        batch, most = len(accepted_nodes), max(len(a) for a in accepted_nodes)
        source = np.zeros((batch, most), dtype=np.int64)
        for b, nodes in enumerate(accepted_nodes):
            source[b] = self.width + nodes[-1]
            source[b, : len(nodes)] = self.width + nodes
        target = self.lengths[:, None] + np.arange(most)  # slots past a row's new length take filler: stale
        row = torch.arange(batch, device=self.device)[:, None]
        source_t = torch.as_tensor(source, device=self.device)
        target_t = torch.as_tensor(target, device=self.device)
        self.lengths = self.lengths + np.array([len(a) for a in accepted_nodes])
        self.width = int(self.lengths.max())
        for layer in self.cache.layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name)
                tensor[row, :, target_t] = tensor[row, :, source_t]
                setattr(layer, name, tensor[:, :, : self.width])

    def rollback(self) -> None:
        """Drop every cache slot beyond ``width`` (what the last :meth:`logits` call appended)."""
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, : self.width]
            layer.values = layer.values[:, :, : self.width]

    @torch.inference_mode()
    def keep_rows(self, rows: np.ndarray) -> None:
        """Keep only the given rows (indices into the current batch), in that order."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        self.lengths = self.lengths[rows]
        self.width = int(self.lengths.max(initial=0))
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, : self.width]
            layer.values = layer.values.index_select(0, index)[:, :, : self.width]


def additive_mask(visible: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(B, q, k) bool visibility -> (B, 1, q, k) additive float mask: 0 where visible, the dtype's minimum elsewhere."""
    mask = torch.zeros((visible.shape[0], 1, *visible.shape[1:]), dtype=dtype, device=device)
    mask[:, 0][torch.as_tensor(~visible, device=device)] = torch.finfo(dtype).min
    return mask
