"""The key/value cache of the rows decoded together, and every change made to it.

This module and :mod:`retrieval_spec.verify` are the only code that touches the model's cache. The cache is
transformers' own ``DynamicCache`` built without a config, so every layer keeps all its keys — sliding-window
layers included: the verifier's masks apply the window (``families.AttentionLayout``), and a layer that trimmed
itself could not take back a rejected draft.

Layout: ``(batch, heads, slots, head_dim)`` per layer. Row ``b``'s first ``lengths[b]`` slots hold its context
but the newest token (the next tree's root), in order, so a context slot's index is its position. Slots from
``lengths[b]`` to ``width = max(lengths)`` are stale (a shorter row's leftovers) and masked out. A verification
forward appends ``T`` slots per row at ``[width, width + T)``; :meth:`TreeCache.commit` then moves each row's
accepted nodes to follow its context and drops the rest.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache


class TreeCache:
    """One cache for B rows with per-row lengths: prefill, append, keep accepted, roll back, keep rows.

    Attributes:
        cache: the transformers cache handed to the model's forward (which appends to every layer).
        lengths: (B,) int64 cached slots of each row.
        width: slots per row before the last forward's appended ones (``max(lengths)``, 0 when empty).
    """

    def __init__(self) -> None:
        self.cache = DynamicCache()
        self.lengths = np.zeros(0, dtype=np.int64)
        self.width = 0

    def load_rows(self, prefixes: list[DynamicCache | None], lengths: list[int], rows: list[int],
                  appended: list[int] | None = None) -> None:
        """Start a batch from separately prefilled prefixes.

        Args:
            prefixes: distinct prefilled caches (None for an empty prefix), each of batch 1.
            lengths: (len(prefixes),) tokens cached in each.
            rows: (B,) which prefix each row of the batch starts from (rows that share one are copies of it).
            appended: (len(prefixes),) how many of each prefix's last entries are its rows' tree (root first),
                appended at slots ``[width, width + appended)`` and awaiting :meth:`commit` as verified nodes
                are; by default none: every entry is context.
        """
        extra = appended if appended is not None else [0] * len(prefixes)
        self.lengths = np.array([lengths[p] - extra[p] for p in rows], dtype=np.int64)
        self.width = int(self.lengths.max(initial=0))
        self.cache = DynamicCache()
        filled = [c for c in prefixes if c is not None]
        if not filled:
            return
        most = max(extra[p] for p in rows)
        for layer_index, template in enumerate(filled[0].layers):
            keys, values = template.keys, template.values
            shape = (len(rows), keys.shape[1], self.width + most, keys.shape[3])
            all_keys = keys.new_zeros(shape)
            all_values = values.new_zeros((*shape[:3], values.shape[3]))
            for b, p in enumerate(rows):
                if prefixes[p] is not None:
                    layer, context = prefixes[p].layers[layer_index], lengths[p] - extra[p]
                    all_keys[b, :, :context] = layer.keys[0, :, :context]
                    all_values[b, :, :context] = layer.values[0, :, :context]
                    tree = slice(self.width, self.width + extra[p])
                    all_keys[b, :, tree] = layer.keys[0, :, context : lengths[p]]
                    all_values[b, :, tree] = layer.values[0, :, context : lengths[p]]
            self.cache.update(all_keys, all_values, layer_index)

    @torch.inference_mode()
    def commit(self, accepted: list[np.ndarray]) -> None:
        """Per row, keep its context plus its accepted nodes' entries, in order; drop every other appended slot.

        Args:
            accepted: per row, (m_b,) increasing node indices, root first, of the tree it last verified (the
                nodes occupy appended slots ``width + node``).
        """
        counts = np.array([len(a) for a in accepted], dtype=np.int64)
        new_lengths = self.lengths + counts
        same_start = bool(np.all(self.lengths == self.width))
        in_place = same_start and all(np.array_equal(a, np.arange(len(a))) for a in accepted)
        if not in_place:
            most = int(counts.max())
            source = np.zeros((len(accepted), most), dtype=np.int64)
            for b, nodes in enumerate(accepted):
                source[b] = self.width + nodes[-1]  # filler for slots past the row's new length: stale
                source[b, : len(nodes)] = self.width + nodes
            target = self.lengths[:, None] + np.arange(most)
            device = self._device()
            row = torch.arange(len(accepted), device=device)[:, None]
            source_t = torch.as_tensor(source, device=device)
            target_t = torch.as_tensor(target, device=device)
            for layer in self._layers():
                for name in ("keys", "values"):
                    tensor = getattr(layer, name)
                    tensor[row, :, target_t] = tensor[row, :, source_t]
        self.lengths = new_lengths
        self.width = int(new_lengths.max(initial=0))
        self._truncate()

    def rollback(self) -> None:
        """Drop every slot the last forward appended (a probe's, or a step that will not be committed)."""
        self._truncate()

    @torch.inference_mode()
    def keep_rows(self, rows: np.ndarray) -> None:
        """Keep only the given rows (indices into the current batch), in that order."""
        self.lengths = self.lengths[rows]
        self.width = int(self.lengths.max(initial=0))
        index = torch.as_tensor(rows, dtype=torch.long, device=self._device())
        for layer in self._layers():
            layer.keys = layer.keys.index_select(0, index)[:, :, : self.width]
            layer.values = layer.values.index_select(0, index)[:, :, : self.width]

    def _truncate(self) -> None:
        for layer in self._layers():
            layer.keys = layer.keys[:, :, : self.width]
            layer.values = layer.values[:, :, : self.width]

    def _layers(self) -> list:
        return [layer for layer in self.cache.layers if layer.keys is not None and layer.keys.dim() == 4]

    def _device(self) -> torch.device:
        layers = self._layers()
        return layers[0].keys.device if layers else torch.device("cpu")
