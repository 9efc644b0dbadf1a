"""Verification: the only place that runs the target model.

One forward pass scores a whole :class:`DraftTree` on top of the KV cache with tree attention (a 4-D float
mask plus per-node position ids); acceptance picks the longest path the target agrees with; compaction keeps
exactly that path's keys and values in the cache.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel

from .drafters.base import DraftTree
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

    @torch.inference_mode()
    def reset(self, prompt: np.ndarray) -> None:
        """Start a sequence: cache every prompt token but the last, which becomes the first root."""
        self.cache = DynamicCache(config=self.model.config)
        self.cached_len = 0
        if len(prompt) > 1:
            ids = torch.as_tensor(prompt[None, :-1], dtype=torch.long, device=self.device)
            self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
            self.cached_len = len(prompt) - 1

    @torch.inference_mode()
    def logits(self, tree: DraftTree) -> torch.Tensor:
        """Run the model over every node of ``tree`` in one forward pass.

        The tree's keys and values are appended to the cache (call :meth:`commit` next).

        Returns:
            (n, vocab) float32 logits; row ``i`` predicts the token after node ``i``.
        """
        n = len(tree)
        ids = torch.as_tensor(tree.tokens[None, :], dtype=torch.long, device=self.device)
        positions = torch.as_tensor(self.cached_len + depths(tree.parents)[None, :], dtype=torch.long, device=self.device)
        kwargs = {}
        if n > 1:
            visible = np.ones((n, self.cached_len + n), dtype=bool)
            visible[:, self.cached_len :] = ancestor_mask(tree.parents)
            mask = torch.zeros((1, 1, n, self.cached_len + n), dtype=self.dtype, device=self.device)
            mask[0, 0][torch.as_tensor(~visible, device=self.device)] = torch.finfo(self.dtype).min
            kwargs["attention_mask"] = mask
        out = self.model(input_ids=ids, position_ids=positions, past_key_values=self.cache, use_cache=True, **kwargs)
        return out.logits[0].float()

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
        """Drop whatever the last :meth:`logits` call appended (used when measuring cost)."""
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, : self.cached_len]
            layer.values = layer.values[:, :, : self.cached_len]
