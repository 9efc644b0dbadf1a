"""Context n-gram -> most frequent next tokens, counted over token streams and stored in Parquet.

Rows of the table (``ngrams.parquet``), sorted by order, context, then count (highest first):

    order    int8          n, the length of the context
    context  list<int32>   (n,) token ids
    next     int32         a token that followed the context
    count    int64         how often it did (within one shard; summed when shards are merged)

At most ``top_k`` rows per context. An n-gram pool drafter reads every order; token recycling is warm-started
from order 1 with :func:`top_next_tokens`. Windows that touch a document separator are not counted.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Token ids are packed 21 bits apiece into int64 keys: (context, next) of up to 3 tokens.
KEY_BITS = 21
MAX_VOCAB_SIZE = 1 << KEY_BITS
ORDERS = (1, 2)
SCHEMA = pa.schema(
    [("order", pa.int8()), ("context", pa.list_(pa.int32())), ("next", pa.int32()), ("count", pa.int64())]
)


def count_continuations(stream: np.ndarray, separator: int, *, top_k: int, min_count: int) -> pa.Table:
    """Count, for each context of :data:`ORDERS` tokens in ``stream``, its ``top_k`` most frequent next tokens.

    Args:
        stream: (n,) token ids with documents delimited by ``separator``; ids below :data:`MAX_VOCAB_SIZE`.
        top_k: rows kept per context.
        min_count: for orders above 1, drop continuations seen fewer times. Order-1 contexts are bounded by the
            vocabulary, higher orders grow with the corpus, and one-off continuations are noise there.
    """
    real = stream != separator
    n = len(stream)
    tables = []
    for order in ORDERS:
        # keys[i] packs stream[i : i + order + 1]; windows that touch a separator get -1 and sort first.
        keys = stream[: n - order].astype(np.int64)
        valid = real[: n - order].copy()
        for offset in range(1, order + 1):
            keys <<= KEY_BITS
            keys |= stream[offset : n - order + offset]
            valid &= real[offset : n - order + offset]
        keys[~valid] = -1
        del valid
        keys.sort()
        keys = keys[np.searchsorted(keys, 0) :]
        starts = _run_starts(keys)
        counts = np.diff(np.append(starts, len(keys)))
        unique_keys = keys[starts]
        del keys
        if order > 1:
            kept = counts >= min_count
            unique_keys, counts = unique_keys[kept], counts[kept]
        tables.append(_table(order, unique_keys, counts, top_k))
    return pa.concat_tables(tables)


def merge_continuations(tables: Sequence[pa.Table], top_k: int) -> pa.Table:
    """Sum the counts of several tables (one per shard) and keep the ``top_k`` next tokens per context.

    A continuation that fell below a shard's own top-k or min-count is missing from that shard's sum.
    """
    if len(tables) == 1:
        return tables[0]
    merged = []
    for order in ORDERS:
        parts = [decode(table, order) for table in tables]
        contexts = np.concatenate([p[0] for p in parts])
        keys = _pack(np.concatenate([contexts, np.concatenate([p[1] for p in parts])[:, None]], axis=1))
        unique_keys, inverse = np.unique(keys, return_inverse=True)
        counts = np.bincount(inverse, weights=np.concatenate([p[2] for p in parts])).astype(np.int64)
        merged.append(_table(order, unique_keys, counts, top_k))
    return pa.concat_tables(merged)


def check(table: pa.Table, vocab_size: int) -> None:
    """Raise ``ValueError`` saying what is wrong unless ``table`` could have been written by this module.

    Checked: the schema, no nulls, orders among :data:`ORDERS`, each context as long as its order, token ids
    in ``[0, vocab_size)`` and positive counts. Vectorised: a few passes over the columns.
    """
    if not table.schema.equals(SCHEMA):
        raise ValueError(f"columns {table.schema.names} of types {table.schema.types}, expected {SCHEMA.names} "
                         f"of types {SCHEMA.types}")
    contexts = pc.list_flatten(table["context"])
    for name, column in (("order", table["order"]), ("context", table["context"]), ("context ids", contexts),
                         ("next", table["next"]), ("count", table["count"])):
        if column.null_count:
            raise ValueError(f"{column.null_count} null values in {name}")
    if table.num_rows == 0:
        return
    orders = table["order"].to_numpy()
    if not np.isin(orders, ORDERS).all():
        raise ValueError(f"order {int(orders[~np.isin(orders, ORDERS)][0])}, expected one of {ORDERS}")
    if not np.array_equal(pc.list_value_length(table["context"]).to_numpy(), orders):
        raise ValueError("a context whose length differs from its order")
    for name, ids in (("context", contexts), ("next", table["next"])):
        low, high = pc.min_max(ids).values()
        if low.as_py() < 0 or high.as_py() >= vocab_size:
            bad = low.as_py() if low.as_py() < 0 else high.as_py()
            raise ValueError(f"{name} token id {bad}, outside the vocabulary [0, {vocab_size})")
    if pc.min(table["count"]).as_py() < 1:
        raise ValueError("a count below 1")


def decode(table: pa.Table, order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows of one order as arrays: contexts (m, order) int32, next (m,) int32, count (m,) int64."""
    rows = table.filter(pc.equal(table["order"], order))
    contexts = pc.list_flatten(rows["context"]).to_numpy().astype(np.int32).reshape(-1, order)
    return contexts, rows["next"].to_numpy().astype(np.int32), rows["count"].to_numpy().astype(np.int64)


def top_next_tokens(table: pa.Table, vocab_size: int, k: int) -> np.ndarray:
    """(vocab_size, k) int32: for each token, its k most frequent next tokens (most frequent first, -1 if none)."""
    contexts, next_tokens, _ = decode(table, 1)  # rows are sorted by context, then count descending
    out = np.full((vocab_size, k), -1, dtype=np.int32)
    previous = contexts[:, 0]
    rank = _rank_in_run(previous)
    kept = (rank < k) & (previous < vocab_size)
    out[previous[kept], rank[kept]] = next_tokens[kept]
    return out


def _run_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Indices where a run of equal values begins in a sorted array."""
    if len(sorted_keys) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1])))


def _rank_in_run(sorted_keys: np.ndarray) -> np.ndarray:
    """(m,) position of each element within its run of equal values."""
    starts = _run_starts(sorted_keys)
    return np.arange(len(sorted_keys)) - np.repeat(starts, np.diff(np.append(starts, len(sorted_keys))))


def _pack(columns: np.ndarray) -> np.ndarray:
    """(m, w) token ids -> (m,) int64 keys, first column most significant."""
    keys = np.zeros(len(columns), dtype=np.int64)
    for column in columns.T:
        keys = (keys << KEY_BITS) | column.astype(np.int64)
    return keys


def _table(order: int, keys: np.ndarray, counts: np.ndarray, top_k: int) -> pa.Table:
    """Rows of one order from packed (context, next) keys, keeping the ``top_k`` counts per context."""
    mask = MAX_VOCAB_SIZE - 1
    contexts, next_tokens = keys >> KEY_BITS, keys & mask
    ranked = np.lexsort((-counts, contexts))
    contexts, next_tokens, counts = contexts[ranked], next_tokens[ranked], counts[ranked]
    kept = _rank_in_run(contexts) < top_k
    contexts, next_tokens, counts = contexts[kept], next_tokens[kept], counts[kept]
    # Unpack contexts into (m, order) token columns, first token first.
    shifts = KEY_BITS * np.arange(order - 1, -1, -1, dtype=np.int64)
    context_tokens = ((contexts[:, None] >> shifts) & mask).astype(np.int32)
    offsets = np.arange(0, order * len(contexts) + 1, order, dtype=np.int32)
    return pa.table(
        {
            "order": pa.array(np.full(len(contexts), order, dtype=np.int8)),
            "context": pa.ListArray.from_arrays(pa.array(offsets), pa.array(context_tokens.ravel())),
            "next": pa.array(next_tokens.astype(np.int32)),
            "count": pa.array(counts.astype(np.int64)),
        },
        schema=SCHEMA,
    )
