"""The key/value cache of the rows decoded together, and every change made to it.

This module and :mod:`retrieval_spec.verify` are the only code that touches the model's cache. Every layer keeps
all its keys — sliding-window layers included: the verifier's masks apply the window
(``families.AttentionLayout``), and a layer that trimmed itself could not take back a rejected draft.

Layout: per layer, keys and values live in buffers of ``(batch, heads, capacity, head_dim)`` allocated once per
batch and grown by doubling (:class:`SlotLayer`); the model sees views of their first slots. Row ``b``'s first
``lengths[b]`` slots hold its context but the newest token (the next tree's root), in order, so a context slot's
index is its position. Slots from ``lengths[b]`` to ``width = max(lengths)`` are stale (a shorter row's leftovers)
and masked out. A verification forward writes ``T`` slots per row at ``[width, width + T)`` in place (the model's
own ``update`` call, no concatenation); :meth:`TreeCache.commit` then moves each row's accepted nodes to follow its
context — no slot at all when they already do, as for a chain accepted whole in one row — and forgets the rest.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

HEADROOM = 128  # slots a new batch's buffers hold beyond its prompts: a couple of steps before the first doubling


class SlotLayer(DynamicLayer):
    """One layer's keys and values in preallocated buffers: ``update`` (the model's call) writes a forward's new
    slots in place after the filled ones and returns views of everything filled.

    Attributes:
        buffer_keys, buffer_values: (batch, heads, capacity, head_dim).
        filled: slots in use; ``keys`` and ``values`` are views of them (set ``filled`` to drop or keep slots).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, filled: int) -> None:
        self.buffer_keys, self.buffer_values = keys, values
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self.filled = filled

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> SlotLayer:
        """A layer whose first slots are copies of ``keys`` and ``values`` ((batch, heads, n, head_dim))."""
        layer = cls(keys.new_zeros((*keys.shape[:2], capacity, keys.shape[3])),
                    values.new_zeros((*values.shape[:2], capacity, values.shape[3])), 0)
        layer.update(keys, values)
        return layer

    @property
    def keys(self) -> torch.Tensor:
        return self.buffer_keys[:, :, : self.filled]

    @keys.setter
    def keys(self, value: None) -> None:
        if value is not None:  # the base class clears it; anything else would bypass the buffer
            raise AttributeError("SlotLayer.keys is a view of its buffer: set filled instead")

    @property
    def values(self) -> torch.Tensor:
        return self.buffer_values[:, :, : self.filled]

    @values.setter
    def values(self, value: None) -> None:
        if value is not None:
            raise AttributeError("SlotLayer.values is a view of its buffer: set filled instead")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.filled + key_states.shape[-2]
        if end > self.buffer_keys.shape[2]:
            self._grow(end)
        self.buffer_keys[:, :, self.filled : end] = key_states
        self.buffer_values[:, :, self.filled : end] = value_states
        self.filled = end
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.filled

    def keep_rows(self, index: torch.Tensor, prefix: bool) -> None:
        """Keep these rows (``prefix``: they are the first ones, in order, and kept as a view)."""
        if prefix:
            self.buffer_keys, self.buffer_values = self.buffer_keys[: len(index)], self.buffer_values[: len(index)]
        else:
            self.buffer_keys = self.buffer_keys.index_select(0, index)
            self.buffer_values = self.buffer_values.index_select(0, index)

    def _grow(self, needed: int) -> None:
        """Double the capacity (or more, to ``needed``), keeping the filled slots."""
        capacity = max(needed, 2 * self.buffer_keys.shape[2])
        keys, values = self.buffer_keys, self.buffer_values
        self.buffer_keys = keys.new_empty((*keys.shape[:2], capacity, keys.shape[3]))
        self.buffer_values = values.new_empty((*values.shape[:2], capacity, values.shape[3]))
        self.buffer_keys[:, :, : self.filled] = keys[:, :, : self.filled]
        self.buffer_values[:, :, : self.filled] = values[:, :, : self.filled]


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
        capacity = self.width + most + HEADROOM
        layers = []
        for layer_index, template in enumerate(filled[0].layers):
            keys, values = template.keys, template.values
            layer = SlotLayer(keys.new_zeros((len(rows), keys.shape[1], capacity, keys.shape[3])),
                              values.new_zeros((len(rows), values.shape[1], capacity, values.shape[3])),
                              self.width + most)
            for b, p in enumerate(rows):
                if prefixes[p] is not None:
                    prefix, context = prefixes[p].layers[layer_index], lengths[p] - extra[p]
                    layer.buffer_keys[b, :, :context] = prefix.keys[0, :, :context]
                    layer.buffer_values[b, :, :context] = prefix.values[0, :, :context]
                    tree = slice(self.width, self.width + extra[p])
                    layer.buffer_keys[b, :, tree] = prefix.keys[0, :, context : lengths[p]]
                    layer.buffer_values[b, :, tree] = prefix.values[0, :, context : lengths[p]]
            layers.append(layer)
        self.cache.layers = layers

    @torch.inference_mode()
    def commit(self, accepted: list[np.ndarray]) -> None:
        """Per row, keep its context plus its accepted nodes' entries, in order; drop every other appended slot.

        Args:
            accepted: per row, (m_b,) increasing node indices, root first, of the tree it last verified (the
                nodes occupy appended slots ``width + node``).
        """
        layers = self._layers()
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
            device = _device(layers)
            row = torch.arange(len(accepted), device=device)[:, None]
            source_t = torch.as_tensor(source, device=device)
            target_t = torch.as_tensor(target, device=device)
            for layer in layers:
                for buffer in (layer.buffer_keys, layer.buffer_values):
                    buffer[row, :, target_t] = buffer[row, :, source_t]
        self.lengths = new_lengths
        self.width = int(new_lengths.max(initial=0))
        self._truncate(layers)

    def rollback(self) -> None:
        """Drop every slot the last forward appended (a probe's, or a step that will not be committed)."""
        self._truncate(self._layers())

    @torch.inference_mode()
    def keep_rows(self, rows: np.ndarray) -> None:
        """Keep only the given rows (indices into the current batch), in that order."""
        self.lengths = self.lengths[rows]
        self.width = int(self.lengths.max(initial=0))
        layers = self._layers()
        index = torch.as_tensor(rows, dtype=torch.long, device=_device(layers))
        prefix = bool(np.array_equal(rows, np.arange(len(rows))))
        for layer in layers:
            layer.keep_rows(index, prefix)
        self._truncate(layers)

    def _truncate(self, layers: list[SlotLayer]) -> None:
        for layer in layers:
            layer.filled = self.width

    def _layers(self) -> list[SlotLayer]:
        """The cache's layers as slot layers (a forward over an empty cache filled plain ones: they are adopted)."""
        layers = self.cache.layers
        for i, layer in enumerate(layers):
            if not isinstance(layer, SlotLayer) and layer.keys is not None and layer.keys.dim() == 4:
                layers[i] = SlotLayer.holding(layer.keys, layer.values, layer.keys.shape[2] + HEADROOM)
        return [layer for layer in layers if isinstance(layer, SlotLayer)]


def _device(layers: list[SlotLayer]) -> torch.device:
    """Where the cache's buffers live (the CPU before any forward filled them)."""
    return layers[0].buffer_keys.device if layers else torch.device("cpu")
