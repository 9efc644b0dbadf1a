"""The key/value cache of the rows decoded together, and every change made to it.

This module and :mod:`retrieval_spec.verify` are the only code that touches the model's cache. Every layer keeps
all its keys — sliding-window layers included: the verifier's masks apply the window
(``families.AttentionLayout``), and a layer that trimmed itself could not take back a rejected draft.

Layout: the keys of the layers that share a shape live in one buffer of ``(layers, batch, heads, capacity,
head_dim)``, and their values in another (:class:`SlotStore`), allocated once per batch and grown by doubling; each
layer (:class:`SlotLayer`) shows the model views of its first slots. Row ``b``'s first ``lengths[b]`` slots hold its
context but the newest token (the next tree's root), in order, so a context slot's index is its position. Slots from
``lengths[b]`` to ``width = max(lengths)`` are stale (a shorter row's leftovers) and masked out. A verification
forward writes ``T`` slots per row at ``[width, width + T)`` in place (the model's own ``update`` call, no
concatenation); :meth:`TreeCache.commit` then moves each row's accepted nodes to follow its context — no slot at all
when they already do, as for a chain accepted whole in one row — and forgets the rest, one indexing operation per
store for every layer at once (a model of uniform layers has one store: two operations, not two per layer).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

HEADROOM = 128  # slots a new batch's buffers hold beyond its prompts: a couple of steps before the first doubling


class SlotStore:
    """The keys and values of every layer of one shape, in two buffers: a row selection or a commit is one
    indexing operation on each for all of those layers.

    Attributes:
        keys: (layers, batch, heads, capacity, key_dim).
        values: (layers, batch, heads, capacity, value_dim).
        key_views, value_views: per layer, its (batch, heads, capacity, dim) view of the buffers.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._set(keys, values)

    @staticmethod
    def like(keys: torch.Tensor, values: torch.Tensor, layers: int, batch: int, capacity: int) -> SlotStore:
        """Zeroed buffers for ``layers`` layers of ``batch`` rows shaped like ``keys``/``values`` ((_, heads, _,
        dim))."""
        return SlotStore(keys.new_zeros((layers, batch, keys.shape[1], capacity, keys.shape[3])),
                         values.new_zeros((layers, batch, values.shape[1], capacity, values.shape[3])))

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def _set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values
        self.key_views, self.value_views = keys.unbind(0), values.unbind(0)

    def grow(self, needed: int) -> None:
        """Double the capacity (or more, to ``needed``), keeping every slot."""
        capacity = max(needed, 2 * self.capacity)
        keys = self.keys.new_empty((*self.keys.shape[:3], capacity, self.keys.shape[4]))
        values = self.values.new_empty((*self.values.shape[:3], capacity, self.values.shape[4]))
        keys[:, :, :, : self.capacity] = self.keys
        values[:, :, :, : self.capacity] = self.values
        self._set(keys, values)

    def keep_rows(self, index: torch.Tensor, prefix: bool) -> None:
        """Keep these rows (``prefix``: they are the first ones, in order, and kept as a view)."""
        if prefix:
            self._set(self.keys[:, : len(index)], self.values[:, : len(index)])
        else:
            self._set(self.keys.index_select(1, index), self.values.index_select(1, index))

    def move(self, row: torch.Tensor, target: torch.Tensor, source: torch.Tensor) -> None:
        """In every layer, row ``row[b]``'s slots ``target[b]`` take the contents of its slots ``source[b]``
        ((B, 1) and (B, m) int64)."""
        for buffer in (self.keys, self.values):
            buffer[:, row, :, target] = buffer[:, row, :, source]


class SlotLayer(DynamicLayer):
    """One layer's keys and values, a layer of a :class:`SlotStore`: ``update`` (the model's call) writes a
    forward's new slots in place after the filled ones and returns views of everything filled.

    Attributes:
        store, index: the buffers and this layer's place in them.
        filled: slots in use; ``keys`` and ``values`` are views of them (set ``filled`` to drop or keep slots).
    """

    def __init__(self, store: SlotStore, index: int, filled: int) -> None:
        self.store, self.index = store, index
        super().__init__()
        self.dtype, self.device = store.keys.dtype, store.keys.device
        self.is_initialized = True
        self.filled = filled

    @property
    def buffer_keys(self) -> torch.Tensor:
        """(batch, heads, capacity, key_dim)."""
        return self.store.key_views[self.index]

    @property
    def buffer_values(self) -> torch.Tensor:
        """(batch, heads, capacity, value_dim)."""
        return self.store.value_views[self.index]

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
        if end > self.store.capacity:  # the first layer of a forward grows its store's other layers too
            self.store.grow(end)
        self.buffer_keys[:, :, self.filled : end] = key_states
        self.buffer_values[:, :, self.filled : end] = value_states
        self.filled = end
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.filled


def slot_layers(templates: list[tuple[torch.Tensor, torch.Tensor]], batch: int, capacity: int, filled: int
                ) -> list[SlotLayer]:
    """Empty slot layers for ``batch`` rows, one per ``(keys, values)`` template ((_, heads, _, dim) each), the
    layers of one shape, dtype and device sharing a :class:`SlotStore`."""
    groups: dict[tuple, list[int]] = {}
    for i, (keys, values) in enumerate(templates):
        shape = (keys.shape[1], keys.shape[3], values.shape[1], values.shape[3], keys.dtype, keys.device)
        groups.setdefault(shape, []).append(i)
    layers: list[SlotLayer | None] = [None] * len(templates)
    for members in groups.values():
        store = SlotStore.like(*templates[members[0]], len(members), batch, capacity)
        for place, i in enumerate(members):
            layers[i] = SlotLayer(store, place, filled)
    return layers  # type: ignore[return-value]


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
        layers = slot_layers([(t.keys, t.values) for t in filled[0].layers], len(rows), capacity, self.width + most)
        for layer_index, layer in enumerate(layers):
            for b, p in enumerate(rows):
                if prefixes[p] is not None:
                    prefix, context = prefixes[p].layers[layer_index], lengths[p] - extra[p]
                    layer.buffer_keys[b, :, :context] = prefix.keys[0, :, :context]
                    layer.buffer_values[b, :, :context] = prefix.values[0, :, :context]
                    tree = slice(self.width, self.width + extra[p])
                    layer.buffer_keys[b, :, tree] = prefix.keys[0, :, context : lengths[p]]
                    layer.buffer_values[b, :, tree] = prefix.values[0, :, context : lengths[p]]
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
            for store in _stores(layers):
                store.move(row, target_t, source_t)
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
        for store in _stores(layers):
            store.keep_rows(index, prefix)
        self._truncate(layers)

    def _truncate(self, layers: list[SlotLayer]) -> None:
        for layer in layers:
            layer.filled = self.width

    def _layers(self) -> list[SlotLayer]:
        """The cache's layers as slot layers (a forward over an empty cache filled plain ones: they are adopted)."""
        layers = self.cache.layers
        plain = [i for i, layer in enumerate(layers)
                 if not isinstance(layer, SlotLayer) and layer.keys is not None and layer.keys.dim() == 4]
        if plain:
            first = layers[plain[0]]
            adopted = slot_layers([(layers[i].keys, layers[i].values) for i in plain], first.keys.shape[0],
                                  first.keys.shape[2] + HEADROOM, 0)
            for i, layer in zip(plain, adopted):
                layer.update(layers[i].keys, layers[i].values)
                layers[i] = layer
        return [layer for layer in layers if isinstance(layer, SlotLayer)]


def _stores(layers: list[SlotLayer]) -> list[SlotStore]:
    """The distinct stores of ``layers``, in order."""
    return list({id(layer.store): layer.store for layer in layers}.values())


def _device(layers: list[SlotLayer]) -> torch.device:
    """Where the cache's buffers live (the CPU before any forward filled them)."""
    return layers[0].buffer_keys.device if layers else torch.device("cpu")
